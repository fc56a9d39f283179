"""The lung-lobe partition (volumed.inference.lungs) on a drawn chest: two lungs of air with a
vessel inside each, bowel gas below them, the air outside the body, and lobe probabilities that
miss part of each lung and spill onto the liver. Without the atlas the model's lobes are filled
to the air; with it (the default) a lung that is whole but for its top is split by the atlas."""

import numpy as np
import pytest
import torch

from volumed.inference.lungs import LOBES, outline_lobes

SHAPE = (40, 30, 40)  # x (world x: the patient's left to right), y, z (superior-inferior: the long axis)
AFFINE = np.eye(4)


def _chest():
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)  # outside the body
    body = np.zeros(SHAPE, dtype=bool)
    body[2:38, 2:28, :] = True
    hu[body] = 40.0  # soft tissue
    right = np.zeros(SHAPE, dtype=bool)
    right[23:35, 6:24, 20:38] = True  # x > 20: the patient's right (RAS)
    left = np.zeros(SHAPE, dtype=bool)
    left[5:17, 6:24, 20:38] = True
    hu[right | left] = -850.0
    hu[28:30, 14:16, 22:36] = 40.0  # a vessel inside the right lung (not air)
    gas = np.zeros(SHAPE, dtype=bool)
    gas[24:30, 10:16, 4:8] = True  # bowel gas below the diaphragm
    hu[gas] = -950.0
    return hu, body, right, left, gas


def _probabilities(right, left):
    p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    index = {n: i for i, n in enumerate(LOBES)}
    upper, lower = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
    upper[..., 30:], lower[..., :30] = True, True
    # The model's lobes: each only part of its lobe (the outer rim missed), one spilling 3 slices
    # below the lung (onto the liver), and the right middle lobe as a band.
    core = np.zeros(SHAPE, bool)
    core[7:15, 8:22, :] = True
    core[25:33, 8:22, :] = True
    p[index["lung_upper_lobe_right"]][right & upper & core] = 0.9
    p[index["lung_middle_lobe_right"]][right & core & (np.arange(40) >= 27)[None, None] & (np.arange(40) < 30)[None, None]] = 0.8
    p[index["lung_lower_lobe_right"]][right & lower & core & (np.arange(40) < 27)[None, None]] = 0.85
    p[index["lung_upper_lobe_left"]][left & upper & core] = 0.9
    spill = np.zeros(SHAPE, bool)
    spill[7:15, 8:22, 17:30] = True  # the left lower lobe, 3 slices onto the tissue below the lung
    p[index["lung_lower_lobe_left"]][spill] = 0.7
    return p


def test_the_lobes_fill_the_lungs_air_and_leave_the_rest():
    hu, body, right, left, gas = _chest()
    p = _probabilities(right, left)
    lungs = right | left
    lungs_filled = lungs.copy()
    lungs_filled[28:30, 14:16, 22:36] = True  # the vessel is inside the lung
    result = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5, atlas=None)
    assert result.atlas_sides == ()
    q = result.probabilities.numpy()
    masks = q > 0.5
    union = masks.any(axis=0)
    assert result.components == 2  # the two lungs; the bowel gas and the outside air are not lung
    assert (union == lungs_filled).all()  # every lung voxel, the vessel too, and nothing else
    assert not union[gas].any() and not union[~body].any()
    index = {n: i for i, n in enumerate(LOBES)}
    # A lobe stays on its side, and the spill below the left lung is gone.
    for name in ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"):
        assert not masks[index[name]][left].any()
    assert not masks[index["lung_lower_lobe_left"]][..., :20].any()
    # The rim the model missed goes to the lobe nearest to it: the top slices to the upper lobes.
    assert masks[index["lung_upper_lobe_left"]][5:17, 6:24, 37].all()
    assert masks[index["lung_lower_lobe_right"]][23:35, 6:24, 20].all()
    # A lobe keeps its own probability where it was above the threshold; added voxels sit just
    # above the threshold (their confidence is the model's doubt), and dropped ones at most at it.
    keep = (p[index["lung_upper_lobe_left"]] > 0.5) & masks[index["lung_upper_lobe_left"]]
    assert np.allclose(q[index["lung_upper_lobe_left"]][keep], 0.9)
    added = masks[index["lung_upper_lobe_left"]] & ~(p[index["lung_upper_lobe_left"]] > 0.5)
    assert added.any() and np.allclose(q[index["lung_upper_lobe_left"]][added], 0.501)
    assert q[index["lung_lower_lobe_left"]][..., :20].max() <= 0.5


def test_nothing_called_lung_gives_no_lobe():
    hu, body, right, left, _ = _chest()
    p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    result = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5)
    assert result.components == 0 and result.lung_voxels == 0
    assert (result.probabilities.numpy() <= 0.5).all()


def test_partition_refuses_other_terms_and_mismatched_shapes():
    hu, body, *_ = _chest()
    with pytest.raises(ValueError, match="five lobes"):
        outline_lobes(np.zeros((5, *SHAPE), np.float32), [*LOBES[:4], "liver"], hu, body, AFFINE, 0.5)
    with pytest.raises(ValueError, match="shapes disagree"):
        outline_lobes(torch.zeros((5, 4, 4, 4)), LOBES, hu, body, AFFINE, 0.5)


def test_the_atlas_splits_each_whole_lung_into_its_own_lobes():
    hu, body, right, left, _ = _chest()
    p = _probabilities(right, left)
    result = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5)
    assert result.atlas_sides == ("left", "right")
    masks = result.probabilities.numpy() > 0.5
    index = {n: i for i, n in enumerate(LOBES)}
    lungs = right | left
    lungs[28:30, 14:16, 22:36] = True
    # A partition: every lung voxel in exactly one lobe, and that lobe of its own side.
    assert (masks.sum(axis=0)[lungs] == 1).all() and not masks.any(axis=0)[~lungs].any()
    left_lobes = masks[index["lung_upper_lobe_left"]] | masks[index["lung_lower_lobe_left"]]
    assert (left_lobes[left]).all() and not left_lobes[right].any()
    # The layout of a lung (y: anterior, z: superior): the apex's front is upper lobe, the base's
    # back is lower lobe, on both sides (a box is not a lung: most of it, not all); the right
    # middle lobe is anterior.
    assert masks[index["lung_upper_lobe_left"]][5:17, 18:24, 36:38].mean() > 0.9
    assert masks[index["lung_lower_lobe_left"]][5:17, 6:10, 20:23].mean() > 0.9
    assert masks[index["lung_lower_lobe_right"]][23:35, 6:10, 20:23].mean() > 0.9
    middle = masks[index["lung_middle_lobe_right"]]
    assert middle.any() and np.argwhere(middle)[:, 1].mean() > np.argwhere(right)[:, 1].mean()
    # A lobe's voxels the model did not call: where the model saw no lung of that side, just
    # above the threshold; where it called another lobe of the side, the model's lung
    # probability times the atlas's share (at most that probability, and above the threshold
    # where the atlas is sure).
    q = result.probabilities.numpy()
    k = index["lung_lower_lobe_right"]
    right_lobes = [index[n] for n in ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")]
    lung_p = p[right_lobes].max(axis=0)
    unseen = masks[k] & (lung_p <= 0.5)
    assert unseen.any() and np.allclose(q[k][unseen], 0.501)
    other = masks[k] & (p[k] <= 0.5) & (lung_p > 0.5)
    assert other.any() and (q[k][other] <= lung_p[other] + 1e-6).all() and (q[k][other] > 0.501).mean() > 0.5
    # The model's own lobe keeps its value where it holds the voxel.
    own = masks[k] & (p[k] > 0.5)
    assert own.any() and (q[k][own] >= p[k][own]).all()


def test_a_lung_the_image_cuts_at_its_base_keeps_the_models_lobes():
    hu, body, right, left, _ = _chest()
    # The left lung reaches the lowest slice: its base is outside the image, so its atlas
    # coordinates are unknown; the right lung is whole.
    hu[5:17, 6:24, 0:20] = -850.0
    p = _probabilities(right, left)
    p[1][5:17, 8:22, 0:20] = 0.7  # the model calls the new air lower lobe left
    result = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5)
    assert result.atlas_sides == ("right",)
    masks = result.probabilities.numpy() > 0.5
    assert masks[1][5:17, 6:24, 0:20].all()  # the model's lobe, filled to the air


def test_the_model_weight_lets_a_confident_model_move_the_fissure():
    hu, body, right, left, _ = _chest()
    p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    p[0][left] = 0.99  # the model calls the whole left lung upper lobe
    alone = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5).probabilities.numpy() > 0.5
    both = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5, model_weight=1.0).probabilities.numpy() > 0.5
    assert alone[1][left].any()  # the atlas alone keeps a lower lobe
    assert both[0][left].sum() > alone[0][left].sum()


def test_a_rim_of_air_along_the_skin_is_not_a_lung_even_where_the_model_calls_it_one():
    """Partial-volume air one voxel thick just inside the body's edge (the body mask holds it) is
    not a lung: a leave-one-out model called such a rim "lower lobe" on the abdominal DICOM slab,
    around the trunk and the arms. The drawn lungs, thick, stay lungs."""
    hu, body, right, left, gas = _chest()
    from scipy import ndimage

    rim = body & ~ndimage.binary_erosion(body, structure=np.ones((3, 3, 1), bool))  # the body's outermost voxels
    assert rim.sum() > 0.05 * body.sum()
    hu[rim] = -500.0
    p = _probabilities(right, left)
    index = {n: i for i, n in enumerate(LOBES)}
    p[index["lung_lower_lobe_right"]][rim] = 0.9  # the model calls the whole rim lung
    result = outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5, atlas=None)
    lobes = np.asarray(result.probabilities) > 0.5
    assert not lobes[:, rim].any()
    assert lobes.any(axis=0)[right | left].mean() > 0.95  # the lungs are still filled
    # Only the rim, no lung in the image: no lobe at all (without the thickness rule the rim,
    # which holds every voxel the model calls lung, was kept as one).
    hu[right | left] = 40.0
    p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    p[index["lung_lower_lobe_right"]][rim] = 0.9
    assert not (np.asarray(outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5, atlas=None).probabilities) > 0.5).any()
    assert (np.asarray(outline_lobes(p, LOBES, hu, body, AFFINE, threshold=0.5, atlas=None, min_core=0.0).probabilities) > 0.5).any()


def test_a_lobe_wholly_on_the_other_side_of_the_midline_is_not_that_lobe():
    """Bowel gas on the patient's left that a model calls "lower right lobe" (a model trained on
    with arms and tables did, 4.5 mL on the DICOM slab) is no lobe: a lobe's piece wholly beyond
    the body's midline by ``side_margin_mm`` on the wrong side is dropped. Not where the image
    cuts the body at its side (the grid's middle is then not the patient's), and not a piece that
    reaches its own side."""
    affine = np.diag([4.0, 4.0, 4.0, 1.0])  # world x = 4 * index: the right is x > 78 mm, the midline
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    body = np.zeros(SHAPE, dtype=bool)
    body[2:38, 2:28, :] = True
    hu[body] = 40.0
    gas = np.zeros(SHAPE, dtype=bool)
    gas[5:13, 8:16, 10:16] = True  # world x 20-48 mm: 30-58 mm left of the midline
    hu[gas] = -950.0
    index = {n: i for i, n in enumerate(LOBES)}
    p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    p[index["lung_lower_lobe_right"]][gas] = 0.85
    rll = index["lung_lower_lobe_right"]

    kept = outline_lobes(p, LOBES, hu, body, affine, 0.5, atlas=None, side_margin_mm=1e9).probabilities.numpy()
    assert (kept[rll] > 0.5).sum() == gas.sum()  # without the rule, the gas is the lobe
    dropped = outline_lobes(p, LOBES, hu, body, affine, 0.5, atlas=None).probabilities.numpy()
    assert (dropped <= 0.5).all()
    # Nor does the left lung's lobe take the gas over as unclaimed lung of its side.
    lung = np.zeros(SHAPE, dtype=bool)
    lung[4:16, 8:24, 26:38] = True
    p_lung = p.copy()
    p_lung[index["lung_upper_lobe_left"]][lung] = 0.9
    q = outline_lobes(p_lung, LOBES, np.where(lung, np.float32(-850.0), hu), body, affine, 0.5, atlas=None).probabilities.numpy()
    assert not (q[:, gas] > 0.5).any() and (q[index["lung_upper_lobe_left"]][lung] > 0.5).all()

    # The image cuts the body at its left: no midline to trust, the lobe stays.
    cut_body = body.copy()
    cut_body[0:2, 2:28, :] = True
    cut_hu = hu.copy()
    cut_hu[0:2, 2:28, :] = 40.0
    cut = outline_lobes(p, LOBES, cut_hu, cut_body, affine, 0.5, atlas=None).probabilities.numpy()
    assert (cut[rll] > 0.5).sum() == gas.sum()

    # A piece that reaches across to its own side is kept whole.
    wide = np.zeros(SHAPE, dtype=bool)
    wide[8:30, 8:16, 10:16] = True  # world x 32-116 mm, across the midline
    wide_hu = np.where(wide, np.float32(-950.0), hu)
    wide_p = np.full((5, *SHAPE), 0.02, dtype=np.float32)
    wide_p[rll][wide] = 0.85
    across = outline_lobes(wide_p, LOBES, wide_hu, body, affine, 0.5, atlas=None).probabilities.numpy()
    assert (across[rll] > 0.5).sum() == wide.sum()
