"""Per-structure statistics of a binary mask on its image's original grid.

What ``statistics.json`` of ``volumed segment`` holds, per term:

* ``voxels`` and ``volume_ml``: voxel count times the voxel volume ``|det(affine[:3, :3])|`` mm^3,
  divided by 1000 (1 mL = 1000 mm^3). Computed on the ORIGINAL grid, never in model space, so
  the numbers match what a viewer measures on the input file.
* ``intensity``: mean, std (population, ddof=0), min and max of the image inside the mask, with
  its ``unit``: ``"HU"`` for CT, ``"intensity"`` for MR and unknown modalities (MR has no absolute
  scale). All ``None`` for an empty mask.
* ``bbox_voxels``: inclusive index bounds ``[[i0, j0, k0], [i1, j1, k1]]`` of the mask.
* ``bbox_mm``: the axis-aligned RAS world box ``[[r0, a0, s0], [r1, a1, s1]]`` (mm) enclosing the
  mask's voxels, edges included (voxel centres +- half a voxel, through the affine), so a single
  voxel has the size of one voxel. For an oblique affine it is the RAS box around the rotated
  voxel box.
* ``components``: the number of 26-connected components (``scipy.ndimage.label`` with a full 3x3x3
  structuring element): 1 for a clean organ, more for fragments.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from volumed.errors import ConfigError
from volumed.io.volume import Volume

__all__ = ["IntensityStatistics", "TermStatistics", "compute_statistics"]

# Full 3x3x3 neighbourhood: faces, edges and corners touch (26-connectivity).
_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class IntensityStatistics:
    """Image values inside a mask; ``unit`` is ``"HU"`` for CT, else ``"intensity"``."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    unit: str


@dataclass(frozen=True)
class TermStatistics:
    """Statistics of one structure's mask on the original image grid (see the module docstring).

    Attributes:
        name: canonical term name.
        voxels: number of mask voxels.
        volume_ml: mask volume in millilitres.
        intensity: image values inside the mask.
        bbox_voxels: ``((i0, j0, k0), (i1, j1, k1))`` inclusive, or ``None`` for an empty mask.
        bbox_mm: ``((r0, a0, s0), (r1, a1, s1))`` RAS mm, voxel edges included, or ``None``.
        components: number of 26-connected components (0 for an empty mask).
    """

    name: str
    voxels: int
    volume_ml: float
    intensity: IntensityStatistics
    bbox_voxels: tuple[tuple[int, int, int], tuple[int, int, int]] | None
    bbox_mm: tuple[tuple[float, float, float], tuple[float, float, float]] | None
    components: int

    def to_dict(self) -> dict:
        """JSON-ready dictionary (tuples become lists)."""
        return asdict(self)


def compute_statistics(mask: np.ndarray, image: Volume, name: str) -> TermStatistics:
    """Statistics of ``mask`` (bool or 0/1, shape ``(X, Y, Z)`` = ``image.shape``) over ``image``.

    Raises:
        ConfigError: the mask is not on the image's grid.
    """
    mask = np.asarray(mask)
    if tuple(mask.shape) != image.shape:
        raise ConfigError(f"statistics: mask shape {tuple(mask.shape)} is not the image grid {image.shape}", name)
    mask = mask.astype(bool, copy=False)
    unit = "HU" if image.modality == "CT" else "intensity"
    voxels = int(np.count_nonzero(mask))
    voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
    if voxels == 0:
        return TermStatistics(name, 0, 0.0, IntensityStatistics(None, None, None, None, unit), None, None, 0)

    values = np.asarray(image.data)[mask].astype(np.float64)
    intensity = IntensityStatistics(
        float(values.mean()), float(values.std()), float(values.min()), float(values.max()), unit
    )
    # find_objects on the mask itself gives the bounding box without materialising np.argwhere.
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    lo = tuple(int(s.start) for s in box)
    hi = tuple(int(s.stop) - 1 for s in box)
    corners = np.array(list(itertools.product(*[(a - 0.5, b + 0.5) for a, b in zip(lo, hi)])))  # (8, 3)
    world = image.voxel_to_world(corners)
    bbox_mm = (
        tuple(float(v) for v in world.min(axis=0)),
        tuple(float(v) for v in world.max(axis=0)),
    )
    _, components = ndimage.label(mask, structure=_CONNECTIVITY_26)
    return TermStatistics(
        name=name,
        voxels=voxels,
        volume_ml=voxels * voxel_ml,
        intensity=intensity,
        bbox_voxels=(lo, hi),  # type: ignore[arg-type]
        bbox_mm=bbox_mm,  # type: ignore[arg-type]
        components=int(components),
    )
