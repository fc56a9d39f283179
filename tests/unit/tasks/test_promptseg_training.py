"""Partial-label training of the text-prompted segmenter: datalists, loss, sampling, a phantom overfit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from volumed.data.transforms import PreprocessConfig
from volumed.errors import ConfigError, DatalistError
from volumed.inference.package import load_package
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti
from volumed.tasks.promptseg import (
    PartialLabelLoss,
    PromptSegCase,
    PromptSegDataModule,
    PromptSegModule,
    PromptSegPatchDataset,
    load_case,
    load_promptseg_datalist,
    predict_probabilities,
    select_terms,
)
from volumed.tasks.promptseg import exclusive_negative_bce

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "bundles" / "volumed_promptseg_ct" / "models"
# The phantom's whole 288 x 288 x 192 mm field of view at 6 mm: small enough to overfit in seconds.
PHANTOM_SHAPE, PHANTOM_SPACING, STEPS = (48, 48, 32), (6.0, 6.0, 6.0), 80


# ------------------------------------------------------------------------------------ fixtures


def _ct(shape=(24, 20, 12), spacing=3.0, origin=(0.0, 0.0, 0.0)) -> Volume:
    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    data = rng.normal(40, 10, shape).astype(np.float32)  # soft tissue: all body, nothing cropped
    return Volume(data, affine, modality="CT")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A CT, its TotalSegmentator-id map (liver=5, spleen=1, kidney_left=3), and binary masks,
    one of them on a finer grid than the image."""
    root = tmp_path_factory.mktemp("promptseg_data")
    ct = _ct()
    for i in range(6):  # a datalist refuses the same image twice: one copy per entry
        write_nifti(ct, root / f"ct{i}.nii.gz")
    ids = np.zeros(ct.shape, np.uint8)
    ids[2:10, 2:10, 2:8] = 5
    ids[14:20, 4:10, 2:8] = 1
    ids[4:8, 12:16, 2:6] = 3
    write_nifti(Volume(ids, ct.affine, "unknown"), root / "seg.nii.gz")
    write_nifti(Volume((ids == 5).astype(np.uint8), ct.affine, "unknown"), root / "liver.nii.gz")
    # Same field of view at 1.5 mm: read_label must resample it onto the 3 mm image grid.
    fine = np.zeros((48, 40, 24), np.uint8)
    fine[28:40, 8:20, 4:16] = 1  # = voxels 14:20, 4:10, 2:8 of the 3 mm grid
    fine_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    fine_affine[:3, 3] = -0.75  # voxel centres of the 1.5 mm grid inside the 3 mm voxels
    write_nifti(Volume(fine, fine_affine, "unknown"), root / "spleen_fine.nii.gz")
    return root


def _write_json(root: Path, name: str, entries: list[dict]) -> Path:
    path = root / name
    path.write_text(json.dumps({"modality": {"0": "CT"}, "training": entries}))
    return path


# ------------------------------------------------------------------------------------ datalists


def test_datalist_three_label_styles(tiny_data):
    path = _write_json(
        tiny_data,
        "styles.json",
        [
            {"image": "ct0.nii.gz", "label": "seg.nii.gz"},
            {"image": "ct1.nii.gz", "label": "seg.nii.gz", "terms": ["liver", "left kidney", "kidney", "pancreas"]},
            {"image": "ct2.nii.gz", "masks": {"liver": "liver.nii.gz", "spleen": "spleen_fine.nii.gz"}, "absent": ["brain"]},
        ],
    )
    all_present, listed, masks = load_promptseg_datalist(path)
    cfg = PreprocessConfig(target_spacing=None, crop_foreground=False)

    # Map without terms: every class id in the map is annotated.
    case = load_case(all_present, cfg)
    assert case.terms == ("spleen", "kidney_left", "liver")
    assert [int(m.sum()) for m in case.masks] == [6 * 6 * 6, 4 * 4 * 4, 8 * 8 * 6]

    # Listed terms: synonyms resolved, a group is the union, an absent class is an empty channel.
    assert listed.terms == ("liver", "kidney_left", "kidney", "pancreas")
    assert listed.label_ids == ((5,), (3,), (2, 3), (7,))
    case = load_case(listed, cfg)
    assert [int(m.sum()) for m in case.masks] == [384, 64, 64, 0]

    # Binary masks: the 1.5 mm spleen lands exactly on the 3 mm box; "brain" is a known-absent term.
    assert masks.terms == ("liver", "spleen", "brain") and masks.absent == ("brain",)
    case = load_case(masks, cfg)
    expect = np.zeros((24, 20, 12), bool)
    expect[14:20, 4:10, 2:8] = True
    assert np.array_equal(case.masks[1].numpy() > 0, expect)
    assert int(case.masks[0].sum()) == 384 and int(case.masks[2].sum()) == 0


def test_datalist_csv_masks_column(tiny_data):
    path = tiny_data / "masks.csv"
    path.write_text("image,masks,modality\nct0.nii.gz,liver=liver.nii.gz; right kidney=liver.nii.gz,CT\n")
    (src,) = load_promptseg_datalist(path)
    assert src.terms == ("liver", "kidney_right") and src.masks[0].name == "liver.nii.gz"


def test_datalist_validation_lists_every_problem(tiny_data):
    path = _write_json(
        tiny_data,
        "bad.json",
        [
            {"image": "ct0.nii.gz", "label": "seg.nii.gz", "masks": {"liver": "liver.nii.gz"}},
            {"image": "ct1.nii.gz", "masks": {"livr": "liver.nii.gz"}},
            {"image": "ct2.nii.gz", "masks": {"spleen": "nope.nii.gz"}},
            {"image": "ct3.nii.gz"},
            {"image": "ct4.nii.gz", "masks": ["liver.nii.gz"]},
            {"image": "ct5.nii.gz", "masks": {"pulmonary artery": "liver.nii.gz"}},
        ],
    )
    with pytest.raises(DatalistError) as err:
        load_promptseg_datalist(path)
    msg = str(err.value)
    assert "training[0]: give either 'label'" in msg
    assert "training[1]: unknown term 'livr'" in msg and "liver" in msg.split("training[1]")[1]
    assert "training[2]: mask of 'spleen' does not exist" in msg
    assert "training[3]: no labels" in msg
    assert "training[4]: 'masks' must be an object" in msg
    assert "training[5]: unknown term 'pulmonary artery'" in msg
    assert len(err.value.problems) == 6
    # Free text is accepted when asked for.
    ok = _write_json(tiny_data, "free.json", [{"image": "ct0.nii.gz", "masks": {"pulmonary artery": "liver.nii.gz"}}])
    assert load_promptseg_datalist(ok, allow_free_text=True)[0].terms == ("pulmonary artery",)


def test_real_datalist_resolves(shared_data):
    sources = load_promptseg_datalist(REPO / "configs/datalists/promptseg_ct_real.json", allow_free_text=True)
    assert [s.image.name for s in sources] == ["example_ct_sm.nii.gz", "example_ct_dicom", "ct_cropped.nii.gz"]
    assert sources[0].label_map.name == "example_seg.nii.gz" and sources[0].terms == ()
    assert sources[2].terms == ("heart", "pulmonary artery")


# ------------------------------------------------------------------------------------ loss


def test_unannotated_terms_contribute_zero_loss_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 4, requires_grad=True)
    target = (torch.rand(2, 3, 8, 8, 4) > 0.7).to(torch.uint8)
    annotated = torch.tensor([[True, False, True], [True, True, False]])
    use = select_terms(target, annotated)
    assert torch.equal(use, annotated)  # every annotated term is present here: all used
    loss_fn = PartialLabelLoss()
    out = loss_fn(logits, target, use)
    out.loss.backward()
    grad = logits.grad
    assert torch.all(grad[0, 1] == 0) and torch.all(grad[1, 2] == 0)
    assert grad[0, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0
    assert out.pairs == 4 and out.positives == 4
    # Changing an unannotated term's logits (even to inf) leaves the loss exactly as it was.
    changed = logits.detach().clone()
    changed[0, 1] = float("inf")
    changed[1, 2] = -5.0
    assert loss_fn(changed, target, use).loss.item() == out.loss.item()


def test_absent_annotated_terms_are_negatives_and_capped():
    target = torch.zeros(1, 5, 4, 4, 4, dtype=torch.uint8)
    target[0, 0, 1, 1, 1] = 1
    annotated = torch.tensor([[True, True, True, True, False]])
    assert select_terms(target, annotated).tolist() == [[True, True, True, True, False]]
    capped = select_terms(target, annotated, num_negatives=1, generator=torch.Generator().manual_seed(0))
    assert capped[0, 0] and not capped[0, 4] and int(capped.sum()) == 2
    # A negative pair drives its probabilities down through BCE only (Dice needs a positive).
    logits = torch.zeros(1, 5, 4, 4, 4, requires_grad=True)
    out = PartialLabelLoss()(logits, target, torch.tensor([[False, True, False, False, False]]))
    out.loss.backward()
    assert out.positives == 0 and out.dice.item() == 0.0 and torch.all(logits.grad[0, 1] > 0)


def test_topk_bce_weighs_a_small_false_positive_blob_by_its_share_of_the_hard_voxels():
    # A negative pair: 96 x 96 x 48 patch, a confident 8 x 8 x 8 false-positive blob (0.1 % of it).
    logits = torch.full((1, 1, 96, 96, 48), -6.0)
    logits[0, 0, :8, :8, :8] = 4.0
    target = torch.zeros_like(logits, dtype=torch.uint8)
    use = torch.tensor([[True]])
    plain = PartialLabelLoss()(logits, target, use).bce.item()
    topk = PartialLabelLoss(bce_topk=0.01)(logits, target, use).bce.item()
    blob = torch.nn.functional.softplus(torch.tensor(4.0)).item()  # BCE of one blob voxel
    k = math.ceil(0.01 * 96 * 96 * 48)
    expected = (512 * blob + (k - 512) * torch.nn.functional.softplus(torch.tensor(-6.0)).item()) / k
    assert topk == pytest.approx(expected, rel=1e-4)
    assert topk > 9 * plain  # the plain voxel mean dilutes the blob
    with pytest.raises(ConfigError, match="bce_topk"):
        PartialLabelLoss(bce_topk=0.0)


def test_exclusive_datalist_entries_are_flagged_and_checked(tiny_data):
    ok = _write_json(tiny_data, "exclusive.json", [
        {"image": "ct0.nii.gz", "masks": {"liver": "liver.nii.gz"}, "exclusive": True},
        {"image": "ct1.nii.gz", "masks": {"liver": "liver.nii.gz"}},
    ])  # fmt: skip
    flagged, plain = load_promptseg_datalist(ok)
    assert flagged.exclusive and not plain.exclusive
    cfg = PreprocessConfig(target_spacing=None, crop_foreground=False)
    assert load_case(flagged, cfg).exclusive and not load_case(plain, cfg).exclusive
    bad = _write_json(tiny_data, "exclusive_bad.json", [{"image": "ct0.nii.gz", "masks": {"liver": "liver.nii.gz"}, "exclusive": "yes"}])
    with pytest.raises(DatalistError, match=r"training\[0\]: 'exclusive' must be true or false, got 'yes'"):
        load_promptseg_datalist(bad)


def test_exclusive_negatives_train_unannotated_terms_inside_the_known_masks_only():
    # One patch, 3 terms: the case annotates term 0 (its mask is the known region); terms 1 and 2
    # are unannotated. Inside the mask they are negatives; outside it they stay unknown.
    known = torch.zeros(1, 1, 8, 8, 4)
    known[0, 0, :4] = 1
    logits = torch.zeros(1, 3, 8, 8, 4, requires_grad=True)
    pairs = torch.tensor([[False, True, False]])
    loss = exclusive_negative_bce(logits, pairs, known)
    assert loss.item() == pytest.approx(math.log(2.0))  # BCE(0, target 0) on every known voxel
    loss.backward()
    grad = logits.grad
    assert torch.all(grad[0, 1, :4] > 0) and torch.all(grad[0, 1, 4:] == 0)  # only inside the masks
    assert torch.all(grad[0, 0] == 0) and torch.all(grad[0, 2] == 0)  # unselected terms untouched
    # A confident false positive outside the known region costs nothing; inside it, it does.
    outside = torch.zeros(1, 3, 8, 8, 4)
    outside[0, 1, 4:] = 8.0
    assert exclusive_negative_bce(outside, pairs, known).item() == pytest.approx(math.log(2.0))
    inside = torch.zeros(1, 3, 8, 8, 4)
    inside[0, 1, :4] = 8.0
    assert exclusive_negative_bce(inside, pairs, known).item() > 7.9
    assert exclusive_negative_bce(logits.detach(), torch.zeros(1, 3, dtype=torch.bool), known).item() == 0.0


def test_module_draws_exclusive_negatives_only_for_exclusive_patches():
    module = _tiny_module(exclusive_negatives=2)
    module.set_terms(["liver", "spleen", "kidney_left", "kidney_right"], torch.randn(4, module.model_config.text_dim))
    known = torch.zeros(2, 1, 32, 32, 16, dtype=torch.uint8)
    known[:, :, 8:20, 8:20, 4:12] = 1
    batch = {
        "image": torch.rand(2, 1, 32, 32, 16),
        "target": torch.zeros(2, 4, 32, 32, 16, dtype=torch.uint8),
        "annotated": torch.tensor([[True, False, False, False], [True, False, False, False]]),
        "exclusive": torch.tensor([True, False]),
        "known": known,
        "modality": torch.zeros(2, dtype=torch.long),
    }
    batch["target"][:, 0] = known[:, 0]
    pairs = module._exclusive_pairs(batch)
    # Sample 0 (exclusive): 2 of its 3 unannotated terms; sample 1: none; never an annotated term.
    assert int(pairs[0].sum()) == 2 and not pairs[0, 0] and not pairs[1].any()
    with torch.no_grad():
        with_excl = module.compute_loss(batch).loss.item()
        module.hparams.exclusive_negatives = 0
        assert not module._exclusive_pairs(batch).any()
        without = module.compute_loss(batch).loss.item()
    assert with_excl > without  # the extra negatives add their BCE


def test_patches_of_exclusive_cases_carry_their_known_region():
    masks = torch.zeros(2, 24, 24, 12, dtype=torch.uint8)
    masks[0, 4:10, 4:10, 2:8] = 1
    masks[1, 12:20, 12:20, 2:8] = 1
    image = torch.rand(1, 24, 24, 12)
    for exclusive in (True, False):
        case = PromptSegCase(image, masks, ("liver", "spleen"), "CT", exclusive=exclusive)
        item = PromptSegPatchDataset([case], ["liver", "spleen", "heart"], (24, 24, 12), fg_rate=1.0)[0]
        assert item["exclusive"] is exclusive and item["known"].shape == (1, 24, 24, 12)
        expected = masks.amax(0, keepdim=True) if exclusive else torch.zeros(1, 24, 24, 12, dtype=torch.uint8)
        assert torch.equal(item["known"], expected)


# ------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("sampling", ["class", "union"])
def test_foreground_biased_sampling_rate(sampling):
    image = torch.rand(1, 64, 64, 32)
    masks = torch.zeros(2, 64, 64, 32, dtype=torch.uint8)
    masks[0, 28:36, 28:36, 14:18] = 1  # 0.1% of the voxels: uniform crops would almost never centre here
    case = PromptSegCase(image, masks, ("liver", "spleen"), "CT")  # spleen annotated but absent
    for rate in (0.0, 0.3, 1.0):
        ds = PromptSegPatchDataset([case], ["kidney_left", "liver", "spleen"], (16, 16, 8), rate, 200, sampling)
        ds.set_random_state(1)
        hits = np.mean([ds[i]["center_fg"] for i in range(200)])
        assert abs(hits - rate) < 0.08, (rate, hits)
    item = ds[0]
    assert item["image"].shape == (1, 16, 16, 8) and item["target"].shape == (3, 16, 16, 8)
    assert item["annotated"].tolist() == [False, True, True] and item["target"][1].sum() > 0


def test_class_balanced_sampling_centres_small_structures_as_often_as_large_ones():
    masks = torch.zeros(2, 64, 64, 32, dtype=torch.uint8)
    masks[0, 4:60, 4:60, 2:30] = 1  # "liver": 88,000 voxels
    masks[1, 30:32, 30:32, 15:17] = 1  # "aorta": 8 voxels, inside no other structure
    masks[0, 28:34, 28:34, 13:19] = 0
    case = PromptSegCase(torch.rand(1, 64, 64, 32), masks, ("liver", "aorta"), "CT")
    terms = ["aorta", "liver"]
    c = (8, 8, 4)

    def small_share(sampling: str) -> float:
        ds = PromptSegPatchDataset([case], terms, (16, 16, 8), 1.0, 300, sampling).set_random_state(3)
        return float(np.mean([bool(ds[i]["target"][(0, *c)]) for i in range(300)]))

    assert abs(small_share("class") - 0.5) < 0.1  # one of two present structures, uniformly
    assert small_share("union") < 0.02  # 8 of ~88,000 foreground voxels
    with pytest.raises(ConfigError, match="sampling"):
        PromptSegPatchDataset([case], terms, (16, 16, 8), sampling="balanced")


def test_augmentation_moves_image_and_masks_together_and_keeps_the_masks_binary():
    """A bright block whose mask is the image itself: after rotation, scaling and the intensity
    changes, the image still lies above 0.5 where the mask is set, and the geometry did change."""
    masks = torch.zeros(1, 48, 48, 24, dtype=torch.uint8)
    masks[0, 14:30, 18:34, 6:18] = 1
    case = PromptSegCase(masks.float(), masks, ("liver",), "CT")
    plain = PromptSegPatchDataset([case], ["liver"], (32, 32, 16), 1.0, 40).set_random_state(5)
    augmented = PromptSegPatchDataset([case], ["liver"], (32, 32, 16), 1.0, 40, augment=True).set_random_state(5)
    moved = 0
    for i in range(40):
        a, b = plain[i], augmented[i]
        assert b["image"].shape == (1, 32, 32, 16) and b["target"].dtype == torch.uint8
        assert set(b["target"].unique().tolist()) <= {0, 1}
        agree = ((b["image"][0] > 0.5) == b["target"][0].bool()).float().mean()
        assert agree > 0.97, (i, float(agree))
        moved += int(not torch.equal(a["target"], b["target"]))
    assert moved >= 5  # about 30% of the patches are rotated or scaled


def test_small_images_are_padded_to_the_patch():
    case = PromptSegCase(torch.rand(1, 20, 20, 6), torch.ones(1, 20, 20, 6, dtype=torch.uint8), ("liver",), "CT")
    # Air padding (the default): the image's voxels and nothing else are the structure.
    item = PromptSegPatchDataset([case], ["liver"], (32, 32, 8), fg_rate=1.0)[0]
    assert item["image"].shape == (1, 32, 32, 8) and int(item["target"].sum()) == 20 * 20 * 6
    # Mirrored (as a symmetric package's inference pads): image and target alike, no band of air.
    image = torch.rand(1, 20, 20, 6) * 0.5 + 0.25
    masks = torch.zeros(1, 20, 20, 6, dtype=torch.uint8)
    masks[..., 0] = 1  # the first slice only
    ds = PromptSegPatchDataset([PromptSegCase(image, masks, ("liver",), "CT")], ["liver"], (20, 20, 10), fg_rate=1.0,
                               pad_mode="symmetric")
    item = ds[0]
    assert item["image"].shape == (1, 20, 20, 10) and float(item["image"].min()) >= 0.25
    # z padded 2 before, 2 after: slices [1, 0 | 0 1 2 3 4 5 | 5 4] -> the labelled slice 0 at 1, 2.
    assert [int(v) for v in item["target"][0].amax((0, 1))] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(item["image"][0, ..., 1], image[0, ..., 0]) and torch.equal(item["image"][0, ..., 0], image[0, ..., 1])
    # Mirrored along slices only: in-plane the padding is air, the slices mirror as above.
    ds = PromptSegPatchDataset([PromptSegCase(image, masks, ("liver",), "CT")], ["liver"], (24, 24, 10), fg_rate=1.0,
                               pad_mode="symmetric_z")
    item = ds[0]
    assert item["image"].shape == (1, 24, 24, 10)
    inside = item["image"][0, 2:22, 2:22]
    assert float(inside.min()) >= 0.25 and float(item["image"][0, :2].abs().max()) == 0.0
    assert float(item["image"][0, :, :2].abs().max()) == 0.0
    assert [int(v) for v in item["target"][0].amax((0, 1))] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(inside[..., 1], image[0, ..., 0]) and int(item["target"].sum()) == 2 * 20 * 20
    with pytest.raises(ConfigError, match="pad_mode"):
        PromptSegPatchDataset([case], ["liver"], (32, 32, 8), pad_mode="wrap")


# ------------------------------------------------------------------------------------ training


def _tiny_module(**kw) -> PromptSegModule:
    return PromptSegModule(
        encoder="stunet_tiny",
        encoder_kwargs={"strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [1, 1, 1]]},
        decoder_kwargs={"embed_dim": 32, "num_layers": 1, "num_heads": 4, "pixel_dim": 16, "num_memory_levels": 2},
        lr=5e-3,
        warmup_steps=3,
        patch_size=(32, 32, 16),
        **kw,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A phantom overfit through Lightning; returns (module, datamodule, step losses, fixed-batch
    loss before and after)."""
    L.seed_everything(0)
    dm = PromptSegDataModule(
        None, phantom_cases=1, phantom_shape=PHANTOM_SHAPE, phantom_spacing=PHANTOM_SPACING,
        target_spacing=PHANTOM_SPACING, patch_size=(32, 32, 16), batch_size=2, fg_rate=0.7, samples_per_epoch=20,
        # Two annotated structures: the rest of the phantom is "unknown" (never a negative).
        phantom_terms=["liver", "spleen"],
    )  # fmt: skip
    module = _tiny_module()
    losses: list[float] = []
    # A fixed batch, scored before and after training: a noise-free measure of the fit.
    dm.setup("fit")
    module.set_terms(dm.terms)
    fixed = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = float(module.compute_loss(fixed).loss)

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path_factory.mktemp("run"),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        after = float(module.compute_loss(fixed).loss)
    return module, dm, losses, (before, after)


def test_phantom_overfit_reduces_loss_and_segments_liver(trained):
    module, dm, losses, (before, after) = trained
    assert len(losses) == STEPS
    assert after < 0.6 * before, (before, after)
    from volumed.data.phantoms import make_case

    phantom = make_case(0, index=0, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING, lesion_rate=0.0)
    cfg = module.package_config()
    assert cfg.preprocessing["target_spacing"] == list(PHANTOM_SPACING) and cfg.patch_size == (32, 32, 16)
    i = module.terms.index("liver")
    probs = predict_probabilities(module.net, cfg, phantom.image, ["liver"], module.term_embeddings[[i]])
    pred, ref = probs[0] > 0.5, phantom.label.data == 5
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    assert probs.shape == (1, *phantom.image.shape)
    assert dice > 0.7, dice


def test_package_round_trip_gives_identical_logits(trained, tmp_path):
    module = trained[0]
    out = module.export_package(tmp_path / "pkg", {"steps": 40})
    net, cfg = load_package(out)
    assert cfg.terms == module.terms and cfg.training["steps"] == 40 and cfg.text_model_hash
    x = torch.rand(1, 1, 32, 32, 16)
    text = module.term_embeddings[:3]
    module.net.eval()
    with torch.no_grad():
        assert torch.equal(net(x, text, "CT"), module.net(x, text, "CT"))


def test_encoder_weights_load_without_missing_keys(tmp_path):
    from volumed.encoders import create_encoder
    from volumed.encoders.weights import save_weights

    enc = create_encoder("stunet_tiny")
    save_weights(enc, tmp_path / "encoder.pt")
    module = _tiny_module(encoder_weights=str(tmp_path / "encoder.pt"))
    report = module.encoder_load_report
    assert report.missing == [] and report.mismatched == [] and len(report.loaded) == report.model_tensors
    for k, v in enc.state_dict().items():
        assert torch.equal(module.net.segmenter.encoder.state_dict()[k], v)


# ------------------------------------------------------------------------------------ the trained default


@pytest.mark.skipif(not (BUNDLE / "model.safetensors").is_file(), reason="no trained default package in bundles/")
def test_default_package_reproduces_its_liver_dice_on_example_ct(ts_dir):
    """The shared inference path reproduces the liver Dice that bench_promptseg_dice.py recorded in
    the package, and that it stays above 0.85 there."""
    from volumed.io import read_label, read_volume
    from volumed.tasks.promptseg import encode_terms

    net, cfg = load_package(BUNDLE)
    assert "liver" in cfg.terms and cfg.text_model == "default"
    volume = read_volume(ts_dir / "example_ct_sm.nii.gz")
    ref = read_label(ts_dir / "example_seg.nii.gz", reference=volume).data == 5
    emb, digest = encode_terms(["liver"], cfg.text_model)
    assert digest == cfg.text_model_hash
    probs = predict_probabilities(net, cfg, volume, ["liver"], emb)
    pred = probs[0] > cfg.threshold
    dice = float(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    recorded = cfg.metrics["training scans"]["dice"]["example_ct_sm.nii.gz"]["liver"]
    assert dice == pytest.approx(recorded, abs=0.01)
    # The all-data default model (four real CTs plus synthesis) trades training-scan fit for
    # behaviour on unseen scans: 0.894 here, where the three-scan model had 0.963 and 0.27 on a
    # scan it never saw. The earlier >= 0.90 training-scan goal is not met (BENCHMARKS.md).
    assert dice >= 0.85


@pytest.mark.parametrize("recipe", ["train_promptseg-cpu.yaml", "train_promptseg.yaml"])
def test_promptseg_recipes_parse_into_the_module_and_datamodule(recipe, capsys):
    """Every key of the shipped recipes is an argument of PromptSegModule / PromptSegDataModule
    (a renamed argument would otherwise stop the documented command before its first step)."""
    from volumed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "promptseg", "--config", str(REPO / "configs" / recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "bce_topk: null" in printed and "datalist: configs/datalists/promptseg_ct_all.json" in printed
    assert "pad_mode: symmetric_z" in printed and "min_confidence: 0.8" in printed


def test_validation_scores_only_the_terms_that_train(tiny_data):
    """A validation datalist annotating other structures too (or only others) must not let their
    Dice steer early stopping and the kept weights: only the trained terms are validated, and a
    validation datalist without any of them is refused, naming it."""
    train = _write_json(tiny_data, "val_train.json", [{"image": "ct0.nii.gz", "masks": {"liver": "liver.nii.gz"}}])
    both = _write_json(tiny_data, "val_both.json",
                       [{"image": "ct1.nii.gz", "masks": {"liver": "liver.nii.gz", "spleen": "spleen_fine.nii.gz"}}])  # fmt: skip
    other = _write_json(tiny_data, "val_other.json", [{"image": "ct2.nii.gz", "masks": {"spleen": "spleen_fine.nii.gz"}}])
    common = dict(datalist=str(train), patch_size=(16, 16, 8), target_spacing=(3.0, 3.0, 3.0), samples_per_epoch=2)
    dm = PromptSegDataModule(**common, val_datalist=str(both), val_section="training")
    dm.setup()
    assert dm.terms == ["liver"]
    assert [c.terms for c in dm.validation_cases] == [("liver",)]
    with pytest.raises(ConfigError, match=r"val_other.json: term\(s\) \['liver'\] are annotated by no datalist entry"):
        PromptSegDataModule(**common, val_datalist=str(other), val_section="training").setup()


@pytest.mark.parametrize("command", [["train", "promptseg", "--config", "train_promptseg-phantom-cpu.yaml"],
                                     ["pretrain", "--config", "pretrain_voco-cpu.yaml"]])  # fmt: skip
def test_resuming_from_a_missing_checkpoint_is_one_line_before_any_output(command, tmp_path, capsys):
    """--ckpt_path naming no file: one line naming it and exit code 2, before the data is loaded and
    anything is written under --out (Lightning's own failure came at fit, as a traceback)."""
    from volumed.cli import main

    argv = [c if not c.endswith(".yaml") else str(REPO / "configs" / c) for c in command]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "run"), "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"volumed: error: {tmp_path / 'nope.ckpt'}: checkpoint to resume from does not exist (--ckpt_path: 'last' or a .ckpt file)"
    assert not (tmp_path / "run").exists()


def test_unknown_term_of_a_label_map_does_not_suggest_free_text(tiny_data):
    """Free text can never index a TotalSegmentator-id label map, even with allow_free_text (as
    `volumed finetune` sets it): the hint says so instead of 'set allow_free_text'."""
    path = _write_json(tiny_data, "label_livr.json", [{"image": "ct0.nii.gz", "label": "seg.nii.gz", "terms": ["livr"]}])
    with pytest.raises(DatalistError) as err:
        load_promptseg_datalist(path, allow_free_text=True)
    (problem,) = err.value.problems
    assert problem.startswith("training[0]: unknown term 'livr' (nearest: liver")
    assert "allow_free_text" not in problem and "free text needs 'masks'" in problem
