"""The HU priors of the synthesis against the real CTs: mean HU of every labelled structure.

Usage::

    python bench/bench_hu_priors.py [--output docs/synthesis.md]

For each real CT of ``configs/datalists/promptseg_ct_all.json`` and each structure its reference
labels (TotalSegmentator ids or binary masks), the mean and standard deviation of the HU inside the
structure (eroded by one voxel, so that partial volume at the edge does not pull the mean), next
to the prior's range for the structure's tissue in the phase that fits best
(:mod:`volumed.data.hu_priors`). The table is written between the markers of ``docs/synthesis.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- hu-table:start -->", "<!-- hu-table:end -->"


def measure() -> list[tuple[str, str, str, int, float, float, str, str]]:
    from volumed.data.hu_priors import TISSUES, tissue_of
    from volumed.data.synthesis import phase_of_mean
    from volumed.data.vocab import TOTALSEG_CT_CLASSES
    from volumed.io import read_label, read_volume
    from volumed.tasks.promptseg import load_promptseg_datalist

    rows = []
    for src in load_promptseg_datalist(REPO / "configs/datalists/promptseg_ct_all.json", allow_free_text=True):
        volume = read_volume(src.image, modality="CT")
        hu = np.asarray(volume.data, dtype=np.float32)
        if src.label_map is not None:
            ids = np.asarray(read_label(src.label_map, reference=volume).data)
            named = {TOTALSEG_CT_CLASSES[i - 1]: ids == i for i in np.unique(ids) if 0 < i <= len(TOTALSEG_CT_CLASSES)}
        else:
            named = {t: np.asarray(read_label(m, reference=volume).data) > 0 for t, m in zip(src.terms, src.masks)}
        scan = src.image.name if src.image.name != "ct.nii.gz" else src.image.parent.name
        for name, mask in sorted(named.items()):
            inner = ndimage.binary_erosion(mask)
            if inner.sum() < 20:
                continue
            values = hu[inner]
            tissue = tissue_of(name)
            phase = phase_of_mean(float(values.mean()), tissue)
            lo, hi = TISSUES[tissue].mean_range(phase)
            inside = "yes" if lo <= values.mean() <= hi else f"no ({values.mean() - (lo if values.mean() < lo else hi):+.0f})"
            rows.append((scan, name, tissue, int(inner.sum()), float(values.mean()), float(values.std()), f"{phase} {lo:.0f}..{hi:.0f}", inside))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "synthesis.md")
    args = parser.parse_args(argv)
    rows = measure()
    table = ["| scan | structure | tissue | voxels | mean HU | std HU | prior (nearest phase) | mean in prior |", "|---|---|---|---:|---:|---:|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} | {e:.0f} | {f:.0f} | {g} | {h} |" for a, b, c, d, e, f, g, h in rows]
    text = "\n".join(table)
    print(text)
    doc = args.output.read_text() if args.output.exists() else ""
    if START in doc and END in doc:
        doc = doc[: doc.index(START) + len(START)] + "\n" + text + "\n" + doc[doc.index(END):]
        tmp = args.output.with_suffix(".md.tmp")
        tmp.write_text(doc)
        tmp.replace(args.output)
    else:
        print(f"{args.output}: no {START} / {END} markers; table printed only", file=sys.stderr)


if __name__ == "__main__":
    main()
