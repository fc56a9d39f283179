"""Per-structure statistics (volumed.inference.stats): volume, intensity, boxes, components."""

from __future__ import annotations

import numpy as np
import pytest

from volumed.errors import ConfigError
from volumed.inference.stats import compute_statistics
from volumed.io.volume import Volume

# Spacing 2 x 3 x 4 mm (24 mm^3 per voxel), the i axis flipped (L instead of R), shifted origin.
AFFINE = np.array([[-2.0, 0, 0, 10.0], [0, 3.0, 0, -20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])


def _image(modality: str = "CT") -> Volume:
    data = np.arange(10 * 8 * 6, dtype=np.float32).reshape(10, 8, 6) - 100.0
    return Volume(data, AFFINE, modality)


def test_volume_intensity_box_and_components():
    image = _image()
    mask = np.zeros(image.shape, bool)
    mask[1:3, 2:4, 1:2] = True  # 4 voxels
    mask[3, 4, 2] = True  # touches the block only by a corner: same 26-connected component
    mask[8, 7, 5] = True  # isolated voxel
    s = compute_statistics(mask, image, "liver")
    assert s.name == "liver" and s.voxels == 6
    assert s.volume_ml == pytest.approx(6 * 24 / 1000)
    values = image.data[mask].astype(np.float64)
    assert s.intensity.unit == "HU"
    assert (s.intensity.mean, s.intensity.min, s.intensity.max) == pytest.approx(
        (values.mean(), values.min(), values.max())
    )
    assert s.intensity.std == pytest.approx(values.std())
    assert s.bbox_voxels == ((1, 2, 1), (8, 7, 5))
    # i runs towards the left (x decreases): voxel 8's outer edge is at 10 - 2 * 8.5 = -7 mm.
    assert s.bbox_mm == (
        pytest.approx((10 - 2 * 8.5, -20 + 3 * 1.5, 30 + 4 * 0.5)),
        pytest.approx((10 - 2 * 0.5, -20 + 3 * 7.5, 30 + 4 * 5.5)),
    )
    assert s.components == 2
    d = s.to_dict()
    assert d["intensity"]["unit"] == "HU" and d["bbox_voxels"] == ((1, 2, 1), (8, 7, 5))


def test_face_separated_blocks_are_separate_components_and_mr_has_no_hu():
    image = _image("MR")
    mask = np.zeros(image.shape, bool)
    mask[0:2, 0:2, 0:2] = True
    mask[4:6, 0:2, 0:2] = True  # a one-voxel gap along i
    s = compute_statistics(mask.astype(np.uint8), image, "kidney")
    assert s.components == 2 and s.voxels == 16
    assert s.intensity.unit == "intensity"


def test_empty_mask_has_zero_volume_and_no_values():
    s = compute_statistics(np.zeros((10, 8, 6), bool), _image(), "spleen")
    assert (s.voxels, s.volume_ml, s.components) == (0, 0.0, 0)
    assert s.intensity.mean is None and s.intensity.max is None
    assert s.bbox_voxels is None and s.bbox_mm is None


def test_mask_off_grid_is_an_error():
    with pytest.raises(ConfigError, match=r"mask shape \(10, 8, 5\) is not the image grid \(10, 8, 6\)"):
        compute_statistics(np.zeros((10, 8, 5), bool), _image(), "liver")


def test_mask_evidence_of_present_and_absent_masks():
    from volumed.inference.stats import MaskEvidence, mask_evidence

    present = mask_evidence(4, 0.6 + 0.7 + 0.8 + 0.9, 0.9, None, 0.5)
    assert present == MaskEvidence(True, pytest.approx(0.75), 0.9, None)
    assert present.to_dict() == {"present": True, "confidence": pytest.approx(0.75), "max_probability": 0.9,
                                 "max_probability_bound": None, "rejected": None}
    # Absent: the bound, capped at the threshold (an empty mask is at most the threshold everywhere).
    assert mask_evidence(0, 0.0, None, 0.12, 0.5) == MaskEvidence(False, None, None, 0.12)
    assert mask_evidence(0, 0.0, 0.3, 0.97, 0.5) == MaskEvidence(False, None, None, 0.5)
    assert mask_evidence(0, 0.0, None, None, 0.5).max_probability_bound == 0.5
    with pytest.raises(ValueError, match="mean probability"):
        mask_evidence(2, 0.8, 0.45, None, 0.5)  # a mask voxel at or below the threshold
    with pytest.raises(ValueError, match="above its bound"):
        mask_evidence(0, 0.0, 0.3, 0.2, 0.5)


def test_presence_rule_rejects_only_masks_both_small_and_unsure():
    from volumed.inference.stats import presence_rejects, rejected_evidence

    rule = {"min_ml": 10.0, "min_confidence": 0.8}
    assert presence_rejects(rule, 6.0, 0.77)  # the DICOM slab's false heart
    assert not presence_rejects(rule, 6.0, 0.85)  # small but sure
    assert not presence_rejects(rule, 40.0, 0.60)  # unsure but large
    assert not presence_rejects({}, 0.1, 0.51) and not presence_rejects(None, 0.1, 0.51)
    ev = rejected_evidence(rule, voxels=100, probability_sum=70.0, peak=0.95, voxel_ml=0.06)
    assert (ev.present, ev.confidence, ev.max_probability, ev.max_probability_bound) == (False, None, None, 0.95)
    assert ev.rejected == {"rule": "presence", "volume_ml": 6.0, "confidence": pytest.approx(0.7), "max_probability": 0.95,
                           "min_ml": 10.0, "min_confidence": 0.8}


def test_hu_check_flags_a_mask_on_the_wrong_tissue():
    from volumed.inference.stats import HU_MARGIN, hu_check

    # The default model's "trachea" on tcia_ccth_a01's femurs (527 HU) and "sacrum" in its lung.
    assert hu_check("trachea", 527.0, "HU") == {"tissue": "airway", "expected_hu": [-1000.0 - HU_MARGIN, -880.0 + HU_MARGIN],
                                                 "plausible": False}
    assert hu_check("sacrum", -682.0, "HU")["plausible"] is False
    assert hu_check("liver", 53.0, "HU")["plausible"] is True
    assert hu_check("aorta", 553.0, "HU")["plausible"] is True  # an arterial phase is allowed
    # A known phase narrows an enhancing tissue's range: a 333 HU "kidney" fits an arterial scan,
    # not one without contrast (bone on tcia_ccth_a01); a bone's range is the same in every phase.
    assert hu_check("kidney_left", 333.0, "HU")["plausible"] is True
    assert hu_check("kidney_left", 333.0, "HU", phase="native") == {
        "tissue": "kidney", "expected_hu": [10.0 - HU_MARGIN, 45.0 + HU_MARGIN], "plausible": False}
    assert hu_check("femur_left", 450.0, "HU", phase="native") == hu_check("femur_left", 450.0, "HU")
    assert hu_check("lung_upper_lobe_left", -624.0, "HU")["tissue"] == "lung"
    # No prior: not CT, no mean, or a structure no rule knows.
    assert hu_check("liver", 53.0, "intensity") is None and hu_check("liver", None, "HU") is None
    assert hu_check("a mass", 10.0, "HU") is None


def test_component_count_is_scipys_26_connected_count_on_random_masks():
    """cc3d's count (what statistics.json reports) equals scipy.ndimage.label's with the full
    3x3x3 structure, on sparse random masks with many corner- and edge-touching fragments."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    image = Volume(np.zeros((30, 25, 20), np.float32), np.eye(4), modality="CT")
    for density in (0.05, 0.15, 0.3):
        mask = rng.random(image.shape) < density
        expected = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1]
        assert compute_statistics(mask, image, "x").components == expected > 1


def test_rejection_text_never_calls_a_found_region_zero_ml():
    from volumed.inference.stats import ml_text, rejection_text

    assert [ml_text(v) for v in (12.34, 1.0, 0.456, 0.04, 0.0034, 0.0)] == ["12.3", "1.0", "0.46", "0.04", "0.003", "0.00"]
    r = {"volume_ml": 0.0034, "confidence": 0.61, "min_ml": 2.0, "min_confidence": 0.7}
    assert rejection_text(r) == ("a 0.003 mL region at mean probability 0.61, under the presence rule "
                                 "(2 mL and mean probability 0.70)")
    anatomy = {"volume_ml": 54.2, "confidence": 0.8, "rule": "anatomy", "conflicts_with": ["liver", "lung_upper_lobe_left"]}
    assert rejection_text(anatomy).startswith("a 54.2 mL region at mean probability 0.80 on the same axial slices as liver, ")


def test_anatomy_evidence_says_when_the_conflict_is_an_order():
    """A structure dropped for lying wholly on the wrong side of an ordered one (a "sacrum" above
    the liver) carries how far it was reversed; one dropped for a shared slice does not."""
    from volumed.data.craniocaudal import Extent
    from volumed.inference.stats import anatomy_evidence

    why = {"conflicts_with": ["liver"], "atlas_min_gap_mm": {"liver": 30.0}, "violation_mm": {"liver": 137.0},
           "order_reversed_mm": {"liver": 27.0}}
    ev = anatomy_evidence(why, 100, 84.0, 0.99, 0.324, Extent(640.0, 712.0))
    assert not ev.present and ev.rejected["rule"] == "anatomy"
    assert ev.rejected["order_reversed_mm"] == {"liver": 27.0} and ev.rejected["extent_mm"] == [640.0, 712.0]
    assert ev.rejected["volume_ml"] == 32.4 and ev.rejected["confidence"] == 0.84
    del why["order_reversed_mm"]
    assert "order_reversed_mm" not in anatomy_evidence(why, 100, 84.0, 0.99, 0.324, Extent(640.0, 712.0)).rejected


def test_the_rejection_text_tells_a_shared_slice_from_a_wrong_order():
    from volumed.inference.stats import rejection_text

    r = {"rule": "anatomy", "volume_ml": 32.4, "confidence": 0.84, "conflicts_with": ["heart", "liver"],
         "violation_mm": {"heart": 106.5, "liver": 136.5}, "atlas_min_gap_mm": {"heart": 184.5, "liver": 30.0},
         "order_reversed_mm": {"liver": 27.0}}
    text = rejection_text(r)
    assert "on the same axial slices as heart, which it never shares a slice with" in text
    assert "wholly on the wrong side (head to foot) of liver" in text and "as heart, liver" not in text
    del r["order_reversed_mm"]
    assert "on the same axial slices as heart, liver, which it never shares" in rejection_text(r)
