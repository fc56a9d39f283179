"""configs/inference.json of the promptseg bundle: MONAI's runner, MONAI's checks, MONAI Label's keys.

Fast tests use the tiny bundle (the real configs around a tiny untrained package); the tests
marked realdata run the real bundle on the real CT."""

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
from bundle_helpers import PROMPTSEG, REPO, default_prompts
from monai.bundle import ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.inferers import SlidingWindowInferer

from volumed.bundle.metadata import channel_names, read_metadata
from volumed.bundle.promptseg import PromptSegRunner, prompt_embeddings
from volumed.bundle.run import run_bundle
from volumed.data.transforms import PreprocessConfig, build_preprocessing, preprocess
from volumed.errors import ConfigError, WeightsLoadError
from volumed.inference.package import load_package, read_config
from volumed.inference.segment import segment
from volumed.io import read_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # MONAI warns that configs run code


def _workflow(bundle, **override) -> ConfigWorkflow:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(bundle), **override)


def _same_outputs(a, b, names):
    """Masks and label maps of two output folders are identical, voxel for voxel and affine."""
    for rel in [f"masks/{n}.nii.gz" for n in names] + ["labels.nii.gz"]:
        x, y = nib.load(a / rel), nib.load(b / rel)
        assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), rel
        assert np.array_equal(x.affine, y.affine), rel
    ja, jb = (json.loads((d / "labels.json").read_text()) for d in (a, b))
    assert ja["labels"] == jb["labels"]


def test_monai_label_keys_and_property_references():
    config = json.loads((PROMPTSEG / "configs" / "inference.json").read_text())
    for key in ("network_def", "preprocessing", "postprocessing", "inferer", "displayable_configs",
                "bundle_root", "device", "dataset_dir", "dataset", "evaluator", "input_image", "output_dir", "prompts"):
        assert key in config, key
    # MONAI's optional-property references (check_properties) and MONAI Label's use of them.
    assert config["dataset"]["transform"] == "@preprocessing"
    assert config["evaluator"]["postprocessing"] == "@postprocessing"
    assert config["evaluator"]["inferer"] == "@inferer"
    assert config["prompts"] == "@displayable_configs#prompts"
    # MONAI Label shows displayable_configs as options: plain values, the prompts among them.
    assert config["displayable_configs"]["prompts"] == channel_names(read_metadata(PROMPTSEG))
    assert config["preprocessing"]["transforms"][0]["_target_"] == "volumed.bundle.transforms.LoadVolumed"
    assert [t["_target_"] for t in config["preprocessing"]["transforms"][1:]] == [
        "EnsureTyped", "Orientationd", "Spacingd", "CropForegroundd", "ScaleIntensityRanged"]
    assert config["inferer"]["_target_"] == "SlidingWindowInferer"


def test_config_workflow_infer_check_properties(tiny_bundle):
    workflow = _workflow(tiny_bundle, input_image="unused.nii.gz")
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.evaluator, PromptSegRunner)
    assert isinstance(workflow.inferer, SlidingWindowInferer)
    assert workflow.evaluator.postprocessing is workflow.postprocessing
    assert workflow.dataset.transform is workflow.preprocessing
    meta = read_metadata(tiny_bundle)
    assert workflow.version == meta["version"] and workflow.monai_version == meta["monai_version"]
    # The inferer's window is the package's (the tiny one's, not the real bundle's).
    assert tuple(workflow.inferer.roi_size) == (64, 64, 16) and workflow.inferer.overlap == 0.25
    # Label names for MONAI Label: the channel_def of the pred output.
    assert list(workflow.channel_def.values()) == default_prompts()
    # The check is real: a required property left out is reported (MONAI raises for it).
    broken = _workflow(tiny_bundle, input_image="unused.nii.gz")
    broken.parser.config.pop("dataset_dir")
    broken.initialize()
    with pytest.raises(KeyError, match="Property 'dataset_dir'"):
        broken.check_properties()


def test_config_preprocessing_is_the_package_preprocessing(tiny_bundle, ts_dir):
    """The MONAI Compose written in inference.json gives the model-space image that the package's
    own build_preprocessing gives: same values, same grid, same inversion trace."""
    workflow = _workflow(tiny_bundle, input_image=str(ts_dir / "example_ct_sm.nii.gz"))
    workflow.initialize()
    item = workflow.dataset[0]  # MONAI Label's way: a path in, model space out
    volume = read_volume(ts_dir / "example_ct_sm.nii.gz")
    reference = preprocess(volume, None, PreprocessConfig(**read_config(tiny_bundle / "models").preprocessing)).image
    assert item["volume_image"].shape == volume.shape
    assert item["image"].shape == reference.shape
    assert torch.equal(item["image"].as_tensor(), reference.as_tensor())
    assert torch.allclose(item["image"].affine, reference.affine)
    ops = [op["class"] for op in item["image"].applied_operations]
    assert ops == [op["class"] for op in reference.applied_operations] == ["Orientation", "SpatialResample", "CropForeground"]
    steps = [type(t).__name__ for t in workflow.preprocessing.transforms[1:]]
    assert steps == [type(t).__name__ for t in build_preprocessing(PreprocessConfig()).transforms]


def test_monai_run_writes_what_volumed_segment_writes(tiny_bundle, ts_dir, tmp_path):
    """MONAI's run() with --prompts overridden, against volumed.inference.segment on the same package."""
    from monai.bundle import run

    image = ts_dir / "example_ct_sm.nii.gz"
    prompts = ["liver", "left kidney", "pulmonary artery"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(config_file=str(tiny_bundle / "configs" / "inference.json"), logging_file=False,
            bundle_root=str(tiny_bundle), input_image=str(image), output_dir=str(tmp_path / "bundle"),
            prompts=prompts, device="cpu")
    reference = segment(image, prompts, model_dir=tiny_bundle / "models", out_dir=tmp_path / "segment",
                        allow_free_text=True, progress=False)
    names = ["liver", "kidney_left", "pulmonary_artery"]
    _same_outputs(tmp_path / "bundle", tmp_path / "segment", names)
    table = json.loads((tmp_path / "bundle" / "labels.json").read_text())["labels"]
    assert [table[str(k + 1)]["prompt"] for k in range(3)] == prompts
    label = nib.load(tmp_path / "bundle" / "labels.nii.gz")
    # The untrained tiny model still marks voxels, so the comparison above compares something.
    assert sum(t.statistics.voxels for t in reference.terms) > 0
    source = nib.load(image)
    assert label.shape == source.shape and np.allclose(label.affine, source.affine)


def test_run_bundle_refuses_changed_weights_and_missing_input(tiny_bundle, ts_dir, tmp_path):
    with pytest.raises(ConfigError, match="no input image: pass --input_image PATH"):
        run_bundle(tiny_bundle, "", tmp_path / "out", prompts=["liver"])
    weights = tiny_bundle / "models" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsLoadError, match="model.safetensors: sha256 mismatch"):
        run_bundle(tiny_bundle, ts_dir / "example_ct_sm.nii.gz", tmp_path / "out", prompts=["liver"])
    # MONAI's runner goes through the config's network loader, which checks the same hash.
    workflow = _workflow(tiny_bundle, input_image=str(ts_dir / "example_ct_sm.nii.gz"), output_dir=str(tmp_path / "o"))
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:
        workflow.run()
    cause = err.value
    while cause is not None and not isinstance(cause, WeightsLoadError):
        cause = cause.__cause__
    assert cause is not None and "sha256 mismatch" in str(cause)
    assert not (tmp_path / "o").exists()


def test_verify_net_in_out_with_text():
    """On the real bundle's network (architecture from models/config.json) and metadata."""
    config, meta = (str(PROMPTSEG / "configs" / n) for n in ("inference.json", "metadata.json"))
    text = prompt_embeddings(PROMPTSEG / "models", default_prompts())
    n = len(default_prompts())
    assert text.shape == (n, 384)
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu", n=1,
                      extra_forward_args={"text": text}, bundle_root=str(PROMPTSEG))
    # The check is real: 3 prompts give 3 channels where the metadata promises n.
    with pytest.raises(ValueError, match=f"output channel number `3` doesn't match: `{n}`"):
        verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, device="cpu",
                          extra_forward_args={"text": text[:3]}, bundle_root=str(PROMPTSEG))


def test_config_workflow_infer_check_properties_on_the_real_bundle():
    """The real bundle's workflow instantiates (its weights pass the sha256 check) and has every property."""
    workflow = _workflow(PROMPTSEG, input_image="unused.nii.gz")
    workflow.initialize()
    assert workflow.check_properties() == []
    assert tuple(workflow.inferer.roi_size) == tuple(read_config(PROMPTSEG / "models").patch_size)
    reference, _ = load_package(PROMPTSEG / "models")
    loaded = workflow.evaluator.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("prompts", [None, ["spleen", "left kidney"]], ids=["default prompts", "prompts overridden"])
def test_ckpt_export_torchscript_of_the_default_or_given_prompts(tiny_bundle, tmp_path, prompts):
    """torch.jit.script fails on the text conditioning, so ckpt_export traces export_network_def
    (the network with the prompts frozen in) at the metadata's window size. The prompts are the
    config id ``prompts``: ``--prompts "['spleen','left kidney']"`` on ckpt_export's command line
    exports a network for those."""
    network, _ = load_package(tiny_bundle / "models")
    ckpt = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt_export(net_id="export_network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt),
                    meta_file=str(tiny_bundle / "configs" / "metadata.json"),
                    config_file=str(tiny_bundle / "configs" / "inference.json"), bundle_root=str(tiny_bundle),
                    use_trace=True, **({} if prompts is None else {"prompts": prompts}))
    extra = {"metadata.json": "", "inference.json": ""}
    exported = torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == read_metadata(tiny_bundle)["version"]
    # The window of the metadata's spatial_shape ("96*n", ...) at n = 1.
    window = [int(str(e).split("*")[0]) for e in read_metadata(tiny_bundle)["network_data_format"]["inputs"]["image"]["spatial_shape"]]
    image = torch.rand(1, 1, *window)
    text = prompt_embeddings(tiny_bundle / "models", prompts or default_prompts())
    with torch.no_grad():
        want = network(image, text)
        got = exported(image)
    assert got.shape == (1, len(prompts or default_prompts()), *window)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.realdata
def test_python_m_monai_bundle_run_on_the_real_ct_equals_volumed_segment(ts_dir, tmp_path):
    """The command of issue 17, on the real bundle and the real CT, as a user types it."""
    image = ts_dir / "example_ct_sm.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(PROMPTSEG / "configs" / "inference.json"),
           "--bundle_root", str(PROMPTSEG), "--input_image", str(image), "--output_dir", str(tmp_path / "bundle"),
           "--prompts", "['liver','spleen','pulmonary artery']", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "found 3 of 3 structure(s)" in done.stdout
    segment(image, ["liver", "spleen", "pulmonary artery"], model_dir=PROMPTSEG / "models", out_dir=tmp_path / "segment",
            allow_free_text=True, progress=False)
    _same_outputs(tmp_path / "bundle", tmp_path / "segment", ["liver", "spleen", "pulmonary_artery"])
    source, label = nib.load(image), nib.load(tmp_path / "bundle" / "labels.nii.gz")
    assert label.shape == source.shape and np.allclose(label.affine, source.affine)
    liver = np.asarray(nib.load(tmp_path / "bundle" / "masks" / "liver.nii.gz").dataobj)
    assert liver.sum() * 27 / 1000 > 500  # mL: the trained model finds the liver of this CT


@pytest.mark.realdata
def test_volumed_run_on_the_real_dicom_series(ts_dir, tmp_path, capsys):
    """volumed run on the DICOM series with UIDs: same masks as volumed segment, on the series'
    grid, and a DICOM SEG."""
    from volumed.cli import main

    series = ts_dir / "example_ct_dicom_with_uids"
    main_args = ["run", str(PROMPTSEG), str(series), "-o", str(tmp_path / "run"), "-p", "liver", "-p", "spleen", "--device", "cpu"]
    try:
        main(main_args)
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "found 2 of 2 structure(s)" in out and "DICOM SEG" in out
    segment(series, ["liver", "spleen"], model_dir=PROMPTSEG / "models", out_dir=tmp_path / "segment", progress=False)
    _same_outputs(tmp_path / "run", tmp_path / "segment", ["liver", "spleen"])
    volume = read_volume(series)
    label = nib.load(tmp_path / "run" / "labels.nii.gz")
    assert label.shape == volume.shape == (512, 512, 20)
    assert np.allclose(label.affine, volume.affine, atol=1e-4)
    assert (tmp_path / "run" / "segmentation.dcm").is_file()


def test_volumed_run_errors_are_one_line(tiny_bundle, ts_dir, tmp_path, capsys):
    """Input errors raised inside MONAI's workflow reach the user as volumed's one-line message."""
    from volumed.cli import main

    def cli(args):
        try:
            main(args)
        except SystemExit as exit_:
            return int(exit_.code or 0)
        return 0

    missing = tmp_path / "nope.nii.gz"
    assert cli(["run", str(tiny_bundle), str(missing), "-o", str(tmp_path / "out"), "-p", "liver"]) == 2
    err = capsys.readouterr().err
    assert err == f"volumed: error: {missing}: no such file or folder\n"  # refused before the network is loaded
    image = ts_dir / "example_ct_sm.nii.gz"
    assert cli(["run", str(tiny_bundle), str(image), "-o", str(tmp_path / "out"), "-p", "brian"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("volumed: error: ") and "brian" in last
    assert not (tmp_path / "out").exists()


def test_default_prompts_and_all_terms(tiny_bundle, ts_dir, tmp_path):
    """Without prompts the bundle segments its default list (channel_def order: label value k + 1 is
    channel k); --all segments every trained term, as volumed segment --all does."""
    image = ts_dir / "example_ct_sm.nii.gz"
    (default,) = run_bundle(tiny_bundle, image, tmp_path / "default", device="cpu")
    assert [t.name for t in default.terms] == channel_names(read_metadata(tiny_bundle))
    assert [t.value for t in default.terms] == list(range(1, len(default.terms) + 1))
    (everything,) = run_bundle(tiny_bundle, image, tmp_path / "all", all_terms=True, device="cpu")
    reference = segment(image, [], all_terms=True, model_dir=tiny_bundle / "models", out_dir=tmp_path / "segment", progress=False)
    assert [t.name for t in everything.terms] == [t.name for t in reference.terms]
    _same_outputs(tmp_path / "all", tmp_path / "segment", [t.name.replace(" ", "_") for t in reference.terms])
