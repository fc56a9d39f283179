"""Exact sliding-window blending of many prompts, computed only where a mask can be.

MONAI's ``sliding_window_inference`` blends every window's output into one buffer of the whole
image. For a term-query decoder that predicts ``N`` terms on a coarse grid (stride ``s``, e.g. 2)
and upsamples the logits to the window, that means ``N`` full-resolution upsamplings, sigmoids and
weighted sums per window: with 24 prompts this per-term work costs as much as the encoder itself.

:class:`WindowLogits` keeps instead each window's *coarse* logits (``1/s^3`` of the voxels) and its
position, and blends a term on demand, only inside a box that provably contains every voxel where
that term's blended probability can exceed the threshold:

* an upsampled logit (trilinear, ``align_corners=False``) at a fine voxel of coarse cell ``C`` mixes
  ``C``'s logit with its neighbours' with a weight of at most ``(s - 1) / 2s`` per axis, so window
  ``w``'s probability in ``C`` is at most a ``P_w(C)`` computed on the coarse grid
  (:func:`_cell_upper_bound`);
* with the window weights in ``C`` between ``m_w(C)`` and ``M_w(C)``, the blended probability
  ``sum(weight * p) / sum(weight)`` there is at most
  ``sum(M_w P_w) / (sum(M_w P_w) + sum(m_w (1 - P_w)))``, a bound computed on the coarse grid for all
  terms at once (windows start on whole coarse cells); a window's unreliable edge cannot raise it
  much where a central window disagrees, because its weight there is small;
* inside the box of the cells whose bound exceeds the threshold the blend is computed exactly as
  MONAI computes it: per window, upsampling of the coarse block that the box's fine voxels read
  (cropped so that none of the values kept comes from a clamped block edge), sigmoid, times the
  same gaussian importance map, summed and divided by the summed importance of all windows.

Masks and the label map are therefore those of full-resolution blending, and the per-term cost is
that of each structure's box (zero for a term absent from the image), not of the whole image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map
from scipy import ndimage

__all__ = ["Box", "WindowLogits", "importance_map"]

#: ``((x0, x1), (y0, y1), (z0, z1))``: a half-open voxel box.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def importance_map(roi: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """The gaussian window weights ``(X, Y, Z)`` that MONAI's ``sliding_window_inference`` uses
    (``mode="gaussian"``; values clamped below at their minimum or 1e-3, as MONAI does)."""
    weights = compute_importance_map(tuple(int(r) for r in roi), mode="gaussian", sigma_scale=sigma_scale, device="cpu")
    weights = torch.as_tensor(weights, dtype=torch.float32)
    return weights.clamp(min=max(float(weights.min()), 1e-3))


def _cell_upper_bound(x: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """``(C, X, Y, Z)`` coarse values -> per cell, an upper bound of the trilinear upsampling
    (``align_corners=False``, clamped at the edges) by ``stride`` at every fine voxel of the cell.

    Along an axis a fine voxel of cell ``c`` reads ``x[c] + t (x[c +- 1] - x[c])`` with
    ``|t| <= (s - 1) / 2s``, so it is at most ``x[c] + (s - 1) / 2s * max(0, neighbour max - x[c])``
    (at the edges the missing neighbour is ``x[c]`` itself, as the clamping makes it). Trilinear
    interpolation is that 1-D step along each axis in turn, increasing in its inputs, so applying
    the bound axis by axis bounds it. Much tighter than the 3 x 3 x 3 maximum: a background cell
    next to a structure keeps mostly its own (very negative) logit.
    """
    for d, s in zip((1, 2, 3), stride):
        n = x.shape[d]
        if s == 1 or n == 1:
            continue
        nb = x.clone()  # max(x[c - 1], x[c], x[c + 1]) along d
        torch.maximum(x.narrow(d, 0, n - 1), x.narrow(d, 1, n - 1), out=nb.narrow(d, 0, n - 1))
        torch.maximum(nb.narrow(d, 1, n - 1), x.narrow(d, 0, n - 1), out=nb.narrow(d, 1, n - 1))
        x = nb.sub_(x).mul_((s - 1) / (2 * s)).add_(x)  # x + (s - 1) / 2s * (max - x), max - x >= 0
    return x


def _volume(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def _merge_boxes(boxes: list[Box], slack: int, grow: Callable[[Box], Box] | None = None) -> list[Box]:
    """Merge two boxes whenever their union has at most ``slack`` voxels more than the two (sizes
    measured on ``grow(box)``, the box as computed): each box has a fixed cost (a few tensor
    operations per window), so many stray specks near a structure are cheaper as one box. A union
    of boxes still contains everything they contained."""
    size_of = (lambda box: _volume(grow(box))) if grow is not None else _volume  # noqa: E731
    changed = True
    while changed and len(boxes) > 1:
        changed = False
        merged: list[tuple[Box, int]] = []
        for box in boxes:
            size = size_of(box)
            for i, (other, other_size) in enumerate(merged):
                union = tuple((min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(other, box))
                union_size = size_of(union)  # type: ignore[arg-type]
                if union_size <= other_size + size + slack:
                    merged[i] = (union, union_size)  # type: ignore[assignment]
                    changed = True
                    break
            else:
                merged.append((box, size))
        boxes = [m for m, _ in merged]
    return list(boxes)


class WindowLogits:
    """The coarse logits of every window of a sliding-window pass; exact blended probabilities on demand.

    Args:
        logits: per window, ``(N, cx, cy, cz)`` coarse logits (``roi / stride`` per axis).
        origins: per window, its first voxel in the padded image.
        roi: window size ``(X, Y, Z)`` in voxels (a multiple of ``stride``).
        stride: the decoder's output stride per axis.
        padded_shape: the image as windowed (``>= roi``); ``model_shape`` sits at ``offset`` in it.
        model_shape, offset: the model grid inside the padded image.
        weights: the window weights ``(X, Y, Z)`` (:func:`importance_map`).

    ``probs[a:b]`` gives ``(b - a, x, y, z)`` probabilities on the whole model grid, exactly as
    MONAI's gaussian blending of the upsampled sigmoid outputs would (expensive: it is the full
    computation); :meth:`regions` and :meth:`blend` give them per term only where they matter.
    """

    def __init__(
        self,
        logits: Sequence[torch.Tensor],
        origins: Sequence[Sequence[int]],
        roi: Sequence[int],
        stride: Sequence[int],
        padded_shape: Sequence[int],
        model_shape: Sequence[int],
        offset: Sequence[int],
        weights: torch.Tensor,
    ):
        if len(logits) != len(origins) or not logits:
            raise ValueError(f"{len(logits)} windows of logits but {len(origins)} origins")
        self.logits = [torch.as_tensor(w, dtype=torch.float32) for w in logits]
        self.origins = [tuple(int(v) for v in o) for o in origins]
        self.roi = tuple(int(v) for v in roi)
        self.stride = tuple(int(v) for v in stride)
        self.padded_shape = tuple(int(v) for v in padded_shape)
        self.model_shape = tuple(int(v) for v in model_shape)
        self.offset = tuple(int(v) for v in offset)
        self.weights = weights.to(torch.float32)
        coarse = tuple(r // s for r, s in zip(self.roi, self.stride))
        for w in self.logits:
            if tuple(w.shape[1:]) != coarse:
                raise ValueError(f"window logits of shape {tuple(w.shape)}, expected (N, *{coarse})")
        for shape, what in ((self.roi, "roi"), (self.padded_shape, "padded shape"), *((o, "window origin") for o in self.origins)):
            if any(v % s for v, s in zip(shape, self.stride)):
                raise ValueError(f"{what} {shape} is not a multiple of the stride {self.stride}")
        self._count: torch.Tensor | None = None
        self._bound: torch.Tensor | None = None
        #: :meth:`regions` merges boxes when that adds at most this many voxels (~ the fixed cost of a box).
        self.merge_slack = 4096

    @property
    def num_terms(self) -> int:
        return int(self.logits[0].shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_terms, *self.model_shape)

    @property
    def count(self) -> torch.Tensor:
        """Summed window weights on the padded image (MONAI's normalisation map)."""
        if self._count is None:
            count = torch.zeros(self.padded_shape)
            for o in self.origins:
                count[tuple(slice(a, a + r) for a, r in zip(o, self.roi))] += self.weights
            self._count = count
        return self._count

    @property
    def bound(self) -> torch.Tensor:
        """``(N, X / s, Y / s, Z / s)``: per coarse cell of the padded image, an upper bound of each
        term's blended probability in the cell (module docstring)."""
        if self._bound is None:
            weights = self.weights[None, None]
            w_max = F.max_pool3d(weights, self.stride, self.stride)[0, 0]
            w_min = -F.max_pool3d(-weights, self.stride, self.stride)[0, 0]
            grid = [n // s for n, s in zip(self.padded_shape, self.stride)]
            # bound = H / (H + L), H = sum(M P), L = sum(m (1 - P)) = sum(m) - sum(m P).
            high = torch.zeros((self.num_terms, *grid))
            low_p = torch.zeros((self.num_terms, *grid))
            low = torch.zeros(grid)
            # One window at a time: stacking windows was 2.5x slower (large temporaries).
            for w, o in zip(self.logits, self.origins):
                peak = _cell_upper_bound(w, self.stride).sigmoid_()
                cells = tuple(slice(a // s, a // s + c) for a, s, c in zip(o, self.stride, peak.shape[1:]))
                high[(slice(None), *cells)].addcmul_(w_max.expand_as(peak), peak)
                low_p[(slice(None), *cells)].addcmul_(w_min.expand_as(peak), peak)
                low[cells] += w_min
            low_p.neg_().add_(low).add_(high)  # H + L
            self._bound = high.div_(low_p.clamp_(min=torch.finfo(torch.float32).tiny))
        return self._bound

    def regions(self, term: int, threshold: float, margin: int = 1) -> list[tuple[Box, Box]]:
        """Where ``term``'s blended probability can exceed ``threshold``: ``(core, box)`` pairs of
        model-grid boxes. Every coarse cell whose :attr:`bound` exceeds the threshold lies in some
        ``core``; outside the cores the probability is at most the threshold. ``box`` is its core
        grown by ``margin`` voxels (what a trilinear resampling reads), clipped to the grid. Empty
        when the bound exceeds the threshold nowhere.

        One core per connected group (26-neighbourhood) of hot cells, so a few stray voxels far
        from the structure do not stretch one box over most of the image; then boxes whose union
        costs at most :attr:`merge_slack` voxels more are merged (each box has a fixed cost). Cores
        may overlap; the values of :meth:`blend` are exact in any box. (Cutting groups into slabs
        to hug curved organs was measured: fewer voxels, more boxes, the same time.)"""
        hot = self.bound[term] > threshold
        where = hot.nonzero()
        if len(where) == 0:
            return []
        lo = where.min(dim=0).values.tolist()
        hi = (where.max(dim=0).values + 1).tolist()
        hot = hot[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].numpy()  # label only the hot cells' box
        groups, _ = ndimage.label(hot, structure=np.ones((3, 3, 3), dtype=bool))
        cores: list[Box] = []
        for cells in ndimage.find_objects(groups):
            core = []
            for d, sl in enumerate(cells):
                s, o, n = self.stride[d], self.offset[d], self.model_shape[d]
                core.append((max(0, (lo[d] + sl.start) * s - o), min(n, (lo[d] + sl.stop) * s - o)))
            if all(a < b for a, b in core):  # else the cells lie in the padding only
                cores.append(tuple(core))  # type: ignore[arg-type]
        grow = lambda core: tuple((max(0, a - margin), min(n, b + margin)) for (a, b), n in zip(core, self.model_shape))  # noqa: E731
        return [(core, grow(core)) for core in _merge_boxes(cores, self.merge_slack, grow)]

    def blend(self, term: int, box: Box) -> torch.Tensor:
        """``term``'s blended probabilities in the model-grid ``box``, exactly."""
        start = [a + o for (a, _), o in zip(box, self.offset)]
        stop = [b + o for (_, b), o in zip(box, self.offset)]
        total = torch.zeros([b - a for a, b in zip(start, stop)])
        for w, o in zip(self.logits, self.origins):
            lo = [max(a, oo) - oo for a, oo in zip(start, o)]  # window-local overlap with the box
            hi = [min(b, oo + r) - oo for b, oo, r in zip(stop, o, self.roi)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            # The coarse block that fine voxels lo..hi-1 read: fine i reads cells floor(u) and
            # floor(u) + 1, u = (i + 0.5) / s - 0.5 (align_corners=False). Inside the window the
            # block's own edges then never clamp a value that is kept.
            clo = [max(0, math.floor((a + 0.5) / s - 0.5)) for a, s in zip(lo, self.stride)]
            chi = [min(r // s, math.floor((b - 0.5) / s - 0.5) + 2) for b, s, r in zip(hi, self.stride, self.roi)]
            block = w[term, clo[0] : chi[0], clo[1] : chi[1], clo[2] : chi[2]]
            size = [(b - a) * s for a, b, s in zip(clo, chi, self.stride)]
            up = F.interpolate(block[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
            up = up[tuple(slice(a - c * s, b - c * s) for a, b, c, s in zip(lo, hi, clo, self.stride))]
            part = torch.sigmoid(up).mul_(self.weights[tuple(slice(a, b) for a, b in zip(lo, hi))])
            total[tuple(slice(a + oo - s0, b + oo - s0) for a, b, oo, s0 in zip(lo, hi, o, start))] += part
        return total.div_(self.count[tuple(slice(a, b) for a, b in zip(start, stop))])

    def __getitem__(self, terms: slice) -> torch.Tensor:
        whole: Box = tuple((0, n) for n in self.model_shape)  # type: ignore[assignment]
        ids = range(self.num_terms)[terms]
        if not ids:
            return torch.zeros((0, *self.model_shape))
        return torch.stack([self.blend(k, whole) for k in ids])
