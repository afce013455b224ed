"""Batched 12-dof affine registration of skull-stripped brains to the template brain (torch).

The transform is a point mapping from template world (RAS mm) to native world,
``x_native = L x_template + t`` (what resampling needs); ``native_to_template`` is its
inverse. Initialisation matches the brain masks' centres of mass and volumes (isotropic
scale); then Adam maximises the global normalised cross-correlation (NCC) between the
warped brain and the template brain over the (dilated) template brain mask, coarse to
fine (6, 4, 2 mm), sampling the warped brain at the mask's points only. The coarsest
level also runs from that start pitched by -25 and +25 degrees, and after its first
``START_KEEP_STEP`` steps each subject goes on from its best start alone (tilted heads). All subjects of a batch are optimised together
(independent parameters, one ``grid_sample`` per step), on GPU when there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .spatial import cropped_affine, pooled_affine, pull, voxel_world

# (template downsampling factor, Adam steps, learning rate) per level, coarse to fine.
DEFAULT_LEVELS = ((3, 100, 0.02), (2, 60, 0.01), (1, 30, 0.005))
TRANSLATION_UNIT_MM = 10.0  # translation parameters are in cm for conditioning
# Extra starts of the coarsest level, (axis, degrees) about the template brain's centre (axis 0: pitch, about the
# left-right axis). From the centres-of-mass start alone, a head pitched by 20 degrees or more could end in a wrong
# optimum that still passed the registration check (IXI012 tilted +20: NCC 0.29, mask Dice 0.86); the coarse level
# runs from each start and every subject goes on from its best one (benchmarks/results/registration_tilt.md).
DEFAULT_STARTS = ((0, -25.0), (0, 25.0))
START_MARGIN = 0.01  # NCC by which another start must beat the usual one at the coarse level to be taken
# Coarse-level step after which each subject keeps its best start only (the level's other steps run from that one):
# the starts' ranking is settled by then (benchmarks/results/registration_tilt.md), and the rest costs a third.
START_KEEP_STEP = 30


def rotation_about(axis: int, degrees: float, centre) -> np.ndarray:
    """4x4 rotation by ``degrees`` about world axis ``axis`` (0, 1, 2 = x, y, z) through the point ``centre``."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    to_c, from_c = np.eye(4), np.eye(4)
    to_c[:3, 3], from_c[:3, 3] = centre, -np.asarray(centre, dtype=np.float64)
    return to_c @ r @ from_c


@dataclass
class TemplateBrain:
    """Template T1w, its brain mask, and what registration derives from them (cached)."""

    t1w: np.ndarray  # float32, whole head
    mask: np.ndarray  # bool
    affine: np.ndarray  # 4x4 voxel -> world
    name: str = "MNI152NLin2009cAsym"
    resolution: int = 2

    @cached_property
    def brain(self) -> np.ndarray:
        """Skull-stripped template, scaled so the 99th percentile in the mask is 1."""
        b = self.t1w * self.mask
        return (b / np.percentile(b[self.mask], 99)).astype(np.float32)

    @cached_property
    def centre_of_mass(self) -> np.ndarray:
        return mask_centre_world(self.mask, self.affine)

    @property
    def volume_ml(self) -> float:
        return float(self.mask.sum() * abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)


def mask_centre_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World coordinates of a binary mask's centre of mass."""
    com = np.asarray(ndimage.center_of_mass(mask.astype(np.float32)))
    return np.asarray(affine)[:3, :3] @ com + np.asarray(affine)[:3, 3]


def initial_transform(mask: np.ndarray, affine: np.ndarray, template: TemplateBrain) -> np.ndarray:
    """Template-to-native point mapping that matches centres of mass and brain volumes."""
    vol = float(mask.sum() * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)
    scale = (max(vol, 1.0) / template.volume_ml) ** (1.0 / 3.0)
    m = np.eye(4)
    m[:3, :3] *= scale
    m[:3, 3] = mask_centre_world(mask, affine) - scale * template.centre_of_mass
    return m


def _normalised_brain(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    brain = np.where(mask, data, 0).astype(np.float32)
    scale = np.percentile(brain[mask], 99) if mask.any() else 1.0
    return brain / max(float(scale), 1e-6)


def _ncc(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Global NCC per batch item over sampled points: ``fixed (N,)``, ``moving (B, N)`` -> ``(B,)``."""
    df = fixed - fixed.mean()
    dm = moving - moving.mean(dim=1, keepdim=True)
    cov = (dm * df).sum(dim=1)
    return cov / torch.sqrt((df * df).sum() * (dm * dm).sum(dim=1) + 1e-8)


def _pad_stack(volumes: list[torch.Tensor]) -> torch.Tensor:
    """Stack 3D tensors of different shapes into ``(B, 1, D, H, W)``, zero-padded at the far end."""
    shape = np.max([tuple(v.shape) for v in volumes], axis=0)
    out = volumes[0].new_zeros((len(volumes), 1, *shape))
    for n, v in enumerate(volumes):
        out[n, 0, : v.shape[0], : v.shape[1], : v.shape[2]] = v
    return out


def register_batch(
    brains: list[np.ndarray],
    masks: list[np.ndarray],
    affines: list[np.ndarray],
    template: TemplateBrain,
    device: torch.device,
    levels=DEFAULT_LEVELS,
    init: list[np.ndarray] | None = None,
    starts=DEFAULT_STARTS,
    keep_step: int = START_KEEP_STEP,
) -> list[np.ndarray]:
    """Affine registration of several native brains to the template brain at once.

    Parameters
    ----------
    brains : list of numpy.ndarray
        Native T1w intensities (3D; anything outside ``masks`` is ignored).
    masks : list of numpy.ndarray
        Native brain masks (bool), same shapes.
    affines : list of numpy.ndarray
        Native voxel-to-world affines.
    template : TemplateBrain
        Fixed image.
    device : torch.device
        Where to optimise.
    levels : sequence of (factor, steps, lr)
        Pyramid schedule; ``factor`` downsamples the template grid.
    init : list of numpy.ndarray, optional
        Starting template-to-native mappings (default: :func:`initial_transform`).
    starts : sequence of (axis, degrees)
        Extra starts for the coarsest level: ``init`` rotated about the template brain's centre. Each subject
        goes on from the start with the highest NCC after :data:`START_KEEP_STEP` steps of that level (another
        start than ``init`` only when it is better by :data:`START_MARGIN`). Empty: ``init`` only.
    keep_step : int
        That step (at most the level's steps: then at its end).

    Returns
    -------
    list of numpy.ndarray
        Per subject, the 4x4 template-world -> native-world point mapping (float64).
    """
    b = len(brains)
    fixed_full = template.brain
    region = ndimage.binary_dilation(template.mask, iterations=2)
    # Crop the template to the region's bounding box (+1 voxel) before pooling it.
    idx = np.argwhere(region)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, region.shape)
    crop = tuple(slice(a, z) for a, z in zip(lo, hi))
    fixed_t = torch.from_numpy(fixed_full[crop].copy()).to(device)[None, None]
    region_t = torch.from_numpy(region[crop].astype(np.float32)).to(device)[None, None]
    tpl_aff = cropped_affine(template.affine, lo)
    tpl_spacing = float(np.sqrt((template.affine[:3, :3] ** 2).sum(0)).mean())

    if init is None:
        init = [initial_transform(m, a, template) for m, a in zip(masks, affines)]
    turns = [np.eye(4)] + [rotation_about(axis, deg, template.centre_of_mass) for axis, deg in starts]
    # the coarsest level runs every subject from every start: item k is subject k // len(turns), start k % len(turns)
    subject_of = [n for n in range(b) for _ in turns]
    init = np.stack([np.asarray(init[n], dtype=np.float64) @ turn for n in range(b) for turn in turns])
    init_t = torch.as_tensor(init, dtype=torch.float32, device=device)
    centre = torch.as_tensor(template.centre_of_mass, dtype=torch.float32, device=device)
    d_lin = torch.zeros((len(init), 3, 3), device=device, requires_grad=True)
    d_trans = torch.zeros((len(init), 3), device=device, requires_grad=True)

    def current() -> torch.Tensor:
        # Linear update about the template brain centre: x_n = L0 (x - c) + L0 c + t0 + dL (x - c) + dt
        lin = init_t[:, :3, :3] + d_lin
        trans = init_t[:, :3, 3] + init_t[:, :3, :3] @ centre - lin @ centre + TRANSLATION_UNIT_MM * d_trans
        m = torch.zeros((len(init_t), 4, 4), device=device)
        m[:, :3, :3] = lin
        m[:, :3, 3] = trans
        m[:, 3, 3] = 1.0
        return m

    native_spacing = [float(np.sqrt((np.asarray(a)[:3, :3] ** 2).sum(0)).mean()) for a in affines]
    brains_n = [_normalised_brain(d, m) for d, m in zip(brains, masks)]
    for level, (factor, steps, lr) in enumerate(levels):
        if factor > 1:
            fixed_l = F.avg_pool3d(fixed_t, factor, factor)
            region_l = F.avg_pool3d(region_t, factor, factor) > 0.5
        else:
            fixed_l, region_l = fixed_t, region_t > 0.5
        # Only the points inside the (dilated) template brain enter the similarity: sample those alone,
        # as a (N, 1, 1) grid for ``pull``.
        inside = region_l[0, 0]
        pts = voxel_world(fixed_l.shape[2:], pooled_affine(tpl_aff, factor), device)[inside][:, None, None]
        fixed_pts = fixed_l[0, 0][inside]
        # Smooth each moving image to about the level's spacing by average pooling.
        mov_list, inv_affs = [], []
        for brain, aff, sp in zip(brains_n, affines, native_spacing):
            k = max(1, int(round(factor * tpl_spacing / sp)))
            vol = torch.from_numpy(brain).to(device)[None, None]
            if k > 1:
                vol = F.avg_pool3d(vol, k, k, ceil_mode=True)
            mov_list.append(vol[0, 0])
            inv_affs.append(np.linalg.inv(pooled_affine(aff, k)))
        moving = _pad_stack([mov_list[n] for n in subject_of])
        inv_t = torch.as_tensor(np.stack([inv_affs[n] for n in subject_of]), dtype=torch.float32, device=device)
        opt = torch.optim.Adam([d_lin, d_trans], lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=0.05 * lr)
        choose_at = min(keep_step, steps) if level == 0 and len(turns) > 1 else -1
        for step in range(steps + 1):
            if step == choose_at:  # every subject goes on from its best start
                with torch.no_grad():
                    ncc = _ncc(fixed_pts, pull(moving, pts, inv_t @ current()).reshape(len(subject_of), -1))
                ncc = ncc.reshape(b, len(turns)).cpu()
                best = ncc.argmax(dim=1)
                best = torch.where(ncc.max(dim=1).values > ncc[:, 0] + START_MARGIN, best, torch.zeros_like(best))
                keep = (torch.arange(b) * len(turns) + best).to(device)
                init_t, moving, inv_t = init_t[keep], moving[keep], inv_t[keep]
                kept = [p.detach()[keep].clone().requires_grad_(True) for p in (d_lin, d_trans)]
                for old, new in zip((d_lin, d_trans), kept):  # the same optimiser (and schedule), its state cut
                    state = opt.state.pop(old, {})
                    opt.state[new] = {k: v[keep] if k.startswith("exp_avg") else v for k, v in state.items()}
                opt.param_groups[0]["params"] = kept
                d_lin, d_trans = kept
                subject_of = list(range(b))
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            warped = pull(moving, pts, inv_t @ current()).reshape(len(subject_of), -1)
            loss = (1.0 - _ncc(fixed_pts, warped)).sum()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        out = current().double().cpu().numpy()
    return [out[n] for n in range(b)]


def alignment_qc(
    brain: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    template_to_native: np.ndarray,
    template: TemplateBrain,
    device: torch.device,
) -> dict:
    """NCC (inside the template brain mask) and mask Dice of a registered brain vs the template."""
    pts = voxel_world(template.mask.shape, template.affine, device)
    w2v = torch.as_tensor(np.linalg.inv(affine) @ template_to_native, dtype=torch.float32, device=device)[None]
    vols = torch.from_numpy(np.stack([_normalised_brain(brain, mask), mask.astype(np.float32)])).to(device)
    with torch.no_grad():
        warped = pull(vols[:, None], pts, w2v.expand(2, 4, 4))[:, 0].cpu().numpy()
    tmask = template.mask
    a, b = warped[0][tmask], template.brain[tmask]
    ncc = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0
    wm = warped[1] > 0.5
    dice = float(2 * (wm & tmask).sum() / max(wm.sum() + tmask.sum(), 1))
    return {"ncc_to_template": ncc, "mask_dice_to_template": dice}
