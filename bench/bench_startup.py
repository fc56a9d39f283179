"""Start-up of ``volumed segment``: process wall against the work inside ``segment()`` and ``import torch``.

Usage::

    python bench/bench_startup.py                 # print, and write the section of BENCHMARKS.md
    python bench/bench_startup.py --no-write --repeats 1

Issue 22 item 3: on a small image with one cached prompt, ``volumed segment`` may add at most 2 s of
process wall to the work inside ``segment()`` plus ``python -c 'import torch'``, and ``volumed
--help`` stays under 1 s. Each repetition runs, in a fresh process each and in an order that
rotates between repetitions (so that other load on the machine hits all alike):

* ``python -c 'import torch'``;
* ``volumed --help``;
* ``python -c 'import volumed.inference.segment'`` (what the segment path imports before any work);
* ``volumed segment IMAGE -p liver -o OUT --overwrite --no-progress``, the installed command;
* the same command through a tiny harness (``python -c HARNESS``) that wraps
  :func:`volumed.inference.segment.segment` with a clock and writes its ``seconds`` (read, predict,
  write, total) to a file: the work inside ``segment()``. ``segment()`` reports the same ``total``
  (rounded) in its last line, "wrote OUT (...) in 3.4 s".

Image: the real CT ``example_ct_sm.nii.gz`` (122 x 101 x 30 at 3 mm) of ../shared/data; model: the
default package ``bundles/volumed_promptseg_ct/models``. The embedding cache is a fresh folder
(``VOLUMED_CACHE_DIR``) filled by one warm-up run of each command, which also warms the OS file
cache; the warm-up is not counted. Wall: ``time.perf_counter`` around ``subprocess.run``; CPU:
the child's user + system time (``os.wait4``; inside ``segment()``: ``time.process_time``), much
less sensitive to other load on the machine than the wall. Figures are medians over the repetitions; the overhead is
``median(volumed segment wall) - median(inside segment()) - median(import torch)``.

The section "## Start-up: volumed segment with a cached prompt" of BENCHMARKS.md is replaced; other
sections are kept.
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

from _report import machine_description, write_section  # bench/ is on sys.path when run as a script

HEADING = "## Start-up: volumed segment with a cached prompt"
REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VOLUMED_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGE = DATA / "totalsegmentator_ct_sm" / "example_ct_sm.nii.gz"
TARGET_OVERHEAD_S = 2.0
TARGET_HELP_S = 1.0

# Runs the CLI exactly as the installed ``volumed`` script does, with segment() wrapped in a clock.
HARNESS = """
import json, sys, time
import volumed.inference.segment as module
real = module.segment
def timed(*args, **kwargs):
    start, cpu = time.perf_counter(), time.process_time()
    result = real(*args, **kwargs)
    seconds = dict(result.seconds, inside=time.perf_counter() - start, inside_cpu=time.process_time() - cpu)
    with open(sys.argv[1], "w") as fh:
        json.dump(seconds, fh)
    return result
module.segment = timed
from volumed.cli import main
main(sys.argv[2:])
"""


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s): ``os.wait4`` gives the child's own user + system time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def measure(repeats: int, image: Path, prompt: str) -> dict[str, dict[str, list[float]]]:
    """Per command: ``wall`` and ``cpu`` seconds of each repetition (and the harness's inner seconds)."""
    python = sys.executable
    volumed = str(Path(python).parent / "volumed")
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    env = {**os.environ, "VOLUMED_CACHE_DIR": str(work / "cache")}
    seconds_file = work / "seconds.json"
    segment_args = ["segment", str(image), "-p", prompt, "-o", str(work / "out"), "--overwrite", "--no-progress"]
    commands = {
        "import torch": [python, "-c", "import torch"],
        "volumed --help": [volumed, "--help"],
        "import volumed.inference.segment": [python, "-c", "import volumed.inference.segment"],
        "volumed segment": [volumed, *segment_args],
        "harness": [python, "-c", HARNESS, str(seconds_file), *segment_args],
    }
    names = list(commands)
    runs: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    inner: dict[str, list[float]] = {}
    for name in names:  # warm-up: fills the embedding cache and the OS file cache
        _spawn(commands[name], env)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            wall, cpu = _spawn(commands[name], env)
            runs[name]["wall"].append(wall)
            runs[name]["cpu"].append(cpu)
            if name == "harness":
                for key, value in json.loads(seconds_file.read_text()).items():
                    inner.setdefault(key, []).append(float(value))
    runs["inside segment()"] = {"wall": inner["inside"], "cpu": inner["inside_cpu"]}
    runs["inner stages"] = inner
    return runs


def table(runs: dict, repeats: int, image: Path, prompt: str) -> list[str]:
    med = {name: statistics.median(r["wall"]) for name, r in runs.items() if name != "inner stages"}
    cpu = {name: statistics.median(r["cpu"]) if r.get("cpu") else None for name, r in runs.items() if name != "inner stages"}
    torch_s, inside = med["import torch"], med["inside segment()"]
    overhead = med["volumed segment"] - inside - torch_s
    overhead_harness = med["harness"] - inside - torch_s
    overhead_cpu = cpu["volumed segment"] - cpu["inside segment()"] - cpu["import torch"]
    lines = [
        f"Image: `{image.name}` (real CT, 122 x 101 x 30 at 3 mm), prompt `{prompt}`, default model "
        f"`bundles/volumed_promptseg_ct/models`, embedding cache warm (filled by an uncounted warm-up run). "
        f"{repeats} repetitions, each command in a fresh process, order rotated between repetitions; medians. "
        "CPU: the child's user + system time.",
        "",
        "| command | wall s (median) | all runs s | CPU s (median) | x import torch |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    rows = ["import torch", "volumed --help", "import volumed.inference.segment", "volumed segment", "harness", "inside segment()"]
    labels = {
        "import torch": "`python -c 'import torch'`",
        "volumed --help": "`volumed --help`",
        "import volumed.inference.segment": "`python -c 'import volumed.inference.segment'`",
        "volumed segment": f"`volumed segment {image.name} -p {prompt} -o OUT --overwrite --no-progress`",
        "harness": "the same, through the timing harness",
        "inside segment()": "work inside `segment()` (harness clock)",
    }
    for name in rows:
        walls = runs[name]["wall"]
        c = cpu[name]
        lines.append(f"| {labels[name]} | {med[name]:.2f} | {', '.join(f'{w:.2f}' for w in walls)} | "
                     f"{'-' if c is None else f'{c:.2f}'} | {med[name] / torch_s:.2f} |")
    stages = runs["inner stages"]
    lines += [
        "",
        "Inside `segment()` (median s, its own `seconds`): " + ", ".join(f"{k} {statistics.median(stages[k]):.2f}" for k in ("read", "predict", "write", "total")) + ".",
        "",
        f"**Overhead** = `volumed segment` wall - inside `segment()` - `import torch` = {med['volumed segment']:.2f} - {inside:.2f} - "
        f"{torch_s:.2f} = **{overhead:.2f} s** (through the harness: {overhead_harness:.2f} s); target <= {TARGET_OVERHEAD_S:.0f} s: "
        f"{'met' if overhead <= TARGET_OVERHEAD_S else 'not met'}. "
        f"`volumed --help`: {med['volumed --help']:.2f} s, target < {TARGET_HELP_S:.0f} s: {'met' if med['volumed --help'] < TARGET_HELP_S else 'not met'}.",
        f"The same in CPU time (user + system; less sensitive to the other load on the machine): "
        f"{cpu['volumed segment']:.2f} - {cpu['inside segment()']:.2f} - {cpu['import torch']:.2f} = {overhead_cpu:.2f} s.",
        f"Imports of the segment path beyond torch: {med['import volumed.inference.segment'] - torch_s:.2f} s of wall "
        f"({cpu['import volumed.inference.segment'] - cpu['import torch']:.2f} s CPU).",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of every command (median)")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--prompt", default="liver")
    parser.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)

    runs = measure(args.repeats, args.image, args.prompt)
    lines = table(runs, args.repeats, args.image, args.prompt)
    command = "python " + " ".join(shlex.quote(a) for a in ["bench/bench_startup.py", *(argv if argv is not None else sys.argv[1:])])
    header = [HEADING, "", f"Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}. Command: `{command}`. Machine: {machine_description()}.", ""]
    print("\n".join(header + lines))
    if args.no_write:
        return
    write_section(args.output, HEADING, "\n".join(header + lines) + "\n")
    print(f"wrote the section {HEADING!r} of {args.output}")


if __name__ == "__main__":
    main()
