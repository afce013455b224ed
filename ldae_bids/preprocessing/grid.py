"""The model grid: shape, spacing and voxel-to-MNI affine of the images the model sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEMPLATE = "MNI152NLin2009cAsym"

# TemplateFlow's res-02 grid of MNI152NLin2009cAsym: 97x115x97 voxels, 2 mm, RAS.
TPL_RES02_SHAPE = (97, 115, 97)
TPL_RES02_AFFINE = np.array(
    [
        [2.0, 0.0, 0.0, -96.5],
        [0.0, 2.0, 0.0, -132.5],
        [0.0, 0.0, 2.0, -78.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
# Voxel offset of the compact crop inside the res-02 grid. The template brain mask spans
# voxels x 13..84, y 13..102, z 4..80 (72x90x77). The crop (x 9..88, y 10..105, z 5..84)
# is centred on the brain box in x and y (4 and 3 voxels of margin) and leaves 4 voxels
# (8 mm) above the vertex; 80 slices cannot hold the 77-slice mask with margin on both
# ends, so the lowest template mask slice (caudal medulla) is the one left out.
COMPACT_OFFSET = (9, 10, 5)
COMPACT_SHAPE = (80, 96, 80)


def _res_label(spacing: float) -> str:
    """BIDS-valid ``res`` label from a spacing in mm: 2.0 -> "2", 1.5 -> "1p5"."""
    text = f"{spacing:g}"
    return text.replace(".", "p")


@dataclass(frozen=True)
class Grid:
    """A regular voxel grid in template (MNI) world coordinates.

    Parameters
    ----------
    shape : tuple of int
        Number of voxels along i, j, k.
    spacing : float
        Isotropic voxel size in mm.
    affine : numpy.ndarray
        4x4 voxel-to-world matrix (RAS mm, template space).
    template : str
        TemplateFlow identifier of the space.
    name : str
        Preset name ("compact", "paper" or "custom"); informational only.
    """

    shape: tuple[int, int, int]
    spacing: float
    affine: np.ndarray = field(repr=False)
    template: str = TEMPLATE
    name: str = "custom"

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
        aff.setflags(write=False)
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", float(self.spacing))

    # ------------------------------------------------------------------ presets
    @classmethod
    def compact(cls) -> "Grid":
        """2 mm, 80x96x80: a crop of TemplateFlow's 97x115x97 res-02 grid around the brain."""
        aff = TPL_RES02_AFFINE.copy()
        aff[:3, 3] += 2.0 * np.asarray(COMPACT_OFFSET, dtype=float)
        return cls(COMPACT_SHAPE, 2.0, aff, TEMPLATE, "compact")

    @classmethod
    def paper(cls) -> "Grid":
        """1.5 mm, 128x160x128 (the reference's grid), centred where the compact grid is."""
        return cls.centred_like(cls.compact(), (128, 160, 128), 1.5, name="paper")

    @classmethod
    def centred_like(cls, other: "Grid", shape, spacing: float, name: str = "custom") -> "Grid":
        """A RAS grid of ``shape`` and ``spacing`` whose centre is ``other``'s centre."""
        centre = other.centre
        aff = np.diag([spacing, spacing, spacing, 1.0])
        aff[:3, 3] = centre - spacing * (np.asarray(shape, dtype=float) - 1) / 2
        return cls(tuple(shape), spacing, aff, other.template, name)

    @classmethod
    def from_name(cls, name: str) -> "Grid":
        """``"compact"`` or ``"paper"``."""
        presets = {"compact": cls.compact, "paper": cls.paper}
        if name not in presets:
            raise ValueError(f"unknown grid preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    # --------------------------------------------------------------- properties
    @property
    def centre(self) -> np.ndarray:
        """World coordinates (mm) of the grid centre."""
        mid = (np.asarray(self.shape, dtype=float) - 1) / 2
        return self.affine[:3, :3] @ mid + self.affine[:3, 3]

    @property
    def res_label(self) -> str:
        """BIDS ``res-<label>`` value: the spacing in mm with ``p`` for the decimal point.

        ``"2"`` for 2 mm, ``"1p5"`` for 1.5 mm (BIDS labels are alphanumeric). The label
        names our grid, not a TemplateFlow resolution index; the sidecar states the grid.
        """
        return _res_label(self.spacing)

    # -------------------------------------------------------------- round trip
    def to_dict(self) -> dict:
        """JSON-able description (stored in model bundles and sidecars)."""
        return {
            "shape": list(self.shape),
            "spacing": self.spacing,
            "affine": [[float(v) for v in row] for row in self.affine],
            "template": self.template,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(data["shape"]),
            float(data["spacing"]),
            np.asarray(data["affine"], dtype=np.float64),
            data.get("template", TEMPLATE),
            data.get("name", "custom"),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.spacing == other.spacing
            and self.template == other.template
            and np.allclose(self.affine, other.affine)
        )

    def __hash__(self) -> int:
        return hash((self.shape, self.spacing, self.template, tuple(np.round(self.affine, 6).ravel())))
