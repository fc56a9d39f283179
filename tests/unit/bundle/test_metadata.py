"""Every bundle has the MONAI layout, and its metadata satisfies the project's schema."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest
from bundle_helpers import PROMPTSEG, TRAIN_ONLY, all_bundles, default_prompts

from volumed.bundle.metadata import SCHEMA_PATH, channel_names, metadata_problems, read_metadata, validate_metadata
from volumed.errors import ConfigError
from volumed.inference.package import read_config

LAYOUT = ("LICENSE", "configs/metadata.json", "configs/train.json", "docs/README.md", "models")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts", ".onnx", ".ckpt", ".bin")
MAX_COMMITTED_BYTES = 25 * 1024 * 1024


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_PATH.read_text()))


def test_there_is_at_least_the_promptseg_bundle():
    assert PROMPTSEG in all_bundles()


@pytest.mark.parametrize("bundle", all_bundles(), ids=lambda p: p.name)
def test_bundle_layout(bundle):
    """MONAI's layout; configs/inference.json in every bundle that predicts (all but TRAIN_ONLY);
    large_files.yml wherever models/ holds weights (bundles that ship configs only have none)."""
    required = LAYOUT + (() if bundle.name in TRAIN_ONLY else ("configs/inference.json",))
    weights = [p for p in (bundle / "models").rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    required += ("large_files.yml",) if weights else ()
    missing = [name for name in required if not (bundle / name).exists()]
    assert not missing, f"{bundle.name} lacks {missing}"
    if bundle.name in TRAIN_ONLY:
        assert not (bundle / "configs" / "inference.json").exists()


@pytest.mark.parametrize("bundle", all_bundles(), ids=lambda p: p.name)
def test_no_committed_weight_file_over_25_mb(bundle):
    """Weights over 25 MB are listed in large_files.yml with a url and are not tracked by git."""
    import subprocess

    import yaml

    root = bundle.parents[1]
    tracked = subprocess.run(["git", "ls-files", "-z", "--", bundle.relative_to(root).as_posix()], cwd=root,
                             capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, tracked.stdout.split("\0")):
        path = root / name
        assert not (path.suffix in WEIGHT_SUFFIXES and path.stat().st_size > MAX_COMMITTED_BYTES), f"{name} is tracked"
    if (bundle / "large_files.yml").is_file():
        for entry in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]:
            path = bundle / entry["path"]
            if path.is_file() and path.stat().st_size > MAX_COMMITTED_BYTES:
                assert entry["url"], f"{entry['path']} is over 25 MB: large_files.yml must give its url"


@pytest.mark.parametrize("bundle", all_bundles(), ids=lambda p: p.name)
def test_bundle_metadata_is_valid(bundle):
    assert metadata_problems(read_metadata(bundle)) == []
    metadata = validate_metadata(bundle)
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "intended_use", "references"):
        assert metadata[key], key
    for spec in (*metadata["network_data_format"]["inputs"].values(), *metadata["network_data_format"]["outputs"].values()):
        assert "channel_def" in spec and "spatial_shape" in spec


@pytest.mark.parametrize("bundle", [b for b in all_bundles() if (b / "models" / "config.json").is_file()],
                         ids=lambda p: p.name)
def test_metadata_states_the_grid_the_model_runs_on(bundle):
    """A user reads the model grid in metadata.json: every spacing it states ("3 mm grid",
    "resampled to 4 mm") must be models/config.json's preprocessing target_spacing (bundles 0.5.0
    of the segmenter and 0.2.0 of the report said 3 mm after the model had moved to 4 mm)."""
    import re

    config = bundle / "models" / "config.json"
    spacing = (json.loads(config.read_text()).get("preprocessing") or {}).get("target_spacing")
    if not spacing:
        pytest.skip("the package runs on the input's own grid")
    metadata = read_metadata(bundle)
    stated = {float(v) for k in ("description", "image_classes")
              for v in re.findall(r"(\d+(?:\.\d+)?) mm (?:RAS )?grid|resampled to (\d+(?:\.\d+)?) mm", metadata[k]) for v in v if v}
    assert stated, f"{bundle.name}: image_classes should state the model grid ({spacing} mm)"
    assert stated == {float(s) for s in spacing}, (bundle.name, stated, spacing)


def test_promptseg_labels_agree_everywhere():
    """MONAI Label takes label names from the pred output's channel_def: they must be the default
    prompts of inference.json, in order, and the terms the model was trained on."""
    names = channel_names(read_metadata(PROMPTSEG))
    assert names == default_prompts() == read_config(PROMPTSEG / "models").terms, (
        "after retraining, make channel_def (configs/metadata.json) and displayable_configs#prompts "
        "(configs/inference.json) list models/config.json's terms"
    )
    assert read_metadata(PROMPTSEG)["network_data_format"]["outputs"]["pred"]["num_channels"] == len(names)


@pytest.fixture
def metadata():
    return copy.deepcopy(read_metadata(PROMPTSEG))


@pytest.mark.parametrize("key", ["version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                                 "required_packages_version", "task", "description", "authors", "copyright",
                                 "intended_use", "references", "network_data_format"])
def test_a_missing_required_key_is_named(metadata, key):
    del metadata[key]
    problems = metadata_problems(metadata)
    assert any(f"'{key}' is a required property" in p for p in problems), problems


def test_problems_the_schema_alone_cannot_see(metadata):
    metadata["version"] = "9.9.0"  # no changelog entry for it
    pred = metadata["network_data_format"]["outputs"]["pred"]
    named = len(pred["channel_def"])
    pred["num_channels"] = 3  # channel_def names more
    metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["64*n", "64*m", "32*n"]
    problems = metadata_problems(metadata)
    assert "changelog: has no entry for version '9.9.0'" in problems
    assert f"network_data_format/outputs/pred: num_channels is 3 but channel_def names {named}" in problems
    assert any(p.startswith("network_data_format/inputs/image/spatial_shape") and "'64*m'" in p for p in problems), problems


def test_wrong_types_and_shapes_are_refused(metadata):
    metadata["monai_version"] = "latest"
    metadata["references"] = "a string, not a list"
    metadata["network_data_format"]["inputs"]["image"].pop("channel_def")
    metadata["network_data_format"]["inputs"]["image"]["dtype"] = "float"
    problems = "\n".join(metadata_problems(metadata))
    assert "monai_version: 'latest' does not match" in problems
    assert "references: 'a string, not a list' is not of type 'array'" in problems
    assert "network_data_format/inputs/image: 'channel_def' is a required property" in problems
    assert "network_data_format/inputs/image/dtype: 'float' is not one of" in problems


def test_validate_metadata_names_the_file(tmp_path, metadata):
    del metadata["intended_use"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(metadata))
    with pytest.raises(ConfigError, match=r"metadata.json: 1 problem\(s\) with the bundle metadata: \(top level\): 'intended_use'"):
        validate_metadata(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="metadata.json: unreadable bundle metadata"):
        validate_metadata(bad)
    with pytest.raises(ConfigError, match="not a MONAI bundle: configs/metadata.json is missing"):
        validate_metadata(tmp_path)
