"""Preview pictures: three orthogonal slices (axial, coronal, sagittal) with optional label overlay.

Slices are shown in radiological convention whatever the file's axis order: the volume is first
reoriented (exactly, by axis flips/permutations) to RAS; axial views put the patient's right on
the picture's left and anterior at the top; coronal and sagittal views put superior at the top.

Colours: label value ``v`` is always drawn in :func:`label_color` ``(v)`` (a fixed palette of
distinct colours, then golden-angle hues), in every picture, over the image with opacity
:data:`OVERLAY_ALPHA`. When the label values have names, a legend under the slices names each
value with a patch of the same colour (:func:`legend_entries`; ``*`` marks a structure that the
three slices do not cut), and ``notes`` add lines of text (``volumed segment`` lists the absent
structures there).
"""

from __future__ import annotations

import colorsys
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from volumed.io.atomic import atomic_output
from volumed.io.volume import Volume

__all__ = ["OVERLAY_ALPHA", "LegendEntry", "label_color", "label_overlay", "legend_entries", "render_preview",
           "three_views", "to_ras"]

#: Opacity of the label colours over the image.
OVERLAY_ALPHA = 0.5
# Kelly's colours of maximum contrast in his order (each next one far from those before), without
# white, black and grey, which vanish on a CT, and his orange yellow and greenish yellow, too close
# to his yellow and orange: value 1 is the first.
_PALETTE = ["#F3C300", "#875692", "#F38400", "#A1CAF1", "#BE0032", "#C2B280", "#008856", "#E68FAC",
            "#0067A5", "#F99379", "#604E97", "#B3446C", "#882D17", "#8DB600", "#654522", "#E25822",
            "#2B3D26"]


def label_color(value: int) -> tuple[float, float, float]:
    """The display colour (RGB in ``[0, 1]``) of label value ``value >= 1``, the same in every picture:
    the palette for the first values, then golden-angle hues (far apart for neighbouring values)."""
    value = int(value)
    if value < 1:
        raise ValueError(f"label value {value} has no colour (0 is the background)")
    if value <= len(_PALETTE):
        code = _PALETTE[value - 1]
        return tuple(int(code[i : i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]
    hue = (value * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.85 if value % 2 else 0.6, 0.95)


def label_overlay(label: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """``(H, W)`` integer label slice -> ``(H, W, 4)`` RGBA: :func:`label_color` of each value at
    opacity ``alpha``, transparent background (0)."""
    label = np.asarray(label)
    values, inverse = np.unique(label, return_inverse=True)
    lut = np.array([(0.0, 0.0, 0.0, 0.0) if v <= 0 else (*label_color(int(v)), alpha) for v in values]).reshape(-1, 4)
    return lut[inverse.reshape(label.shape)]


@dataclass(frozen=True)
class LegendEntry:
    """One line of the legend: label ``value``, its ``name``, its :func:`label_color`, and whether
    the three slices drawn cut it (``in_slices``)."""

    value: int
    name: str
    color: tuple[float, float, float]
    in_slices: bool


def legend_entries(label_names: Mapping[int, str], views: Sequence[np.ndarray] = ()) -> list[LegendEntry]:
    """The legend of the named label values, by value; ``views`` are the label slices drawn
    (an entry is ``in_slices`` when its value occurs in one of them)."""
    shown: set[int] = set()
    for view in views:
        shown.update(int(v) for v in np.unique(view))
    return [LegendEntry(int(v), str(label_names[v]), label_color(int(v)), int(v) in shown)
            for v in sorted(label_names, key=int) if int(v) > 0]


def to_ras(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxels reoriented to RAS by flips/permutations only, and the matching spacing (mm)."""
    ornt = nib.orientations.io_orientation(volume.affine)
    data = nib.orientations.apply_orientation(volume.data, ornt)
    spacing = tuple(float(s) for s in np.asarray(volume.spacing)[ornt[:, 0].astype(int).argsort()])
    return data, spacing  # type: ignore[return-value]


def _window(volume: Volume, data: np.ndarray) -> tuple[float, float]:
    if volume.modality == "CT":
        return -160.0, 240.0  # soft-tissue window: W 400, L 40 HU
    lo, hi = np.percentile(data[:: max(1, data.shape[0] // 128)], [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def three_views(data: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal 2D slices of a RAS array through ``centre`` (display order)."""
    i, j, k = centre
    axial = data[::-1, ::-1, k].T
    coronal = data[::-1, j, ::-1].T
    sagittal = data[i, ::-1, ::-1].T
    return [axial, coronal, sagittal]


def render_preview(
    volume: Volume,
    path: str | Path,
    *,
    label: np.ndarray | None = None,
    label_names: Mapping[int, str] | None = None,
    notes: Sequence[str] = (),
    overwrite: bool = False,
    title: str | None = None,
) -> Path:
    """Write a PNG with three orthogonal slices; ``label`` (on the volume's grid) is overlaid.

    The slices pass through the centroid of the labelled voxels when a label is given, else
    through the centre of the volume. With ``label_names`` (value -> name) a legend under the
    slices names each value's colour (:func:`legend_entries`); ``notes`` are lines of text under it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    data, spacing = to_ras(volume)
    lab = None
    if label is not None:
        lab = nib.orientations.apply_orientation(np.asarray(label), nib.orientations.io_orientation(volume.affine))
    if lab is not None and lab.any():
        centre = tuple(int(round(c)) for c in np.argwhere(lab > 0).mean(axis=0))
    else:
        centre = tuple(s // 2 for s in data.shape)
    vmin, vmax = _window(volume, data)
    views = three_views(data, centre)  # type: ignore[arg-type]
    label_views = three_views(lab, centre) if lab is not None else [None] * 3  # type: ignore[arg-type]
    # Aspect ratio (row spacing / column spacing) of each view, so millimetres look square.
    sx, sy, sz = spacing
    aspects = [sy / sx, sz / sx, sz / sy]
    names = ["axial", "coronal", "sagittal"]

    entries = legend_entries(label_names, [v for v in label_views if v is not None]) if label_names else []
    columns = 4
    lines = [line for note in notes for line in textwrap.wrap(note, 150)]
    if any(not e.in_slices for e in entries):
        lines.append("* not cut by these three slices")
    legend_in = 0.23 * math.ceil(len(entries) / columns) + 0.22 * len(lines) + (0.15 if entries or lines else 0)
    fig = plt.figure(figsize=(12, 4.4 + legend_in), dpi=100, facecolor="black")
    grid = fig.add_gridspec(2 if legend_in else 1, 3, height_ratios=[4.4, legend_in] if legend_in else [1])
    axes = [fig.add_subplot(grid[0, i]) for i in range(3)]
    for ax, img, limg, aspect, name in zip(axes, views, label_views, aspects, names):
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        if limg is not None:
            ax.imshow(label_overlay(limg), aspect=aspect, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    if legend_in:
        below = fig.add_subplot(grid[1, :])
        below.axis("off")
        if entries:
            handles = [Patch(facecolor=e.color, edgecolor="white", linewidth=0.5,
                             label=f"{e.value} {e.name}" + ("" if e.in_slices else " *")) for e in entries]
            below.legend(handles=handles, loc="upper left", ncol=columns, frameon=False, labelcolor="white",
                         fontsize=9, handlelength=1.2, borderaxespad=0, columnspacing=1.5)
        if lines:
            below.text(0, 0, "\n".join(lines), color="white", fontsize=9, va="bottom", ha="left",
                       transform=below.transAxes)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), format="png", facecolor="black")
    plt.close(fig)
    return Path(path)
