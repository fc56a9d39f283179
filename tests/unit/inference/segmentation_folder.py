"""A ``volumed segment`` output folder written from given masks, without a model: the masks,
statistics.json, labels.json, report.txt and preview come from segment's own writer
(``volumed.inference.segment._write_outputs``), so the report tests read exactly the format the
command writes (and, for a DICOM series with UIDs, its DICOM SEG and SR)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from volumed.inference.package import PromptSegConfig
from volumed.inference.postprocess import Postprocessing
from volumed.inference.segment import MASKS_DIR, SegmentedTerm, _write_outputs, mask_file_name
from volumed.inference.stats import MaskEvidence, compute_statistics
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti


def write_segmentation_folder(
    volume: Volume,
    masks: Mapping[str, np.ndarray],
    out: Path,
    *,
    confidence: float = 0.9,
    bounds: Mapping[str, float] | None = None,
    rejected: Mapping[str, dict] | None = None,
    free_text: tuple[str, ...] = (),
) -> Path:
    """Write ``out`` as ``volumed segment`` would for ``masks`` (term -> bool array on
    ``volume``'s grid; an empty mask is an absent term). Present terms get ``confidence`` (peak
    0.99); absent ones the probability bound ``bounds[name]`` (default 0.05), or, for a name in
    ``rejected``, that MaskEvidence.rejected record. Label values follow the order of ``masks``;
    where masks overlap, the earlier term keeps the voxel."""
    bounds = dict(bounds or {})
    rejected = dict(rejected or {})
    out.mkdir(parents=True)
    (out / MASKS_DIR).mkdir()
    label = np.zeros(volume.shape, np.uint8)
    terms = []
    for value, (name, mask) in enumerate(masks.items(), start=1):
        mask = np.asarray(mask, bool)
        label[mask & (label == 0)] = value
        path = out / MASKS_DIR / f"{mask_file_name(name)}.nii.gz"
        write_nifti(volume.with_data(mask.astype(np.uint8), modality=volume.modality), path)
        if mask.any():
            evidence = MaskEvidence(True, confidence, 0.99, None)
        elif name in rejected:
            evidence = MaskEvidence(False, None, None, rejected[name]["max_probability"], rejected[name])
        else:
            evidence = MaskEvidence(False, None, None, bounds.get(name, 0.05))
        terms.append(SegmentedTerm(value, name, name.replace("_", " "), name in free_text, True, path,
                                   compute_statistics(mask, volume, name), evidence, Postprocessing(None)))
    warnings: list[str] = []
    _write_outputs(out, volume, label, tuple(terms), PromptSegConfig(encoder="stunet_tiny", version="9.9.9"),
                   Path("tests/model"), warnings)
    return out
