"""Preview pictures (volumed.inference.preview): one colour per label value everywhere, a legend that
names each colour with the colour the overlay uses, and the picture with its legend on disk."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from volumed.inference.preview import OVERLAY_ALPHA, label_color, label_overlay, legend_entries, render_preview
from volumed.io.volume import Volume


def test_label_colours_are_fixed_per_value_and_distinct():
    colours = [label_color(v) for v in range(1, 61)]
    assert colours == [label_color(v) for v in range(1, 61)]  # deterministic
    assert all(len(c) == 3 and all(0.0 <= x <= 1.0 for x in c) for c in colours)
    assert len({tuple(round(x, 3) for x in c) for c in colours}) == 60
    assert label_color(1) == pytest.approx((0xF3 / 255, 0xC3 / 255, 0.0))
    with pytest.raises(ValueError, match="label value 0 has no colour"):
        label_color(0)


def test_overlay_and_legend_use_the_same_colour_for_each_value():
    axial = np.array([[0, 3, 3], [0, 7, 0]])
    coronal = np.array([[0, 0], [12, 0]])
    overlay = label_overlay(axial)
    assert overlay.shape == (2, 3, 4)
    assert np.all(overlay[axial == 0] == 0)  # background transparent
    for value in (3, 7):
        np.testing.assert_allclose(overlay[axial == value], [[*label_color(value), OVERLAY_ALPHA]] * int((axial == value).sum()))

    names = {12: "stomach", 3: "liver (untrained)", 7: "spleen", 20: "aorta"}
    entries = legend_entries(names, [axial, coronal])
    assert [(e.value, e.name, e.in_slices) for e in entries] == [
        (3, "liver (untrained)", True), (7, "spleen", True), (12, "stomach", True), (20, "aorta", False)]
    for e in entries:
        assert e.color == label_color(e.value)
    assert legend_entries({}, [axial]) == []


def _coloured_pixels(png) -> set[tuple[int, int, int]]:
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(img, axis=0)}


def test_preview_draws_a_legend_with_each_colour_and_the_notes(tmp_path):
    data = np.full((40, 30, 20), 40.0, np.float32)
    volume = Volume(data, np.diag([2.0, 2.0, 3.0, 1.0]), "CT")
    label = np.zeros(volume.shape, np.uint8)
    label[5:20, 5:15, 5:15] = 1
    label[22:35, 10:25, 8:12] = 2
    plain = render_preview(volume, tmp_path / "plain.png", label=label)
    named = render_preview(volume, tmp_path / "named.png", label=label,
                           label_names={1: "liver", 2: "spleen (untrained)"}, notes=["absent: aorta (p <= 0.02)"])
    for path in (plain, named):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain_h = Image.open(plain).size[1]
    assert Image.open(named).size[1] > plain_h  # room for the legend under the slices
    # The legend's patches are drawn in the values' own colours (solid, so the exact RGB appears).
    colours = _coloured_pixels(named) - _coloured_pixels(plain)
    for value in (1, 2):
        rgb = tuple(int(round(255 * c)) for c in label_color(value))
        assert any(max(abs(a - b) for a, b in zip(rgb, p)) <= 1 for p in colours), value
