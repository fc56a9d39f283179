"""The pure helpers of bench/bench_scaling.py: the least-squares line, the run order, paired
ratios, and the launcher that keeps the driver's own peak RSS out of a child's ru_maxrss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import bench_scaling  # noqa: E402


def test_least_squares_recovers_an_exact_line():
    slope, intercept = bench_scaling.least_squares([100, 200, 400], [2.5 * x + 700 for x in (100, 200, 400)])
    assert slope == pytest.approx(2.5)
    assert intercept == pytest.approx(700)


def test_least_squares_fits_noisy_points_like_numpy():
    xs, ys = [100, 200, 400], [1000.0, 1300.0, 1750.0]
    slope, intercept = bench_scaling.least_squares(xs, ys)
    np = pytest.importorskip("numpy")
    ref_slope, ref_intercept = np.polyfit(xs, ys, 1)
    assert slope == pytest.approx(ref_slope)
    assert intercept == pytest.approx(ref_intercept)


@pytest.mark.parametrize("xs, ys", [([100], [1.0]), ([100, 100], [1.0, 2.0]), ([1, 2], [1.0])])
def test_least_squares_refuses_no_line(xs, ys):
    with pytest.raises(ValueError):
        bench_scaling.least_squares(xs, ys)


def test_run_order_alternates():
    cases = [(200, 1), (200, 24), (100, 1)]
    assert bench_scaling.run_order(cases, 0) == cases
    assert bench_scaling.run_order(cases, 1) == cases[::-1]
    assert bench_scaling.run_order(cases, 2) == cases


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    assert bench_scaling.paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 2.0]) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bench_scaling.paired_ratio([1.0], [1.0, 2.0])


def test_spawn_keeps_the_parents_peak_rss_out_of_the_child():
    # Linux carries the spawning process's high-water RSS into a child's ru_maxrss; the launcher
    # must not let this process's 400 MiB show up in a child that itself needs ~10 MiB.
    ballast = bytearray(400 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])
    wall, rss, cpu = bench_scaling.spawn([sys.executable, "-I", "-S", "-c", "pass"], {})
    del ballast
    assert rss < 200, rss
    assert wall > 0 and cpu >= 0


def test_spawn_reports_a_failing_command():
    with pytest.raises(RuntimeError, match="boom"):
        bench_scaling.spawn([sys.executable, "-c", "import sys; sys.exit('boom')"], {})
