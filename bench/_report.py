"""Shared by the benchmark scripts: the machine line, section-wise updates of BENCHMARKS.md, and
spawning a measured child process (wall, CPU, peak RSS)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import platform
from pathlib import Path

import torch


def machine_description() -> str:
    """Cores, memory, torch threads and the load average (did other work share the cores?)."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {cores} cores, {mem_gib:.0f} GiB memory, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"load average {load} (1, 5, 15 min) at the end"
    )


def bench_parser(doc: str, benchmarks: Path) -> argparse.ArgumentParser:
    """The options every bench takes: ``--output`` (default ``benchmarks``), ``--no-write``,
    ``--threads`` (torch threads, default 2); described by ``doc``'s first line."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--output", type=Path, default=benchmarks)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def publish(args: argparse.Namespace, heading: str, section: str) -> None:
    """Print ``section``, and write it into ``args.output`` unless ``args.no_write``
    (:func:`bench_parser`'s options)."""
    print(section)
    if not args.no_write:
        write_section(args.output, heading, section)


def write_section(path: Path, heading: str, section: str) -> None:
    """Replace the section that starts with ``heading`` in ``path`` (or append it), keeping the others.

    ``section`` includes its heading line. The file is replaced atomically.
    """
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(heading))
        rest = "\n" + text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text.rstrip("\n") + "\n")
    tmp.replace(path)


# Runs the command and reports its rusage. A child's ru_maxrss starts from the high-water RSS of
# the process it was spawned from (Linux keeps it across exec; with vfork, Python's default, that
# is the parent's own peak): spawned straight from this driver, which may hold torch, embeddings
# and resampled volumes, every run would read at least the driver's peak. Spawned from this
# small launcher instead, the floor is the launcher's own few MiB.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime}))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def spawn(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Run ``argv`` in a fresh process through :data:`LAUNCHER`: (wall s, peak RSS MiB, CPU s
    (user + system)) of the child, from ``os.wait4`` in the launcher: the peak RSS does not
    include this process's own peak."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", LAUNCHER, *argv], env=env, stdout=subprocess.PIPE,
                              stderr=err, text=True)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{shlex.join(argv[:6])} ... failed:\n{err.read().decode()[-3000:]}")
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    return usage["wall"], usage["maxrss_kib"] / 1024.0, usage["cpu"]  # ru_maxrss: KiB on Linux
