"""Anatomy sentences grounded on the real CTs (issue 19, item 3: "the right lower lobe of the
lung", "the abdominal aorta", "the urinary bladder" against the reference masks).

Each sentence goes through ``volumed ground``'s path (:class:`volumed.inference.ground.GroundingPredictor`
of the grounding bundle: parsing, preprocessing, sliding window, inversion to the scan's original
grid, threshold). A sentence that names one structure and nothing else is an *anatomy query*: it is
answered by the default segmenter for the parsed term, not by the sentence head, which learnt
findings (docs/grounding.md, "Anatomy sentences"); the grounding model's own location query
(``--anatomy-model self``) is scored next to it. Dice is taken on
the original grid against the scan's reference masks (MONAI ``compute_dice``), next to
``volumed segment``'s Dice of the same term with the default segmenter, the model the grounding
bundle started from.

Both models trained on these four CTs (the default segmenter's datalist holds them all), so these
are **training-scan** figures: they show that the sentence reaches the right structure, not how
well an unseen scan is segmented (that is BENCHMARKS.md, "Generalisation: unseen scans").

``--unseen VARIANT`` scores **unseen scans** instead: each scan's sentences are answered by the
leave-one-scan-out segmenter that never saw it (``runs/generalisation/VARIANT/loso_<scan>/package``,
trained by ``bench/bench_generalisation.py --train --variant VARIANT``), through the same
grounding path (``--anatomy-model`` set to that package). Its own section of BENCHMARKS.md.

    python bench/bench_grounding_anatomy.py            # writes BENCHMARKS.md's section
    python bench/bench_grounding_anatomy.py --no-write
    python bench/bench_grounding_anatomy.py --unseen M-ft
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _report import bench_parser, machine_description, publish  # noqa: E402
from bench_generalisation import _sources  # noqa: E402
from bench_promptseg_dice import dice, reference_masks  # noqa: E402

HEADING = "## Grounding: anatomy sentences on the real CTs"
UNSEEN_HEADING = "## Grounding: anatomy sentences on unseen scans"
RUNS = REPO / "runs" / "generalisation"
GROUND_BUNDLE = REPO / "bundles" / "volumed_ground_ct" / "models"
SEGMENTER = REPO / "bundles" / "volumed_promptseg_ct" / "models"

#: The sentences, as a report or a user would write them, by the term of their reference mask.
SENTENCES: dict[str, str] = {
    "liver": "The liver.",
    "spleen": "The spleen.",
    "kidney_left": "The left kidney.",
    "kidney_right": "The right kidney.",
    "aorta": "The abdominal aorta.",
    "heart": "The heart.",
    "lung_upper_lobe_left": "The left upper lobe of the lung.",
    "lung_lower_lobe_left": "The left lower lobe of the lung.",
    "lung_upper_lobe_right": "The right upper lobe of the lung.",
    "lung_middle_lobe_right": "The middle lobe of the right lung.",
    "lung_lower_lobe_right": "The right lower lobe of the lung.",
    "urinary_bladder": "The urinary bladder.",
    "femur_left": "The left femur.",
    "femur_right": "The right femur.",
    "small_bowel": "The small bowel.",
    "stomach": "The stomach.",
    "pancreas": "The pancreas.",
    "gallbladder": "The gallbladder.",
}  # fmt: skip


def run(min_ml: float = 1.0, unseen: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows per (scan, sentence). ``unseen``: a variant of bench_generalisation.py whose
    leave-one-scan-out packages answer each scan's anatomy sentences (module docstring)."""
    from volumed.heads.grounding import finding_queries
    from volumed.inference.ground import GroundingPredictor
    from volumed.inference.package import load_package
    from volumed.io import read_volume
    from volumed.tasks.promptseg import encode_terms, predict_probabilities

    if unseen is None:
        grounder = GroundingPredictor.from_package(GROUND_BUNDLE)
        own = GroundingPredictor.from_package(GROUND_BUNDLE, anatomy_model="self")
        seg_model, seg_config = load_package(SEGMENTER)
    rows, notes = [], []
    for scan, source in _sources().items():
        if unseen is not None:  # the fold that never saw this scan
            package = RUNS / unseen / f"loso_{scan}" / "package"
            if not (package / "model.safetensors").is_file():
                raise SystemExit(f"{package}: no leave-one-out package; train it with "
                                 f"python bench/bench_generalisation.py --train --variant {unseen} --only loso_{scan}")
            grounder = GroundingPredictor.from_package(GROUND_BUNDLE, anatomy_model=package)
            own = None
            seg_model, seg_config = load_package(package)
        volume = read_volume(source.image, modality=source.modality)
        refs = reference_masks(source, volume, list(SENTENCES))
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        small = [t for t, m in refs.items() if m.sum() * voxel_ml < min_ml]
        if small:
            notes.append(f"{scan}: not scored (reference under {min_ml:g} mL): {', '.join(small)}")
        terms = [t for t in SENTENCES if t in refs and t not in small]
        queries = finding_queries([SENTENCES[t] for t in terms])
        start = time.perf_counter()
        grounded = grounder.ground(volume, queries)
        seconds = time.perf_counter() - start
        own_masks = [g.mask for g in own.ground(volume, queries)] if own is not None else [None] * len(terms)
        emb, _ = encode_terms(terms, seg_config.text_model)
        probs = predict_probabilities(seg_model, seg_config, volume, terms, emb)
        for i, (term, g, own_mask) in enumerate(zip(terms, grounded, own_masks)):
            q = g.query
            rows.append({
                "scan": scan, "term": term, "sentence": q.text, "parsed": q.location_term, "anatomy": q.anatomy,
                "ground_dice": dice(g.mask, refs[term]) if g.mask is not None else 0.0,
                "segment_dice": dice(probs[i] > seg_config.threshold, refs[term]),
                "own_dice": dice(own_mask, refs[term]) if own_mask is not None else None,
                "volume_ml": g.volume_ml, "reference_ml": float(refs[term].sum()) * voxel_ml, "seconds": seconds,
            })
        print(f"{scan}: {len(terms)} sentences in {seconds:.1f} s", flush=True)
    return rows, notes


def render_unseen(rows: list[dict], notes: list[str], variant: str) -> str:
    lines = [
        UNSEEN_HEADING,
        "",
        f"Written by `python bench/bench_grounding_anatomy.py --unseen {variant}` ({machine_description()}).",
        "",
        "Each scan's anatomy sentences go through `volumed ground`'s path with `bundles/volumed_ground_ct`, "
        f"answered by the leave-one-scan-out segmenter of recipe `{variant}` that **never saw that scan** "
        f"(`--anatomy-model runs/generalisation/{variant}/loso_<scan>/package`; \"Generalisation: unseen scans\" "
        "scores the same folds with `volumed segment`'s path). Dice on the scan's original grid against its "
        "reference mask, next to that segmenter's probabilities above its threshold without the "
        "connected-component rules.",
        "",
        "| scan (unseen) | sentence | parsed term | grounded Dice | segmenter Dice, no component rules | grounded mL | "
        "reference mL |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    return _finish(lines, rows, notes, own=False, per="unseen scan")


def render(rows: list[dict], notes: list[str]) -> str:
    lines = [
        HEADING,
        "",
        f"Written by `python bench/bench_grounding_anatomy.py` ({machine_description()}).",
        "",
        "Each sentence is grounded through `volumed ground`'s path with `bundles/volumed_ground_ct`; a sentence "
        "that names one structure and nothing else is answered by the default segmenter for the parsed term "
        "(`volumed ground`'s default `--anatomy-model`), with its connected-component rules. Dice on the scan's "
        "original grid against its reference mask, next to the default segmenter's probabilities above its "
        "threshold without those rules (as in \"Generalisation: unseen scans\"), the grounding bundle's start. **Training-scan figures:** both models trained on these four CTs; unseen-scan "
        "Dice is in \"Generalisation: unseen scans\". The last column is the grounding model's own location query "
        "(`--anatomy-model self`): its segmenter, fine-tuned on finding phantoms only, which is why the "
        "default is the segmenter. The default segmenter is the bundle in `bundles/volumed_promptseg_ct` as it "
        "is when this runs (its version is in its `configs/metadata.json`).",
        "",
        "| scan | sentence | parsed term | grounded Dice | segmenter Dice, no component rules | grounded mL | reference mL | "
        "`--anatomy-model self` Dice |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    return _finish(lines, rows, notes, own=True, per="scan")


def _finish(lines: list[str], rows: list[dict], notes: list[str], *, own: bool, per: str) -> str:
    """The table's rows (with the ``--anatomy-model self`` column when ``own``), the mean grounded
    Dice per scan and the notes, after the header ``lines``."""
    for r in rows:
        parsed = f"`{r['parsed']}`" if r["anatomy"] else "(not an anatomy query)"
        lines.append(f"| {r['scan']} | {r['sentence']} | {parsed} | {r['ground_dice']:.3f} | {r['segment_dice']:.3f} | "
                     f"{r['volume_ml']:.1f} | {r['reference_ml']:.1f} |" + (f" {r['own_dice']:.3f} |" if own else ""))
    by_scan: dict[str, list[float]] = {}
    for r in rows:
        by_scan.setdefault(r["scan"], []).append(r["ground_dice"])
    lines += ["", f"Mean grounded Dice per {per}: " + ", ".join(f"{s} {np.mean(v):.3f} ({len(v)})" for s, v in by_scan.items()) + "."]
    lines += [f"\n{n}." for n in notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, REPO / "BENCHMARKS.md")
    parser.add_argument("--unseen", metavar="VARIANT", default=None,
                        help="score unseen scans with this variant's leave-one-scan-out segmenters (e.g. M-ft)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, notes = run(unseen=args.unseen)
    if args.unseen is None:
        heading, section = HEADING, render(rows, notes)
    else:
        heading, section = UNSEEN_HEADING, render_unseen(rows, notes, args.unseen)
    publish(args, heading, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
