"""VoCo pretraining: crop sampler, losses, learning on the real CTs, export, CLI resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from volumed.data.voco_crops import VoCoCropDataset, VoCoCropSampler, base_crop_origins, overlap_labels
from volumed.errors import ConfigError
from volumed.tasks.pretrain_voco import VoCoDataModule, VoCoLoss, VoCoPretrainModule, position_logits

REPO = Path(__file__).resolve().parents[3]
# Two stride-2 stages only: 16^3 crops keep a 4^3 deepest map (the preset's 5 would shrink it to
# nothing); strides change no weight shape, so the weights still fit the default stunet_tiny.
TINY_STRIDES = ((2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1))
# Training steps of the real-data learning test (about 0.06 s each on an idle 2-core machine).
STEPS = 120


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Train on one thread: on the shared 2-core machine, two OpenMP threads competing with other
    jobs were measured 10-30x slower per step than one (0.16 s vs 1.4-5 s at load 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------- sampler


def test_base_crop_origins_row_major_over_x_then_y():
    np.testing.assert_array_equal(base_crop_origins(2, (4, 6, 3)), [[0, 0, 0], [0, 6, 0], [4, 0, 0], [4, 6, 0]])


@pytest.mark.parametrize(
    "origin, grid, crop, expected",
    [
        # Centred on the 2x2 grid's middle: a quarter on each base crop.
        ((2, 3, 0), 2, (4, 6, 5), [0.25, 0.25, 0.25, 0.25]),
        # Shifted 1 voxel along x from base crop (0, 0) on a 3x3 grid of 4x4 crops.
        ((1, 0, 0), 3, (4, 4, 2), [0.75, 0, 0, 0.25, 0, 0, 0, 0, 0]),
        # x in [5, 9): 3 voxels on column 1, 1 on column 2; y in [2, 6): 2 on row 0, 2 on row 1.
        ((5, 2, 0), 3, (4, 4, 2), [0, 0, 0, 0.375, 0.375, 0, 0.125, 0.125, 0]),
        # Exactly on base crop 4 (i=1, j=1): one-hot.
        ((4, 4, 0), 3, (4, 4, 2), [0, 0, 0, 0, 1, 0, 0, 0, 0]),
    ],
)
def test_overlap_labels_hand_checked(origin, grid, crop, expected):
    np.testing.assert_allclose(overlap_labels(np.array([origin]), grid, crop)[0], expected, atol=1e-7)


def test_sampler_base_crops_tile_the_region_and_random_crops_are_labelled_by_voxel_count():
    sampler = VoCoCropSampler(crop_size=(4, 6, 3), grid=3, num_random_crops=16).set_random_state(0)
    region = torch.arange(12 * 18 * 3, dtype=torch.float32).reshape(1, 12, 18, 3)
    out = sampler(region)
    assert out.base.shape == (9, 1, 4, 6, 3) and out.random.shape == (16, 1, 4, 6, 3) and out.labels.shape == (16, 9)
    # The base crops put back in their grid cells rebuild the region exactly (no gap, no overlap).
    rebuilt = out.base.reshape(3, 3, 1, 4, 6, 3).permute(2, 0, 3, 1, 4, 5).reshape(1, 12, 18, 3)
    torch.testing.assert_close(rebuilt, region)
    for crop, origin, label in zip(out.random, out.origins, out.labels):
        x, y, z = origin.tolist()
        torch.testing.assert_close(crop, region[:, x : x + 4, y : y + 6, z : z + 3])
        # Brute force: the fraction of the crop's voxels that fall in each base crop.
        cell = torch.arange(9).reshape(3, 1, 3, 1).expand(3, 4, 3, 6).reshape(12, 18)
        counts = torch.bincount(cell[x : x + 4, y : y + 6].flatten(), minlength=9).float() / 24
        torch.testing.assert_close(label, counts)
        assert math.isclose(float(label.sum()), 1.0, abs_tol=1e-6)


def test_sampler_is_deterministic_with_a_seed():
    region = torch.rand(1, 48, 48, 16)
    kw = dict(crop_size=16, grid=3, num_random_crops=5, flip_prob=0.5, rotate90_prob=0.5)
    a = VoCoCropSampler(**kw).set_random_state(3)(region)
    b = VoCoCropSampler(**kw).set_random_state(3)(region)
    c = VoCoCropSampler(**kw).set_random_state(4)(region)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    assert not torch.equal(a.origins, c.origins)


def test_flip_augmentation_changes_the_crop_but_not_its_label():
    region = torch.rand(1, 8, 8, 4)
    out = VoCoCropSampler(crop_size=(4, 4, 4), grid=2, num_random_crops=3, flip_prob=1.0).set_random_state(1)(region)
    for crop, origin, label in zip(out.random, out.origins, out.labels):
        x, y, _ = origin.tolist()
        torch.testing.assert_close(crop, region[:, x : x + 4, y : y + 4].flip(1, 2, 3))
        # The label says where the crop was cut, whatever was done to its voxels.
        torch.testing.assert_close(label, torch.from_numpy(overlap_labels(origin[None].numpy(), 2, (4, 4, 4))[0]))
    torch.testing.assert_close(out.base[0], region[:, :4, :4].flip(1, 2, 3))


def test_sampler_rejects_a_region_of_the_wrong_shape():
    with pytest.raises(ConfigError, match=r"region must have shape \(C, 32, 32, 16\)"):
        VoCoCropSampler(crop_size=16, grid=2)(torch.zeros(1, 32, 30, 16))
    with pytest.raises(ConfigError, match="grid must be at least 2"):
        VoCoCropSampler(grid=1)


def test_crop_dataset_collates_into_a_batch_of_named_fields():
    ds = VoCoCropDataset([{"image": torch.rand(1, 32, 32, 16)}] * 2, VoCoCropSampler(16, grid=2, num_random_crops=3))
    batch = default_collate([ds[0], ds[1]])
    assert batch.base.shape == (2, 4, 1, 16, 16, 16) and batch.random.shape == (2, 3, 1, 16, 16, 16)
    assert batch.labels.shape == (2, 3, 4)


# ------------------------------------------------------------------------------------ losses


def test_position_logits_are_clamped_cosine_similarities():
    base = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])  # (1, 3, 2)
    rand = torch.tensor([[[3.0, 3.0]]])  # (1, 1, 2): 45 degrees from the first two
    p = position_logits(rand, base)
    torch.testing.assert_close(p, torch.tensor([[[2**-0.5, 2**-0.5, 0.0]]]))


def test_losses_vanish_for_a_perfect_prediction_and_match_hand_values():
    loss = VoCoLoss()
    labels = torch.tensor([[[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]])  # (1, 2, 4)
    orthogonal = torch.eye(4)[None]  # (1, 4, 4)
    perfect = loss(labels.clone(), labels, orthogonal)
    assert float(perfect.total) == pytest.approx(0.0, abs=1e-5)
    assert float(perfect.position) == pytest.approx(0.0, abs=1e-5)
    # Off by 0.5 on every positive entry: -log(0.5); 0.3 on the zero entries: 0.3^2.
    wrong = torch.tensor([[[0.75, 0.25, 0.3, 0.3], [0.3, 0.3, 0.5, 0.3]]])
    out = loss(wrong, labels, orthogonal)
    assert float(out.position) == pytest.approx(math.log(2.0), rel=1e-5)
    assert float(out.negative) == pytest.approx(0.09, rel=1e-5)
    assert float(out.regularization) == pytest.approx(0.0, abs=1e-7)
    assert float(out.total) == pytest.approx(math.log(2.0) + 0.09, rel=1e-5)
    weighted = VoCoLoss(position_weight=2.0, negative_weight=0.0)(wrong, labels, orthogonal)
    assert float(weighted.total) == pytest.approx(2 * math.log(2.0), rel=1e-5)


def test_regularisation_pushes_base_crops_apart():
    same = torch.ones(2, 4, 8)
    assert float(VoCoLoss.base_discrepancy(same)) == pytest.approx(1.0)
    # cos(b0, b1) = 0.5; cos(b1, b2) = -0.5 and cos(b0, b2) = -1 are clamped to 0.
    b = torch.tensor([[[1.0, 0.0], [0.5, 3**0.5 / 2], [-1.0, 0.0]]])
    expected = 2 * 0.5**2 / 6  # mean over the 6 ordered pairs n != m
    assert float(VoCoLoss.base_discrepancy(b)) == pytest.approx(expected, rel=1e-5)


def test_a_prediction_that_is_exactly_wrong_stays_finite():
    out = VoCoLoss()(torch.zeros(1, 1, 2), torch.tensor([[[1.0, 0.0]]]), torch.eye(2)[None])
    assert math.isfinite(float(out.position)) and float(out.position) > 10


# ------------------------------------------------------------------------ any encoder, bf16


@pytest.mark.parametrize(
    "encoder, crop",
    [("stunet_tiny", (16, 16, 16)), ("swin_tiny", (32, 32, 32)), ("ctvit_tiny", (40, 40, 20))],
)
def test_one_training_step_with_each_tiny_encoder_and_bf16(encoder, crop):
    kwargs = {"strides": TINY_STRIDES} if encoder == "stunet_tiny" else {}
    model = VoCoPretrainModule(encoder, encoder_kwargs=kwargs, hidden_dim=32, proj_dim=32)
    # The projector is sized from the encoder's deepest feature map.
    assert model.student.projector.mlp[0].in_features == model.student.encoder.feature_info[-1].channels
    sampler = VoCoCropSampler(crop, grid=2, num_random_crops=2).set_random_state(0)
    regions = [torch.rand(1, 2 * crop[0], 2 * crop[1], crop[2])]
    loader = torch.utils.data.DataLoader(VoCoCropDataset(regions, sampler), batch_size=1, collate_fn=default_collate)
    before = [p.detach().clone() for p in model.student.parameters()]
    _trainer(max_steps=1, precision="bf16-mixed").fit(model, train_dataloaders=loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters()))
    # The teacher took one EMA step towards the student.
    assert int(model.teacher.n_averaged) == 1


# ------------------------------------------------------------------- real CTs: it learns


@pytest.fixture(scope="module")
def real_datalist(tmp_path_factory, shared_data) -> Path:
    images = [
        shared_data / "totalsegmentator_ct_sm" / "example_ct.nii.gz",
        shared_data / "totalsegmentator_ct_sm" / "example_ct_dicom",
        shared_data / "totalsegmentator_thorax_crops" / "pulmonary" / "ct_cropped.nii.gz",
    ]
    for p in images:
        if not p.exists():
            pytest.skip(f"real data not found: {p}")
    path = tmp_path_factory.mktemp("voco") / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": str(p)} for p in images]}))
    return path


@pytest.fixture(scope="module")
def trained(real_datalist):
    """STEPS steps of VoCo (2x2 grid, 16^3 crops) on the three real CTs; held-out validation MAE before/after."""
    L.seed_everything(0)
    dm = VoCoDataModule(
        real_datalist, crop_size=16, grid=2, num_random_crops=8, batch_size=1, samples_per_epoch=1000,
        val_samples_per_volume=4, seed=0,
    )
    model = VoCoPretrainModule(
        "stunet_tiny", encoder_kwargs={"strides": TINY_STRIDES}, hidden_dim=256, proj_dim=256,
        teacher_momentum=0.99, lr=1e-3,
    )
    trainer = _trainer(max_steps=STEPS, limit_val_batches=1.0, check_val_every_n_epoch=None, val_check_interval=10**6)
    before = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/pos_mae"]
    trainer.fit(model, datamodule=dm)
    after = trainer.validate(model, datamodule=dm, verbose=False)[0]["val/pos_mae"]
    return dm, model, before, after


@pytest.mark.realdata
def test_regions_are_scaled_body_boxes_from_nifti_and_dicom(trained):
    dm, *_ = trained
    assert len(dm.regions) == 3 and len(dm.val_set) == 12
    for i in range(3):
        region = dm.regions[i]
        assert region["modality"] == "CT" and tuple(region["image"].shape) == (1, 32, 32, 16)
        img = region["image"]
        # -175..250 HU -> [0, 1]: the body box holds fat and air (0) and dense tissue (near 1).
        assert float(img.min()) == 0.0 and float(img.max()) > 0.9 and 0.1 < float(img.mean()) < 0.6
    assert str(dm.regions[1]["path"]).endswith("example_ct_dicom")


@pytest.mark.realdata
def test_position_mae_falls_by_half_on_held_out_crops(trained):
    dm, model, before, after = trained
    zero_guess = float(torch.stack([b.labels.mean() for b in dm.val_set]).mean())  # predicting 0 everywhere
    print(f"val/pos_mae before {before:.4f} after {after:.4f} (all-zero guess {zero_guess:.4f})")
    assert after <= 0.5 * before
    # Better than the trivial answer, so the drop is not just "predict nothing".
    assert after < 0.8 * zero_guess


@pytest.mark.realdata
def test_a_resumed_run_draws_new_crops_deterministically(trained):
    dm, *_ = trained
    assert dm.trainer is not None and dm.trainer.global_step == STEPS

    def first_origins():
        return next(iter(dm.train_dataloader())).origins

    resumed, again = first_origins(), first_origins()
    torch.testing.assert_close(resumed, again)
    trainer, dm.trainer = dm.trainer, None  # as at the start of a fresh run (step 0)
    try:
        assert not torch.equal(first_origins(), resumed)
    finally:
        dm.trainer = trainer


@pytest.mark.realdata
def test_exported_encoder_loads_into_the_encoder_and_the_full_stunet(trained, tmp_path):
    from volumed.encoders import create_encoder
    from volumed.encoders.stunet import create_stunet
    from volumed.encoders.weights import load_encoder_weights

    _, model, *_ = trained
    path = model.export_encoder(tmp_path / "encoder.pt")
    trained_state = model.student.encoder.state_dict()

    fresh = create_encoder("stunet_tiny")  # the preset's default strides: weight shapes are the same
    report = load_encoder_weights(fresh, path, strict=True)
    assert report.missing == [] and report.mismatched == [] and len(report.loaded) == len(trained_state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, trained_state[key])

    net = create_stunet("stunet_tiny", num_classes=3)
    report = load_encoder_weights(net, path)
    assert not [k for k in report.missing if k.startswith("encoder.")] and report.mismatched == []
    torch.testing.assert_close(net.encoder.stages[0][0].conv1.weight, trained_state["stages.0.0.conv1.weight"])
    report = load_encoder_weights(create_stunet("stunet_tiny").encoder, path, strict=True)
    assert report.missing == []


# --------------------------------------------------------------------------- CLI + resume


@pytest.mark.realdata
def test_cli_trains_checkpoints_exports_and_resumes(shared_data, tmp_path):
    from volumed.tasks.cli_pretrain import main

    image = shared_data / "totalsegmentator_ct_sm" / "example_ct.nii.gz"
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": str(image)}]}))
    out = tmp_path / "run"
    args = [
        "--config", str(REPO / "configs" / "pretrain_voco-cpu.yaml"),
        "--out", str(out),
        "--data.datalist", str(datalist),
        "--data.crop_size", "[16, 16, 16]",
        "--data.grid", "2",
        "--data.num_random_crops", "2",
        "--data.samples_per_epoch", "null",
        "--data.val_samples_per_volume", "0",
        "--model.encoder_kwargs", json.dumps({"strides": [list(s) for s in TINY_STRIDES]}),
        "--model.hidden_dim", "32",
        "--model.proj_dim", "32",
        "--trainer.enable_progress_bar", "false",
        "--num_threads", "1",
    ]
    main(args + ["--trainer.max_steps", "3"])
    last = out / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and (out / "encoder.pt").is_file()
    assert list(out.glob("lightning_logs/version_0/config.yaml")), "LightningCLI saves the merged config with the logs"
    # Reproducibility: the command, seed, precision and software versions next to the checkpoints.
    env = json.loads((out / "environment.json").read_text())
    assert env["seed"] == 0 and env["precision"] == "32-true" and env["argv"][:2] == args[:2]
    assert env["software"]["torch"] == torch.__version__ and env["software"]["monai"] and env["software"]["volumed"]

    main(args + ["--trainer.max_steps", "6", "--ckpt_path", "last"])
    second = torch.load(last, map_location="cpu", weights_only=False)
    assert second["global_step"] == 6
    # The EMA teacher's update counter came back from the checkpoint and went on counting.
    assert int(second["state_dict"]["teacher.n_averaged"]) == 6
    assert not torch.equal(
        first["state_dict"]["student.encoder.stages.0.0.conv1.weight"],
        second["state_dict"]["student.encoder.stages.0.0.conv1.weight"],
    )


def test_gpu_recipe_parses_and_builds_on_cpu(tmp_path):
    from volumed.tasks.cli_pretrain import VoCoCLI

    cli = VoCoCLI(
        VoCoPretrainModule, VoCoDataModule, run=False, auto_configure_optimizers=False,
        args=[
            "--config", str(REPO / "configs" / "pretrain_voco.yaml"),
            "--data.datalist", str(tmp_path / "unused.json"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--model.encoder", "swin_tiny", "--out", str(tmp_path / "gpu"),
        ],
    )
    assert cli.trainer.precision == "bf16-mixed" and type(cli.trainer.strategy).__name__ == "DDPStrategy"
    assert cli.datamodule.region_size == (384, 384, 96) and cli.datamodule.hparams.num_random_crops == 2
    # The authors' 2 volumes per GPU without checkpointing ran out of memory on a 140 GB H200:
    # 1 volume with gradient checkpointing in the encoder (measured 35 GiB) is the recipe.
    assert cli.datamodule.hparams.batch_size == 1 and cli.model.hparams.encoder_kwargs == {"use_checkpoint": True}
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "gpu" / "checkpoints")
