"""DICOM SR next to the DICOM SEG: a TID 1500 Measurement Report of each structure (highdicom).

``write_dicom_sr`` writes a Comprehensive 3D SR that OHIF and 3D Slicer (dcmqi) read as a
measurement report of the SEG written by :func:`volumed.io.writer.write_dicom_seg`. Its content
tree (the codes, and why they were chosen, are also listed in docs/coding.md)::

    Imaging Measurement Report (126000, DCM)                                       TID 1500
      Language: English; Observer: device "volumed" (model = algorithm name, a stable UID)
      Procedure reported: CT unspecified body region (25045-6, LN) | MRI ... (25056-3, LN)
      Imaging Measurements
        per structure, in the order given (label-value order), one Measurement Group:
        * present, with a SEG segment: Volumetric ROI Measurements (TID 1411)
            Tracking Identifier = canonical name, Tracking UID = the SEG segment's TrackingUID
            Referenced Segment = (SEG SOP Instance UID, segment number) + its source images
            Finding category / Finding = the segment's property category / type (SNOMED CT or
              99VOLUMED, volumed.io.coding); Finding site = the same type, with its laterality
            Algorithm Identification: volumed, version
            Volume (118565006, SCT)                                   ml          (UCUM "ml")
            CT: Attenuation Coefficient (112031, DCM), Derivation Mean   HU   (UCUM "[hnsf'U]")
            MR: MR signal intensity (110852, DCM), Derivation Mean   arbitrary (UCUM "[arb'U]")
            Probability (122157, DCM), Derivation Mean (373098007, SCT)  1    confidence
            Probability (122157, DCM), Derivation Maximum (56851009, SCT)  1   peak probability
            Presence of property (121052, DCM) = Present (121053, DCM)
            Comment (121106, DCM): the prompt, "untrained", a SEG/mask difference (see below)
            Finding (121071, DCM), TEXT: the sentences of the structured report (``volumed
              report``) whose subject is this structure, in report order (``narrative``)
        * absent (empty mask): Measurement Group (TID 1501), no image reference
            Tracking Identifier = canonical name, a new Tracking UID; Finding / Finding site
            Presence of property (121052, DCM) = Absent (121054, DCM)
            Comment: the evidence, "the model's probability is at most p everywhere ..."
            Finding (121071, DCM), TEXT: the report's sentences about it (``narrative``)

Numbers come from ``statistics.json`` (:meth:`StructureFinding.from_statistics`), so the SR and
the JSON agree to the last digit: volume and mean intensity of the structure's own mask
(``masks/<name>.nii.gz``). The SEG holds the label map, where a voxel claimed by two structures
goes to the more probable one; when that leaves a segment smaller than its mask, a Comment says
so (segment voxels vs mask voxels). A present structure that lost every voxel that way has no
segment and gets a TID 1501 group with its measurements.

The SR is PRELIMINARY, UNVERIFIED and COMPLETE: a model's output nobody has signed. Patient and
study attributes are copied from the source series, and its evidence lists the source slices
and the SEG (Current Requested Procedure Evidence Sequence).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from volumed import __version__
from volumed.errors import VolumedError
from volumed.io.atomic import atomic_output, check_writable
from volumed.io.coding import local_scheme_identification
from volumed.io.volume import Volume

__all__ = ["SR_SERIES_DESCRIPTION", "StructureFinding", "write_dicom_sr"]

SR_SERIES_DESCRIPTION = "volumed segmentation report"

# (value, scheme, meaning): the coded concepts of the content tree (module docstring).
_VOLUME = ("118565006", "SCT", "Volume")
_ML = ("ml", "UCUM", "milliliter")
_ATTENUATION = ("112031", "DCM", "Attenuation Coefficient")
_HU = ("[hnsf'U]", "UCUM", "Hounsfield unit")
_MR_SIGNAL = ("110852", "DCM", "MR signal intensity")
_ARBITRARY = ("[arb'U]", "UCUM", "arbitrary unit")
_PROBABILITY = ("122157", "DCM", "Probability")
_NO_UNITS = ("1", "UCUM", "no units")
_MEAN = ("373098007", "SCT", "Mean")
_MAXIMUM = ("56851009", "SCT", "Maximum")
_PRESENCE = ("121052", "DCM", "Presence of property")
_PRESENT = ("121053", "DCM", "Present")
_ABSENT = ("121054", "DCM", "Absent")
_COMMENT = ("121106", "DCM", "Comment")
_FINDING = ("121071", "DCM", "Finding")
_PROCEDURE = {"CT": ("25045-6", "LN", "CT unspecified body region"),
              "MR": ("25056-3", "LN", "MRI unspecified body region")}
_IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True)
class StructureFinding:
    """One structure of the report: what was measured (units in the names) and how sure.

    Attributes:
        name: canonical term (``kidney_left``); the Tracking Identifier.
        present: its mask holds at least one voxel.
        volume_ml: mask volume (mL); ``None`` when absent.
        mean_intensity: mean image value inside the mask (HU for CT); ``None`` when absent.
        intensity_unit: ``"HU"`` (CT) or ``"intensity"`` (MR: arbitrary units).
        confidence: mean probability inside the mask; ``None`` when absent.
        max_probability: peak probability inside the mask; ``None`` when absent.
        max_probability_bound: upper bound of the probability anywhere; ``None`` when present.
        segment_number: the SEG segment of this structure, ``None`` when it has none (absent,
            or every voxel of its mask went to another structure in the label map).
        prompt: what the user typed; trained: False for a term the model never saw.
        voxels: mask voxels; segment_voxels: voxels of its SEG segment (the label map), when known.
    """

    name: str
    present: bool
    volume_ml: float | None = None
    mean_intensity: float | None = None
    intensity_unit: str = "HU"
    confidence: float | None = None
    max_probability: float | None = None
    max_probability_bound: float | None = None
    segment_number: int | None = None
    prompt: str | None = None
    trained: bool = True
    voxels: int = 0
    segment_voxels: int | None = None
    rejected: dict | None = None

    @classmethod
    def from_statistics(
        cls, entry: Mapping, *, segment_number: int | None = None, segment_voxels: int | None = None
    ) -> StructureFinding:
        """One term's entry of ``statistics.json`` (``statistics["terms"][name]``)."""
        present = bool(entry["present"])
        intensity = entry.get("intensity") or {}
        return cls(
            name=str(entry["name"]),
            present=present,
            volume_ml=float(entry["volume_ml"]) if present else None,
            mean_intensity=intensity.get("mean") if present else None,
            intensity_unit=str(intensity.get("unit", "HU")),
            confidence=entry.get("confidence"),
            max_probability=entry.get("max_probability"),
            max_probability_bound=entry.get("max_probability_bound"),
            segment_number=segment_number,
            prompt=entry.get("prompt"),
            trained=bool(entry.get("trained", True)),
            voxels=int(entry.get("voxels", 0)),
            rejected=entry.get("rejected"),
            segment_voxels=segment_voxels,
        )


def _cc(code: tuple[str, str, str]):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[0], scheme_designator=code[1], meaning=code[2])


def _code_of(item):
    """A coded concept from a code sequence item: value, scheme (and version), meaning only."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=item.CodeValue, scheme_designator=item.CodingSchemeDesignator, meaning=item.CodeMeaning,
                        scheme_version=getattr(item, "CodingSchemeVersion", None))


def _read_seg(seg, path: Path):
    """The SEG as a pydicom dataset without its pixels (a path or a dataset)."""
    import pydicom

    if not isinstance(seg, (str, Path)):
        return seg
    try:
        return pydicom.dcmread(str(seg), stop_before_pixels=True)
    except Exception as err:  # pydicom raises several types for an unreadable file
        raise VolumedError(f"the SR's DICOM SEG is not readable ({type(err).__name__}: {err})", seg) from err


def _check_seg(seg_ds, source: Volume, where: Path) -> dict[int, object]:
    """The SEG's segments by number, after checking it belongs to ``source``."""
    from pydicom.uid import UID

    if str(getattr(seg_ds, "SOPClassUID", "")) != "1.2.840.10008.5.1.4.1.1.66.4":
        raise VolumedError(f"the SR must reference a DICOM SEG (Segmentation Storage), got SOP class "
                           f"{UID(str(getattr(seg_ds, 'SOPClassUID', ''))).name or 'none'}", where)
    referenced = [s.SeriesInstanceUID for s in getattr(seg_ds, "ReferencedSeriesSequence", [])]
    if seg_ds.StudyInstanceUID != source.source.study_uid or source.source.series_uid not in referenced:
        raise VolumedError("the DICOM SEG belongs to another study or series than the source volume", where)
    return {int(s.SegmentNumber): s for s in seg_ds.SegmentSequence}


def _referenced_segment(seg_ds, number: int):
    """``hd.sr.ReferencedSegment`` of segment ``number`` of the SEG ``seg_ds``, with its source images.

    highdicom's ``ReferencedSegment.from_segmentation`` reads each frame's segment from the
    per-frame functional groups only; highdicom itself writes a SEG of one segment with the
    segment identification in the *shared* functional groups (valid DICOM: it holds for every
    frame), and ``from_segmentation`` then fails with an AttributeError. The frames of segment
    ``number`` are found here in either place, and their source images taken from the frames'
    derivation sequences as highdicom does (else the SEG's referenced instances).
    """
    import highdicom as hd

    shared = getattr(seg_ds, "SharedFunctionalGroupsSequence", [None])[0]
    shared_id = getattr(shared, "SegmentIdentificationSequence", None) if shared is not None else None
    frames = []
    for frame in getattr(seg_ds, "PerFrameFunctionalGroupsSequence", []):
        ident = getattr(frame, "SegmentIdentificationSequence", None) or shared_id
        if ident is not None and int(ident[0].ReferencedSegmentNumber) == int(number):
            frames.append(frame)
    sources, seen = [], set()
    for frame in frames:
        for derivation in getattr(frame, "DerivationImageSequence", []):
            for src in getattr(derivation, "SourceImageSequence", []):
                if src.ReferencedSOPInstanceUID not in seen:
                    seen.add(src.ReferencedSOPInstanceUID)
                    ref_frames = getattr(src, "ReferencedFrameNumber", None)
                    if ref_frames is not None and src["ReferencedFrameNumber"].VM == 1:
                        ref_frames = [ref_frames]
                    sources.append(hd.sr.SourceImageForSegmentation(src.ReferencedSOPClassUID,
                                                                    src.ReferencedSOPInstanceUID, ref_frames))
    if not sources:
        for series in getattr(seg_ds, "ReferencedSeriesSequence", []):
            for src in getattr(series, "ReferencedInstanceSequence", []):
                sources.append(hd.sr.SourceImageForSegmentation(src.ReferencedSOPClassUID,
                                                                src.ReferencedSOPInstanceUID))
    if not sources:
        raise VolumedError(f"the DICOM SEG names no source image of segment {number}", "DICOM SEG")
    return hd.sr.ReferencedSegment(sop_class_uid=seg_ds.SOPClassUID, sop_instance_uid=seg_ds.SOPInstanceUID,
                                   segment_number=int(number), source_images=sources)


def write_dicom_sr(
    findings: Sequence[StructureFinding],
    source: Volume,
    seg: str | Path | object,
    path: str | Path,
    *,
    overwrite: bool = False,
    threshold: float | None = None,
    series_description: str = SR_SERIES_DESCRIPTION,
    series_number: int = 301,
    algorithm_name: str = "volumed",
    algorithm_version: str = __version__,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    narrative: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a Comprehensive 3D SR (TID 1500) of ``findings`` (module docstring) to ``path``.

    Args:
        findings: one per structure, present and absent alike (absent ones are reported as
            absent, never dropped), e.g. :meth:`StructureFinding.from_statistics` of each entry
            of ``statistics.json``.
        source: the DICOM volume that was segmented (``read_volume`` of the series).
        seg: the DICOM SEG of ``source`` (path or pydicom dataset) that the segment numbers of
            ``findings`` refer to.
        path: output file (written atomically; refused if it exists, unless ``overwrite``).
        threshold: the probability threshold of the masks, quoted for absent structures.
        series_instance_uid, sop_instance_uid: deterministic UIDs; fresh ones when ``None``.
        narrative: structure name -> sentences about it (the structured report of ``volumed
            report``), each written as a TEXT Finding item of that structure's measurement
            group, so a sentence sits with the SEG segment and the measurements it states.

    Raises:
        OutputExistsError: ``path`` exists and not ``overwrite`` (checked first).
        DicomSeriesError: ``source`` is not a DICOM series with Study/Series/Frame-of-Reference UIDs.
        VolumedError: no findings; a SEG that is unreadable, not a SEG or of another series; a
            segment number the SEG lacks or whose TrackingID is another structure; a segment
            number for an absent structure; narrative about a structure not in ``findings``.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from volumed.io.coding import structure_code
    from volumed.io.writer import _load_source_datasets

    path = Path(path)
    check_writable(path, overwrite)
    if not findings:
        raise VolumedError("no structures to report", path)
    narrative = dict(narrative or {})
    unknown = sorted(set(narrative) - {f.name for f in findings})
    if unknown:
        raise VolumedError(f"report sentences about structures the SR does not list: {', '.join(unknown)}", path)
    datasets = _load_source_datasets(source, "DICOM SR")  # refuses NIfTI and series without UIDs
    seg_ds = _read_seg(seg, path)
    segments = _check_seg(seg_ds, source, path)

    algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=algorithm_version)
    groups = []
    local_codes = False
    for f in findings:
        if f.segment_number is not None:
            if not f.present:
                raise VolumedError(f"{f.name} is absent but given SEG segment {f.segment_number}", path)
            seg_item = segments.get(f.segment_number)
            if seg_item is None:
                raise VolumedError(f"the DICOM SEG has no segment {f.segment_number} (for {f.name})", path)
            tracking_id = str(getattr(seg_item, "TrackingID", "") or "")
            if tracking_id and tracking_id != f.name[:64]:
                raise VolumedError(f"SEG segment {f.segment_number} is {tracking_id!r}, not {f.name!r}", path)
        code = structure_code(f.name)
        local_codes |= code.local
        category, prop_type, laterality = code.as_highdicom()
        if f.segment_number is not None:
            # The SEG's own codes, so SR and SEG name the structure alike (the code alone: the
            # SEG's type item also holds its modifier sequence, which has no place in an SR item).
            category = _code_of(seg_item.SegmentedPropertyCategoryCodeSequence[0])
            prop_type = _code_of(seg_item.SegmentedPropertyTypeCodeSequence[0])
        common = {
            "finding_category": category,
            "finding_type": prop_type,
            "finding_sites": [hd.sr.FindingSite(anatomic_location=prop_type, laterality=laterality)],
            "algorithm_id": algorithm,
            "measurements": _measurements(f, source.modality) or None,
            "qualitative_evaluations": [hd.sr.QualitativeEvaluation(_cc(_PRESENCE), _cc(_PRESENT if f.present else _ABSENT))],
        }
        if f.segment_number is not None:
            group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=getattr(seg_item, "TrackingUID", None) or hd.UID(),
                                                             identifier=f.name[:64]),
                referenced_segment=_referenced_segment(seg_ds, f.segment_number),
                **common,
            )
        else:
            group = hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f.name[:64]), **common
            )
        for text in _comments(f, threshold):
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=_cc(_COMMENT), value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        for sentence in narrative.get(f.name, ()):
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=_cc(_FINDING), value=sentence, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(group)

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # Stable per algorithm and version: the same device reports every time.
        uid=generate_uid(entropy_srcs=["volumed device", algorithm_name, algorithm_version]),
        name=algorithm_name, manufacturer_name="volumed", model_name=algorithm_name,
    )
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept(value="121007", scheme_designator="DCM", meaning="Device"),
        observer_identifying_attributes=device,
    ))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=_cc(_PROCEDURE.get(source.modality, _IMAGING_PROCEDURE)),
        imaging_measurements=groups,
    )
    coding_schemes = [local_scheme_identification()] if local_codes else None
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*datasets, seg_ds],
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="volumed",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description[:64],
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        coding_schemes=coding_schemes,
    )
    with atomic_output(path, overwrite=overwrite) as tmp:
        sr.save_as(str(tmp))
    return path


def _measurements(f: StructureFinding, modality: str) -> list:
    """TID 300 measurements of a present structure (none for an absent one)."""
    import highdicom as hd

    if not f.present:
        return []
    out = [hd.sr.Measurement(name=_cc(_VOLUME), value=float(f.volume_ml), unit=_cc(_ML))]
    if f.mean_intensity is not None:
        if f.intensity_unit == "HU":
            out.append(hd.sr.Measurement(name=_cc(_ATTENUATION), value=float(f.mean_intensity), unit=_cc(_HU),
                                         derivation=_cc(_MEAN)))
        elif modality == "MR":
            out.append(hd.sr.Measurement(name=_cc(_MR_SIGNAL), value=float(f.mean_intensity), unit=_cc(_ARBITRARY),
                                         derivation=_cc(_MEAN)))
    if f.confidence is not None:
        out.append(hd.sr.Measurement(name=_cc(_PROBABILITY), value=float(f.confidence), unit=_cc(_NO_UNITS),
                                     derivation=_cc(_MEAN)))
    if f.max_probability is not None:
        out.append(hd.sr.Measurement(name=_cc(_PROBABILITY), value=float(f.max_probability), unit=_cc(_NO_UNITS),
                                     derivation=_cc(_MAXIMUM)))
    return out


def _comments(f: StructureFinding, threshold: float | None) -> list[str]:
    """Free-text Comments of a group: what a coded item cannot say."""
    out = []
    if f.prompt is not None:
        out.append(f"prompt '{f.prompt}'")
    if not f.trained:
        out.append("untrained: the model was not trained on this term; its mask means little")
    if f.present:
        if f.segment_number is None:
            out.append(f"not in the DICOM SEG: every voxel of its mask ({f.voxels}) went to a more probable "
                       "structure in the label map; measured on its own mask")
        elif f.segment_voxels is not None and f.segment_voxels != f.voxels:
            out.append(f"the SEG segment holds {f.segment_voxels} of the mask's {f.voxels} voxels (overlaps go to the "
                       "more probable structure); the measurements are of the whole mask")
    elif f.rejected:
        from volumed.inference.stats import rejection_text

        out.append(f"not reported: {rejection_text(f.rejected)} (peak probability {f.rejected['max_probability']:.2f})")
    else:
        bound = "unknown" if f.max_probability_bound is None else f"{f.max_probability_bound:.3f}"
        limit = f" (threshold {threshold:g})" if threshold is not None else ""
        out.append(f"not found: the model's probability is at most {bound} everywhere in the image{limit}")
    return out
