"""Preview pictures: three orthogonal slices (axial, coronal, sagittal) with optional label overlay.

Slices are shown in radiological convention whatever the file's axis order: the volume is first
reoriented (exactly, by axis flips/permutations) to RAS; axial views put the patient's right on
the picture's left and anterior at the top; coronal and sagittal views put superior at the top.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from volumed.io.atomic import atomic_output
from volumed.io.volume import Volume


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
    label_names: dict[int, str] | None = None,
    overwrite: bool = False,
    title: str | None = None,
) -> Path:
    """Write a PNG with three orthogonal slices; ``label`` (on the volume's grid) is overlaid.

    The slices pass through the centroid of the labelled voxels when a label is given, else
    through the centre of the volume.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

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

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), dpi=100, facecolor="black")
    rng = np.random.default_rng(7)
    colors = np.concatenate([[[0, 0, 0, 0]], np.c_[rng.uniform(0.2, 1.0, (255, 3)), np.full(255, 0.45)]])
    cmap = ListedColormap(colors)
    for ax, img, limg, aspect, name in zip(axes, views, label_views, aspects, names):
        ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        if limg is not None:
            ax.imshow(np.mod(limg.astype(np.int64), 255) + (limg > 0), cmap=cmap, vmin=0, vmax=255, aspect=aspect,
                      interpolation="nearest")
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(str(tmp), format="png", facecolor="black")
    plt.close(fig)
    return Path(path)
