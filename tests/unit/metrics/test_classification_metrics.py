"""Zero-shot classification metrics: AUROC and F1 / precision / recall at the F1-maximising threshold."""

from __future__ import annotations

import pytest
import torch

from volumed.errors import ConfigError
from volumed.metrics.classification import classification_metrics, score_binary


def test_auroc_and_best_f1_threshold_of_a_worked_example():
    # AUROC: of the 4 (positive, negative) pairs, 3 are ranked right (0.35 < 0.4 is the wrong one).
    s = score_binary("x", [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert s.auroc == pytest.approx(0.75)
    # Thresholds 0.35 / 0.4 / 0.8 give F1 0.8 / 0.5 / 0.667: the best is 0.35 (P 2/3, R 1).
    assert s.threshold == pytest.approx(0.35)
    assert s.f1 == pytest.approx(0.8) and s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(1.0)
    assert s.accuracy == pytest.approx(0.75)
    assert (s.positives, s.negatives) == (2, 2)


def test_perfect_reversed_and_one_class_findings():
    m = classification_metrics({"good": [0.9, 0.8, 0.2, 0.1], "bad": [0.1, 0.2, 0.8, 0.9], "none": [0.5] * 4},
                               {"good": [1, 1, 0, 0], "bad": [1, 1, 0, 0], "none": [0, 0, 0, 0]})
    by = m.by_finding()
    assert by["good"].auroc == 1.0 and by["good"].f1 == 1.0
    assert by["bad"].auroc == 0.0
    assert by["none"].auroc is None and by["none"].f1 is None
    assert m.undefined == ("none",)
    assert m.auroc == pytest.approx(0.5)  # macro over the two defined findings only
    table = m.to_table()
    assert "good" in table and "macro" in table and m.to_dict()["macro"]["auroc"] == pytest.approx(0.5)


def test_bool_labels_score_as_0_and_1():
    """Labels as Python or torch bools (a phantom's ``nodule`` flag) are what the error message
    promises to take: the same scores as 0/1."""
    probs = [0.1, 0.4, 0.35, 0.8]
    want = score_binary("x", probs, [0, 0, 1, 1])
    assert score_binary("x", probs, [False, False, True, True]) == want
    assert score_binary("x", probs, torch.tensor([False, False, True, True])) == want


def test_tensor_input_matches_dict_input():
    p = torch.tensor([[0.9, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0]])
    a = classification_metrics(p, y, ["a", "b"])
    b = classification_metrics({"a": p[:, 0], "b": p[:, 1]}, {"a": y[:, 0], "b": y[:, 1]})
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize("probs, labels, match", [
    ([0.1, 0.2], [0, 1, 1], "one length"),
    ([0.1, 1.2], [0, 1], r"\[0, 1\]"),
    ([0.1, 0.2], [0, 2], "0 or 1"),
    ([], [], "non-empty"),
])
def test_bad_inputs_are_refused(probs, labels, match):
    with pytest.raises(ConfigError, match=match):
        score_binary("x", probs, labels)


def test_tensors_need_finding_names():
    with pytest.raises(ConfigError, match="finding names"):
        classification_metrics(torch.rand(3, 2), torch.zeros(3, 2), ["only one"])
