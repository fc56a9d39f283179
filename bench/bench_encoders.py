"""Encoder sizes, memory and FLOPs at 128³ (meta device), plus CPU forward time of the tiny presets.

Usage::

    python bench/bench_encoders.py               # print, and write the section of BENCHMARKS.md
    python bench/bench_encoders.py --no-write    # print only

The section "## Encoders: parameters, memory and FLOPs at 128³" of BENCHMARKS.md (repo root) is
replaced if present and appended otherwise; other sections are left as they are. Tiny presets are
timed against ``stunet_tiny`` measured in the same run, so the ratios compare across machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

from _report import machine_description, write_section  # bench/ is on sys.path when run as a script

import torch

from volumed.encoders import create_encoder, list_encoders
from volumed.encoders.summary import format_table, summarize_all, summarize_encoder, valid_input_shape

HEADING = "## Encoders: parameters, memory and FLOPs at 128³"
BASELINE = "stunet_tiny"



def time_forward(name: str, size: int, repeats: int = 5) -> tuple[tuple[int, int, int], float]:
    """Median wall time (s) of an fp32 CPU inference forward of preset ``name`` at ~``size``³."""
    torch.manual_seed(0)
    encoder = create_encoder(name).eval()
    shape = valid_input_shape(encoder, size)
    x = torch.randn(1, 1, *shape)
    times = []
    with torch.inference_mode():
        encoder(x)  # warm-up: first calls allocate workspaces
        for _ in range(repeats):
            start = time.perf_counter()
            encoder(x)
            times.append(time.perf_counter() - start)
    return shape, statistics.median(times)


def tiny_timings(size: int = 64) -> str:
    """Markdown table of the ``*_tiny`` presets' CPU forward time, with GFLOP/s and ratio to the baseline."""
    names = [n for n in list_encoders() if n.endswith("_tiny")]
    names.sort(key=lambda n: n != BASELINE)  # the baseline first
    rows, baseline_s = [], None
    for name in names:
        shape, seconds = time_forward(name, size)
        gflops = summarize_encoder(name, input_size=size).gflops
        baseline_s = baseline_s or seconds
        rows.append(
            f"| {name} | {'x'.join(map(str, shape))} | {seconds * 1e3:.1f} | {gflops / seconds:.1f} | "
            f"{seconds / baseline_s:.2f} |"
        )
    head = [
        f"| encoder | input_shape | forward ms (median of 5) | GFLOP/s | x {BASELINE} |",
        "| ------- | ----------- | -----------------------: | ------: | ----------: |",
    ]
    return "\n".join(head + rows)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-size", type=int, default=128, help="edge of the cubic input in voxels")
    parser.add_argument("--tiny-size", type=int, default=64, help="edge of the input for timing *_tiny presets")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    rows = summarize_all(args.input_size)
    print(format_table(rows))
    timings = tiny_timings(args.tiny_size)
    print()
    print(timings)

    if args.no_write:
        return
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_encoders.py", *(argv or sys.argv[1:])])
    section = "\n".join(
        [
            HEADING,
            "",
            f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.",
            "",
            "Measured on the meta device (no memory allocated), batch 1, fp32, 1 input channel.",
            "Encoders alone: the full STU-Net segmenters (decoder and 105-class heads) have",
            "14.60 / 58.26 / 440.30 / 1457.33 M parameters for S / B / L / H, as published.",
            "Activations: bytes of the tensors autograd keeps for the backward pass (training);",
            "GFLOPs: convolutions and matrix products, a multiply-add counts 2 (torch FlopCounterMode).",
            "",
            format_table(rows, markdown=True),
            "",
            f"CPU inference forward of the tiny presets at {args.tiny_size}³ (torch.inference_mode, "
            f"1 warm-up, median of 5); ratio against {BASELINE} in the same run:",
            "",
            timings,
            "",
        ]
    )
    write_section(args.output, HEADING, section)
    print(f"\nwrote section {HEADING!r} of {args.output}")


if __name__ == "__main__":
    main()
