"""The bad-input corpus: each case raises a specific error naming the file and the problem,
and the CLI turns it into one line on stderr with a non-zero exit and no partial output."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from volumed.cli import app, main
from volumed.errors import DicomSeriesError, InvalidVolumeError, VolumeReadError
from volumed.io import read_volume

AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, AFF), str(path))
    return path


def _copy_series(ts_dir: Path, dst: Path, keep=None) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted((ts_dir / "example_ct_dicom_with_uids").iterdir())
    out = []
    for i, f in enumerate(files):
        if keep is None or i in keep:
            out.append(Path(shutil.copy(f, dst / f.name)))
    return out


def _sorted_by_z(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient[2]))


# ---------------------------------------------------------------------------- file corpus

FILE_CASES = {
    "truncated_gz": (VolumeReadError, "NIfTI"),
    "text_as_nii": (VolumeReadError, "not a readable NIfTI"),
    "image_2d": (InvalidVolumeError, "2D"),
    "image_4d": (InvalidVolumeError, "4D"),
    "nan_voxels": (InvalidVolumeError, "NaN"),
    "zero_axis": (InvalidVolumeError, "zero-length axis"),
    "missing": (VolumeReadError, "no such file"),
    "unknown_suffix": (VolumeReadError, "unknown volume format"),
    "huge_header_nii": (VolumeReadError, "claims 30000 x 30000 x 30000 voxels"),
    "huge_header_gz": (VolumeReadError, "more than deflate can hold"),
    "zero_spacing_no_qform_sform": (InvalidVolumeError, "voxel size is unknown"),
}


def _raw_nifti(path: Path, shape, pixdim=(1.0, 1.0, 1.0), codes=(0, 0), data: bytes | None = None) -> Path:
    """A NIfTI-1 file written field by field, so that the header can lie about the data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr["dim"][0] = 3
    hdr["dim"][1:4] = shape
    hdr["pixdim"][1:4] = pixdim
    hdr["qform_code"], hdr["sform_code"] = codes
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\x00" * 4 + (data if data is not None else b"\x00" * 64)
    if path.name.endswith(".gz"):
        import gzip

        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def _make_file_case(name: str, root: Path, ts_dir: Path) -> Path:
    if name == "truncated_gz":
        raw = (ts_dir / "example_ct_sm.nii.gz").read_bytes()
        p = root / "truncated.nii.gz"
        p.write_bytes(raw[: len(raw) // 2])
        return p
    if name == "text_as_nii":
        p = root / "notes.nii"
        p.write_text("this is a text file, not an image\n")
        return p
    if name == "image_2d":
        return _nifti(root / "slice.nii.gz", np.zeros((32, 32), np.int16))
    if name == "image_4d":
        return _nifti(root / "dynamic.nii.gz", np.zeros((16, 16, 8, 3), np.int16))
    if name == "nan_voxels":
        data = np.zeros((16, 16, 8), np.float32)
        data[3, 4, 5] = np.nan
        return _nifti(root / "nan.nii.gz", data)
    if name == "zero_axis":
        return _nifti(root / "empty_axis.nii.gz", np.zeros((16, 0, 8), np.int16))
    if name == "huge_header_nii":
        return _raw_nifti(root / "huge.nii", (30000, 30000, 30000))
    if name == "huge_header_gz":
        return _raw_nifti(root / "huge.nii.gz", (30000, 30000, 30000))
    if name == "zero_spacing_no_qform_sform":
        return _raw_nifti(root / "no_geometry.nii.gz", (8, 8, 4), pixdim=(0.0, 0.0, 0.0), data=b"\x00" * (8 * 8 * 4 * 2))
    if name == "missing":
        return root / "does_not_exist.nii.gz"
    if name == "unknown_suffix":
        p = root / "scan.jpg"
        p.write_bytes(b"\xff\xd8\xff")
        return p
    raise KeyError(name)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_files(case, tmp_path, ts_dir):
    path = _make_file_case(case, tmp_path, ts_dir)
    exc, words = FILE_CASES[case]
    with pytest.raises(exc) as info:
        read_volume(path)
    assert str(path) in str(info.value)
    assert words in str(info.value)


def test_header_checks_accept_honest_files(tmp_path):
    # Same raw writer, honest header: read, with the stored spacing.
    ok = _raw_nifti(tmp_path / "ok.nii", (8, 8, 4), pixdim=(1.5, 1.5, 3.0), codes=(1, 0), data=b"\x00" * (8 * 8 * 4 * 2))
    vol = read_volume(ok)
    assert vol.shape == (8, 8, 4) and np.allclose(np.linalg.norm(vol.affine[:3, :3], axis=0), (1.5, 1.5, 3.0))
    # A truncated uncompressed file: the size check names both numbers.
    short = _raw_nifti(tmp_path / "short.nii", (8, 8, 4), data=b"\x00" * 100)
    with pytest.raises(VolumeReadError, match=r"claims 8 x 8 x 4 voxels \(512 bytes of data from byte 352\) but the file has only 452 bytes"):
        read_volume(short)
    # Zero pixdim with an sform: the sform carries the voxel size, so the file is fine.
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), AFF)
    img.header["pixdim"][1:4] = 0
    nib.save(img, str(tmp_path / "sform.nii.gz"))
    assert np.allclose(read_volume(tmp_path / "sform.nii.gz").affine, AFF)


def test_4d_with_single_volume_is_accepted(tmp_path):
    p = _nifti(tmp_path / "x.nii.gz", np.ones((16, 16, 8, 1), np.int16))
    assert read_volume(p).shape == (16, 16, 8)


# --------------------------------------------------------------------------- DICOM corpus

def _dicom_case(name: str, root: Path, ts_dir: Path) -> Path:
    folder = root / name
    if name == "two_series":
        files = _copy_series(ts_dir, folder)
        for f in files[:10]:
            ds = pydicom.dcmread(str(f))
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
            ds.SeriesDescription = "second series"
            ds.save_as(str(f))
    elif name == "missing_slice":
        files = _sorted_by_z(_copy_series(ts_dir, folder))
        files[9].unlink()
    elif name == "unequal_spacing":
        files = _sorted_by_z(_copy_series(ts_dir, folder))
        for f in files[12:]:
            ds = pydicom.dcmread(str(f))
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.7]
            ds.save_as(str(f))
    elif name == "non_image":
        folder.mkdir()
        _text_sr(folder / "report.dcm")
    elif name == "empty_folder":
        folder.mkdir()
    elif name == "unreadable_file":
        files = _copy_series(ts_dir, folder)
        raw = files[5].read_bytes()
        files[5].write_bytes(raw[:1500])  # the DICM preamble survives; the data set does not
    else:
        raise KeyError(name)
    return folder


def _text_sr(path: Path) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(str(path), enforce_file_format=True)


DICOM_CASES = {
    "two_series": "2 image series",
    "missing_slice": "1 missing slice",
    "unequal_spacing": "unequal slice spacing",
    "non_image": "non-image DICOM",
    "empty_folder": "empty folder",
    "unreadable_file": "unreadable DICOM file",
}


@pytest.mark.parametrize("case", sorted(DICOM_CASES))
def test_bad_dicom_folders(case, tmp_path, ts_dir):
    folder = _dicom_case(case, tmp_path, ts_dir)
    with pytest.raises(DicomSeriesError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert DICOM_CASES[case] in msg
    if case == "unreadable_file":
        assert "CT." in msg and str(folder) in msg  # names the broken slice file
    else:
        assert str(folder) in msg


def test_two_series_resolved_by_series_uid(tmp_path, ts_dir):
    folder = _dicom_case("two_series", tmp_path, ts_dir)
    with pytest.raises(DicomSeriesError) as info:
        read_volume(folder)
    assert "1.2.826.0.1.3680043.8.498.1 (10 slices, second series)" in str(info.value)
    vol = read_volume(folder, series_uid="1.2.826.0.1.3680043.8.498.1")
    assert vol.shape == (512, 512, 10)


def test_non_dicom_files_in_series_folder_are_skipped(tmp_path, ts_dir, caplog):
    folder = tmp_path / "series"
    _copy_series(ts_dir, folder)
    (folder / "README.txt").write_text("exported by PACS\n")
    vol = read_volume(folder)
    assert vol.shape == (512, 512, 20)
    assert "README.txt: not a DICOM file, skipped" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_permission_denied(tmp_path, ts_dir):
    folder = tmp_path / "series"
    files = _copy_series(ts_dir, folder)
    files[3].chmod(0)
    with pytest.raises(DicomSeriesError, match="permission denied"):
        read_volume(folder)


# ------------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("case", ["truncated_gz", "image_4d", "nan_voxels", "huge_header_gz", "zero_spacing_no_qform_sform"])
def test_cli_one_line_error_and_no_partial_output(case, tmp_path, ts_dir, capsys):
    path = _make_file_case(case, tmp_path, ts_dir)
    out = tmp_path / "out" / "preview.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", str(path), "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("volumed: error: ") and str(path) in err[0]
    assert "Traceback" not in err[0]
    # Nothing was written: no output, no temporary file, not even the output folder's content.
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_output_below_a_file_is_one_line(tmp_path, ts_dir, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    out = blocker / "preview.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["preview", str(ts_dir / "example_ct_sm.nii.gz"), "-o", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"volumed: error: {out}: cannot create the output: {blocker} is a file, not a folder"]
    assert blocker.read_text() == "a file, not a folder\n"


def test_cli_debug_shows_traceback(tmp_path, ts_dir):
    path = _make_file_case("text_as_nii", tmp_path, ts_dir)
    with pytest.raises(VolumeReadError):
        main(["--debug", "info", str(path)])


def test_cli_dicom_error_is_one_line(tmp_path, ts_dir):
    folder = _dicom_case("two_series", tmp_path, ts_dir)
    result = CliRunner().invoke(app, ["info", str(folder)])
    assert result.exit_code != 0  # the runner sees the exception; main() maps it to exit 2
    assert isinstance(result.exception, DicomSeriesError)
