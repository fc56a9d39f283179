"""bundles/volumed_report_ct (issue 17, the report head as a MONAI bundle): segment, then the
structured report, by MONAI's runner and by `volumed run`, equal to `volumed report`.

The bundle is the promptseg bundle's pipeline with :class:`volumed.bundle.report.ReportRunner` as
its evaluator; fast tests use the real configs around a tiny untrained package, and the tests
marked realdata run the real bundle on the real DICOM series (SEG + SR) as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import BUNDLES, PROMPTSEG, REPO
from monai.bundle import ConfigWorkflow
from monai.inferers import SlidingWindowInferer

from volumed.bundle import read_metadata, validate_metadata, verify_hashes
from volumed.bundle.metadata import channel_names
from volumed.bundle.report import ReportRunner
from volumed.bundle.run import run_bundle
from volumed.inference.reporting import ReportResult, write_report

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI warns that configs run code

REPORT = BUNDLES / "volumed_report_ct"


def _tiny_report_bundle(tiny_bundle, folder):
    """The report bundle's LICENSE, configs and docs around the tiny promptseg bundle's package."""
    from volumed.bundle.integrity import record_hashes

    root = folder / "volumed_report_ct"
    root.mkdir()
    for name in ("LICENSE", "configs", "docs"):
        src = REPORT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.copytree(tiny_bundle / "models", root / "models")
    record_hashes(root)
    return root


def _workflow(bundle, config="inference.json", workflow_type="infer", **override) -> ConfigWorkflow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / config), logging_file=False,
                              workflow_type=workflow_type, bundle_root=str(bundle), **override)


def _same_reports(a, b):
    """Two output folders hold the same report (text, sentences with their masks and measurements)
    and the same masks (voxels and affine)."""
    def text(folder):  # the header names the output folder itself
        return [line for line in (folder / "report.txt").read_text().splitlines() if not line.startswith("segmentation: ")]

    assert text(a) == text(b) and len(text(a)) > 5
    ja, jb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert [s["text"] for s in ja["sentences"]] == [s["text"] for s in jb["sentences"]]
    assert [s["masks"] for s in ja["sentences"]] == [s["masks"] for s in jb["sentences"]]
    for rel in ["labels.nii.gz", *sorted(p.relative_to(a).as_posix() for p in (a / "masks").glob("*.nii.gz"))]:
        x, y = nib.load(a / rel), nib.load(b / rel)
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), rel
        assert np.array_equal(x.affine, y.affine), rel
    return ja


def test_layout_metadata_and_the_promptseg_pipeline():
    """A complete bundle whose inference.json is the promptseg bundle's (same MONAI preprocessing,
    inferer, postprocessing and MONAI Label keys) except for the evaluator, and whose label names
    are the segmenter's trained terms."""
    validate_metadata(REPORT)
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json", "docs/README.md",
                 "models/config.json", "models/model.safetensors", "large_files.yml"):
        assert (REPORT / name).is_file(), name
    config = json.loads((REPORT / "configs" / "inference.json").read_text())
    base = json.loads((PROMPTSEG / "configs" / "inference.json").read_text())
    assert config["evaluator"]["_target_"] == "volumed.bundle.report.ReportRunner"
    assert "$import volumed.bundle.report" in config["imports"]
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "displayable_configs", "dataset", "prompts"):
        assert config[key] == base[key], key
    assert {k: v for k, v in config["evaluator"].items() if k != "_target_"} == {
        k: v for k, v in base["evaluator"].items() if k != "_target_"}
    assert channel_names(read_metadata(REPORT)) == config["displayable_configs"]["prompts"]
    assert read_metadata(REPORT)["task"].startswith("Structured, grounded CT report")


def test_the_segmenter_is_the_default_bundles_weights():
    """The report is written from the default segmenter: the same weights (sha256) and package
    config, so retraining one without the other is caught here."""
    (mine,), (theirs,) = verify_hashes(REPORT), verify_hashes(PROMPTSEG)
    assert mine.sha256 == theirs.sha256
    assert (REPORT / "models" / "config.json").read_text() == (PROMPTSEG / "models" / "config.json").read_text()


def test_config_workflow_infer_and_train_check_properties(tiny_bundle, tmp_path):
    bundle = _tiny_report_bundle(tiny_bundle, tmp_path)
    workflow = _workflow(bundle, input_image="unused.nii.gz")
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.evaluator, ReportRunner)
    assert isinstance(workflow.inferer, SlidingWindowInferer)
    assert workflow.evaluator.postprocessing is workflow.postprocessing
    assert workflow.dataset.transform is workflow.preprocessing
    train = _workflow(REPORT, "train.json", "train", output_dir=str(tmp_path / "train"))
    train.initialize()
    assert train.check_properties() == []


def test_monai_run_writes_what_volumed_report_writes(tiny_bundle, ts_dir, tmp_path):
    """MONAI's run() and volumed run on the tiny report bundle, against volumed report with the
    same package: the same report and masks, on the input's grid."""
    from monai.bundle import run

    bundle = _tiny_report_bundle(tiny_bundle, tmp_path)
    image = ts_dir / "example_ct_sm.nii.gz"
    prompts = ["liver", "spleen", "aorta"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(bundle / "configs" / "inference.json"), logging_file=False, bundle_root=str(bundle),
            input_image=str(image), output_dir=str(tmp_path / "monai"), prompts=prompts, device="cpu")
    write_report(image, tmp_path / "report", prompts=prompts, model_dir=bundle / "models", progress=False)
    doc = _same_reports(tmp_path / "monai", tmp_path / "report")
    assert doc["sentences"], "the untrained tiny model still gives sentences (found or absent structures)"
    (result,) = run_bundle(bundle, image, tmp_path / "run", prompts=prompts, device="cpu")
    assert isinstance(result, ReportResult) and result.segmentation is not None
    assert result.report_txt == tmp_path / "run" / "report.txt"
    _same_reports(tmp_path / "monai", tmp_path / "run")
    source, label = nib.load(image), nib.load(tmp_path / "monai" / "labels.nii.gz")
    assert label.shape == source.shape and np.allclose(label.affine, source.affine)
    # Nothing is silently overwritten: a second run into the same folder is refused.
    from volumed.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="outputs of an earlier run"):
        run_bundle(bundle, image, tmp_path / "run", prompts=prompts, device="cpu")


@pytest.mark.realdata
def test_python_m_monai_bundle_run_on_the_real_dicom_series_equals_volumed_report(ts_dir, tmp_path):
    """The command of issue 17, as a user types it, on the real bundle and the real DICOM series
    with UIDs: the report, the masks, a DICOM SEG and the report's DICOM SR (read back: it
    references the SEG), identical to `volumed report` with the bundle's model."""
    import highdicom as hd
    import pydicom

    series = ts_dir / "example_ct_dicom_with_uids"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPORT / "configs" / "inference.json"),
           "--bundle_root", str(REPORT), "--input_image", str(series), "--output_dir", str(tmp_path / "bundle"),
           "--prompts", "['liver','spleen','aorta']", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DICOM SR" in done.stdout and "The liver measures" in done.stdout, done.stdout[-2000:]
    write_report(series, tmp_path / "report", prompts=["liver", "spleen", "aorta"], model_dir=REPORT / "models",
                 progress=False)
    doc = _same_reports(tmp_path / "bundle", tmp_path / "report")
    liver = next(s for s in doc["sentences"] if s["text"].startswith("The liver measures"))
    assert [m["term"] for m in liver["masks"]] == ["liver"]
    sr = hd.sr.srread(tmp_path / "bundle" / "report_sr.dcm")
    seg = pydicom.dcmread(str(tmp_path / "bundle" / "segmentation.dcm"), stop_before_pixels=True)
    assert doc["dicom"]["sr"]["sop_instance_uid"] == sr.SOPInstanceUID
    assert doc["dicom"]["seg"]["sop_instance_uid"] == seg.SOPInstanceUID
    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    ref = groups["liver"].referenced_segment[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert ref.ReferencedSegmentNumber == liver["masks"][0]["segment_number"]


def test_bundle_new_task_report_from_a_segmentation_package(make_tiny_package, tmp_path):
    """Fine-tuning the segmenter ends in a report bundle too: `volumed bundle new --task report`
    starts from this bundle's configs, and the label names become the package's terms."""
    from volumed.bundle.new import bump_version, new_bundle

    package = make_tiny_package(tmp_path, ["liver", "spleen"])
    made = new_bundle(package, "my_report", task="report", bundles_dir=tmp_path / "bundles", base=REPORT,
                      changelog="site fine-tune")
    root = tmp_path / "bundles" / "my_report"
    metadata = validate_metadata(root)
    assert made.version == metadata["version"] == bump_version(read_metadata(REPORT)["version"])
    assert metadata["changelog"][made.version] == "site fine-tune"
    assert channel_names(metadata) == ["liver", "spleen"]
    infer = json.loads((root / "configs" / "inference.json").read_text())
    assert infer["evaluator"]["_target_"] == "volumed.bundle.report.ReportRunner"
    assert infer["displayable_configs"]["prompts"] == ["liver", "spleen"]
    assert [r.sha256 for r in verify_hashes(root)] == [made.sha256]
