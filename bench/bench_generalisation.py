"""Does the text-prompted segmenter work on CTs it has never seen? Leave-one-scan-out, synthetic-only
and HU-threshold baselines, one command.

Usage::

    python bench/bench_generalisation.py --train [--jobs 2] [--variant S] [--only loso_tcia_ccth_a01 ...]
    python bench/bench_generalisation.py            # evaluate the runs that exist, write BENCHMARKS.md

Runs (``--runs``, default ``runs/generalisation/<variant>/``), each trained with the default recipe
(``configs/train_promptseg-cpu.yaml``, the same data mix as the default model) and one override:

* ``loso_<scan>``: without one of the four real CTs of ``configs/datalists/promptseg_ct_all.json``
  (``--data.exclude``), tested on it;
* ``synthetic_only``: only the label maps of the datalist's ``synthetic`` section
  (``--data.real false``), tested on all four real CTs.

A variant is a model size (``VARIANTS``: encoder and decoder widths), for the size-against-Dice
trade-off, or a recipe (``S-ft``: S fine-tuned from the S synthetic-only run with 70 % synthetic
patches); "Recipes compared" in BENCHMARKS.md puts every variant's folds side by side.

Each test goes through the path of ``volumed segment`` (``predict_probabilities``: the
package's preprocessing, sliding window, exact blending, inversion to the scan's original grid,
threshold); Dice is taken on the original grid against the scan's reference masks (MONAI
``compute_dice``). References under 1 mL are listed, not scored. A second figure per structure
("as ``volumed segment --all`` writes it", ``dice_segment`` in the json; from 2026-12-05 on) is
of the masks the command writes: every term of the package prompted, then its post-processing
(largest component, masks kept inside the body, the presence rule, the anatomy check, and from
2026-12-06 the lobes filled to the lungs' air and split by the lobe atlas), which the first
figure leaves out. The lobe atlas counts tcia_ccth_a01's reference lobes, so a scan that is one
of its subjects is tested with an atlas of the others (:mod:`volumed.data.lobe_atlas`): the
atlas never saw the scan either.

The HU-threshold baseline is what a tuned threshold plus the largest connected component can do,
for the structures where that makes sense: the contrast-filled aorta and heart, the lungs (the
union of the five lobes: no threshold tells lobes apart) and the femurs. The thresholds are tuned
*on the test scan itself* (the best of a grid), so the baseline is an optimistic one.

Everything goes to BENCHMARKS.md under "## Generalisation: unseen scans". The scores, with what
each run was (steps, minutes, recipe overrides, parameters), are kept in the tracked
``bench/results/generalisation_<variant>.json``: a fold takes hours to train and ``runs/`` is not
kept between sessions, so evaluating some runs keeps the others' numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _report import machine_description, write_section  # noqa: E402
from bench_promptseg_dice import dice, reference_masks  # noqa: E402

HEADING = "## Generalisation: unseen scans"
RECIPE = REPO / "configs" / "train_promptseg-cpu.yaml"
RESULTS = REPO / "bench" / "results"
DATALIST = REPO / "configs" / "datalists" / "promptseg_ct_all.json"

#: The real CTs of the datalist, by a short name and the string that picks their entry.
SCANS: dict[str, str] = {
    "example_ct_sm": "example_ct_sm.nii.gz",
    "dicom_slab": "example_ct_dicom",
    "thorax_crop": "pulmonary/ct_cropped.nii.gz",
    "tcia_ccth_a01": "tcia_ccth_a01",
}
#: The issue's targets: leave-one-out Dice at least this, on every left-out scan that has them.
TARGETS: dict[str, float] = {
    "liver": 0.80, "spleen": 0.75, "kidney_left": 0.75, "kidney_right": 0.75, "aorta": 0.75, "heart": 0.75,
    "lung_upper_lobe_left": 0.75, "lung_lower_lobe_left": 0.75, "lung_upper_lobe_right": 0.75,
    "lung_middle_lobe_right": 0.75, "lung_lower_lobe_right": 0.75,
}  # fmt: skip
LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")

#: Model sizes (command-line overrides of the recipe). S is the recipe's own (2.0 M parameters,
#: 8 MB); M doubles the encoder's first widths and widens the decoder (5.0 M, 20 MB: the largest
#: that stays under the 25 MB a committed model may weigh, in float32).
VARIANTS: dict[str, list[str]] = {
    "S": [],
    "M": [
        "--model.encoder_kwargs", json.dumps({"channels": [16, 32, 64, 128, 192, 192],
                                              "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1]]}),
        "--model.decoder_kwargs", json.dumps({"embed_dim": 96, "num_layers": 2, "num_heads": 8, "pixel_dim": 32,
                                              "num_memory_levels": 2, "pixel_levels": [1, 2, 3, 4, 5]}),
    ],
    # A recipe rather than a size: S, started from the S synthetic-only run's weights (a model that
    # saw no real CT, so every fold stays honest) and fine-tuned on the mix with 70% of the patches
    # synthetic (docs/synthesis.md, round 9). Needs runs/generalisation/S/synthetic_only first.
    "S-ft": [
        "--model.init_weights", "runs/generalisation/S/synthetic_only/package/model.safetensors",
        "--model.lr", "1.5e-3", "--model.warmup_steps", "50", "--data.synthetic_share", "0.7",
    ],
}  # fmt: skip
# The same recipe at size M, from the M synthetic-only run (docs/synthesis.md, round 11).
VARIANTS["M-ft"] = [*VARIANTS["M"], "--model.init_weights", "runs/generalisation/M/synthetic_only/package/model.safetensors",
                    *VARIANTS["S-ft"][2:]]
# A second phase after M-ft with 70% real patches (docs/synthesis.md, round 12): each fold starts
# from its own M-ft fold ("{run}" is the run's name), so it still never saw the left-out scan.
VARIANTS["M-ft2"] = [*VARIANTS["M"], "--model.init_weights", "runs/generalisation/M-ft/{run}/package/model.safetensors",
                     "--model.lr", "1.0e-3", "--model.warmup_steps", "20", "--data.synthetic_share", "0.3"]
# Size M with the synthetic heart drawn as contrast blood inside a darker wall and septum, and
# the heart's arterial prior up to 600 HU (docs/synthesis.md, round 14); the prior is the module's,
# so earlier variants' stored figures were measured with 200-450 HU.
VARIANTS["M-hw"] = [*VARIANTS["M"], "--data.synthetic_heart_wall", "true"]
# M-ft's recipe from the M-hw synthetic-only model, the heart wall kept on.
VARIANTS["M-hw-ft"] = [*VARIANTS["M-hw"], "--model.init_weights", "runs/generalisation/M-hw/synthetic_only/package/model.safetensors",
                       *VARIANTS["S-ft"][2:]]
# M-hw-ft with weaker contrast drawn too: a contrast patch enhances by 40-100 % of its phase's prior
# over native (docs/synthesis.md, round 16: the DICOM slab's spleen, 80 HU beside a 93 HU liver,
# lies between the native and portal spleen priors, and no model has found it).
VARIANTS["M-hw-ft-e"] = [*VARIANTS["M-hw-ft"], "--data.synthetic_enhancement", "[0.4, 1.0]"]
# M-hw-ft with arms beside half of the synthetic trunks and a table under half of them
# (docs/synthesis.md, round 20: the arms and table of the DICOM slab hid its spleen from every
# model that had not trained on that scan).
VARIANTS["M-hw-ft-s"] = [*VARIANTS["M-hw-ft"], "--data.synthetic_surroundings", "0.5"]
# M-hw-ft-s with a quarter of the patches, real and synthetic, cut to a box of 10-30 cm in air, as
# an exported crop is (docs/synthesis.md, round 21: the thorax crop's heart, and a real CT cut to
# an 18 cm box lost its liver and lower lobes).
VARIANTS["M-hw-ft-sb"] = [*VARIANTS["M-hw-ft-s"], "--data.box_crop", "0.25"]
# M-hw-ft-s with half the patches cut to a box: does more of it close the thorax crop's heart?
VARIANTS["M-hw-ft-sb5"] = [*VARIANTS["M-hw-ft-s"], "--data.box_crop", "0.5"]
# M-hw-ft-sb with 12-20 cm of thighs drawn below s0327, the one label map that ends across the
# femoral shafts: no training source reached mid-thigh, and every fold called tcia_ccth_a01's
# femoral shafts "hip" (docs/synthesis.md, round 21).
VARIANTS["M-hw-ft-sbt"] = [*VARIANTS["M-hw-ft-sb"], "--data.synthetic_thighs", "true"]
# M-ft2's second phase (30% synthetic patches, lr 1e-3) from each fold's own M-hw-ft model, heart
# wall on (docs/synthesis.md, round 15).
VARIANTS["M-hw-ft2"] = [*VARIANTS["M-hw"], "--model.init_weights", "runs/generalisation/M-hw-ft/{run}/package/model.safetensors",
                        *VARIANTS["M-ft2"][-6:]]


@dataclass(frozen=True)
class Run:
    name: str
    args: list[str]
    test_scans: tuple[str, ...]


def runs(variant: str | None = None) -> list[Run]:
    """The leave-one-scan-out folds and the synthetic-only run; a variant that mixes real and
    synthetic patches (``--data.synthetic_share``, the fine-tuning recipes) has no synthetic-only
    run: the recipe refuses one without real cases."""
    out = [Run(f"loso_{s}", ["--data.exclude", json.dumps([pick])], (s,)) for s, pick in SCANS.items()]
    if variant is None or "--data.synthetic_share" not in VARIANTS[variant]:
        out.append(Run("synthetic_only", ["--data.real", "false"], tuple(SCANS)))
    return out


# ----------------------------------------------------------------------------------- training


def train(selected: list[Run], variant: str, root: Path, jobs: int, extra: list[str], threads: int | None = None) -> None:
    """Train the runs whose package does not exist yet, ``jobs`` at a time (``threads`` each, by
    default the cores shared out between the jobs)."""
    todo = [r for r in selected if not (root / r.name / "package" / "model.safetensors").exists()]
    running: list[tuple[Run, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < jobs:
            run = todo.pop(0)
            out = root / run.name
            out.mkdir(parents=True, exist_ok=True)
            n = threads or max(1, (os.cpu_count() or 2) // jobs)
            cmd = [sys.executable, "-m", "volumed.cli", "train", "promptseg", "--config", str(RECIPE), "--out", str(out),
                   "--package_dir", str(out / "package"), "--num_threads", str(n),
                   *(a.replace("{run}", run.name) for a in VARIANTS[variant]), *run.args, *extra]
            print("train:", " ".join(cmd), flush=True)
            log = open(out / "train.log", "w")
            running.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO), time.time()))
        time.sleep(10)
        for item in list(running):
            run, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see {root / run.name / 'train.log'})"
                print(f"{run.name}: {status} in {(time.time() - start) / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------------- evaluation


def _sources():
    from volumed.tasks.promptseg import load_promptseg_datalist

    sources = load_promptseg_datalist(DATALIST, allow_free_text=True)
    return {name: next(s for s in sources if pick in str(s.image)) for name, pick in SCANS.items()}


@dataclass
class TargetScan:
    """One real scan with the package's target terms it annotates (for the robustness benches)."""

    name: str
    volume: object
    refs: dict
    terms: list[str]
    embeddings: torch.Tensor


def target_scans(package: Path, scans: list[str]):
    """``(model, config)`` of ``package`` and, lazily, a :class:`TargetScan` for each of ``scans``
    that annotates at least one of its target terms (:data:`TARGETS`)."""
    from volumed.inference.package import load_package
    from volumed.io import read_volume
    from volumed.tasks.promptseg import encode_terms

    model, config = load_package(package)
    sources = _sources()

    def each():
        for scan in scans:
            src = sources[scan]
            volume = read_volume(src.image, modality=src.modality)
            refs = reference_masks(src, volume, list(config.terms))
            terms = [t for t in config.terms if t in refs and t in TARGETS and refs[t].any()]
            if terms:
                yield TargetScan(scan, volume, refs, terms, encode_terms(terms, config.text_model)[0])

    return model, config, each()


def evaluate(package: Path, scans: tuple[str, ...], min_ml: float = 1.0, preview_dir: Path | None = None,
             threshold: float | None = None) -> dict:
    """``{scan: {"dice": {term: value}, "dice_segment": {...}, "present_ml": {term: mL}, "too_small": {...},
    "seconds": s}}`` of one package. ``present_ml``: every term `volumed segment --all` reports
    present, with its volume. ``threshold`` replaces the package's mask threshold."""
    from dataclasses import replace

    from volumed.inference.package import load_package
    from volumed.inference.segment import PromptSegPredictor
    from volumed.io import read_volume
    from volumed.tasks.promptseg import encode_terms, predict_probabilities

    from volumed.data.lobe_atlas import atlas_subjects, build_atlas

    model, config = load_package(package)
    if threshold is not None:
        config = replace(config, threshold=float(threshold))
    predictor = PromptSegPredictor(model, config)
    sources = _sources()
    subjects = atlas_subjects(DATALIST)
    out: dict = {}
    for scan in scans:
        # The lobe atlas without the scan, where the scan is one of its subjects.
        predictor.lobe_atlas = build_atlas(v for n, v in subjects.items() if n != scan) if scan in subjects else None
        src = sources[scan]
        volume = read_volume(src.image, modality=src.modality)
        refs = reference_masks(src, volume, [t for t in config.terms])
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        small = {t: f"{m.sum() * voxel_ml:.2f} mL" for t, m in refs.items() if m.sum() * voxel_ml < min_ml}
        refs = {t: m for t, m in refs.items() if t not in small}
        terms = [t for t in config.terms if t in refs]
        emb, _ = encode_terms(terms, config.text_model)
        start = time.perf_counter()
        probs = predict_probabilities(model, config, volume, terms, emb)
        seconds = time.perf_counter() - start
        pred = {t: probs[i] > config.threshold for i, t in enumerate(terms)}
        scores = _scores(pred, refs, terms)
        # What `volumed segment --all` writes: every term of the package prompted at once, then
        # its post-processing (largest component, the body mask, the presence rule, the anatomy
        # check against the other found structures). `--all` prompts the vocabulary's trained
        # terms only, so a trained free text (the crop's "pulmonary artery") has no such figure.
        every = predictor.resolve_prompts([], volume.modality, all_terms=True)
        written = predictor.predict(volume, every)
        kept = {t.name: np.asarray(m, dtype=bool) for t, m in zip(every, written.masks) if t.name in refs}
        present = {t.name: round(float(np.count_nonzero(np.asarray(m, dtype=bool))) * voxel_ml, 1) for t, m in zip(every, written.masks)}
        out[scan] = {"dice": scores, "dice_segment": _scores(kept, refs, [t for t in terms if t in kept]),
                     "present_ml": {t: v for t, v in present.items() if v > 0},
                     "too_small": small, "seconds": round(seconds, 1)}
        if preview_dir is not None:
            from volumed.inference.preview import render_preview

            # What a user sees: the label map `volumed segment --all` writes (every trained term,
            # post-processed), not the raw thresholded maps of the scored terms.
            preview_dir.mkdir(parents=True, exist_ok=True)
            render_preview(volume, preview_dir / f"{scan}.png", label=np.asarray(written.label_map), overwrite=True,
                           label_names={i: t.name for i, t in enumerate(every, 1)},
                           title=f"{package.parent.name} on {scan}, as volumed segment --all writes it")
        print(package.parent.name, scan, {t: round(v, 3) for t, v in scores.items()}, f"{seconds:.1f} s", flush=True)
    return out


def _scores(pred: dict, refs: dict, terms: list[str]) -> dict:
    """Dice of each term's mask, plus the lungs as one (the union of the lobes) where there are two
    or more lobes."""
    scores = {t: dice(pred[t], refs[t]) for t in terms}
    lobes = [t for t in LOBES if t in refs]
    if len(lobes) >= 2:
        scores["lungs (union of lobes)"] = dice(np.any([pred[t] for t in lobes], axis=0),
                                                np.any([refs[t] for t in lobes], axis=0))
    return scores


# ------------------------------------------------------------------------------ HU baselines


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(sizes.argmax()) + 1)


def _lungs_by_threshold(hu: np.ndarray, t: float) -> np.ndarray:
    """Air below ``t`` HU not connected to the image's side faces (the air around the patient;
    the top and bottom faces cut through the body and often through the lungs), the two largest
    components (the lungs; one if they touch). Arrays are (X, Y, Z) with Z the slice axis."""
    air = hu < t
    lab, n = ndimage.label(air)
    border = np.unique(np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel()]))
    inside = air & ~np.isin(lab, border)
    lab, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:2] + 1
    return np.isin(lab, keep)


def baselines(scans: tuple[str, ...]) -> dict:
    """``{scan: {structure: (dice, rule)}}`` of the tuned HU thresholds (module docstring)."""
    from volumed.io import read_volume

    sources = _sources()
    out: dict = {}
    for scan in scans:
        src = sources[scan]
        volume = read_volume(src.image, modality=src.modality)
        hu = np.asarray(volume.data, dtype=np.float32)
        refs = reference_masks(src, volume, ["aorta", "heart", "femur_left", "femur_right", "pulmonary artery", *LOBES])
        res: dict = {}
        # Contrast-filled blood pool: a window [lo, hi] HU, then the largest component.
        for t in ("aorta", "heart", "pulmonary artery"):
            if t not in refs:
                continue
            inside = float(np.median(hu[refs[t]]))
            if inside < 120:  # not a contrast scan: no threshold separates blood from soft tissue
                continue
            best = (0.0, "")
            for lo in range(100, 401, 25):
                for hi in (500, 700, 1000, 1500):
                    d = dice(_largest_component((hu >= lo) & (hu <= hi)), refs[t])
                    best = max(best, (d, f"{lo} <= HU <= {hi}, largest component"))
            res[t] = best
        lobes = [t for t in LOBES if t in refs]
        if len(lobes) >= 2:
            union = np.any([refs[t] for t in lobes], axis=0)
            best = (0.0, "")
            for t in range(-700, -249, 50):
                best = max(best, (dice(_lungs_by_threshold(hu, t), union), f"HU < {t}, inside the body, 2 largest components"))
            res["lungs (union of lobes)"] = best
        for t in ("femur_left", "femur_right"):
            if t not in refs:
                continue
            # Bone above a threshold, on the structure's side of the body's mid-plane (x in RAS).
            ras_x = volume.voxel_to_world(np.c_[np.arange(volume.shape[0]), np.zeros(volume.shape[0]), np.zeros(volume.shape[0])])[:, 0]
            body = hu > -300
            mid = float(np.average(ras_x, weights=body.sum((1, 2)) + 1e-6))
            side = (ras_x > mid) if t.endswith("right") else (ras_x < mid)  # RAS: +x points to the patient's right
            half = np.zeros_like(body)
            half[side] = True
            best = (0.0, "")
            for lo in range(100, 501, 50):
                best = max(best, (dice(_largest_component((hu >= lo) & half), refs[t]), f"HU >= {lo} on its side, largest component"))
            res[t] = best
        out[scan] = res
        print("baseline", scan, {k: round(v[0], 3) for k, v in res.items()}, flush=True)
    return out


# ------------------------------------------------------------------------------------- report


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _dice_cell(term: str, v: float | None) -> str:
    """A Dice value, bold where it meets the term's target."""
    return f"**{v:.3f}**" if v is not None and term in TARGETS and v >= TARGETS[term] else _fmt(v)


VARIANT_TEXT = {
    "S": "the default recipe from scratch (size S)",
    "M": "the default recipe from scratch (size M)",
    "S-ft": "size S fine-tuned from the S synthetic-only model with 70% synthetic patches",
    "M-ft": "size M fine-tuned from the M synthetic-only model with 70% synthetic patches",
    "M-ft2": "M-ft, then a second phase with 70% real patches (lr 1e-3) from each fold's M-ft model",
    "M-hw-ft2": "M-hw-ft, then M-ft2's second phase (30% synthetic patches, lr 1e-3) from each fold's M-hw-ft model",
    "M-hw-ft": "M-ft's recipe (70% synthetic patches) from the M-hw synthetic-only model, heart wall on",
    "M-hw-ft-e": "M-hw-ft with synthetic contrast patches enhanced by 40-100 % of their phase's prior over native",
    "M-hw-ft-s": "M-hw-ft with arms beside half of the synthetic trunks and a table under half of them",
    "M-hw-ft-sb": "M-hw-ft-s with a quarter of the patches, real and synthetic, cut to a box of 10-30 cm in air "
                  "(`--data.box_crop 0.25`)",
    "M-hw-ft-sb5": "M-hw-ft-s with half of the patches cut to a box of 10-30 cm in air (`--data.box_crop 0.5`)",
    "M-hw-ft-sbt": "M-hw-ft-sb with thighs drawn below the label map that ends across the femoral shafts "
                   "(`--data.synthetic_thighs true`)",
    "M-hw": "size M with the synthetic contrast heart drawn as blood inside a darker wall and septum, and the "
            "heart's arterial prior up to 600 HU (docs/synthesis.md, round 14)",
}


def _stored(variant: str) -> dict:
    path = RESULTS / f"generalisation_{variant}.json"
    return json.loads(path.read_text()).get("results", {}) if path.exists() else {}


def _stored_repeats(variant: str) -> dict:
    """The earlier trainings of ``variant``'s runs (``{run: [result, ...]}``), oldest first."""
    store = RESULTS / f"generalisation_{variant}.json"
    return json.loads(store.read_text()).get("repeats", {}) if store.exists() else {}


def comparison(base: dict) -> str:
    """One table: each left-out scan's target (and baseline) structures, Dice of every variant's
    fold and of the synthetic-only run, against the baseline and the target."""
    stored = {v: _stored(v) for v in VARIANTS}
    cols = [v for v in VARIANTS if any(f"loso_{s}" in stored[v] for s in SCANS)]
    if not cols:
        return ""
    synth = {v: stored[v]["synthetic_only"] for v in VARIANTS if "synthetic_only" in stored[v]}
    repeats = {v: _stored_repeats(v) for v in cols}
    head = "| left-out scan | structure | " + " | ".join(f"`{v}`" for v in cols)
    head += "".join(f" | synthetic only (`{v}`)" for v in synth) + " | HU baseline | target |"
    lines = ["### Recipes compared", "",
             "Leave-one-out Dice of the target structures, and of those with a threshold baseline, run by run: "
             + "; ".join(f"`{v}`: {VARIANT_TEXT.get(v, v)}" for v in cols) + ". "
             "The synthetic-only runs saw no real CT at all. **Bold**: target met. In brackets, where it differs: "
             "the mask as `volumed segment --all` wrote it when the run was evaluated (largest component, body mask, "
             "presence rule, anatomy check; from 2026-12-06 on also the lobes filled to the lungs' air and split by "
             "a lobe atlas without the scan, so only for runs evaluated since then: their tables below give the date). "
             "After \"before:\", the same fold trained earlier (another seed, step budget or thread count; the capacity "
             "table's repeat rows), as written when evaluated: their spread is the noise of a single run.", "",
             head, "|---|---|" + "---:|" * (len(cols) + len(synth) + 2)]  # fmt: skip
    for scan in SCANS:
        fold = f"loso_{scan}"
        terms: set[str] = set()
        for v in cols:
            terms |= set(stored[v].get(fold, {}).get("scans", {}).get(scan, {}).get("dice", {}))
        terms = {t for t in terms if t in TARGETS or t in base.get(scan, {})}
        for t in sorted(terms):
            def cell(entry: dict | None) -> str:
                found = (entry or {}).get("scans", {}).get(scan, {})
                raw, written = found.get("dice", {}).get(t), found.get("dice_segment", {}).get(t)
                text = _dice_cell(t, raw)
                if raw is not None and written is not None and abs(written - raw) >= 0.0005:
                    text += f" ({_dice_cell(t, written)})"
                return text

            def earlier(v: str) -> str:
                # The same fold trained before (another seed, step budget or thread count), as written.
                vals = []
                for e in repeats[v].get(fold, []):
                    found = e.get("scans", {}).get(scan, {})
                    x = found.get("dice_segment", {}).get(t, found.get("dice", {}).get(t))
                    if x is not None:
                        vals.append(f"{x:.3f}")
                return f"; before: {', '.join(vals)}" if vals else ""

            row = [cell(stored[v].get(fold)) + earlier(v) for v in cols] + [cell(e) for e in synth.values()]
            b = base.get(scan, {}).get(t)
            row += [f"{b[0]:.3f}" if b else "", _fmt(TARGETS[t]) if t in TARGETS else ""]
            lines.append(f"| {scan} | {t} | " + " | ".join(row) + " |")
    return "\n".join(lines + [""])


def report(results: dict, base: dict, variant: str) -> str:
    """The detailed tables of one variant's runs."""
    lines = [
        f"### Runs of `{variant}`: {VARIANT_TEXT.get(variant, variant)}", "",
        "Each run is the default recipe (`configs/train_promptseg-cpu.yaml`: the same data mix as the default model, "
        "four real CTs plus label-map synthesis, with contrast-phase, field-of-view and slice-thickness augmentation) "
        f"with one scan left out, the variant's overrides (`VARIANTS['{variant}']` in the bench) and those listed with "
        "the run (`training.command` of its package). **Bold**: the issue's target met (liver >= 0.80; spleen, kidneys, "
        "aorta, lobes, heart >= 0.75).",
        "",
    ]  # fmt: skip
    missing = [r.name for r in runs(variant) if r.name not in results]
    if missing:
        lines += [
            "Not run (each fold is a full training run, 1.5 hours or more on one CPU thread; results accumulate across "
            f"sessions in bench/results/generalisation_{variant}.json): " + ", ".join(f"`{m}`" for m in missing) + ".",
            "",
        ]  # fmt: skip
    for title, scans_of in (("Leave one scan out", lambda n: n.startswith("loso_")), ("Synthetic data only", lambda n: n == "synthetic_only")):
        rows = {n: r for n, r in results.items() if scans_of(n)}
        if not rows:
            continue
        lines += [f"#### {title} (`{variant}`)", ""]
        for name, entry in rows.items():
            info = _run_info(entry.get("run", {}))
            for scan, res in entry["scans"].items():
                when = f"; evaluated {entry['evaluated']}" if entry.get("evaluated") else ""
                lines.append(f"**{scan}** (run `{name}`{info}; inference {res['seconds']} s{when})")
                lines.append("")
                written = res.get("dice_segment")
                if written is None:  # measured before 2026-12-05: the first figure only
                    lines.append("| structure | Dice | target | HU-threshold baseline |")
                    lines.append("|---|---:|---:|---|")
                else:
                    lines.append("| structure | Dice | Dice as `volumed segment --all` writes it | target | HU-threshold baseline |")
                    lines.append("|---|---:|---:|---:|---|")
                for t, v in sorted(res["dice"].items(), key=lambda kv: (kv[0] not in TARGETS, kv[0])):
                    target = TARGETS.get(t)
                    cell = _dice_cell(t, v)
                    b = base.get(scan, {}).get(t)
                    bcell = f"{b[0]:.3f} ({b[1]})" if b else ""
                    if b and max(v, (written or {}).get(t, v)) < b[0]:
                        bcell += " **model below it**"
                    wcell = "" if written is None else f" {_dice_cell(t, written[t]) if t in written else 'not prompted by --all'} |"
                    lines.append(f"| {t} | {cell} |{wcell} {_fmt(target) if target else ''} | {bcell} |")
                if res["too_small"]:
                    lines.append("")
                    lines.append("Not scored (reference under 1 mL): " + ", ".join(f"{t} {v}" for t, v in res["too_small"].items()) + ".")
                lines.append("")
    return "\n".join(lines)


def capacity_table() -> str:
    """Model size (or recipe) against Dice: for each variant with results, its size, training time
    and the mean leave-one-out Dice of the target structures, per left-out scan and fold by fold."""
    rows = []
    folds = [f"loso_{s}" for s in SCANS]

    def mean_cell(entry: dict, scan: str) -> str:
        scores = [v for t, v in entry["scans"][scan]["dice"].items() if t in TARGETS]
        return f"{np.mean(scores):.3f} ({len(scores)})" if scores else "no target"

    def size_of(params) -> str:
        return f"{params / 1e6:.1f} M ({params * 4 / 1e6:.0f} MB)" if params else "?"

    def fold_row(label: str, res: dict) -> None:
        cells, minutes, params = [], [], None
        for fold in folds:
            if fold not in res:
                cells.append("-")
                continue
            cells.append(mean_cell(res[fold], fold[len("loso_"):]))
            info = res[fold].get("run", {})
            minutes.append(info.get("fit_wall_minutes"))
            params = params or info.get("parameters")
        mins = [m for m in minutes if m is not None]
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | {size_of(params)} | {', '.join(f'{m:g}' for m in mins) or '?'} | "
                        + " | ".join(cells) + " |")

    for variant in sorted(VARIANTS):
        res = _stored(variant)
        reps = _stored_repeats(variant)
        n = max((len(reps.get(f, [])) for f in folds), default=0)
        for k in range(n):  # earlier trainings of the folds, oldest first
            fold_row(f"{variant}, repeat {k + 1} of {n + 1}", {f: reps[f][k] for f in folds if len(reps.get(f, [])) > k})
        fold_row(f"{variant}, repeat {n + 1} of {n + 1}" if n else variant, res)
        synth = res.get("synthetic_only")
        earlier = _stored_repeats(variant).get("synthetic_only", [])
        for k, entry in enumerate([*earlier, synth] if synth else []):
            # One run, tested on every real CT: none of them was seen. Repeats first, the latest last.
            info = entry.get("run", {})
            cells = [mean_cell(entry, s) if s in entry.get("scans", {}) else "-" for s in SCANS]
            which = f", repeat {k + 1} of {len(earlier) + 1}" if earlier else ""
            rows.append(f"| {variant}, synthetic CTs only ({info.get('steps', '?')} steps{which}) | "
                        f"{size_of(info.get('parameters'))} | {info.get('fit_wall_minutes', '?')} (one run) | "
                        + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = "| variant | parameters (float32) | training min per fold (1 thread) | " + " | ".join(f"left out: {s}" for s in SCANS) + " |"
    return "\n".join([
        "### Model size against Dice", "",
        "Mean leave-one-out Dice of the target structures the left-out scan has (their number in brackets); "
        "same data; S and M differ in widths only, S-ft in its recipe (`VARIANTS` in the bench); steps as listed "
        "with each run. A \"synthetic CTs only\" row is one run that saw no real CT, tested on all four: every "
        "column is an unseen scan, so it compares sizes at the cost of one run instead of four. \"Repeat k of n\" rows "
        "are the same recipe trained again (another seed where the run's overrides give `--seed_everything`, else seed 0 "
        "with another step budget or thread count): their gap is "
        "the noise of a single run, larger than most gaps between recipes in this table.", "",
        head, "|---|---|---|" + "---:|" * len(SCANS), *rows, "",
    ])  # fmt: skip


def run_info(package: Path) -> dict:
    """What a run was, from its package: steps, training minutes, recipe overrides, parameters."""
    from volumed.inference.package import PromptSegConfig, build_model

    cfg = json.loads((package / "config.json").read_text())
    tr = cfg.get("training", {})
    known = PromptSegConfig.__dataclass_fields__
    net = build_model(PromptSegConfig(**{k: v for k, v in cfg.items() if k in known}))
    return {
        "steps": tr.get("steps"),
        "fit_wall_minutes": tr.get("fit_wall_minutes"),
        "overrides": _overrides(str(tr.get("command", ""))),
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def _run_info(info: dict) -> str:
    if not info:
        return ""
    extra = info.get("overrides")
    return f", {info.get('steps', '?')} steps, {info.get('fit_wall_minutes', '?')} min" + (f"; recipe overrides `{extra}`" if extra else "")


def _overrides(command: str) -> str:
    """The recipe overrides of a ``volumed train promptseg --config ...`` command: what the run
    changed beyond the recipe file (paths and thread counts left out)."""
    import shlex

    words = shlex.split(command)[3:] if command.startswith("volumed train") else []
    skip = {"--config", "--out", "--package_dir", "--num_threads"}
    kept, i = [], 0
    while i < len(words):
        if words[i] in skip:
            i += 2
            continue
        kept.append(words[i])
        i += 1
    return " ".join(shlex.quote(w) for w in kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the runs whose package is missing first")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (threads split between them)")
    parser.add_argument("--train-threads", type=int, default=None, help="torch threads per training run")
    parser.add_argument("--variant", default="S", choices=sorted(VARIANTS))
    parser.add_argument("--runs", type=Path, default=None, help="default runs/generalisation/<variant>")
    parser.add_argument("--only", nargs="*", default=None, help="run names (loso_<scan>, synthetic_only)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the evaluation")
    parser.add_argument("--baselines", action="store_true", help="recompute the HU-threshold baselines (else kept from results.json)")
    parser.add_argument("extra", nargs="*", help="more recipe overrides, after --")
    args = parser.parse_args(argv)
    root = args.runs or REPO / "runs" / "generalisation" / args.variant
    selected = [r for r in runs(args.variant) if args.only is None or r.name in args.only]
    if args.train:
        train(selected, args.variant, root, args.jobs, args.extra, args.train_threads)
    torch.set_num_threads(args.threads)
    # Results accumulate in the tracked bench/results/generalisation_<variant>.json (module docstring).
    store = RESULTS / f"generalisation_{args.variant}.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    results = saved.get("results", {})
    # Earlier trainings of a run (same recipe, another training: steps, time, threads) are kept
    # under "repeats" rather than overwritten: their spread is the run-to-run noise of a figure.
    repeats = saved.get("repeats", {})
    for run in selected:
        package = root / run.name / "package"
        if (package / "model.safetensors").exists():
            scans = evaluate(package, run.test_scans, preview_dir=root / run.name / "previews")
            info = run_info(package)
            if run.name in results and results[run.name].get("run") != info:
                repeats.setdefault(run.name, []).append(results[run.name])
            results[run.name] = {"scans": scans, "run": info, "evaluated": time.strftime("%Y-%m-%d")}
    results = {r.name: results[r.name] for r in runs() if r.name in results}
    base = {} if args.baselines else dict(saved.get("baselines") or {})
    missing_base = tuple(s for s in SCANS if s not in base)
    if missing_base:
        base.update(baselines(missing_base))
    base = {s: base[s] for s in SCANS if s in base}
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"results": results, "baselines": base, **({"repeats": repeats} if repeats else {})}, indent=2))
    tmp.replace(store)
    head = [HEADING, "", f"Written by `python bench/bench_generalisation.py` ({machine_description()}).", "",
            "Every number is Dice on a scan the model **never trained on**, on the scan's original grid, through the "
            "path of `volumed segment`. The threshold baseline is tuned on the test scan itself (optimistic).", ""]  # fmt: skip
    parts = ["\n".join(head), comparison(base)]
    for v in VARIANTS:
        res = results if v == args.variant else _stored(v)
        if res:
            parts.append(report(res, base, v))
    text = "\n".join(parts) + "\n" + capacity_table()
    print(text)
    if not args.no_write:
        write_section(args.output, HEADING, text)


if __name__ == "__main__":
    main()
