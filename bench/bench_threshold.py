"""The mask threshold on unseen scans: leave-one-out Dice and false structures at several thresholds.

    python bench/bench_threshold.py [--loso NAME=RUNS ...] [--thresholds 0.5 0.4 0.3] [--jobs 2]

Why: a network is less sure of a scan it never trained on. On example_ct_sm left out, the
kidneys' probability stays under 0.5 over most of their reference (recall 0.14-0.34 at 0.5, 0.35-0.59
at 0.1; precision 0.72-0.99 throughout), and on the thorax crop left out, 60 % of the heart's
contrast blood is under 0.5 (docs/synthesis.md, round 22). A lower mask threshold finds more of a
structure that is there, and more of what is not: both are measured here, on the same runs.

For each leave-one-out run (``runs/generalisation/RUNS/loso_<scan>/package``, trained by
``bench/bench_generalisation.py``) and each threshold, the left-out scan is segmented as
``volumed segment --all`` writes it (post-processing, lung outline, presence rule, anatomy check),
with the package's mask threshold replaced; nothing is retrained. Reported per run and threshold:

* the mean leave-one-out Dice of the issue's target structures (``TARGETS``) the scan holds, and
  how many of those scores rose or fell by more than 0.005 against the first threshold given;
* **false structures**: terms reported present that the scan is known not to hold: annotated by
  its label map or masks and empty there, or listed ``absent`` in the datalist (the thorax crop's
  kidneys, bowel and pelvis). example_ct_sm and the DICOM slab are annotated for every trained
  term; tcia_ccth_a01 only for its 10, so its false structures are not counted.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import bench_parser, machine_description, publish  # noqa: E402
from bench_generalisation import SCANS, TARGETS, _sources, evaluate  # noqa: E402

HEADING = "## The mask threshold on unseen scans"


def _one(task: tuple[str, str, float, int]) -> tuple[str, str, float, dict]:
    runs, scan, threshold, threads = task
    torch.set_num_threads(threads)
    package = REPO / "runs" / "generalisation" / runs / f"loso_{scan}" / "package"
    return runs, scan, threshold, evaluate(package, (scan,), threshold=threshold)[scan]


def known_absent(scan: str, result: dict) -> set[str]:
    """Terms ``scan`` is annotated for and does not hold (references too small to score excluded)."""
    src = _sources()[scan]
    return (set(src.terms) - set(result["dice"]) - set(result["too_small"])) | set(src.absent)


def measure(loso: dict[str, str], thresholds: list[float], jobs: int, threads: int) -> dict:
    """``{name: {threshold: {scan: result}}}`` (``evaluate``'s result, one per fold)."""
    tasks = []
    for runs in loso.values():
        for scan in SCANS:
            package = REPO / "runs" / "generalisation" / runs / f"loso_{scan}" / "package"
            if not (package / "model.safetensors").is_file():
                raise SystemExit(f"{package}: no leave-one-out package for {scan} (train it with bench/bench_generalisation.py)")
            tasks += [(runs, scan, t, max(1, threads // jobs)) for t in thresholds]
    by_runs = {runs: name for name, runs in loso.items()}
    out: dict = {name: {t: {} for t in thresholds} for name in loso}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for runs, scan, t, result in pool.map(_one, tasks):
            out[by_runs[runs]][t][scan] = result
    return out


def report(results: dict, thresholds: list[float], command: str) -> str:
    first = thresholds[0]
    lines = [HEADING, "", f"Written by `{command}` ({machine_description()}).", "",
             __doc__.split("\n\n", 2)[2].strip(), "",
             "| leave-one-out runs | threshold | mean target Dice (scores) | rose / fell vs " + f"{first:g}"
             + " | targets met | false structures (mL, all folds) |", "|---|---:|---:|---:|---:|---|"]
    for name, by_t in results.items():
        for t in thresholds:
            scores, met, rose, fell, false = [], 0, 0, 0, []
            for scan, res in by_t[t].items():
                base = by_t[first][scan]["dice_segment"]
                for term, v in res["dice_segment"].items():
                    if term not in TARGETS:
                        continue
                    scores.append(v)
                    met += v >= TARGETS[term]
                    rose += v > base[term] + 0.005
                    fell += v < base[term] - 0.005
                if scan != "tcia_ccth_a01":
                    absent = known_absent(scan, res)
                    false += [f"{scan} {term} {ml:g}" for term, ml in sorted(res["present_ml"].items()) if term in absent]
            mean = sum(scores) / len(scores) if scores else float("nan")
            lines.append(f"| {name} | {t:g} | {mean:.3f} ({len(scores)}) | {rose} / {fell} | {met} | "
                         f"{len(false)}: {', '.join(false) if false else '-'} |")
    # Each target score, run by run: one column per threshold.
    detail = ["", "| leave-one-out runs | left-out scan | structure | " + " | ".join(f"{t:g}" for t in thresholds) + " |",
              "|---|---|---|" + "---:|" * len(thresholds)]
    for name, by_t in results.items():
        for scan in SCANS:
            if scan not in by_t[first]:
                continue
            for term in sorted(by_t[first][scan]["dice_segment"]):
                if term in TARGETS:
                    cells = [by_t[t][scan]["dice_segment"].get(term, float("nan")) for t in thresholds]
                    detail.append(f"| {name} | {scan} | {term} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    return "\n".join(lines + detail) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__, REPO / "BENCHMARKS.md")
    parser.add_argument("--loso", action="append", default=None,
                        help="NAME=RUNS: the folds of runs/generalisation/RUNS (repeatable; default M-hw-ft-sb5)")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[0.5, 0.4, 0.3])
    parser.add_argument("--jobs", type=int, default=2, help="folds evaluated at once (threads split between them)")
    args = parser.parse_args(argv)
    loso = dict(spec.split("=", 1) for spec in (args.loso or ["M-hw-ft-sb5=M-hw-ft-sb5"]))
    results = measure(loso, list(args.thresholds), args.jobs, args.threads)
    command = "python bench/bench_threshold.py " + " ".join(sys.argv[1:] if argv is None else argv)
    publish(args, HEADING, report(results, list(args.thresholds), command.strip()))


if __name__ == "__main__":
    main()
