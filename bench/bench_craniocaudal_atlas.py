"""Measure the craniocaudal atlas (:mod:`volumed.data.craniocaudal`) on every labelled subject of
the default datalist, and write it to ``volumed/data/craniocaudal_atlas.json`` and BENCHMARKS.md.

Usage::

    python bench/bench_craniocaudal_atlas.py [--datalist configs/datalists/promptseg_ct_all.json]

For each subject (the real CTs with their reference masks, and the label maps of the
``synthetic`` section, each read on its own grid), each term's superior-inferior extent in world
millimetres and whether the field of view cuts either end. Only these numbers are written: no
mask, no image. The exclusive pairs derived from them are listed in BENCHMARKS.md under
"## Craniocaudal atlas".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _report import machine_description, write_section  # noqa: E402

from volumed.data.craniocaudal import ATLAS_PATH, MIN_GAP_MM, MIN_GAP_ONE_MM, ORDER_MIN_MM, OVERLAP_MM, Extent, exclusive_pairs, ordered_pairs, s_extent  # noqa: E402

HEADING = "## Craniocaudal atlas"
DATALIST = REPO / "configs" / "datalists" / "promptseg_ct_all.json"


def real_subjects(datalist: Path) -> dict[str, dict[str, Extent]]:
    from volumed.io import read_volume
    from volumed.tasks.promptseg import load_promptseg_datalist
    from volumed.tasks.promptseg_data import load_validation_case

    out = {}
    for src in load_promptseg_datalist(datalist, allow_free_text=True):
        volume = read_volume(src.image, modality=src.modality)
        case = load_validation_case(src, volume)
        refs = {t: m for t, m in zip(case.terms, case.masks) if m.any()}
        name = src.image.name.replace(".nii.gz", "") if src.image.name != "ct.nii.gz" else src.image.parent.name
        if name == "ct_cropped":
            name = "thorax_crop_" + src.image.parent.name
        out[name] = {t: e for t, m in refs.items() if (e := s_extent(m, volume.affine)) is not None}
        print(name, len(out[name]), "terms", flush=True)
    return out


def synthetic_subjects(datalist: Path) -> dict[str, dict[str, Extent]]:
    from volumed.data.synthesis import read_structures
    from volumed.tasks.promptseg_data import load_synthetic_sources

    out = {}
    for src in load_synthetic_sources(datalist):
        classes, affine, names = read_structures(**src.files)
        index = {n: c for c, n in enumerate(names, 1)}
        ext = {}
        for term, structures in zip(src.terms, src.term_structures):
            ids = [index[s] for s in structures if s in index]
            if ids:
                e = s_extent(np.isin(classes, ids), affine)
                if e is not None:
                    ext[term] = e
        out[src.name] = ext
        print(src.name, len(ext), "terms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datalist", type=Path, default=DATALIST)
    ap.add_argument("--out", type=Path, default=ATLAS_PATH)
    ap.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    args = ap.parse_args()
    start = time.perf_counter()
    subjects = {**real_subjects(args.datalist), **synthetic_subjects(args.datalist)}
    doc = {
        "description": "Superior-inferior extent (RAS+ S, mm) of each term per labelled subject: "
                       "[low, high, low end cut by the field of view, high end cut]. Measured by "
                       "bench/bench_craniocaudal_atlas.py on " + str(args.datalist.relative_to(REPO) if args.datalist.is_relative_to(REPO) else args.datalist),
        "subjects": {s: {t: e.to_list() for t, e in sorted(ext.items())} for s, ext in subjects.items()},
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    pairs = exclusive_pairs(subjects)
    print(f"{len(pairs)} exclusive pairs from {len(subjects)} subjects, {time.perf_counter() - start:.0f} s")
    if args.no_report:
        return
    lines = [
        "Command: `python bench/bench_craniocaudal_atlas.py`", "",
        f"Machine: {machine_description()}; {time.strftime('%Y-%m-%d')}, {time.perf_counter() - start:.0f} s.", "",
        f"Superior-inferior extents of each term in {len(subjects)} labelled subjects "
        f"({', '.join(subjects)}), written to `volumed/data/craniocaudal_atlas.json`. A pair is "
        f"exclusive (never on the same axial slice) if its gap was at least {MIN_GAP_MM:.0f} mm in every "
        f"subject that shows both ends (two or more), or {MIN_GAP_ONE_MM:.0f} mm in the only one. "
        f"When two structures `volumed segment` found form an exclusive pair and the lower one's top "
        f"reaches more than {OVERLAP_MM:.0f} mm above the upper one's bottom, it keeps the consistent set "
        f"with the largest total volume times mean probability and reports the others absent "
        f"(`volumed.data.craniocaudal`, docs/segment.md).", "",
        f"{len(pairs)} exclusive pairs. Per structure, the structures it can never share a slice with:", "",
        "| structure | never on a slice with (smallest gap seen, mm) |", "| --- | --- |",
    ]
    by_term: dict[str, list[str]] = {}
    for (u, low), rule in sorted(pairs.items()):
        by_term.setdefault(u, []).append(f"{low} ({rule['min_gap_mm']:.0f})")
        by_term.setdefault(low, []).append(f"{u} ({rule['min_gap_mm']:.0f})")
    for t in sorted(by_term):
        lines.append(f"| {t} | {', '.join(sorted(by_term[t]))} |")
    order = ordered_pairs(subjects)
    lines += [
        "", f"{len(order)} ordered pairs (not exclusive): the first one's centre lay at least {ORDER_MIN_MM:.0f} mm above "
        "the second's in every subject that shows both whole (two or more). They may share slices; found with the "
        f"second wholly above the first (by more than {OVERLAP_MM:.0f} mm), they conflict as an exclusive pair does "
        "(a \"sacrum\" above the liver, a \"heart\" below it).", "",
        "| above | below (smallest centre gap seen, mm; subjects) |", "| --- | --- |",
    ]
    below: dict[str, list[str]] = {}
    for (u, low), rule in sorted(order.items()):
        below.setdefault(u, []).append(f"{low} ({rule['min_centre_gap_mm']:.0f}; {rule['subjects']})")
    for t in sorted(below):
        lines.append(f"| {t} | {', '.join(below[t])} |")
    write_section(REPO / "BENCHMARKS.md", HEADING, HEADING + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
