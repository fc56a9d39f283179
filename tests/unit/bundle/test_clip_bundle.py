"""bundles/volumed_clip_ct (issue 17, the CT-CLIP head as a MONAI bundle): MONAI's runner, MONAI's
checks, MONAI Label's keys, train.json, and `volumed run` = `python -m monai.bundle run` =
`volumed classify`.

The network is small (0.7 MB), so most tests use the real bundle; the tiny CLIP bundle (the real
configs around an untrained package of the same architecture) is for changing weights and training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from bundle_helpers import CLIP, REPO, clip_default_findings, tiny_clip_bundle
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out

from volumed.bundle import load, read_metadata, validate_metadata, verify_hashes
from volumed.bundle.clip import ClipRunner, FixedPromptCLIP, TileEmbeddingInferer, ZeroShotPostprocessing, prompt_embeddings
from volumed.bundle.metadata import channel_names
from volumed.bundle.run import run_bundle
from volumed.data.transforms import PreprocessConfig, build_preprocessing, preprocess
from volumed.errors import ConfigError, WeightsLoadError
from volumed.heads.clip import load_clip_package, read_clip_config
from volumed.inference.classify import classify
from volumed.io import read_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FINDINGS = ["Lung nodule", "Pleural effusion", "Liver cyst"]


@pytest.fixture
def tiny_clip(tmp_path):
    return tiny_clip_bundle(tmp_path)


def _workflow(bundle, config="inference.json", workflow_type="infer", **override) -> ConfigWorkflow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / config), logging_file=False,
                              workflow_type=workflow_type, bundle_root=str(bundle), **override)


def _scores(path):
    doc = json.loads(path.read_text())
    return [(f["finding"], f["probability"], f["present_prompt"], f["absent_prompt"], f["source"]) for f in doc["findings"]], doc


def test_layout_metadata_and_monai_label_keys():
    validate_metadata(CLIP)
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json", "docs/README.md",
                 "models/clip.json", "models/model.safetensors", "large_files.yml"):
        assert (CLIP / name).is_file(), name
    config = json.loads((CLIP / "configs" / "inference.json").read_text())
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "displayable_configs", "bundle_root",
                "device", "dataset_dir", "dataset", "evaluator", "input_image", "output_dir", "findings"):
        assert key in config, key
    assert config["dataset"]["transform"] == "@preprocessing"
    assert config["evaluator"]["postprocessing"] == "@postprocessing"
    assert config["evaluator"]["inferer"] == "@inferer"
    assert config["findings"] == "@displayable_configs#findings"
    # Label names (channel_def of pred): the default abnormalities' prompt pairs, present ones first.
    findings = clip_default_findings()
    assert findings == read_clip_config(CLIP / "models").findings
    assert channel_names(read_metadata(CLIP)) == [f"{f} is present." for f in findings] + [f"{f} is not present." for f in findings]
    (record,) = verify_hashes(CLIP)
    assert (CLIP / record.path).stat().st_size < 25 * 1024 * 1024


def test_config_preprocessing_is_the_package_preprocessing(ts_dir):
    """The MONAI Compose of inference.json gives the model-space image of volumed classify."""
    workflow = _workflow(CLIP, input_image=str(ts_dir / "example_ct_sm.nii.gz"))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.evaluator, ClipRunner)
    assert isinstance(workflow.inferer, TileEmbeddingInferer) and isinstance(workflow.postprocessing, ZeroShotPostprocessing)
    assert workflow.inferer.roi_size == tuple(read_clip_config(CLIP / "models").input_size)
    item = workflow.dataset[0]
    settings = read_clip_config(CLIP / "models").preprocessing
    reference = preprocess(read_volume(ts_dir / "example_ct_sm.nii.gz"), None, PreprocessConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})).image
    assert torch.equal(item["image"].as_tensor(), reference.as_tensor())
    steps = [type(t).__name__ for t in workflow.preprocessing.transforms[1:]]
    assert steps == [type(t).__name__ for t in build_preprocessing(PreprocessConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})).transforms]


def test_verify_net_in_out_with_text_and_ckpt_export(tmp_path):
    config, meta = (str(CLIP / "configs" / n) for n in ("inference.json", "metadata.json"))
    text = prompt_embeddings(CLIP / "models", clip_default_findings())
    n = 2 * len(clip_default_findings())
    assert text.shape == (n, 384)
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=1,
                      extra_forward_args={"text": text}, bundle_root=str(CLIP))
    with pytest.raises(ValueError, match=f"output channel number `2` doesn't match: `{n}`"):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu",
                          extra_forward_args={"text": text[:2]}, bundle_root=str(CLIP))
    # TorchScript by tracing export_network_def (the prompts frozen in), from a plain checkpoint.
    network, _ = load_clip_package(CLIP / "models")
    ckpt = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(net_id="export_network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                    meta_file=meta, config_file=config, bundle_root=str(CLIP), use_trace=True)
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    image = torch.rand(1, 1, 32, 32, 24)
    with torch.no_grad():
        assert torch.allclose(exported(image), network(image, text), atol=1e-5)
    assert set(FixedPromptCLIP(network, text).state_dict()) == set(network.state_dict())


def test_monai_run_volumed_run_and_volumed_classify_agree(ts_dir, tmp_path):
    """On the real CT: MONAI's run() with --findings, volumed run -f, and volumed classify give the
    same scores (and the real bundle's workflow loads sha256-checked weights)."""
    from monai.bundle import run

    image = ts_dir / "example_ct_sm.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(CLIP / "configs" / "inference.json"), logging_file=False, bundle_root=str(CLIP),
            input_image=str(image), output_dir=str(tmp_path / "bundle"), findings=FINDINGS, device="cpu")
    got, doc = _scores(tmp_path / "bundle" / "classification.json")
    (result,) = run_bundle(CLIP, image, tmp_path / "run", findings=FINDINGS, device="cpu")
    assert _scores(tmp_path / "run" / "classification.json")[0] == got
    assert result.summary()[-1] == f"wrote {tmp_path / 'run' / 'classification.json'}"
    classify(image, ["Liver cyst"], model_dir=CLIP / "models", output=tmp_path / "classify.json")
    want, ref = _scores(tmp_path / "classify.json")
    assert got == want
    # 2 x 2 x 1 tiles of 80 x 64 x 48 (the 30 slices are padded to 48), as the package says.
    assert doc["embedding"] == ref["embedding"] == {"tiles": 4, "model_shape": [122, 101, 30], "input_size": [80, 64, 48]}
    assert type(load(CLIP).network).__name__ == "VolumeTextCLIP"


@pytest.mark.realdata
def test_python_m_monai_bundle_run_on_the_real_ct(ts_dir, tmp_path):
    """The command of issue 17 as a user types it."""
    image = ts_dir / "example_ct_sm.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CLIP / "configs" / "inference.json"),
           "--bundle_root", str(CLIP), "--input_image", str(image), "--output_dir", str(tmp_path / "bundle"),
           "--findings", "['Lung nodule','Liver cyst']", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    classify(image, ["Liver cyst"], model_dir=CLIP / "models", output=tmp_path / "classify.json")
    got = {f[0]: f[1] for f in _scores(tmp_path / "bundle" / "classification.json")[0]}
    want = {f[0]: f[1] for f in _scores(tmp_path / "classify.json")[0]}
    assert got == {k: want[k] for k in ("Lung nodule", "Liver cyst")}


def test_changed_weights_and_bad_input_are_refused(tiny_clip, ts_dir, tmp_path):
    image = ts_dir / "example_ct_sm.nii.gz"
    with pytest.raises(ConfigError, match="no input image"):
        run_bundle(tiny_clip, "", tmp_path / "out")
    with pytest.raises(ConfigError, match="empty finding name"):
        run_bundle(tiny_clip, image, tmp_path / "out", findings=["Lung nodule", " "])
    weights = tiny_clip / "models" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsLoadError, match="model.safetensors: sha256 mismatch"):
        run_bundle(tiny_clip, image, tmp_path / "out")
    workflow = _workflow(tiny_clip, input_image=str(image), output_dir=str(tmp_path / "o"))
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:
        workflow.run()
    cause = err.value
    while cause is not None and not isinstance(cause, WeightsLoadError):
        cause = cause.__cause__
    assert cause is not None and "sha256 mismatch" in str(cause)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ train.json

PHANTOM = {"train#dataset#phantom_cases": 4, "train#dataset#phantom_val_cases": 4, "train#dataset#batch_size": 2,
           "max_epochs": 1, "max_steps": -1, "device": "cpu"}


def test_train_config_is_the_cpu_recipe(tmp_path):
    import yaml

    workflow = _workflow(CLIP, "train.json", "train", output_dir=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []
    recorded = read_clip_config(CLIP / "models").training
    assert workflow.trainer.max_steps == recorded["max_steps"]
    recipe = yaml.safe_load((REPO / "configs" / "train_clip-cpu.yaml").read_text())
    module, data = workflow.trainer.module.hparams, workflow.train_dataset.hparams
    for key in ("encoder", "embed_dim", "text_hidden", "findings", "lr", "warmup_steps", "pooling"):
        assert (list(module[key]) if key == "findings" else module[key]) == recipe["model"][key], key
    assert module["encoder_kwargs"] == recipe["model"].get("encoder_kwargs", {})
    assert module["negated"] == data["negated"] == recipe["data"]["negated"]
    for key in ("phantom_cases", "phantom_val_cases", "phantom_seed", "phantom_shape", "phantom_spacing",
                "phantom_field_of_view", "min_nodule_mm", "input_size", "ct_window", "batch_size"):
        value = list(data[key]) if isinstance(data[key], (list, tuple)) else data[key]
        assert value == recipe["data"][key], key


def test_one_epoch_on_phantoms_then_bundle_new(tiny_clip, tmp_path):
    from volumed.bundle.new import new_bundle

    workflow = _workflow(tiny_clip, "train.json", "train", output_dir=str(tmp_path / "train"), **PHANTOM)
    workflow.initialize()
    assert workflow.check_properties() == []
    start = {k: v.clone() for k, v in workflow.trainer.module.net.state_dict().items()}
    (package,) = workflow.run()
    assert workflow.trainer.trainer.global_step == 2
    trained, config = load_clip_package(package)
    assert config.training["runner"] == "configs/train.json"
    assert [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])], "one epoch changed no weight"
    made = new_bundle(package, "phantom_clip", task="clip", bundles_dir=tmp_path / "bundles", base=tiny_clip,
                      changelog="phantom epoch")
    root = tmp_path / "bundles" / "phantom_clip"
    assert validate_metadata(root)["changelog"][made.version] == "phantom epoch"
    assert channel_names(read_metadata(root)) == channel_names(read_metadata(CLIP))
    bundle = load(root)
    assert all(torch.equal(bundle.network.state_dict()[k], v) for k, v in trained.state_dict().items())
    again = new_bundle(tmp_path / "train" / "checkpoints" / "last.ckpt", "from_ckpt", task="clip",
                       bundles_dir=tmp_path / "bundles", base=tiny_clip, config=package / "clip.json")
    assert again.sha256 == made.sha256
