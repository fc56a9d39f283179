"""The one writer: NIfTI volumes and masks on the input's grid, and DICOM SEG via highdicom
(the DICOM SR that reports on a SEG is :mod:`volumed.io.sr`).

Every write is atomic (:mod:`volumed.io.atomic`) and refuses to replace an existing file unless
``overwrite=True``.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

from volumed import __version__
from volumed.errors import DicomSeriesError, VolumedError
from volumed.io.atomic import atomic_output, check_writable
from volumed.io.coding import local_scheme_identification, readable_name, structure_code
from volumed.io.volume import Volume

log = logging.getLogger(__name__)


# The namespace of volumed's name-based UUIDs (a fixed random UUID: changing it changes every derived UID).
_UID_NAMESPACE = uuid.UUID("5f0c9a52-3d1e-4b8e-9a57-6c1f2b7d9e41")


def derived_uid(*parts: str) -> str:
    """``2.25.<n>`` with ``n`` the integer of the name-based (version 5) UUID of ``parts``: the same
    parts always give the same valid UID (at most 44 characters)."""
    # A separator that cannot occur in a UID or a prompt keeps ("a", "bc") apart from ("ab", "c").
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(0x1E).join(parts)).int}"


@dataclass(frozen=True)
class DicomOutputUids:
    """The SeriesInstanceUID and SOPInstanceUID of the DICOM SEG and of the DICOM SR of one run.

    Fresh UIDs each run are the default; :meth:`derive` makes them a function of the run's inputs,
    so that storing the same run's outputs twice (a PACS round trip re-run) reuses the same UIDs
    and can be recognised as already stored.
    """

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str

    @classmethod
    def derive(cls, *inputs: str) -> "DicomOutputUids":
        """Deterministic ``2.25.<n>`` UIDs, one per role: ``n`` is the integer of a name-based
        (SHA-1, version 5) UUID of the role and the ``inputs`` (PS3.5 B.2: UUID-derived UIDs under
        2.25), so the same ``inputs`` (e.g. source series UID, bundle name and version, prompts)
        always give the same four UIDs. (pydicom's ``generate_uid(prefix=None, entropy_srcs=...)``
        would not do: without a prefix it ignores the entropy and returns a random UUID.)"""
        if not inputs or any(not isinstance(part, str) or not part for part in inputs):
            raise VolumedError(f"deterministic DICOM UIDs need non-empty text inputs, got {inputs!r}")

        def uid(role: str) -> str:
            return derived_uid("volumed output uid", role, *inputs)

        return cls(uid("seg series"), uid("seg instance"), uid("sr series"), uid("sr instance"))

    @classmethod
    def from_mapping(cls, value: "DicomOutputUids | Mapping[str, str] | None") -> "DicomOutputUids | None":
        """``None``, an instance, or its fields as a mapping (how a bundle config passes them)."""
        if value is None or isinstance(value, cls):
            return value
        names = ("seg_series", "seg_instance", "sr_series", "sr_instance")
        if not isinstance(value, Mapping) or sorted(value) != sorted(names):
            raise VolumedError(f"dicom_uids must map exactly {', '.join(names)}; got {value!r}")
        return cls(**{n: str(value[n]) for n in names})


def write_nifti(volume: Volume, path: str | Path, *, overwrite: bool = False, dtype=None) -> Path:
    """Write ``volume`` as NIfTI with its exact affine (sform and qform, scanner space)."""
    path = Path(path)
    data = volume.data if dtype is None else volume.data.astype(dtype)
    img = nib.Nifti1Image(np.asarray(data), volume.affine)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_output(path, overwrite=overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def write_label_map(label: np.ndarray, reference: Volume, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write an integer label map that lies on ``reference``'s grid, with its affine."""
    label = _on_grid(label, reference, path)
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    return write_nifti(reference.with_data(label.astype(dtype)), path, overwrite=overwrite)


def write_masks(
    label: np.ndarray, names: Mapping[int, str], reference: Volume, out_dir: str | Path, *, overwrite: bool = False
) -> dict[str, Path]:
    """One binary uint8 NIfTI per structure (``<name>.nii.gz``) on ``reference``'s grid."""
    label = _on_grid(label, reference, out_dir)
    out_dir = Path(out_dir)
    targets = {name: out_dir / f"{name}.nii.gz" for name in names.values()}
    for p in targets.values():  # fail before writing anything
        check_writable(p, overwrite)
    written = {}
    for value, name in names.items():
        written[name] = write_nifti(reference.with_data((label == value).astype(np.uint8)), targets[name], overwrite=overwrite)
    return written


def _on_grid(label: np.ndarray, reference: Volume, where) -> np.ndarray:
    label = np.asarray(label)
    if tuple(label.shape) != reference.shape:
        raise VolumedError(f"label map shape {tuple(label.shape)} is not the reference grid {reference.shape}", where)
    if label.min(initial=0) < 0:
        raise VolumedError("label map holds negative values", where)
    return label


# ----------------------------------------------------------------------------------- DICOM SEG


@dataclass(frozen=True)
class SegmentSpec:
    """One structure of a label map: its ``value`` in the map and its canonical ``name``.

    ``label`` is the SegmentLabel viewers show (default: the readable name; 64 characters at
    most); ``description`` the optional SegmentDescription (free text, e.g. the prompt and how
    sure the model was; 1024 characters at most).
    """

    value: int
    name: str
    label: str | None = None  # shown to readers; defaults to the readable name
    description: str | None = None


def _load_source_datasets(source: Volume, what: str = "DICOM SEG") -> list:
    """The source slices as pydicom datasets, in the volume's ``k`` order, with UIDs checked
    (``what``: the object that needs them, named in the errors)."""
    import pydicom

    if source.source.format != "dicom" or not source.source.files:
        raise DicomSeriesError(
            f"a {what} needs a DICOM source series; this volume was read from "
            f"{source.source.format} (write NIfTI instead)",
            source.source.path,
        )
    missing = [n for n, v in (("StudyInstanceUID", source.source.study_uid), ("SeriesInstanceUID", source.source.series_uid),
                               ("FrameOfReferenceUID", source.source.frame_of_reference_uid)) if not v]
    if missing:
        raise DicomSeriesError(
            f"source series has empty {', '.join(missing)} (anonymised?); a {what} must reference them, "
            "so it cannot be written for this series. Restore the UIDs, or use the NIfTI outputs",
            source.source.path,
        )
    datasets = []
    for f in source.source.files:
        ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        meta = getattr(ds, "file_meta", None)
        # Some anonymisers blank SOP Class/Instance UID in the data set but keep them in the file
        # meta; take them from there (in memory only: inputs are never modified).
        if not getattr(ds, "SOPClassUID", None) and meta is not None and getattr(meta, "MediaStorageSOPClassUID", None):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
        if not getattr(ds, "SOPInstanceUID", None) and meta is not None and getattr(meta, "MediaStorageSOPInstanceUID", None):
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        if not getattr(ds, "SOPInstanceUID", None) or not getattr(ds, "SOPClassUID", None):
            raise DicomSeriesError(f"slice has no SOPInstanceUID/SOPClassUID; a {what} cannot reference it", f)
        datasets.append(ds)
    return datasets


def write_dicom_seg(
    label: np.ndarray,
    source: Volume,
    segments: Sequence[SegmentSpec],
    path: str | Path,
    *,
    overwrite: bool = False,
    series_description: str = "volumed segmentation",
    series_number: int = 300,
    algorithm_name: str = "volumed",
    algorithm_version: str = __version__,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Path:
    """Write a binary DICOM SEG for ``label`` (on ``source``'s grid) referencing the source series.

    Args:
        label: integer label map ``(X, Y, Z)`` on the source grid.
        source: the DICOM volume the labels belong to (``read_volume`` of the series).
        segments: which label values become segments, with their canonical names. Values absent
            from ``label`` still get a segment (an empty one is omitted by highdicom's frame
            logic but keeps its description) only if listed; pass only what should be stored.
        series_instance_uid, sop_instance_uid: deterministic UIDs (for idempotent PACS uploads);
            fresh UIDs when ``None``.

    Segments are numbered 1..N in the order given; each carries its ``label`` (default: its
    readable name) as SegmentLabel, its ``description`` as SegmentDescription when given, a
    SNOMED CT property type where one is known (else the local ``99VOLUMED`` scheme, see
    :mod:`volumed.io.coding`, then declared in the CodingSchemeIdentificationSequence), and a
    laterality modifier for left/right structures.
    """
    import highdicom as hd

    path = Path(path)
    check_writable(path, overwrite)
    label = _on_grid(label, source, path)
    if not segments:
        raise VolumedError("no segments to write", path)
    datasets = _load_source_datasets(source)

    # highdicom wants frames in source order: (frames, rows, cols, segments), frame k = slice k,
    # rows = j, cols = i.
    masks = np.stack([(label == s.value) for s in segments], axis=-1)  # (X, Y, Z, S)
    pixel_array = np.ascontiguousarray(np.transpose(masks, (2, 1, 0, 3))).astype(np.uint8)

    from pydicom.sr.codedict import codes

    from volumed.inference.preview import label_color

    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.DCM.ArtificialIntelligence
    )
    descriptions = []
    local_codes = False
    for number, spec in enumerate(segments, start=1):
        code = structure_code(spec.name)
        local_codes |= code.local
        category, prop_type, laterality = code.as_highdicom()
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=(spec.label or readable_name(spec.name))[:64],
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            # Derived from a given SOP Instance UID, so that a re-written SEG (and the SR that
            # quotes these Tracking UIDs) is the same object again; fresh otherwise.
            tracking_uid=derived_uid(sop_instance_uid, "tracking", str(number)) if sop_instance_uid else hd.UID(),
            tracking_id=spec.name[:64],
            # The colour of the preview and `volumed view` for this label value, so a viewer
            # (3D Slicer reads it through dcmqi, OHIF too) draws each structure as we do.
            display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in label_color(spec.value))),
        )
        if spec.description:
            desc.SegmentDescription = spec.description[:1024]  # (0062,0006) ST, type 3
        if laterality is not None:
            from pydicom.dataset import Dataset

            mod = Dataset()
            mod.CodeValue, mod.CodingSchemeDesignator, mod.CodeMeaning = laterality.value, laterality.scheme_designator, laterality.meaning
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [mod]
        descriptions.append(desc)

    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="volumed",
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description=series_description[:64],
        omit_empty_frames=True,
    )
    if local_codes:  # declare the private designator, as the SR does (docs/coding.md)
        seg.CodingSchemeIdentificationSequence = [local_scheme_identification()]
    with atomic_output(path, overwrite=overwrite) as tmp:
        seg.save_as(str(tmp))
    return path


@dataclass(frozen=True)
class SegSegment:
    number: int
    label: str
    name: str  # tracking id (canonical name) when present, else the label
    property_type: tuple[str, str, str]
    laterality: tuple[str, str, str] | None
    description: str | None = None


@dataclass(frozen=True)
class DicomSegContent:
    """A DICOM SEG read back onto its source grid: ``masks[s]`` is ``(X, Y, Z)`` bool."""

    segments: tuple[SegSegment, ...]
    masks: dict[int, np.ndarray]
    series_uid: str
    referenced_series_uid: str
    frame_of_reference_uid: str
    study_uid: str


def read_dicom_seg(path: str | Path, source: Volume) -> DicomSegContent:
    """Read a binary DICOM SEG and place every segment on ``source``'s ``(X, Y, Z)`` grid."""
    import highdicom as hd

    path = Path(path)
    try:
        seg = hd.seg.segread(str(path))
    except Exception as err:
        raise VolumedError(f"not a readable DICOM SEG ({type(err).__name__}: {err})", path) from err
    sop_uids = list(source.source.sop_instance_uids)
    segments = []
    masks = {}
    for number in seg.get_segment_numbers():
        d = seg.get_segment_description(number)
        ptype = d.segmented_property_type
        mod = getattr(d.SegmentedPropertyTypeCodeSequence[0], "SegmentedPropertyTypeModifierCodeSequence", None)
        lat = (mod[0].CodeValue, mod[0].CodingSchemeDesignator, mod[0].CodeMeaning) if mod else None
        segments.append(SegSegment(number, d.segment_label, d.tracking_id or d.segment_label,
                                   (ptype.value, ptype.scheme_designator, ptype.meaning), lat,
                                   getattr(d, "SegmentDescription", None)))
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sop_uids, segment_numbers=[number], combine_segments=False, ignore_spatial_locations=True
        )  # (Z, rows=j, cols=i, 1)
        masks[number] = np.transpose(arr[..., 0], (2, 1, 0)).astype(bool)
    ref_series = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    return DicomSegContent(tuple(segments), masks, seg.SeriesInstanceUID, ref_series, seg.FrameOfReferenceUID, seg.StudyInstanceUID)
