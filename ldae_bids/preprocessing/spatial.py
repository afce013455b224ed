"""Coordinate helpers: devices, voxel grids and trilinear pulls through world-space affines."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def voxel_world(shape, affine, device, dtype=torch.float32) -> torch.Tensor:
    """World coordinates (mm) of all voxel centres of a grid, shape ``(*shape, 3)``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    ijk = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    aff = torch.as_tensor(np.array(affine, dtype=np.float64), device=device, dtype=dtype)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def world_to_grid_coords(points: torch.Tensor, world_to_voxel: torch.Tensor, shape) -> torch.Tensor:
    """Map world points to ``grid_sample`` coordinates of volumes of ``shape``.

    Parameters
    ----------
    points : torch.Tensor
        ``(X, Y, Z, 3)`` points shared by the batch.
    world_to_voxel : torch.Tensor
        ``(B, 4, 4)``: per item, the point mapping composed with the volume's inverse affine.
    shape : tuple of int
        ``(D, H, W)`` of the sampled volumes.

    Notes
    -----
    Volumes are stored ``(i, j, k)`` = ``(D, H, W)``; ``grid_sample`` wants ``(k, j, i)``
    normalised to [-1, 1] (``align_corners=True``: -1 and 1 are the first and last voxel
    centres). Returns ``(B, X, Y, Z, 3)``.
    """
    b = world_to_voxel.shape[0]
    flat = points.reshape(1, -1, 3)
    vox = flat @ world_to_voxel[:, :3, :3].transpose(1, 2) + world_to_voxel[:, None, :3, 3]
    size = torch.as_tensor([max(s - 1, 1) for s in shape], device=points.device, dtype=points.dtype)
    norm = 2.0 * vox / size - 1.0
    return norm.flip(-1).reshape(b, *points.shape[:-1], 3)


def pull(volumes: torch.Tensor, points: torch.Tensor, world_to_voxel: torch.Tensor, mode="bilinear") -> torch.Tensor:
    """Sample ``volumes (B, C, D, H, W)`` at shared world ``points (X, Y, Z, 3)`` -> ``(B, C, X, Y, Z)``.

    ``world_to_voxel (B, 4, 4)`` maps a point to voxel indices of each volume; trilinear
    (``mode="bilinear"`` in 3D), zeros outside.
    """
    grid = world_to_grid_coords(points, world_to_voxel, volumes.shape[2:])
    return F.grid_sample(volumes, grid, mode=mode, padding_mode="zeros", align_corners=True)


def pooled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Voxel-to-world affine after ``avg_pool3d(kernel=stride=factor)``."""
    scale = np.diag([factor, factor, factor, 1.0]).astype(np.float64)
    scale[:3, 3] = (factor - 1) / 2.0
    return np.asarray(affine, dtype=np.float64) @ scale


def cropped_affine(affine: np.ndarray, start) -> np.ndarray:
    """Voxel-to-world affine of a crop starting at voxel ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift
