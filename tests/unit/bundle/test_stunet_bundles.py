"""The STU-Net bundles (bundles/volumed_stunet_{s,b,l,h}_ct): plain multi-class segmentation.

They ship configs only (no trained weights exist for any size yet), so the tests cover what truly
runs: the layout and labels of every size, MONAI's verify_net_in_out (S and B on the CPU; L and H,
440 M and 1.46 B parameters, on PyTorch's meta device, which computes shapes without memory),
ConfigWorkflow's property checks for inference and training, the refusal to run without weights,
and for the smallest size one training epoch on phantoms whose weights then run through
inference.json on the real CT, landing on its grid."""

from __future__ import annotations

import json
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import BUNDLES
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out

from volumed.bundle.integrity import record_hashes
from volumed.bundle.metadata import channel_names, read_metadata
from volumed.bundle.multiclass import MultiClassRunner
from volumed.bundle.run import run_bundle
from volumed.bundle.train import LightningBundleTrainer
from volumed.errors import ConfigError
from volumed.tasks.multiclass_seg import (
    MultiClassSegDataModule,
    MultiClassSegModule,
    class_lookup,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZES = {"s": 14.55e6, "b": 58.17e6, "l": 440.13e6, "h": 1457.06e6}  # parameters at 16 output channels
ON_CPU = {"s", "b"}  # L and H are checked on the meta device (1.8 GB and 5.8 GB of float32 weights)


def _bundle(size: str):
    return BUNDLES / f"volumed_stunet_{size}_ct"


def _workflow(bundle, kind: str, **override) -> ConfigWorkflow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / f"{kind}.json"), logging_file=False,
                              workflow_type="infer" if kind == "inference" else "train", bundle_root=str(bundle), **override)


@pytest.mark.parametrize("size", SIZES)
def test_configs_agree_and_say_they_ship_no_weights(size):
    bundle = _bundle(size)
    infer, train = (json.loads((bundle / "configs" / f"{n}.json").read_text()) for n in ("inference", "train"))
    metadata = read_metadata(bundle)
    assert infer["preset"] == train["preset"] == f"stunet_{size}"
    for key in ("classes", "target_spacing", "ct_window", "margin", "patch_size"):
        assert infer[key] == train[key], key
    # MONAI Label's labels: channel_def of pred is background + the classes, in channel order.
    assert channel_names(metadata) == ["background", *infer["classes"]]
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == len(infer["classes"]) + 1
    class_lookup(infer["classes"])  # every class has a label id, no two share one
    # Honest about the weights: none shipped, none recorded, and the metadata says so.
    assert not [p for p in (bundle / "models").iterdir() if p.suffix in (".pt", ".safetensors", ".ckpt")]
    assert not (bundle / "large_files.yml").exists()
    assert "ships no weights" in metadata["intended_use"].lower() and "configs only" in metadata["description"].lower()
    assert "configs only" in (bundle / "docs" / "README.md").read_text()


@pytest.mark.parametrize("size", SIZES)
def test_verify_net_in_out(size):
    bundle = _bundle(size)
    args = dict(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), n=1)
    if size in ON_CPU:
        verify_net_in_out(device="cpu", **args)
    else:
        with torch.device("meta"):  # builds and runs the network without allocating its weights
            verify_net_in_out(device="meta", **args)
    with torch.device("meta"):  # the parameter count of the config's network, for free
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        network = parser.get_parsed_content("network_def")
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(SIZES[size], rel=1e-3)
    # The check is real: a metadata promising other channels is refused.
    if size == "s":
        with pytest.raises(ValueError, match="output channel number `16` doesn't match: `3`"):
            verify_net_in_out(device="cpu", **{**args, "_meta_#network_data_format#outputs#pred#num_channels": 3})


@pytest.mark.parametrize("size", SIZES)
def test_check_properties_infer_and_train(size, tmp_path):
    """check_properties instantiates every required property, the network included: with no weights
    to load, ``network`` is the untrained ``network_def`` here, and everything is built on the meta
    device (no memory for L's and H's weights)."""
    bundle = _bundle(size)
    with torch.device("meta"):
        infer = _workflow(bundle, "inference", input_image="unused.nii.gz", network="@network_def")
        infer.initialize()
        assert infer.check_properties() == []
        assert isinstance(infer.evaluator, MultiClassRunner)
        assert tuple(infer.inferer.roi_size) == (128, 128, 128)
        classes = json.loads((bundle / "configs" / "inference.json").read_text())["classes"]
        assert list(infer.channel_def.values()) == ["background", *classes]
        assert infer.evaluator.classes == classes
        train = _workflow(bundle, "train", output_dir=str(tmp_path))
        train.initialize()
        assert train.check_properties() == []
        assert isinstance(train.trainer, LightningBundleTrainer) and train.max_epochs == 1000
        assert isinstance(train.train_dataset, MultiClassSegDataModule)
        assert train.trainer.module.net.num_classes == len(classes) + 1
        assert (tmp_path / "model.safetensors") == train.trainer.callbacks[0].path


def test_running_a_bundle_without_weights_is_refused_by_name(ts_dir, tmp_path):
    bundle = _bundle("s")
    with pytest.raises(ConfigError, match="this bundle ships configs only: no trained weights under models/"):
        run_bundle(bundle, ts_dir / "example_ct_sm.nii.gz", tmp_path / "out")
    workflow = _workflow(bundle, "inference", input_image=str(ts_dir / "example_ct_sm.nii.gz"), output_dir=str(tmp_path / "o"))
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:  # MONAI's runner: the config's weight loader refuses too
        workflow.run()
    cause = err.value
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    assert cause is not None and "ships configs only" in str(cause)
    assert not (tmp_path / "o").exists()


def test_stunet_s_one_epoch_on_phantoms_then_inference_on_the_real_ct(ts_dir, tmp_path):
    """The smallest size trains (train.json, phantoms, 6 mm, 64^3 patches) and its weights, put in a
    copy of the bundle and recorded, run through inference.json onto the real CT's grid."""
    bundle = _bundle("s")
    small = {"target_spacing": [6.0, 6.0, 6.0], "patch_size": [64, 64, 64]}
    train = _workflow(
        bundle, "train", output_dir=str(tmp_path / "train"), device="cpu", max_epochs=1, train_data=[], **small,
        **{"train#dataset#phantom_cases": 1, "train#dataset#phantom_shape": [48, 48, 32],
           "train#dataset#phantom_spacing": [6.0, 6.0, 6.0], "train#dataset#batch_size": 1,
           "train#dataset#samples_per_epoch": 2, "train#module#warmup_steps": 0},
    )
    train.initialize()
    assert train.check_properties() == []
    module: MultiClassSegModule = train.trainer.module
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    (out,) = train.run()
    assert train.trainer.trainer.global_step == 2
    # The phantom's organs became classes 1..15: its label map holds the liver (class 5), lungs and more.
    (_, label), = train.train_dataset.cases
    assert {5, 1, 8, 10, 15} <= set(torch.unique(label).tolist())
    weights = out / "model.safetensors"
    assert weights.is_file()
    from safetensors.torch import load_file

    trained = load_file(str(weights))
    assert trained.keys() == start.keys()
    assert [k for k, v in trained.items() if not torch.equal(v, start[k])], "one epoch changed no weight"

    # A copy of the bundle with these weights: MONAI's runner through inference.json, on the real CT.
    copy = tmp_path / "volumed_stunet_s_ct"
    shutil.copytree(bundle, copy)
    shutil.copy(weights, copy / "models" / "model.safetensors")
    record_hashes(copy)
    image = ts_dir / "example_ct_sm.nii.gz"
    infer = _workflow(copy, "inference", input_image=str(image), output_dir=str(tmp_path / "seg"), device="cpu",
                      print_summary=False, **small)
    infer.initialize()
    assert infer.check_properties() == []
    (results,) = infer.run()
    (result,) = results
    assert isinstance(infer.evaluator, MultiClassRunner)
    source, labels = nib.load(image), nib.load(result.label_map)
    assert labels.shape == source.shape and np.allclose(labels.affine, source.affine)
    values = set(np.unique(np.asarray(labels.dataobj)).tolist())
    assert values <= set(range(16))
    table = json.loads(result.label_table.read_text())
    assert table["labels"]["5"] == "liver" and sum(table["voxels"].values()) == int((np.asarray(labels.dataobj) > 0).sum())
    assert not list(tmp_path.glob(".seg.volumed-*"))


def test_the_four_sizes_differ_only_in_their_preset():
    """Four self-contained bundles (MONAI's layout has no inheritance): the copies must not drift."""
    for name in ("inference.json", "train.json"):
        configs = {size: json.loads((_bundle(size) / "configs" / name).read_text()) for size in SIZES}
        for size, config in configs.items():
            assert config.pop("preset") == f"stunet_{size}"
        assert all(config == configs["s"] for config in configs.values()), name
    for name in ("LICENSE",):
        assert len({(_bundle(size) / name).read_text() for size in SIZES}) == 1


def test_ckpt_export_torchscript_by_tracing(tmp_path):
    """torch.jit.script fails on STU-Net (its encoder's feature_info is a Python list of records),
    so MONAI's ckpt_export traces network_def; the trace has no shape-dependent branch, so it
    answers other window sizes too. Random weights of S stand in for trained ones."""
    from monai.bundle import ckpt_export

    from volumed.encoders.stunet import create_stunet

    bundle = _bundle("s")
    torch.manual_seed(0)
    network = create_stunet("stunet_s", num_classes=16, deep_supervision=False).eval()
    torch.save(network.state_dict(), tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(tmp_path / "model.pt"),
                    meta_file=str(bundle / "configs" / "metadata.json"), config_file=str(bundle / "configs" / "inference.json"),
                    bundle_root=str(bundle), use_trace=True)
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    for shape in ((1, 1, 64, 64, 64), (1, 1, 128, 64, 96)):
        image = torch.rand(shape)
        with torch.no_grad():
            got, want = exported(image), network(image)
        assert got.shape == (1, 16, *shape[2:])
        assert torch.allclose(got, want, atol=1e-5)
