"""Model-ready training images packed small enough to travel to a lent GPU machine, and unpacked there.

The device machine takes at most 64 MiB of files with a call (the repository, the wheels it lacks and the data
together), and the shipped bundle alone is 29 MB. The 134 IXI model-ready images (80x96x80 float32, [0, 1])
are 8-bit quantised (round(255 x), the error at most 1/510, an RMS of 0.0011 against the autoencoder's 0.049)
and compressed with xz into one file of about 27 MB::

    python benchmarks/train_kit.py pack --data /work/cache/ixi-preproc --out .trainkit/data
    python benchmarks/train_kit.py unpack --kit .trainkit/data --out /tmp/ixi-train    # on the device machine

``unpack`` writes ``sub-<l>/anat/sub-<l>_desc-preproc_T1w.nii.gz`` (uint8 with a 1/255 scale factor: nibabel
reads the quantised [0, 1] values) on the images' own grid, which ``ldae-bids-tools train`` reads as it reads
the preprocess stage's outputs. ``benchmarks/gpu_session.sh trainkit`` / ``train`` use it.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

LEVELS = 255
SUFFIX = "_desc-preproc_T1w.nii.gz"
LABEL = re.compile(r"[A-Za-z0-9]+")  # BIDS labels: the only names unpack writes under its output folder


def _check_labels(labels: list[str], where: Path) -> None:
    bad = [label for label in labels if not LABEL.fullmatch(str(label))]
    if bad:
        raise SystemExit(f"train_kit: {where}: subject label {bad[0]!r} is not a BIDS label (letters and digits)")


def quantise(volume: np.ndarray) -> np.ndarray:
    """[0, 1] intensities -> uint8 (round(255 x)); values outside [0, 1] are clipped."""
    return np.rint(np.clip(volume, 0.0, 1.0) * LEVELS).astype(np.uint8)


def _image(path: Path):
    """The NIfTI image at ``path`` (header and affine), or an InputError naming the file, as ``load_volume`` does."""
    import nibabel as nib

    from ldae_bids.errors import InputError

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types
        raise InputError(f"{path}: cannot read image ({exc})") from exc


def pack(data: Path, out: Path, limit: int | None = None) -> dict:
    """Pack every ``*_desc-preproc_T1w.nii.gz`` under ``data`` (one per subject) into ``out``/images.xz + index.json."""
    from ldae_bids.model.data import find_images, load_volume, subject_of

    paths = find_images([data])[:limit]
    subjects = [subject_of(p) for p in paths]
    _check_labels(subjects, data)
    if len(set(subjects)) != len(subjects):
        raise SystemExit(f"train_kit: {data}: more than one image per subject; pack one session per subject")
    first = _image(paths[0])
    shape, affine = tuple(int(s) for s in first.shape[:3]), first.affine
    comp = lzma.LZMACompressor(preset=9)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "images.xz.tmp"  # renamed once every image is in: a failed pack leaves no half-written kit
    try:
        with open(tmp, "wb") as fh:
            for path in paths:
                img = _image(path)
                if tuple(img.shape[:3]) != shape or not np.allclose(img.affine, affine, atol=1e-4):
                    raise SystemExit(f"train_kit: {path}: grid differs from {paths[0]}")
                fh.write(comp.compress(quantise(load_volume(path, shape)).tobytes()))
            fh.write(comp.flush())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    (out / "index.json").unlink(missing_ok=True)
    tmp.replace(out / "images.xz")
    index = {"subjects": subjects, "shape": list(shape), "affine": np.asarray(affine).tolist(), "levels": LEVELS,
             "dtype": "uint8", "source": str(data), "bytes": (out / "images.xz").stat().st_size}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def unpack(kit: Path, out: Path) -> list[Path]:
    """Write the packed images back as NIfTI files under ``out``; returns their paths."""
    import nibabel as nib

    index = json.loads((kit / "index.json").read_text())
    _check_labels(index["subjects"], kit / "index.json")
    shape, n = tuple(index["shape"]), len(index["subjects"])
    raw = lzma.decompress((kit / "images.xz").read_bytes())
    size = int(np.prod(shape))
    if len(raw) != n * size:
        raise SystemExit(f"train_kit: {kit}: {len(raw)} bytes for {n} images of {size} voxels")
    volumes = np.frombuffer(raw, dtype=np.uint8).reshape(n, *shape)
    written = []
    for label, vol in zip(index["subjects"], volumes):
        img = nib.Nifti1Image(vol, np.asarray(index["affine"]))
        img.header.set_slope_inter(1.0 / index["levels"], 0.0)
        img.header.set_xyzt_units("mm")
        path = out / f"sub-{label}" / "anat" / f"sub-{label}{SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="model-ready images -> images.xz + index.json")
    p.add_argument("--data", type=Path, required=True, help="folder of *_desc-preproc_T1w.nii.gz "
                   "(bench_preprocess.py --save-dir, or a participant run's output folder)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="at most this many subjects (tests)")
    u = sub.add_parser("unpack", help="images.xz + index.json -> NIfTI files")
    u.add_argument("--kit", type=Path, required=True)
    u.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from ldae_bids.errors import LdaeError

    try:
        return _run(args)
    except LdaeError as exc:  # an unreadable or malformed image: one line naming the file
        print(f"train_kit: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)


def _run(args) -> int:
    if args.cmd == "pack":
        index = pack(args.data, args.out, args.limit)
        print(f"packed {len(index['subjects'])} images ({index['bytes'] / 2**20:.1f} MiB) into {args.out}")
    else:
        print(f"unpacked {len(unpack(args.kit, args.out))} images into {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
