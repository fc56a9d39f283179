"""The one reader: NIfTI, NRRD, MHA/MHD and DICOM series folders into a :class:`Volume`.

Geometry rules:
- NIfTI keeps the file's index order and its sform/qform (as nibabel resolves them).
- NRRD/MHA are read with SimpleITK; its LPS direction/origin/spacing become a RAS affine.
- DICOM slices are sorted by their position along the slice normal (never by file name or
  InstanceNumber), checked for one series, one grid and regular spacing, and rescaled to HU.
"""

from __future__ import annotations

import gzip
import os
import logging
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

from volumed.errors import DicomSeriesError, InvalidVolumeError, VolumeReadError
from volumed.io.volume import MODALITIES, SourceInfo, Volume

log = logging.getLogger(__name__)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

# Storage SOP classes that never hold a 2D image slice of a volume (SEG, SR, RT, PR, KO...).
_NON_IMAGE_MODALITIES = {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "REG", "DOC", "OT_NOIMG"}


def format_of(path: str | Path) -> str:
    """``"nifti"``, ``"nrrd"``, ``"mha"`` or ``"dicom"`` from a path (a folder is a DICOM series)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    raise VolumeReadError(
        "unknown volume format; expected .nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd or a DICOM series folder", p
    )


def read_volume(path: str | Path, *, series_uid: str | None = None, modality: str | None = None) -> Volume:
    """Read a 3D volume from a file or a DICOM series folder.

    Args:
        path: ``.nii``/``.nii.gz``/``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file, or a folder holding
            a DICOM series (searched recursively). A single ``.dcm`` file reads its whole folder.
        series_uid: with several series in a folder, the SeriesInstanceUID to read.
        modality: ``"CT"``/``"MR"`` to override what the file says. Without it, DICOM uses its
            Modality tag, and other formats are taken as CT when the volume holds air in HU
            (1st percentile <= -500), else ``"unknown"``.

    Returns:
        A :class:`Volume` with data ``(X, Y, Z)`` (CT in HU) and its RAS affine in mm.

    Raises:
        VolumeReadError: missing, unreadable, truncated or unrecognised file.
        InvalidVolumeError: readable, but not one 3D volume (2D, 4D, NaN, an empty axis).
        DicomSeriesError: a DICOM folder without exactly one complete, regular series.
    """
    p = Path(path)
    if modality is not None and modality.upper() not in ("CT", "MR"):
        raise InvalidVolumeError(f"modality must be CT or MR, got {modality!r}", p)
    if not p.exists():
        raise VolumeReadError("no such file or folder", p)
    fmt = format_of(p)
    if fmt == "dicom":
        folder = p if p.is_dir() else p.parent
        vol = read_dicom_series(folder, series_uid=series_uid)
    elif series_uid is not None:
        raise VolumeReadError("series_uid= only applies to DICOM folders", p)
    elif fmt == "nifti":
        vol = _read_nifti(p)
    else:
        vol = _read_itk(p, fmt)
    if modality is not None:
        vol = Volume(vol.data, vol.affine, modality.upper(), vol.source)
    elif vol.modality == "unknown":
        vol = Volume(vol.data, vol.affine, _guess_modality(vol.data), vol.source)
    return vol


def _guess_modality(data: np.ndarray) -> str:
    if not np.issubdtype(data.dtype, np.number) or data.size == 0:
        return "unknown"
    # Air is about -1000 HU; MR and label maps have no strongly negative values.
    sample = data[:: max(1, data.shape[0] // 64), :: max(1, data.shape[1] // 64), :]
    return "CT" if float(np.percentile(sample, 1)) <= -500 else "unknown"


def _check_array(data: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton axes and reject what is not one finite 3D volume."""
    if any(s == 0 for s in data.shape):
        raise InvalidVolumeError(f"image has a zero-length axis (shape {tuple(data.shape)})", path)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim < 3 or (data.ndim == 3 and 1 in data.shape):
        raise InvalidVolumeError(
            f"image is {min(data.ndim, 2)}D (shape {tuple(data.shape)}); volumed needs a 3D volume", path
        )
    if data.ndim > 3:
        raise InvalidVolumeError(
            f"image is {data.ndim}D (shape {tuple(data.shape)}): {int(np.prod(data.shape[3:]))} volumes in one file; "
            "volumed needs a single 3D volume (split the series, e.g. with fslsplit)",
            path,
        )
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise InvalidVolumeError(f"image holds {bad} NaN/infinite voxel(s) of {data.size}", path)
    return data


#: Deflate cannot compress better than about 1032:1, so a .nii.gz cannot hold more voxel bytes.
_MAX_DEFLATE_RATIO = 1032


def _check_nifti_size(img, path: Path) -> None:
    """Compare what the header claims with the file before allocating: a header of 30000^3 voxels
    in a file of a few kB is corrupt, and allocating for it ends in a MemoryError."""
    shape = tuple(int(s) for s in img.header.get_data_shape())
    itemsize = np.dtype(img.header.get_data_dtype()).itemsize
    claimed = int(np.prod(shape, dtype=np.float64)) * itemsize
    size = path.stat().st_size
    dims = " x ".join(str(s) for s in shape)
    if path.name.lower().endswith(".gz"):
        if claimed > size * _MAX_DEFLATE_RATIO:
            raise VolumeReadError(
                f"NIfTI header claims {dims} voxels ({claimed / 2**30:.1f} GiB of data) but the compressed file has "
                f"only {size} bytes, more than deflate can hold: the header is corrupt", path)
    else:
        offset = int(getattr(img.dataobj, "offset", 352))
        if offset + claimed > size:
            raise VolumeReadError(
                f"NIfTI header claims {dims} voxels ({claimed} bytes of data from byte {offset}) but the file has "
                f"only {size} bytes: truncated, or a corrupt header", path)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if available and claimed > available:
        raise VolumeReadError(
            f"NIfTI header claims {dims} voxels ({claimed / 2**30:.1f} GiB of data), more than this machine's "
            f"{available / 2**30:.0f} GiB of memory", path)


def _raw_nifti_header(img, path: Path):
    """The header as stored (nibabel's loader replaces a zero pixdim by 1 with a log message)."""
    with nib.openers.ImageOpener(str(path)) as f:
        return img.header.__class__.from_fileobj(f, check=False)


def _check_nifti_geometry(img, path: Path) -> None:
    """Refuse a NIfTI whose voxel size is unknown: zero (or negative, NaN) pixdim and no sform.

    With ``sform_code > 0`` the sform matrix carries the voxel size itself; otherwise the qform
    (or, without one, the Analyze fallback) is built from pixdim, and nibabel silently makes a
    zero pixdim 1 mm: every output would then carry a made-up geometry.
    """
    raw = _raw_nifti_header(img, path)
    if int(raw["sform_code"]) > 0:
        spacing = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InvalidVolumeError(f"NIfTI sform has a zero or invalid voxel size {tuple(float(v) for v in spacing)}", path)
        return
    pixdim = [float(v) for v in raw["pixdim"][1:4]]
    if not all(np.isfinite(v) and v > 0 for v in pixdim):
        codes = "no qform and no sform" if int(raw["qform_code"]) == 0 else "no sform (the qform is built from pixdim)"
        raise InvalidVolumeError(
            f"NIfTI voxel spacing is {tuple(pixdim)} mm (pixdim[1:4]) and the header has {codes}: the voxel size is "
            "unknown; set the spacing in the header (e.g. nibabel's header.set_zooms) and re-run", path)


def _read_nifti(path: Path) -> Volume:
    # nibabel logs "setting 0 dims to 1" for a zero pixdim; _check_nifti_geometry reports it as an
    # error naming the file instead.
    nib_log = logging.getLogger("nibabel.global")
    level = nib_log.level
    nib_log.setLevel(logging.ERROR)
    try:
        img = nib.load(str(path))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as err:
        raise VolumeReadError(f"not a readable NIfTI file ({type(err).__name__}: {err})", path) from err
    finally:
        nib_log.setLevel(level)
    _check_nifti_size(img, path)
    try:
        _check_nifti_geometry(img, path)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise VolumeReadError(f"NIfTI header is unreadable ({type(err).__name__}: {err})", path) from err
    try:
        raw = np.asanyarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise VolumeReadError(f"NIfTI file is truncated or corrupt ({type(err).__name__}: {err})", path) from err
    raw = np.asarray(raw)
    if raw.dtype == np.float64:
        raw = raw.astype(np.float32)
    data = _check_array(raw, path)
    hdr = img.header
    header = {
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "datatype": str(hdr.get_data_dtype()),
        "descrip": hdr["descrip"].tobytes().rstrip(b"\x00").decode("latin-1", "replace"),
    }
    return Volume(data, img.affine, "unknown", SourceInfo(path=path, format="nifti", header=header))


def _read_itk(path: Path, fmt: str) -> Volume:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise VolumeReadError(f"not a readable {fmt.upper()} file ({first})", path) from err
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidVolumeError(
            f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector/RGB); volumed needs a scalar volume",
            path,
        )
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) for 3D
    dim = img.GetDimension()
    if dim != 3:
        # Reuse the shape checks (2D, 4D) with the index order reversed to (X, Y, Z, ...).
        _check_array(np.transpose(arr), path)
        raise InvalidVolumeError(f"image is {dim}D; volumed needs a 3D volume", path)
    data = _check_array(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))), path)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.GetSpacing())[None, :]
    lps[:3, 3] = img.GetOrigin()
    header = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if len(img.GetMetaData(k)) < 200}
    return Volume(data, _LPS_TO_RAS @ lps, "unknown", SourceInfo(path=path, format=fmt, header=header))


# --------------------------------------------------------------------------------------- DICOM


def _list_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.name.upper() != "DICOMDIR")


def _slice_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    return row_cos, col_cos, ipp


def _is_image(ds) -> bool:
    modality = str(getattr(ds, "Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES:
        return False
    return "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds


def read_dicom_series(folder: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read one DICOM image series from ``folder`` (recursively) into a :class:`Volume`.

    Files without the DICOM preamble (READMEs, thumbnails) are skipped with a warning; files that
    claim to be DICOM but cannot be parsed, non-image objects alone, several series without
    ``series_uid``, missing slices, duplicate positions and irregular spacing are errors.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError("not a folder", folder)
    files = _list_files(folder)
    if not files:
        raise DicomSeriesError("empty folder: no DICOM files found", folder)

    images: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    skipped_non_dicom: list[Path] = []
    non_image: list[tuple[Path, str]] = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=False, defer_size="1 KB")
        except InvalidDicomError:
            skipped_non_dicom.append(f)
            continue
        except PermissionError as err:
            raise DicomSeriesError(f"cannot read file (permission denied): {err}", f) from err
        except Exception as err:  # pydicom raises many types for corrupt/truncated files
            raise DicomSeriesError(f"unreadable DICOM file ({type(err).__name__}: {err})", f) from err
        if not _is_image(ds):
            modality = str(getattr(ds, "Modality", "")).upper()
            if modality and modality not in _NON_IMAGE_MODALITIES and "PixelData" not in ds:
                raise DicomSeriesError(
                    f"unreadable DICOM file: a {modality} slice without pixel data (truncated or damaged)", f
                )
            sop = getattr(ds, "SOPClassUID", None)
            name = getattr(sop, "name", None) or str(getattr(ds, "Modality", "?"))
            non_image.append((f, f"{name}"))
            continue
        images[str(getattr(ds, "SeriesInstanceUID", "") or "")].append((f, ds))

    for f in skipped_non_dicom:
        log.warning("%s: not a DICOM file, skipped", f)
    if not images:
        if non_image:
            desc = "; ".join(f"{f.name} ({kind})" for f, kind in non_image[:5])
            raise DicomSeriesError(f"no DICOM image series; found only non-image DICOM object(s): {desc}", folder)
        raise DicomSeriesError(f"no DICOM files found ({len(skipped_non_dicom)} non-DICOM file(s) skipped)", folder)
    for f, kind in non_image:
        log.warning("%s: non-image DICOM object (%s), skipped", f, kind)

    if series_uid is not None:
        if series_uid not in images:
            listing = ", ".join(repr(u) for u in images)
            raise DicomSeriesError(f"series_uid {series_uid!r} not found; series present: {listing}", folder)
        chosen = series_uid
    elif len(images) > 1:
        parts = []
        for uid, items in images.items():
            desc = str(getattr(items[0][1], "SeriesDescription", "") or "")
            parts.append(f"{uid or '<no SeriesInstanceUID>'} ({len(items)} slices{', ' + desc if desc else ''})")
        raise DicomSeriesError(
            f"folder holds {len(images)} image series; choose one with series_uid= (--series-uid): " + "; ".join(parts),
            folder,
        )
    else:
        chosen = next(iter(images))
    return _assemble_series(folder, images[chosen])


def _assemble_series(folder: Path, items: list[tuple[Path, object]]) -> Volume:
    first_path, first = items[0]
    if int(getattr(first, "NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError("multi-frame (enhanced) DICOM is not supported yet; convert to single-frame slices", first_path)
    row_cos, col_cos, _ = _slice_geometry(first)
    normal = np.cross(row_cos, col_cos)
    rows, cols = int(first.Rows), int(first.Columns)
    pixel_spacing = np.asarray([float(v) for v in first.PixelSpacing], dtype=np.float64)

    entries = []
    for f, ds in items:
        rc, cc, ipp = _slice_geometry(ds)
        if not (np.allclose(rc, row_cos, atol=1e-4) and np.allclose(cc, col_cos, atol=1e-4)):
            raise DicomSeriesError("slice orientation differs from the rest of the series (ImageOrientationPatient)", f)
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise DicomSeriesError(f"slice size {ds.Rows}x{ds.Columns} differs from the series' {rows}x{cols}", f)
        if not np.allclose([float(v) for v in ds.PixelSpacing], pixel_spacing, atol=1e-4):
            raise DicomSeriesError("pixel spacing differs from the rest of the series", f)
        entries.append((float(np.dot(ipp, normal)), f, ds, ipp))
    entries.sort(key=lambda e: e[0])
    positions = np.asarray([e[0] for e in entries])

    if len(entries) > 1:
        gaps = np.diff(positions)
        dup = np.nonzero(gaps < 1e-3)[0]
        if dup.size:
            a, b = entries[dup[0]][1], entries[dup[0] + 1][1]
            raise DicomSeriesError(
                f"two slices at the same position {positions[dup[0]]:.3f} mm: {a.name} and {b.name} "
                "(duplicate slices or two series sharing a SeriesInstanceUID)",
                folder,
            )
        step = float(np.median(gaps))
        tol = max(0.01, 0.01 * step)
        irregular = np.nonzero(np.abs(gaps - step) > tol)[0]
        if irregular.size:
            i = int(irregular[0])
            ratio = gaps[i] / step
            where = f"between {entries[i][1].name} ({positions[i]:.2f} mm) and {entries[i + 1][1].name} ({positions[i + 1]:.2f} mm)"
            if abs(ratio - round(ratio)) * step <= tol and round(ratio) >= 2:
                missing = int(sum(round(gaps[j] / step) - 1 for j in irregular))
                raise DicomSeriesError(
                    f"series has {missing} missing slice(s): a {gaps[i]:.2f} mm gap {where}, expected {step:.2f} mm",
                    folder,
                )
            found = sorted({round(float(g), 3) for g in gaps})
            raise DicomSeriesError(
                f"unequal slice spacing: gaps of {found} mm (first irregular gap {where}); "
                "resample the series or split it into regular parts",
                folder,
            )
        k_vec = (entries[-1][3] - entries[0][3]) / (len(entries) - 1)
    else:
        raise InvalidVolumeError("series has a single slice (2D); volumed needs a 3D volume", first_path)

    slices = []
    integral = True
    for _, f, ds, _ in entries:
        try:
            arr = ds.pixel_array
        except Exception as err:
            raise DicomSeriesError(f"cannot decode pixel data ({type(err).__name__}: {err})", f) from err
        if arr.shape != (rows, cols):
            raise DicomSeriesError(f"pixel data shape {arr.shape} does not match Rows x Columns {rows}x{cols}", f)
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        integral &= slope == 1.0 and intercept == int(intercept)
        slices.append((arr, slope, intercept))

    # Keep int16 when rescaling is an integer shift that fits (halves memory for large CTs).
    lo = min(int(a.min()) * s + b for a, s, b in slices) if integral else 0
    hi = max(int(a.max()) * s + b for a, s, b in slices) if integral else 0
    dtype = np.int16 if integral and -32768 <= lo and hi <= 32767 else np.float32
    data = np.empty((cols, rows, len(slices)), dtype=dtype)
    for k, (arr, slope, intercept) in enumerate(slices):
        # pixel_array is (rows, cols) = (j, i); volumed stores (i, j, k).
        data[:, :, k] = (arr.astype(np.float32) * slope + intercept).T if not integral else (arr.astype(np.int32) + int(intercept)).T

    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]  # i runs along a row: spacing between columns
    lps[:3, 1] = col_cos * pixel_spacing[0]  # j runs down a column: spacing between rows
    lps[:3, 2] = k_vec
    lps[:3, 3] = entries[0][3]

    def uid(name: str) -> str | None:
        return str(getattr(first, name, "") or "") or None

    modality = str(getattr(first, "Modality", "") or "").upper()
    header = {
        key: str(getattr(first, key))
        for key in (
            "Manufacturer",
            "ManufacturerModelName",
            "SliceThickness",
            "KVP",
            "ConvolutionKernel",
            "ContrastBolusAgent",
            "PatientPosition",
            "BodyPartExamined",
            "StudyDate",
        )
        if getattr(first, key, None) not in (None, "")
    }
    header["TransferSyntaxUID"] = str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", ""))
    source = SourceInfo(
        path=folder,
        format="dicom",
        study_uid=uid("StudyInstanceUID"),
        series_uid=uid("SeriesInstanceUID"),
        frame_of_reference_uid=uid("FrameOfReferenceUID"),
        sop_instance_uids=tuple(str(getattr(ds, "SOPInstanceUID", "") or "") for _, _, ds, _ in entries),
        files=tuple(f for _, f, _, _ in entries),
        series_description=uid("SeriesDescription"),
        header=header,
    )
    mod = modality if modality in MODALITIES else "unknown"
    return Volume(data, _LPS_TO_RAS @ lps, mod, source)


def read_label(path: str | Path, reference: Volume | None = None, *, series_uid: str | None = None) -> Volume:
    """Read an integer label map; with ``reference``, bring it onto the reference's grid.

    A label map stored on the same physical grid with other axis order or flips (e.g. an LAS
    NIfTI for an LPS DICOM series) is reoriented exactly; any other grid is resampled with
    nearest-neighbour interpolation in world space (MONAI ``SpatialResample``).
    """
    lab = read_volume(path, series_uid=series_uid, modality="CT")  # modality is irrelevant for labels
    data = lab.data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.equal(np.mod(data, 1), 0)):
            raise InvalidVolumeError("label map holds non-integer values", path)
        data = data.astype(np.int32)
    if data.min() < 0:
        raise InvalidVolumeError(f"label map holds negative values (min {int(data.min())})", path)
    data = data.astype(np.uint8 if data.max() < 256 else np.uint16)
    lab = Volume(data, lab.affine, "unknown", lab.source)
    if reference is None or lab.same_grid(reference):
        return lab
    (lo, hi), (ref_lo, ref_hi) = _world_box(lab), _world_box(reference)
    if np.any(hi < ref_lo) or np.any(ref_hi < lo):
        # Resampling would give an all-background map, silently (an empty overlay, empty training masks).
        def box(a, b):
            return " x ".join(f"{x:.0f}..{y:.0f}" for x, y in zip(a, b))

        raise InvalidVolumeError(f"label map does not overlap the image in space (label RAS {box(lo, hi)} mm, image "
                                 f"{box(ref_lo, ref_hi)} mm): not a label map of this image", path)
    return resample_label_to(lab, reference)


def _world_box(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The RAS bounding box (mm) of a grid's voxels, voxel edges included."""
    corners = np.array([[i, j, k] for i in (-0.5, volume.shape[0] - 0.5) for j in (-0.5, volume.shape[1] - 0.5)
                        for k in (-0.5, volume.shape[2] - 0.5)])
    world = volume.voxel_to_world(corners)
    return world.min(axis=0), world.max(axis=0)


def resample_label_to(label: Volume, reference: Volume) -> Volume:
    """Label map ``label`` on ``reference``'s grid (exact for flips/permutations, else nearest)."""
    import torch
    from monai.transforms import SpatialResample

    resampler = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float64)
    src = label.to_metatensor().to(torch.float32)
    out = resampler(src, dst_affine=torch.as_tensor(reference.affine), spatial_size=reference.shape)
    arr = np.rint(np.asarray(out[0].detach().cpu().numpy())).astype(label.data.dtype)
    return Volume(arr, reference.affine.copy(), "unknown", label.source)


def describe_series(folder: str | Path) -> list[dict]:
    """One summary per DICOM image series in ``folder`` (uid, description, slice count)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: dict[str, dict] = {}
    for f in _list_files(Path(folder)):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if not _is_image(ds):
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        d = out.setdefault(uid, {"series_uid": uid, "description": str(getattr(ds, "SeriesDescription", "")), "slices": 0,
                                 "modality": str(getattr(ds, "Modality", ""))})
        d["slices"] += 1
    return list(out.values())


__all__: Sequence[str] = ("read_volume", "read_dicom_series", "read_label", "resample_label_to", "format_of", "describe_series")
