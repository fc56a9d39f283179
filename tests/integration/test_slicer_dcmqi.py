"""3D Slicer's reading of our DICOM SEG and SR, through the library it uses: dcmqi.

Slicer's QuantitativeReporting extension imports a DICOM SEG with dcmqi's ``segimage2itkimage``
(one image per segment plus the segment metadata) and a TID 1500 measurement report with
``tid1500reader``. Those are dcmqi's own command-line tools from its PyPI wheel, the same C++ code
Slicer bundles, run here on the SEG and SR that `volumed segment` writes for the real 20-slice CT
series. What Slicer would show must be what we wrote: the masks voxel for voxel on the CT's grid,
each structure's code and colour, and the measurements of statistics.json tied to their segments.
(Slicer itself is a desktop download, not available here; docs/viewers.md has its steps.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared_helpers import run_cli

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "volumed_promptseg_ct"
PROMPTS = ["liver", "spleen", "aorta"]
SNOMED = {"liver": "10200004", "spleen": "78961009", "aorta": "15825003"}

pytestmark = [pytest.mark.realdata, pytest.mark.filterwarnings("ignore::UserWarning")]


def _dcmqi(tool: str, *args: str) -> subprocess.CompletedProcess:
    """Run one of dcmqi's binaries (a dev dependency: `pip install -e '.[dev]'`)."""
    dcmqi = pytest.importorskip("dcmqi", reason="dcmqi is a dev dependency: pip install -e '.[dev]'")
    binary = Path(dcmqi.__file__).parent / "bin" / tool
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"{tool} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def slicer_case(ts_dir, tmp_path_factory):
    """`volumed segment` on the DICOM series, then dcmqi's reading of its SEG and SR."""
    root = tmp_path_factory.mktemp("slicer")
    out = root / "out"

    class _Capsys:  # run_cli wants capsys; a module fixture has none
        def readouterr(self):
            return "", ""

    code, _, err = run_cli(["segment", str(ts_dir / "example_ct_dicom_with_uids"), "--model", str(BUNDLE / "models"), "-o", str(out),
                            "--device", "cpu"] + sum((["-p", p] for p in PROMPTS), []), _Capsys())
    assert code == 0, err
    seg_dir = root / "dcmqi_seg"
    seg_dir.mkdir()
    seg_run = _dcmqi("segimage2itkimage", "--inputDICOM", str(out / "segmentation.dcm"), "--outputDirectory", str(seg_dir),
                     "--outputType", "nifti")
    sr_json = root / "dcmqi_sr.json"
    _dcmqi("tid1500reader", "--inputDICOM", str(out / "report_sr.dcm"), "--outputMetadata", str(sr_json))
    return out, seg_dir, seg_run, json.loads(sr_json.read_text())


def _segments(meta: dict) -> list[dict]:
    return [attrs for group in meta["segmentAttributes"] for attrs in group]


def test_slicer_reads_the_seg_masks_voxel_for_voxel_on_the_ct_grid(slicer_case):
    out, seg_dir, _, _ = slicer_case
    segments = _segments(json.loads((seg_dir / "meta.json").read_text()))
    assert [s["SegmentLabel"] for s in segments] == PROMPTS
    for s in segments:
        name = s["TrackingIdentifier"]
        theirs = sitk.ReadImage(str(seg_dir / f"{s['labelID']}.nii.gz"))
        ours = sitk.ReadImage(str(out / "masks" / f"{name}.nii.gz"))
        assert theirs.GetSize() == ours.GetSize() == (512, 512, 20), name
        np.testing.assert_allclose(theirs.GetOrigin(), ours.GetOrigin(), atol=1e-3, err_msg=name)
        np.testing.assert_allclose(theirs.GetSpacing(), ours.GetSpacing(), atol=1e-4, err_msg=name)
        np.testing.assert_allclose(theirs.GetDirection(), ours.GetDirection(), atol=1e-6, err_msg=name)
        a, b = sitk.GetArrayFromImage(theirs) > 0, sitk.GetArrayFromImage(ours) > 0
        assert b.sum() > 1000, name
        assert np.array_equal(a, b), f"{name}: {int((a != b).sum())} voxels differ"


def test_slicer_sees_each_structures_code_and_our_colour(slicer_case):
    from volumed.inference.preview import label_color

    out, seg_dir, seg_run, _ = slicer_case
    # Without RecommendedDisplayCIELabValue dcmqi says so and Slicer falls back to one grey-green
    # for every segment.
    assert "Failed to get CIELab" not in seg_run.stdout + seg_run.stderr
    value_of = {entry["name"]: int(value) for value, entry in json.loads((out / "labels.json").read_text())["labels"].items()}
    segments = _segments(json.loads((seg_dir / "meta.json").read_text()))
    colours = []
    for s in segments:
        name = s["TrackingIdentifier"]
        assert s["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == SNOMED[name]
        assert s["SegmentedPropertyTypeCodeSequence"]["CodingSchemeDesignator"] == "SCT"
        assert s["SegmentAlgorithmType"] == "AUTOMATIC"
        expected = np.round(255 * np.array(label_color(value_of[name])))
        # CIELab in 16 bits and back: within 2 of the preview's RGB.
        np.testing.assert_allclose(s["recommendedDisplayRGBValue"], expected, atol=2, err_msg=name)
        colours.append(tuple(s["recommendedDisplayRGBValue"]))
    assert len(set(colours)) == len(colours), colours


def test_slicer_reads_the_sr_measurements_of_each_segment(slicer_case):
    out, seg_dir, _, sr = slicer_case
    assert sr["CompletionFlag"] == "COMPLETE"
    segments = {s["labelID"]: s for s in _segments(json.loads((seg_dir / "meta.json").read_text()))}
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    measurements = sr["Measurements"]
    assert len(measurements) == len(PROMPTS)
    for m in measurements:
        segment = segments[m["ReferencedSegment"]]
        name = segment["TrackingIdentifier"]
        assert m["TrackingUniqueIdentifier"] == segment["TrackingUniqueIdentifier"], name
        assert m["Finding"]["CodeValue"] == SNOMED[name]
        items = {(i["quantity"]["CodeMeaning"], i.get("derivationModifier", {}).get("CodeMeaning")): float(i["value"])
                 for i in m["measurementItems"]}
        volume = items[("Volume", None)]
        assert volume > 10, name
        np.testing.assert_allclose(volume, stats[name]["volume_ml"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(items[("Attenuation Coefficient", "Mean")], stats[name]["intensity"]["mean"], rtol=1e-6,
                                   err_msg=name)
        assert 0.5 < items[("Probability", "Mean")] <= 1.0, name
