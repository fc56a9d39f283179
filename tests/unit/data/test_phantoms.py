"""Phantom cohorts: determinism, anatomy (HU, RAS geometry), lesions, reports, files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volumed.data.datalist import load_datalist
from volumed.data.phantoms import LESION_ID_BASE, PHANTOM_LABELS, PhantomCase, make_case, make_cohort, write_cohort
from volumed.errors import ConfigError, OutputExistsError

L = PHANTOM_LABELS
PHANTOM_LABELS_BY_ID = {v: k for k, v in PHANTOM_LABELS.items()}
LUNGS = [v for k, v in L.items() if k.startswith("lung_")]
VERTEBRAE = [v for k, v in L.items() if k.startswith("vertebrae_")]


@pytest.fixture(scope="module")
def cohort() -> list[PhantomCase]:
    return make_cohort(4, 0)


@pytest.fixture(scope="module")
def lesion_cohort() -> list[PhantomCase]:
    # Seed 12 happens to hold all five lesion kinds, both liver lobes, contrast and non-contrast.
    return make_cohort(6, 12, lesion_rate=1.0)


def _median(case: PhantomCase, ids: int | list[int]) -> float:
    mask = np.isin(case.label.data, ids) & (case.lesion_map.data == 0)
    assert mask.sum() > 50, ids
    return float(np.median(case.image.data[mask]))


def _centroid(volume_data: np.ndarray, affine: np.ndarray, ids: int | list[int]) -> np.ndarray:
    idx = np.argwhere(np.isin(volume_data, ids))
    return nib.affines.apply_affine(affine, idx.mean(0))


def _skin_fat(case: PhantomCase, body_threshold: float) -> float:
    """Median of the two outermost body voxels on the left-right line through the body centre
    (subcutaneous fat, at least 7 mm thick), over the middle slices, from both sides."""
    im = case.image.data
    j = int(round(case.image.world_to_voxel([[0.0, 0.0, 0.0]])[0, 1]))
    values = []
    for k in range(20, 44):
        row = im[:, j, k]
        for line in (row, row[::-1]):
            first = int(np.argmax(line > body_threshold))
            values += [line[first], line[first + 1]]
    return float(np.median(values))


def test_label_ids_match_totalsegmentator_class_map(ts_dir: Path):
    total = json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())["total"]
    for name, value in PHANTOM_LABELS.items():
        assert total[str(value)] == name
    assert LESION_ID_BASE > max(int(k) for k in total)  # lesion ids never clash with an organ id


def test_same_seed_same_bytes_other_seed_differs(cohort):
    again = make_cohort(2, 0)  # a cohort's first cases do not depend on its size
    for a, b in zip(cohort, again):
        for va, vb in ((a.image, b.image), (a.label, b.label), (a.lesion_map, b.lesion_map)):
            assert va.data.dtype == vb.data.dtype and va.data.tobytes() == vb.data.tobytes()
            assert np.array_equal(va.affine, vb.affine)
        assert (a.report, a.lesions, a.terms, a.case_id) == (b.report, b.lesions, b.terms, b.case_id)
    alone = make_case(0, index=3)
    assert alone.image.data.tobytes() == cohort[3].image.data.tobytes() and alone.report == cohort[3].report
    other = make_case(1, index=0)
    assert not np.array_equal(other.label.data, cohort[0].label.data)
    assert not np.array_equal(other.image.data, cohort[0].image.data)
    assert len({c.image.data.tobytes() for c in cohort}) == 4  # cases in a cohort differ


def test_case_bytes_are_pinned():
    """The same case on every machine: a digest of case (0, 0) taken when the phantom was written.

    If you change the phantom on purpose, update the digest. If it changes without a phantom
    change, numpy's random streams or float arithmetic differ here, and cohorts are no longer
    reproducible across machines."""
    c = make_case(0, index=0)
    h = hashlib.sha256()
    for v in (c.image, c.label, c.lesion_map):
        h.update(v.data.tobytes())
    h.update(c.report.encode())
    assert h.hexdigest() == "820e12156b67382ae535cd863dcbf6256ff35612995c94a45ddd7fc4b61ef05e"


def test_volumes_share_one_ras_grid(cohort):
    c = cohort[0]
    assert c.image.shape == (96, 96, 64) and c.image.spacing == (3.0, 3.0, 3.0)
    assert c.image.orientation == "RAS" and "".join(nib.aff2axcodes(c.image.affine)) == "RAS"
    assert c.image.same_grid(c.label) and c.image.same_grid(c.lesion_map)
    assert c.image.modality == "CT"
    assert c.image.data.dtype == np.float32 and np.array_equal(c.image.data, np.rint(c.image.data))
    assert c.label.data.dtype == np.uint8 and c.lesion_map.data.dtype == np.uint8
    # World (0, 0, 0) is the grid centre.
    np.testing.assert_allclose(c.image.voxel_to_world([[47.5, 47.5, 31.5]]), [[0.0, 0.0, 0.0]])
    assert c.label_names == {v: PHANTOM_LABELS_BY_ID[v] for v in np.unique(c.label.data) if v}
    assert c.terms == tuple(c.label_names.values())
    for name in ("liver", "spleen", "kidney_right", "kidney_left", "aorta", "stomach", "heart", "lung_lower_lobe_right"):
        assert name in c.terms



@pytest.mark.parametrize(
    "contrast, expected",
    [
        (False, {"liver": 60, "spleen": 50, "kidney_right": 30, "aorta": 40}),
        (True, {"liver": 105, "spleen": 110, "kidney_right": 155, "aorta": 200}),
    ],
)
def test_organ_hu(contrast: bool, expected: dict[str, float]):
    c = make_case(3, contrast_rate=1.0 if contrast else 0.0, lesion_rate=0.0)
    assert c.contrast is contrast and c.report.startswith("Contrast-enhanced CT" if contrast else "Non-contrast CT")
    for name, hu in expected.items():
        assert abs(_median(c, L[name]) - hu) <= 15 + (10 if contrast else 0), name
    assert _median(c, LUNGS) < -780
    assert 350 <= _median(c, VERTEBRAE) <= 800
    im, lab = c.image.data, c.label.data
    air = im[:4, :4, :]  # corners of the field of view lie outside the body
    assert abs(np.median(air) + 1000) <= 10
    assert abs(_skin_fat(c, -500) + 100) <= 25
    # Noise: Gaussian, 10-18 HU per case, visible as spread inside the liver.
    assert 8 <= np.std(im[(lab == L["liver"]) & (c.lesion_map.data == 0)]) <= 22


def test_anatomy_is_placed_correctly_in_ras(cohort):
    for c in cohort:
        lab, aff = c.label.data, c.label.affine
        liver, spleen = _centroid(lab, aff, L["liver"]), _centroid(lab, aff, L["spleen"])
        k_r, k_l = _centroid(lab, aff, L["kidney_right"]), _centroid(lab, aff, L["kidney_left"])
        lungs, aorta = _centroid(lab, aff, LUNGS), _centroid(lab, aff, L["aorta"])
        spine = _centroid(lab, aff, VERTEBRAE)
        # RAS+: +x is the patient's right, where the liver and the right kidney lie.
        assert liver[0] > 20 > -20 > spleen[0]
        assert k_r[0] > 0 > k_l[0]
        right_lung = _centroid(lab, aff, [L["lung_lower_lobe_right"], L["lung_upper_lobe_right"], L["lung_middle_lobe_right"]])
        left_lung = _centroid(lab, aff, [L["lung_lower_lobe_left"], L["lung_upper_lobe_left"]])
        assert right_lung[0] > 0 > left_lung[0]
        assert lungs[2] > liver[2] + 30  # lungs superior to the liver
        assert _centroid(lab, aff, L["heart"])[2] > liver[2]
        assert aorta[1] < liver[1] and spine[1] < aorta[1]  # aorta posterior to the liver, spine behind it
        assert abs(spine[0]) < 3  # the spine is on the mid-sagittal plane
        # Vertebral levels run T (superior) to L (inferior).
        z = {n: _centroid(lab, aff, L[n])[2] for n in ("vertebrae_T11", "vertebrae_T12", "vertebrae_L1")}
        assert z["vertebrae_T11"] > z["vertebrae_T12"] > z["vertebrae_L1"]


def test_anatomy_matches_real_totalsegmentator_example(ts_dir: Path, cohort):
    """The same left/right, front/back, up/down relations hold in TotalSegmentator's own output."""
    img = nib.load(ts_dir / "example_seg.nii.gz")
    real = np.asarray(img.dataobj)

    def relations(lab: np.ndarray, aff: np.ndarray) -> tuple[bool, ...]:
        liver, spleen = _centroid(lab, aff, L["liver"]), _centroid(lab, aff, L["spleen"])
        k_r, k_l = _centroid(lab, aff, L["kidney_right"]), _centroid(lab, aff, L["kidney_left"])
        aorta, lung = _centroid(lab, aff, L["aorta"]), _centroid(lab, aff, L["lung_lower_lobe_right"])
        return (liver[0] > spleen[0], k_r[0] > k_l[0], aorta[1] < liver[1], lung[2] > liver[2], aorta[0] < liver[0])

    assert relations(real, img.affine) == (True,) * 5
    assert relations(cohort[0].label.data, cohort[0].label.affine) == (True,) * 5


def test_lesions_have_their_stated_size_and_place(lesion_cohort):
    kinds, locations = set(), set()
    for c in lesion_cohort:
        assert 1 <= len(c.lesions) <= 3
        assert [les.id for les in c.lesions] == [LESION_ID_BASE + k for k in range(1, len(c.lesions) + 1)]
        assert set(np.unique(c.lesion_map.data)) == {0, *(les.id for les in c.lesions)}
        for les in c.lesions:
            kinds.add(les.kind)
            locations.add(les.location)
            mask = c.lesion_map.data == les.id
            idx = np.argwhere(mask)
            extent = (idx.max(0) - idx.min(0) + 1) * np.asarray(c.image.spacing)
            assert les.extent_mm == tuple(extent) and les.diameter_mm == extent.max()
            # The drawn ellipsoid and its voxelisation differ by about a voxel at most.
            assert abs(les.diameter_mm - max(les.axes_mm)) <= 1.5 * 3.0
            assert 6.0 <= les.diameter_mm <= 33.0
            assert les.voxel_count == mask.sum() and les.volume_ml == pytest.approx(mask.sum() * 27 / 1000)
            assert mask[les.center_voxel]
            np.testing.assert_allclose(c.image.world_to_voxel([les.center_ras])[0], les.center_voxel, atol=0.5 + 1e-9)
            # Inside its organ: the organ label is kept under the lesion.
            assert np.all(c.label.data[mask] == PHANTOM_LABELS[les.organ])
            # Rendered with its intensity (noise sd <= 18 HU).
            if les.voxel_count >= 15:
                assert abs(np.median(c.image.data[mask]) - les.hu) <= 15
            # The location phrase agrees with the geometry.
            x, _, z = les.center_ras
            if les.organ == "liver":
                assert les.location == ("right liver lobe" if x > 0 else "left liver lobe")
                assert les.hu < _median(c, L["liver"]) - 25  # hypodense
            elif les.organ.startswith("kidney_"):
                side = les.organ.split("_")[1]
                assert les.location.endswith(f"of the {side} kidney")
                kz = _centroid(c.label.data, c.label.affine, L[les.organ])[2]
                if les.location.startswith("upper pole"):
                    assert z > kz
                elif les.location.startswith("lower pole"):
                    assert z < kz
            elif les.organ.startswith("lung_"):
                _, lobe, _, side = les.organ.split("_")
                assert les.location == f"{side} {lobe} lobe"
                assert les.hu > _median(c, LUNGS) + 500
            else:
                assert les.organ == les.location == "spleen"
    assert kinds == {"liver_hypodense_lesion", "kidney_cyst", "kidney_hyperdense_lesion", "lung_nodule", "spleen_hypodense_lesion"}
    assert {"right liver lobe", "left liver lobe"} <= locations


def test_report_names_each_lesion_size_and_location(lesion_cohort, cohort):
    for c in lesion_cohort:
        for les in c.lesions:
            size = int(np.floor(les.diameter_mm + 0.5))
            m = re.search(rf"\b(An?) {size} mm [a-z ]+ in the {re.escape(les.location)}\.", c.report)
            assert m, (les, c.report)
            assert m.group(1) == ("An" if size in (8, 11, 18) else "A")
        sizes = [int(s) for s in re.findall(r"(\d+) mm", c.report)]
        assert sorted(sizes) == sorted(int(np.floor(les.diameter_mm + 0.5)) for les in c.lesions)
        assert "No pleural effusion." in c.report and "The spleen is normal in size." in c.report
    healthy = make_case(0, lesion_rate=0.0)
    assert healthy.lesions == () and not healthy.lesion_map.data.any()
    assert " mm " not in healthy.report
    for sentence in ("No pulmonary nodules.", "The liver is normal in size without focal lesions.", "Both kidneys are unremarkable."):
        assert sentence in healthy.report


def test_mr_phantom_has_t1_like_contrast():
    c = make_case(2, modality="mr", lesion_rate=0.0, contrast_rate=0.0)
    assert c.image.modality == "MR" and c.image.data.min() >= 0
    assert c.report.startswith("T1-weighted MR")
    fat = _skin_fat(c, 200)
    assert fat > _median(c, L["liver"]) + 200 > _median(c, L["autochthon_left"]) + 200 > _median(c, LUNGS) + 400


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (96, 96)}, "shape must be 3 sizes"),
        ({"spacing": (3.0, 0.0, 3.0)}, "spacing must be 3 positive sizes"),
        ({"lesion_rate": 1.5}, "lesion_rate must be a probability"),
        ({"modality": "PET"}, "modality must be 'CT' or 'MR'"),
        ({"max_lesions": 4}, "max_lesions must be 0 to 3"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_cohort(1, 0, **kwargs)


def test_bad_cohort_size():
    with pytest.raises(ConfigError, match="n must be at least 1"):
        make_cohort(0, 0)


def test_write_cohort_files_load_back(tmp_path: Path, cohort):
    cases = cohort[:2]
    path = write_cohort(cases, tmp_path / "cohort")
    assert path == tmp_path / "cohort" / "datalist.csv"
    entries = load_datalist(path, require=("image", "label", "report"))
    assert len(entries) == 2
    doc = json.loads((tmp_path / "cohort" / "lesions.json").read_text())
    assert doc["lesion_id_base"] == LESION_ID_BASE
    for case, entry, record in zip(cases, entries, doc["cases"]):
        assert (entry.report, entry.terms, entry.modality) == (case.report, case.terms, "CT")
        assert entry.extra["case_id"] == case.case_id == record["case_id"]
        img = nib.load(entry.image)
        assert img.get_data_dtype() == np.int16
        assert np.array_equal(np.asarray(img.dataobj), case.image.data)
        np.testing.assert_allclose(img.affine, case.image.affine)
        assert np.array_equal(np.asarray(nib.load(entry.label).dataobj), case.label.data)
        lesion_map = nib.load(path.parent / entry.extra["lesion_map"])
        assert np.array_equal(np.asarray(lesion_map.dataobj), case.lesion_map.data)
        assert [r["diameter_mm"] for r in record["lesions"]] == [les.diameter_mm for les in case.lesions]
        assert [r["location"] for r in record["lesions"]] == [les.location for les in case.lesions]
    assert {int(k): v for k, v in doc["label_names"].items()} == {**cases[0].label_names, **cases[1].label_names}

    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        write_cohort(cases, tmp_path / "cohort")
    assert path.read_bytes() == before
    # Overwriting with the same cases gives the same bytes (deterministic gzip headers too).
    image_bytes = entries[0].image.read_bytes()
    write_cohort(cases, tmp_path / "cohort", overwrite=True)
    assert path.read_bytes() == before and entries[0].image.read_bytes() == image_bytes
    assert not [p for p in (tmp_path / "cohort").rglob("*") if p.name.startswith(".tmp")]
    with pytest.raises(ConfigError, match="case ids repeat"):
        write_cohort([cases[0], cases[0]], tmp_path / "other")
