"""Shared by the benchmark scripts: alternating repetitions, rates from step timestamps, FLOP arithmetic.

Every comparison in bench/ is a ratio of medians measured in one run, the variants alternating
within each repetition so that other load on the machine hits them alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def run_alternating(variants: Mapping[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Call every variant once per repetition, ``repeats`` times; collect what each call returns.

    The order rotates by one variant per repetition (A B C, B C A, C A B, ...), so that no variant
    always runs first or right after the same other one. Returns ``{name: [value per repetition]}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(variants)
    out: dict[str, list[Any]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(variants[name]())
    return out


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """``median(numerator) / median(denominator)``."""
    return statistics.median(numerator) / statistics.median(denominator)


def rate_after_warmup(stamps: Sequence[float], warmup: int) -> float:
    """Steps per second from the end-of-step timestamps ``stamps`` of consecutive steps, the first
    ``warmup`` steps left out: ``(len(stamps) - warmup) / (stamps[-1] - stamps[warmup - 1])``.

    The interval starts at the end of the last warm-up step, so it covers everything that happens
    between steps (data fetching, hooks) for exactly the counted steps. Needs ``warmup >= 1``.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1: the end of the last warm-up step starts the clock")
    counted = len(stamps) - warmup
    if counted < 1:
        raise ValueError(f"{len(stamps)} timestamps leave no step after {warmup} warm-up steps")
    return counted / (stamps[-1] - stamps[warmup - 1])


def matmul_gflop(n: int) -> float:
    """GFLOP of one ``n x n`` by ``n x n`` matrix product: ``n**3`` multiply-adds, 2 FLOPs each."""
    return 2.0 * n**3 / 1e9
