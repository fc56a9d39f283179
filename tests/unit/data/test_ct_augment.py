"""CT augmentations of training patches (volumed.data.ct_augment): contrast phase, field of view,
box crop, slice thickness."""

from __future__ import annotations

import pytest
import torch

from volumed.data.ct_augment import POOL_TISSUES, BoxCrop, ContrastPhase, FieldOfView, region_of, slice_thickness
from volumed.data.hu_priors import TISSUES

WINDOW = (-1000.0, 1000.0)


def _hu_to_unit(hu: torch.Tensor) -> torch.Tensor:
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def _patch() -> dict:
    """A non-contrast patch: soft tissue 40 HU with texture, an 'aorta' (artery) of 40 HU and a
    'liver' of 55 HU."""
    g = torch.Generator().manual_seed(0)
    hu = 40.0 + 10.0 * torch.randn((1, 32, 32, 16), generator=g)
    aorta = torch.zeros((32, 32, 16), dtype=torch.uint8)
    aorta[4:12, 4:12, 2:14] = 1
    liver = torch.zeros_like(aorta)
    liver[16:30, 10:28, 2:14] = 1
    hu[0][liver > 0] += 15.0
    return {"image": _hu_to_unit(hu), "pools": torch.stack([aorta, liver]), "masks": torch.stack([aorta, liver])}


def _inner(mask: torch.Tensor) -> torch.Tensor:
    m = mask.bool()
    for axis in range(3):
        m = m & torch.roll(m, 2, axis) & torch.roll(m, -2, axis)
    return m


@pytest.mark.parametrize("phase", ["native", "portal", "arterial"])
def test_contrast_phase_moves_each_pool_into_its_phase_range(phase):
    data = _patch()
    aug = ContrastPhase(["artery", "liver"], [40.0, 55.0], WINDOW, prob=1.0, phases=[phase], seed=0)
    out = aug(data)
    assert out["phase"] == phase
    hu_in = data["image"][0] * 2000 - 1000
    hu = out["image"][0] * 2000 - 1000
    for k, tissue in enumerate(["artery", "liver"]):
        inner = _inner(data["pools"][k])
        lo, hi = TISSUES[tissue].mean_range(phase)
        assert lo - 1 <= float(hu[inner].mean()) <= hi + 1, (tissue, float(hu[inner].mean()))
        # Coherent: one shift for the whole structure, its texture kept.
        diff = (hu - hu_in)[inner]
        assert float(diff.std()) < 1e-2
    far = torch.zeros_like(hu, dtype=torch.bool)
    far[:, :, :] = True
    far[0:16, 0:16] = False
    far[12:32, 6:32] = False
    assert torch.equal(hu[far], hu_in[far])  # nothing moves away from the pools
    assert torch.equal(out["masks"], data["masks"])  # targets are untouched


def test_contrast_phase_probability_and_reproducibility():
    data = _patch()
    never = ContrastPhase(["artery", "liver"], [40.0, 55.0], WINDOW, prob=0.0)
    out = never(data)
    assert out["phase"] == "unchanged" and torch.equal(out["image"], data["image"])
    a = ContrastPhase(["artery", "liver"], [40.0, 55.0], WINDOW, prob=1.0, seed=5)(data)
    b = ContrastPhase(["artery", "liver"], [40.0, 55.0], WINDOW, prob=1.0, seed=5)(data)
    assert a["phase"] == b["phase"] and torch.equal(a["image"], b["image"])
    with pytest.raises(ValueError):
        ContrastPhase(["artery"], [40.0, 55.0])
    assert {"artery", "heart", "vein", "portal_vein", "kidney", "liver", "spleen"} <= set(POOL_TISSUES)
    assert "bone" not in POOL_TISSUES and "lung" not in POOL_TISSUES


def test_field_of_view_keeps_one_region_and_blanks_the_rest():
    shape = (8, 8, 20)
    zindex = torch.arange(11, 31, dtype=torch.int16).view(1, 1, 1, 20).expand(1, *shape).clone()  # case slices 11..30
    zindex[..., :2] = 0  # two slices of padding
    masks = torch.ones((2, *shape), dtype=torch.uint8)
    data = {"image": torch.full((1, *shape), 0.5), "masks": masks, "fg": masks[:1].clone(), "zindex": zindex}
    fov = FieldOfView({"chest": (20, 25), "pelvis": (100, 120)}, margin_slices=(0, 0), prob=1.0, seed=0, fill="air")
    out = fov(data)
    # The pelvis is far from this patch: the chest is the region kept.
    assert out["fov"] == "chest"
    keep = (zindex[0] >= 20) & (zindex[0] <= 25)
    assert torch.equal(out["image"][0] > 0, keep)
    assert torch.equal(out["masks"][1] > 0, keep) and torch.equal(out["fg"][0] > 0, keep)
    assert data["image"].min() == 0.5  # the input is not modified
    assert FieldOfView({"chest": (20, 25)}, prob=0.0)(data)["fov"] == "whole"
    assert FieldOfView({"pelvis": (100, 120)}, margin_slices=(0, 0), prob=1.0)(data)["fov"] == "whole"


def test_region_of():
    assert region_of("lung_upper_lobe_left") == region_of("heart") == region_of("pulmonary artery") == "chest"
    assert region_of("liver") == region_of("kidney_right") == region_of("gallbladder") == "abdomen"
    assert region_of("urinary_bladder") == region_of("femur_left") == region_of("sacrum") == "pelvis"
    assert region_of("aorta") is None and region_of("rib_left_3") is None


def test_slice_thickness_blurs_along_the_slice_axis_only():
    assert slice_thickness(5.0) is None  # nothing coarser than the model spacing in 1-5 mm
    aug = slice_thickness(1.0, prob=1.0)
    assert aug is not None
    image = torch.zeros((1, 16, 16, 32))
    image[..., ::2] = 1.0  # alternate slices: the finest detail along z
    torch.manual_seed(0)
    out = torch.as_tensor(aug(image))
    assert out.shape == image.shape
    # In-plane nothing changes; along z the stripes lose contrast.
    assert torch.allclose(out[0, :, :, 5], out[0, 0:1, 0:1, 5].expand(16, 16))
    assert float(out[0, 8, 8].std()) < float(image[0, 8, 8].std())


def test_field_of_view_mirrors_the_kept_slab_into_the_rest():
    """Default fill: what inference does to a scan thinner than the patch (symmetric padding), so
    a cut patch never shows bands of air that no real input at inference has."""
    shape = (4, 4, 20)
    zindex = torch.arange(11, 31, dtype=torch.int16).view(1, 1, 1, 20).expand(1, *shape).clone()  # case slices 11..30
    zindex[..., :2] = 0
    image = zindex.float() / 100.0  # each slice's value tells where it came from
    masks = torch.zeros((1, *shape), dtype=torch.uint8)
    masks[..., 12] = 1  # case slice 23: inside the chest
    data = {"image": image, "masks": masks, "fg": masks.clone(), "zindex": zindex}
    out = FieldOfView({"chest": (20, 25), "pelvis": (100, 120)}, margin_slices=(0, 0), prob=1.0, seed=0)(data)
    assert out["fov"] == "chest"
    src = [int(v) for v in (out["image"][0, 0, 0] * 100).round()]
    # Slices 20..25 (patch positions 9..14) kept, mirrored at both ends, repeatedly.
    assert src[9:15] == [20, 21, 22, 23, 24, 25]
    assert src[3:9] == [25, 24, 23, 22, 21, 20] and src[15:20] == [25, 24, 23, 22, 21]
    assert src[:3] == [23, 24, 25]
    # Targets follow the image: the labelled slice 23 appears wherever its mirror copy does.
    assert [z for z in range(20) if out["masks"][0, 0, 0, z]] == [z for z in range(20) if src[z] == 23]
    assert torch.equal(out["fg"], out["masks"])
    with pytest.raises(ValueError, match="fill"):
        FieldOfView({"chest": (1, 2)}, fill="noise")


def _box_patch(shape=(40, 30, 24)) -> dict:
    zindex = torch.arange(1, shape[2] + 1, dtype=torch.int16).view(1, 1, 1, -1).expand(1, *shape).clone()
    image = 0.3 + zindex.float() / 100.0  # every voxel tissue; its value tells the slice it came from
    masks = torch.ones((2, *shape), dtype=torch.uint8)
    return {"image": image, "masks": masks, "fg": masks[:1].clone(), "zindex": zindex}


def test_box_crop_keeps_a_box_around_the_centre_and_fills_the_rest_with_air():
    """As inference sees an exported crop: tissue inside a box that holds the patch centre, air
    and no structure around it in-plane; along the slices a slab (air outside, fill="air")."""
    data = _box_patch()
    spacing = (4.0, 4.0, 4.0)
    for seed in range(20):
        out = BoxCrop(spacing, prob=1.0, inplane_mm=(40.0, 80.0), slab_mm=(40.0, 60.0), fill="air", seed=seed)(data)
        (x0, x1), (y0, y1), (z0, z1) = out["box"]
        assert 10 <= x1 - x0 <= 20 and 10 <= y1 - y0 <= 20 and 10 <= z1 - z0 <= 15
        assert x0 <= 20 < x1 and y0 <= 15 < y1 and z0 <= 12 < z1  # the patch centre is kept
        keep = torch.zeros(data["image"].shape[1:], dtype=torch.bool)
        keep[x0:x1, y0:y1, z0:z1] = True
        assert torch.equal(out["image"][0] > 0, keep)
        assert torch.equal(out["image"][0][keep], data["image"][0][keep])
        assert torch.equal(out["masks"][1] > 0, keep) and torch.equal(out["fg"][0] > 0, keep)
        assert torch.equal(out["zindex"][0] > 0, keep)  # outside the box reads as padding
    assert float(data["image"].min()) > 0.3  # the input is not modified
    assert BoxCrop(spacing, prob=0.0)(data)["box"] is None


def test_box_crop_mirrors_a_thin_slab_along_the_slices_as_inference_pads_it():
    data = _box_patch()
    out = BoxCrop((4.0, 4.0, 4.0), prob=1.0, inplane_mm=(40.0, 40.0), slab_mm=(20.0, 20.0), seed=3)(data)
    (x0, x1), (y0, y1), (z0, z1) = out["box"]
    assert z1 - z0 == 5
    src = [int(v) for v in ((out["image"][0, x0, y0] - 0.3) * 100).round()]
    kept = list(range(z0 + 1, z1 + 1))  # 1-based slice numbers of the slab
    assert src[z0:z1] == kept
    # Reflected at both ends of the slab, repeatedly (numpy's "symmetric" padding).
    assert src[z1 : z1 + 5] == kept[::-1] and src[z0 - 5 : z0] == kept[::-1]
    assert set(src) == set(kept)  # every slice a copy of one in the slab
    assert torch.equal(out["zindex"][0, x0, y0], torch.tensor(src, dtype=torch.int16))
    assert float(out["image"][0, :x0].abs().max() if x0 else 0.0) == 0.0 and out["masks"][:, x1:].sum() == 0
    # A slab as deep as the patch: no slice is touched.
    deep = BoxCrop((4.0, 4.0, 4.0), prob=1.0, inplane_mm=(40.0, 40.0), slab_mm=(200.0, 300.0), seed=3)(data)
    (a0, a1), (b0, b1), _ = deep["box"]
    assert torch.equal(deep["image"][0, a0:a1, b0:b1], data["image"][0, a0:a1, b0:b1])


def test_box_crop_refuses_bad_settings():
    with pytest.raises(ValueError, match="fill"):
        BoxCrop((4.0, 4.0, 4.0), fill="noise")
    with pytest.raises(ValueError, match="inplane_mm"):
        BoxCrop((4.0, 4.0, 4.0), inplane_mm=(300.0, 100.0))
