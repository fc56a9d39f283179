"""The craniocaudal atlas and the anatomy check (volumed.data.craniocaudal): extents in world
millimetres on grids of either orientation, cut ends, exclusive pairs, and which structures a
conflict drops."""

from __future__ import annotations

import numpy as np
import pytest

from volumed.data.craniocaudal import (
    TRIM,
    Extent,
    Found,
    exclusive_pairs,
    implausible_terms,
    load_atlas,
    load_order,
    ordered_pairs,
    s_extent,
)


def _affine(sz: float, z0: float = 0.0) -> np.ndarray:
    a = np.diag([1.0, 1.0, sz, 1.0])
    a[2, 3] = z0
    return a


def test_s_extent_in_world_mm_and_cut_ends_for_both_slice_orders():
    mask = np.zeros((4, 4, 10), bool)
    mask[1:3, 1:3, 3:6] = True  # slices 3..5
    e = s_extent(mask, _affine(2.0, 100.0))
    assert (e.low, e.high) == (105.0, 111.0)  # centres 106..110, half a 2 mm slice each side
    assert not e.cut_low and not e.cut_high
    # Slices running head to foot (S decreasing with the index): same world extent math.
    e = s_extent(mask, _affine(-2.0, 100.0))
    assert (e.low, e.high) == (89.0, 95.0)
    # Touching the last slice: cut at the top when S grows with the index, at the bottom otherwise.
    mask[:, :, 9] = True
    assert s_extent(mask, _affine(2.0)).cut_high and not s_extent(mask, _affine(2.0)).cut_low
    assert s_extent(mask, _affine(-2.0)).cut_low and not s_extent(mask, _affine(-2.0)).cut_high
    # A box at an offset in a larger grid: the offset counts, and the grid's edges decide "cut".
    box = np.ones((2, 2, 3), bool)
    e = s_extent(box, _affine(1.0), start=(0, 0, 5), shape=(4, 4, 20))
    assert (e.low, e.high, e.cut_low, e.cut_high) == (4.5, 7.5, False, False)
    assert s_extent(np.zeros((3, 3, 3), bool), _affine(1.0)) is None


def test_trimmed_extent_ignores_a_few_stray_voxels_far_away():
    mask = np.zeros((20, 20, 100), bool)
    mask[:, :, 10:30] = True  # 8000 voxels
    mask[0, 0, 90] = True  # one stray voxel 60 slices above
    assert s_extent(mask, _affine(1.0)).high == 90.5
    core = s_extent(mask, _affine(1.0), trim=TRIM)
    assert (core.low, core.high) == (9.5, 29.5)  # the stray voxel is not counted


def _subject(**extents) -> dict[str, Extent]:
    return {t: Extent(*v) for t, v in extents.items()}


def test_exclusive_pairs_need_every_subject_and_skip_cut_ends():
    subjects = {
        "a": _subject(liver=(300, 480), femur_left=(-60, 120), kidney_left=(250, 380)),
        "b": _subject(liver=(320, 470), femur_left=(-40, 110), kidney_left=(260, 360)),
    }
    pairs = exclusive_pairs(subjects)
    assert pairs[("liver", "femur_left")] == {"min_gap_mm": 180.0, "subjects": 2}
    assert ("liver", "kidney_left") not in pairs and ("kidney_left", "liver") not in pairs  # they overlap
    assert ("kidney_left", "femur_left") in pairs  # 130 and 150 mm
    # A subject whose femur top is cut by its field of view does not measure the gap: one subject
    # left, so the pair needs the larger single-subject gap (100 mm; 180 passes).
    subjects["b"] = _subject(liver=(320, 470), femur_left=(-40, 110, False, True))
    assert exclusive_pairs(subjects)[("liver", "femur_left")]["subjects"] == 1
    # A small gap seen in one subject only is not enough.
    one = {"a": _subject(stomach=(380, 460), lung_upper_lobe_right=(545, 600))}
    assert exclusive_pairs(one) == {}
    # Seen in both orders: no rule, whatever the gaps.
    both = {"a": _subject(x=(0, 10), y=(200, 210)), "b": _subject(x=(400, 410), y=(200, 210)),
            "c": _subject(x=(0, 10), y=(200, 210))}
    assert exclusive_pairs(both) == {}


PAIRS = {("liver", "femur_left"): {"min_gap_mm": 150.0, "subjects": 2},
         ("spleen", "femur_left"): {"min_gap_mm": 200.0, "subjects": 2},
         ("spleen", "hip_left"): {"min_gap_mm": 80.0, "subjects": 2},
         ("lung_upper_lobe_left", "hip_left"): {"min_gap_mm": 150.0, "subjects": 2}}


def test_a_small_femur_on_the_slices_of_the_liver_is_dropped():
    found = {"liver": Found(Extent(90, 180), 1000.0), "spleen": Found(Extent(90, 180), 240.0),
             "femur_left": Found(Extent(95, 140), 40.0)}
    dropped = implausible_terms(found, PAIRS)
    assert list(dropped) == ["femur_left"]
    assert dropped["femur_left"]["conflicts_with"] == ["liver", "spleen"]
    assert dropped["femur_left"]["atlas_min_gap_mm"] == {"liver": 150.0, "spleen": 200.0}
    assert dropped["femur_left"]["violation_mm"] == {"liver": 50.0, "spleen": 50.0}
    # In a pelvis scan (the femur well below the liver) nothing conflicts.
    found["femur_left"] = Found(Extent(-60, 110), 150.0)
    found["liver"] = Found(Extent(320, 480), 1500.0)
    found["spleen"] = Found(Extent(340, 450), 240.0)
    assert implausible_terms(found, PAIRS) == {}
    # A lone structure, or terms the atlas does not know, never conflict.
    assert implausible_terms({"femur_left": Found(Extent(90, 180), 1.0)}, PAIRS) == {}
    assert implausible_terms({"a": Found(Extent(0, 1), 1.0), "b": Found(Extent(0, 1), 1.0)}, PAIRS) == {}


def test_the_heaviest_consistent_set_is_kept_not_the_first_conflict():
    # A small real lobe conflicts only with a wrong hip; the hip also conflicts with the spleen.
    # Dropping the hip (one structure) keeps the lobe: total weight 240 + 6 beats 90.
    found = {"spleen": Found(Extent(90, 180), 240.0), "hip_left": Found(Extent(90, 165), 90.0),
             "lung_upper_lobe_left": Found(Extent(150, 180), 6.0)}
    assert list(implausible_terms(found, PAIRS)) == ["hip_left"]


def test_the_shipped_atlas_knows_the_far_apart_pairs_and_not_the_neighbours():
    pairs = load_atlas()
    assert pairs[("liver", "femur_left")]["min_gap_mm"] > 100
    assert ("heart", "femur_right") in pairs
    for a, b in (("liver", "kidney_right"), ("liver", "heart"), ("spleen", "kidney_left"), ("hip_left", "femur_left")):
        assert (a, b) not in pairs and (b, a) not in pairs, (a, b)


def test_ordered_pairs_need_the_same_order_in_every_whole_subject():
    """A pair is ordered when its centres lie at least 50 mm apart the same way round in every
    subject that shows both whole (two or more); exclusive pairs are left to the gap rule."""
    subjects = {
        "a": {"liver": Extent(300, 480), "sacrum": Extent(100, 330), "heart": Extent(450, 560),
              "kidney_left": Extent(280, 400), "kidney_right": Extent(270, 390)},
        "b": {"liver": Extent(320, 470), "sacrum": Extent(120, 340), "heart": Extent(460, 580),
              "kidney_left": Extent(300, 420), "kidney_right": Extent(310, 430)},
        "c": {"liver": Extent(0, 60, cut_low=True), "sacrum": Extent(200, 300)},  # liver cut: not counted
    }
    order = ordered_pairs(subjects)
    assert order[("liver", "sacrum")] == {"min_centre_gap_mm": 165.0, "min_gap_mm": -30.0, "subjects": 2}
    assert ("heart", "liver") in order and ("heart", "sacrum") not in order  # the latter is exclusive
    assert ("heart", "sacrum") in exclusive_pairs(subjects)
    # Kidneys: centres 10 mm apart, the order flips between subjects: no rule either way.
    assert not {("kidney_left", "kidney_right"), ("kidney_right", "kidney_left")} & set(order)
    # One whole subject is not enough.
    assert ordered_pairs({"a": subjects["a"]}) == {}


def test_a_structure_wholly_on_the_wrong_side_of_an_ordered_one_is_dropped():
    """A "sacrum" above the liver (a leave-one-out model on the thorax crop called the left
    ventricle's wall so) conflicts with it although the two may share slices in a body; a heart
    whose bottom overlaps the liver's dome, as it does in a body, does not."""
    order = {("liver", "sacrum"): {"min_centre_gap_mm": 92.3, "min_gap_mm": 30.0, "subjects": 3},
             ("heart", "liver"): {"min_centre_gap_mm": 79.5, "min_gap_mm": -28.5, "subjects": 2}}
    found = {"liver": Found(Extent(575, 613), 92.0), "sacrum": Found(Extent(640, 712), 27.0),
             "heart": Found(Extent(590, 650), 14.0)}
    dropped = implausible_terms(found, {}, order)
    assert list(dropped) == ["sacrum"]
    assert dropped["sacrum"]["conflicts_with"] == ["liver"]
    assert dropped["sacrum"]["order_reversed_mm"] == {"liver": 27.0}
    assert dropped["sacrum"]["atlas_min_gap_mm"] == {"liver": 30.0}
    # In the right order, overlapping or not, nothing conflicts.
    found["sacrum"] = Found(Extent(450, 600), 27.0)
    assert implausible_terms(found, {}, order) == {}
    # Reversed by no more than the 10 mm tolerance: kept.
    found["sacrum"] = Found(Extent(620, 700), 27.0)
    assert implausible_terms(found, {}, order) == {}


def test_the_shipped_atlas_orders_the_trunk():
    order = load_order()
    for pair in (("liver", "sacrum"), ("heart", "liver"), ("heart", "kidney_right"),
                 ("lung_upper_lobe_right", "lung_lower_lobe_right"), ("lung_lower_lobe_left", "liver")):
        assert pair in order, pair
    for a, b in (("kidney_left", "kidney_right"), ("liver", "spleen"), ("lung_lower_lobe_left", "lung_lower_lobe_right")):
        assert (a, b) not in order and (b, a) not in order, (a, b)
    assert not set(order) & set(load_atlas())


@pytest.mark.parametrize("sz", [2.5, -2.5])
def test_trimmed_extent_matches_the_exact_extent_of_a_compact_mask(sz):
    mask = np.zeros((5, 5, 40), bool)
    mask[1:4, 1:4, 5:35] = True
    exact, core = s_extent(mask, _affine(sz, 7.0)), s_extent(mask, _affine(sz, 7.0), trim=TRIM)
    assert abs(core.low - exact.low) <= abs(sz) and abs(core.high - exact.high) <= abs(sz)
