"""Build the lung lobe atlas (:mod:`volumed.data.lobe_atlas`) from the datalist's subjects, write
it to ``volumed/data/lobe_atlas.npz``, and measure it on lungs it never saw.

Usage::

    python bench/bench_lobe_atlas.py [--datalist configs/datalists/promptseg_ct_all.json] [--no-write]

The atlas counts the lobes of the ``synthetic`` section's label maps that have them (the
TotalSegmentator v2 subjects s0327 and s0328) and of the real CTs whose reference holds all five
lobes (tcia_ccth_a01): :func:`volumed.data.lobe_atlas.atlas_subjects`. The measure: each voxel of
a subject's *reference* lungs (the union of its reference lobes, on its own grid) gets the atlas's
most likely lobe of its side; Dice against the reference lobes. It isolates the atlas from the
outline (which ``volumed segment`` takes from the image's air). Each atlas subject is measured
with the atlas of the others (leave one subject out); the real CTs with lobes that are not atlas
subjects (example_ct_sm's lung bases) with the shipped atlas. Lobes under 1 mL are not scored.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import bench_parser, machine_description, publish  # noqa: E402
from bench_promptseg_dice import dice, reference_masks  # noqa: E402

from volumed.data.lobe_atlas import ATLAS_PATH, BINS, LOBES, SIDES, W_MAX, atlas_subjects, build_atlas, lobe_prior, save_atlas  # noqa: E402

HEADING = "## Lung lobe atlas"
DATALIST = REPO / "configs" / "datalists" / "promptseg_ct_all.json"
SHORT = {"lung_upper_lobe_left": "upper left", "lung_lower_lobe_left": "lower left",
         "lung_upper_lobe_right": "upper right", "lung_middle_lobe_right": "middle right",
         "lung_lower_lobe_right": "lower right"}  # fmt: skip


def real_subjects(datalist: Path) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray, float]]:
    """``{name: (reference lobe masks, affine, mL per voxel)}`` of the real CTs with a lobe, on their original grids."""
    from volumed.io import read_volume
    from volumed.tasks.promptseg import load_promptseg_datalist

    out = {}
    for src in load_promptseg_datalist(datalist, allow_free_text=True):
        volume = read_volume(src.image, modality=src.modality)
        refs = reference_masks(src, volume, list(LOBES))
        if refs:
            name = src.image.parent.name if src.image.name.startswith("ct") else src.image.name.split(".")[0]
            out[name] = (refs, np.asarray(volume.affine), float(np.prod(volume.spacing)) / 1000.0)
    return out


def partition_dice(atlas, masks: dict[str, np.ndarray], affine: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Dice of each lobe (1 mL or more) when the reference lungs are split by the atlas alone."""
    scores = {}
    for side, lobes in SIDES.items():
        lung = np.any([masks[n] for n in lobes if n in masks] or [np.zeros(next(iter(masks.values())).shape, bool)], axis=0)
        if not lung.any():
            continue
        index = np.argwhere(lung)
        choice = lobe_prior(index @ affine[:3, :3].T + affine[:3, 3], side, atlas).argmax(axis=0)
        for k, name in enumerate(lobes):
            ref = masks.get(name)
            if ref is None or ref.sum() * voxel_ml < 1.0:
                continue
            pred = np.zeros(lung.shape, dtype=bool)
            pred[tuple(index[choice == k].T)] = True
            scores[name] = dice(pred, ref)
    return scores


def main() -> None:
    parser = bench_parser(__doc__, REPO / "BENCHMARKS.md")
    parser.add_argument("--datalist", type=Path, default=DATALIST)
    parser.add_argument("--atlas", type=Path, default=ATLAS_PATH, help="where to write the atlas")
    args = parser.parse_args()
    start = time.perf_counter()
    subjects = atlas_subjects(args.datalist)
    if len(subjects) < 2:
        raise SystemExit(f"{args.datalist}: {len(subjects)} subject(s) with lung lobes, the atlas needs two")
    atlas = build_atlas(subjects.values())
    save_atlas(atlas, args.atlas, sources=", ".join(subjects))
    print(f"wrote {args.atlas} from {', '.join(subjects)}", flush=True)
    rows = []
    for name, (masks, affine) in subjects.items():
        others = [n for n in subjects if n != name]
        scores = partition_dice(build_atlas(subjects[n] for n in others), masks, affine,
                                float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0)
        rows.append((f"{name} (left out: atlas of {', '.join(others)})", scores))
        print(name, "left out", {SHORT[t]: round(v, 3) for t, v in scores.items()}, flush=True)
    for name, (masks, affine, voxel_ml) in real_subjects(args.datalist).items():
        if name in subjects:
            continue
        scores = partition_dice(atlas, masks, affine, voxel_ml)
        rows.append((f"{name} (not an atlas subject: the shipped atlas)", scores))
        print(name, {SHORT[t]: round(v, 3) for t, v in scores.items()}, flush=True)
    unseen = [np.mean(list(sc.values())) for label, sc in rows if sc]
    lines = [
        "Command: `python bench/bench_lobe_atlas.py`", "",
        f"Machine: {machine_description()}; {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s.", "",
        f"The atlas (`volumed/data/lobe_atlas.npz`, {BINS[0]} x {BINS[1]} x {BINS[2]} bins of medial-lateral, "
        f"anterior-posterior and height above the lung's base over its depth, up to {W_MAX}) counts the lobes "
        f"of {', '.join(subjects)} (each lung weighs the same). `volumed segment` uses it to split each lung it "
        "outlined from the image's air into lobes (docs/segment.md, \"Lung lobes\").", "",
        "Dice when each voxel of the *reference* lungs gets the atlas's most likely lobe of its side (the "
        "atlas alone, the outline given; lobes under 1 mL not scored), on lungs the atlas did not count: "
        f"mean over the rows {np.mean(unseen):.3f}.", "",
        "| scan | " + " | ".join(SHORT[t] for t in LOBES) + " | mean |",
        "| --- |" + " ---: |" * (len(LOBES) + 1),
    ]
    for label, scores in rows:
        cells = [f"{scores[t]:.3f}" if t in scores else "-" for t in LOBES]
        mean = f"{np.mean(list(scores.values())):.3f}" if scores else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
    publish(args, HEADING, HEADING + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
