"""Robustness to exported crops: Dice on real CTs cut to a box of tissue, against the same scan whole.

    python bench/bench_box_crop.py [--model NAME=PACKAGE ...] [--loso NAME=VARIANT ...]
        [--scans example_ct_sm tcia_ccth_a01 dicom_slab] [--sizes 150 200]

Why: scans are often exported as a crop around an organ (the thorax crop of ../shared/data is
an 18 cm box round the heart; the issue's chest CTA is one round the aorta). Inference pads such
a scan with air in-plane and mirrors it along the slices when it is thinner than the patch, so the
network sees straight edges of tissue in air that no whole-field CT shows. A leave-one-out model
that found tcia_ccth_a01's liver at 0.874 found it at 0.599, and both lower lobes not at all, once
the scan was cut to an 18 cm box round the liver (docs/synthesis.md, round 21).

For each scan and each anchor structure, the scan is cut to a cube of ``size`` mm centred on the
anchor's centre (clipped to the scan; along the slices the whole scan when it is shorter). Each
target structure with at least 5 mL inside the box is scored inside the box: the mask predicted
on the box alone (``cropped``) and the mask predicted on the whole scan, restricted to the box
(``whole``), both post-processed as ``predict_probabilities`` does (components, body mask).

``--model`` scores a package on every scan (for the default bundle those are training scans: this
measures robustness to the crop, not generalisation); ``--loso NAME=VARIANT`` scores, on each scan,
the leave-one-out package of ``runs/generalisation/VARIANT`` that never saw it: the honest test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import bench_parser, machine_description, publish  # noqa: E402

HEADING = "## Robustness: scans exported as a crop"
ANCHORS = {
    "example_ct_sm": ("liver", "kidney_left", "spleen"),
    "tcia_ccth_a01": ("liver", "lung_lower_lobe_right", "lung_upper_lobe_left"),
    "dicom_slab": ("liver", "spleen"),
    "thorax_crop": ("heart",),
}
MIN_ML = 5.0


def box_around(volume, mask: np.ndarray, size_mm: float) -> tuple[slice, slice, slice]:
    """Voxel slices of a cube of ``size_mm`` centred on ``mask``'s centre, clipped to the scan."""
    centre = np.argwhere(mask).mean(0)
    out = []
    for c, s, n in zip(centre, volume.spacing, volume.shape):
        half = 0.5 * size_mm / float(s)
        lo, hi = int(round(c - half)), int(round(c + half))
        lo, hi = max(0, lo), min(n, hi)
        out.append(slice(lo, hi))
    return tuple(out)  # type: ignore[return-value]


def scores(package: Path, scans: list[str], sizes: list[float]) -> dict:
    """``{scan: {f"{anchor}@{size}": {term: {"whole": d, "cropped": d}}}}`` of one package."""
    import bench_generalisation as bg
    from volumed.tasks.promptseg import predict_probabilities

    model, config, found = bg.target_scans(package, scans)
    out: dict = {}
    for ts in found:
        scan, volume, refs, terms, emb = ts.name, ts.volume, ts.refs, ts.terms, ts.embeddings
        whole = predict_probabilities(model, config, volume, terms, emb) > config.threshold
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        out[scan] = {}
        for anchor in ANCHORS.get(scan, ()):
            if anchor not in refs or not refs[anchor].any():
                continue
            for size in sizes:
                box = box_around(volume, refs[anchor], size)
                kept = [t for t in terms if refs[t][box].sum() * voxel_ml >= MIN_ML]
                if not kept:
                    continue
                sub = volume.crop(box)
                cropped = predict_probabilities(model, config, sub, kept, emb[[terms.index(t) for t in kept]]) > config.threshold
                row = {}
                for i, t in enumerate(kept):
                    ref = refs[t][box]
                    row[t] = {"whole": round(float(bg.dice(whole[terms.index(t)][box], ref)), 3),
                              "cropped": round(float(bg.dice(cropped[i], ref)), 3)}
                out[scan][f"{anchor}@{size:g}"] = row
                print(package, scan, anchor, size, sub.shape, row, flush=True)
    return out


def summary(results: dict) -> list[str]:
    """Mean Dice per model and scan, whole scan against the box alone (the detail follows)."""
    scans = list(dict.fromkeys(scan for per_scan in results.values() for scan in per_scan))
    lines = ["| model | " + " | ".join(scans) + " | all |", "|---|" + "---:|" * (len(scans) + 1)]
    for name, per_scan in results.items():
        cells, every_w, every_c = [], [], []
        for scan in scans:
            pairs = [(d["whole"], d["cropped"]) for row in per_scan.get(scan, {}).values() for d in row.values()]
            every_w += [w for w, _ in pairs]
            every_c += [c for _, c in pairs]
            cells.append(f"{np.mean([w for w, _ in pairs]):.3f} / {np.mean([c for _, c in pairs]):.3f} ({len(pairs)})" if pairs else "-")
        total = f"{np.mean(every_w):.3f} / **{np.mean(every_c):.3f}** ({len(every_w)})" if every_w else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {total} |")
    return lines


def report(results: dict, command: str) -> str:
    lines = [HEADING, "", f"Written by `{command}` ({machine_description()}, {time.strftime('%Y-%m-%d')}).", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "Mean target Dice, whole scan in the box / the box alone (number of scores):", "",
             *summary(results), "",
             "| model | scan | box (anchor @ mm) | structure | whole scan, in the box | the box alone |",
             "|---|---|---|---|---:|---:|"]  # fmt: skip
    for name, per_scan in results.items():
        for scan, boxes in per_scan.items():
            for box, row in boxes.items():
                for term, d in row.items():
                    lines.append(f"| {name} | {scan} | {box} | {term} | {d['whole']:.3f} | {d['cropped']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, REPO / "BENCHMARKS.md")
    parser.add_argument("--model", action="append", default=None, help="NAME=PACKAGE (repeatable)")
    parser.add_argument("--loso", action="append", default=None,
                        help="NAME=VARIANT: each scan scored with runs/generalisation/VARIANT/loso_<scan>/package (repeatable)")
    parser.add_argument("--scans", nargs="*", default=["example_ct_sm", "tcia_ccth_a01", "dicom_slab"])
    parser.add_argument("--sizes", nargs="*", type=float, default=[150.0, 200.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in (args.model or []))
    if not models and not args.loso:
        models = {"default bundle": "bundles/volumed_promptseg_ct/models"}
    results = {name: scores(REPO / path, args.scans, args.sizes) for name, path in models.items()}
    for spec in args.loso or []:
        name, variant = spec.split("=", 1)
        merged: dict = {}
        for scan in args.scans:
            package = REPO / "runs" / "generalisation" / variant / f"loso_{scan}" / "package"
            if not (package / "model.safetensors").is_file():
                raise SystemExit(f"{package}: no leave-one-out package for {scan} (train it with bench/bench_generalisation.py)")
            merged.update(scores(package, [scan], args.sizes))
        results[name] = merged
    command = "python bench/bench_box_crop.py " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(args, HEADING, report(results, command.strip()))


if __name__ == "__main__":
    main()
