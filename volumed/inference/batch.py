"""Batch inference over a datalist: sharded over worker processes, resumable, never losing a case.

``volumed segment --datalist cases.json -o OUT/ [-p liver ...|--all] [--devices N] [--num-workers K]``::

    datalist (MSD JSON section "testing", else "training"; or CSV with an "image" column)
      -> case ids (an entry's "id", else the image's name without .nii.gz/.nrrd/...)
      -> cases whose OUT/<id>/ exists are done: skipped (a restart resumes where it stopped)
      -> the rest, round robin over N worker processes (rank r: cases r, r + N, ...), each
         loading the model once; K threads per worker read the next volumes ahead
      -> per case: volumed segment into OUT/.partial/<id>/, then one rename to OUT/<id>/
      -> OUT/batch_summary.json: done, skipped and failed cases (with the error), written atomically

Why nothing is lost or done twice: a case's folder appears only by the final rename, which is
atomic, so ``OUT/<id>/`` exists if and only if the case is complete. A process killed at any moment
(even SIGKILL) leaves at most the hidden ``OUT/.partial/`` folder, which the next run deletes
before starting; the complete cases are skipped. A case that fails (unreadable file, not CT or MR, ...)
is logged with its error and skipped; it never stops the run, and the next run tries it again.
The progress bar counts cases done and failed, with the rate and ETA.

Workers are processes (multiprocessing, spawn), each with ``torch`` threads = cores / N on the
CPU, or GPU ``cuda:rank`` with ``--device cuda``. Inference needs no communication between ranks,
so there is no process group: the parent process hands out nothing but the shard, and collects
each case's outcome from a queue.
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_module
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from volumed.errors import ConfigError, OutputExistsError

log = logging.getLogger(__name__)

SUMMARY_NAME = "batch_summary.json"
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


@dataclass(frozen=True)
class BatchCase:
    """One case: its id (the output folder's name) and image (file or DICOM folder)."""

    case_id: str
    image: Path
    modality: str | None = None


@dataclass
class BatchSummary:
    """What a batch run did: ``done`` (segmented now), ``skipped`` (complete before), ``failed``
    (``{case_id: error}``), the output root and the wall time in seconds."""

    out_root: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"out_root": str(self.out_root), "done": sorted(self.done), "skipped": sorted(self.skipped),
                "failed": dict(sorted(self.failed.items())), "seconds": round(self.seconds, 1)}  # fmt: skip

    def lines(self) -> list[str]:
        out = [f"{len(self.done)} case(s) segmented, {len(self.skipped)} already done, {len(self.failed)} failed "
               f"({self.seconds:.0f} s); outputs in {self.out_root}"]  # fmt: skip
        out += [f"failed: {cid}: {err}" for cid, err in sorted(self.failed.items())]
        return out


def _case_id(image: Path) -> str:
    name = image.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def batch_cases(datalist: str | Path, section: str | None = None) -> list[BatchCase]:
    """The cases of ``datalist`` (module docstring for the section and the ids). Image files are
    not checked here: a missing one is a failed case, not a failed run.

    Raises:
        DatalistError: a malformed datalist; ConfigError: two cases with the same id.
    """
    from volumed.data.datalist import load_datalist

    path = Path(datalist)
    if section is None:
        section = "training"
        if path.suffix.lower() == ".json":
            try:
                if json.loads(path.read_text()).get("testing"):
                    section = "testing"
            except (OSError, ValueError):
                pass  # load_datalist reports it properly
    entries = load_datalist(path, section=section, check_files=False)
    cases: list[BatchCase] = []
    seen: dict[str, int] = {}
    for e in entries:
        cid = str(e.extra.get("id") or _case_id(e.image))
        if not cid or cid.startswith(".") or "/" in cid:
            raise ConfigError(f"entry {e.row}: case id {cid!r} cannot name an output folder", path)
        if cid in seen:
            raise ConfigError(f"entries {seen[cid]} and {e.row} have the same case id {cid!r}; give each an 'id'", path)
        seen[cid] = e.row
        cases.append(BatchCase(cid, e.image, e.modality))
    return cases


PARTIAL_DIR = ".partial"


def _partial(out_root: Path, case_id: str) -> Path:
    # Under one hidden folder: volumed segment stages its own work next to its output folder, so
    # everything an interrupted case can leave behind is in here.
    return out_root / PARTIAL_DIR / case_id


def _segment_shard(rank: int, world: int, cases: Sequence[BatchCase], out_root: Path, options: dict[str, Any],
                   num_workers: int, threads: int | None, report) -> None:  # fmt: skip
    """Worker ``rank`` of ``world``: segment cases ``rank, rank + world, ...`` and ``report(kind,
    case_id, detail)`` each outcome."""
    import torch

    from volumed.inference.segment import PromptSegPredictor, read_package_config, segment
    from volumed.io import read_volume

    if threads:
        torch.set_num_threads(int(threads))
    device = str(options.get("device", "cpu"))
    if device.startswith("cuda") and world > 1 and ":" not in device:
        device = f"cuda:{rank}"
    model_path, _ = read_package_config(options.get("model_dir"))
    predictor = PromptSegPredictor.from_package(model_path, device=device)
    mine = list(cases)[rank::world]

    def read(case: BatchCase):
        return read_volume(case.image, modality=case.modality)

    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    pending = [pool.submit(read, c) for c in mine[: num_workers + 1]] if pool else []
    for k, case in enumerate(mine):
        partial = _partial(out_root, case.case_id)
        t0 = time.perf_counter()
        try:
            if pool:
                if k + num_workers + 1 < len(mine):  # keep num_workers reads ahead, whatever this one gives
                    pending.append(pool.submit(read, mine[k + num_workers + 1]))
                volume = pending[k].result()
            else:
                volume = read(case)
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            segment(volume, options.get("prompts", ()), model_dir=model_path, out_dir=partial,
                    all_terms=bool(options.get("all_terms")), allow_free_text=bool(options.get("allow_free_text")),
                    allow_untrained=bool(options.get("allow_untrained")), device=device, progress=False,
                    postprocess=options.get("postprocess", True), anatomy_check=options.get("anatomy_check", True),
                    predictor=predictor)  # fmt: skip
            os.replace(partial, out_root / case.case_id)  # the case exists from here on, complete
            report("done", case.case_id, round(time.perf_counter() - t0, 2))
        except Exception as err:  # one bad case never ends the run: it is reported and skipped
            shutil.rmtree(partial, ignore_errors=True)
            msg = " | ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
            report("failed", case.case_id, f"{type(err).__name__}: {msg}")
    if pool:
        pool.shutdown(wait=False, cancel_futures=True)


def _worker_main(rank: int, world: int, cases, out_root, options, num_workers, threads, queue) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        _segment_shard(rank, world, cases, Path(out_root), options, num_workers, threads,
                       lambda kind, cid, detail: queue.put((kind, cid, detail)))  # fmt: skip
    finally:
        queue.put(("exit", rank, None))


def run_batch(
    datalist: str | Path,
    out_root: str | Path,
    prompts: Sequence[str] = (),
    *,
    model_dir: str | Path | None = None,
    all_terms: bool = False,
    allow_free_text: bool = False,
    allow_untrained: bool = False,
    postprocess: bool = True,
    anatomy_check: bool = True,
    devices: int = 1,
    num_workers: int = 1,
    device: str = "cpu",
    section: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Segment every case of ``datalist`` into ``out_root/<case id>/`` (module docstring).

    Args:
        prompts, all_terms, allow_free_text, allow_untrained, postprocess, anatomy_check, model_dir: as
            :func:`volumed.inference.segment.segment`, for every case.
        devices: worker processes (ranks); num_workers: read-ahead threads per worker (0: none).
        device: ``cpu``, or ``cuda`` (rank r uses ``cuda:r``).
        overwrite: segment complete cases again (their folders are replaced).

    Returns:
        The :class:`BatchSummary`, also written to ``out_root/batch_summary.json``.
    """
    import multiprocessing as mp

    from volumed.inference.segment import read_package_config
    from volumed.io.atomic import atomic_write_text, check_creatable

    t0 = time.perf_counter()
    if devices < 1 or num_workers < 0:
        raise ConfigError(f"devices must be >= 1 and num_workers >= 0, got {devices} and {num_workers}", "--devices")
    if not prompts and not all_terms:
        raise ConfigError("give at least one anatomy prompt (--prompt liver) or --all", "prompts")
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise OutputExistsError("output path exists and is not a folder", out_root)
    check_creatable(out_root)
    read_package_config(model_dir)  # a bad model folder fails now, not in every worker
    cases = batch_cases(datalist, section)
    out_root.mkdir(parents=True, exist_ok=True)
    # A killed run leaves only the hidden partial folder: it goes, its cases are redone.
    shutil.rmtree(out_root / PARTIAL_DIR, ignore_errors=True)
    summary = BatchSummary(out_root)
    todo = []
    for case in cases:
        final = out_root / case.case_id
        if final.exists() and not overwrite:
            summary.skipped.append(case.case_id)
        else:
            if final.exists():
                shutil.rmtree(final)
            todo.append(case)
    options = {"prompts": list(prompts), "model_dir": str(model_dir) if model_dir else None, "all_terms": all_terms,
               "allow_free_text": allow_free_text, "allow_untrained": allow_untrained, "postprocess": postprocess,
               "anatomy_check": anatomy_check, "device": device}  # fmt: skip
    world = max(1, min(int(devices), len(todo))) if todo else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // world) if device == "cpu" else None

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="case", desc="segment", disable=not progress or not todo, dynamic_ncols=True)

    def record(kind: str, cid: str, detail) -> None:
        if kind == "done":
            summary.done.append(cid)
        else:
            summary.failed[cid] = str(detail)
            log.warning("case %s failed: %s", cid, detail)
        bar.update(1)
        bar.set_postfix(failed=len(summary.failed))

    if todo and world == 1:
        _segment_shard(0, 1, todo, out_root, options, num_workers, threads, record)
    elif todo:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker_main, args=(r, world, todo, str(out_root), options, num_workers, threads, queue),
                             daemon=False) for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        running = set(range(world))
        while running:
            try:
                kind, cid, detail = queue.get(timeout=2.0)
            except queue_module.Empty:
                dead = [r for r in running if not procs[r].is_alive() and procs[r].exitcode not in (0, None)]
                for r in dead:  # a worker killed outright: its unreported cases failed
                    running.discard(r)
                    for case in todo[r::world]:
                        if case.case_id not in summary.done and case.case_id not in summary.failed:
                            record("failed", case.case_id, f"worker {r} died (exit code {procs[r].exitcode})")
                continue
            if kind == "exit":
                running.discard(int(cid))
            else:
                record(kind, cid, detail)
        for p in procs:
            p.join()
    for case in todo:  # a worker that stopped early leaves cases unreported: they failed
        if case.case_id not in summary.done and case.case_id not in summary.failed:
            record("failed", case.case_id, "not processed: its worker stopped early (see the log)")
    bar.close()
    shutil.rmtree(out_root / PARTIAL_DIR, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    atomic_write_text(out_root / SUMMARY_NAME, json.dumps(summary.to_dict(), indent=2) + "\n", overwrite=True)
    return summary
