"""Training-step memory per encoder preset and crop: measured on the CPU against volumed.memory's estimate.

Usage::

    python bench/bench_train_memory.py                 # measure, estimate, write the section of BENCHMARKS.md
    python bench/bench_train_memory.py --no-measure    # estimates only; reuse bench/results/train_memory_cpu.json
    python bench/bench_train_memory.py --no-write      # print only

The model is the text-prompted segmenter of ``configs/train_promptseg.yaml`` (the preset's encoder
and the recipe's term-query decoder), as :class:`~volumed.tasks.promptseg.PromptSegModule` builds it.
Each measurement is one subprocess (``--measure PRESET SIZE CKPT``) that runs one real fp32 training
step on the CPU: batch 1, 8 terms, AdamW. Before the step it creates the AdamW moments and the
gradients (a zero-gradient ``step``), so the step meets them as a steady-state step does; then
forward, ``zero_grad(set_to_none=True)``, backward and ``step``, Lightning's order. Its memory is
the process's peak resident set (``ru_maxrss``) minus its resident set after the imports, before
the model is built. Measured cases run smallest first and are kept in
``bench/results/train_memory_cpu.json``; a case whose estimate exceeds ``--max-gib`` is not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Training memory per preset and crop"
RESULTS = REPO / "bench" / "results" / "train_memory_cpu.json"
RECIPE = REPO / "configs" / "train_promptseg.yaml"
CPU_TERMS, CPU_BATCH = 8, 1
CASES = [  # (preset, crop), smallest first
    ("stunet_tiny", 64), ("swin_tiny", 64), ("ctvit_tiny", 64), ("stunet_tiny", 96), ("swin_tiny", 96),
    ("ctvit_tiny", 96), ("stunet_s", 64), ("stunet_b", 64), ("stunet_s", 96), ("stunet_b", 96),
    ("stunet_s", 128), ("stunet_l", 64), ("stunet_b", 128),
]  # fmt: skip
#: Measured on one H200 with the recipes as written (issue 21), and the failing configuration.
GPU_RECIPES = [
    ("configs/train_promptseg.yaml", {}, "7.2 GiB"),
    ("configs/pretrain_voco.yaml", {}, "35 GiB"),
    ("configs/pretrain_voco.yaml", {"data": {"batch_size": 2}, "model": {"encoder_kwargs": {}}},
     "out of memory on 140 GB"),
    ("configs/train_stunet-fsdp.yaml", {}, "not run yet"),
]  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _decoder_kwargs() -> dict:
    import yaml

    return dict(yaml.safe_load(RECIPE.read_text())["model"]["decoder_kwargs"])


def _shape(preset: str, size: int) -> tuple[int, int, int]:
    import torch

    from volumed.encoders import create_encoder
    from volumed.encoders.summary import valid_input_shape

    with torch.device("meta"):
        return valid_input_shape(create_encoder(preset), size)


def measure(preset: str, size: int, checkpointing: bool) -> dict:
    """One real fp32 training step on the CPU (see the module docstring); runs in a subprocess."""
    import torch

    from volumed.tasks.promptseg import PromptSegModule

    torch.manual_seed(0)
    shape = _shape(preset, size)
    baseline = _rss_bytes()
    kwargs = {"use_checkpoint": True} if checkpointing else {}
    module = PromptSegModule(encoder=preset, encoder_kwargs=kwargs, decoder_kwargs=_decoder_kwargs()).train()
    module.term_embeddings = torch.randn(CPU_TERMS, module.model_config.text_dim)
    image = torch.rand(CPU_BATCH, 1, *shape)
    target = (torch.rand(CPU_BATCH, CPU_TERMS, *shape) > 0.5).to(torch.uint8)
    use = torch.ones(CPU_BATCH, CPU_TERMS, dtype=torch.bool)
    idx, modality = torch.arange(CPU_TERMS), torch.zeros(CPU_BATCH, dtype=torch.long)
    params = list(module.net.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # the gradients and moments a steady-state step finds in place
        p.grad = torch.zeros_like(p)
    optimizer.step()
    start = time.perf_counter()
    loss = module.loss_fn(module(image, idx, modality), target, use).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "preset": preset, "size": size, "shape": list(shape), "checkpointing": checkpointing,
        "measured_mib": (peak - baseline) / 2**20, "step_s": seconds, "loss": float(loss),
    }  # fmt: skip


def estimate(preset: str, size: int, checkpointing: bool, *, precision: str = "32-true", device: str = "cpu",
             batch: int = CPU_BATCH, terms: int = CPU_TERMS):  # fmt: skip
    from volumed.memory import estimate_promptseg

    return estimate_promptseg(
        preset, _shape(preset, size), batch, terms, encoder_kwargs={"use_checkpoint": True} if checkpointing else {},
        decoder_kwargs=_decoder_kwargs(), precision=precision, device=device,
    )  # fmt: skip


def run_measurements(max_gib: float, timeout: int, redo: bool) -> list[dict]:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() and not redo else []
    done = {(r["preset"], r["size"], r["checkpointing"]) for r in results}
    for preset, size in CASES:
        for ckpt in (False, True):
            if (preset, size, ckpt) in done:
                continue
            est = estimate(preset, size, ckpt)
            if est.total_gib > max_gib:
                print(f"skip {preset} {size} ckpt={ckpt}: estimate {est.total_gib:.1f} GiB > {max_gib}", flush=True)
                continue
            cmd = [sys.executable, __file__, "--measure", preset, str(size), str(int(ckpt))]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                print(f"failed {preset} {size} ckpt={ckpt}: {e}\n{getattr(e, 'stderr', '')}", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"{preset} {size} ckpt={ckpt}: measured {row['measured_mib']:.0f} MiB, "
                  f"estimated {est.total_mib:.0f} MiB, step {row['step_s']:.0f} s", flush=True)  # fmt: skip
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return results


def cpu_table(results: list[dict]) -> str:
    lines = [
        "| encoder | crop | checkpointing | measured (MiB) | estimated (MiB) | estimate / measured | step (s) |",
        "| ------- | ---- | ------------- | -------------: | --------------: | ------------------: | -------: |",
    ]
    order = {c: i for i, c in enumerate(CASES)}
    for r in sorted(results, key=lambda r: (order.get((r["preset"], r["size"]), 99), r["checkpointing"])):
        est = estimate(r["preset"], r["size"], r["checkpointing"])
        lines.append(
            f"| {r['preset']} | {'x'.join(map(str, r['shape']))} | {'yes' if r['checkpointing'] else 'no'} | "
            f"{r['measured_mib']:,.0f} | {est.total_mib:,.0f} | {est.total_mib / r['measured_mib']:.2f} | {r['step_s']:.0f} |"
        )
    return "\n".join(lines)


def gpu_table(batch: int, terms: int) -> str:
    lines = [
        "| encoder | crop | params (M) | bf16-mixed (GiB) | bf16-mixed + checkpointing (GiB) | fp32 (GiB) |",
        "| ------- | ---- | ---------: | ---------------: | -------------------------------: | ---------: |",
    ]
    for preset in ("stunet_s", "stunet_b", "stunet_l", "stunet_h"):
        for size in (64, 96, 128):
            plain = estimate(preset, size, False, precision="bf16-mixed", device="cuda", batch=batch, terms=terms)
            ckpt = estimate(preset, size, True, precision="bf16-mixed", device="cuda", batch=batch, terms=terms)
            fp32 = estimate(preset, size, False, precision="32-true", device="cuda", batch=batch, terms=terms)
            lines.append(
                f"| {preset} | {size}³ | {plain.trainable_params / 1e6:,.1f} | {plain.total_gib:,.1f} | "
                f"{ckpt.total_gib:,.1f} | {fp32.total_gib:,.1f} |"
            )
    return "\n".join(lines)


def recipe_table() -> str:
    from volumed.memory import estimate_recipe

    lines = [
        "| recipe | as run | estimated (GiB) | of which activations + recompute (GiB) | measured on one H200 |",
        "| ------ | ------ | --------------: | -------------------------------------: | -------------------- |",
    ]
    for config, overrides, measured in GPU_RECIPES:
        est = estimate_recipe(REPO / config, overrides)
        change = "; ".join(f"{s}.{k}={json.dumps(v)}" for s, kv in overrides.items() for k, v in kv.items()) or "as written"
        acts = (est.activations_bytes + est.recompute_bytes) / 2**30
        lines.append(f"| `{config}` | {change} | {est.total_gib:,.1f} | {acts:,.1f} | {measured} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("PRESET", "SIZE", "CKPT"), help=argparse.SUPPRESS)
    parser.add_argument("--no-measure", action="store_true", help="reuse the kept CPU measurements only")
    parser.add_argument("--redo", action="store_true", help="measure every case again")
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip CPU cases estimated above this")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per measured case")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    if args.measure:
        torch_threads = os.environ.get("VOLUMED_BENCH_THREADS")
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        preset, size, ckpt = args.measure
        print(json.dumps(measure(preset, int(size), bool(int(ckpt)))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import machine_description, write_section

    from volumed.memory import ACTIVATION_MARGIN, BACKWARD_LARGEST, CUDA_OVERHEAD_BYTES
    from volumed.memory import _datalist_terms
    import yaml

    results = json.loads(RESULTS.read_text()) if args.no_measure and RESULTS.exists() else (
        [] if args.no_measure else run_measurements(args.max_gib, args.timeout, args.redo))  # fmt: skip
    recipe = yaml.safe_load(RECIPE.read_text())
    gpu_batch = int(recipe["data"]["batch_size"])
    gpu_terms = _datalist_terms(REPO / recipe["data"]["datalist"])
    cpu, gpu, recipes = cpu_table(results), gpu_table(gpu_batch, gpu_terms), recipe_table()
    print(cpu, gpu, recipes, sep="\n\n")
    if args.no_write:
        return
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_train_memory.py", *(argv or sys.argv[1:])])
    section = "\n".join(
        [
            HEADING,
            "",
            f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.",
            "",
            "Peak memory of one training step (forward, backward, AdamW step) of the text-prompted segmenter:",
            "the preset's encoder with the term-query decoder of `configs/train_promptseg.yaml`.",
            "",
            "**Estimate** (`volumed.memory`): fp32 weights and buffers + fp32 gradients + AdamW's two fp32",
            "moments (16 bytes per trainable parameter in all) + the batch + the activations, measured as the",
            "storages autograd saves during one forward pass and loss on the meta device (`saved_tensors_hooks`;",
            "under checkpointing the segments' inputs, plus the largest checkpointed segment, which the backward",
            f"pass recomputes) + {BACKWARD_LARGEST}x the largest saved tensor (the gradients in flight in the backward pass)",
            f"+ a margin of {ACTIVATION_MARGIN:.0%} of the activations (other temporaries, allocator fragmentation)",
            f"+ on a GPU {CUDA_OVERHEAD_BYTES / 2**30:.0f} GiB for the CUDA context and cuDNN/cuBLAS workspaces. bf16-mixed keeps fp32",
            "weights, gradients and moments; its activations are measured with autocast's casting policy emulated on",
            "the meta device (`MetaAutocast`: convolution, matmul, linear and attention inputs cast to bf16, one cached",
            "bf16 copy per weight; layer/group norm, softmax and BCE in fp32; everything else in the dtype it gets),",
            "because `torch.autocast` does not act on meta tensors.",
            "",
            f"**Measured on the CPU**: one real fp32 step, batch {CPU_BATCH}, {CPU_TERMS} terms, each in its own process, after",
            "the gradients and AdamW moments exist (as in a steady-state step); peak resident set (`ru_maxrss`)",
            "minus the resident set after the imports. The estimate is made for the same case on the CPU (no CUDA",
            "overhead). Other work shared the cores, which changes the step time but not the memory.",
            "",
            cpu,
            "",
            "STU-Net H is estimate-only: with the term-query decoder it has 859 M parameters, whose weights,",
            "gradients and AdamW moments alone (16 bytes each) are 12.8 GiB, and the 1.4 B-parameter STU-Net H",
            "segmenter 21 GiB: over what this machine leaves free. Cases estimated above",
            f"{args.max_gib:g} GiB were not measured. With `--no-measure` the CPU rows are those kept in",
            "bench/results/train_memory_cpu.json by the last measuring run (same day, same machine).",
            "",
            f"**Estimated for one GPU** (bf16-mixed unless marked; batch {gpu_batch}, all {gpu_terms} terms of the recipe's",
            "datalist decoded in each step, which is the recipe's worst case; not measured on a GPU):",
            "",
            gpu,
            "",
            "**The GPU recipes**, estimated per GPU from their YAML (`volumed.memory.estimate_recipe`, asserted to fit an",
            "80 GB card in tests/unit/test_memory.py), next to what issue 21 measured on one H200:",
            "",
            recipes,
            "",
        ]
    )
    write_section(args.output, HEADING, section)
    print(f"\nwrote section {HEADING!r} of {args.output}")


if __name__ == "__main__":
    main()
