"""bundles/volumed_ground_ct (issue 17, the grounding head as a MONAI bundle): MONAI's runner,
MONAI's checks, MONAI Label's keys, train.json, and `volumed run` = `python -m monai.bundle run`.

Fast tests use the tiny ground bundle (the real configs around a tiny untrained grounding
package); the real bundle's network, weights and hash are checked where that is cheap, and the
test marked realdata runs the real bundle on the real CT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import GROUND, REPO, default_findings, tiny_ground_bundle
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.inferers import SlidingWindowInferer

from volumed.bundle import load, read_metadata, validate_metadata, verify_hashes
from volumed.bundle.ground import FixedFindingGrounder, GroundingRunner, finding_embeddings, read_grounding_config
from volumed.bundle.metadata import channel_names
from volumed.bundle.run import run_bundle
from volumed.errors import ConfigError, WeightsLoadError
from volumed.heads.grounding import load_grounding_package
from volumed.inference.ground import ground

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI warns that configs run code

FINDINGS = ["12 mm nodule in the right lower lobe", "No pleural effusion.", "A cyst in the liver"]


@pytest.fixture
def tiny_ground(tmp_path):
    return tiny_ground_bundle(tmp_path)


def _workflow(bundle, config="inference.json", workflow_type="infer", **override) -> ConfigWorkflow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / config), logging_file=False,
                              workflow_type=workflow_type, bundle_root=str(bundle), **override)


def _same_outputs(a, b):
    """Masks of two output folders are identical (voxels and affine), and so are the records."""
    ja, jb = (json.loads((d / "grounding.json").read_text()) for d in (a, b))
    masks = [f["mask"] for f in ja["findings"] if f["mask"]]
    assert masks == [f["mask"] for f in jb["findings"] if f["mask"]]
    for rel in masks:
        x, y = nib.load(a / rel), nib.load(b / rel)
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), rel
        assert np.array_equal(x.affine, y.affine), rel
    keys = ("sentence", "negated", "mask", "found", "confidence", "volume_ml", "instances", "location")
    assert [{k: f[k] for k in keys} for f in ja["findings"]] == [{k: f[k] for k in keys} for f in jb["findings"]]
    return ja


def test_layout_metadata_and_monai_label_keys():
    validate_metadata(GROUND)
    for name in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json", "docs/README.md",
                 "models/config.json", "models/grounding.json", "models/model.safetensors", "large_files.yml"):
        assert (GROUND / name).is_file(), name
    config = json.loads((GROUND / "configs" / "inference.json").read_text())
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "displayable_configs", "bundle_root",
                "device", "dataset_dir", "dataset", "evaluator", "input_image", "output_dir", "findings", "report"):
        assert key in config, key
    assert config["dataset"]["transform"] == "@preprocessing"
    assert config["evaluator"]["postprocessing"] == "@postprocessing"
    assert config["evaluator"]["inferer"] == "@inferer"
    assert config["findings"] == "@displayable_configs#findings"
    # MONAI Label's label names: the pred output's channel_def, the default findings in order.
    assert channel_names(read_metadata(GROUND)) == default_findings()
    assert read_metadata(GROUND)["network_data_format"]["outputs"]["pred"]["num_channels"] == len(default_findings())
    assert config["preprocessing"]["transforms"][0]["_target_"] == "volumed.bundle.transforms.LoadVolumed"
    assert [t["_target_"] for t in config["preprocessing"]["transforms"][1:]] == [
        "EnsureTyped", "Orientationd", "Spacingd", "CropForegroundd", "ScaleIntensityRanged"]
    assert config["inferer"]["_target_"] == "SlidingWindowInferer"


def test_the_weights_are_committed_small_and_recorded():
    """9 MB: under the 25 MB limit, so committed, with url '' and its sha256 in large_files.yml."""
    weights = GROUND / "models" / "model.safetensors"
    assert weights.stat().st_size < 25 * 1024 * 1024
    (record,) = verify_hashes(GROUND)
    assert record.path == "models/model.safetensors"


def test_config_workflow_infer_check_properties(tiny_ground):
    workflow = _workflow(tiny_ground, input_image="unused.nii.gz")
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.evaluator, GroundingRunner)
    assert isinstance(workflow.inferer, SlidingWindowInferer)
    assert workflow.evaluator.postprocessing is workflow.postprocessing
    assert workflow.dataset.transform is workflow.preprocessing
    meta = read_metadata(tiny_ground)
    assert workflow.version == meta["version"] and workflow.monai_version == meta["monai_version"]
    assert tuple(workflow.inferer.roi_size) == (64, 64, 16)  # the tiny package's window, not the real one's
    assert list(workflow.channel_def.values()) == default_findings()
    assert workflow.evaluator.findings == default_findings()


def test_monai_run_writes_what_volumed_ground_writes(tiny_ground, ts_dir, tmp_path):
    """MONAI's run() with --findings overridden, against volumed ground on the same package, and
    volumed run (volumed.bundle.run) on the same bundle."""
    from monai.bundle import run

    image = ts_dir / "example_ct_sm.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(tiny_ground / "configs" / "inference.json"), logging_file=False,
            bundle_root=str(tiny_ground), input_image=str(image), output_dir=str(tmp_path / "bundle"),
            findings=FINDINGS, device="cpu")
    ground(image, FINDINGS, model_dir=tiny_ground / "models", out_dir=tmp_path / "ground")
    doc = _same_outputs(tmp_path / "bundle", tmp_path / "ground")
    assert [f["negated"] for f in doc["findings"]] == [False, True, False]
    assert any(f["found"] for f in doc["findings"])  # the untrained tiny model marks voxels: the comparison compares something
    (result,) = run_bundle(tiny_ground, image, tmp_path / "run", findings=FINDINGS, device="cpu")
    assert [f["sentence"] for f in result.findings] == FINDINGS
    _same_outputs(tmp_path / "bundle", tmp_path / "run")
    source, mask = nib.load(image), nib.load(tmp_path / "bundle" / "masks" / "finding_01.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_postprocessing_threshold_and_report_are_config_ids(tiny_ground, ts_dir, tmp_path):
    image = ts_dir / "example_ct_sm.nii.gz"
    report = tmp_path / "report.txt"
    report.write_text("There is a 12 mm nodule in the right lower lobe. No pleural effusion. The spleen is normal.")
    (low,) = run_bundle(tiny_ground, image, tmp_path / "report", report=report, device="cpu")
    assert [(f["sentence"], f["negated"]) for f in low.findings] == [
        ("There is a 12 mm nodule in the right lower lobe.", False), ("No pleural effusion.", True)]
    workflow = _workflow(tiny_ground, input_image=str(image), output_dir=str(tmp_path / "t"), findings=FINDINGS[:1],
                         **{"displayable_configs#threshold": 0.99, "print_summary": False})
    workflow.initialize()
    (high,) = workflow.run()[0]
    doc = json.loads(high.grounding_json.read_text())
    assert doc["threshold"] == 0.99
    assert high.findings[0]["volume_ml"] <= low.findings[0]["volume_ml"]


def test_changed_weights_are_refused_by_both_runners(tiny_ground, ts_dir, tmp_path):
    with pytest.raises(ConfigError, match="no input image: pass --input_image PATH"):
        run_bundle(tiny_ground, "", tmp_path / "out", findings=FINDINGS)
    weights = tiny_ground / "models" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    image = ts_dir / "example_ct_sm.nii.gz"
    with pytest.raises(WeightsLoadError, match="model.safetensors: sha256 mismatch"):
        run_bundle(tiny_ground, image, tmp_path / "out", findings=FINDINGS)
    with pytest.raises(WeightsLoadError, match="sha256 mismatch"):
        load(tiny_ground)
    workflow = _workflow(tiny_ground, input_image=str(image), output_dir=str(tmp_path / "o"))
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:
        workflow.run()
    cause = err.value
    while cause is not None and not isinstance(cause, WeightsLoadError):
        cause = cause.__cause__
    assert cause is not None and "sha256 mismatch" in str(cause)
    assert not (tmp_path / "o").exists()


def test_verify_net_in_out_with_text_inputs():
    """On the real bundle's network (architecture from models/) and metadata; the text inputs
    (sentence, location, has_location) are extra_forward_args."""
    config, meta = (str(GROUND / "configs" / n) for n in ("inference.json", "metadata.json"))
    text = finding_embeddings(GROUND / "models", default_findings())
    n = len(default_findings())
    assert text["sentence"].shape == text["location"].shape == (n, 384) and text["has_location"].all()
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=1,
                      extra_forward_args=text, bundle_root=str(GROUND))
    one = {k: v[:1] for k, v in text.items()}
    with pytest.raises(ValueError, match=f"output channel number `1` doesn't match: `{n}`"):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu",
                          extra_forward_args=one, bundle_root=str(GROUND))
    with pytest.raises(ConfigError, match="negated sentences are never grounded"):
        finding_embeddings(GROUND / "models", ["No pleural effusion."])


def test_the_real_bundle_loads_checked_weights():
    """The real workflow instantiates (its weights pass the sha256 check) and carries the package's weights;
    volumed.bundle.load builds the grounding network for it."""
    workflow = _workflow(GROUND, input_image="unused.nii.gz")
    workflow.initialize()
    assert workflow.check_properties() == []
    reference, config, grounding = load_grounding_package(GROUND / "models")
    assert tuple(workflow.inferer.roi_size) == tuple(config.patch_size)
    loaded = workflow.evaluator.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    bundle = load(GROUND)
    assert type(bundle.network).__name__ == "GroundingModel"
    assert grounding.training["max_steps"] > 0 and "volumed train ground" in grounding.training["command"]


def test_ckpt_export_torchscript_of_the_default_findings(tiny_ground, tmp_path):
    """ckpt_export traces export_network_def (the network with the default findings frozen in) at
    the metadata's window size; the export gives the network's logits."""
    network, _, _ = load_grounding_package(tiny_ground / "models")
    ckpt = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(net_id="export_network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                    meta_file=str(tiny_ground / "configs" / "metadata.json"),
                    config_file=str(tiny_ground / "configs" / "inference.json"), bundle_root=str(tiny_ground),
                    use_trace=True)
    extra = {"metadata.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == read_metadata(tiny_ground)["version"]
    window = [int(str(e).split("*")[0]) for e in read_metadata(tiny_ground)["network_data_format"]["inputs"]["image"]["spatial_shape"]]
    image = torch.rand(1, 1, *window)
    text = finding_embeddings(tiny_ground / "models", default_findings())
    with torch.no_grad():
        want = network(image, **text)
        got = exported(image)
    assert got.shape == (1, len(default_findings()), *window)
    assert torch.allclose(got, want, atol=1e-5)
    fixed = FixedFindingGrounder(network, **text)
    assert set(fixed.state_dict()) == set(network.state_dict())


# ------------------------------------------------------------------------------------ train.json

# Two phantom cases at 6 mm, 2 steps of one patch: one epoch in seconds.
PHANTOM = {
    "phantoms": 2,
    "init_weights": None,
    "train#dataset#phantom_shape": [48, 48, 32],
    "train#dataset#phantom_spacing": [6.0, 6.0, 6.0],
    "train#dataset#samples_per_epoch": 2,
    "train#dataset#batch_size": 1,
    "max_epochs": 1,
    "max_steps": -1,
    "device": "cpu",
}


def test_train_config_check_properties_on_the_real_bundle(tmp_path):
    import yaml

    workflow = _workflow(GROUND, "train.json", "train", output_dir=str(tmp_path))
    workflow.initialize()
    assert workflow.check_properties() == []
    recorded = read_grounding_config(GROUND / "models").training
    assert workflow.trainer.max_steps == recorded["max_steps"]
    assert workflow.trainer.module.hparams.lr == recorded["lr"]
    # The recipe is configs/train_ground-cpu.yaml's (what the weights were trained with).
    recipe = yaml.safe_load((REPO / "configs" / "train_ground-cpu.yaml").read_text())
    module, data = workflow.trainer.module.hparams, workflow.train_dataset.hparams
    for key in ("sentence_weight", "gate_kernel", "pos_weight", "warmup_steps", "encoder", "encoder_kwargs", "decoder_kwargs"):
        assert module[key] == recipe["model"][key], key
    for key in ("phantoms", "phantom_seed", "phantom_anatomy", "phantom_shape", "phantom_spacing", "target_spacing", "crop_foreground",
                "patch_size", "batch_size", "fg_rate", "queries_per_patch", "samples_per_epoch"):
        assert list(data[key]) == list(recipe["data"][key]) if isinstance(data[key], (list, tuple)) else data[key] == recipe["data"][key], key
    assert module["init_weights"].endswith("volumed_promptseg_ct/models/model.safetensors")


def test_one_epoch_on_phantoms_then_bundle_new(tiny_ground, tmp_path):
    from volumed.bundle.new import bump_version, new_bundle

    workflow = _workflow(tiny_ground, "train.json", "train", output_dir=str(tmp_path / "train"), **PHANTOM)
    workflow.initialize()
    assert workflow.check_properties() == []
    start = {k: v.clone() for k, v in workflow.trainer.module.net.state_dict().items()}
    (package,) = workflow.run()
    assert workflow.trainer.trainer.global_step == 2
    assert package == tmp_path / "train" / "package"
    trained, _, grounding = load_grounding_package(package)
    assert grounding.training["runner"] == "configs/train.json" and grounding.training["max_epochs"] == 1
    assert [k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])], "one epoch changed no weight"

    base = read_metadata(tiny_ground)["version"]
    made = new_bundle(package, "phantom_ground", task="ground", bundles_dir=tmp_path / "bundles", base=tiny_ground,
                      changelog="phantom epoch")
    root = tmp_path / "bundles" / "phantom_ground"
    assert made.version == bump_version(base)
    metadata = validate_metadata(root)
    assert metadata["changelog"][made.version] == "phantom epoch"
    # The label names are the default findings, not the package's location terms.
    assert channel_names(metadata) == default_findings()
    assert (root / "models" / "grounding.json").is_file()
    assert [r.sha256 for r in verify_hashes(root)] == [made.sha256]
    bundle = load(root)
    assert all(torch.equal(bundle.network.state_dict()[k], v) for k, v in trained.state_dict().items())
    # The Lightning checkpoint (+ the package's config.json, grounding.json beside it) gives the same weights.
    again = new_bundle(tmp_path / "train" / "checkpoints" / "last.ckpt", "from_ckpt", task="ground",
                       bundles_dir=tmp_path / "bundles", base=tiny_ground, config=package / "config.json")
    assert again.sha256 == made.sha256


# ------------------------------------------------------------------------------------ the real CT


@pytest.mark.realdata
def test_python_m_monai_bundle_run_on_the_real_ct_equals_volumed_run(ts_dir, tmp_path, capsys):
    """The command of issue 17 on the real bundle and the real CT, as a user types it, against
    `volumed run` and `volumed ground --model bundles/volumed_ground_ct/models`."""
    from volumed.cli import main

    image = ts_dir / "example_ct_sm.nii.gz"
    # The same torch thread count as this process (tests/conftest.py): with another, the sums of the
    # stride-1 level run in another order and the confidences differ in their last bits.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(GROUND / "configs" / "inference.json"),
           "--bundle_root", str(GROUND), "--input_image", str(image), "--output_dir", str(tmp_path / "bundle"),
           "--findings", "['12 mm nodule in the right lower lobe','No pleural effusion.','A cyst in the liver']",
           "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "negated: 'No pleural effusion.' (no mask)" in done.stdout
    args = ["run", str(GROUND), str(image), "-o", str(tmp_path / "run"), "--device", "cpu"]
    for f in FINDINGS:
        args += ["-f", f]
    try:
        main(args)
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    _same_outputs(tmp_path / "bundle", tmp_path / "run")
    ground(image, FINDINGS, model_dir=GROUND / "models", out_dir=tmp_path / "ground")
    _same_outputs(tmp_path / "bundle", tmp_path / "ground")
    source = nib.load(image)
    for rel in ("finding_01.nii.gz", "finding_02.nii.gz"):
        mask = nib.load(tmp_path / "bundle" / "masks" / rel)
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)


def test_volumed_run_cli_report_and_findings(tiny_ground, ts_dir, tmp_path, capsys):
    """`volumed run BUNDLE IMAGE -f ... --report FILE`: the sentences, then the report's finding clauses."""
    from volumed.cli import main

    report = tmp_path / "report.txt"
    report.write_text("No pleural effusion. A 16 mm hypodense lesion in the right liver lobe.")
    try:
        main(["run", str(tiny_ground), str(ts_dir / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "out"),
              "-f", "12 mm nodule in the right lower lobe", "--report", str(report), "--device", "cpu"])
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "negated: 'No pleural effusion.' (no mask)" in out and "wrote" in out
    doc = json.loads((tmp_path / "out" / "grounding.json").read_text())
    assert [f["sentence"] for f in doc["findings"]] == ["12 mm nodule in the right lower lobe", "No pleural effusion.",
                                                        "A 16 mm hypodense lesion in the right liver lobe."]
