"""Template files from TemplateFlow, offline-safe.

The container ships the files in ``TEMPLATEFLOW_HOME``; at run time nothing is downloaded
unless the file is absent and the network is allowed. Set ``LDAE_TEMPLATEFLOW_OFFLINE=1``
(tests do) to forbid downloads outright.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldae_bids.errors import MissingInputError

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"


def templateflow_home() -> Path:
    """The TemplateFlow cache folder (``$TEMPLATEFLOW_HOME``, else TemplateFlow's default)."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser()
    try:
        from templateflow.conf.env import get_templateflow_home

        return Path(get_templateflow_home())
    except Exception:  # pragma: no cover - very old templateflow
        return Path.home() / ".cache" / "templateflow"


def expected_name(template: str, resolution: int, suffix: str, desc: str | None) -> str:
    """TemplateFlow file name, e.g. ``tpl-MNI152NLin2009cAsym_res-02_desc-brain_mask.nii.gz``."""
    parts = [f"tpl-{template}", f"res-{int(resolution):02d}"]
    if desc:
        parts.append(f"desc-{desc}")
    return "_".join(parts) + f"_{suffix}.nii.gz"


def _offline() -> bool:
    return os.environ.get("LDAE_TEMPLATEFLOW_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def get_template(
    resolution: int = 2,
    suffix: str = "T1w",
    desc: str | None = None,
    template: str = DEFAULT_TEMPLATE,
) -> Path:
    """Path of a template file, from ``TEMPLATEFLOW_HOME`` (downloaded by TemplateFlow if allowed).

    Parameters
    ----------
    resolution : int
        TemplateFlow resolution index (``2`` is the 2 mm grid of MNI152NLin2009cAsym).
    suffix : str
        ``"T1w"`` or ``"mask"``.
    desc : str, optional
        ``"brain"`` for the brain mask.
    template : str
        TemplateFlow template identifier.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    MissingInputError
        Naming the expected file and ``TEMPLATEFLOW_HOME`` when it is not there and cannot
        be fetched (offline, or ``LDAE_TEMPLATEFLOW_OFFLINE=1``).
    """
    home = templateflow_home()
    name = expected_name(template, resolution, suffix, desc)
    local = home / f"tpl-{template}" / name
    # Fast path: a complete local file (zero-byte files are TemplateFlow's download stubs).
    if local.is_file() and local.stat().st_size > 0:
        return local
    problem = "not found"
    if not _offline():
        try:
            from templateflow.client import TemplateFlowClient

            client = TemplateFlowClient(root=home)
            kwargs = {"resolution": int(resolution), "suffix": suffix, "extension": ".nii.gz"}
            kwargs["desc"] = desc  # None excludes files with a desc entity
            found = client.get(template, **kwargs)
            found = found if isinstance(found, list) else [found]
            found = [Path(p) for p in found if p and Path(p).is_file() and Path(p).stat().st_size > 0]
            if len(found) == 1:
                return found[0]
            problem = "not found" if not found else f"ambiguous ({len(found)} matches)"
        except Exception as exc:  # network errors, broken cache
            problem = f"not available ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    raise MissingInputError(
        f"template file {name} {problem} in TEMPLATEFLOW_HOME={home}; "
        f"put it at {local} (e.g. python -c \"import templateflow.api as t; "
        f"t.get('{template}', resolution={int(resolution)}, suffix='{suffix}', desc={desc!r})\")"
    )
