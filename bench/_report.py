"""Shared by the benchmark scripts: the machine line and section-wise updates of BENCHMARKS.md."""

from __future__ import annotations

import os
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
