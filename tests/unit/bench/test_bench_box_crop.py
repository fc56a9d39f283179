"""bench/bench_box_crop.py: the box is a cube of the asked size round the anchor, clipped to the
scan (the cut itself is Volume.crop, tests/unit/io/test_volume.py), and the summary's means."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import bench_box_crop  # noqa: E402
from volumed.io.volume import Volume  # noqa: E402


def _oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(60, 50, 40)).astype(np.float32)
    affine = np.eye(4)
    rotation = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)  # rotated in-plane
    affine[:3, :3] = rotation @ np.diag([1.5, 2.0, 3.0])  # voxel sizes 1.5, 2 and 3 mm along i, j, k
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return Volume(data=data, affine=affine, modality="CT")


def test_the_box_is_a_cube_of_the_asked_size_round_the_anchor_clipped_to_the_scan():
    volume = _oblique_volume()
    anchor = np.zeros(volume.shape, bool)
    anchor[28:33, 20:31, 18:23] = True  # centre (30, 25, 20)
    box = bench_box_crop.box_around(volume, anchor, 60.0)
    # 60 mm is 40 voxels at 1.5 mm, 30 at 2 mm, 20 at 3 mm, centred on the anchor's centre
    assert [(b.start, b.stop) for b in box] == [(10, 50), (10, 40), (10, 30)]
    # a box larger than the scan along an axis keeps the whole axis
    assert [(b.start, b.stop) for b in bench_box_crop.box_around(volume, anchor, 200.0)] == [(0, 60), (0, 50), (0, 40)]


def test_the_summary_means_each_models_scores_per_scan():
    results = {"A": {"s1": {"liver@150": {"liver": {"whole": 0.8, "cropped": 0.4}, "aorta": {"whole": 0.6, "cropped": 0.0}}},
                     "s2": {"kidney@200": {"kidney": {"whole": 0.5, "cropped": 0.5}}}},
               "B": {"s1": {"liver@150": {"liver": {"whole": 0.9, "cropped": 0.7}}}}}
    lines = bench_box_crop.summary(results)
    assert lines[0] == "| model | s1 | s2 | all |"
    assert lines[2] == "| A | 0.700 / 0.200 (2) | 0.500 / 0.500 (1) | 0.633 / **0.300** (3) |"
    assert lines[3] == "| B | 0.900 / 0.700 (1) | - | 0.900 / **0.700** (1) |"
