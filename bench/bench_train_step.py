"""Training step of the default segmenter on the CPU: fp32 against bf16 autocast (``bf16-mixed``).

Usage::

    python bench/bench_train_step.py                     # print, and write the section of BENCHMARKS.md
    python bench/bench_train_step.py --no-write --repeats 2

One step as Lightning runs it for ``configs/train_promptseg-cpu.yaml``: the network of the recipe
(STU-Net base 8 with the term-query decoder), one 96 x 96 x 48 patch at 4 mm cut from the real CT
``tcia_ccth_a01`` (read from ../shared/data), 8 terms, :meth:`PromptSegModule.compute_loss`
(targets all zero apart from one box, which is enough for the cost), backward and an AdamW step.
``bf16`` wraps the forward pass in ``torch.autocast("cpu", torch.bfloat16)``, as Lightning's
``precision: bf16-mixed`` does; weights, optimizer state and the loss stay fp32. The two variants
alternate within each repeat, so that other load on the machine hits both alike; the ratio is the
median of fp32 over the median of bf16.

Agreement: the fraction of voxels where the trained default model's masks (p > 0.5) agree between
fp32 and bf16 inference on that patch, per term (Dice between the two masks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from _report import machine_description, write_section

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
HEADING = "## Training step on the CPU: fp32 against bf16"
TERMS = ["liver", "spleen", "aorta", "heart", "lung_lower_lobe_right", "femur_left", "small_bowel", "kidney_left"]


def real_patch(size=(96, 96, 48)) -> torch.Tensor:
    """A ``(1, 1, *size)`` patch of tcia_ccth_a01 at 4 mm, windowed to [0, 1] as in training."""
    from volumed.data.transforms import PreprocessConfig, preprocess
    from volumed.io import read_volume

    cfg = yaml.safe_load((REPO / "configs" / "train_promptseg-cpu.yaml").read_text())["data"]
    volume = read_volume(DATA / "tcia_ccth_a01" / "ct.nii.gz")
    case = preprocess(volume, config=PreprocessConfig(modality="CT", target_spacing=tuple(cfg["target_spacing"]),
                                                      ct_window=tuple(cfg["ct_window"])))
    x = torch.as_tensor(np.asarray(case.image))[None].float()
    c = [s // 2 for s in x.shape[2:]]
    sl = tuple(slice(max(0, ci - p // 2), max(0, ci - p // 2) + p) for ci, p in zip(c, size))
    x = x[(slice(None), slice(None), *sl)]
    pad = [v for s, p in reversed(list(zip(x.shape[2:], size))) for v in (0, p - s)]
    return torch.nn.functional.pad(x, pad)


def build_module(init_weights: str | None):
    from volumed.tasks.promptseg import PromptSegModule, encode_terms

    model = yaml.safe_load((REPO / "configs" / "train_promptseg-cpu.yaml").read_text())["model"]
    module = PromptSegModule(encoder=model["encoder"], encoder_kwargs=model["encoder_kwargs"],
                             decoder_kwargs=model["decoder_kwargs"], patch_size=(96, 96, 48), init_weights=init_weights)
    embeddings, _ = encode_terms(TERMS)
    module.set_terms(TERMS, embeddings)
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the recipe's runs use 1 or 2)")
    ap.add_argument("--model", default=str(REPO / "bundles" / "volumed_promptseg_ct" / "models" / "model.safetensors"),
                    help="weights for the agreement check and the timed steps")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x = real_patch()
    module = build_module(args.model if Path(args.model).exists() else None)
    batch = {
        "image": x,
        "target": torch.zeros(1, len(TERMS), *x.shape[2:], dtype=torch.uint8),
        "annotated": torch.ones(1, len(TERMS), dtype=torch.bool),
        "modality": torch.zeros(1, dtype=torch.long),
    }
    batch["target"][0, 0, 30:60, 30:60, 10:30] = 1
    idx = torch.arange(len(TERMS))

    with torch.no_grad():
        p32 = torch.sigmoid(module(x, idx, batch["modality"]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = torch.sigmoid(module(x, idx, batch["modality"]).float())
    agree = {}
    for k, t in enumerate(TERMS):
        a, b = p32[0, k] > 0.5, p16[0, k] > 0.5
        n = int(a.sum() + b.sum())
        agree[t] = (2.0 * int((a & b).sum()) / n, int(a.sum())) if n else (1.0, 0)

    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.compute_loss(batch).loss
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    step(False), step(True)  # warm-up: allocator, oneDNN kernels
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        times["fp32"].append(step(False))
        times["bf16"].append(step(True))
    med = {k: statistics.median(v) for k, v in times.items()}

    lines = [
        HEADING,
        "",
        "`python bench/bench_train_step.py` (" + machine_description() + "). One training step of "
        "`configs/train_promptseg-cpu.yaml`'s network on a 96 x 96 x 48 patch of tcia_ccth_a01 at 4 mm, "
        f"{len(TERMS)} terms, forward, loss, backward and AdamW; median of {args.repeats} alternating steps each.",
        "",
        "| precision | step (s) | ratio to fp32 |",
        "|---|---|---|",
        f"| fp32 (`32-true`, baseline) | {med['fp32']:.2f} | 1.00 |",
        f"| bf16 autocast (`bf16-mixed`) | {med['bf16']:.2f} | {med['bf16'] / med['fp32']:.2f} |",
        "",
        "Masks of the trained default model (p > 0.5) on that patch, bf16 inference against fp32 (Dice between "
        "the two; voxels in the fp32 mask):",
        "",
        "| term | Dice bf16 vs fp32 | fp32 voxels |",
        "|---|---|---|",
        *[f"| {t} | {d:.3f} | {n} |" for t, (d, n) in agree.items()],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(REPO / "BENCHMARKS.md", HEADING, text)
        print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
