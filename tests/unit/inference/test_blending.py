"""Exact blending of many terms at coarse cells (volumed.inference.blending): ``blend_cells`` and
``hot_regions`` against the box-by-box :meth:`WindowLogits.blend` (itself tested against MONAI's
full-resolution blending in test_segment.py), on synthetic windows with uneven strides, overlaps
and a model grid offset inside the padded image."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from volumed.inference.blending import WindowLogits, _per_cell, importance_map


def _windows(stride, terms=3, seed=0) -> WindowLogits:
    """Six overlapping windows of 16 x 12 x 8 on a 28 x 20 x 8 padded grid; the model grid is the
    26 x 18 x 7 block at (1, 1, 0) (uneven padding, cells that straddle its edge). Smooth blobs of
    logits, so some cells are hot and many are not."""
    g = torch.Generator().manual_seed(seed)
    roi, padded, model, offset = (16, 12, 8), (28, 20, 8), (26, 18, 7), (1, 1, 0)
    origins = [(x, y, 0) for x in (0, 8, 12) for y in (0, 8)]
    coarse = [r // s for r, s in zip(roi, stride)]
    logits = []
    for _ in origins:
        noise = torch.randn(terms, *[max(1, c // 2) for c in coarse], generator=g) * 12 - 4
        logits.append(F.interpolate(noise[None], size=coarse, mode="trilinear", align_corners=False)[0])
    return WindowLogits(logits, origins, roi, stride, padded, model, offset, importance_map(roi))


def _exact_per_cell(probs: WindowLogits, term: int) -> torch.Tensor:
    """``(cells of the padded grid, s^3)``: the box-by-box blend over the whole padded image."""
    padded = WindowLogits(probs.logits, probs.origins, probs.roi, probs.stride, probs.padded_shape,
                          probs.padded_shape, (0, 0, 0), probs.weights)  # fmt: skip
    return _per_cell(padded.blend(term, tuple((0, n) for n in probs.padded_shape)), probs.stride)


@pytest.mark.parametrize("stride", [(2, 2, 2), (2, 2, 1), (4, 2, 1)])
def test_blend_cells_equals_the_box_blend_at_every_fine_voxel(stride):
    probs = _windows(stride)
    grid = probs.bound_shape
    cells = torch.tensor([(t, *c) for t in range(2) for c in itertools.product(*map(range, grid))])
    values = probs.blend_cells([2, 0], cells)  # a subset of the terms, out of order
    assert values.shape == (len(cells), stride[0] * stride[1] * stride[2])
    for t, term in enumerate([2, 0]):
        rows = cells[:, 0] == t
        torch.testing.assert_close(values[rows], _exact_per_cell(probs, term), atol=2e-6, rtol=0)
    assert probs.blend_cells([0], torch.zeros((0, 4), dtype=torch.int64)).shape == (0, stride[0] * stride[1] * stride[2])


@pytest.mark.parametrize("margin_cells", [0, 1])
def test_hot_regions_are_exact_where_a_mask_or_its_resampling_can_read(margin_cells):
    probs = _windows((2, 2, 2), terms=4, seed=1)
    threshold = 0.5
    found = dict(probs.hot_regions(range(4), threshold, margin_cells=margin_cells))
    assert sorted(found) == [0, 1, 2, 3]
    whole = tuple((0, n) for n in probs.model_shape)
    marked = 0
    for term, regions in found.items():
        exact = probs.blend(term, whole)
        above = exact > threshold
        # Voxels within one voxel of one above the threshold: what trilinear resampling reads.
        near = F.max_pool3d(above[None, None].float(), 3, 1, 1)[0, 0] > 0
        covered = torch.zeros_like(above)
        assert [(c, b) for c, b, _ in regions] == probs.regions(term, threshold)
        for core, box, values in regions:
            sl = tuple(slice(a, b) for a, b in box)
            assert values.shape == exact[sl].shape
            differ = (values - exact[sl]).abs() > 2e-6
            # Anything not exact is a 0 where the blend is at most the threshold ...
            assert torch.all(values[differ] == 0) and torch.all(exact[sl][differ] <= threshold)
            # ... and, with a margin, never next to a voxel above it.
            if margin_cells:
                assert not (differ & near[sl]).any()
            covered[tuple(slice(a, b) for a, b in core)] = True
        assert not (above & ~covered).any()  # the cores hold every voxel above the threshold
        marked += int(above.sum())
    assert marked > 50, "the synthetic logits should put some voxels above the threshold"


def test_the_bound_skips_cells_wholly_in_the_padding_and_is_unchanged_elsewhere():
    probs = _windows((2, 2, 2))  # windows on a 28 x 20 x 8 padded grid
    everything = WindowLogits(probs.logits, probs.origins, probs.roi, probs.stride, probs.padded_shape,
                              probs.padded_shape, (0, 0, 0), probs.weights)  # fmt: skip
    # A 20 x 9 x 3 model grid at (5, 6, 3): coarse cells 2..12, 3..7 and 1..2 overlap it.
    narrow = WindowLogits(probs.logits, probs.origins, probs.roi, probs.stride, probs.padded_shape,
                          (20, 9, 3), (5, 6, 3), probs.weights)  # fmt: skip
    assert narrow._kept_cells() == [(2, 13), (3, 8), (1, 3)]
    bound, reference = narrow.bound_for(range(3)), everything.bound_for(range(3))
    kept = (slice(None), slice(2, 13), slice(3, 8), slice(1, 3))
    torch.testing.assert_close(bound[kept], reference[kept], atol=1e-7, rtol=0)
    assert float(bound[kept].max()) > 0.5  # some cells are hot there
    bound[kept] = 0
    assert not bound.any()  # 0 in the padding, never read


@pytest.mark.parametrize("stride", [(2, 2, 2), (4, 2, 1)])
def test_hot_voxels_are_exactly_the_voxels_above_the_threshold(stride):
    probs = _windows(stride, terms=4, seed=1)  # model grid 26 x 18 x 7 at (1, 1, 0) in the padded grid
    whole = tuple((0, n) for n in probs.model_shape)
    found = list(probs.hot_voxels([3, 1, 0, 2], 0.5))
    assert [term for term, _, _ in found] == [3, 1, 0, 2]
    marked = 0
    for term, voxels, values in found:
        exact = probs.blend(term, whole)
        expected = (exact > 0.5).nonzero()
        y, z = probs.model_shape[1:]
        order = torch.argsort((voxels[:, 0] * y + voxels[:, 1]) * z + voxels[:, 2])  # raster order, as nonzero()
        torch.testing.assert_close(voxels[order], expected)
        torch.testing.assert_close(values[order], exact[tuple(expected.T)], atol=2e-6, rtol=0)
        marked += len(values)
    assert marked > 50


def test_blending_runs_on_the_logits_device_and_returns_cpu_tensors():
    """On a GPU the windows' logits stay on the device and WindowLogits blends there (issue 22:
    blending and inversion ran on the CPU with --device cuda). CI has no GPU, so every tensor the
    class makes without naming its device is sent to the ``meta`` device here (``torch.device``
    as a context): any such tensor meets the CPU logits in an op and raises, as a CPU tensor would
    meet CUDA logits on a GPU. The results must equal those of the plain run, on the CPU."""
    stride = (2, 2, 1)
    plain = _windows(stride, terms=4, seed=2)
    whole = tuple((0, n) for n in plain.model_shape)
    expected_voxels = list(plain.hot_voxels([0, 1, 2, 3], 0.5))
    expected_regions = list(plain.hot_regions([2, 0], 0.5, margin_cells=1))
    cells = torch.tensor([[0, 1, 2, 3], [1, 4, 5, 6], [0, 13, 9, 7]])
    expected_cells = plain.blend_cells([1, 3], cells)
    probs = _windows(stride, terms=4, seed=2)
    with torch.device("meta"):
        assert probs.device == torch.device("cpu")
        found = list(probs.hot_voxels([0, 1, 2, 3], 0.5))
        regions = list(probs.hot_regions([2, 0], 0.5, margin_cells=1))
        blended = probs.blend_cells([1, 3], cells)
        bound = probs.bound_for([3])
        box = probs.blend(1, whole)
        cores = probs.regions(0, 0.5)
    assert sum(len(v) for _, v, _ in found) > 50
    for (t, v, p), (t0, v0, p0) in zip(found, expected_voxels, strict=True):
        assert t == t0 and v.device.type == p.device.type == "cpu"
        torch.testing.assert_close(v, v0)
        torch.testing.assert_close(p, p0)
    for (t, parts), (t0, parts0) in zip(regions, expected_regions, strict=True):
        assert t == t0 and [(c, b) for c, b, _ in parts] == [(c, b) for c, b, _ in parts0]
        for (_, _, values), (_, _, values0) in zip(parts, parts0):
            torch.testing.assert_close(values, values0)
    torch.testing.assert_close(blended, expected_cells)
    torch.testing.assert_close(bound, plain.bound_for([3]))
    torch.testing.assert_close(box, plain.blend(1, whole))
    assert cores == plain.regions(0, 0.5) and cores
