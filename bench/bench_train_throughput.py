"""Training throughput of the default segmenter on the CPU: Lightning against a plain PyTorch loop,
and the data pipeline's patch rate against the model's consumption rate.

Usage::

    python bench/bench_train_throughput.py                   # print, and write the section of BENCHMARKS.md
    python bench/bench_train_throughput.py --no-write --repeats 2 --steps 2 --patches 4

Everything follows ``configs/train_promptseg-cpu.yaml``: its :class:`PromptSegDataModule` (the
datalist read in place from ../shared/data, 4 mm, 96 x 96 x 48 patches with augmentation,
synthetic CTs, batch 1) and its :class:`PromptSegModule` (STU-Net base 8 with the term-query
decoder, AdamW with warm-up and cosine decay, the trainer's precision, bf16 autocast).

Three variants alternate within each repetition (the order rotating), so that other load on the
machine hits them alike; every figure is a median over the repetitions:

* **Lightning**: ``Trainer.fit`` on the CPU (no logger, checkpointing, progress bar or model summary)
  for ``warmup + steps`` steps; a callback stamps the end of every step and the rate counts the
  steps after the warm-up ones (data fetching, hooks, ``self.log`` and the scheduler included).
* **plain loop**: the same module, the same batches from the same in-memory list (through the same
  ``DataLoader``), a fresh AdamW and ``WarmupCosineSchedule`` as ``configure_optimizers`` builds,
  ``zero_grad``, :meth:`PromptSegModule.compute_loss` under the same autocast, ``backward``,
  ``step`` and the scheduler step; timed the same way.
* **data pipeline**: the DataModule's own ``train_dataloader()`` (the recipe's ``num_workers`` 0)
  iterated without the model: patches per second.

Both training variants reseed the module's term-sampling generator first, so they draw the same
negatives for the same batches and decode the same number of terms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from _report import machine_description, write_section
from _timing import median_ratio, rate_after_warmup, run_alternating

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train_promptseg-cpu.yaml"
HEADING = "## Training throughput: Lightning against a plain PyTorch loop"


def load_config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def build_datamodule(cfg: dict):
    from volumed.tasks.promptseg import PromptSegDataModule

    dm = PromptSegDataModule(**cfg["data"])
    dm.setup("fit")
    return dm


def build_module(cfg: dict, terms: list[str]):
    from volumed.tasks.promptseg import PromptSegModule

    module = PromptSegModule(**cfg["model"], patch_size=cfg["data"]["patch_size"])
    module.set_terms(terms)
    return module


def rates(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Steps per wall-clock second and per CPU second of this process (all its threads), warm-up
    excluded. CPU time is far less inflated than wall time when other processes share the cores."""
    return rate_after_warmup([s[0] for s in stamps], warmup), rate_after_warmup([s[1] for s in stamps], warmup)


def lightning_rate(module, loader, precision: str, warmup: int, steps: int) -> tuple[float, float]:
    """Steps per second of ``Trainer.fit`` over ``loader`` (``warmup + steps`` steps, warm-up excluded)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stamps.append((time.perf_counter(), time.process_time()))

    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=warmup + steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    module._generator.manual_seed(0)
    trainer.fit(module, train_dataloaders=loader)
    module.trainer = None  # the plain loop runs outside any Trainer
    if len(clock.stamps) != warmup + steps:
        raise RuntimeError(f"Lightning ran {len(clock.stamps)} steps, expected {warmup + steps}")
    return rates(clock.stamps, warmup)


def plain_rate(module, loader, precision: str, warmup: int, steps: int) -> tuple[float, float]:
    """Steps per second of a hand-written loop over ``loader``, same optimizer, loss and autocast."""
    from monai.optimizers import WarmupCosineSchedule

    hp = module.hparams
    total = warmup + steps
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=min(hp.warmup_steps, max(total - 1, 0)), t_total=total)
    bf16 = precision.startswith("bf16")
    module.train()
    module._generator.manual_seed(0)
    stamps = []
    for batch in loader:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_loss(batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        stamps.append((time.perf_counter(), time.process_time()))
    return rates(stamps, warmup)


def pipeline_rate(batches_iter, patches: int, batch_size: int) -> tuple[float, float]:
    """Patches per wall-clock second and per CPU second of the next ``patches // batch_size``
    batches of the DataModule's loader."""
    n = max(1, patches // batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        next(batches_iter)
    return n * batch_size / (time.perf_counter() - t0), n * batch_size / (time.process_time() - c0)


def endless(dm):
    """Batches of ``dm.train_dataloader()``, epoch after epoch."""
    while True:
        yield from dm.train_dataloader()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="repetitions; each runs the three variants once")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per variant and repetition")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps of every training run")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches kept in memory (cycled)")
    ap.add_argument("--patches", type=int, default=16, help="timed patches of the data pipeline per repetition")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the recipe's num_threads is 2)")
    ap.add_argument("--precision", default=None, help="Lightning precision; default: the recipe's")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_config()
    precision = args.precision or str(cfg["trainer"].get("precision", "32-true"))
    batch_size = int(cfg["data"]["batch_size"])

    t0 = time.perf_counter()
    dm = build_datamodule(cfg)
    setup_s = time.perf_counter() - t0
    module = build_module(cfg, dm.terms)

    source = endless(dm)
    kept = [next(source) for _ in range(args.batches)]  # also warms the pipeline up
    total = args.warmup + args.steps
    run_batches = [kept[i % len(kept)] for i in range(total)]
    loader = torch.utils.data.DataLoader(run_batches, batch_size=None, shuffle=False)
    from volumed.tasks.promptseg import select_terms

    decoded = []  # terms decoded per kept batch (what a step costs depends on it)
    with torch.no_grad():
        module._generator.manual_seed(0)
        for b in kept:
            use = select_terms(b["target"], b["annotated"], module.hparams.num_negatives, module._generator)
            decoded.append(int((use | module._exclusive_pairs(b)).any(0).sum()))

    t_start = time.perf_counter()
    measured = run_alternating(
        {
            "lightning": lambda: lightning_rate(module, loader, precision, args.warmup, args.steps),
            "plain": lambda: plain_rate(module, loader, precision, args.warmup, args.steps),
            "pipeline": lambda: pipeline_rate(source, args.patches, batch_size),
        },
        args.repeats,
    )
    timed_s = time.perf_counter() - t_start
    wall = {k: [v[0] for v in vals] for k, vals in measured.items()}
    cpu = {k: [v[1] for v in vals] for k, vals in measured.items()}
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    # Time per step, Lightning over plain, minus 1.
    overhead = median_ratio(wall["plain"], wall["lightning"]) - 1.0
    overhead_cpu = median_ratio(cpu["plain"], cpu["lightning"]) - 1.0
    # Paired within each repetition: Lightning's time per step over the plain loop's.
    paired = [p / q for p, q in zip(wall["plain"], wall["lightning"])]
    consume = med["lightning"] * batch_size  # patches per second the model takes in
    consume_cpu = med_cpu["lightning"] * batch_size
    keeps_up = med["pipeline"] >= consume
    # num_workers 0: loading and training take turns in one process, so a step costs both.
    serial_rate = 1.0 / (1.0 / med["pipeline"] + 1.0 / consume)

    def fmt(v: list[float]) -> str:
        return ", ".join(f"{x:.3f}" for x in v)

    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_train_throughput.py", *(argv or sys.argv[1:])])
    lines = [
        HEADING,
        "",
        f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.",
        "",
        f"`configs/train_promptseg-cpu.yaml` as it trains: its DataModule ({len(dm.cases)} cases, {len(dm.terms)} terms, "
        f"{'x'.join(map(str, cfg['data']['patch_size']))} patches at 4 mm, batch {batch_size}, augmentation and synthetic "
        f"CTs on, `num_workers` {dm.hparams.num_workers}; setup {setup_s:.0f} s) and its module (`{cfg['model']['encoder']}` "
        f"base {cfg['model']['encoder_kwargs']['channels'][0]} with the term-query decoder), precision `{precision}`, "
        f"{args.threads} torch threads. The training variants run the same {len(kept)} in-memory batches "
        f"(terms decoded per batch: {', '.join(map(str, decoded))}), cycled, {args.warmup} warm-up + {args.steps} timed "
        f"steps each; the pipeline variant times {args.patches} patches. {args.repeats} repetitions, the three variants "
        f"alternating (order rotating) within each; medians. {timed_s / 60:.1f} min of timed work. Rates per wall-clock "
        "second, and per CPU second of the benchmark process (all its threads; much less inflated than wall time "
        "when other processes share the cores).",
        "",
        "| variant | wall: rate per repetition | wall: median | CPU: rate per repetition | CPU: median | wall median ratio |",
        "|---|---|---|---|---|---|",
        f"| plain PyTorch loop (baseline) | {fmt(wall['plain'])} | {med['plain']:.3f} steps/s | {fmt(cpu['plain'])} | "
        f"{med_cpu['plain']:.3f} steps/CPU-s | 1.00 |",
        f"| Lightning `Trainer.fit` | {fmt(wall['lightning'])} | {med['lightning']:.3f} steps/s | {fmt(cpu['lightning'])} | "
        f"{med_cpu['lightning']:.3f} steps/CPU-s | {med['lightning'] / med['plain']:.3f} |",
        f"| data pipeline, no model | {fmt(wall['pipeline'])} | {med['pipeline']:.3f} patches/s | {fmt(cpu['pipeline'])} | "
        f"{med_cpu['pipeline']:.3f} patches/CPU-s | {med['pipeline'] / consume:.2f} x the model's consumption |",
        "",
        f"- **Lightning overhead**: {overhead * 100:+.1f} % time per step against the plain loop in wall time, "
        f"{overhead_cpu * 100:+.1f} % in CPU time (ratio of the medians). Within each repetition, Lightning's time "
        f"per step over the plain loop's ranged {min(paired):.2f} to {max(paired):.2f}. Target <= 5 %: "
        + (
            "**met** (in every repetition)." if max(paired) <= 1.05
            else "**not met** (in every repetition)." if min(paired) > 1.05
            else "**not resolved by this run**: the paired ratios straddle 1.05, the spread coming from the other "
            "load on the cores; the medians give the estimate above."
        ),
        f"- **Pipeline against model**: the pipeline makes {med['pipeline']:.3f} patches/s ({med_cpu['pipeline']:.3f} per "
        f"CPU-s), the model consumes {consume:.3f} patches/s ({consume_cpu:.3f} per CPU-s; Lightning steps x batch "
        f"{batch_size}): the pipeline "
        + ("keeps up" if keeps_up else f"does **not** keep up (it would need {consume / med['pipeline']:.1f}x its rate)")
        + f", with {med['pipeline'] / consume:.2f}x (CPU: {med_cpu['pipeline'] / consume_cpu:.2f}x) the model's rate. "
        f"With `num_workers` {dm.hparams.num_workers} loading and training take turns in one process, so a training "
        f"run gets about {serial_rate:.3f} steps/s here and spends {100 * consume / (med['pipeline'] + consume):.0f} % "
        "of its wall time in the data pipeline.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", HEADING, text)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
