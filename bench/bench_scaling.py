"""Scaling of ``volumed segment`` at clinical size: peak RSS and wall against slices and structures.

Usage::

    python bench/bench_scaling.py                      # print, and write the section of BENCHMARKS.md
    python bench/bench_scaling.py --no-write --repeats 1 --no-stages

Issue 22 item 4. Image: the real CT ``tcia_ccth_a01/ct.nii.gz`` (311 x 248 x 296 at
1.5 x 1.5 x 2.5 mm) resampled (trilinear, over the same field of view, in a temporary folder;
``bench_monai_baseline.resample_keeping_fov``) to 512 x 512 in-plane and 100, 200 or 400 slices,
so each volume holds the same real anatomy at a finer or coarser slice spacing (the model grid,
4 mm, is then the same for all three). Model: the default package
``bundles/volumed_promptseg_ct/models`` as it is (presence rule on).

(a) Slices: ``volumed segment`` with one prompt (liver) on 512 x 512 x {100, 200, 400}; the
least-squares line of peak RSS against slices gives MB per slice and the intercept.
(b) Structures: 1 (liver), 24 (the structures of ``bench_monai_baseline.py``) and 117 (the
TotalSegmentator v2 CT classes, ``volumed.data.vocab.TOTALSEG_CT_CLASSES``) on 512 x 512 x 200.
The model was trained on fewer terms: the 117 are given as ``-p`` prompts with
``--allow-untrained`` (the untrained ones are segmented and flagged untrained; ``--all`` would add
trained terms only). Targets from 1 to 24 structures: wall <= 1.15x, peak RSS <= 1.3x.

Every run is ``volumed segment IMAGE -p ... -o OUT --model MODEL --no-postprocess --no-progress``
(the flags of ``bench_monai_baseline.py``) in a fresh process, spawned through a small launcher
(:func:`spawn`: a child's ``ru_maxrss`` otherwise starts at the peak RSS of the process that
spawned it, here the driver's 1.2 GiB): wall is ``time.perf_counter`` around it, peak RSS the
child's ``ru_maxrss``, CPU its user + system time. Per repetition every case runs once, in the opposite order on odd repetitions; figures are
medians over the repetitions; ratios are those of the medians (and, in brackets, the median of the
per-repetition ratios, runs of the same repetition being close in time on a shared machine).
The text embeddings of all prompts are cached before anything is timed.

Stage timings (``--stages``, default on; run first): one more run per structure count on
512 x 512 x 200, in a fresh process that calls :func:`volumed.inference.segment.segment` (what the command runs)
with hooks: model load, read, text queries, preprocessing, sliding window, inversion (of which
connected components, per-term mask NIfTI writes and per-term statistics), final writes (label
map, JSON, preview), and the peak RSS reached after each. They are the measured breakdown behind
the verdicts, not the timed figures.

The section "## Scaling: slices and structures at clinical size" of BENCHMARKS.md is replaced;
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
from collections.abc import Sequence
from pathlib import Path

from _report import machine_description, spawn, write_section  # bench/ is on sys.path when run as a script
from bench_monai_baseline import IMAGE, MODEL, REPO, default_prompts, resample_keeping_fov

HEADING = "## Scaling: slices and structures at clinical size"
IN_PLANE = (512, 512)
SLICES = (100, 200, 400)
STRUCTURES = (1, 24, 117)
REFERENCE_SLICES = 200  # the structure counts run on 512 x 512 x 200
ONE_PROMPT = "liver"
TARGET_WALL_24, TARGET_RSS_24 = 1.15, 1.3
RAW = Path(tempfile.gettempdir()) / "bench_scaling_results.json"


# ------------------------------------------------------------------------------ pure helpers


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``(slope, intercept)`` of the least-squares line ``y = slope * x + intercept``.

    Raises:
        ValueError: fewer than two points, lengths differ, or all ``xs`` equal.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need two or more (x, y) pairs, got {len(xs)} x and {len(ys)} y")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x are equal: no line")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def run_order(cases: Sequence, repetition: int) -> list:
    """The cases in the given order on even repetitions, reversed on odd ones."""
    return list(cases) if repetition % 2 == 0 else list(reversed(cases))


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-repetition ratios ``numerator[i] / denominator[i]``."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("need equally many runs of both, at least one")
    return statistics.median(n / d for n, d in zip(numerator, denominator))


# ------------------------------------------------------------------------------ the stage worker


def run_stages(image: Path, out_dir: Path, prompts: list[str], model_dir: Path) -> dict:
    """``volumed segment``'s function on ``image`` with timing hooks; seconds and peak RSS (MiB)
    after each stage (``ru_maxrss`` only grows, so the first stage whose peak reaches the final
    one is where the peak is set)."""
    import resource

    import volumed.inference.segment as seg
    import volumed.io.masks as masks

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    out: dict = {"seconds": {}, "peak_rss_after": {}, "rss_start": rss()}
    inside = {"predict": False}
    extra = {"mask_writes": 0.0, "mask_statistics": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            if not inside["predict"]:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                extra[key] += time.perf_counter() - start
        return wrapper

    masks.write_mask_nifti = timed(masks.write_mask_nifti, "mask_writes")  # the per-term masks (on_mask)
    seg.compute_statistics = timed(seg.compute_statistics, "mask_statistics")

    start = time.perf_counter()
    predictor = seg.PromptSegPredictor.from_package(model_dir)
    out["seconds"]["load"] = time.perf_counter() - start
    out["peak_rss_after"]["load"] = rss()

    for name in ("preprocess", "predict_probabilities"):
        method = getattr(predictor, name)

        def hooked(*args, _method=method, _name=name, **kwargs):
            result = _method(*args, **kwargs)
            out["peak_rss_after"][_name] = rss()
            return result
        setattr(predictor, name, hooked)

    predict = predictor.predict

    def hooked_predict(*args, **kwargs):
        inside["predict"] = True
        try:
            prediction = predict(*args, **kwargs)
        finally:
            inside["predict"] = False
        out["prediction_seconds"] = dict(prediction.seconds)
        out["peak_rss_after"]["invert"] = rss()
        return prediction
    predictor.predict = hooked_predict

    result = seg.segment(image, prompts, model_dir=model_dir, out_dir=out_dir, allow_untrained=True,
                         progress=False, postprocess=False, predictor=predictor)
    out["peak_rss_after"]["write"] = rss()
    out["segment_seconds"] = dict(result.seconds)
    out["extra_seconds"] = extra
    out["present"] = sum(t.present for t in result.terms)
    return out


def stage_line(n: int, stages: dict) -> str:
    """One line of the stage breakdown of a run with ``n`` structures."""
    s, p, x = stages["segment_seconds"], stages["prediction_seconds"], stages["extra_seconds"]
    rss = stages["peak_rss_after"]
    return (
        f"{n} structure(s) ({stages['present']} present): load {stages['seconds']['load']:.1f}, read {s['read']:.1f}, "
        f"queries {p['queries']:.1f}, preprocess {p['preprocess']:.1f}, sliding window {p['sliding_window']:.1f}, "
        f"invert {p['invert']:.1f} (of which connected components {p.get('postprocess', 0.0):.1f}, mask NIfTI writes "
        f"{x['mask_writes']:.1f}, statistics {x['mask_statistics']:.1f}), final writes {s['write']:.1f}; segment() total "
        f"{s['total']:.1f} s. Peak RSS after the imports {stages['rss_start']:,.0f}, model load {rss['load']:,.0f}, read and preprocess {rss['preprocess']:,.0f}, sliding window "
        f"{rss['predict_probabilities']:,.0f}, invert {rss['invert']:,.0f}, writes {rss['write']:,.0f} MiB"
    )


def stage_split(stages: dict) -> dict[str, float]:
    """Seconds of one instrumented run split into parts that add up to ``segment()``'s total."""
    s, p, x = stages["segment_seconds"], stages["prediction_seconds"], stages["extra_seconds"]
    parts = {
        "read and checks": s["read"],
        "queries and preprocessing": p["queries"] + p["preprocess"],
        "sliding window": p["sliding_window"],
        "per-term mask NIfTI writes": x["mask_writes"],
        "per-term statistics": x["mask_statistics"],
        "inversion, thresholds, label map": p["invert"] - x["mask_writes"] - x["mask_statistics"],
        "final writes (label map, JSON, preview)": s["write"],
    }
    parts["other"] = s["total"] - sum(parts.values())
    return parts


def growth_line(n: int, base: dict, other: dict) -> str:
    """Where the extra seconds and MiB of ``n`` structures over one go, from two instrumented runs."""
    a, b = stage_split(base), stage_split(other)
    delta = {k: b[k] - a[k] for k in a}
    extra = sum(delta.values())
    top = sorted(delta.items(), key=lambda kv: -kv[1])
    peak_a, peak_b = base["peak_rss_after"], other["peak_rss_after"]
    stage_peak = next(k for k, v in peak_b.items() if v >= max(peak_b.values()))
    return (
        f"1 -> {n} structures: segment() +{extra:.1f} s ({sum(a.values()):.1f} -> {sum(b.values()):.1f} s), of which "
        + ", ".join(f"{k} {v:+.1f} s" for k, v in top if abs(v) >= 0.05)
        + f"; peak RSS {max(peak_a.values()):,.0f} -> {max(peak_b.values()):,.0f} MiB, reached by the end of "
        + {"load": "the model load", "preprocess": "read and preprocessing", "predict_probabilities": "the sliding window",
           "invert": "the inversion (per-term masks)", "write": "the final writes"}[stage_peak]
    )


# --------------------------------------------------------------------------------- the driver


def prompt_sets(model_dir: Path) -> tuple[dict[int, list[str]], int]:
    """Prompts per structure count, and how many of the 117 are trained terms of the package."""
    from volumed.data.vocab import TOTALSEG_CT_CLASSES
    from volumed.inference.package import read_config

    trained = set(read_config(model_dir).terms)
    sets = {1: [ONE_PROMPT], 24: default_prompts(model_dir), 117: list(TOTALSEG_CT_CLASSES)}
    assert ONE_PROMPT in sets[24] and len(sets[117]) == 117
    return sets, sum(t in trained for t in sets[117])


def command(image: Path, prompts: list[str], out: Path, model_dir: Path) -> list[str]:
    volumed = str(Path(sys.executable).parent / "volumed")
    return [volumed, "segment", str(image), *[a for p in prompts for a in ("-p", p)], "-o", str(out),
            "--model", str(model_dir), "--no-postprocess", "--no-progress", "--allow-untrained"]


def measure(cases: list[tuple[int, int]], images: dict[int, Path], prompts: dict[int, list[str]], repeats: int,
            work: Path, env: dict, model_dir: Path, raw: dict) -> dict:
    runs = raw.setdefault("runs", {})
    for rep in range(repeats):
        for slices, n in run_order(cases, rep):
            key = f"{slices}x{n}"
            out = work / f"out_{key}_{rep}"
            wall, rss, cpu = spawn(command(images[slices], prompts[n], out, model_dir), env)
            subprocess.run(["rm", "-rf", str(out)], check=False)
            r = runs.setdefault(key, {"wall": [], "rss": [], "cpu": []})
            r["wall"].append(wall)
            r["rss"].append(rss)
            r["cpu"].append(cpu)
            print(f"  rep {rep + 1}/{repeats} {slices} slices, {n} structure(s): {wall:.1f} s wall, {cpu:.1f} s CPU, "
                  f"{rss:,.0f} MiB", flush=True)
            RAW.write_text(json.dumps(raw, indent=1))  # a long run is never lost to the table code
    return runs


def report_lines(raw: dict) -> list[str]:
    shapes, trained117 = raw["shapes"], raw["trained117"]
    # Complete repetitions only (a series cut short and rebuilt with --from-results).
    repeats = min(len(v["wall"]) for v in raw["runs"].values())
    runs = {k: {m: v[m][:repeats] for m in ("wall", "rss", "cpu")} for k, v in raw["runs"].items()}
    med = {k: {m: statistics.median(v[m]) for m in ("wall", "rss", "cpu")} for k, v in runs.items()}
    ref = f"{REFERENCE_SLICES}x1"
    lines = [
        f"CT `tcia_ccth_a01/ct.nii.gz` (311 x 248 x 296, 1.5 x 1.5 x 2.5 mm) resampled (trilinear) over its field of view "
        f"to 512 x 512 x {' / '.join(sorted(shapes, key=int))} (slice spacing "
        f"{' / '.join(shapes[s]['spacing_z'] for s in sorted(shapes, key=int))} mm; "
        "the same anatomy, the same 4 mm model grid). Default model `bundles/volumed_promptseg_ct/models` (presence rule on). "
        "Each run: `volumed segment IMAGE -p ... -o OUT --model MODEL --no-postprocess --no-progress --allow-untrained` "
        f"in a fresh process; {repeats} repetition(s), every case once per repetition, the order reversed on odd ones; "
        "medians; peak RSS = the child's ru_maxrss, CPU its user + system time. Structures: 1 = liver; 24 = those of "
        f"`bench_monai_baseline.py`; 117 = the TotalSegmentator v2 CT classes, of which {trained117} are trained terms of "
        f"the package (the other {117 - trained117} segmented with `--allow-untrained`).",
        "",
        "| slices | structures | wall s (median) | all runs s | CPU s (median) | peak RSS MiB (median) | all runs MiB | wall x 1 structure | RSS x 1 structure |",
        "| -----: | ---------: | --------------: | ---------- | -------------: | --------------------: | ------------ | -----------------: | ----------------: |",
    ]
    for key in sorted(runs, key=lambda k: tuple(map(int, k.split("x")))):
        slices, n = map(int, key.split("x"))
        r, m = runs[key], med[key]
        if slices == REFERENCE_SLICES and key != ref:
            wall_x = f"**{m['wall'] / med[ref]['wall']:.2f}** ({paired_ratio(r['wall'], runs[ref]['wall']):.2f})"
            rss_x = f"**{m['rss'] / med[ref]['rss']:.2f}** ({paired_ratio(r['rss'], runs[ref]['rss']):.2f})"
        elif key == ref:
            wall_x = rss_x = "1.00"
        else:
            wall_x = rss_x = "-"
        lines.append(f"| {slices} | {n} | {m['wall']:.1f} | {', '.join(f'{w:.1f}' for w in r['wall'])} | {m['cpu']:.1f} | "
                     f"{m['rss']:,.0f} | {', '.join(f'{v:,.0f}' for v in r['rss'])} | {wall_x} | {rss_x} |")
    lines.append("")
    one = [k for k in (f"{s}x1" for s in SLICES) if k in runs]
    if len(one) >= 2:
        xs = [int(k.split("x")[0]) for k in one]
        slope, intercept = least_squares(xs, [med[k]["rss"] * 2**20 / 1e6 for k in one])
        wslope, wintercept = least_squares(xs, [med[k]["wall"] for k in one])
        voxels_mb = IN_PLANE[0] * IN_PLANE[1] / 1e6
        lines.append(
            f"Slices (1 structure): peak RSS = **{slope:.2f} MB per slice** x slices + **{intercept:,.0f} MB** "
            f"({slope * 1e6 / 2**20:.2f} MiB per slice + {intercept * 1e6 / 2**20:,.0f} MiB) "
            f"(least squares over {', '.join(map(str, xs))} slices, medians; MB = 10^6 bytes); one 512 x 512 slice is "
            f"{voxels_mb:.2f} M voxels, so the slope is {slope / voxels_mb:.1f} bytes per input voxel. "
            f"Wall = {wslope * 1000:.1f} ms per slice x slices + {wintercept:.1f} s."
        )
    verdicts = []
    for n, wall_t, rss_t in ((24, TARGET_WALL_24, TARGET_RSS_24), (117, None, None)):
        key = f"{REFERENCE_SLICES}x{n}"
        if key not in runs or ref not in runs:
            continue
        w, r = med[key]["wall"] / med[ref]["wall"], med[key]["rss"] / med[ref]["rss"]
        c = med[key]["cpu"] / med[ref]["cpu"]
        if wall_t is None:
            verdicts.append(f"{n}/1: wall {w:.2f}x, RSS {r:.2f}x, CPU {c:.2f}x (no target)")
        else:
            verdicts.append(f"{n}/1: wall {w:.2f}x (target <= {wall_t}x: {'met' if w <= wall_t else '**not met**'}), "
                            f"RSS {r:.2f}x (target <= {rss_t}x: {'met' if r <= rss_t else '**not met**'}), "
                            f"CPU {c:.2f}x (the steadier measure on a shared machine)")
    if verdicts:
        lines.append("Structures (512 x 512 x 200, ratios of the medians): " + "; ".join(verdicts) + ".")
    if raw.get("stages"):
        lines += ["", "Stage timings (s) and peak RSS, one extra run each of `segment()` (what the command calls) with "
                  "hooks, 512 x 512 x 200, in a fresh process (wall seconds, on the shared cores):", ""]
        lines += [f"- {stage_line(int(n), s)}." for n, s in sorted(raw["stages"].items(), key=lambda kv: int(kv[0]))]
        if "1" in raw["stages"]:
            lines.append("")
            lines += [f"- {growth_line(int(n), raw['stages']['1'], s)}." for n, s in
                      sorted(raw["stages"].items(), key=lambda kv: int(kv[0])) if n != "1"]
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--stages-worker":  # one instrumented run in this process (spawned by the driver)
        import volumed  # noqa: F401  the same import-time deferrals as volumed segment

        model_dir, image, out_dir, stage_file, *prompts = argv[1:]
        Path(stage_file).write_text(json.dumps(run_stages(Path(image), Path(out_dir), prompts, Path(model_dir))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of every case (median)")
    parser.add_argument("--slices", type=int, nargs="+", default=list(SLICES), help="slice counts of the 1-structure runs")
    parser.add_argument("--structures", type=int, nargs="+", default=list(STRUCTURES), choices=STRUCTURES,
                        help="structure counts on 512 x 512 x 200")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="one instrumented run per structure count for the stage timings")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: torch's)")
    parser.add_argument("--from-results", type=Path, default=None, help="rebuild the section from a raw results JSON")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    if args.from_results:
        raw = json.loads(args.from_results.read_text())
    else:
        raw = collect(args)
    lines = report_lines(raw)
    cmd = raw.get("command") or "python " + shlex.join(["bench/bench_scaling.py", *argv])
    header = [HEADING, "", f"Date: {raw.get('date') or f'{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}'}. Command: `{cmd}`. "
              f"Machine: {raw.get('machine') or machine_description()}.", ""]
    print("\n".join(header + lines))
    if args.no_write:
        return
    write_section(args.output, HEADING, "\n".join(header + lines) + "\n")
    print(f"wrote the section {HEADING!r} of {args.output}")


def collect(args) -> dict:
    import nibabel as nib

    from volumed.bundle.promptseg import prompt_embeddings

    prompts, trained117 = prompt_sets(MODEL)
    prompt_embeddings(MODEL, sorted({p for ps in prompts.values() for p in ps}))  # fills the embedding cache
    work = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cases = [(REFERENCE_SLICES, n) for n in args.structures if n != 1]
    cases = [(REFERENCE_SLICES, 1), *cases] + [(s, 1) for s in args.slices if s != REFERENCE_SLICES]
    images, shapes = {}, {}
    for slices in sorted({s for s, _ in cases}):
        images[slices] = work / f"ct_{IN_PLANE[0]}x{IN_PLANE[1]}x{slices}.nii.gz"
        resample_keeping_fov(IMAGE, images[slices], (*IN_PLANE, slices))
        img = nib.load(str(images[slices]))
        shapes[str(slices)] = {"shape": list(img.shape), "spacing_z": f"{float(img.header.get_zooms()[2]):.2f}"}
        print(f"{images[slices].name}: {img.shape}, {img.header.get_zooms()}", flush=True)
    raw = {"shapes": shapes, "trained117": trained117, "command": "python " + shlex.join(["bench/bench_scaling.py", *sys.argv[1:]])}
    try:
        if args.stages:  # first: the breakdown survives a timed series cut short
            raw["stages"] = {}
            for n in args.structures:
                stage_file = work / f"stages_{n}.json"
                start = time.perf_counter()
                spawn([sys.executable, str(Path(__file__).resolve()), "--stages-worker", str(MODEL), str(images[REFERENCE_SLICES]),
                       str(work / f"stages_out_{n}"), str(stage_file), *prompts[n]], env)
                raw["stages"][str(n)] = json.loads(stage_file.read_text())
                print(f"  stages, {n} structure(s): {time.perf_counter() - start:.1f} s", flush=True)
                RAW.write_text(json.dumps(raw, indent=1))
        measure(cases, images, prompts, args.repeats, work, env, MODEL, raw)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    raw["date"] = f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    raw["machine"] = machine_description()
    RAW.write_text(json.dumps(raw, indent=1))
    return raw


if __name__ == "__main__":
    main()
