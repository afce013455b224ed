"""Resume records: one stamp per (subject, stage) under ``logs/stamps``.

A stamp holds a key (a hash of the stage version, its parameters, the input files'
content, the model hash and the keys of the stages it depends on) and the files the
stage wrote. A stage is skipped when its stamp's key matches and all its files exist.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from ldae_bids.bids.io import atomic_write_json


@lru_cache(maxsize=4096)
def file_digest(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest(path: Path) -> str:
    st = Path(path).stat()
    return file_digest(Path(path), st.st_size, st.st_mtime_ns)


def make_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StampStore:
    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.root = output_dir / "logs" / "stamps"

    def path(self, unit: str, stage: str) -> Path:
        return self.root / unit / f"{stage}.json"

    def read(self, unit: str, stage: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(unit, stage).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, unit: str, stage: str, key: str) -> bool:
        stamp = self.read(unit, stage)
        if not stamp or stamp.get("key") != key:
            return False
        return all((self.output_dir / f).exists() for f in stamp.get("files", []))

    def key_of(self, unit: str, stage: str) -> str | None:
        stamp = self.read(unit, stage)
        return stamp.get("key") if stamp else None

    def all_keys(self, unit: str) -> dict[str, str]:
        """Every stage key recorded for a unit (the participant outputs a group stage reads)."""
        folder = self.root / unit
        if not folder.is_dir():
            return {}
        return {p.stem: self.key_of(unit, p.stem) or "" for p in sorted(folder.glob("*.json"))}

    def write(self, unit: str, stage: str, key: str, files: list[Path], run_id: str,
              sessions: list[str] | None = None) -> None:
        rel = sorted({Path(f).resolve().relative_to(self.output_dir.resolve()).as_posix() for f in files})
        atomic_write_json(self.path(unit, stage), {
            "stage": stage, "key": key, "files": rel, "run_id": run_id, "sessions": sessions,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })

    def remove(self, unit: str, stage: str) -> None:
        self.path(unit, stage).unlink(missing_ok=True)
