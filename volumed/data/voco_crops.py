"""VoCo crop sampling: an ``n x n`` grid of base crops and random crops labelled by their overlap.

VoCo (Wu, Zhuang, Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for
3D Medical Image Analysis", CVPR 2024, arXiv:2402.17300; extended in "Large-Scale 3D Medical Image
Pre-training with Geometric Context Priors", arXiv:2410.09890) learns where a sub-volume sits in the
body. A *region* of shape ``(n * cx, n * cy, cz)`` voxels is tiled in the axial ``x-y`` plane by
``n * n`` non-overlapping *base crops* of the crop size ``(cx, cy, cz)``; each *random crop* of the
same size lies inside the region, and its position label is the fraction of its area that overlaps
each base crop. Because every crop spans the full ``z`` extent of the region, the volume overlap
fraction equals the ``x-y`` area fraction, and the labels of a crop sum to 1.

Base crop ``b = i * n + j`` covers ``x in [i * cx, (i + 1) * cx)`` and ``y in [j * cy, (j + 1) * cy)``
(row-major over ``(i, j)``, ``i`` along ``x``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch.utils.data import Dataset as TorchDataset

import numpy as np
import torch
from monai.transforms import Compose, RandFlip, Randomizable, RandRotate90, Transform
from monai.utils import convert_to_tensor, ensure_tuple_rep

from volumed.errors import ConfigError

__all__ = ["VoCoCropDataset", "VoCoCrops", "VoCoCropSampler", "base_crop_origins", "overlap_labels"]


class VoCoCrops(NamedTuple):
    """The crops of one region (a NamedTuple, so ``default_collate`` stacks a batch field by field).

    Attributes:
        base: ``(N, C, cx, cy, cz)`` base crops, ``N = n * n``, ordered as described in the module doc.
        random: ``(K, C, cx, cy, cz)`` random crops.
        labels: ``(K, N)`` float32 overlap fractions in ``[0, 1]``; each row sums to 1.
        origins: ``(K, 3)`` int64 voxel index of each random crop's first corner in the region.
    """

    base: torch.Tensor
    random: torch.Tensor
    labels: torch.Tensor
    origins: torch.Tensor


def base_crop_origins(grid: int, crop_size: Sequence[int]) -> np.ndarray:
    """Corner voxel ``(x0, y0, 0)`` of each of the ``grid * grid`` base crops, shape ``(N, 3)`` int64."""
    cx, cy, _ = _crop_size(crop_size)
    i, j = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.stack([i.ravel() * cx, j.ravel() * cy, np.zeros(grid * grid, dtype=np.int64)], axis=1).astype(np.int64)


def overlap_labels(origins: np.ndarray, grid: int, crop_size: Sequence[int]) -> np.ndarray:
    """Overlap fraction of each crop with each base crop.

    Args:
        origins: ``(K, 2)`` or ``(K, 3)`` corner voxel of each crop (``x0, y0[, z0]``); only ``x-y`` matters.
        grid: ``n``, the base crops form an ``n x n`` grid.
        crop_size: ``(cx, cy, cz)`` voxels, shared by base and random crops.

    Returns:
        ``(K, n * n)`` float32: overlapping ``x-y`` area divided by the crop area ``cx * cy``.
    """
    cx, cy, _ = _crop_size(crop_size)
    org = np.asarray(origins, dtype=np.float64).reshape(-1, np.shape(origins)[-1])[:, :2]
    base = base_crop_origins(grid, crop_size)[:, :2].astype(np.float64)
    # Interval intersection per axis, broadcast (K, 1) against (1, N).
    dx = np.minimum(org[:, None, 0] + cx, base[None, :, 0] + cx) - np.maximum(org[:, None, 0], base[None, :, 0])
    dy = np.minimum(org[:, None, 1] + cy, base[None, :, 1] + cy) - np.maximum(org[:, None, 1], base[None, :, 1])
    return (np.clip(dx, 0, None) * np.clip(dy, 0, None) / float(cx * cy)).astype(np.float32)


def _crop_size(crop_size: Sequence[int] | int) -> tuple[int, int, int]:
    size = tuple(int(s) for s in ensure_tuple_rep(crop_size, 3))
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"crop_size must be three positive voxel counts, got {crop_size!r}")
    return size  # type: ignore[return-value]


class VoCoCropSampler(Randomizable, Transform):
    """Cut the VoCo base crops and ``num_random_crops`` random crops out of one region.

    The input is the region itself, already resampled to :attr:`region_size` (the DataModule resizes
    the body's foreground box to it, as VoCo does), shape ``(C, n * cx, n * cy, cz)``.

    Args:
        crop_size: ``(cx, cy, cz)`` voxels of every crop (an int means a cube).
        grid: ``n``; ``n * n`` base crops.
        num_random_crops: ``K`` random crops per region.
        flip_prob: probability of flipping each crop along each axis (VoCo uses 0.2); the position
            label is unchanged: it describes where the crop was taken, not how it looks.
        rotate90_prob: probability of a random ``k * 90`` degree rotation in the ``x-y`` plane
            (needs ``cx == cy``).

    Returns (from ``__call__``): :class:`VoCoCrops` with plain tensors (no metadata).
    """

    def __init__(
        self,
        crop_size: Sequence[int] | int = 32,
        grid: int = 3,
        num_random_crops: int = 4,
        flip_prob: float = 0.0,
        rotate90_prob: float = 0.0,
    ) -> None:
        self.crop_size = _crop_size(crop_size)
        if int(grid) < 2:
            raise ConfigError(f"grid must be at least 2 (an n x n grid of base crops), got {grid}")
        if int(num_random_crops) < 1:
            raise ConfigError(f"num_random_crops must be at least 1, got {num_random_crops}")
        if rotate90_prob > 0 and self.crop_size[0] != self.crop_size[1]:
            raise ConfigError(f"rotate90_prob > 0 needs square crops in x-y, got crop_size {self.crop_size}")
        self.grid = int(grid)
        self.num_random_crops = int(num_random_crops)
        self._augment: Compose | None = None
        if flip_prob > 0 or rotate90_prob > 0:
            flips = [RandFlip(prob=flip_prob, spatial_axis=axis) for axis in range(3)]
            self._augment = Compose([*flips, RandRotate90(prob=rotate90_prob, max_k=3, spatial_axes=(0, 1))])
        self._origins = np.zeros((self.num_random_crops, 3), dtype=np.int64)

    @property
    def region_size(self) -> tuple[int, int, int]:
        """``(n * cx, n * cy, cz)``: the spatial shape the input region must have."""
        cx, cy, cz = self.crop_size
        return (self.grid * cx, self.grid * cy, cz)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "VoCoCropSampler":
        super().set_random_state(seed, state)
        if self._augment is not None:
            # The augmentations are seeded from this stream, so one seed fixes the whole sample.
            self._augment.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw the ``K`` random crop corners uniformly over all positions inside the region."""
        rx, ry, _ = self.region_size
        cx, cy, _ = self.crop_size
        self._origins = np.zeros((self.num_random_crops, 3), dtype=np.int64)
        self._origins[:, 0] = self.R.randint(0, rx - cx + 1, size=self.num_random_crops)
        self._origins[:, 1] = self.R.randint(0, ry - cy + 1, size=self.num_random_crops)

    def __call__(self, region: torch.Tensor | np.ndarray, randomize: bool = True) -> VoCoCrops:
        img = convert_to_tensor(region, track_meta=False, dtype=torch.float32)
        if img.ndim != 4 or tuple(img.shape[1:]) != self.region_size:
            raise ConfigError(
                f"VoCo region must have shape (C, {', '.join(map(str, self.region_size))}) for grid {self.grid} "
                f"and crop_size {self.crop_size}, got {tuple(img.shape)}"
            )
        if randomize:
            self.randomize()
        base = torch.stack([self._cut(img, o) for o in base_crop_origins(self.grid, self.crop_size)])
        random = torch.stack([self._cut(img, o) for o in self._origins])
        labels = torch.from_numpy(overlap_labels(self._origins, self.grid, self.crop_size))
        return VoCoCrops(base=base, random=random, labels=labels, origins=torch.from_numpy(self._origins.copy()))

    def _cut(self, img: torch.Tensor, origin: np.ndarray) -> torch.Tensor:
        x, y, z = (int(v) for v in origin)
        cx, cy, cz = self.crop_size
        crop = img[:, x : x + cx, y : y + cy, z : z + cz].contiguous()
        if self._augment is not None:
            crop = convert_to_tensor(self._augment(crop), track_meta=False).contiguous()
        return crop


class VoCoCropDataset(TorchDataset):
    """Fresh VoCo crops of cached regions: ``dataset[i] = sampler(regions[i][key])``.

    A plain torch ``Dataset`` rather than a MONAI ``Compose`` step, because MONAI pipelines turn
    the :class:`VoCoCrops` NamedTuple into a bare tuple. ``monai.data.DataLoader`` still seeds the
    sampler of each worker process (its ``worker_init_fn`` finds ``sampler.set_random_state``).

    Args:
        regions: indexable regions, each a ``(C, *sampler.region_size)`` tensor or a mapping holding
            one under ``key`` (e.g. a MONAI ``CacheDataset`` of preprocessed volumes).
        sampler: draws the crops; seed it with ``sampler.set_random_state(seed)``.
        key: the mapping key of the region tensor.
    """

    def __init__(self, regions: Sequence[Any], sampler: VoCoCropSampler, key: str = "image") -> None:
        self.regions = regions
        self.sampler = sampler
        self.key = key

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> VoCoCrops:
        region = self.regions[index]
        return self.sampler(region[self.key] if isinstance(region, Mapping) else region)
