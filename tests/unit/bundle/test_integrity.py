"""Safety on load: sha256 of the weights against large_files.yml, MONAI version, safetensors only."""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from bundle_helpers import PROMPTSEG

from volumed.bundle import load, record_hashes, sha256_file, verify_hashes
from volumed.bundle.metadata import channel_names, read_metadata
from volumed.bundle.integrity import RECORD_NAME, check_monai_version, read_hash_records
from volumed.cli import main
from volumed.errors import ConfigError, WeightsLoadError
from volumed.inference.package import load_package


def test_the_committed_record_matches_the_committed_weights():
    """Fails after the weights are replaced until `volumed bundle hash bundles/volumed_promptseg_ct` is run."""
    records = verify_hashes(PROMPTSEG)
    assert [r.path for r in records] == ["models/model.safetensors"]
    assert records[0].sha256 == sha256_file(PROMPTSEG / "models" / "model.safetensors")


def test_monai_own_large_file_check_accepts_the_record():
    """The record is MONAI's large_files format: MONAI checks the same hash (and downloads nothing)."""
    from monai.bundle import download_large_files

    download_large_files(bundle_path=str(PROMPTSEG))


def test_record_hashes_writes_monai_large_files(tiny_bundle):
    data = yaml.safe_load((tiny_bundle / RECORD_NAME).read_text())
    (entry,) = data["large_files"]
    assert entry == {"path": "models/model.safetensors", "url": "", "hash_type": "sha256",
                     "hash_val": sha256_file(tiny_bundle / "models" / "model.safetensors")}
    assert "volumed bundle hash bundles/volumed_promptseg_ct" in (tiny_bundle / RECORD_NAME).read_text()


def test_a_changed_weight_file_is_refused_naming_the_file(tiny_bundle):
    weights = tiny_bundle / "models" / "model.safetensors"
    recorded = sha256_file(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsLoadError) as err:
        load(tiny_bundle)
    message = str(err.value)
    assert message.startswith(f"{weights}: sha256 mismatch")
    assert sha256_file(weights) in message and recorded in message
    assert f"volumed bundle hash {tiny_bundle}" in message
    # Re-recording on purpose makes it loadable again.
    record_hashes(tiny_bundle)
    assert load(tiny_bundle).network is not None


def test_segment_on_a_bundles_models_folder_checks_its_sha256(tiny_bundle, ts_dir, tmp_path):
    """`volumed segment --model BUNDLE/models` (and the default model, a bundle's models/) refuse
    weights that are not the bundle's, as `volumed run` does; a loose package has no record."""
    from volumed.inference.segment import PromptSegPredictor, segment

    models = tiny_bundle / "models"
    assert PromptSegPredictor.from_package(models) is not None
    weights = models / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsLoadError, match="sha256 mismatch") as err:
        segment(ts_dir / "example_ct_sm.nii.gz", ["liver"], model_dir=models, out_dir=tmp_path / "out", progress=False)
    assert str(err.value).startswith(f"{weights}: ")
    assert not (tmp_path / "out").exists()  # nothing written
    (tiny_bundle / RECORD_NAME).unlink()  # no record: a loose package, loaded as it is
    assert PromptSegPredictor.from_package(models) is not None


def test_unrecorded_missing_and_absent_records(tiny_bundle):
    extra = tiny_bundle / "models" / "other.pt"
    extra.write_bytes(b"x")
    with pytest.raises(WeightsLoadError, match=r"weight file\(s\) with no sha256 in large_files.yml: models/other.pt"):
        verify_hashes(tiny_bundle)
    extra.unlink()
    (tiny_bundle / "models" / "model.safetensors").unlink()
    with pytest.raises(WeightsLoadError, match=r"model.safetensors: recorded weight file is missing"):
        verify_hashes(tiny_bundle)
    (tiny_bundle / RECORD_NAME).unlink()
    # Neither weights nor a record: a bundle that ships configs only, refused as such.
    with pytest.raises(ConfigError, match="this bundle ships configs only: no trained weights under models/"):
        load(tiny_bundle)
    extra.write_bytes(b"x")  # weights with no record
    with pytest.raises(ConfigError, match="no large_files.yml: the bundle records no sha256"):
        load(tiny_bundle)
    extra.unlink()
    (tiny_bundle / RECORD_NAME).write_text("large_files:\n- path: models/model.safetensors\n  hash_val: abc\n")
    with pytest.raises(ConfigError, match=r"large_files.yml: entry 0 \(models/model.safetensors\): needs hash_type sha256"):
        read_hash_records(tiny_bundle)


def test_record_keeps_urls(tiny_bundle):
    text = (tiny_bundle / RECORD_NAME).read_text().replace("url: ''", "url: https://example.org/model.safetensors")
    (tiny_bundle / RECORD_NAME).write_text(text)
    (record,) = record_hashes(tiny_bundle)
    assert record.url == "https://example.org/model.safetensors"


def test_monai_version_check(caplog):
    meta = {"monai_version": "1.6.1"}
    assert check_monai_version(meta, installed="1.6.1") is None
    assert check_monai_version(meta, installed="1.6.1+12.gabc") is None
    with caplog.at_level(logging.WARNING):
        note = check_monai_version(meta, installed="1.5.2")
    assert note == "the bundle was made with MONAI 1.6.1, MONAI 1.5.2 is installed"
    assert "running it anyway" in caplog.text
    with pytest.raises(ConfigError, match="refusing to run it \\(install monai==1.6.1\\)"):
        check_monai_version(meta, installed="1.5.2", strict=True)
    with pytest.raises(ConfigError, match="made with MONAI 1.6.1, MONAI 2.0.0 is installed; refusing"):
        check_monai_version(meta, installed="2.0.0")


def test_load_refuses_another_monai_major(tiny_bundle):
    import json

    meta_path = tiny_bundle / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["monai_version"] = "0.9.0"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="made with MONAI 0.9.0"):
        load(tiny_bundle)


def test_load_gives_the_package_network_and_reads_no_pickle(tiny_bundle, monkeypatch):
    # The bundle's weights are safetensors: loading must never reach torch.load (pickle).
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    bundle = load(tiny_bundle)
    reference, _ = load_package(tiny_bundle / "models")
    metadata = read_metadata(tiny_bundle)
    assert bundle.version == metadata["version"]
    assert bundle.labels == channel_names(metadata) and bundle.labels[0] == "aorta"
    assert bundle.hashes == {"models/model.safetensors": sha256_file(tiny_bundle / "models" / "model.safetensors")}
    assert not bundle.network.training
    got, want = bundle.network.state_dict(), reference.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_load_refuses_non_bundles(tmp_path):
    with pytest.raises(ConfigError, match="not a bundle folder"):
        load(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="not a runnable bundle: configs/inference.json is missing"):
        load(tmp_path)


def _cli(args: list[str]) -> int:
    """``volumed ARGS`` as the installed command runs it (VolumedError -> one line, exit code 2)."""
    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_cli_bundle_hash_and_verify(tiny_bundle, capsys):
    assert _cli(["bundle", "verify", str(tiny_bundle)]) == 0
    version = read_metadata(tiny_bundle)["version"]
    assert f"version {version}, metadata valid, models/model.safetensors sha256 ok" in capsys.readouterr().out
    weights = tiny_bundle / "models" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert _cli(["bundle", "verify", str(tiny_bundle)]) == 2
    assert f"volumed: error: {weights}: sha256 mismatch" in capsys.readouterr().err
    assert _cli(["bundle", "hash", str(tiny_bundle)]) == 0
    assert f"{sha256_file(weights)}  models/model.safetensors" in capsys.readouterr().out
    assert _cli(["bundle", "verify", str(tiny_bundle)]) == 0
