"""configs/train.json: MONAI's ConfigWorkflow(workflow_type="train"), one epoch on phantoms, and
`volumed bundle new` turning the result into a bundle."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from bundle_helpers import PROMPTSEG

from volumed.bundle import load, read_metadata, sha256_file, validate_metadata, verify_hashes
from volumed.bundle.new import bump_version, new_bundle
from volumed.bundle.train import PromptSegBundleTrainer
from volumed.errors import ConfigError, OutputExistsError
from volumed.inference.package import load_package, read_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The phantom's whole field of view at 6 mm, 2 steps of 2 patches: one epoch in seconds.
PHANTOM = {
    "datalist": None,
    "train#dataset#phantom_cases": 1,
    "train#dataset#phantom_shape": [48, 48, 32],
    "train#dataset#phantom_spacing": [6.0, 6.0, 6.0],
    "train#dataset#phantom_terms": ["liver", "spleen"],
    "train#dataset#target_spacing": [6.0, 6.0, 6.0],
    "train#dataset#patch_size": [32, 32, 16],
    "train#dataset#batch_size": 2,
    "train#dataset#samples_per_epoch": 4,
    "max_epochs": 1,
    "device": "cpu",
}


def _workflow(bundle, **override):
    from monai.bundle import ConfigWorkflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / "train.json"), logging_file=False,
                              workflow_type="train", bundle_root=str(bundle), **override)


def test_train_config_check_properties_on_the_real_bundle(tmp_path):
    workflow = _workflow(PROMPTSEG, output_dir=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.trainer, PromptSegBundleTrainer)
    assert workflow.max_epochs == 1000
    # The recipe is the one the bundle's weights were trained with (models/config.json "training").
    recorded = read_config(PROMPTSEG / "models").training
    assert workflow.train_dataset.hparams.datalist.endswith(recorded["data"])
    assert workflow.trainer.max_steps == recorded["max_steps"]
    # The network trained is the bundle's architecture.
    assert workflow.trainer.module.model_config.encoder_kwargs == read_config(PROMPTSEG / "models").encoder_kwargs


def test_one_epoch_on_phantoms_then_bundle_new(tiny_bundle, tmp_path):
    workflow = _workflow(tiny_bundle, output_dir=str(tmp_path / "train"), **PHANTOM)
    workflow.initialize()
    assert workflow.check_properties() == []
    start = {k: v.clone() for k, v in workflow.trainer.module.net.state_dict().items()}
    (package,) = workflow.run()
    assert workflow.trainer.trainer.global_step == 2
    assert package == tmp_path / "train" / "package"
    trained, config = load_package(package)
    assert config.terms == ["liver", "spleen"]
    assert config.training["runner"] == "configs/train.json" and config.training["max_epochs"] == 1
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])]
    assert changed, "one epoch changed no weight"

    # A complete bundle from the package, in one call.
    base = read_metadata(tiny_bundle)["version"]
    v1, v2 = bump_version(base), bump_version(bump_version(base))
    made = new_bundle(package, "phantom_seg", bundles_dir=tmp_path / "bundles", base=tiny_bundle, changelog="phantom epoch")
    root = tmp_path / "bundles" / "phantom_seg"
    assert made.path == root and made.version == v1 and made.terms == ("liver", "spleen")
    metadata = validate_metadata(root)
    assert metadata["changelog"][v1] == "phantom epoch" and base in metadata["changelog"]
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "liver", "1": "spleen"}
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    infer = json.loads((root / "configs" / "inference.json").read_text())
    assert infer["displayable_configs"]["prompts"] == ["liver", "spleen"]
    assert [r.sha256 for r in verify_hashes(root)] == [made.sha256]
    bundle = load(root)
    assert all(torch.equal(bundle.network.state_dict()[k], v) for k, v in trained.state_dict().items())
    assert not list((tmp_path / "bundles").glob(".*"))  # no staging left behind
    # Its README is the base's text, headed by what this bundle is (the text below is the base's).
    readme = (root / "docs" / "README.md").read_text()
    base_readme = (tiny_bundle / "docs" / "README.md").read_text()
    assert readme.startswith("<!-- volumed bundle new: provenance -->") and readme.endswith(base_readme)
    head = readme[: len(readme) - len(base_readme)]
    assert f"# phantom_seg {v1}" in head and f"`{tiny_bundle.name}` {base}" in head and "phantom epoch" in head
    assert "not the ones the text below describes" in head and "liver, spleen" in head

    # The Lightning checkpoint of the same run (+ the package's config) gives the same weights.
    again = new_bundle(tmp_path / "train" / "checkpoints" / "last.ckpt", "from_ckpt", bundles_dir=tmp_path / "bundles",
                       base=tiny_bundle, config=package / "config.json")
    assert again.sha256 == made.sha256

    # Updating a bundle bumps its version again; without overwrite it is refused.
    with pytest.raises(OutputExistsError, match="bundle exists already"):
        new_bundle(package, "phantom_seg", bundles_dir=tmp_path / "bundles", base=tiny_bundle)
    updated = new_bundle(package, "phantom_seg", bundles_dir=tmp_path / "bundles", overwrite=True)
    assert updated.version == v2 and list(read_metadata(root)["changelog"])[:2] == [v2, v1]
    readme = (root / "docs" / "README.md").read_text()  # one header, the new version's: not stacked
    assert readme.count("<!-- volumed bundle new: provenance -->") == 1 and f"# phantom_seg {v2}" in readme
    assert f"`{tiny_bundle.name}` {base}" in readme and readme.endswith(base_readme)  # still the first base's text


def test_bundle_new_refuses_bad_requests(tiny_bundle, tmp_path):
    with pytest.raises(ConfigError, match="unknown bundle task 'caption'; available: clip, ground, promptseg, report"):
        new_bundle(tiny_bundle / "models", "x", task="caption", bundles_dir=tmp_path, base=tiny_bundle)
    with pytest.raises(ConfigError, match="bundle name must be letters"):
        new_bundle(tiny_bundle / "models", "../x", bundles_dir=tmp_path, base=tiny_bundle)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        new_bundle(tmp_path / "missing.ckpt", "x", bundles_dir=tmp_path, base=tiny_bundle)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((tiny_bundle / "models" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="needs the package config.json of its network"):
        new_bundle(weights, "x", bundles_dir=tmp_path, base=tiny_bundle)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    assert bump_version("1.4.2") == "1.5.0"


def test_bundle_new_names_a_lora_training_checkpoint(tiny_bundle, tmp_path):
    """The best.ckpt of a `volumed finetune --method lora` run holds the adapters unmerged: one
    clear line pointing to the merged package, not a list of 'missing' and 'unexpected' keys."""
    from volumed.tasks.finetune import apply_method

    net = load_package(tiny_bundle / "models")[0]
    apply_method(net, "lora", lora_rank=2)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    with pytest.raises(ConfigError, match=r"best.ckpt: the checkpoint holds LoRA adapters not merged .*<work-dir>/package"):
        new_bundle(ckpt, "x", bundles_dir=tmp_path, base=tiny_bundle, config=tiny_bundle / "models" / "config.json")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))

def test_cli_bundle_new(tiny_bundle, tmp_path, capsys):
    from volumed.cli import main

    try:
        main(["bundle", "new", "--from-checkpoint", str(tiny_bundle / "models"), "--task", "promptseg", "copy",
              "--bundles-dir", str(tmp_path), "--base", str(tiny_bundle), "--changelog", "same weights"])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'copy'}: version {bump_version(read_metadata(tiny_bundle)['version'])}" in out
    assert sha256_file(tmp_path / "copy" / "models" / "model.safetensors") in out


def test_bundle_new_updates_a_bundle_in_place_after_retraining(tiny_bundle):
    """Retraining writes models/ of the bundle itself; one command then records the new weights,
    bumps the version and makes the labels the package's terms."""
    (tiny_bundle / "models" / "model.safetensors").write_bytes(
        (tiny_bundle / "models" / "model.safetensors").read_bytes())  # same weights, as a retrain would rewrite them
    bumped = bump_version(read_metadata(tiny_bundle)["version"])
    made = new_bundle(tiny_bundle / "models", tiny_bundle.name, bundles_dir=tiny_bundle.parent, overwrite=True,
                      changelog="retrained")
    assert made.path == tiny_bundle and made.version == bumped
    assert read_metadata(tiny_bundle)["changelog"][bumped] == "retrained"
    assert [r.sha256 for r in verify_hashes(tiny_bundle)] == [made.sha256]
    assert load(tiny_bundle).version == bumped
