"""The entities of every derivative the built-in stages write.

Stages and plugins locate each other's outputs through these functions and
``writer.path(**entities)``, never through hand-built file names.
"""

from __future__ import annotations

from typing import Any

from ldae_bids.bids.discover import SessionInput

SPACE = "MNI152NLin2009cAsym"


def session_entities(ses: SessionInput) -> dict[str, Any]:
    return dict(ses.entities)


def preproc_t1w(ses: SessionInput, res: str) -> dict[str, Any]:
    """Model-ready image: skull-stripped, aligned, on the model grid, intensities in [0, 1]."""
    return {**ses.entities, "space": SPACE, "res": res, "desc": "preproc", "suffix": "T1w"}


def brain_mask_grid(ses: SessionInput, res: str) -> dict[str, Any]:
    return {**ses.entities, "space": SPACE, "res": res, "desc": "brain", "suffix": "mask"}


def brain_mask_native(ses: SessionInput) -> dict[str, Any]:
    return {**ses.entities, "desc": "brain", "suffix": "mask"}


def xfm(ses: SessionInput) -> dict[str, Any]:
    """Affine native T1w -> template, ITK/ANTs text format."""
    return {**ses.entities, "from": "T1w", "to": SPACE, "mode": "image", "suffix": "xfm"}


def qc_figure(ses: SessionInput) -> dict[str, Any]:
    return {**ses.entities, "desc": "qc", "suffix": "T1w"}


def ysem(ses: SessionInput) -> dict[str, Any]:
    """Semantic code y_sem: a one-row TSV."""
    return {**ses.entities, "space": SPACE, "desc": "ysem", "suffix": "features"}


def xt(ses: SessionInput) -> dict[str, Any]:
    """Stochastic code x_T: a safetensors file with one tensor named ``x_T``."""
    return {**ses.entities, "space": SPACE, "desc": "xt", "suffix": "xt"}


def reconstruction(ses: SessionInput, res: str) -> dict[str, Any]:
    return {**ses.entities, "space": SPACE, "res": res, "desc": "reconstruction", "suffix": "T1w"}
