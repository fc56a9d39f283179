"""Volume geometry helpers: a crop keeps every voxel at its world position."""

from __future__ import annotations

import numpy as np
import pytest

from volumed.io.volume import SourceInfo, Volume


def _oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    rotation = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)  # rotated in-plane
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 3.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return Volume(rng.normal(size=(60, 50, 40)).astype(np.float32), affine, modality="CT", source=SourceInfo(format="nifti"))


def test_a_crop_keeps_every_voxel_at_its_world_position():
    volume = _oblique_volume()
    box = (slice(7, 31), slice(12, 45), slice(3, 19))
    sub = volume.crop(box)
    assert sub.shape == (24, 33, 16) and sub.spacing == pytest.approx(volume.spacing)
    np.testing.assert_array_equal(sub.data, volume.data[box])
    assert sub.data.flags["C_CONTIGUOUS"] and not np.shares_memory(sub.data, volume.data)
    assert sub.modality == "CT" and sub.source == volume.source
    for ijk in [(0, 0, 0), (23, 32, 15), (5, 17, 9)]:
        np.testing.assert_allclose(sub.voxel_to_world(np.array(ijk)), volume.voxel_to_world(np.array(ijk) + [7, 12, 3]))
    # open-ended slices are read against the grid
    np.testing.assert_allclose(volume.crop((slice(None), slice(5, None), slice(None))).origin, volume.voxel_to_world(np.array([0, 5, 0]))[0])


def test_a_crop_refuses_strided_slices():
    with pytest.raises(ValueError, match="unit step"):
        _oblique_volume().crop((slice(0, 10, 2), slice(None), slice(None)))
