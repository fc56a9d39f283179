"""The structured report (volumed.inference.structured_report) of a phantom segmentation folder
written by segment's own writer: every number a sentence states is the one its JSON pointer
resolves to, absent structures are stated absent with their evidence, HU flags and
field-of-view cuts are said, lesions are measured and located, and the text is deterministic."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from volumed.errors import ConfigError, VolumedError
from volumed.inference.structured_report import (
    NORMAL_VOLUME_RANGES_ML,
    build_structured_report,
    is_lesion_like,
)
from volumed.io.volume import SourceInfo, Volume

from segmentation_folder import write_segmentation_folder

SPACING = 2.0  # mm, isotropic: a voxel is 0.008 mL


def _box(shape, x, y, z):
    m = np.zeros(shape, bool)
    m[x[0]:x[1] + 1, y[0]:y[1] + 1, z[0]:z[1] + 1] = True
    return m


def phantom():
    """A 40 x 40 x 24 CT (2 mm, RAS) and its masks: liver (right, below its normal range), spleen,
    a right upper lung lobe, an aorta through every slice (cut by the field of view), a
    'trachea' of bone density (HU flag), two liver tumour components, one lung nodule, and
    three absent structures (kidney_left, heart rejected by the presence rule, pancreas)."""
    shape = (40, 40, 24)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    affine[:3, 3] = (-40.0, -40.0, -24.0)
    hu = np.full(shape, -1000.0, np.float32)
    hu[4:36, 4:36, :] = 30.0  # body
    masks = {
        "liver": _box(shape, (22, 33), (10, 29), (2, 11)),
        "spleen": _box(shape, (6, 12), (12, 20), (4, 10)),
        "lung_upper_lobe_right": _box(shape, (22, 33), (10, 29), (14, 21)),
        "aorta": _box(shape, (18, 20), (20, 22), (0, 23)),
        "trachea": _box(shape, (18, 20), (8, 10), (14, 20)),
        "kidney_left": np.zeros(shape, bool),
        "heart": np.zeros(shape, bool),
        "pancreas": np.zeros(shape, bool),
        "liver tumor": _box(shape, (24, 27), (12, 16), (5, 7)) | _box(shape, (30, 31), (24, 25), (9, 10)),
        "lung nodule": _box(shape, (25, 27), (15, 17), (16, 18)),
    }
    hu[masks["liver"]] = 60.0
    hu[masks["spleen"]] = 50.0
    hu[masks["lung_upper_lobe_right"]] = -800.0
    hu[masks["aorta"]] = 150.0
    hu[masks["trachea"]] = 500.0
    hu[24:28, 12:17, 5:8] = 20.0
    hu[30:32, 24:26, 9:11] = 100.0
    hu[masks["lung nodule"]] = 30.0
    volume = Volume(hu, affine, "CT", SourceInfo(format="array"))
    return volume, masks


REJECTED = {"heart": {"volume_ml": 6.0, "confidence": 0.77, "max_probability": 0.85, "min_ml": 10.0, "min_confidence": 0.8}}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    volume, masks = phantom()
    folder = write_segmentation_folder(volume, masks, tmp_path_factory.mktemp("seg") / "out",
                                       bounds={"kidney_left": 0.031}, rejected=REJECTED,
                                       free_text=("liver tumor", "lung nodule"))
    return volume, masks, folder, build_structured_report(folder, volume, segment_numbers={"liver": 1})


def _resolve(key: str, files: dict):
    name, pointer = key.split("#")
    node = files[name]
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _one(report, section, term):
    hits = [s for s in report.sentences if s.section == section and s.masks[0].term == term]
    assert len(hits) == 1, (section, term, [s.text for s in report.sentences])
    return hits[0]


def test_every_stated_number_is_the_measurement_it_points_to(case):
    _, _, folder, report = case
    files = {"statistics.json": json.loads((folder / "statistics.json").read_text()), "report.json": json.loads(json.dumps(report.to_dict()))}
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    assert report.sentences and all(s.masks for s in report.sentences)
    for s in report.sentences:
        for m in s.measurements:
            assert _resolve(m.key, files) == m.value, (s.id, m.key)
            assert m.stated in s.text, (s.id, m.stated)
        # Every number in the sentence is a stated measurement, a normal range or a lesion/component index.
        stated = " ".join(m.stated for m in s.measurements)
        extra = s.normal_range and f"{s.normal_range['low_ml']:g}-{s.normal_range['high_ml']:g}"
        for number in re.findall(r"\d+(?:\.\d+)?", s.text):
            assert number in stated or (extra and number in extra) or s.section == "lesions" and len(number) <= 2 \
                or s.section == "absent" and number in ("0.5", "10", "0.80"), (s.text, number)
        for ref in s.masks:
            assert labels[str(ref.label_value)]["name"] == ref.term
            assert (folder / ref.mask_file).is_file()
    liver = _one(report, "structures", "liver")
    volume_ml = files["statistics.json"]["terms"]["liver"]["volume_ml"]
    assert volume_ml == pytest.approx(12 * 20 * 10 * SPACING ** 3 / 1000)
    mean_hu = files["statistics.json"]["terms"]["liver"]["intensity"]["mean"]  # 60 HU, tumours included
    assert mean_hu == pytest.approx((2400 * 60.0 - 60 * 40.0 + 8 * 40.0) / 2400)
    assert f"measures {volume_ml:.1f} mL" in liver.text and f"mean attenuation {mean_hu:.1f} HU" in liver.text
    assert liver.masks[0].segment_number == 1 and liver.masks[0].mask_file == "masks/liver.nii.gz"


def test_volumes_are_compared_with_the_documented_range_unless_cut_by_the_field_of_view(case):
    _, _, _, report = case
    liver = _one(report, "structures", "liver")
    assert "below the approximate adult range of 1100-2000 mL" in liver.text
    assert liver.normal_range["comparison"] == "below"
    assert liver.normal_range["source"] == NORMAL_VOLUME_RANGES_ML["liver"].source
    assert "Urata" in report.normal_ranges["liver"]["source"]
    aorta = _one(report, "structures", "aorta")  # through every slice: only part of it was scanned
    assert "reaches the edge of the scanned volume" in aorta.text and aorta.normal_range is None
    assert "range" not in aorta.text
    assert "range" not in _one(report, "structures", "lung_upper_lobe_right").text  # none documented


def test_absent_structures_are_stated_absent_with_their_evidence(case):
    _, _, _, report = case
    kidney = _one(report, "absent", "kidney_left")
    assert kidney.text == ("The left kidney is absent: the model's probability is at most 0.03 everywhere in the scan "
                           "(threshold 0.5).")
    assert [m.value for m in kidney.measurements] == [0.031]
    heart = _one(report, "absent", "heart")
    assert "reported absent" in heart.text and "6.0 mL" in heart.text and "0.77" in heart.text
    assert "pancreas is absent" in _one(report, "absent", "pancreas").text
    assert "Absent structures:" in report.text()


def test_an_implausible_mean_hu_is_flagged(case):
    _, _, _, report = case
    flag = _one(report, "flags", "trachea")
    assert "500.0 HU is implausible for airway (expected -1150 to -730 HU)" in flag.text
    assert not [s for s in report.sentences if s.section == "flags" and s.masks[0].term != "trachea"]


def test_lesions_are_components_measured_in_three_axes_and_located(case):
    _, _, _, report = case
    assert is_lesion_like("liver tumor") and is_lesion_like("kidney_cyst_left") and not is_lesion_like("liver")
    big, small, nodule = report.lesions
    assert (big.term, big.component, big.voxels) == ("liver tumor", 1, 4 * 5 * 3)
    assert big.size_mm == pytest.approx((8.0, 10.0, 6.0)) and big.volume_ml == pytest.approx(60 * 0.008)
    assert big.mean_intensity == pytest.approx(20.0)
    assert (big.organ, big.side, big.lobe) == ("liver", "right", None)
    assert (small.component, small.voxels, small.mean_intensity) == (2, 8, pytest.approx(100.0))
    assert small.size_mm == pytest.approx((4.0, 4.0, 4.0))
    assert (nodule.organ, nodule.lobe, nodule.side) == ("lung_upper_lobe_right", "lung_upper_lobe_right", "right")
    sentences = [s for s in report.sentences if s.section == "lesions"]
    assert [s.masks[0].component for s in sentences] == [1, 2, 1]
    assert "measures 0.48 mL and 8.0 x 10.0 x 6.0 mm" in sentences[0].text
    assert "mean attenuation 20.0 HU, in the liver, right side" in sentences[0].text
    assert [m.term for m in sentences[0].masks] == ["liver tumor", "liver"]
    assert "in the right lung, upper lobe" in sentences[2].text
    assert "Lung nodule" in sentences[2].labels and report.labels["Lung nodule"] == 1
    # Lesion-like terms are lesions, not organs.
    assert not [s for s in report.sentences if s.section == "structures" and s.masks[0].term == "liver tumor"]


def test_the_text_is_deterministic_and_lists_every_sentence(case):
    volume, _, folder, report = case
    again = build_structured_report(folder, volume, segment_numbers={"liver": 1})
    assert again.text() == report.text() and again.to_dict() == report.to_dict()
    text = report.text()
    assert all(s.text in text.splitlines() for s in report.sentences)
    assert [s.id for s in report.sentences] == [f"s{i}" for i in range(1, len(report.sentences) + 1)]


def test_a_report_without_lesion_masks_says_lesions_were_not_assessed(tmp_path):
    volume, masks = phantom()
    folder = write_segmentation_folder(volume, {"liver": masks["liver"], "kidney_left": masks["kidney_left"]}, tmp_path / "o")
    report = build_structured_report(folder, volume)
    assert not report.lesions and any("lesions were not assessed" in n for n in report.notes)
    assert [s.section for s in report.sentences] == ["structures", "absent"]


def test_bad_segmentation_folders_are_named(case, tmp_path):
    volume, _, folder, _ = case
    with pytest.raises(VolumedError, match="no statistics.json here") as err:
        build_structured_report(tmp_path, volume)
    assert err.value.path == tmp_path / "statistics.json"
    (tmp_path / "statistics.json").write_bytes(b"{\"terms\": \"\xff\"}")
    with pytest.raises(VolumedError, match="not UTF-8"):
        build_structured_report(tmp_path, volume)
    (tmp_path / "statistics.json").write_text("{\"terms\": ")
    with pytest.raises(VolumedError, match="not valid JSON"):
        build_structured_report(tmp_path, volume)
    (tmp_path / "statistics.json").write_text(json.dumps({"shape": [40, 40, 24], "terms": {}}))
    with pytest.raises(VolumedError, match="lists no terms"):  # an empty report is refused, not written
        build_structured_report(tmp_path, volume)
    (tmp_path / "statistics.json").write_text(json.dumps({"shape": [1, 1, 1], "terms": {"liver": {"present": True}}}))
    with pytest.raises(VolumedError, match="'liver' lacks volume_ml, voxels"):
        build_structured_report(tmp_path, volume)
    with pytest.raises(ConfigError, match="not the segmented image"):
        build_structured_report(folder, Volume(np.zeros((40, 40, 23), np.float32), volume.affine, "CT"))


def test_an_image_of_the_same_shape_elsewhere_in_space_is_not_the_segmented_image(case):
    """`volumed report other.nii.gz --from-segmentation OUT` with an image of the segmented
    image's shape but another affine (a rotated or shifted scan) was reported on, with the
    segmented image's volumes and the lesions' sides and places read through the wrong grid."""
    volume, _, folder, _ = case
    moved = volume.affine.copy()
    moved[:3, 3] += (0.0, 0.0, 30.0)
    with pytest.raises(ConfigError, match="not its position, orientation or spacing") as err:
        build_structured_report(folder, Volume(np.asarray(volume.data), moved, "CT"))
    assert err.value.path == folder / "labels.nii.gz"
    build_structured_report(folder, Volume(np.asarray(volume.data), volume.affine + 1e-5, "CT"))  # rounding is fine


def test_a_missing_lesion_mask_file_is_named(case, tmp_path):
    import shutil

    volume, _, folder, _ = case
    copy = shutil.copytree(folder, tmp_path / "seg")
    (copy / "masks" / "liver_tumor.nii.gz").unlink()
    with pytest.raises(VolumedError, match="mask of 'liver tumor' is missing") as err:
        build_structured_report(copy, volume)
    assert err.value.path == copy / "masks" / "liver_tumor.nii.gz"
