"""volumed.tasks.multiclass_seg: class ids, the patch sampler and the DataModule's refusals (the
training itself runs in tests/unit/bundle/test_stunet_bundles.py)."""

from __future__ import annotations

import pytest
import torch

from volumed.errors import ConfigError, UnknownTermError
from volumed.tasks.multiclass_seg import MultiClassSegDataModule, _PatchDataset, class_lookup


def test_class_lookup_maps_totalsegmentator_ids_to_channels():
    table = class_lookup(["liver", "spleen", "heart"])
    assert table[5] == 1 and table[1] == 2 and table[51] == 3  # TotalSegmentator ids of liver, spleen, heart
    assert int((table > 0).sum()) == 3  # every other id is background
    with pytest.raises(UnknownTermError, match="no term named 'brain_stem_nonsense'"):
        class_lookup(["liver", "brain_stem_nonsense"])
    with pytest.raises(ConfigError, match="classes must be distinct and non-empty"):
        class_lookup(["liver", "liver"])


def test_datamodule_refuses_missing_data_and_partial_entries(tmp_path):
    with pytest.raises(ConfigError, match="no training data"):
        MultiClassSegDataModule(data=[], classes=["liver"]).setup()
    with pytest.raises(ConfigError, match="data entry 0 needs 'image' and 'label'"):
        MultiClassSegDataModule(data=[{"image": str(tmp_path / "ct.nii.gz")}], classes=["liver"]).setup()


def test_patches_are_reproducible_padded_and_centred_on_foreground():
    image = torch.rand(1, 40, 40, 8)
    label = torch.zeros(1, 40, 40, 8, dtype=torch.int64)
    label[0, 15:20, 15:20, 2:4] = 3
    data = _PatchDataset([(image, label)], (16, 16, 16), samples=8, foreground_fraction=1.0, seed=7)
    first = [data[i] for i in range(8)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, [data[i] for i in range(8)]))
    for item in first:
        assert item["image"].shape == item["label"].shape == (1, 16, 16, 16)  # z padded from 8 to 16
        assert int((item["label"] == 3).sum()) > 0  # every patch holds the labelled structure
    data.epoch = 1  # a new epoch draws other patches
    assert not all(torch.equal(a["image"], data[i]["image"]) for i, a in enumerate(first))
    background_only = _PatchDataset([(image, label)], (16, 16, 16), samples=32, foreground_fraction=0.0, seed=7)
    assert any(int((background_only[i]["label"] > 0).sum()) == 0 for i in range(32))
