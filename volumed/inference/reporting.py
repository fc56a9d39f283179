"""``volumed report``: a structured, grounded report of one image, with its files.

Two ways in::

    IMAGE --(volumed segment, default model)--> segmentation folder ---+
    IMAGE + an existing segmentation folder (--from-segmentation DIR) --+
        -> build_structured_report (volumed.inference.structured_report)
        -> OUT/report.txt     the sentences, by section, then the notes
           OUT/report.json    sentences -> masks (term, label value, SEG segment, mask file,
                              component), measurements (JSON pointers, values, the text
                              stated), CT-RATE labels; lesions; normal ranges; the DICOM UIDs
           OUT/report_sr.dcm  DICOM input with a DICOM SEG: the TID 1500 SR of volumed.io.sr,
                              each sentence a TEXT Finding in the measurement group of its
                              subject (which references that SEG segment)

Without ``--from-segmentation`` the segmentation is run (:func:`volumed.inference.segment.segment`)
and OUT receives everything ``volumed segment`` writes, with the structured report in place of its
plain findings list (report.txt) and of its SR. With it, OUT receives the three report files only
and they refer to the masks and SEG in DIR (OUT may be DIR: the files ``volumed segment`` wrote
there under the same names are replaced only with ``overwrite``).

Atomicity, as for ``volumed segment``: everything is written into a hidden staging folder next to
OUT and moved in only when complete; existing outputs are refused (before any computation)
unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumed.errors import OutputExistsError, VolumedError
from volumed.inference.segment import (
    LABELS_NAME,
    MASKS_DIR,
    PREVIEW_NAME,
    REPORT_JSON_NAME,
    REPORT_NAME,
    SEG_NAME,
    SR_NAME,
    STATISTICS_NAME,
    TABLE_NAME,
    SegmentationResult,
)
from volumed.inference.structured_report import StructuredReport, build_structured_report, read_statistics
from volumed.io.atomic import atomic_write_text, check_creatable
from volumed.io.volume import Volume

__all__ = ["REPORT_FILES", "SR_REPORT_DESCRIPTION", "ReportResult", "write_report"]

#: What ``--from-segmentation`` writes into OUT.
REPORT_FILES = (REPORT_NAME, REPORT_JSON_NAME, SR_NAME)
SR_REPORT_DESCRIPTION = "volumed structured report"


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote.

    Attributes:
        out_dir: the output folder; report_txt, report_json: their paths.
        dicom_sr: the SR's path, or ``None`` (input not DICOM, or no DICOM SEG: see warnings).
        report: the report itself.
        segmentation: the segmentation run, or ``None`` with ``from_segmentation``.
        warnings: what did not stop the run (e.g. SR skipped for a series without UIDs).
    """

    out_dir: Path
    report_txt: Path
    report_json: Path
    dicom_sr: Path | None
    report: StructuredReport
    segmentation: SegmentationResult | None = None
    warnings: tuple[str, ...] = ()

    def summary(self) -> list[str]:
        """The report's sentences, then what was written and the warnings."""
        lines = [s.text for s in self.report.sentences]
        lines.append(f"wrote {self.out_dir} (report.txt, report.json" + (", DICOM SR" if self.dicom_sr else "")
                     + (", and the segmentation" if self.segmentation else "") + f"): {len(self.report.sentences)} "
                     f"sentence(s), {len(self.report.lesions)} lesion(s)")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def _check_report_outputs(out: Path, overwrite: bool) -> None:
    """Refuse report files of an earlier run in ``out`` unless ``overwrite`` (before any work)."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError("output path exists and is not a folder", out)
    check_creatable(out)
    existing = [n for n in REPORT_FILES if (out / n).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"output folder holds {', '.join(existing)} already (e.g. volumed segment's findings "
                                "list); pass overwrite=True (--overwrite) or another folder", out)


def _seg_segments(seg_path: Path) -> tuple[object, dict[str, int]]:
    """The SEG (pydicom, no pixels) and its segment numbers by TrackingID (the term's name)."""
    import pydicom

    try:
        seg = pydicom.dcmread(str(seg_path), stop_before_pixels=True)
        return seg, {str(s.TrackingID): int(s.SegmentNumber) for s in seg.SegmentSequence}
    except Exception as err:  # pydicom raises several types for an unreadable file
        raise VolumedError(f"the DICOM SEG is not readable ({type(err).__name__}: {err})", seg_path) from err


def _write_sr(report: StructuredReport, stats: dict, volume: Volume, seg_dir: Path, seg, numbers: dict[str, int],
              path: Path, uids=None) -> None:
    """The TID 1500 SR of ``stats`` with the report's sentences in their subjects' groups."""
    from volumed.io import read_label
    from volumed.io.sr import StructureFinding, write_dicom_sr

    label_map = np.asarray(read_label(seg_dir / LABELS_NAME, volume).data)
    in_map = np.bincount(label_map.ravel().astype(np.int64))
    findings = []
    for name, entry in stats["terms"].items():
        number = numbers.get(name[:64])
        value = int(entry.get("value") or 0)
        voxels = int(in_map[value]) if number is not None and value < len(in_map) else None
        findings.append(StructureFinding.from_statistics(entry, segment_number=number, segment_voxels=voxels))
    narrative = {term: [s.text for s in sentences] for term, sentences in report.by_term().items()}
    write_dicom_sr(findings, volume, seg, path, overwrite=True, threshold=stats.get("threshold"),
                   series_description=SR_REPORT_DESCRIPTION, narrative=narrative,
                   series_instance_uid=uids.sr_series if uids is not None else None,
                   sop_instance_uid=uids.sr_instance if uids is not None else None)


def _report_files(seg_dir: Path, volume: Volume, staging: Path, shown_dir: Path, warnings: list[str],
                  uids=None) -> tuple[StructuredReport, bool]:
    """Build the report of ``seg_dir`` and write its files into ``staging``; ``shown_dir`` is the
    segmentation folder as report.json names it; ``uids`` (a :class:`volumed.io.writer.DicomOutputUids`)
    fixes the SR's UIDs. Returns the report and whether an SR was written."""
    stats = read_statistics(seg_dir)
    seg_path = seg_dir / SEG_NAME
    seg, numbers = (None, {})
    if volume.source.format == "dicom":
        if seg_path.is_file():
            seg, numbers = _seg_segments(seg_path)
        else:
            warnings.append(f"DICOM SR skipped: the segmentation has no {SEG_NAME} (a series without UIDs, or "
                            "nothing found), so there are no segments to reference")
    report = build_structured_report(seg_dir, volume, segment_numbers=numbers)
    report = dataclasses.replace(report, segmentation_dir=str(shown_dir))
    has_sr = False
    dicom = None
    if seg is not None:
        _write_sr(report, stats, volume, seg_dir, seg, numbers, staging / SR_NAME, uids)
        import pydicom

        sr = pydicom.dcmread(str(staging / SR_NAME), stop_before_pixels=True)
        dicom = {"seg": {"file": str(shown_dir / SEG_NAME), "sop_instance_uid": str(seg.SOPInstanceUID),
                         "series_instance_uid": str(seg.SeriesInstanceUID)},
                 "sr": {"file": SR_NAME, "sop_instance_uid": str(sr.SOPInstanceUID),
                        "series_instance_uid": str(sr.SeriesInstanceUID)}}
        has_sr = True
    data = {**report.to_dict(), "dicom": dicom}
    atomic_write_text(staging / REPORT_NAME, report.text(), overwrite=True)
    atomic_write_text(staging / REPORT_JSON_NAME, json.dumps(data, indent=2) + "\n", overwrite=True)
    return report, has_sr


def write_report(
    image: str | Path,
    out_dir: str | Path,
    *,
    from_segmentation: str | Path | None = None,
    prompts: Sequence[str] = (),
    model_dir: str | Path | None = None,
    series_uid: str | None = None,
    modality: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    all_terms: bool | None = None,
    dicom_uids=None,
    **segment_options,
) -> ReportResult:
    """Write the structured report of ``image`` into ``out_dir`` (module docstring).

    Args:
        image: NIfTI / NRRD / MHA file or DICOM series folder (the segmented image).
        out_dir: output folder.
        from_segmentation: an existing ``volumed segment`` output folder of ``image``; without
            it the image is segmented first (``prompts``, or every trained term when empty).
        model_dir: segmentation package; default: bundles/volumed_promptseg_ct/models.
        overwrite: replace the outputs of an earlier run.
        all_terms: segment every trained term as well as ``prompts``; default: only when
            ``prompts`` is empty.
        dicom_uids: a :class:`volumed.io.writer.DicomOutputUids` (or its fields as a mapping):
            the UIDs of the DICOM SEG and of the report's SR, for DICOM input.
        segment_options: passed to :func:`volumed.inference.segment.segment` (e.g. ``predictor``,
            ``allow_free_text``, ``allow_untrained``, ``postprocess``), as the report bundle's
            runner does.

    Raises:
        OutputExistsError: outputs exist and not ``overwrite`` (checked first).
        ConfigError: the image is not the one the segmentation measured; bad prompts or model.
        VolumedError: a segmentation folder that is missing, incomplete or malformed (naming the file).
    """
    from volumed.inference.segment import _check_output_dir, _publish, segment
    from volumed.io import read_volume
    from volumed.io.writer import DicomOutputUids

    out = Path(out_dir)
    if isinstance(dicom_uids, Mapping):
        dicom_uids = DicomOutputUids(**dicom_uids)
    warnings: list[str] = []
    if from_segmentation is not None:
        seg_dir = Path(from_segmentation)
        _check_report_outputs(out, overwrite)
        read_statistics(seg_dir)  # cheap: a wrong folder is named before the image is read
        volume = read_volume(image, series_uid=series_uid, modality=modality)
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.volumed-report-", dir=out.parent))
        try:
            report, has_sr = _report_files(seg_dir, volume, staging, seg_dir, warnings, dicom_uids)
            out.mkdir(parents=True, exist_ok=True)
            for name in REPORT_FILES:
                if (staging / name).exists():
                    os.replace(staging / name, out / name)  # atomic per file
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ReportResult(out, out / REPORT_NAME, out / REPORT_JSON_NAME, out / SR_NAME if has_sr else None, report,
                            None, tuple(warnings))

    _check_output_dir(out, overwrite)  # the segmentation's outputs and the report's, before any work
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.volumed-report-", dir=out.parent))
    try:
        seg_out = staging / "out"
        result = segment(image, prompts, model_dir=model_dir, out_dir=seg_out,
                         all_terms=not prompts if all_terms is None else bool(all_terms), series_uid=series_uid,
                         modality=modality, device=device, progress=progress, dicom_uids=dicom_uids, **segment_options)
        volume = read_volume(image, series_uid=series_uid, modality=modality)
        # The report replaces segment's findings list (report.txt) and its SR with the narrative one.
        report, has_sr = _report_files(seg_out, volume, seg_out, out, warnings, dicom_uids)
        _publish(seg_out, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The segmentation's paths as published (its SR is the report's, or none).
    result = dataclasses.replace(
        result, out_dir=out, label_map=out / LABELS_NAME, label_table=out / TABLE_NAME, statistics=out / STATISTICS_NAME,
        preview=out / PREVIEW_NAME, dicom_seg=out / SEG_NAME if result.dicom_seg else None,
        dicom_sr=out / SR_NAME if has_sr else None,
        terms=tuple(dataclasses.replace(t, mask_path=out / MASKS_DIR / t.mask_path.name) for t in result.terms))
    return ReportResult(out, out / REPORT_NAME, out / REPORT_JSON_NAME, out / SR_NAME if has_sr else None, report,
                        result, tuple([*result.warnings, *warnings]))
