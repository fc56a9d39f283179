"""CT-specific training augmentation of patches: contrast phase, field of view, slice thickness.

What a new hospital's CT differs in, beyond what rotation, scaling and intensity jitter cover:

* **Contrast phase** (:class:`ContrastPhase`, real scans). The blood pool (aorta, heart, great
  vessels, venae cavae, portal and hepatic veins) and the enhancing organs (kidneys, liver,
  spleen, pancreas) are moved *coherently* to a phase drawn per patch: non-contrast (blood about
  40 HU), portal venous (about 150 HU) or arterial (aorta 300-500 HU), each structure's mean to a
  value drawn from its tissue's range (:mod:`volumed.data.hu_priors`). The structure's own texture
  is kept: the shift is added, through a mask softened by a 1-voxel gaussian so that edges stay
  partial-volume-like. Only structures with a mask can move: a blood pool nobody labelled keeps
  its HU.
* **Field of view** (:class:`FieldOfView`, every patch). Clinical scans show the chest only, the
  abdomen only or the pelvis only. A region is drawn among those the case covers, its axial
  extent (from the case's masks, plus a random margin) kept, and the slices above and below
  filled as inference pads a scan thinner than the patch: by default the kept slab mirrored at
  its ends, image and targets alike (``fill="mirror"``, :func:`volumed.data.transforms.pad_spatial`),
  or air with empty targets (``fill="air"``, for packages that pad with air).
* **Box crop** (:class:`BoxCrop`, every patch). Exported crops (a heart crop, a CTA of the aorta)
  are a box of tissue 10-30 cm wide: inference pads such a scan with air in-plane (and mirrors it
  along the slices when it is thinner than the patch), so the network sees straight edges of
  tissue in air that no whole-field CT shows. A network that never saw them lost the liver and
  both lower lobes of a real CT cut to an 18 cm box (docs/synthesis.md, round 21). A random box
  around the patch centre is kept; the rest is filled as inference fills it.
* **Slice thickness** (:func:`slice_thickness`, every patch). Slices from 1 to 5 mm: TorchIO's
  ``RandomAnisotropy`` down-samples the slice axis by a random factor and resamples back, as
  thick slices lose through-plane detail. At a 4 mm model spacing only thicknesses above 4 mm
  change the patch.

Patches are dictionaries (MONAI style) of channel-first tensors: ``image`` ``(1, px, py, pz)`` in
``[0, 1]`` (the CT window), ``masks`` ``(K, ...)`` uint8, ``pools`` ``(P, ...)`` uint8 (the
phase-augmented structures), ``zindex`` ``(1, ...)`` int (1-based slice index of the case, 0 in
padding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from volumed.data.hu_priors import PHASES, TISSUES, tissue_of

__all__ = ["REGIONS", "BoxCrop", "ContrastPhase", "FieldOfView", "POOL_TISSUES", "region_of", "slice_thickness"]

#: Tissues moved by the contrast-phase augmentation.
POOL_TISSUES: tuple[str, ...] = tuple(sorted(t for t, v in TISSUES.items() if v.blood_pool))

#: Body regions for the field-of-view augmentation, by the tissues / names that mark them.
REGIONS: tuple[str, ...] = ("chest", "abdomen", "pelvis")


def region_of(name: str) -> str | None:
    """The body region a structure marks (``chest`` / ``abdomen`` / ``pelvis``), or ``None``."""
    text = name.strip().lower().replace(" ", "_")
    if text.startswith("lung") or text in ("heart", "trachea", "pulmonary_artery", "atrial_appendage_left") or "lobe" in text:
        return "chest"
    if text in ("urinary_bladder", "prostate", "hip_left", "hip_right", "sacrum", "femur_left", "femur_right") or "gluteus" in text:
        return "pelvis"
    if tissue_of(text) in ("liver", "spleen", "kidney", "pancreas", "bile") or text == "stomach":
        return "abdomen"
    return None


def _gaussian_soften(mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """``(P, x, y, z)`` binary masks blurred by a separable gaussian (sigma in voxels), float32."""
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    out = mask.float()[:, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape))
    return out[:, 0]


class ContrastPhase:
    """Move labelled blood pools and enhancing organs to a randomly drawn contrast phase.

    Args:
        pool_tissues: tissue of each ``pools`` channel (a :data:`POOL_TISSUES` entry).
        pool_means: each pool's mean HU over the whole case (measured once at loading).
        ct_window: the HU window of the image's ``[0, 1]`` scale.
        prob: probability that a patch is moved at all.
        phases: phases drawn from, uniformly.
        seed: the generator's seed.
    """

    def __init__(
        self,
        pool_tissues: Sequence[str],
        pool_means: Sequence[float],
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        prob: float = 0.5,
        phases: Sequence[str] = PHASES,
        seed: int = 0,
    ):
        if len(pool_tissues) != len(pool_means):
            raise ValueError(f"{len(pool_tissues)} pool tissues but {len(pool_means)} means")
        self.pool_tissues = list(pool_tissues)
        self.pool_means = [float(m) for m in pool_means]
        self.scale = float(ct_window[1]) - float(ct_window[0])
        self.prob = float(prob)
        self.phases = tuple(phases)
        self.rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int) -> "ContrastPhase":
        self.rng = np.random.default_rng(seed)
        return self

    def __call__(self, data: Mapping[str, torch.Tensor]) -> dict:
        out = dict(data)
        pools = data.get("pools")
        out["phase"] = "unchanged"
        if pools is None or len(pools) == 0 or self.rng.random() >= self.prob:
            return out
        phase = str(self.rng.choice(self.phases))
        present = [p for p in range(len(pools)) if bool(pools[p].any())]
        out["phase"] = phase
        if not present:
            return out
        deltas = []
        for p in present:
            lo, hi = TISSUES[self.pool_tissues[p]].mean_range(phase)
            deltas.append((self.rng.uniform(lo, hi) - self.pool_means[p]) / self.scale)
        soft = _gaussian_soften(torch.as_tensor(pools)[present], 1.0)  # (P', x, y, z)
        # Where two softened masks overlap (a vessel entering an organ), the larger weight wins.
        weight, which = soft.max(0)
        shift = torch.as_tensor(deltas, dtype=torch.float32)[which] * weight
        image = torch.as_tensor(data["image"]).float()
        out["image"] = (image + shift[None]).clamp_(0.0, 1.0)
        return out


class FieldOfView:
    """Keep one body region's slices of a patch; fill the rest (module docstring).

    Args:
        regions: ``{region: (first, last)}`` 1-based slice indices of the case that the region
            spans (from :func:`region_of` of its structures).
        margin_slices: ``(low, high)`` random margin added above and below, in slices.
        prob: probability that a patch is cut at all.
        seed: the generator's seed.
        fill: what replaces the other slices: ``"mirror"`` (the kept slab reflected at its ends,
            image and masks alike, as inference pads a scan thinner than the patch,
            :func:`volumed.data.transforms.pad_spatial`) or ``"air"`` (image 0, masks empty).
    """

    def __init__(self, regions: Mapping[str, tuple[int, int]], margin_slices: tuple[int, int] = (0, 10), prob: float = 0.25,
                 seed: int = 0, fill: str = "mirror"):  # fmt: skip
        if fill not in ("mirror", "air"):
            raise ValueError(f"FieldOfView fill must be 'mirror' or 'air', got {fill!r}")
        self.fill = fill
        self.regions = {k: (int(a), int(b)) for k, (a, b) in regions.items()}
        self.margin = (int(margin_slices[0]), int(margin_slices[1]))
        self.prob = float(prob)
        self.rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int) -> "FieldOfView":
        self.rng = np.random.default_rng(seed)
        return self

    def __call__(self, data: Mapping[str, torch.Tensor]) -> dict:
        out = dict(data)
        out["fov"] = "whole"
        if not self.regions or self.rng.random() >= self.prob:
            return out
        z = torch.as_tensor(data["zindex"])[0]  # (x, y, z), 0 in padding
        inside = z[z > 0]
        if inside.numel() == 0:
            return out
        lo, hi = int(inside.min()), int(inside.max())
        # A region that the patch shows at least in part: a wholly blank patch teaches little.
        near = sorted(r for r, (a, b) in self.regions.items() if a - self.margin[1] <= hi and b + self.margin[1] >= lo)
        if not near:
            return out
        region = str(self.rng.choice(near))
        first, last = self.regions[region]
        first -= int(self.rng.integers(self.margin[0], self.margin[1] + 1))
        last += int(self.rng.integers(self.margin[0], self.margin[1] + 1))
        keep = ((z >= first) & (z <= last))[None]
        out["fov"] = region
        if self.fill == "mirror":
            slices = keep[0].any(0).any(0).nonzero().flatten()
            if slices.numel() == 0:
                return out
            a, n = int(slices[0]), int(slices[-1]) - int(slices[0]) + 1
            r = (torch.arange(keep.shape[-1]) - a) % (2 * n)
            src = a + torch.where(r >= n, 2 * n - 1 - r, r)
            for key in ("image", "masks", "fg", "zindex", "pools"):
                if key in data:
                    out[key] = torch.as_tensor(data[key]).index_select(-1, src)
            return out
        out["image"] = torch.where(keep, torch.as_tensor(data["image"]), torch.zeros((), dtype=torch.as_tensor(data["image"]).dtype))
        for key in ("masks", "fg"):
            if key in data:
                m = torch.as_tensor(data[key])
                out[key] = m * keep.to(m.dtype)
        return out


class BoxCrop:
    """Keep a random box of a patch, as a scan exported as a crop shows it (module docstring).

    In-plane, the box is ``inplane_mm`` wide on each axis (drawn per axis), placed at random so
    that it holds the patch centre (the voxel the patch was drawn for); outside it the image is
    air (0) and every mask empty, as :func:`volumed.data.transforms.pad_spatial` pads in-plane.
    Along the slices, the box is ``slab_mm`` deep; when that is thinner than the patch, the slab
    is kept and the other slices are filled as inference pads a thin scan: mirrored
    (``fill="mirror"``, pad mode ``symmetric``/``symmetric_z``) or air (``fill="air"``).

    Args:
        spacing: the patch's voxel size, mm.
        prob: probability that a patch is cut at all.
        inplane_mm: ``(low, high)`` width of the box on each in-plane axis, mm.
        slab_mm: ``(low, high)`` depth of the box along the slices, mm.
        fill: ``"mirror"`` or ``"air"``, as :class:`FieldOfView`.
        seed: the generator's seed.
    """

    KEYS: tuple[str, ...] = ("image", "masks", "fg", "zindex", "pools")

    def __init__(self, spacing: Sequence[float], prob: float = 0.2, inplane_mm: tuple[float, float] = (100.0, 300.0),
                 slab_mm: tuple[float, float] = (100.0, 300.0), fill: str = "mirror", seed: int = 0):  # fmt: skip
        if fill not in ("mirror", "air"):
            raise ValueError(f"BoxCrop fill must be 'mirror' or 'air', got {fill!r}")
        for name, (lo, hi) in (("inplane_mm", inplane_mm), ("slab_mm", slab_mm)):
            if not 0.0 < float(lo) <= float(hi):
                raise ValueError(f"BoxCrop {name} must be (low, high) with 0 < low <= high, got {(lo, hi)!r}")
        self.spacing = tuple(float(s) for s in spacing)
        self.prob = float(prob)
        self.inplane_mm = (float(inplane_mm[0]), float(inplane_mm[1]))
        self.slab_mm = (float(slab_mm[0]), float(slab_mm[1]))
        self.fill = fill
        self.rng = np.random.default_rng(seed)

    def set_random_state(self, seed: int) -> "BoxCrop":
        self.rng = np.random.default_rng(seed)
        return self

    def _span(self, n: int, mm: tuple[float, float], spacing: float) -> tuple[int, int]:
        """``(start, width)`` of a box of a random width on an axis of ``n`` voxels, holding its centre."""
        width = int(round(self.rng.uniform(*mm) / spacing))
        width = min(max(width, 1), n)
        c = n // 2
        start = int(self.rng.integers(max(0, c - width + 1), min(c, n - width) + 1))
        return start, width

    def __call__(self, data: Mapping[str, torch.Tensor]) -> dict:
        out = dict(data)
        out["box"] = None
        if self.rng.random() >= self.prob:
            return out
        image = torch.as_tensor(data["image"])
        nx, ny, nz = image.shape[-3:]
        (x0, wx), (y0, wy) = self._span(nx, self.inplane_mm, self.spacing[0]), self._span(ny, self.inplane_mm, self.spacing[1])
        z0, wz = self._span(nz, self.slab_mm, self.spacing[2])
        keep = torch.zeros((nx, ny, nz), dtype=torch.bool)
        keep[x0 : x0 + wx, y0 : y0 + wy] = True
        out["box"] = ((x0, x0 + wx), (y0, y0 + wy), (z0, z0 + wz))
        src = None
        if wz < nz:
            if self.fill == "mirror":
                r = (torch.arange(nz) - z0) % (2 * wz)
                src = z0 + torch.where(r >= wz, 2 * wz - 1 - r, r)
            else:
                keep[:, :, :z0] = False
                keep[:, :, z0 + wz :] = False
        for key in self.KEYS:
            if key not in data:
                continue
            x = torch.as_tensor(data[key])
            if src is not None:
                x = x.index_select(-1, src)
            out[key] = x * keep.to(x.dtype) if key != "image" else torch.where(keep, x, torch.zeros((), dtype=x.dtype))
        return out


def slice_thickness(spacing_z: float, thickness_mm: tuple[float, float] = (1.0, 5.0), prob: float = 0.3):
    """TorchIO ``RandomAnisotropy`` along the slice axis for slices of ``thickness_mm`` at a model
    spacing of ``spacing_z`` mm, or ``None`` when no thickness in the range is coarser than it."""
    import torchio as tio

    hi = float(thickness_mm[1]) / float(spacing_z)
    if hi <= 1.0:
        return None
    lo = max(1.0, float(thickness_mm[0]) / float(spacing_z))
    return tio.RandomAnisotropy(axes=(2,), downsampling=(lo, hi), p=prob)
