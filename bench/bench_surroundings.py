"""Robustness to a full field of view: Dice on real CTs as they are, padded with air, and with arms and a table drawn around the patient.

    python bench/bench_surroundings.py [--model NAME=PACKAGE ...] [--scans example_ct_sm tcia_ccth_a01] [--seeds 0 1 2]

Why: a label map ends at the skin and the real training CTs here are cropped to the body, while
a user's CT shows the table and often the arms. The DICOM slab (the one CT here with both) hid
its spleen from every model that had not trained on it (docs/synthesis.md, round 20). This bench
takes real CTs cropped to the body, pads them in-plane with air (100 mm a side, 64 mm front and
back), then draws arms and a table into that air with the training generator
(:meth:`volumed.data.synthesis.CTSynthesizer.add_surroundings`, one draw per seed), and scores
each package's masks of the issue's target structures (post-processed as ``predict_probabilities``
does: components and body mask) on the scan's original voxels.

Read it with two caveats: the scans are training scans of the default models (this measures
robustness to what surrounds the patient, not generalisation to a new patient), and the
surroundings come from the generator that ``--data.synthetic_surroundings`` trains with, so a
model trained with it is favoured; the DICOM slab's real arms and table are the honest test
(``bench/bench_generalisation.py``, variant ``M-hw-ft-s``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import bench_parser, machine_description, publish  # noqa: E402

HEADING = "## Robustness: arms and a table around the patient"
PAD_SIDE_MM, PAD_FRONT_BACK_MM = 100.0, 64.0


def pad_in_plane(volume, side_mm: float = PAD_SIDE_MM, front_back_mm: float = PAD_FRONT_BACK_MM):
    """``volume`` padded with air (-1000 HU) along its first two axes, and the original voxels' slices."""
    spacing = np.asarray(volume.spacing)
    px, py = int(round(side_mm / spacing[0])), int(round(front_back_mm / spacing[1]))
    data = np.pad(volume.data, ((px, px), (py, py), (0, 0)), constant_values=-1000.0)
    affine = volume.affine.copy()
    affine[:3, 3] -= affine[:3, 0] * px + affine[:3, 1] * py
    where = (slice(px, px + volume.shape[0]), slice(py, py + volume.shape[1]), slice(0, volume.shape[2]))
    return replace(volume, data=data.astype(np.float32), affine=affine), where


def with_surroundings(padded, seed: int):
    """``padded`` with arms and a table drawn in the air around its body (the training generator)."""
    from volumed.data.synthesis import BODY_CLASSES, CTSynthesizer
    from volumed.inference.body import body_mask

    body = body_mask(padded)
    # The generator works on RAS voxel order (low y posterior): flip the axes that run the other way.
    flips = [a for a in range(3) if padded.affine[a, a] < 0]
    classes = torch.from_numpy(np.flip(body, flips).astype(np.int16).copy())[None]
    synth = CTSynthesizer([t for _, t in BODY_CLASSES], padded.spacing, deform_mm=0.0, seed=seed, surroundings=1.0,
                          class_names=[n for n, _ in BODY_CLASSES])
    attenuation = torch.from_numpy(np.flip(padded.data, flips).copy() + 1000.0)[None]
    drawn = synth.add_surroundings(attenuation, classes, {})[0].numpy() - 1000.0
    return replace(padded, data=np.flip(drawn, flips).astype(np.float32).copy())


def scores(package: Path, scans: list[str], seeds: list[int]) -> dict:
    """``{scan: {"as_is"|"padded"|"seed<k>": {term: dice}}}`` of one package."""
    import bench_generalisation as bg
    from volumed.tasks.promptseg import predict_probabilities

    model, config, found = bg.target_scans(package, scans)
    out: dict = {}
    for ts in found:
        scan, volume, refs, terms, emb = ts.name, ts.volume, ts.refs, ts.terms, ts.embeddings

        def dice_of(v, where) -> dict:
            p = predict_probabilities(model, config, v, terms, emb) > config.threshold
            p = p[(slice(None), *where)]
            return {t: round(float(bg.dice(p[i], refs[t])), 3) for i, t in enumerate(terms)}

        whole = tuple(slice(0, s) for s in volume.shape)
        padded, where = pad_in_plane(volume)
        out[scan] = {"as_is": dice_of(volume, whole), "padded": dice_of(padded, where)}
        for seed in seeds:
            out[scan][f"seed{seed}"] = dice_of(with_surroundings(padded, seed), where)
        print(package, scan, out[scan], flush=True)
    return out


def report(results: dict, seeds: list[int], command: str) -> str:
    lines = [HEADING, "", f"Written by `{command}` ({machine_description()}, {time.strftime('%Y-%m-%d')}).", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "Dice of each target structure: as the scan is, padded with air, and with arms and a table drawn "
             f"(mean and lowest over seeds {', '.join(map(str, seeds))}).", "",
             "| model | scan | structure | as is | padded | arms and table: mean | lowest |", "|---|---|---|---:|---:|---:|---:|"]
    for name, per_scan in results.items():
        for scan, runs in per_scan.items():
            for term in runs["as_is"]:
                drawn = [runs[f"seed{s}"][term] for s in seeds]
                lines.append(f"| {name} | {scan} | {term} | {runs['as_is'][term]:.3f} | {runs['padded'][term]:.3f} | "
                             f"{np.mean(drawn):.3f} | {min(drawn):.3f} |")
            means = {k: np.mean(list(v.values())) for k, v in runs.items()}
            drawn = np.mean([means[f"seed{s}"] for s in seeds])
            lines.append(f"| {name} | {scan} | **mean** | {means['as_is']:.3f} | {means['padded']:.3f} | {drawn:.3f} | "
                         f"{min(means[f'seed{s}'] for s in seeds):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, REPO / "BENCHMARKS.md")
    parser.add_argument("--model", action="append", default=None,
                        help="NAME=PACKAGE (repeatable; default: the default bundle)")
    parser.add_argument("--scans", nargs="*", default=["example_ct_sm", "tcia_ccth_a01"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in (args.model or ["default bundle=bundles/volumed_promptseg_ct/models"]))
    results = {name: scores(REPO / path, args.scans, args.seeds) for name, path in models.items()}
    command = "python bench/bench_surroundings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(args, HEADING, report(results, args.seeds, command.strip()))


if __name__ == "__main__":
    main()
