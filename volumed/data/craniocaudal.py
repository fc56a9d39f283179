"""Where structures lie along the body's long axis, and which of them can never share a slice.

A segmenter that sees one patch at a time has no idea where in the body the patch is. Trained on
few scans, it calls a femur in an upper-abdominal slab, or a pulmonary artery next to the
kidneys: shapes that look right locally and are impossible globally. A femur and a liver are
never on the same axial slice of a human body; the atlas below says so with numbers.

**The atlas** (``craniocaudal_atlas.json``, written by ``bench/bench_craniocaudal_atlas.py``)
holds, for each subject with labels (the real CTs and the label maps of the default datalist),
the superior-inferior extent of each structure in world millimetres, and whether each end is cut
by the field of view. From it come the **exclusive pairs**: two structures A above B whose gap
(A's lowest point minus B's highest) was at least :data:`MIN_GAP_MM` in every subject that shows
both ends, in at least two subjects (or at least :data:`MIN_GAP_ONE_MM` when only one subject
shows them). A cut end is not a measurement (the structure goes on past the field of view), so
such subjects do not count.

**The check** (:func:`implausible_terms`): among the structures found in one image, two of an
exclusive pair cannot both be right when the lower one's top reaches more than
:data:`OVERLAP_MM` above the upper one's bottom (extents by :func:`s_extent` over the central 96 %
of the voxels): they share slices, or lie in the wrong order. The structures kept are the consistent set
with the largest total weight (volume times mean probability); the others are dropped.
**Ordered pairs** (:func:`ordered_pairs`) add the gross inversions that the gap rule cannot see
because the two structures may share slices in a body: the liver's centre lay at least
:data:`ORDER_MIN_MM` above the sacrum's in every subject showing both whole, so a "sacrum" found
wholly above the liver (by more than :data:`OVERLAP_MM`) conflicts with it just as a femur on the
liver's slices does (a leave-one-out model called the left ventricle's wall of the contrast
thorax crop "sacrum" and "hip", and they outweighed the heart it found beside them). A large
liver, spleen and stomach outweigh a "femur" and a "hip" in the same slices; a femur in a pelvis
scan conflicts with nothing. The check needs other structures to compare with: it acts on ``--all`` and on
multi-prompt runs, not on a lone prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: The atlas shipped with the package (``bench/bench_craniocaudal_atlas.py`` writes it).
ATLAS_PATH = Path(__file__).with_name("craniocaudal_atlas.json")
#: A pair is exclusive if its gap was at least this (mm) in every subject showing it (two or more).
MIN_GAP_MM = 60.0
#: ... or at least this when a single subject shows the pair.
MIN_GAP_ONE_MM = 100.0
#: Two found structures of an exclusive pair conflict when the lower one's top reaches more than
#: this (mm) above the upper one's bottom.
OVERLAP_MM = 10.0
#: A pair is *ordered* (one always above the other, though they may share slices) when its
#: centres were at least this far apart (mm), the same way round, in every subject that shows
#: both whole (two or more).
ORDER_MIN_MM = 50.0
#: A found structure's extent leaves out this fraction of its voxels at each end (a few stray
#: voxels or a small far-away piece of a many-piece structure such as the colon do not count).
TRIM = 0.02


@dataclass(frozen=True)
class Extent:
    """A structure's extent along the superior (S, RAS+ z) world axis, mm, and whether its
    lower / upper end touches the edge of the field of view (cut: the true end lies beyond)."""

    low: float
    high: float
    cut_low: bool = False
    cut_high: bool = False

    def to_list(self) -> list:
        return [round(self.low, 1), round(self.high, 1), self.cut_low, self.cut_high]

    @classmethod
    def from_list(cls, v: Sequence) -> "Extent":
        return cls(float(v[0]), float(v[1]), bool(v[2]), bool(v[3]))


def s_extent(mask: np.ndarray, affine: np.ndarray, start: Sequence[int] = (0, 0, 0),
             shape: Sequence[int] | None = None, trim: float = 0.0) -> Extent | None:
    """The S extent of a bool ``mask`` (a box of a grid of ``shape`` starting at voxel ``start``,
    or the full grid) on a grid whose voxel-to-RAS ``affine`` is given; ``None`` if empty.

    Voxels are counted slice by slice along the voxel axis closest to S; the extent runs over the
    slices that hold the central ``1 - 2 * trim`` of them (``trim`` 0: every voxel; a found mask
    uses :data:`TRIM`, so a few stray voxels do not count), widened by half a slice on each side.
    On an oblique grid a slice's S is taken at the box's centre. An end is *cut* if the mask
    touches the grid's first or last slice at that end (untrimmed)."""
    mask = np.asarray(mask, dtype=bool)
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(n) for n in (shape if shape is not None else mask.shape))
    row = affine[2, :3]
    axis = int(np.argmax(np.abs(row)))
    counts = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis))
    total = int(counts.sum())
    if total == 0:
        return None
    cum = np.cumsum(counts)
    first = int(np.searchsorted(cum, trim * total, side="right"))
    last = max(first, min(int(np.searchsorted(cum, (1.0 - trim) * total, side="left")), len(counts) - 1))
    centre = [int(start[a]) + (mask.shape[a] - 1) / 2.0 for a in range(3)]

    def s_at(i: int) -> float:
        idx = list(centre)
        idx[axis] = int(start[axis]) + i
        return float(affine[2, 3] + row @ np.asarray(idx))

    low, high = sorted((s_at(first), s_at(last)))
    half = 0.5 * abs(float(row[axis]))
    hit = np.flatnonzero(counts)
    at_first, at_last = int(start[axis]) + hit[0] == 0, int(start[axis]) + hit[-1] == shape[axis] - 1
    # Index 0 is the low S end when S grows with the index.
    cut_low, cut_high = (at_first, at_last) if row[axis] > 0 else (at_last, at_first)
    return Extent(low - half, high + half, bool(cut_low), bool(cut_high))


def gap(upper: Extent, lower: Extent) -> float:
    """How far (mm) ``upper``'s lowest point lies above ``lower``'s highest (negative: overlap)."""
    return upper.low - lower.high


# ------------------------------------------------------------------------------------ atlas


def exclusive_pairs(subjects: Mapping[str, Mapping[str, Extent]]) -> dict[tuple[str, str], dict]:
    """``{(upper, lower): {"min_gap_mm", "subjects"}}`` of the pairs that never share a slice
    (module docstring) in ``subjects`` ``{subject: {term: Extent}}``."""
    gaps: dict[tuple[str, str], list[float]] = {}
    order_seen: dict[frozenset, set] = {}
    for extents in subjects.values():
        terms = sorted(extents)
        for i, a in enumerate(terms):
            for b in terms[i + 1:]:
                ea, eb = extents[a], extents[b]
                upper, lower = (a, b) if ea.low + ea.high >= eb.low + eb.high else (b, a)
                eu, el = extents[upper], extents[lower]
                order_seen.setdefault(frozenset((a, b)), set()).add((upper, lower))
                if eu.cut_low or el.cut_high:  # the ends that make the gap are not both seen
                    continue
                gaps.setdefault((upper, lower), []).append(gap(eu, el))
    out = {}
    for (upper, lower), values in gaps.items():
        if len(order_seen[frozenset((upper, lower))]) > 1:  # seen in both orders: no rule
            continue
        need = MIN_GAP_MM if len(values) >= 2 else MIN_GAP_ONE_MM
        if min(values) >= need:
            out[(upper, lower)] = {"min_gap_mm": round(min(values), 1), "subjects": len(values)}
    return out


def ordered_pairs(subjects: Mapping[str, Mapping[str, Extent]]) -> dict[tuple[str, str], dict]:
    """``{(upper, lower): {"min_centre_gap_mm", "min_gap_mm", "subjects"}}`` of the pairs, not
    exclusive, whose centres lay at least :data:`ORDER_MIN_MM` apart the same way round in every
    subject of ``subjects`` that shows both whole (no end cut), two subjects or more: the liver
    above the sacrum, the heart above the kidneys, the upper right lobe above the lower ones.
    ``min_gap_mm``: the smallest gap between them (negative: they shared slices)."""
    exclusive = exclusive_pairs(subjects)
    seen: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for extents in subjects.values():
        whole = sorted(t for t, e in extents.items() if not (e.cut_low or e.cut_high))
        for i, a in enumerate(whole):
            for b in whole[i + 1:]:
                ea, eb = extents[a], extents[b]
                seen.setdefault((a, b), []).append(((ea.low + ea.high - eb.low - eb.high) / 2.0, gap(ea, eb), gap(eb, ea)))
    out = {}
    for (a, b), values in seen.items():
        if len(values) < 2:
            continue
        if all(c >= ORDER_MIN_MM for c, _, _ in values):
            upper, lower, gaps = a, b, [g for _, g, _ in values]
        elif all(-c >= ORDER_MIN_MM for c, _, _ in values):
            upper, lower, gaps = b, a, [g for _, _, g in values]
        else:
            continue
        if (upper, lower) in exclusive:
            continue
        out[(upper, lower)] = {"min_centre_gap_mm": round(min(abs(c) for c, _, _ in values), 1),
                               "min_gap_mm": round(min(gaps), 1), "subjects": len(values)}
    return out


def _subjects(path: str | None) -> dict[str, dict[str, Extent]]:
    doc = json.loads(Path(path or ATLAS_PATH).read_text(encoding="utf-8"))
    return {s: {t: Extent.from_list(v) for t, v in ext.items()} for s, ext in doc["subjects"].items()}


@lru_cache(maxsize=4)
def load_order(path: str | None = None) -> dict[tuple[str, str], dict]:
    """The ordered pairs of the shipped atlas (or of the atlas file at ``path``)."""
    return ordered_pairs(_subjects(path))


@lru_cache(maxsize=4)
def load_atlas(path: str | None = None) -> dict[tuple[str, str], dict]:
    """The exclusive pairs of the shipped atlas (or of the atlas file at ``path``)."""
    return exclusive_pairs(_subjects(path))


# ------------------------------------------------------------------------------------ check


@dataclass(frozen=True)
class Found:
    """A found structure for :func:`implausible_terms`: its S extent and its weight (volume in
    mL times mean probability)."""

    extent: Extent
    weight: float


def implausible_terms(found: Mapping[str, Found], pairs: Mapping[tuple[str, str], dict] | None = None,
                      order: Mapping[tuple[str, str], dict] | None = None) -> dict[str, dict]:
    """The found structures that cannot all be right, and why (module docstring).

    Two found structures conflict when they are an exclusive pair (``pairs``, default the
    shipped atlas's :func:`load_atlas`) and share slices, or an ordered pair (``order``, default
    :func:`load_order`) and the lower one lies wholly above the upper one, by more than
    :data:`OVERLAP_MM` (a "sacrum" above the liver, a "heart" below it).

    Returns ``{term: {"conflicts_with": [...], "atlas_min_gap_mm": {other: mm}, "violation_mm": {other: mm}}}``
    (``violation_mm``: how far the lower structure's top reaches above the upper one's bottom,
    where the atlas keeps it at least ``atlas_min_gap_mm`` below; negative ``atlas_min_gap_mm``:
    the atlas has them sharing slices, and the conflict is their order), plus
    ``"order_reversed_mm": {other: mm}`` (how far the lower one's bottom lies above the upper
    one's top) where the conflict is an ordered pair's, for each term dropped; the others stand.
    Terms the atlas does not know never conflict."""
    pairs = load_atlas() if pairs is None else pairs
    order = load_order() if order is None else order
    conflicts: dict[str, dict[str, tuple[float, float, float | None]]] = {t: {} for t in found}
    for (upper, lower), rule in pairs.items():
        if upper in found and lower in found:
            overlap = -gap(found[upper].extent, found[lower].extent)
            if overlap > OVERLAP_MM:
                conflicts[upper][lower] = conflicts[lower][upper] = (float(rule["min_gap_mm"]), overlap, None)
    for (upper, lower), rule in order.items():
        if upper in found and lower in found and lower not in conflicts[upper]:
            reversed_by = gap(found[lower].extent, found[upper].extent)
            if reversed_by > OVERLAP_MM:
                overlap = -gap(found[upper].extent, found[lower].extent)
                conflicts[upper][lower] = conflicts[lower][upper] = (float(rule["min_gap_mm"]), overlap, reversed_by)
    kept = _heaviest_consistent({t: found[t].weight for t in found}, {t: set(c) for t, c in conflicts.items()})
    dropped: dict[str, dict] = {}
    for t in sorted(set(found) - kept):
        others = sorted(o for o in conflicts[t] if o in kept)
        dropped[t] = {
            "conflicts_with": others,
            "atlas_min_gap_mm": {o: conflicts[t][o][0] for o in others},
            "violation_mm": {o: round(conflicts[t][o][1], 1) for o in others},
        }
        reversed_mm = {o: round(conflicts[t][o][2], 1) for o in others if conflicts[t][o][2] is not None}
        if reversed_mm:
            dropped[t]["order_reversed_mm"] = reversed_mm
    return dropped


#: Above this many structures in one group of conflicting structures, :func:`_heaviest_consistent`
#: is greedy (heaviest first) instead of exact.
EXACT_LIMIT = 40


def _heaviest_consistent(weight: Mapping[str, float], conflicts: Mapping[str, set]) -> set:
    """The set of structures with no conflict among them and the largest total weight (a maximum
    weight independent set of the conflict graph), exact by branch and bound for each connected
    group of up to :data:`EXACT_LIMIT` structures, greedy (heaviest first) above."""
    kept = {t for t in weight if not conflicts[t]}
    todo = set(weight) - kept
    while todo:  # one connected group of conflicting structures at a time
        group, stack = set(), [next(iter(sorted(todo)))]
        while stack:
            t = stack.pop()
            if t not in group:
                group.add(t)
                stack.extend(conflicts[t] - group)
        todo -= group
        if len(group) > EXACT_LIMIT:
            chosen: set = set()
            for t in sorted(group, key=lambda t: (-weight[t], t)):
                if not conflicts[t] & chosen:
                    chosen.add(t)
            kept |= chosen
            continue
        best: list = [-1.0, set()]

        def search(free: set, chosen: set, total: float) -> None:
            if total + sum(weight[t] for t in free) <= best[0]:
                return
            if not free:
                best[0], best[1] = total, set(chosen)
                return
            t = max(free, key=lambda t: (len(conflicts[t] & free), weight[t], t))
            search(free - {t} - conflicts[t], chosen | {t}, total + weight[t])  # keep t
            search(free - {t}, chosen, total)  # drop t

        search(set(group), set(), 0.0)
        kept |= best[1]
    return kept
