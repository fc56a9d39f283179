"""The `volumed` command: help at every level, info and preview on the real CT."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from volumed.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["info"], ["preview"], ["encoders"]])
def test_help_at_every_level(args):
    result = runner.invoke(app, args + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
    if args:
        # Each command documents its own options.
        assert "--" in result.output.split("Usage", 1)[1]


def test_info_text_and_json(ts_dir):
    result = runner.invoke(app, ["info", str(ts_dir / "example_ct_dicom")])
    assert result.exit_code == 0, result.output
    assert "512 x 512 x 20 voxels" in result.output and "0.9766, 0.9766, 2 mm" in result.output
    assert "min -1024.0  max 1839.0" in result.output
    result = runner.invoke(app, ["info", "--json", str(ts_dir / "example_ct_sm.nii.gz")])
    info = json.loads(result.output)
    assert info["shape"] == [122, 101, 30] and info["orientation"] == "RAS" and info["modality"] == "CT"


def test_preview_with_label_overlay(ts_dir, tmp_path):
    out = tmp_path / "p.png"
    args = ["preview", str(ts_dir / "example_ct_sm.nii.gz"), "--label", str(ts_dir / "example_seg.nii.gz"), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[1] > img.shape[0] > 200
    # Overlay present: coloured pixels (channels differ), which a grey CT alone never has.
    coloured = np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2]) > 40
    assert coloured.mean() > 0.01
    # A second run refuses to overwrite without --overwrite.
    again = runner.invoke(app, args)
    assert again.exit_code != 0
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0


def test_preview_radiological_orientation(ts_dir, tmp_path):
    """The liver (patient's right) appears on the left half of the axial view."""
    from volumed.inference.preview import three_views, to_ras
    from volumed.io import read_label, read_volume

    vol = read_volume(ts_dir / "example_ct_dicom")  # LPS on disk
    lab = read_label(ts_dir / "example_seg_dicom.nii.gz", vol)
    import nibabel as nib

    ras_lab = nib.orientations.apply_orientation(lab.data, nib.orientations.io_orientation(vol.affine))
    axial = three_views(ras_lab, tuple(s // 2 for s in ras_lab.shape))[0]
    cols = np.nonzero(axial == 5)[1]
    assert cols.mean() < axial.shape[1] / 2
    data, spacing = to_ras(vol)
    assert spacing == pytest.approx((0.9765625, 0.9765625, 2.0))


def test_encoders_list_table():
    from volumed.encoders import list_encoders

    result = runner.invoke(app, ["encoders", "list"])
    assert result.exit_code == 0, result.output
    for name in list_encoders():
        assert name in result.output
    row = next(line for line in result.output.splitlines() if line.startswith("stunet_b "))
    assert "28.73" in row  # encoder-only parameters (M) of STU-Net-B


def test_train_unknown_task_is_a_one_line_error(capsys):
    from volumed.cli import main

    with pytest.raises(SystemExit) as info:
        main(["train", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown training task 'nope'; available: " in err
    assert {"multiclass", "promptseg", "report"} <= set(err.split("available: ")[1].strip().split(", "))


def test_classify_without_a_model_says_why_there_is_no_default(ts_dir, capsys):
    """The shipped CLIP bundle is phantom-trained: not a silent default on a real CT, and the
    error names the bundle a user can pass anyway."""
    from volumed.cli import main

    with pytest.raises(SystemExit) as info:
        main(["classify", str(ts_dir / "example_ct_sm.nii.gz")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("volumed: error: volumed classify: no default CLIP model: the shipped bundle was trained on phantoms only")
    assert "--model bundles/volumed_clip_ct/models" in err
