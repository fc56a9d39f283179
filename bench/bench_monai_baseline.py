"""volumed segment against a plain MONAI pipeline at clinical size: wall, peak RSS and Dice, 24 structures.

Usage::

    python bench/bench_monai_baseline.py                          # print, and write the section of BENCHMARKS.md
    python bench/bench_monai_baseline.py --no-write --repeats 1 --cases native

Issue 22 item 2. The baseline is written the way MONAI model-zoo bundles write inference
(``configs/inference.json`` of e.g. spleen_ct_segmentation, wholeBody_ct_segmentation), with the
same network, weights, prompts and preprocessing as ``volumed segment``:

    LoadImaged -> EnsureChannelFirstd -> EnsureTyped(float32) -> Orientationd(RAS)
      -> Spacingd(package spacing, bilinear, border) -> CropForegroundd(HU > package threshold, margin)
      -> ScaleIntensityRanged(package CT window -> [0, 1], clip)
      -> SlidingWindowInferer(package patch and overlap, gaussian) on the network with its prompts
         frozen in (volumed.bundle.promptseg.FixedPromptSegmenter: image (1, 1, X, Y, Z) -> logits
         (1, N, X, Y, Z), a plain multi-channel network)
      -> Activationsd(sigmoid) -> Invertd(probabilities, bilinear) -> AsDiscreted(threshold 0.5)
      -> SaveImaged (one N-channel uint8 NIfTI)

Blending: the inferer blends the network's logits and ``Activationsd`` applies the sigmoid after,
as zoo bundles (and nnU-Net) do; ``volumed segment`` computes the same function lazily
(``volumed.inference.blending``). Until 2026-12-01 volumed blended the windows' sigmoid
probabilities instead: the same preprocessed images gave masks up to 0.69 apart in probability
where overlapping windows disagreed (median Dice 0.96, sacrum 0.00 on tcia_ccth_a01).

The probabilities are inverted before the threshold (the spleen bundle's order, with
``nearest_interp=False``): that is the function ``volumed segment`` computes (trilinear inversion of
the probabilities, then ``> threshold``), so the masks can be compared voxel for voxel; thresholding
first and inverting the discrete masks by nearest neighbour would give other masks.
The baseline adds ``SpatialPadd``/``DivisiblePadd`` after the intensity scaling: the package's
input convention (an image thinner than the patch padded as in training, mirrored along the
slices; every window on a whole cell of the decoder's stride-2 output), which
``SlidingWindowInferer``'s own zero padding would not reproduce. ``volumed segment`` runs with
``--no-postprocess`` (no connected-component rule; the baseline has none), ``--no-anatomy-check``
(no craniocaudal check; the baseline has none), ``--no-progress``, as
the installed command. Both use a copy of the package whose ``presence`` rule is off (it empties
small unsure masks: a reporting rule the baseline lacks); weights and everything else are the
default model's. Both write their outputs into a temporary
folder outside the repository.

Cases: the real CT ``tcia_ccth_a01/ct.nii.gz`` (311 x 248 x 296 at 1.5 x 1.5 x 2.5 mm) and the same
CT resampled (trilinear, in a temporary folder) to 512 x 512 x 200 keeping its field of view.
Each pipeline runs in a fresh process; wall is ``time.perf_counter`` around it, peak RSS the
child's ``ru_maxrss`` and CPU its user + system time (``os.wait4``; on a machine shared with other
work, where a niced benchmark gets what is left of the cores, CPU time is the steadier measure). Per repetition the two run back to back in alternating
order; figures are medians over the repetitions, ratios volumed / baseline of the medians. Dice of
each structure's mask against the baseline's, from the first repetition (a structure empty in both
counts as 1). The text embeddings of the prompts are cached before anything is timed.

The section "## Against plain MONAI at clinical size: 24 structures" of BENCHMARKS.md is replaced;
other sections are kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import machine_description, spawn, write_section  # bench/ is on sys.path when run as a script

HEADING = "## Against plain MONAI at clinical size: 24 structures"
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VOLUMED_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGE = DATA / "tcia_ccth_a01" / "ct.nii.gz"
MODEL = REPO / "bundles" / "volumed_promptseg_ct" / "models"
CLINICAL_SHAPE = (512, 512, 200)
N_TERMS = 24
TARGET_WALL, TARGET_RSS, TARGET_DICE = 0.6, 0.5, 0.999


def default_prompts(model_dir: Path, n: int = N_TERMS) -> list[str]:
    """The first ``n`` trained terms of the package that are vocabulary terms (no free text)."""
    from volumed.data.vocab import default_vocabulary
    from volumed.inference.package import read_config

    vocab = default_vocabulary()
    terms = [t for t in read_config(model_dir).terms if t in vocab]
    if len(terms) < n:
        raise SystemExit(f"the package lists only {len(terms)} vocabulary terms, {n} asked")
    return terms[:n]


def resample_keeping_fov(src: Path, dst: Path, shape: tuple[int, int, int]) -> None:
    """Trilinear resampling of ``src`` to ``shape`` voxels over the same field of view (the box of
    the voxel edges is kept: ``align_corners=False``), int16 HU, the affine scaled accordingly."""
    import nibabel as nib
    import numpy as np
    import torch

    img = nib.load(str(src))
    data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(data, size=shape, mode="trilinear", align_corners=False)[0, 0]
    scale = np.asarray(img.shape[:3], dtype=np.float64) / np.asarray(shape, dtype=np.float64)  # new / old voxel size
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] * scale[None, :]
    # Centre of new voxel 0 sits at old index (scale - 1) / 2.
    affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ ((scale - 1.0) / 2.0)
    header = img.header.copy()
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(np.round(out.numpy()).astype(np.int16), affine, header), str(dst))


def package_without_presence_rule(model_dir: Path, dst: Path) -> Path:
    """``dst``: the package with ``presence: {}`` (same weights, linked). The presence rule reports
    a small unsure mask absent and empties it, a reporting rule the MONAI pipeline does not have;
    without it both compute the same masks."""
    dst.mkdir(parents=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["presence"] = {}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "model.safetensors").symlink_to((model_dir / "model.safetensors").resolve())
    return dst


# ------------------------------------------------------------------------------------ workers


def run_baseline(image: Path, out_dir: Path, prompts: list[str], model_dir: Path) -> dict:
    """The MONAI model-zoo style pipeline (module docstring); returns its stage times (s)."""
    clock = {"start": time.perf_counter()}
    import torch
    from monai.inferers import SlidingWindowInferer
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from monai.transforms import DivisiblePadd, SpatialPadd

    from volumed.bundle.promptseg import FixedPromptSegmenter, prompt_embeddings
    from volumed.data.transforms import ForegroundThreshold
    from volumed.inference.package import load_package

    clock["imports"] = time.perf_counter()
    model, config = load_package(model_dir)
    network = FixedPromptSegmenter(model, prompt_embeddings(model_dir, prompts)).eval()
    settings = config.preprocessing
    window = settings["ct_window"]
    # The package's input convention, as MONAI transforms: an image thinner than the patch is
    # padded to it as in training (pad_mode: "symmetric_z" mirrors along the slices, air in-plane),
    # and to a multiple of the decoder's output stride, so that every window starts on a whole
    # coarse cell (SlidingWindowInferer itself would pad with zeros and place the last window at
    # an odd voxel of an odd-sized image). Both are invertible; Invertd crops them away again.
    decoder = model.segmenter.decoder
    stride = [int(v) for v in decoder.feature_info[decoder.pixel_levels[0]].stride]
    pad_mode = getattr(config, "pad_mode", "constant")
    z_mode = "constant" if pad_mode == "constant" else "symmetric"
    xy_mode = "symmetric" if pad_mode == "symmetric" else "constant"
    roi = [int(r) for r in config.patch_size]
    padding = [
        SpatialPadd(keys="image", spatial_size=(-1, -1, roi[2]), mode=z_mode),
        SpatialPadd(keys="image", spatial_size=(roi[0], roi[1], -1), mode=xy_mode),
        DivisiblePadd(keys="image", k=(1, 1, stride[2]), mode=z_mode),
        DivisiblePadd(keys="image", k=(stride[0], stride[1], 1), mode=xy_mode),
    ]
    preprocessing = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=True),
        Orientationd(keys="image", axcodes=settings.get("orientation", "RAS"), labels=None),
        Spacingd(keys="image", pixdim=settings["target_spacing"], mode="bilinear", padding_mode="border", dtype=torch.float32),
        CropForegroundd(keys="image", source_key="image", select_fn=ForegroundThreshold(threshold=settings["ct_foreground_hu"]),
                        margin=settings["margin"], allow_smaller=True),
        ScaleIntensityRanged(keys="image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        *padding,
    ])
    inferer = SlidingWindowInferer(roi_size=list(config.patch_size), sw_batch_size=1, overlap=config.overlap, mode="gaussian")
    postprocessing = Compose([
        Activationsd(keys="pred", sigmoid=True),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", threshold=float(config.threshold)),
        SaveImaged(keys="pred", output_dir=str(out_dir), output_postfix="seg", output_dtype="uint8", resample=False,
                   separate_folder=False, print_log=False),
    ])
    clock["model"] = time.perf_counter()
    data = preprocessing({"image": str(image)})
    clock["preprocess"] = time.perf_counter()
    with torch.inference_mode():
        data["pred"] = inferer(data["image"][None], network)[0]
    clock["inference"] = time.perf_counter()
    postprocessing(data)
    clock["postprocess"] = time.perf_counter()
    names = list(clock)
    return {b: clock[b] - clock[a] for a, b in zip(names, names[1:])}


def baseline_masks(out_dir: Path):
    """``(N, X, Y, Z)`` uint8 masks written by the baseline, and their affine."""
    import nibabel as nib
    import numpy as np

    (path,) = sorted(out_dir.glob("*_seg.nii.gz"))
    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.uint8)
    data = data.reshape(*data.shape[:3], -1)  # (X, Y, Z, [1,] N) -> (X, Y, Z, N)
    return np.moveaxis(data, -1, 0), img.affine


def dice_scores(volumed_dir: Path, baseline_dir: Path, prompts: list[str]) -> list[tuple[str, float, int, int]]:
    """Per prompt: (name, Dice, voxels volumed, voxels baseline); 1.0 when both are empty."""
    import nibabel as nib
    import numpy as np

    reference, affine = baseline_masks(baseline_dir)
    rows = []
    for k, name in enumerate(prompts):
        img = nib.load(str(volumed_dir / "masks" / f"{name}.nii.gz"))
        if img.shape != reference.shape[1:] or not np.allclose(img.affine, affine, atol=1e-3):
            raise RuntimeError(f"{name}: volumed's mask {img.shape} is not on the baseline's grid {reference.shape[1:]}")
        a = np.asarray(img.dataobj, dtype=bool)
        b = reference[k].astype(bool)
        na, nb, both = int(a.sum()), int(b.sum()), int(np.count_nonzero(a & b))
        rows.append((name, 1.0 if na + nb == 0 else 2.0 * both / (na + nb), na, nb))
    return rows


# --------------------------------------------------------------------------------- the driver


def measure_case(label: str, image: Path, prompts: list[str], repeats: int, work: Path, threads: int | None, model_dir: Path) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    volumed = str(Path(sys.executable).parent / "volumed")
    runs: dict[str, dict[str, list]] = {"baseline": {"wall": [], "rss": [], "cpu": [], "stages": []}, "volumed": {"wall": [], "rss": [], "cpu": []}}
    dice = None
    for rep in range(repeats):
        out = {"baseline": work / f"{label}_baseline_{rep}", "volumed": work / f"{label}_volumed_{rep}"}
        stage_file = work / f"{label}_stages_{rep}.json"
        commands = {
            "baseline": [sys.executable, str(Path(__file__).resolve()), "--worker", str(model_dir), str(image), str(out["baseline"]),
                         str(stage_file), *prompts],
            "volumed": [volumed, "segment", str(image), *[a for p in prompts for a in ("-p", p)], "-o", str(out["volumed"]),
                        "--model", str(model_dir), "--no-postprocess", "--no-anatomy-check", "--no-progress"],
        }
        order = ["baseline", "volumed"] if rep % 2 == 0 else ["volumed", "baseline"]
        for name in order:
            wall, rss, cpu = spawn(commands[name], env)
            runs[name]["wall"].append(wall)
            runs[name]["rss"].append(rss)
            runs[name]["cpu"].append(cpu)
            print(f"  {label} rep {rep + 1}/{repeats} {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {rss:,.0f} MiB", flush=True)
        runs["baseline"]["stages"].append(json.loads(stage_file.read_text()))
        if dice is None:
            dice = dice_scores(out["volumed"], out["baseline"], prompts)
        for path in out.values():
            subprocess.run(["rm", "-rf", str(path)], check=False)
    return {"runs": runs, "dice": dice}


def case_table(label: str, shape: tuple, result: dict) -> list[str]:
    runs, dice = result["runs"], result["dice"]
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "rss", "cpu")} for k, v in runs.items()}
    wall_ratio = med["volumed"]["wall"] / med["baseline"]["wall"]
    rss_ratio = med["volumed"]["rss"] / med["baseline"]["rss"]
    cpu_ratio = med["volumed"]["cpu"] / med["baseline"]["cpu"]
    values = [d for _, d, _, _ in dice]
    worst = min(dice, key=lambda r: r[1])
    lines = [
        f"| {label} ({' x '.join(map(str, shape))}) | MONAI pipeline | {med['baseline']['wall']:.1f} | "
        f"{', '.join(f'{w:.1f}' for w in runs['baseline']['wall'])} | {med['baseline']['cpu']:.1f} | {med['baseline']['rss']:,.0f} | 1.00 | 1.00 | 1.00 | - |",
        f"| {label} ({' x '.join(map(str, shape))}) | volumed segment | {med['volumed']['wall']:.1f} | "
        f"{', '.join(f'{w:.1f}' for w in runs['volumed']['wall'])} | {med['volumed']['cpu']:.1f} | {med['volumed']['rss']:,.0f} | "
        f"**{wall_ratio:.2f}** | {cpu_ratio:.2f} | **{rss_ratio:.2f}** | min {min(values):.4f} ({worst[0]}), median {statistics.median(values):.4f} |",
    ]
    return lines


def report_lines(cases: list[str], repeats: int, prompts: list[str], shapes: dict, results: dict) -> list[str]:
    """The table and the notes under it."""
    lines = [
        f"CT `tcia_ccth_a01/ct.nii.gz` ({' x '.join(map(str, shapes.get('native', ('?',))))}, 1.5 x 1.5 x 2.5 mm) and the same CT "
        f"resampled to {' x '.join(map(str, CLINICAL_SHAPE))} over its field of view; default model "
        f"`bundles/volumed_promptseg_ct/models` (model grid 4 mm), {len(prompts)} structures: {', '.join(prompts)}. "
        f"Each pipeline in a fresh process, {repeats} repetition(s) in alternating order; medians; peak RSS = the "
        "child's ru_maxrss, CPU its user + system time. Baseline: the MONAI model-zoo pipeline of the script's docstring "
        "(probabilities inverted, then thresholded; SpatialPadd/DivisiblePadd give the package's padding). Both run the package "
        "with its presence rule off (it empties small unsure masks; the baseline has no such rule). volumed: `volumed segment IMAGE -p ... --no-postprocess --no-anatomy-check --no-progress` (it also writes the label "
        "map, statistics, preview and report). Dice of each structure's mask against the baseline's (first repetition).",
        "",
        "| case | pipeline | wall s (median) | all runs s | CPU s (median) | peak RSS MiB (median) | wall x baseline | CPU x baseline | RSS x baseline | Dice vs baseline |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    verdicts = []
    for label in cases:
        lines += case_table(label, shapes[label], results[label])
        runs = results[label]["runs"]
        wall = statistics.median(runs["volumed"]["wall"]) / statistics.median(runs["baseline"]["wall"])
        rss = statistics.median(runs["volumed"]["rss"]) / statistics.median(runs["baseline"]["rss"])
        dmin = min(d for _, d, _, _ in results[label]["dice"])
        verdicts.append(f"{label}: wall {wall:.2f} ({'met' if wall <= TARGET_WALL else 'not met'}), RSS {rss:.2f} "
                        f"({'met' if rss <= TARGET_RSS else 'not met'}), Dice min {dmin:.4f} ({'met' if dmin >= TARGET_DICE else 'not met'})")
    lines += ["", f"Targets: wall <= {TARGET_WALL}x, peak RSS <= {TARGET_RSS}x, Dice >= {TARGET_DICE}. " + "; ".join(verdicts) + "."]
    for label in cases:
        stages = results[label]["runs"]["baseline"]["stages"]
        keys = list(stages[0])
        lines.append(f"Baseline stages, {label} (median s): " + ", ".join(f"{k} {statistics.median(s[k] for s in stages):.1f}" for k in keys) + ".")
        lines.append(f"Dice per structure, {label}: " + ", ".join(
            f"{n} {d:.4f}" + ("" if na or nb else " (empty in both)") for n, d, na, nb in results[label]["dice"]) + ".")
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":  # one baseline run in this process (spawned by the driver)
        import volumed  # noqa: F401  the same import-time deferrals as volumed segment (volumed/_startup.py)

        model_dir, image, out_dir, stage_file, *prompts = argv[1:]
        stages = run_baseline(Path(image), Path(out_dir), prompts, Path(model_dir))
        Path(stage_file).write_text(json.dumps(stages))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each pipeline per case (median)")
    parser.add_argument("--cases", nargs="+", choices=["native", "clinical"], default=["native", "clinical"],
                        help="native: the CT as stored; clinical: resampled to 512 x 512 x 200")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both pipelines (default: torch's)")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    import nibabel as nib

    from volumed.bundle.promptseg import prompt_embeddings

    prompts = default_prompts(MODEL)
    prompt_embeddings(MODEL, prompts)  # fills the embedding cache both pipelines read
    work = Path(tempfile.mkdtemp(prefix="bench_monai_baseline_"))
    model_dir = package_without_presence_rule(MODEL, work / "model")
    images = {"native": IMAGE}
    if "clinical" in args.cases:
        images["clinical"] = work / f"ct_{'x'.join(map(str, CLINICAL_SHAPE))}.nii.gz"
        resample_keeping_fov(IMAGE, images["clinical"], CLINICAL_SHAPE)
    results, shapes = {}, {}
    for label in args.cases:
        shapes[label] = nib.load(str(images[label])).shape
        print(f"{label}: {images[label].name} {shapes[label]}", flush=True)
        results[label] = measure_case(label, images[label], prompts, args.repeats, work, args.threads, model_dir)
        # Raw figures first, so that a long run is never lost to the table code.
        raw = Path(tempfile.gettempdir()) / "bench_monai_baseline_results.json"
        raw.write_text(json.dumps({"shapes": shapes, "results": results}, indent=1))

    lines = report_lines(args.cases, args.repeats, prompts, shapes, results)
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_monai_baseline.py", *argv])
    header = [HEADING, "", f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.", ""]
    print("\n".join(header + lines))
    subprocess.run(["rm", "-rf", str(work)], check=False)
    if args.no_write:
        return
    write_section(args.output, HEADING, "\n".join(header + lines) + "\n")
    print(f"wrote the section {HEADING!r} of {args.output}")


if __name__ == "__main__":
    main()
