"""How close the encoders' CPU forward comes to the machine's limit: GFLOP/s against a large matmul.

Usage::

    python bench/bench_compute_efficiency.py                # print, and write the section of BENCHMARKS.md
    python bench/bench_compute_efficiency.py --threads 2 1     # one block per torch thread count
    python bench/bench_compute_efficiency.py --no-write --repeats 2 --matmul 2048

The limit is what the machine does best in fp32: one large ``torch.mm`` (``n x n`` by ``n x n``,
``2 n^3`` FLOPs), measured in the same run with the same torch thread count. Against it: the fp32
``torch.inference_mode`` forward of the STU-Net B encoder (``stunet_b``) and of the CT-ViT
(``ctvit_base``), with FLOPs from :func:`volumed.encoders.summary.summarize_encoder` (PyTorch's
``FlopCounterMode``: a multiply-add counts 2 FLOPs, so these are FLOPs, not MACs; convolutions,
matrix products and attention are counted, normalisation and activations are not). The three
variants alternate within each repetition (order rotating), so that other load hits them alike;
figures are medians, per wall-clock second and per CPU second of this process.

Where the time goes: one further forward of each encoder under ``torch.profiler``; the self time
of every operator is grouped into convolution, matrix product / attention, normalisation and the
rest, and the FLOPs of each group (``FlopCounterMode`` per operator) over its time give that
group's own GFLOP/s, e.g. how fast the convolutions alone run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from _report import machine_description, write_section
from _timing import matmul_gflop, median_ratio, run_alternating

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Closeness to the limit: GFLOP/s against a large matmul"
AIM = 0.4  # issue 22: the convolutional encoder should reach this fraction of the matmul's GFLOP/s
GROUPS = ("convolution", "matmul / attention", "normalisation", "other")
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "einsum"}


def op_group(name: str) -> str:
    """The group of an operator name (profiler key like ``aten::mkldnn_convolution`` or flop-counter
    op like ``aten.convolution.default``): one of :data:`GROUPS`."""
    base = name.lower().replace("aten::", "").replace("aten.", "").split(".")[0]
    if re.search(r"(^|_)conv", base):
        return "convolution"
    if base in MATMUL_OPS or "attention" in base:
        return "matmul / attention"
    if "norm" in base:
        return "normalisation"
    return "other"


def flops_by_group(module: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    """FLOPs (a multiply-add counts 2) of one forward of ``module`` on a ``(1, 1, *shape)`` input,
    per :data:`GROUPS` entry, counted on the meta device (nothing allocated)."""
    counter = FlopCounterMode(display=False)
    x = torch.empty(1, 1, *shape, device="meta")
    with counter, torch.no_grad():
        module(x)
    out = dict.fromkeys(GROUPS, 0.0)
    for op, flops in counter.get_flop_counts()["Global"].items():
        out[op_group(str(op))] += float(flops)
    return out


def profile_groups(encoder: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], dict[str, list[tuple[str, float]]]]:
    """Self time (s) of one inference forward, summed per :data:`GROUPS` entry, and each group's
    operators with their self time, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        encoder(x)
    out = dict.fromkeys(GROUPS, 0.0)
    ops: dict[str, list[tuple[str, float]]] = {g: [] for g in GROUPS}
    for ev in prof.key_averages():
        g, t = op_group(ev.key), ev.self_cpu_time_total / 1e6
        out[g] += t
        ops[g].append((ev.key.replace("aten::", ""), t))
    for g in GROUPS:
        ops[g].sort(key=lambda kv: -kv[1])
    return out, ops


def timed(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> None:
    from volumed.encoders import create_encoder
    from volumed.encoders.summary import summarize_encoder, valid_input_shape

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="repetitions; each runs the three variants once")
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="torch thread counts, one block each")
    ap.add_argument("--matmul", type=int, default=4096, help="n of the n x n float32 torch.mm")
    ap.add_argument("--stunet-size", type=int, default=96, help="edge of the STU-Net B input (nearest valid)")
    ap.add_argument("--ctvit-size", type=int, default=128, help="edge of the CT-ViT input (nearest valid)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    encoders = {"stunet_b": args.stunet_size, "ctvit_base": args.ctvit_size}
    nets, inputs, gflop, groups_gflop = {}, {}, {}, {}
    for name, size in encoders.items():
        nets[name] = create_encoder(name).eval()
        shape = valid_input_shape(nets[name], size)
        inputs[name] = torch.randn(1, 1, *shape)
        summary = summarize_encoder(name, input_size=size)
        assert summary.input_shape == shape, (summary.input_shape, shape)
        gflop[name] = summary.gflops
        with torch.device("meta"):
            meta = create_encoder(name).eval()
        groups_gflop[name] = {k: v / 1e9 for k, v in flops_by_group(meta, shape).items()}
    a, b = torch.randn(args.matmul, args.matmul), torch.randn(args.matmul, args.matmul)

    def block(threads: int) -> tuple[list[str], float]:
        torch.set_num_threads(threads)

        def forward(name: str):
            def run() -> tuple[float, float]:
                with torch.inference_mode():
                    return timed(lambda: nets[name](inputs[name]))

            return run

        variants = {"matmul": lambda: timed(lambda: torch.mm(a, b)), **{n: forward(n) for n in encoders}}
        for fn in variants.values():  # warm-up: oneDNN primitives, allocator
            fn()
        t_start = time.perf_counter()
        measured = run_alternating(variants, args.repeats)
        timed_s = time.perf_counter() - t_start
        work = {"matmul": matmul_gflop(args.matmul), **gflop}
        # GFLOP/s per repetition, by wall-clock and by CPU time.
        wall = {k: [work[k] / t[0] for t in v] for k, v in measured.items()}
        cpu = {k: [work[k] / t[1] for t in v] for k, v in measured.items()}
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        frac = {k: median_ratio(wall[k], wall["matmul"]) for k in encoders}
        frac_cpu = {k: median_ratio(cpu[k], cpu["matmul"]) for k in encoders}
        sec = {k: statistics.median(t[0] for t in v) for k, v in measured.items()}

        profiled = {name: profile_groups(nets[name], inputs[name]) for name in encoders}
        profiles = {name: p[0] for name, p in profiled.items()}
        top_ops = {name: p[1] for name, p in profiled.items()}

        def fmt(v: list[float]) -> str:
            return ", ".join(f"{x:.1f}" for x in v)

        shape_s = {k: "x".join(map(str, inputs[k].shape[2:])) for k in encoders}
        rows = [
            f"| `torch.mm` {args.matmul} x {args.matmul} (the limit) | {work['matmul']:.1f} | {sec['matmul']:.2f} | "
            f"{fmt(wall['matmul'])} | {med['matmul']:.1f} | {med_cpu['matmul']:.1f} | 1.00 | 1.00 |"
        ]
        for k in encoders:
            rows.append(
                f"| `{k}` forward at {shape_s[k]} | {work[k]:.1f} | {sec[k]:.2f} | {fmt(wall[k])} | {med[k]:.1f} | "
                f"{med_cpu[k]:.1f} | {frac[k]:.2f} | {frac_cpu[k]:.2f} |"
            )
        prof_rows = []
        for k in encoders:
            total = sum(profiles[k].values())
            for g in GROUPS:
                s, f = profiles[k][g], groups_gflop[k][g]
                if s < 1e-3 and f == 0:
                    continue
                rate = f / s if f and s else 0.0
                prof_rows.append(
                    f"| `{k}` | {g} | {s:.2f} | {100 * s / total:.0f} % | {f:.3g} | "
                    + (f"{rate:.3g} | {rate / med['matmul']:.2g} |" if f else "not counted | - |")
                    + " " + ", ".join(f"{op} {t:.2f}" for op, t in top_ops[k][g][:3] if t >= 0.005) + " |"
                )
        conv = "stunet_b"
        conv_s, conv_f = profiles[conv]["convolution"], groups_gflop[conv]["convolution"]
        conv_frac = conv_f / conv_s / med["matmul"]
        conv_share = conv_s / sum(profiles[conv].values())
        met = frac[conv] >= AIM
        verdict = (
            f"`{conv}` reaches {frac[conv]:.2f} of the matmul's GFLOP/s by wall time ({frac_cpu[conv]:.2f} by CPU time): "
            f"the >= {AIM} aim for the convolutional encoder is **{'met' if met else 'not met'}**. "
            f"Its convolutions alone run at {conv_frac:.2f} of the matmul in the profiled forward and take "
            f"{100 * conv_share:.0f} % of its time; normalisation and the rest (instance norm, LeakyReLU, residual adds: "
            f"memory-bound passes over the activations that do no counted FLOPs) take the other "
            f"{100 * (1 - conv_share):.0f} %."
        )
        slow = dict(top_ops[conv]["convolution"]).get("slow_conv3d_forward", 0.0)
        if slow > 0:
            verdict += (
                f" Of the convolution time, {slow:.2f} s ({100 * slow / conv_s:.0f} %) is `slow_conv3d_forward`, PyTorch's "
                "non-oneDNN fallback, which it picks for STU-Net's one-channel stem convolution and for the deepest, "
                "smallest stages (512 channels at 6³ and 3³ for a 96³ input)."
            )
        vit = "ctvit_base"
        vit_mm_s = profiles[vit]["matmul / attention"]
        vit_note = (
            f"`{vit}` reaches {frac[vit]:.2f} ({frac_cpu[vit]:.2f} by CPU time); its matrix products and attention take "
            f"{100 * vit_mm_s / sum(profiles[vit].values()):.0f} % of its time at "
            f"{(groups_gflop[vit]['matmul / attention'] / vit_mm_s / med['matmul']) if vit_mm_s else 0:.2f} of the matmul"
        )
        vit_conv_s, vit_conv_f = profiles[vit]["convolution"], groups_gflop[vit]["convolution"]
        if vit_conv_s > 0:
            vit_note += (
                f"; its convolutions (the depthwise 3x3x3 position-encoding convolution of every layer, "
                f"{1e3 * vit_conv_f:.0f} MFLOP in all) take {100 * vit_conv_s / sum(profiles[vit].values()):.0f} % of the time at "
                f"{vit_conv_f / vit_conv_s:.2g} GFLOP/s"
            )
        vit_other = top_ops[vit]["other"][:3]
        vit_note += (
            f"; uncounted operators take {100 * profiles[vit]['other'] / sum(profiles[vit].values()):.0f} %, led by "
            + ", ".join(f"`{op}` {t:.2f} s" for op, t in vit_other) + "."
        )
        lines = [
            f"### {threads} torch thread{'s' if threads > 1 else ''}",
            "",
            "| variant | GFLOP | median s | wall GFLOP/s per repetition | wall GFLOP/s | CPU GFLOP/s | fraction of matmul (wall) | (CPU) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Where the time goes: one profiled forward each (`torch.profiler`, operator self time grouped; GFLOP/s of a "
            "group = its counted FLOPs over its time, fraction against the median matmul above):",
            "",
            "| encoder | operators | s | share of time | GFLOP | GFLOP/s | fraction of matmul | largest operators (self s) |",
            "|---|---|---|---|---|---|---|---|",
            *prof_rows,
            "",
            "- " + verdict,
            "- " + vit_note,
            "",
        ]
        print("\n".join(lines), flush=True)
        return lines, timed_s

    blocks, timed_s = [], 0.0
    for threads in args.threads:
        lines, seconds = block(threads)
        blocks += lines
        timed_s += seconds

    command = "python " + " ".join(shlex.quote(x) for x in ["bench/bench_compute_efficiency.py", *(argv or sys.argv[1:])])
    lines = [
        HEADING,
        "",
        f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.",
        "",
        "fp32, batch 1, `torch.inference_mode`; each block below runs everything with its torch thread count. GFLOP: "
        "`summarize_encoder(...).gflops` (PyTorch `FlopCounterMode`; a multiply-add counts 2, so FLOPs, not MACs; "
        f"convolutions, matrix products and attention only) and 2 n^3 for the matmul. {args.repeats} repetitions, the "
        "three variants alternating (order rotating) within each, after one warm-up call each; medians. "
        f"{timed_s / 60:.1f} min of timed work. GFLOP/s per wall-clock second, and per CPU second of the process "
        "(all threads; less inflated when other processes share the cores).",
        "",
        *blocks,
    ]
    text = "\n".join(lines)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", HEADING, text)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
