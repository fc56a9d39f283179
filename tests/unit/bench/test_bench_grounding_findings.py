"""bench/bench_grounding_findings.py: the pooled rows over the held-out phantom sets."""

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "bench"))

bench = pytest.importorskip("bench_grounding_findings")


def _row(seed: int, cases: int, gate: str, hits: int, present: int, dice: float, fps: int, absent: int) -> dict:
    return {"set": f"seed {seed}, {cases} cases", "cases": cases, "gate": gate, "seconds": 1.0,
            "n_present": present, "n_absent": absent, "hit_rate": hits / present, "mean_dice": dice,
            "false_positives": fps, "false_positive_rate": fps / absent}


def test_pooled_rows_sum_hits_and_false_positives_and_weight_dice_by_lesions():
    """Two sets of 22 and 67 lesions: the pooled hit rate is hits over lesions (not the mean of the
    two rates), Dice is weighted by each set's lesions, one row per search region."""
    gate = bench.GATES[-1][0]
    rows = [_row(1, 10, gate, 20, 22, 0.75, 4, 30), _row(9, 30, gate, 65, 67, 0.80, 24, 90),
            _row(1, 10, bench.GATES[0][0], 21, 22, 0.70, 8, 30)]
    out = bench.pooled(rows)
    assert [r["gate"] for r in out] == [gate]  # a region scored on one set only gets no pooled row
    row = out[0]
    assert row["set"] == "**all 2 sets**, 40 cases" and row["n_present"] == 89 and row["n_absent"] == 120
    assert math.isclose(row["hit_rate"], 85 / 89) and row["false_positives"] == 28
    assert math.isclose(row["false_positive_rate"], 28 / 120)
    assert math.isclose(row["mean_dice"], (0.75 * 22 + 0.80 * 67) / 89)


def test_the_held_out_seeds_are_none_the_bundle_trained_on():
    """Held-out means held out: no set of HELD_OUT is drawn with a seed in the shipped bundle's
    training record (the bench refuses to run otherwise)."""
    held_out = {seed for seed, _ in bench.HELD_OUT}
    assert held_out == {1, 3, 5, 7, 9}
    assert not held_out & set(bench._training_seeds())
