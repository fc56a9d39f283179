"""Connected-component post-processing of text-prompted masks, nnU-Net / TotalSegmentator style.

A segmentation network marks, besides the structure, scattered fragments elsewhere (a 'liver' of
47 pieces on a CT it has never seen, a false 'heart' on an abdominal slab). A structure that is
one connected body (liver, a kidney, the heart, a vertebra, a rib) keeps only its largest
26-connected component; a structure that may be in several pieces in an image (colon, small
bowel, the portal and splenic veins, the costal cartilages, any group term such as ``kidney`` or
``lung_left``, free text in general) keeps all of them.

Rules, per term (``None`` keeps every component):

* :data:`LARGEST_COMPONENT` (``"largest_component"``): every vocabulary term that is one
  TotalSegmentator class (not a group), except :data:`MULTI_PIECE_TERMS`; and the free-text terms
  of :data:`ONE_BODY_FREE_TEXT` ("pulmonary artery", which the default model was trained on).
* ``None``: groups (``kidney``, ``lung_left``, ``lungs``, ``ribs``, ``vertebrae_lumbar``, ...),
  :data:`MULTI_PIECE_TERMS`, other free text.

:func:`default_rule` gives that default; a package's ``config.json`` may override it per term
(``PromptSegConfig.postprocess``, e.g. ``{"aorta": null}``), and so may a caller
(``segment(..., postprocess={...})``, or ``postprocess=False`` / ``--no-postprocess`` for the raw
output) (:func:`postprocess_rules`).

Where: on the MODEL grid, per term, before inversion to the original grid
(:class:`ComponentFilter`, called by
:meth:`volumed.inference.segment.PromptSegPredictor.iter_original`). The term's voxels above the
threshold are labelled (``scipy.ndimage.label``, 26-connectivity) in one bool map of their
bounding box (the boxes of one term may overlap and one component may span several of them, so
never box by box); the largest component (by model-grid voxels; ties: the first in scan order)
keeps its values, the voxels above the threshold of the other components are dropped (voxel
lists) or set to 0 (boxes of values).

Why the kept component is still exact after inversion: trilinear resampling gives an original
voxel a convex combination of the 2 x 2 x 2 model voxels around its sample point (an index copy:
one model voxel). Any two voxels of such a cell touch (26-neighbours), so the voxels above the
threshold in one cell belong to ONE component. A cell holding voxels of the kept component holds
no zeroed voxel and keeps its exact values; a cell holding voxels of a removed component now holds
only values at most the threshold, so its original voxels fall out of the mask. The post-processed
mask is the raw mask less the original voxels interpolated from removed components, with the same
probabilities voxel for voxel. The statistics (volume, components, confidence) and the label map
are computed downstream, from the post-processed masks. ``components`` in ``statistics.json`` is
then 1 for these terms, unless resampling onto a finer grid cuts a thin bridge of the component
(its values are exact, but interpolation between a bridge voxel just above the threshold and
its neighbours below it can fall under the threshold).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from volumed.data.vocab import ResolvedTerm, Vocabulary, default_vocabulary, normalize_text
from volumed.errors import ConfigError
from volumed.inference.lungs import LUNG_OUTLINE

__all__ = [
    "LARGEST_COMPONENT",
    "MULTI_PIECE_TERMS",
    "ONE_BODY_FREE_TEXT",
    "RULES",
    "ComponentFilter",
    "Postprocessing",
    "check_rules",
    "default_rule",
    "largest_component",
    "postprocess_rules",
]

#: Keep only the largest 26-connected component (on the model grid).
LARGEST_COMPONENT = "largest_component"
#: The rule names a config may use; ``None`` (JSON ``null``) keeps every component.
RULES: tuple[str, ...] = (LARGEST_COMPONENT,)
#: What each rule does, as ``labels.json`` records it.
RULE_DESCRIPTIONS = {
    LARGEST_COMPONENT: "only the largest 26-connected component of the voxels above threshold is kept "
                       "(on the model grid, before inversion; its probabilities are unchanged)",
    LUNG_OUTLINE: "the five lung lobes filled to the lungs' air (below -400 HU inside the body, the "
                    "components the model calls lung, holes filled per slice and side); a lung whose base, "
                    "front, back and sides are in the image is split into its lobes by the lobe atlas "
                    "(volumed.data.lobe_atlas), otherwise each lobe keeps the model's voxels there and "
                    "unclaimed lung goes to the nearest lobe of its side; then the largest component of "
                    "each (volumed.inference.lungs)",
    "null": "every component is kept",
}  # fmt: skip

#: TotalSegmentator classes that are not one connected body in an image: tubes that leave and
#: re-enter a slice's field of view (bowel, veins), sets of separate parts (cartilages, discs,
#: the four pulmonary veins, cysts), and the thyroid (two lobes, its isthmus often thin).
MULTI_PIECE_TERMS: frozenset[str] = frozenset({
    "colon", "small_bowel", "duodenum", "portal_vein_and_splenic_vein", "costal_cartilages", "pulmonary_vein",
    "kidney_cyst_left", "kidney_cyst_right", "intervertebral_discs", "thyroid_gland",
})  # fmt: skip

#: Free-text terms (not in the vocabulary) that are one connected body (normalised text).
ONE_BODY_FREE_TEXT: frozenset[str] = frozenset({"pulmonary artery"})

# Full 3x3x3 neighbourhood: faces, edges and corners touch (26-connectivity, as in stats.py).
_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)

#: ``((x0, x1), (y0, y1), (z0, z1))``: a half-open model-grid box.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Postprocessing:
    """What post-processing did to one term.

    Attributes:
        rule: the rule applied (:data:`LARGEST_COMPONENT`), or ``None`` (every component kept).
        removed_components: components dropped on the model grid (``None`` when ``rule`` is ``None``).
        outside_body_ml: mL of the mask (voxels above the threshold) removed because they lay
            outside the patient's body (CT, :func:`volumed.inference.body.body_mask`); ``None``
            when no body mask was applied (MR, or post-processing off).
    """

    rule: str | None
    removed_components: int | None = None
    outside_body_ml: float | None = None

    def to_dict(self) -> dict:
        """The fields of ``statistics.json``: ``postprocess``, ``removed_components`` and
        ``removed_outside_body_ml``."""
        return {"postprocess": self.rule, "removed_components": self.removed_components,
                "removed_outside_body_ml": self.outside_body_ml}


def check_rules(rules: object, where: object = "postprocess") -> dict[str, str | None]:
    """``rules`` as a ``{term: rule}`` dict, each rule in :data:`RULES` or ``None``.

    Raises:
        ConfigError: not a mapping of names to known rules.
    """
    if not isinstance(rules, Mapping) or not all(isinstance(k, str) for k in rules):
        raise ConfigError(f"postprocess must map term names to a rule ({', '.join(RULES)}) or null, got {rules!r}", where)
    bad = {k: v for k, v in rules.items() if v is not None and v not in RULES}
    if bad:
        raise ConfigError(f"unknown post-processing rule(s) {bad}; known: {', '.join(RULES)} or null (keep all)", where)
    return dict(rules)


def default_rule(term: ResolvedTerm, vocabulary: Vocabulary | None = None) -> str | None:
    """The default rule of a resolved term (see the module docstring): :data:`LARGEST_COMPONENT`
    for a single-body TotalSegmentator class or a free text of :data:`ONE_BODY_FREE_TEXT`; ``None``
    for groups, :data:`MULTI_PIECE_TERMS` and other free text."""
    vocab = vocabulary or default_vocabulary()
    if term.is_free_text or term.name not in vocab:
        return LARGEST_COMPONENT if normalize_text(term.name) in ONE_BODY_FREE_TEXT else None
    if vocab.term(term.name).parts or term.name in MULTI_PIECE_TERMS:
        return None
    return LARGEST_COMPONENT


def postprocess_rules(
    terms: Sequence[ResolvedTerm],
    *overrides: Mapping[str, str | None],
    vocabulary: Vocabulary | None = None,
) -> list[str | None]:
    """The rule of each term: :func:`default_rule`, overridden by each of ``overrides`` in turn
    (the package's ``config.postprocess``, then the caller's). An override's key is a canonical
    term, a synonym ("left kidney") or free text; matching ignores case and punctuation."""
    vocab = vocabulary or default_vocabulary()
    rules = [default_rule(t, vocab) for t in terms]
    keys = [normalize_text(t.name) for t in terms]
    for table in overrides:
        for name, rule in check_rules(table).items():
            key = normalize_text(vocab.lookup(name) or name)
            for k, term_key in enumerate(keys):
                if term_key == key:
                    rules[k] = rule
    return rules


def largest_component(hot: np.ndarray) -> tuple[np.ndarray, int]:
    """``hot`` (3-D bool) -> (the voxels of its largest 26-connected component, bool of the same
    shape; the number of components). Ties go to the component first in scan order."""
    labels, count = ndimage.label(hot, structure=_CONNECTIVITY_26)
    if count <= 1:
        return hot, int(count)
    sizes = np.bincount(labels[hot], minlength=count + 1)  # the hot voxels only: ~10x faster
    sizes[0] = 0
    return labels == int(sizes.argmax()), int(count)


def _within(inner: Sequence[tuple[int, int]], outer: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(a - a0, b - a0) for (a, b), (a0, _) in zip(inner, outer))


def _overlap(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> Box | None:
    box = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return box if all(lo < hi for lo, hi in box) else None  # type: ignore[return-value]


def _extent(where: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """The half-open box of the True voxels of a 3-D bool array, ``None`` if there are none."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(where.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hit) == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


class ComponentFilter:
    """Applies each term's rule on the model grid, before inversion (see the module docstring).

    Args:
        rules: per term index, :data:`LARGEST_COMPONENT` or ``None``.
        threshold: the mask threshold (voxels strictly above it are the term's).

    ``removed[k]``: the components dropped for term ``k`` (set when its rule was applied);
    ``seconds``: the time spent filtering, all terms together.
    Memory: one bool map of the term's hot voxels' bounding box at a time (and its labels).
    """

    def __init__(self, rules: Sequence[str | None], threshold: float):
        self.rules = list(rules)
        self.threshold = float(threshold)
        self.removed: dict[int, int] = {}
        self.seconds = 0.0

    def applies(self, k: int) -> bool:
        return k < len(self.rules) and self.rules[k] == LARGEST_COMPONENT

    def postprocessing(self, k: int) -> Postprocessing:
        """What was done to term ``k`` (after its pieces were filtered)."""
        rule = self.rules[k] if k < len(self.rules) else None
        return Postprocessing(rule, self.removed.get(k, 0) if rule is not None else None)

    def voxels(self, k: int, voxels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel lists (``(n, 3)`` model-grid indices above the threshold, each once, and their
        ``(n,)`` values) -> those of the largest component."""
        if not self.applies(k):
            return voxels, values
        start = time.perf_counter()
        try:
            return self._voxels(k, np.asarray(voxels), values)
        finally:
            self.seconds += time.perf_counter() - start

    def _voxels(self, k: int, voxels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.removed[k] = 0
        if len(voxels) == 0:
            return voxels, values
        lo = voxels.min(axis=0)
        local = tuple((voxels - lo).T)
        hot = np.zeros(voxels.max(axis=0) - lo + 1, dtype=bool)  # the voxels' bounding box only
        hot[local] = True
        keep, count = largest_component(hot)
        self.removed[k] = max(0, count - 1)
        if count <= 1:
            return voxels, values
        kept = keep[local]
        return voxels[kept], values[kept]

    def boxes(self, k: int, pieces: Sequence[tuple[Box, Box, torch.Tensor]]) -> list[tuple[Box, Box, torch.Tensor]]:
        """Boxes of values ``(core, box, values)`` (``values`` of the model-grid ``box``; every
        voxel above the threshold lies in some ``core``; boxes may overlap) -> the same boxes, the
        voxels above the threshold of all but the largest component set to 0 in every box (a
        removed voxel in the rim of another box must not be resampled there either)."""
        if not self.applies(k):
            return list(pieces)
        start = time.perf_counter()
        try:
            return self._boxes(k, pieces)
        finally:
            self.seconds += time.perf_counter() - start

    def _boxes(self, k: int, pieces: Sequence[tuple[Box, Box, torch.Tensor]]) -> list[tuple[Box, Box, torch.Tensor]]:
        self.removed[k] = 0
        hot_boxes = []  # per piece, the box of its core's voxels above the threshold
        for core, box, values in pieces:
            where = _extent((values[_within(core, box)] > self.threshold).numpy())
            if where is not None:
                hot_boxes.append(tuple((c0 + a, c0 + b) for (a, b), (c0, _) in zip(where, core)))
        if not hot_boxes:
            return list(pieces)
        extent: Box = tuple((min(b[d][0] for b in hot_boxes), max(b[d][1] for b in hot_boxes)) for d in range(3))  # type: ignore[assignment]
        hot = np.zeros([b - a for a, b in extent], dtype=bool)  # one bool map for the whole term
        for core, box, values in pieces:
            part = _overlap(core, extent)
            if part is not None:
                hot[_within(part, extent)] |= (values[_within(part, box)] > self.threshold).numpy()
        keep, count = largest_component(hot)
        self.removed[k] = max(0, count - 1)
        if count <= 1:
            return list(pieces)
        out = []
        for core, box, values in pieces:
            drop = values > self.threshold
            part = _overlap(box, extent)
            if part is not None:
                drop[_within(part, box)] &= ~torch.from_numpy(np.ascontiguousarray(keep[_within(part, extent)]))
            out.append((core, box, values.masked_fill(drop, 0.0) if bool(drop.any()) else values))
        return out

    def tensor(self, k: int, values: torch.Tensor) -> torch.Tensor:
        """A whole model-grid probability map ``(x, y, z)`` -> the same, the voxels above the
        threshold of all but the largest component set to 0 (a copy; ``values`` is not changed)."""
        if not self.applies(k):
            return values
        whole: Box = tuple((0, int(n)) for n in values.shape)  # type: ignore[assignment]
        return self.boxes(k, [(whole, whole, values)])[0][2]
