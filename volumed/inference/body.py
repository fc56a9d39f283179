"""The patient's body in a CT, from Hounsfield units: where a finding may be.

A grounding model that has never seen a scanner's table, its reconstruction circle or the air
around a patient may put a "nodule" there (ground bundle 0.3.0 put 47 and 107 mL of finding in
the air of the DICOM slab's corners, BENCHMARKS.md). No finding lies outside the patient, so
``volumed ground`` keeps a finding's probabilities only inside :func:`body_mask`.

How (CT only; an MR has no fixed intensity scale and is not masked):

1. tissue = voxels above ``threshold_hu`` (-500 HU: fat is about -100, lung -850, air -1000,
   padding outside the reconstruction circle -1024 or -3024);
2. its 26-connected components; kept: the largest (the trunk), and every other one that is at
   least ``keep_fraction`` of it and thick: it survives an erosion by a disk of ``core_mm`` radius
   across the long axis (both thighs, the arms beside the chest). Dropped: the table (a shell a
   few mm thick, however large), blankets, cables, noise;
3. holes filled in each slice across the patient's long axis (the axis of the affine closest to
   superior-inferior): the lungs, the airways and gas in the bowel are inside the patient but
   are air. Holes are filled per slice, not in 3-D, because the airways open into the edge of a
   chest CT's field of view, so in 3-D the lungs are not a hole. Where the body reaches the edge
   of a slice (a crop, a field of view narrower than the patient), a lung the edge cuts is no
   hole either: each edge of the slice that the body reaches counts as closed (not the convex
   hull, which also took in the air between the patient and the table);
4. dilated by ``margin_mm`` (skin lesions, partial volume at the surface).

The mask is computed on a grid subsampled to about ``work_mm`` and taken back to the image by
index (a coarse mask of a body some 100 voxels across): on a 512 x 512 x 200 CT it takes well
under a second.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from volumed.io.volume import Volume

__all__ = ["body_mask", "long_axis"]

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def long_axis(affine: np.ndarray) -> int:
    """The voxel axis (0, 1 or 2) closest to the patient's superior-inferior direction."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    directions = directions / np.maximum(np.linalg.norm(directions, axis=0), 1e-12)
    return int(np.argmax(np.abs(directions[2])))


def body_mask(volume: Volume, *, threshold_hu: float = -500.0, keep_fraction: float = 0.01,
              core_mm: float = 12.0, margin_mm: float = 5.0, work_mm: float = 3.0) -> np.ndarray | None:
    """Bool ``volume.shape`` mask of the patient's body (module docstring), or None when
    ``volume`` is not a CT or has no voxel above ``threshold_hu`` (nothing to mask by)."""
    if volume.modality != "CT":
        return None
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    step = np.maximum(1, np.floor(work_mm / np.maximum(spacing, 1e-6))).astype(int)
    coarse = volume.data[:: step[0], :: step[1], :: step[2]] > threshold_hu
    if not coarse.any():
        return None
    labels, count = ndimage.label(coarse, structure=_CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    axis = long_axis(volume.affine)
    coarse_mm = spacing * step
    disk = _ellipsoid(np.where(np.arange(3) == axis, 0.0, core_mm), coarse_mm)
    core = ndimage.binary_erosion(coarse, structure=disk)
    thick = np.zeros(count + 1, dtype=bool)
    thick[np.unique(labels[core])] = True
    keep = thick & (sizes >= keep_fraction * sizes.max())
    keep[int(sizes.argmax())] = True
    keep[0] = False
    body = keep[labels]
    for k in range(body.shape[axis]):
        index = [slice(None)] * 3
        index[axis] = k
        body[tuple(index)] = _fill_slice(body[tuple(index)])
    ball = _ellipsoid(np.full(3, margin_mm), coarse_mm)
    if ball.size > 1:
        body = ndimage.binary_dilation(body, structure=ball)
    # Back to the image grid by index: each image voxel takes its coarse voxel's value.
    index = np.ix_(*(np.minimum(np.arange(n) // s, b - 1) for n, s, b in zip(volume.shape, step, body.shape)))
    return body[index]


def _ellipsoid(radius_mm: np.ndarray, voxel_mm: np.ndarray) -> np.ndarray:
    """Bool structuring element: the voxels within ``radius_mm`` (per axis; 0 for a flat one) of
    the centre on a grid of ``voxel_mm``."""
    radius = np.maximum(0, np.round(np.asarray(radius_mm) / voxel_mm)).astype(int)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius)) <= 1.0


def _fill_slice(section: np.ndarray) -> np.ndarray:
    """One 2-D slice of the body, its holes filled (module docstring, step 3). Each edge of the
    slice that the body reaches counts as closed: a lung the edge cuts is then a hole and is
    filled, while air that leaves the slice through an edge the body does not reach (below the
    table) is not. Filling such a slice to the body's convex hull instead took in the air between
    the patient, the table and the hull: 22 L on the 4 mm grid of tcia_ccth_a01 (cropped to the
    body at its sides), where a synthetic-only model's scattered lung calls made 1.6 L of "lower
    lobe" of it (docs/synthesis.md, round 18)."""
    edges = (section[0], section[-1], section[:, 0], section[:, -1])
    if not any(e.any() for e in edges):
        return ndimage.binary_fill_holes(section)
    framed = np.zeros((section.shape[0] + 2, section.shape[1] + 2), dtype=bool)
    framed[1:-1, 1:-1] = section
    for edge, where in zip(edges, ((0, slice(1, -1)), (-1, slice(1, -1)), (slice(1, -1), 0), (slice(1, -1), -1))):
        if edge.any():
            framed[where] = True
    return ndimage.binary_fill_holes(framed)[1:-1, 1:-1]
