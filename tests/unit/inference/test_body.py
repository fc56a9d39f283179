"""The body mask that keeps grounded findings inside the patient (volumed.inference.body)."""

from __future__ import annotations

import numpy as np
import pytest

from volumed.inference.body import body_mask, long_axis
from volumed.io import read_volume
from volumed.io.volume import Volume


def _torso(affine=None) -> Volume:
    """A 2 mm torso: soft-tissue ellipse with an air 'lung' inside, a separate table under it,
    air around it and padding outside the reconstruction circle."""
    shape = (100, 90, 40)
    x, y, _ = np.ogrid[: shape[0], : shape[1], : shape[2]]
    data = np.full(shape, -1000.0, dtype=np.float32)
    body = ((x - 50) / 35.0) ** 2 + ((y - 40) / 25.0) ** 2 <= 1.0
    data[np.broadcast_to(body, shape)] = 40.0
    lung = ((x - 40) / 10.0) ** 2 + ((y - 40) / 10.0) ** 2 <= 1.0
    data[np.broadcast_to(lung, shape)] = -850.0
    data[15:85, 72:76, :] = 200.0  # the table: 7 mm of air below the body
    data[np.broadcast_to(((x - 50) / 50.0) ** 2 + ((y - 45) / 45.0) ** 2 > 1.0, shape)] = -3024.0
    return Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine, "CT")


def test_body_keeps_the_lungs_and_drops_table_air_and_padding():
    volume = _torso()
    mask = body_mask(volume, margin_mm=0.0)
    assert mask.shape == volume.shape and mask.dtype == bool
    assert mask[40, 40, 20]  # inside the air-filled 'lung'
    assert mask[50, 40, 0] and mask[50, 40, 39]  # the first and last slices too
    assert not mask[50, 74, 20]  # the table
    assert not mask[50, 69, 20] and not mask[0, 0, 20]  # air below the body, padding
    # Without a margin the mask is the ellipse to within the 3 mm working grid.
    x, y = np.ogrid[:100, :90]
    ellipse = ((x - 50) / 35.0) ** 2 + ((y - 40) / 25.0) ** 2 <= 1.0
    assert np.mean(mask[:, :, 20] != ellipse) < 0.02
    # The margin grows it by about 5 mm (2 to 3 voxels) on every side.
    wide = body_mask(volume)
    assert wide[50, 67, 20] and not wide[50, 70, 20] and wide[14, 40, 20] and not wide[10, 40, 20]


def test_a_lung_cut_by_the_edge_of_the_field_of_view_stays_in_the_body():
    """A crop through the 'lung' (the body reaches the slice's edge): the lung is no hole in the
    slice, and is kept by the convex hull; the air outside the body in the crop is not."""
    volume = _torso()
    crop = Volume(np.ascontiguousarray(volume.data[36:, :, :]), volume.affine, "CT")
    mask = body_mask(crop, margin_mm=0.0)
    lung = crop.data < -500
    inside = lung & (np.arange(crop.shape[1])[None, :, None] >= 30) & (np.arange(crop.shape[1])[None, :, None] <= 50)
    inside &= (np.arange(crop.shape[0])[:, None, None] <= 14)
    assert inside.sum() > 500 and mask[inside].all()  # the cut lung
    assert not mask[60, 5, 20] and not mask[40, 74, 20]  # air beside the body, the table


def test_body_follows_the_long_axis_of_any_orientation():
    # The same torso with the slices along the first voxel axis: holes are filled across it.
    volume = _torso()
    swapped = Volume(np.ascontiguousarray(volume.data.transpose(2, 0, 1)),
                     np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]]), "CT")
    assert long_axis(volume.affine) == 2 and long_axis(swapped.affine) == 0
    assert np.array_equal(body_mask(swapped), body_mask(volume).transpose(2, 0, 1))


def test_no_mask_for_mr_or_an_image_without_tissue():
    volume = _torso()
    assert body_mask(Volume(volume.data, volume.affine, "MR")) is None
    assert body_mask(Volume(np.full((8, 8, 8), -1000.0, dtype=np.float32), np.eye(4), "CT")) is None


@pytest.mark.realdata
def test_every_reference_mask_of_the_real_cts_lies_in_the_body(shared_data):
    """The body mask must never cut a structure: every reference mask of the 74 cm CT and of the
    DICOM slab (its label map is stored with the rows flipped against the series) is inside it,
    and the table under the 74 cm CT is not."""
    ccth = shared_data / "tcia_ccth_a01"
    volume = read_volume(ccth / "ct.nii.gz")
    mask = body_mask(volume)
    masks = sorted((ccth / "masks").glob("*.nii.gz"))
    assert len(masks) == 10
    for path in masks:
        structure = read_volume(path).data > 0
        assert structure.any() and not (structure & ~mask).any(), path.name
    dense_outside = (volume.data > -500) & ~mask
    # The table (the posterior rows of every slice) is left out; apart from it, only specks of
    # partial volume just above -500 HU.
    assert dense_outside.sum() > 200_000
    assert np.mean(np.argwhere(dense_outside)[:, 1] >= 200) > 0.99
    # The same CT cropped through the right lung (the crop's edge cuts it): still inside.
    right = slice(0, 110)
    crop = Volume(np.ascontiguousarray(volume.data[right]), volume.affine, "CT")
    crop_mask = body_mask(crop)
    lobes = [read_volume(ccth / "masks" / f"lung_{lobe}_right.nii.gz").data[right] > 0
             for lobe in ("upper_lobe", "middle_lobe", "lower_lobe")]
    assert any(lobe[-1].any() for lobe in lobes)  # the crop's last plane cuts the lung
    for lobe in lobes:
        assert lobe.any() and not (lobe & ~crop_mask).any()
    series = read_volume(shared_data / "totalsegmentator_ct_sm" / "example_ct_dicom_with_uids")
    labels = read_volume(shared_data / "totalsegmentator_ct_sm" / "example_seg_dicom.nii.gz").data[:, ::-1] > 0
    slab = body_mask(series)
    assert labels.sum() > 700_000 and not (labels & ~slab).any()
    assert not slab[:20, :20].any() and not slab[-20:, -20:].any()  # the corners


def test_air_in_a_notch_of_a_body_the_image_cuts_at_its_sides_is_not_body():
    """tcia_ccth_a01 is cropped to the body at its sides. Filling such slices to the body's convex
    hull took in the air in the body's concavities and under it (22 L on a 4 mm grid, which a
    poor lobe model called lung). An edge the body reaches counts as closed, so a lung that edge
    cuts is still filled; air that leaves through an edge the body does not reach is not."""
    shape = (60, 90, 10)
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[:, 20:70, :] = 40.0  # the trunk, reaching the left and right edges of every slice
    data[25:36, 20:36, :] = -1000.0  # a notch at its back, open to the air below the body
    data[0:10, 40:56, :] = -850.0  # a lung the left edge cuts
    mask = body_mask(Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]), "CT"), margin_mm=0.0)
    assert mask[0:10, 40:56, :].all()  # the cut lung is inside
    assert not mask[27:34, 21:33, :].any()  # the notch is not
    assert not mask[:, :18, :].any() and not mask[:, 72:, :].any()  # nor the air below and above
