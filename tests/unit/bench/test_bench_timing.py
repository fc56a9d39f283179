"""The arithmetic the benchmark scripts of bench/ rest on: alternating repetitions, rates after
warm-up, ratios of medians, and the FLOP convention and operator grouping of
bench/bench_compute_efficiency.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from _timing import matmul_gflop, median_ratio, rate_after_warmup, run_alternating  # noqa: E402
from bench_compute_efficiency import flops_by_group, op_group  # noqa: E402


def test_run_alternating_rotates_the_order_and_collects_per_variant():
    calls: list[str] = []

    def variant(name: str):
        def run() -> str:
            calls.append(name)
            return name + str(sum(c == name for c in calls))

        return run

    out = run_alternating({n: variant(n) for n in "abc"}, repeats=4)
    assert calls == list("abc" "bca" "cab" "abc")
    assert out == {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2", "b3", "b4"], "c": ["c1", "c2", "c3", "c4"]}
    with pytest.raises(ValueError):
        run_alternating({"a": variant("a")}, repeats=0)


def test_rate_after_warmup_counts_from_the_end_of_the_last_warmup_step():
    # Warm-up step ends at 10 (slow); then 4 steps of 0.5 s each.
    stamps = [10.0, 10.5, 11.0, 11.5, 12.0]
    assert rate_after_warmup(stamps, warmup=1) == pytest.approx(2.0)
    assert rate_after_warmup(stamps, warmup=3) == pytest.approx(2.0)
    assert rate_after_warmup([0.0, 3.0, 4.0], warmup=1) == pytest.approx(2 / 4.0)
    with pytest.raises(ValueError):
        rate_after_warmup(stamps, warmup=0)
    with pytest.raises(ValueError):
        rate_after_warmup(stamps, warmup=5)


def test_median_ratio_is_robust_to_one_disturbed_repetition():
    assert median_ratio([1.0, 1.1, 9.0], [2.0, 0.1, 2.2]) == pytest.approx(1.1 / 2.0)


def test_matmul_gflop_counts_two_flops_per_multiply_add():
    assert matmul_gflop(1000) == pytest.approx(2.0)
    assert matmul_gflop(4096) == pytest.approx(2 * 4096**3 / 1e9)


def test_flop_counts_are_flops_not_macs_and_grouped_by_operator():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.InstanceNorm3d(2), nn.Flatten(), nn.Linear(2 * 4**3, 5))
    with torch.device("meta"):
        net = net.to("meta")
    got = flops_by_group(net, (4, 4, 4))
    conv_macs = 2 * 27 * 4**3  # out channels x kernel x output voxels (no bias counted)
    assert got["convolution"] == 2 * conv_macs
    assert got["matmul / attention"] == 2 * 2 * 4**3 * 5
    assert got["normalisation"] == 0 and got["other"] == 0


@pytest.mark.parametrize(
    "name, group",
    [
        ("aten::mkldnn_convolution", "convolution"),
        ("aten.convolution", "convolution"),
        ("aten::slow_conv3d_forward", "convolution"),
        ("aten::addmm", "matmul / attention"),
        ("aten.mm.default", "matmul / attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "matmul / attention"),
        ("aten::native_batch_norm", "normalisation"),
        ("aten::native_layer_norm", "normalisation"),
        ("aten::leaky_relu", "other"),
        ("aten::mul", "other"),
        ("aten::_to_copy", "other"),
    ],
)
def test_op_group(name, group):
    assert op_group(name) == group
