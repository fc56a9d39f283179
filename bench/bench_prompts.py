"""Parallel prompting: wall time for 24 prompts over 1 prompt, against one model run per prompt.

Usage::

    python bench/bench_prompts.py                 # print, and write the section of BENCHMARKS.md
    python bench/bench_prompts.py --no-write --repeats 1 --sequential-repeats 1

What is timed is :meth:`volumed.inference.segment.PromptSegPredictor.predict` on the real CT
``example_ct_sm.nii.gz`` (122 x 101 x 30, 3 mm): text queries, preprocessing, MONAI sliding-window
inference (one encoder pass per window for all prompts), the exact blending of the windows for all
terms at once in the coarse cells where they can exceed the threshold (``volumed.inference.blending``),
the inversion onto the original grid (an index copy here: the image is at the model's 3 mm),
thresholds and the label map. The same model with MONAI blending
every term at full resolution (``lazy_blending=False``, the reference; same masks) is timed too. ``segment()`` end to end
(adds writing one NIfTI mask and one statistics entry per term, the label map, JSON, preview) is
timed too. The sequential baseline runs the whole model once per prompt: 24 ``predict`` calls
with one prompt each (24 encoder passes per window). ``predict`` on the real DICOM series
(512 x 512 x 20 at 0.98 x 0.98 x 2 mm) is timed for 1 and 24 prompts too: there the masks are
resampled from the 3 mm model grid onto the image's grid, about 13 times as many voxels.

Model: the trained default package (``bundles/volumed_promptseg_ct/models``) when present, else an
untrained package with the architecture of ``configs/train_promptseg-cpu.yaml`` (the table says
which). The weights matter a little: terms nowhere above threshold skip the inversion.

Threads: 1 by default (``--threads``): on the shared, oversubscribed 2-core machine two OpenMP
threads stall at every barrier, which swamps the small per-term operations being measured.

The section "## Parallel prompting: 24 prompts vs 1" of BENCHMARKS.md is replaced; other sections
are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import machine_description, write_section  # bench/ is on sys.path when run as a script

import torch

from volumed.data.vocab import TOTALSEG_CT_CLASSES
from volumed.inference.package import PromptSegConfig, build_model, save_package
from volumed.inference.segment import PromptSegPredictor, default_model_dir, segment
from volumed.io import read_volume
from volumed.text.encoder import default_model_dir as default_text_dir
from volumed.text.encoder import model_hash

HEADING = "## Parallel prompting: 24 prompts vs 1"
REPO = Path(__file__).resolve().parents[1]
IMAGE = Path(os.environ.get("VOLUMED_SHARED_DATA", REPO.parent / "shared" / "data")) / "totalsegmentator_ct_sm" / "example_ct_sm.nii.gz"
# A second case whose masks are resampled (0.98 x 0.98 x 2 mm LPS <-> the model's 3 mm RAS grid).
DICOM = IMAGE.parent / "example_ct_dicom"
TARGET = 1.15

# Used only when the trained default package is absent: the architecture of the default-model
# recipe (configs/train_promptseg-cpu.yaml: model.encoder/encoder_kwargs/decoder_kwargs,
# data.patch_size/target_spacing), so the timing is that of the model `volumed segment` ships.
RECIPE = REPO / "configs" / "train_promptseg-cpu.yaml"


def _recipe_config() -> PromptSegConfig:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    model, data = recipe["model"], recipe["data"]
    return PromptSegConfig(
        encoder=model["encoder"],
        encoder_kwargs=model.get("encoder_kwargs") or {},
        decoder_kwargs=model.get("decoder_kwargs") or {},
        text_model_hash=model_hash(default_text_dir()),
        preprocessing=dict(modality="CT", target_spacing=list(data["target_spacing"]), ct_window=list(data["ct_window"])),
        patch_size=tuple(data["patch_size"]),
        overlap=float(model.get("overlap", 0.25)),
        terms=list(TOTALSEG_CT_CLASSES[:24]),
    )



def _package(tmp: Path) -> tuple[Path, str]:
    trained = default_model_dir()
    if (trained / "config.json").is_file():
        return trained, f"trained default package `{trained.relative_to(REPO)}`"
    torch.manual_seed(0)
    config = _recipe_config()
    path = save_package(build_model(config), config, tmp / "untrained")
    return path, (
        f"UNTRAINED package with the architecture of `{RECIPE.relative_to(REPO)}` (the default model was absent): "
        f"{config.encoder} {config.encoder_kwargs}, decoder {config.decoder_kwargs}"
    )


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(repeats: int, sequential_repeats: int, n_prompts: int = 24) -> tuple[list[str], float]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir, model_desc = _package(tmp)
        predictor = PromptSegPredictor.from_package(model_dir)  # what volumed segment runs
        # The same model with MONAI blending every term at full resolution in every window: the
        # reference the lazy exact blending replaced (same masks; tests/unit/inference/test_segment.py).
        full_res = PromptSegPredictor(predictor.model, predictor.config, text_encoder=predictor.text_encoder, lazy_blending=False)
        cfg = predictor.config
        volume = read_volume(IMAGE)
        # The model's trained terms first (vocabulary terms of CT; free-text ones need --free-text).
        prompts = [t for t in cfg.terms if t in predictor.vocabulary and predictor.vocabulary.label_ids(t, "CT")]
        prompts += [t for t in TOTALSEG_CT_CLASSES if t not in prompts]
        prompts = prompts[:n_prompts]
        terms = predictor.resolve_prompts(prompts, "CT")
        case = predictor.preprocess(volume)
        stride = predictor._decoder_stride(case.model_shape)
        # Warm-up: allocator, MONAI's gaussian map, the on-disk text-embedding cache of each list.
        compare = stride is not None  # without a coarse grid both predictors run the same code
        for p in (predictor, full_res) if compare else (predictor,):
            p.predict(volume, terms[:1])
            p.predict(volume, terms)

        # Pairs (1 prompt, 24 prompts; then the reverse order): the shared machine's load drifts, and
        # pairing runs taken back to back keeps the drift out of the ratios. The full-resolution
        # reference gets its own pairs with a 1-prompt run: run between the two, its large buffers
        # slowed the next run down (paired 24/1 ratio 1.13 with it in between, 1.09 without).
        runs: dict[str, list[float]] = {"one": [], "par": [], "one_ref": [], "full": []}
        last: dict[str, object] = {}
        pairs = [("one", "par", predictor)] + ([("one_ref", "full", full_res)] if compare else [])
        for first, second, p in pairs:
            for r in range(repeats):
                order = [(first, predictor, terms[:1]), (second, p, terms)]
                for key, q, ts in order if r % 2 == 0 else order[::-1]:
                    seconds, last[key] = _timed(lambda: q.predict(volume, ts))
                    runs[key].append(seconds)
        seq = [_timed(lambda: [predictor.predict(volume, [t]) for t in terms])[0] for _ in range(sequential_repeats)]

        # The DICOM series: the same prompts, masks resampled onto its 0.98 mm grid.
        dicom = read_volume(DICOM)
        dicom_case = predictor.preprocess(dicom)
        for ts in (terms[:1], terms):
            predictor.predict(dicom, ts)
        dcm: dict[int, list[float]] = {1: [], n_prompts: []}
        for r in range(repeats):
            for k in (1, n_prompts) if r % 2 == 0 else (n_prompts, 1):
                dcm[k].append(_timed(lambda: predictor.predict(dicom, terms[:k]))[0])

        e2e: dict[int, list[float]] = {1: [], n_prompts: []}
        for r in range(repeats):
            for k in (1, n_prompts) if r % 2 == 0 else (n_prompts, 1):
                out = tmp / f"out{k}"
                e2e[k].append(_timed(lambda: segment(IMAGE, prompts[:k], model_dir=model_dir, out_dir=out, overwrite=True, progress=False, allow_untrained=True))[0])

    med = statistics.median
    one_s, par_s, seq_s = med(runs["one"]), med(runs["par"]), med(seq)
    ratio = med([b / a for a, b in zip(runs["one"], runs["par"])])
    full_ratio = med([b / a for a, b in zip(runs["one_ref"], runs["full"])]) if runs["full"] else float("nan")
    e_ratio = med([b / a for a, b in zip(e2e[1], e2e[n_prompts])])
    d_ratio = med([b / a for a, b in zip(dcm[1], dcm[n_prompts])])
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    one, par, full = last["one"], last["par"], last.get("full")
    lines = [
        f"Image: `example_ct_sm.nii.gz` {' x '.join(map(str, volume.shape))} at 3 mm -> model grid "
        f"{' x '.join(map(str, case.model_shape))} at {cfg.preprocessing.get('target_spacing')} mm, patch "
        f"{' x '.join(map(str, cfg.patch_size))}, overlap {cfg.overlap}, gaussian blending, batch 1 window, fp32 CPU.",
        f"Model: {model_desc}.",
        f"Repetitions: {repeats} of each parallel and end-to-end run, in pairs with a 1-prompt run (1 prompt, {n_prompts} prompts, "
        f"in alternating order; the full-resolution reference has its own pairs) after one warm-up each; "
        f"{sequential_repeats} of the sequential baseline. "
        "Ratios are medians of the ratios of runs taken back to back.",
        "",
        "| run | prompts | model runs per window | wall s (median) | all runs s | x 1 prompt |",
        "| --- | ------: | --------------------: | --------------: | ---------- | ---------: |",
        f"| predict, parallel | 1 | 1 | {one_s:.2f} | {fmt(runs['one'])} | 1.00 |",
        f"| predict, parallel (volumed segment: lazy exact blending) | {n_prompts} | 1 | {par_s:.2f} | {fmt(runs['par'])} | **{ratio:.2f}** |",
        *(
            [f"| predict, parallel, MONAI full-resolution blending of every term (reference) | {n_prompts} | 1 | {med(runs['full']):.2f} | "
             f"{fmt(runs['full'])} | {full_ratio:.2f} |"]
            if compare else []
        ),
        f"| predict, sequential baseline | {n_prompts} | {n_prompts} | {seq_s:.2f} | {fmt(seq)} | {seq_s / one_s:.2f} |",
        f"| predict, DICOM series {' x '.join(map(str, dicom.shape))} (model grid {' x '.join(map(str, dicom_case.model_shape))}, "
        f"masks resampled to its grid) | 1 | 1 | {med(dcm[1]):.2f} | {fmt(dcm[1])} | 1.00 |",
        f"| predict, DICOM series, lazy exact blending | {n_prompts} | 1 | {med(dcm[n_prompts]):.2f} | {fmt(dcm[n_prompts])} | **{d_ratio:.2f}** |",
        f"| segment() end to end, with writes | 1 | 1 | {med(e2e[1]):.2f} | {fmt(e2e[1])} | 1.00 |",
        f"| segment() end to end, with writes | {n_prompts} | 1 | {med(e2e[n_prompts]):.2f} | {fmt(e2e[n_prompts])} | {e_ratio:.2f} |",
        "",
        f"Parallel speed-up over the sequential baseline: {seq_s / par_s:.1f}x. Target for {n_prompts}/1: <= {TARGET}: "
        f"{'met' if ratio <= TARGET else 'NOT met'} on example_ct_sm, {'met' if d_ratio <= TARGET else 'NOT met'} on the DICOM series. "
        f"The same ratios from the fastest run of each (the least disturbed by other work on the machine): "
        f"{min(runs['par']) / min(runs['one']):.2f} on example_ct_sm, {min(dcm[n_prompts]) / min(dcm[1]):.2f} on the DICOM series. "
        + (f"The decoder predicts at stride {stride}; each window's coarse logits are kept, and all terms are blended "
           "together, exactly, with MONAI's gaussian weights, only in the coarse cells where a bound shows they can "
           "exceed the threshold (`volumed/inference/blending.py`), then copied voxel by voxel to the image grid (example_ct_sm) "
           "or resampled box by box (the DICOM series)." if compare else
           "The decoder's per-voxel embedding is at stride 1, so MONAI blends every term at full resolution."),
        "",
        "Where the time goes (seconds, last repetition of predict):",
        "",
        "| run | " + " | ".join(one.seconds) + " |",
        "| --- | " + " | ".join("---:" for _ in one.seconds) + " |",
        "| 1 prompt | " + " | ".join(f"{v:.3f}" for v in one.seconds.values()) + " |",
        f"| {n_prompts} prompts | " + " | ".join(f"{v:.3f}" for v in par.seconds.values()) + " |",
    ]
    if full is not None:
        lines.append(f"| {n_prompts} prompts, MONAI full-resolution blending | " + " | ".join(f"{v:.3f}" for v in full.seconds.values()) + " |")
    return lines, ratio



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="repetitions of the 1- and 24-prompt runs (median)")
    parser.add_argument("--sequential-repeats", type=int, default=2, help="repetitions of the 24-run baseline")
    # One thread by default: on the shared 2-core machine (load 10+ from other work) two OpenMP
    # threads stall at every barrier: the encoder's window took 1016 ms with 2 threads, 84 ms with 1,
    # and such stalls hit the many small per-term ops hardest, swamping what is measured.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see the comment above)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    lines, _ = run(args.repeats, args.sequential_repeats)
    print("\n".join(lines))
    if args.no_write:
        return
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_prompts.py", *(argv if argv is not None else sys.argv[1:])])
    header = [HEADING, "", f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.", ""]
    write_section(args.output, HEADING, "\n".join(header + lines) + "\n")
    print(f"wrote the section {HEADING!r} of {args.output}")


if __name__ == "__main__":
    main()
