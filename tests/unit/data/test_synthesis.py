"""Label-map synthesis (volumed.data.synthesis) and CT priors (volumed.data.hu_priors): tissues,
body layers, the TorchIO generator's intensities per phase, and the real label maps' geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from volumed.data.hu_priors import PHASES, TISSUES, tissue_of
from volumed.data.synthesis import (
    BODY_CLASSES,
    CTSynthesizer,
    add_body_layers,
    extend_thighs,
    load_label_map_case,
    read_colour_table,
    read_structures,
)
from volumed.errors import ConfigError
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti


def test_every_totalsegmentator_class_has_a_tissue(ts_dir):
    classes = json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())["total"].values()
    tissues = {name: tissue_of(name) for name in classes}
    assert set(tissues.values()) <= set(TISSUES)
    assert tissues["aorta"] == tissues["pulmonary_vein"] == "artery"  # both carry arterial blood
    assert tissues["inferior_vena_cava"] == "vein" and tissues["portal_vein_and_splenic_vein"] == "portal_vein"
    assert tissues["kidney_cyst_left"] == "water" and tissues["kidney_left"] == "kidney"
    assert tissues["gallbladder"] == "bile" and tissues["urinary_bladder"] == "urine"
    assert all(tissues[f"vertebrae_{v}"] == "bone" for v in ("C1", "T12", "L5", "S1"))
    assert tissues["lung_middle_lobe_right"] == "lung" and tissues["trachea"] == "airway"
    # Names of the other label maps: AbdomenAtlas, the SPL atlas, free text.
    assert tissue_of("postcava") == "vein" and tissue_of("gall_bladder") == "bile"
    assert tissue_of("L4-L3-IntervertebralDisc") == "disc" and tissue_of("Lumbar3") == "bone"
    assert tissue_of("right_renal_pelvis") == "water" and tissue_of("rectus_abdominis_muscle") == "muscle"
    assert tissue_of("pulmonary artery") == "artery" and tissue_of("something unknown") == "soft"


def test_contrast_phases_order_the_blood_pool():
    artery, vein = TISSUES["artery"], TISSUES["vein"]
    assert artery.mean_range("native")[1] < artery.mean_range("portal")[0] < artery.mean_range("arterial")[0]
    assert artery.mean_range("arterial") [0] >= 250 and artery.mean_range("arterial")[1] >= 400  # 300-500 HU
    assert 100 < sum(vein.mean_range("portal")) / 2 < 200  # portal venous: about 150 HU
    assert all(30 <= t.mean_range("native")[0] and t.mean_range("native")[1] <= 70
               for n, t in TISSUES.items() if n in ("artery", "vein", "heart", "portal_vein"))  # fmt: skip
    # Tissues that do not enhance are the same in every phase.
    assert all(len({t.mean_range(p) for p in PHASES}) == 1 for t in TISSUES.values() if not t.blood_pool)


def test_read_colour_table(tmp_path):
    path = tmp_path / "colours.ctbl"
    path.write_text("# comment\n3 liver 1 2 3 255\n\n51 right_kidney 9 9 9 255\n")
    assert read_colour_table(path) == {3: "liver", 51: "right_kidney"}
    path.write_text("3 liver 1 2 3 255\nnot-a-number x\n")
    with pytest.raises(ConfigError, match="line 2"):
        read_colour_table(path)


def test_read_structures_masks(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a = np.zeros((10, 10, 10), np.uint8)
    a[1:4, 1:4, 1:4] = 1
    b = np.zeros_like(a)
    b[3:6, 3:6, 3:6] = 1  # overlaps a at one voxel: the later name wins
    write_nifti(Volume(a, affine, "unknown"), tmp_path / "a.nii.gz")
    write_nifti(Volume(b, affine, "unknown"), tmp_path / "b.nii.gz")
    write_nifti(Volume(np.zeros_like(a), affine, "unknown"), tmp_path / "empty.nii.gz")
    classes, aff, names = read_structures(masks_dir=tmp_path)
    assert names == ["a", "b"]  # the empty mask is dropped
    assert classes[3, 3, 3] == 2 and classes[1, 1, 1] == 1 and classes[8, 8, 8] == 0
    np.testing.assert_allclose(aff, affine)
    write_nifti(Volume(a[:8], affine, "unknown"), tmp_path / "other.nii.gz")
    with pytest.raises(ConfigError, match="another grid"):
        read_structures(masks={"a": tmp_path / "a.nii.gz", "z": tmp_path / "other.nii.gz"})
    with pytest.raises(ConfigError, match="exactly one"):
        read_structures(masks_dir=tmp_path, label=tmp_path / "a.nii.gz")


def test_body_layers_fill_the_trunk_and_wrap_it():
    classes = np.zeros((40, 40, 3), np.int16)
    classes[8:14, 15:25, :] = 1  # two structures far apart in x: the trunk is their hull
    classes[26:32, 15:25, :] = 2
    out = add_body_layers(classes, (3.0, 3.0, 3.0), np.random.default_rng(0), wall_mm=(6.0, 6.0), fat_mm=(9.0, 9.0))
    offset = len(BODY_CLASSES) - 1
    assert (out[8:14, 15:25] == 1 + offset).all() and (out[26:32, 15:25] == 2 + offset).all()
    assert set(np.unique(out[14:26, 15:25])) <= {3, 4}  # between them: inner fat / soft tissue
    assert (out[19, 15:25, 1] != 0).all()
    # Wall (2 voxels = 6 mm) then subcutaneous fat (3 voxels = 9 mm), air beyond, in-plane only.
    assert (out[20, 13:15, 1] == 2).all() and (out[20, 10:13, 1] == 1).all() and (out[20, :10, 1] == 0).all()
    assert out[0, 0, 0] == 0


def _two_organs() -> tuple[torch.Tensor, list[str]]:
    classes = torch.zeros((1, 32, 32, 16), dtype=torch.int16)
    classes[0, 4:28, 4:28, 2:14] = 4  # inner soft tissue
    classes[0, 6:16, 6:26, 4:12] = 5  # liver
    classes[0, 18:26, 10:20, 4:12] = 6  # aorta (a big one)
    tissues = [t for _, t in BODY_CLASSES] + ["liver", "artery"]
    return classes, tissues


@pytest.mark.parametrize("phase", PHASES)
def test_synthesizer_draws_each_structure_from_its_phase_range(phase):
    classes, tissues = _two_organs()
    synth = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=1)
    image, deformed, used = synth(classes, phase=phase)
    assert used == phase and image.shape == classes.shape and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert torch.equal(deformed, classes)  # no deformation asked
    hu = image[0] * 2000.0 - 1000.0
    core = torch.zeros_like(hu, dtype=torch.bool)
    for c, tissue in ((5, "liver"), (6, "artery")):
        core[:] = False
        core[(classes[0] == c)] = True
        inner = core & torch.roll(core, 2, 0) & torch.roll(core, -2, 0) & torch.roll(core, 2, 1) & torch.roll(core, -2, 1)
        lo, hi = TISSUES[tissue].mean_range(phase)
        mean = float(hu[inner].mean())
        assert lo - 30 <= mean <= hi + 30, (tissue, phase, mean)  # noise, blur and a +-2 % bias field
    assert float(hu[classes[0] == 0].mean()) < -900  # air outside


def test_synthesizer_is_reproducible_and_deforms_labels_and_image_together():
    classes, tissues = _two_organs()
    a = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=6.0, seed=3)
    b = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=6.0, seed=3)
    state = torch.random.get_rng_state()
    ia, da, pa = a(classes)
    ib, db, pb = b(classes)
    assert torch.equal(ia, ib) and torch.equal(da, db) and pa == pb
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's torch generator is untouched
    assert not torch.equal(da, classes)  # deformed
    assert set(torch.unique(da).tolist()) <= set(torch.unique(classes).tolist())  # nearest: no new class
    # The image follows the deformed labels: air exactly where the deformed map says outside.
    hu = ia[0] * 2000.0 - 1000.0
    assert float(hu[da[0] == 0].mean()) < -900 and float(hu[da[0] == 5].mean()) > -200
    with pytest.raises(ConfigError, match="no tissue"):
        a(torch.full((1, 4, 4, 4), 9, dtype=torch.int16))
    with pytest.raises(ConfigError, match="unknown tissues"):
        CTSynthesizer(["air", "plasma"], (3.0, 3.0, 3.0))


@pytest.mark.realdata
def test_real_label_map_in_model_space_is_ras(shared_data):
    """The SPL atlas (an LPS-stored NRRD with a colour table): right kidney on the patient's right,
    i.e. at larger x in RAS model space, and unions of structures make one term."""
    case = load_label_map_case(
        name="spl", terms=["kidney_left", "kidney_right", "portal_vein_and_splenic_vein", "heart"],
        term_structures=[["left_kidney"], ["right_kidney"], ["portal_vein_and_superior_mesenteric_vein", "splenic_vein"], []],
        target_spacing=(3.0, 3.0, 3.0), label=shared_data / "spl_abdominal_atlas" / "seg.nrrd",
        colour_table=shared_data / "spl_abdominal_atlas" / "AbdominalAtlasColors.ctbl",
    )  # fmt: skip
    masks = case.masks()
    assert masks.shape == (4, *case.classes.shape[1:]) and masks.dtype == torch.uint8
    x = [float(masks[k].nonzero()[:, 0].float().mean()) for k in (0, 1)]
    assert x[1] > x[0] + 10  # right kidney at larger x (RAS), ~ 30 voxels apart at 3 mm
    assert len(case.term_classes[2]) == 2 and masks[2].any() and not masks[3].any()  # heart: annotated absent
    assert case.class_tissues[case.class_names.index("liver")] == "liver"
    # The body: air at the corner, the body classes around the organs.
    assert int(case.classes[0, 0, 0, 0]) == 0
    assert {1, 2, 3, 4} <= set(torch.unique(case.classes).tolist())


def test_structures_of_one_tissue_share_their_intensity():
    """Two lobes side by side look alike (no edge between them), as in a CT; a lobe and the liver
    under it do not."""
    classes = torch.zeros((1, 32, 32, 16), dtype=torch.int16)
    classes[0, 2:30, 2:30, 1:15] = 4
    classes[0, 4:16, 4:28, 8:14] = 5  # upper lobe
    classes[0, 16:28, 4:28, 8:14] = 6  # lower lobe, touching it
    classes[0, 4:28, 4:28, 2:7] = 7  # liver
    tissues = [t for _, t in BODY_CLASSES] + ["lung", "lung", "liver"]
    for seed in range(5):
        image, _, _ = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed)(classes)
        hu = image[0] * 2000 - 1000
        # Medians: the lungs' vessel texture (a random 5-20 % of voxels raised) is drawn per voxel.
        upper, lower, liver = (float(hu[6:14, 6:26, 9:13].median()), float(hu[18:26, 6:26, 9:13].median()),
                               float(hu[6:26, 6:26, 3:6].median()))  # fmt: skip
        assert abs(upper - lower) <= 2 * 5.0 + 10.0, (seed, upper, lower)  # jitter +-5 HU each, plus noise
        assert liver - max(upper, lower) > 400


def test_texture_gives_lungs_a_bright_vessel_tail_and_bones_a_cortex():
    """Real lobes are skewed (a bright tail of vessels) and a femur's boundary is brighter than its
    inside (tcia_ccth_a01, see ``add_texture``); the flat draw has neither."""
    classes = torch.full((1, 40, 40, 24), 4, dtype=torch.int16)
    classes[0, 4:36, 4:36, 2:12] = 5  # a lung
    classes[0, 12:28, 12:28, 14:22] = 6  # a bone
    tissues = [t for _, t in BODY_CLASSES] + ["lung", "bone"]
    lung, bone = classes[0] == 5, classes[0] == 6
    inner = torch.zeros_like(bone)
    inner[13:27, 13:27, 15:21] = True
    shell = bone & ~inner
    for seed in range(3):
        flat = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed, texture=False)(classes)[0][0] * 2000 - 1000
        tex = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed)(classes)[0][0] * 2000 - 1000
        tail = [float(torch.quantile(h[lung], 0.97) - h[lung].median()) for h in (flat, tex)]
        assert tail[1] > tail[0] + 100, (seed, tail)
        # Same seed, same draws but the texture's: the difference is the cortex, blurred.
        added = tex - flat
        assert float(added[shell].mean() - added[inner].mean()) > 100, seed
        assert float(added[~lung & ~bone].abs().max()) < 200  # neither touches the rest but by blur


@pytest.mark.parametrize("phase", PHASES)
def test_heart_wall_darkens_the_rim_of_a_contrast_heart_only(phase):
    """A label map's heart is one structure; with contrast, a real heart is bright chambers inside a
    darker myocardium (the thorax crop: blood 466-578 HU, wall 131 HU). ``heart_wall`` draws that;
    without contrast blood and muscle look alike and the heart stays flat."""
    classes = torch.full((1, 40, 40, 32), 4, dtype=torch.int16)
    x, y, z = torch.meshgrid(torch.arange(40), torch.arange(40), torch.arange(32), indexing="ij")
    heart = ((x - 20) ** 2 + (y - 20) ** 2 + (z - 16) ** 2) <= 14**2  # a 42 mm radius ball at 3 mm
    classes[0][heart] = 5
    tissues = [t for _, t in BODY_CLASSES] + ["heart"]
    r2 = (x - 20) ** 2 + (y - 20) ** 2 + (z - 16) ** 2
    shell = heart & (r2 > 13**2)  # the outermost voxel: inside every wall (3-9 mm)
    inner = r2 <= 10**2  # deeper than the widest wall
    flat = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=3)(classes, phase=phase)[0][0] * 2000 - 1000
    walled = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=3, heart_wall=True)(classes, phase=phase)[0][0] * 2000 - 1000
    if phase == "native":
        assert torch.allclose(flat, walled)
        return
    blood = float(flat[inner].median())
    assert float(walled[shell].median()) < float(flat[shell].median()) - 25  # a wall all round
    # Inside, only the septum's slab is muscle: some voxels, not most.
    assert 0.02 < float((walled[inner] < blood - 25).float().mean()) < 0.6
    assert float((walled - flat)[~heart].abs().max()) < 200  # the rest changes by blur only


@pytest.mark.parametrize("phase", ["portal", "arterial"])
def test_enhancement_draws_contrast_between_native_and_the_phase(phase):
    """``enhancement=(f, f)`` moves each tissue's mean range to ``native + f * (phase - native)``:
    a block of spleen beside liver then sits where a weakly enhanced real scan has them, between
    the two priors; static tissues (muscle) do not move; ``(1, 1)`` is the prior, draw for draw."""
    classes = torch.full((1, 32, 32, 16), 4, dtype=torch.int16)
    classes[0, 2:14, 4:28, 2:14] = 5  # spleen
    classes[0, 18:30, 4:28, 2:14] = 6  # liver
    classes[0, :, :, 15] = 2  # a muscle layer
    tissues = [t for _, t in BODY_CLASSES] + ["spleen", "liver"]
    spleen, muscle = classes[0] == 5, classes[0] == 2
    assert CTSynthesizer.mean_range("spleen", phase, 0.0) == pytest.approx(TISSUES["spleen"].mean_range("native"))
    assert CTSynthesizer.mean_range("muscle", phase, 0.3) == pytest.approx(TISSUES["muscle"].mean_range(phase))
    for f in (0.0, 0.3, 0.6):
        lo, hi = CTSynthesizer.mean_range("spleen", phase, f)
        n_lo, n_hi = TISSUES["spleen"].mean_range("native")
        p_lo, p_hi = TISSUES["spleen"].mean_range(phase)
        assert (lo, hi) == pytest.approx((n_lo + f * (p_lo - n_lo), n_hi + f * (p_hi - n_hi)))
        for seed in range(3):
            synth = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed, texture=False, enhancement=(f, f))
            hu = synth(classes, phase=phase)[0][0] * 2000 - 1000
            # The mean of a structure is drawn within its range (+-5 HU jitter); noise and blur
            # move a block's median by a few HU.
            assert lo - 15 < float(hu[spleen].median()) < hi + 15, (f, seed)
            m_lo, m_hi = TISSUES["muscle"].mean_range(phase)
            assert m_lo - 15 < float(hu[muscle].median()) < m_hi + 15
    for seed in range(2):
        default = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed)(classes, phase=phase)[0]
        same = CTSynthesizer(tissues, (3.0, 3.0, 3.0), deform_mm=0.0, seed=seed, enhancement=(1.0, 1.0))(classes, phase=phase)[0]
        assert torch.equal(default, same)
    with pytest.raises(ConfigError, match="enhancement must be"):
        CTSynthesizer(tissues, (3.0, 3.0, 3.0), enhancement=(0.8, 0.4))


@pytest.mark.realdata
def test_heart_arterial_prior_covers_the_thorax_crops_blood(shared_data):
    """The arterial heart prior (a range for the structure's mean HU) holds the mean of the real
    contrast heart's blood: the voxels above 250 HU of the thorax crop's heart (about 500 HU,
    above the 450 HU the prior stopped at before)."""
    from volumed.io import read_label, read_volume

    folder = shared_data / "totalsegmentator_thorax_crops" / "pulmonary"
    ct = read_volume(folder / "ct_cropped.nii.gz")
    heart = read_label(folder / "heart.nii.gz", reference=ct).data > 0  # on another grid: resampled
    hu = np.asarray(ct.data, dtype=np.float64)[heart]
    blood = hu[hu > 250]
    lo, hi = TISSUES["heart"].mean_range("arterial")
    assert lo <= blood.mean() <= hi and blood.mean() > 450


def _trunk(names: tuple[str, ...] = ("liver",)) -> tuple[torch.Tensor, list[str], list[str]]:
    """A 160 x 96 x 12 class map at 4 mm: an elliptic trunk (fat, muscle wall, soft fill, one
    organ per name) in the middle of air, with room for whole arms beside it."""
    x, y = np.meshgrid(np.arange(160), np.arange(96), indexing="ij")
    r = ((x - 80) / 30.0) ** 2 + ((y - 50) / 22.0) ** 2
    section = np.zeros((160, 96), dtype=np.int16)
    section[r <= 1.0] = 1
    section[r <= 0.85] = 2
    section[r <= 0.7] = 4
    for k, _ in enumerate(names):
        section[(np.abs(x - 72 - 12 * k) < 5) & (np.abs(y - 50) < 5)] = 5 + k
    classes = torch.from_numpy(np.repeat(section[:, :, None], 12, axis=2))[None]
    tissues = [t for _, t in BODY_CLASSES] + [tissue_of(n) for n in names]
    return classes, tissues, [n for n, _ in BODY_CLASSES] + list(names)


def test_surroundings_draw_arms_beside_the_trunk_and_a_table_behind_it_outside_the_body_only():
    """A real CT's field of view holds the arms and the scanner's table; a label map ends at the
    skin (the DICOM slab's arms and table hid its spleen from every model that had not trained on
    it). ``surroundings=1`` draws both, only in the air around the trunk: the targets and the
    trunk's own voxels are those of the same draw without them."""
    classes, tissues, names = _trunk()
    body = classes[0].numpy() != 0
    xs, ys = np.nonzero(body.any(axis=2))
    arms_seen = 0
    for seed in range(5):
        plain_img, plain_cls, _ = CTSynthesizer(tissues, (4.0, 4.0, 4.0), deform_mm=0.0, seed=seed)(classes, phase="portal")
        img, cls, _ = CTSynthesizer(tissues, (4.0, 4.0, 4.0), deform_mm=0.0, seed=seed, surroundings=1.0,
                                    class_names=names)(classes, phase="portal")
        assert torch.equal(cls, plain_cls)  # no target changes
        hu, plain = img[0].numpy() * 2000 - 1000, plain_img[0].numpy() * 2000 - 1000
        from scipy import ndimage

        deep = ndimage.binary_erosion(body, iterations=3)
        assert np.abs(hu[deep] - plain[deep]).max() < 1.0  # the trunk is drawn as before
        dense = (hu > -500) & ~ndimage.binary_dilation(body, iterations=2)
        # A table under the back (RAS: low y is posterior), as wide as a trunk or wider.
        behind = dense[:, : ys.min() - 2]
        assert behind.any(), seed
        assert np.ptp(np.nonzero(behind.any(axis=(1, 2)))[0]) * 4.0 >= 200.0, seed
        # Arms beside it, at the trunk's height, never in front of it.
        beside = dense[:, ys.min():] & ((np.arange(160) < xs.min()) | (np.arange(160) > xs.max()))[:, None, None]
        if beside.any():
            arms_seen += 1
            assert (hu[:, ys.min():][beside] > 300).any(), seed  # a bone's cortex inside
        assert not dense[:, ys.max() + 3 :].any(), seed
    assert arms_seen >= 4  # each side drawn with probability 0.8


def test_surroundings_draw_no_arm_beside_the_thighs_and_reject_a_bad_probability():
    """An arm beside the femurs would look like a thigh labelled background: only the table is
    drawn in a patch that holds a femur or a hip."""
    classes, tissues, names = _trunk(("femur_left", "hip_left"))
    body = classes[0].numpy() != 0
    xs, _ = np.nonzero(body.any(axis=2))
    for seed in range(3):
        hu = CTSynthesizer(tissues, (4.0, 4.0, 4.0), deform_mm=0.0, seed=seed, surroundings=1.0,
                           class_names=names)(classes, phase="native")[0][0].numpy() * 2000 - 1000
        lateral = np.zeros_like(body)
        lateral[: xs.min() - 3] = True
        lateral[xs.max() + 4 :] = True
        back = np.nonzero(body.any(axis=(0, 2)))[0].min()  # RAS: low y is posterior
        table = np.zeros_like(body)
        # The pad reaches the back's row, and the curved table rises by up to 17 mm at 240 mm
        # from the middle (a voxel of blur on top); an arm would reach the trunk's middle rows.
        table[:, : back + 6] = True
        assert not ((hu > -500) & lateral & ~table).any(), seed
        assert ((hu > -500) & table & lateral).any(), seed  # the table reaches past the trunk
    with pytest.raises(ConfigError, match="surroundings must be a probability"):
        CTSynthesizer(tissues, (4.0, 4.0, 4.0), surroundings=1.5)
    with pytest.raises(ConfigError, match="class names for"):
        CTSynthesizer(tissues, (4.0, 4.0, 4.0), surroundings=0.5, class_names=names[:-1])


def _pelvis_ending_across_the_femurs(femur_slices: int = 40, hip: bool = False) -> tuple[np.ndarray, list[str]]:
    """A body-layered map (2 mm voxels) whose lowest slices cut both femurs: femur_left at low x,
    femur_right at high x, a sacrum on top; with ``hip`` a hip bone reaches the lowest slice."""
    names = ["femur_left", "femur_right", "sacrum", "hip_left"]
    c = np.zeros((120, 80, 60), np.int16)
    f_left, f_right, sacrum, hip_left = (len(BODY_CLASSES) - 1 + 1 + i for i in range(4))
    c[28:38, 35:45, 10 : 10 + femur_slices] = f_left - (len(BODY_CLASSES) - 1)
    c[82:92, 35:45, 10 : 10 + femur_slices] = f_right - (len(BODY_CLASSES) - 1)
    c[50:70, 30:50, 35:50] = sacrum - (len(BODY_CLASSES) - 1)
    if hip:
        c[14:24, 30:40, 10:30] = hip_left - (len(BODY_CLASSES) - 1)
    return add_body_layers(c, (2.0, 2.0, 2.0), np.random.default_rng(0)), names


def test_thighs_carry_both_femoral_shafts_down_in_two_thighs_apart():
    layered, names = _pelvis_ending_across_the_femurs()
    out = extend_thighs(layered, names, (2.0, 2.0, 2.0), np.random.default_rng(3))
    n_new = out.shape[2] - layered.shape[2]
    assert 60 <= n_new <= 100  # 12-20 cm at 2 mm
    np.testing.assert_array_equal(out[:, :, n_new:], layered)  # the map itself is unchanged
    f_left, f_right = len(BODY_CLASSES), len(BODY_CLASSES) + 1
    k0 = int(np.flatnonzero((layered > 0).any((0, 1)))[0])
    for k in (0, n_new // 2, n_new - 1):
        sl = out[:, :, k]
        for f in (f_left, f_right):
            assert (sl == f).sum() == (layered[:, :, k0] == f).sum()  # the lowest cross-section, carried down
            ring = ndimage_ring(sl == f)
            assert np.isin(sl[ring], [2, f_left, f_right]).all()  # each shaft lies in muscle
        assert {0, 1, 2} <= set(np.unique(sl).tolist()) and not np.isin(sl, [3, 4]).any()
        # Air between the thighs: the column midway between the femurs is outside the body.
        assert (sl[58:62] == 0).all()
    # Adduction: the shafts converge on the knee, the lowest slice's nearer the midline.
    x_top = [np.argwhere(out[:, :, n_new - 1] == f)[:, 0].mean() for f in (f_left, f_right)]
    x_low = [np.argwhere(out[:, :, 0] == f)[:, 0].mean() for f in (f_left, f_right)]
    assert x_low[0] > x_top[0] and x_low[1] < x_top[1]


def ndimage_ring(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=2) & ~mask


@pytest.mark.parametrize("variant", ["hip in the lowest slice", "femoral heads only", "no femur"])
def test_thighs_are_not_drawn_below_a_map_that_does_not_end_across_the_femoral_shafts(variant):
    layered, names = _pelvis_ending_across_the_femurs(femur_slices=25 if variant == "femoral heads only" else 40,
                                                      hip=variant == "hip in the lowest slice")  # fmt: skip
    if variant == "no femur":
        names = ["other_left", "other_right", "sacrum", "hip_left"]
    out = extend_thighs(layered, names, (2.0, 2.0, 2.0), np.random.default_rng(0))  # 25 slices: 50 mm of femur
    assert out is layered


def test_thighs_below_totalsegmentator_s0327_not_below_s0328(shared_data):
    """s0327 ends 11 cm down the femurs; s0328 at the femoral heads (the two label maps with femurs)."""
    from volumed.tasks.promptseg_data import load_synthetic_sources

    sources = {s.name: s for s in load_synthetic_sources("configs/datalists/promptseg_ct_all.json")}
    grown = {}
    for name in ("s0327", "s0328"):
        src = sources[name]
        case = load_label_map_case(name=name, terms=src.terms, term_structures=src.term_structures,
                                   target_spacing=(4.0, 4.0, 4.0), **src.files)  # fmt: skip
        layered = case.classes[0].numpy()
        out = extend_thighs(layered, case.class_names[len(BODY_CLASSES):], (4.0, 4.0, 4.0), np.random.default_rng(0))
        grown[name] = out.shape[2] - layered.shape[2]
        np.testing.assert_array_equal(out[:, :, grown[name]:], layered)
        if grown[name]:
            femurs = [case.class_names.index(f) for f in ("femur_left", "femur_right")]
            assert all((out[:, :, 0] == f).any() for f in femurs)  # both shafts reach the new lowest slice
    assert grown["s0327"] >= 30 and grown["s0328"] == 0, grown
