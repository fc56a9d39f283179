"""Grounding metrics on small arrays: Dice, hit, components, false positives on absent findings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from volumed.errors import ConfigError
from volumed.metrics.grounding import grounding_metrics, score_finding


def _box(shape=(8, 8, 8), *boxes) -> np.ndarray:
    m = np.zeros(shape, dtype=np.uint8)
    for (z0, z1, y0, y1, x0, x1) in boxes:
        m[z0:z1, y0:y1, x0:x1] = 1
    return m


def test_dice_and_hit_of_a_present_finding():
    ref = _box((8, 8, 8), (0, 2, 0, 2, 0, 2))            # 8 voxels
    pred = _box((8, 8, 8), (0, 2, 0, 2, 1, 3))           # 8 voxels, 4 shared
    s = score_finding(pred, ref, focal=True)
    assert s.present and s.focal is True and s.false_positive is None
    assert s.dice == pytest.approx(2 * 4 / 16)
    assert s.hit and (s.predicted_voxels, s.reference_voxels) == (8, 8)
    perfect = score_finding(torch.as_tensor(ref, dtype=torch.bool), ref)
    assert perfect.dice == pytest.approx(1.0) and perfect.hit


def test_a_miss_and_an_empty_prediction():
    ref = _box((8, 8, 8), (0, 2, 0, 2, 0, 2))
    far = score_finding(_box((8, 8, 8), (6, 8, 6, 8, 6, 8)), ref)
    assert far.dice == 0.0 and not far.hit
    empty = score_finding(np.zeros((8, 8, 8)), ref)
    assert empty.dice == 0.0 and not empty.hit and empty.predicted_voxels == 0
    # One shared voxel is a hit by default, not with min_overlap=2.
    touch = _box((8, 8, 8), (1, 3, 1, 3, 1, 3))
    assert score_finding(touch, ref).hit and not score_finding(touch, ref, min_overlap=2).hit


def test_probabilities_are_thresholded():
    ref = _box((4, 4, 4), (0, 1, 0, 1, 0, 1))
    prob = ref.astype(np.float32) * 0.7 + 0.2            # 0.9 on the voxel, 0.2 elsewhere
    assert score_finding(prob, ref).dice == pytest.approx(1.0)
    assert score_finding(prob, ref, threshold=0.95).dice == 0.0


def test_components_of_a_multi_lesion_finding():
    ref = _box((8, 8, 8), (0, 2, 0, 2, 0, 2), (5, 7, 5, 7, 5, 7), (0, 1, 6, 7, 0, 1))  # three nodules
    pred = _box((8, 8, 8), (0, 2, 0, 2, 0, 2))
    s = score_finding(pred, ref, focal=True)
    assert (s.components, s.components_hit) == (3, 1) and s.hit
    # Voxels that touch only at a corner are one lesion (26-connectivity).
    diagonal = np.zeros((4, 4, 4), dtype=bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True
    assert score_finding(diagonal, diagonal).components == 1


def test_false_positive_on_absent_and_negated_findings():
    pred = _box((4, 4, 4), (0, 1, 0, 1, 0, 1))
    fp = score_finding(pred, None)
    assert not fp.present and fp.false_positive and fp.dice is None and fp.hit is None
    assert score_finding(np.zeros((4, 4, 4)), None).false_positive is False
    assert score_finding(pred, None, min_voxels=2).false_positive is False
    # An all-zero reference is absent too: nothing to hit.
    assert score_finding(pred, np.zeros((4, 4, 4))).false_positive is True


def test_summary():
    ref = _box((8, 8, 8), (0, 2, 0, 2, 0, 2))
    scores = [
        score_finding(ref, ref, focal=True),                                    # dice 1, hit
        score_finding(_box((8, 8, 8), (6, 8, 6, 8, 6, 8)), ref, focal=True),    # dice 0, miss
        score_finding(_box((8, 8, 8), (0, 2, 0, 2, 1, 3)), ref, focal=False),   # dice 0.5, hit
        score_finding(ref, None),                                               # false positive
        score_finding(np.zeros((8, 8, 8)), None),                               # true negative
    ]
    m = grounding_metrics(scores)
    assert (m.n_present, m.n_absent, m.n_focal, m.n_non_focal) == (3, 2, 2, 1)
    assert m.mean_dice == pytest.approx(0.5) and m.mean_dice_focal == pytest.approx(0.5)
    assert m.mean_dice_non_focal == pytest.approx(0.5)
    assert m.hit_rate == pytest.approx(2 / 3) and m.hit_rate_focal == pytest.approx(0.5) and m.hit_rate_non_focal == 1.0
    assert m.component_hit_rate == pytest.approx(2 / 3)
    assert (m.false_positives, m.false_positive_rate) == (1, 0.5)
    empty = grounding_metrics([])
    assert math.isnan(empty.mean_dice) and math.isnan(empty.false_positive_rate)


def test_bad_masks_are_clear_errors():
    with pytest.raises(ConfigError, match="differs from reference shape"):
        score_finding(np.zeros((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(ConfigError, match="must be 3D"):
        score_finding(np.zeros((4, 4)), None)
    with pytest.raises(ConfigError, match="NaN"):
        score_finding(np.full((2, 2, 2), np.nan), None)
