"""Per-structure Dice of a trained text-prompted segmentation package against reference masks.

Usage::

    python bench/bench_promptseg_dice.py --model bundles/volumed_promptseg_ct/models \\
        [--datalist configs/datalists/promptseg_ct_real.json] [--tag "training scans"] \\
        [--update-metrics] [--no-write]

Every case of the datalist goes through the real inference path (``PromptSegPredictor``, as
``volumed segment``): the whole image is preprocessed with the package's settings, MONAI
``sliding_window_inference`` runs the network for all terms at once, the windows' sigmoid
probabilities are blended and inverted trilinearly onto the original grid where each structure can
be, and thresholded at the package's threshold. Dice
(MONAI ``compute_dice``) is taken against the case's reference masks on the original grid (a label
map read with ``read_label(path, reference=image)``, union of the term's TotalSegmentator ids).

Only structures that the case annotates and whose reference holds at least ``--min-ml`` (1 mL) are
scored; smaller references are listed under the table (Dice of a 1-voxel reference is noise). The table goes
to BENCHMARKS.md (repo root) under "## Text-prompted segmentation: Dice", as a sub-section named by
``--tag`` (replaced if present; other sections and tags are kept). ``--update-metrics`` also stores
the numbers in the package's ``config.json`` (``metrics[tag]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice

from volumed.inference.package import CONFIG_NAME, load_package
from volumed.io import read_volume
from volumed.io.atomic import atomic_write_text
from volumed.tasks.promptseg import encode_terms, load_promptseg_datalist, predict_probabilities
from volumed.tasks.promptseg_data import load_validation_case

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Text-prompted segmentation: Dice"
#: Structures reported by default (the issue's list), in this order; others the model knows follow
#: only with ``--all-terms``.
DEFAULT_TERMS = (
    "liver", "spleen", "kidney_left", "kidney_right", "aorta", "stomach",
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right", "heart",
)  # fmt: skip


def reference_masks(source, volume, terms: list[str]) -> dict[str, np.ndarray]:
    """Boolean reference ``(X, Y, Z)`` on ``volume``'s grid for each of ``terms`` the case annotates
    and holds (the references fine-tuning validates against: ``load_validation_case``)."""
    case = load_validation_case(source, volume)
    return {t: m for t, m in zip(case.terms, case.masks) if t in terms and m.any()}


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p = torch.as_tensor(pred)[None, None].float()
    r = torch.as_tensor(ref)[None, None].float()
    return float(compute_dice(p, r, include_background=True)[0, 0])


def evaluate(
    model_dir: Path, datalist: Path, terms: list[str] | None, min_ml: float = 1.0
) -> tuple[dict[str, dict[str, float]], list[str], dict]:
    """Dice ``{case: {term: value}}``, the case names, and info (timing; the references too small
    to score, ``{case: {term: "x mL (n voxels)"}}``)."""
    model, config = load_package(model_dir)
    want = [t for t in (terms or DEFAULT_TERMS) if t in config.terms]
    embeddings, digest = encode_terms(want, config.text_model)
    if config.text_model_hash and digest != config.text_model_hash:
        raise SystemExit(f"{model_dir}: the package was trained with another text model (hash mismatch)")
    sources = load_promptseg_datalist(datalist, allow_free_text=True)
    results: dict[str, dict[str, float]] = {}
    names, seconds = [], []
    too_small: dict[str, dict[str, str]] = {}
    for src in sources:
        volume = read_volume(src.image, modality=src.modality)
        refs = reference_masks(src, volume, want)
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        for t in [t for t, m in refs.items() if m.sum() * voxel_ml < min_ml]:
            # A reference of a few voxels (the right middle lobe of example_ct_sm is 1 voxel, the
            # scan ends below it) makes Dice a coin toss, not a measurement: list it, do not score it.
            n = int(refs.pop(t).sum())
            too_small.setdefault(src.image.name, {})[t] = f"{n * voxel_ml:.2f} mL ({n} voxel{'s' if n != 1 else ''})"
        if not refs:
            continue
        case_terms = [t for t in want if t in refs]
        start = time.perf_counter()
        probs = predict_probabilities(model, config, volume, case_terms, embeddings[[want.index(t) for t in case_terms]])
        seconds.append(time.perf_counter() - start)
        name = src.image.name
        names.append(name)
        results[name] = {t: dice(probs[i] > config.threshold, refs[t]) for i, t in enumerate(case_terms)}
        print(name, {t: round(v, 3) for t, v in results[name].items()}, f"{seconds[-1]:.1f} s", flush=True)
    return results, names, {"seconds_per_case": [round(s, 1) for s in seconds], "too_small": too_small}


def format_table(results: dict[str, dict[str, float]], names: list[str]) -> str:
    terms = list(dict.fromkeys(t for n in names for t in results[n]))
    lines = ["| structure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for t in terms:
        cells = [f"{results[n][t]:.3f}" if t in results[n] else "-" for n in names]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path: Path, tag: str, body: str) -> None:
    """Replace (or add) sub-section ``### tag`` of this benchmark's section, keeping everything else."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    sub = f"### {tag}\n\n{body.rstrip()}\n"
    start = text.find(HEADING + "\n")
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\nWritten by `bench/bench_promptseg_dice.py`.\n\n{sub}"
    else:
        end = text.find("\n## ", start + len(HEADING))
        end = len(text) if end < 0 else end + 1
        section = text[start:end]
        s0 = section.find(f"### {tag}\n")
        if s0 >= 0:
            s1 = section.find("\n### ", s0 + 4)
            s1 = len(section) if s1 < 0 else s1 + 1
            section = section[:s0] + sub + ("\n" if s1 < len(section) else "") + section[s1:]
        else:
            section = section.rstrip("\n") + "\n\n" + sub
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if end < len(text) else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "bundles/volumed_promptseg_ct/models")
    parser.add_argument("--datalist", type=Path, default=REPO / "configs/datalists/promptseg_ct_real.json")
    parser.add_argument("--tag", default="training scans", help="sub-section name (and metrics key)")
    parser.add_argument("--terms", nargs="*", default=None, help="structures to score (default: the issue's list)")
    parser.add_argument("--note", default="", help="a sentence printed under the table (e.g. the recipe)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument("--update-metrics", action="store_true", help="store the Dice in the package's config.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-ml", type=float, default=1.0, help="references smaller than this are listed, not scored")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results, names, info = evaluate(args.model, args.datalist, args.terms, args.min_ml)
    table = format_table(results, names)
    print(table)
    cfg = json.loads((args.model / CONFIG_NAME).read_text())
    recipe = cfg.get("training", {})
    try:
        model_label = args.model.resolve().relative_to(REPO)
    except ValueError:
        model_label = args.model
    body = (
        f"Model `{model_label}` ({recipe.get('steps', '?')} steps, {cfg['encoder']} "
        f"{cfg['encoder_kwargs'].get('channels', '')}, patch {cfg['patch_size']}, "
        f"{cfg['preprocessing'].get('target_spacing')} mm), datalist `{args.datalist.name}`. "
        f"Whole image -> sliding window (overlap {cfg['overlap']}) -> sigmoid, gaussian blending (exact, where the "
        f"structure can be) -> inverted trilinearly to the original grid -> threshold {cfg['threshold']} -> Dice vs "
        f"the reference on the original grid (the path of `volumed segment`). "
        f"Inference {info['seconds_per_case']} s per case on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}.\n\n{table}\n"
    )
    if info["too_small"]:
        listed = "; ".join(f"{t} in {n}: {v}" for n, d in info["too_small"].items() for t, v in d.items())
        body += f"\nNot scored, reference under {args.min_ml:g} mL: {listed}.\n"
    if args.note:
        body += f"\n{args.note}\n"
    if not args.no_write:
        write_section(args.output, args.tag, body)
    if args.update_metrics:
        cfg.setdefault("metrics", {})[args.tag] = {
            "dice": results, "datalist": str(args.datalist.name), "threshold": cfg["threshold"],
            "not_scored_below_ml": {"min_ml": args.min_ml, **info["too_small"]},
        }
        atomic_write_text(args.model / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n", overwrite=True)


if __name__ == "__main__":
    main()
