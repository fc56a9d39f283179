"""bundles/volumed_voco_pretrain: a train-only bundle. MONAI's ConfigWorkflow(workflow_type="train")
instantiates it with every required property, its recipe is configs/pretrain_voco-cpu.yaml, and one
epoch on phantoms trains and exports an encoder that loads into the registered preset."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from bundle_helpers import REPO, VOCO

from volumed.bundle.metadata import validate_metadata
from volumed.bundle.train import LightningBundleTrainer
from volumed.data.phantoms import make_cohort, write_cohort
from volumed.encoders import create_encoder
from volumed.encoders.weights import load_encoder_weights
from volumed.tasks.pretrain_voco import (
    EncoderExport,
    VoCoDataModule,
    VoCoNet,
    VoCoPretrainModule,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# 16^3 crops need the deeper stages at stride 1 (the preset's weights keep their shapes).
TINY_STRIDES = [[2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]


def _workflow(**override):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(VOCO / "configs" / "train.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(VOCO), **override)


def test_train_only_layout_and_metadata():
    assert not (VOCO / "configs" / "inference.json").exists(), "a pretraining bundle predicts nothing"
    metadata = validate_metadata(VOCO)
    assert metadata["network_data_format"]["outputs"]["embedding"]["num_channels"] == 256
    assert "ships no weights" in metadata["intended_use"]
    assert not [p for p in (VOCO / "models").iterdir() if p.suffix in (".pt", ".safetensors", ".ckpt")]


def test_the_bundle_recipe_is_the_cpu_recipe():
    """configs/train.json and configs/pretrain_voco-cpu.yaml (what `volumed pretrain` runs) agree."""
    recipe = yaml.safe_load((REPO / "configs" / "pretrain_voco-cpu.yaml").read_text())
    train = json.loads((VOCO / "configs" / "train.json").read_text())
    module, data = train["train"]["module"], train["train"]["dataset"]
    assert train["encoder"] == recipe["model"]["encoder"]
    assert train["encoder_kwargs"] == recipe["model"]["encoder_kwargs"]
    for key in ("hidden_dim", "proj_dim", "teacher_momentum", "lr", "weight_decay", "warmup_steps"):
        assert module[key] == recipe["model"][key], key
    for key in ("crop_size", "grid", "num_random_crops", "batch_size", "num_workers", "ct_window", "samples_per_epoch",
                "val_samples_per_volume"):
        assert data[key] == recipe["data"][key], key
    assert train["max_steps"] == recipe["trainer"]["max_steps"]
    assert train["max_epochs"] * data["samples_per_epoch"] == recipe["trainer"]["max_steps"]
    assert train["datalist"].endswith("'/configs/pretrain_voco-cpu_datalist.json'")


def test_check_properties_on_the_real_bundle(tmp_path):
    workflow = _workflow(output_dir=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.trainer, LightningBundleTrainer)
    assert isinstance(workflow.train_dataset, VoCoDataModule)
    assert workflow.max_epochs == 5 and workflow.trainer.max_steps == 500
    assert (REPO / "configs" / "pretrain_voco-cpu_datalist.json").samefile(workflow.train_dataset.hparams.datalist)
    (export,) = [c for c in workflow.trainer.callbacks if isinstance(c, EncoderExport)]
    assert export.path == tmp_path / "encoder.pt"
    # network_def is the network being trained: the student (encoder + projector).
    assert isinstance(workflow.parser.get_parsed_content("network_def"), VoCoNet)
    assert workflow.parser.get_parsed_content("network_def") is workflow.trainer.module.student
    # The check is real: a required property left out is reported.
    broken = _workflow(output_dir=str(tmp_path))
    broken.parser.config["train"].pop("inferer")
    broken.initialize()
    with pytest.raises(KeyError, match="Property 'train_inferer'"):
        broken.check_properties()


def test_one_epoch_on_phantoms_exports_a_loadable_encoder(tmp_path):
    datalist = write_cohort(make_cohort(2, seed=3, shape=(48, 48, 32), spacing=(6.0, 6.0, 6.0)), tmp_path / "phantoms")
    workflow = _workflow(
        output_dir=str(tmp_path / "train"), datalist=str(datalist), device="cpu", max_epochs=1, max_steps=-1,
        encoder_kwargs={"strides": TINY_STRIDES},
        **{"train#dataset#crop_size": [16, 16, 16], "train#dataset#grid": 2, "train#dataset#num_random_crops": 2,
           "train#dataset#samples_per_epoch": 3, "train#dataset#val_samples_per_volume": 1,
           "train#module#hidden_dim": 32, "train#module#proj_dim": 32},
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    module: VoCoPretrainModule = workflow.trainer.module
    start = {k: v.clone() for k, v in module.student.encoder.state_dict().items()}
    (out,) = workflow.run()
    assert out == tmp_path / "train"
    assert workflow.trainer.trainer.global_step == 3 and int(module.teacher.n_averaged) == 3
    assert len(workflow.train_dataset.regions) == 2  # both phantoms read, as VoCo regions
    assert (out / "checkpoints" / "last.ckpt").is_file()
    trained = module.student.encoder.state_dict()
    assert [k for k, v in trained.items() if not torch.equal(v, start[k])], "one epoch changed no weight"

    # encoder.pt loads, strictly, into the registered preset (its default strides: same shapes).
    fresh = create_encoder("stunet_tiny")
    report = load_encoder_weights(fresh, out / "encoder.pt", strict=True)
    assert report.missing == [] and report.mismatched == []
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    # And the network embeds crops as the metadata says: (M, proj_dim).
    with torch.no_grad():
        assert module.student.eval()(torch.rand(2, 1, 16, 16, 16)).shape == (2, 32)
