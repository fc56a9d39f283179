"""Lung lobes filled to the lungs' air, on CT (``volumed segment``, post-processing).

Why: the five lobes tile the lungs, and the lungs are the air inside the chest, which a CT shows
at -1000 to -500 HU. A model that has seen few chests places the lobes' outline badly: on
tcia_ccth_a01 left out, leave-one-out models reached 0.0-0.69 Dice for the union of the lobes
where an HU threshold reaches 0.945 (BENCHMARKS.md, "Generalisation: unseen scans"). So the
outline is taken from the image, and the model says which lobe is where.

How (:func:`outline_lobes`, on the model grid, before inversion to the original grid):

1. **air** = voxels below ``air_hu`` (-300 HU) inside the patient's body
   (:func:`volumed.inference.body.body_mask` on the model-grid image). On the 4 mm model grid a
   voxel at the pleura is part lung, part chest wall, and the reference lungs
   (TotalSegmentator-made) hold such voxels: -300 HU outlined tcia_ccth_a01's lungs at 0.949
   Dice against 0.944 at -400 and 0.929 at -500, example_ct_sm's at 0.887 against 0.886 and
   0.883 (bundle 0.5.0; -250: 0.951 and 0.887; docs/synthesis.md round 18);
2. its 26-connected components; **the lungs** are those the model calls lung: at least
   ``min_share`` (a quarter) of the component's voxels have a lobe probability above the
   threshold, or the component holds at least half of all the voxels the model calls lung and
   they make ``min_voxels`` (the caller: 10 mL); and it is thick: at least ``min_core`` (a
   fifth) of its voxels have six air neighbours. Bowel gas, the air around the patient, an air
   pocket with a few stray lung voxels and the one-voxel rim of partial-volume air along the
   skin (a leave-one-out model called it "lower lobe" on the DICOM slab; its core share 0.12,
   the real lungs' 0.34-0.71 on the four CTs) are left out;
3. the vessels and nodules inside a lung are not air: holes are filled slice by slice across the
   patient's long axis, on each side of the body's midline (the patient's left: world x below
   it, RAS) so that the mediastinum between the lungs is never a hole;
4. **which lobe**: a lung (one side) whose base, front, back and sides are in the image (its
   largest piece touches no edge of the grid but the top) is split by the **lobe atlas**
   (:mod:`volumed.data.lobe_atlas`, counted on TotalSegmentator label maps): each of its voxels
   goes to the lobe the atlas finds most likely at its place in the lung (``model_weight`` > 0
   lets the model's probabilities move it; 0 by default, measured below). Otherwise (a chest
   crop that cuts the lung) each lobe keeps the voxels the model calls it inside the lungs (where
   the model's lobes overlap, they still do: the label map gives each voxel one), and lung that
   no lobe claims goes to the lobes of the nearest claimed voxel **on the same side** (a left
   lobe never fills the right lung); a side no lobe claims stays unclaimed;
5. the result is written back as probabilities: a lobe keeps its own value where it holds the
   voxel and is at least ``threshold + margin`` there (so it is in its mask), and at most the
   threshold elsewhere; on an atlas side a voxel's value is also at least the model's
   probability that it is lung (the largest of the side's lobes there) times the atlas's share
   of its lobe there, so a lobe the atlas draws where the model calls another lobe of the lung
   is as sure as the lung and the atlas are (a 7 mL upper lobe at the top of an abdominal slab
   is not turned away by the presence rule as "small and unsure"). The masks, the label map,
   the statistics and the confidence (mean probability in the mask) come from these values, so
   a lobe filled where the model saw no lung gets a confidence near the threshold.

A lobe the model calls outside the lungs' air (a lower lobe on the liver's dome) is dropped; so is
dense lung outside the filled outline (a consolidation reaching the chest wall: no scan here has
one to measure). ``statistics.json`` and ``labels.json`` record ``"postprocess": "lung_outline"``
for each lobe, so a reader knows the outline is the image's. It applies when all five lobes are
prompted on a CT with post-processing on (``--all`` does so); ``--no-postprocess`` gives the
model's raw lobes.

Measured (2026-12-06, docs/synthesis.md round 17): on tcia_ccth_a01 with a leave-it-out model,
union Dice 0.000 -> 0.854 and the lobes 0.000 -> 0.00-0.48; with bundle 0.5.0 (trained on it)
0.925 -> 0.943, every lobe within 0.005 of its own or better; example_ct_sm 0.834 -> 0.886.
With an atlas of the two TotalSegmentator label maps (round 18): bundle 0.5.0's lobe mean
0.624 -> 0.707 on tcia_ccth_a01 and 0.845 -> 0.883 on example_ct_sm; a model trained on label
maps alone gets tcia_ccth_a01's lobes at 0.52-0.70.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from volumed.data.lobe_atlas import LOBES, LOBES_LEFT, SIDES, lobe_prior
from volumed.inference.body import long_axis

__all__ = ["LOBES", "LUNG_OUTLINE", "OutlineResult", "outline_lobes"]

#: The rule name ``statistics.json`` records for the lobes.
LUNG_OUTLINE = "lung_outline"

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class OutlineResult:
    """``probabilities``: ``(5, x, y, z)`` float32, the lobes in the order given; ``lung_voxels``:
    model-grid voxels of the lungs (after filling); ``components``: air components kept as lung;
    ``atlas_sides``: the sides (``"left"``, ``"right"``) split into lobes by the atlas."""

    probabilities: torch.Tensor
    lung_voxels: int
    components: int
    atlas_sides: tuple[str, ...] = ()


def _whole_but_top(mask: np.ndarray, affine: np.ndarray) -> bool:
    """Whether ``mask`` touches no face of its grid except those facing the patient's head: its
    base, front, back and sides are in the image (the lobe atlas's coordinates need them)."""
    for axis, n in enumerate(mask.shape):
        direction = np.asarray(affine, dtype=np.float64)[:3, axis]
        direction = direction / max(float(np.linalg.norm(direction)), 1e-12)
        for end, sign in ((0, -1.0), (n - 1, 1.0)):
            if sign * direction[2] < 0.7 and mask.take(end, axis=axis).any():
                return False
    return True


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """``mask`` with the holes of each slice across ``axis`` filled. Only the mask's box (grown by
    one voxel) is worked on: a hole lies inside the box, and what the box leaves out is
    background connected to the slice's edge."""
    out = mask.copy()
    if not mask.any():
        return out
    index = np.argwhere(mask)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(index.min(axis=0), index.max(axis=0)))
    part = np.moveaxis(out[box], axis, 0)  # a view into ``out``
    for i in np.flatnonzero(part.reshape(part.shape[0], -1).any(axis=1)):
        part[i] = ndimage.binary_fill_holes(part[i])
    return out


def outline_lobes(
    probabilities: torch.Tensor | np.ndarray,
    names: Sequence[str],
    hu: np.ndarray,
    body: np.ndarray | None,
    affine: np.ndarray,
    threshold: float,
    *,
    air_hu: float = -300.0,
    min_share: float = 0.25,
    min_core: float = 0.2,
    min_voxels: int = 1,
    margin: float = 1e-3,
    atlas: Mapping[str, np.ndarray] | bool | None = True,
    model_weight: float = 0.0,
    side_margin_mm: float = 20.0,
) -> OutlineResult:
    """The lobes' probabilities filled to the lungs' air (module docstring).

    Args:
        probabilities: ``(5, x, y, z)`` the five lobes' probabilities on one grid, in the order of ``names``.
        names: the five lobe names (:data:`LOBES`, any order).
        hu: ``(x, y, z)`` Hounsfield units on the same grid.
        body: bool ``(x, y, z)`` the patient's body, or ``None`` (everything).
        affine: ``(4, 4)`` voxel to RAS world (mm) of the grid: the patient's sides (left of the
            body's midline: the left lobes) and the long axis (holes are filled across it).
        threshold: the masks' threshold.
        min_core: the least share of an air component's voxels whose six neighbours are all air
            (the grid's edge counts as air) for it to be a lung: a one-voxel rim of air along
            the skin is not.
        atlas: the lobe atlas (:mod:`volumed.data.lobe_atlas`) that splits a lung into lobes:
            True (the shipped one), a loaded atlas, or None/False (the model's lobes, gaps filled
            from the nearest claimed voxel). A side is split by the atlas when its lung makes
            ``min_voxels`` and touches no edge of the grid but the top.
        model_weight: on an atlas side, each voxel goes to the lobe with the largest
            ``log(atlas share) + model_weight * log(model probability)``; 0: the atlas alone.
        side_margin_mm: an air component whose every voxel lies at least this far on one side
            of the body's midline, and which the model calls only lobes of the other side, is
            no lung: bowel gas on the patient's left that a model called "lower right lobe" (the
            DICOM slab, a model trained on with arms and tables, docs/synthesis.md round 20).
            Only where the body is whole from side to side, no tissue of it on the grid's left
            or right face (its midline is then the patient's).

    Raises:
        ValueError: ``names`` are not the five lobes, or the shapes disagree.
    """
    names = list(names)
    if sorted(names) != sorted(LOBES):
        raise ValueError(f"outline_lobes needs the five lobes {LOBES}, got {names}")
    p = torch.as_tensor(probabilities, dtype=torch.float32)
    if p.shape[0] != 5 or tuple(p.shape[1:]) != tuple(hu.shape) or (body is not None and body.shape != hu.shape):
        raise ValueError(f"shapes disagree: probabilities {tuple(p.shape)}, hu {hu.shape}, body {None if body is None else body.shape}")
    pn = p.numpy()
    air = hu < air_hu
    if body is not None:
        air &= body
    hot = pn > threshold
    anyhot = hot.any(axis=0)
    labels, count = ndimage.label(air, structure=_CONNECTIVITY_26)
    kept: list[int] = []
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        called = np.bincount(labels[anyhot], minlength=count + 1)
        total = max(int(called[1:].sum()), 1)
        share = called / np.maximum(sizes, 1)
        # The model covers a good share of it, or it holds most of what the model calls lung
        # (a model that places the lobes badly covers little of a lung it still points at).
        # A lung is thick: most of it lies more than a voxel inside its own air. The rim of
        # partial-volume air along the skin (a voxel thick, inside the body mask) is not, even
        # where a model calls it lung (a leave-one-out model did on the DICOM slab, around the
        # trunk and the arms). The grid's edge counts as air: a lung the image cuts stays thick.
        core = ndimage.binary_erosion(air, structure=ndimage.generate_binary_structure(3, 1), border_value=1)
        inner = np.bincount(labels[core], minlength=count + 1)
        kept = [c for c in range(1, count + 1)
                if inner[c] >= min_core * sizes[c]
                and (share[c] >= min_share or (called[c] >= 0.5 * total and called[c] >= min_voxels))]
    side_of = np.array([0 if n in LOBES_LEFT else 1 for n in names])
    # The patient's left: world x (RAS: +x is the patient's right) below the body's midline.
    affine = np.asarray(affine, dtype=np.float64)
    world_x = np.tensordot(affine[0, :3], np.indices(hu.shape, dtype=np.float32), axes=1) + affine[0, 3]
    midline = float(world_x[body].mean()) if body is not None and body.any() else float(world_x.mean())
    left = world_x < midline
    # An air component wholly on one side of the midline (by side_margin_mm) that the model calls
    # only lobes of the other side is no lung: bowel gas on the patient's left called "lower right
    # lobe". Only where the body's midline is the patient's: the body is whole from side to side,
    # no tissue of it on the grid's left or right face (a crop that cuts the patient, such as the
    # thorax crop, has its own middle; the body mask, grown by a margin, may touch a face of a grid
    # cropped to the foreground).
    across = int(np.argmax(np.abs(affine[0, :3]) / np.maximum(np.linalg.norm(affine[:3, :3], axis=0), 1e-12)))
    tissue = (hu > -500.0) & body if body is not None else None
    if kept and tissue is not None and not (tissue.take(0, axis=across).any() or tissue.take(-1, axis=across).any()):
        far_left = np.bincount(labels[world_x <= midline - side_margin_mm], minlength=count + 1)
        far_right = np.bincount(labels[world_x >= midline + side_margin_mm], minlength=count + 1)
        calls = [np.bincount(labels[hot[side_of == s].any(axis=0)], minlength=count + 1) for s in (0, 1)]
        kept = [c for c in kept
                if not (far_left[c] == sizes[c] and calls[0][c] == 0)
                and not (far_right[c] == sizes[c] and calls[1][c] == 0)]
    lung = np.isin(labels, kept) if kept else np.zeros(hu.shape, dtype=bool)
    axis = long_axis(affine)
    filled = lung.copy()
    for side_mask in (left, ~left):
        filled |= _fill_slices(lung & side_mask, axis) & side_mask
    # A side whose lung is whole but for its top is split by the atlas: each voxel to one lobe.
    member = hot & filled[None]
    atlas_values: list[tuple[int, tuple, np.ndarray]] = []  # on an atlas side: (lobe, voxels, confidence)
    atlas_sides: list[str] = []
    if atlas is True:
        from volumed.data.lobe_atlas import load_atlas

        atlas = load_atlas()
    for side, side_mask in (("left", left), ("right", ~left)):
        lung_side = filled & side_mask
        if not atlas or lung_side.sum() < max(min_voxels, 1):
            continue
        # The lung proper is the side's largest piece: a small air pocket the model also calls
        # lung (bowel gas under the diaphragm) must not stretch the lung's box.
        pieces, count = ndimage.label(lung_side, structure=_CONNECTIVITY_26)
        proper = pieces == (1 + int(np.argmax(np.bincount(pieces.ravel(), minlength=count + 1)[1:])))
        if not _whole_but_top(proper, affine):
            continue
        index = np.argwhere(lung_side)
        ks = [names.index(n) for n in SIDES[side]]
        world = index @ affine[:3, :3].T + affine[:3, 3]
        frame = np.argwhere(proper) @ affine[:3, :3].T + affine[:3, 3]
        score = np.log(lobe_prior(world, side, atlas, frame) + 1e-6)
        if model_weight:
            score = score + model_weight * np.log(pn[ks][(slice(None), *index.T)] + 1e-6)
        choice = score.argmax(axis=0)
        # Its confidence: the model's that this is lung (its largest lobe value of the side here)
        # times the atlas's share of the chosen lobe here; the model's own value where higher.
        atlas_share = lobe_prior(world, side, atlas, frame)[choice, np.arange(len(choice))]
        lung_p = pn[ks][(slice(None), *index.T)].max(axis=0)
        member[:, lung_side] = False
        for j, k in enumerate(ks):
            chosen = choice == j
            member[(k, *index[chosen].T)] = True
            atlas_values.append((k, tuple(index[chosen].T), lung_p[chosen] * atlas_share[chosen]))
        atlas_sides.append(side)
    # Elsewhere each lobe keeps what the model calls it inside the lungs (overlaps as the model
    # gives them); lung no lobe claims goes to the lobes of the nearest claimed voxel of the same side.
    claimed = member.any(axis=0)
    for side, side_mask, members in (("left", left, side_of == 0), ("right", ~left, side_of == 1)):
        if side in atlas_sides:
            continue
        cover = member[members].any(axis=0)
        gap = filled & side_mask & ~claimed
        if gap.any() and cover.any():
            index = ndimage.distance_transform_edt(~cover, return_distances=False, return_indices=True)
            near = tuple(i[gap] for i in index)
            for k in np.flatnonzero(members):
                member[k][gap] = member[k][near]
    out = np.minimum(pn, np.float32(threshold))
    floor = np.float32(min(threshold + margin, 1.0))
    for k in range(5):
        out[k][member[k]] = np.maximum(pn[k][member[k]], floor)
    for k, voxels, values in atlas_values:
        out[k][voxels] = np.maximum(out[k][voxels], values)
    return OutlineResult(torch.from_numpy(out), int(filled.sum()), len(kept), tuple(atlas_sides))
