"""Where each lung lobe lies inside its lung: a shape prior from label maps.

Why: a model that has seen few chests finds the lungs but places the fissures badly. On
tcia_ccth_a01 left out, the lobes of leave-one-out models reached 0.00-0.48 Dice even after
their outline was taken from the image's air (:mod:`volumed.inference.lungs`). The lobes' layout
inside a lung is much the same from one person to the next: the lower lobe is posterior and
basal, the upper lobe anterior and apical, the right middle lobe anterior between them.

**Coordinates** (:func:`lung_coordinates`): each voxel of one lung (one side) gets three numbers
from the lung's own bounding box in world (RAS) millimetres:

- ``u``, medial (0) to lateral (1);
- ``v``, anterior (0) to posterior (1);
- ``w``, the height above the lung's lowest point (its base), in units of the lung's
  anterior-posterior depth.

``w`` is anchored at the base and scaled by the depth, not by the height, so that an image that
cuts the lung's top (an abdominal slab showing the lung bases) still gives the right
coordinates: only the base, the front, the back and the lateral side must be in the image
(:func:`volumed.inference.lungs.outline_lobes` checks this before it uses the atlas).

**The atlas** (``lobe_atlas.npz``, written by ``bench/bench_lobe_atlas.py``): for each side, the
share of each lobe in each of :data:`BINS` bins of ``(u, v, w)`` (``w`` up to :data:`W_MAX`),
counted over the subjects :func:`atlas_subjects` finds: the TotalSegmentator v2 label maps
s0327 and s0328 (CC BY 4.0, Wasserthal et al., Radiology: AI 2023) and the reference lobes of
tcia_ccth_a01 (TCIA CC-Tumor-Heterogeneity, CC BY 4.0, Mayr et al. 2023; TotalSegmentator-made),
each lung weighing the same, smoothed by a Gaussian of one bin; empty bins take the nearest
counted bin's shares.

Measured (2026-12-06, BENCHMARKS.md "Lung lobe atlas"), each voxel of the reference lungs given
the atlas's most likely lobe, on lungs the atlas did not count (each subject left out in turn):
tcia_ccth_a01 0.67 / 0.74 / 0.85 / 0.80 / 0.83 (upper left, lower left, upper right, middle,
lower right), s0327 0.74 / 0.74 / 0.81 / 0.79 / 0.88, s0328 (no upper right lobe) 0.92 / 1.00 /
- / 0.84 / 0.97; example_ct_sm's lung bases (not a subject) 0.94 / 0.99 / - / - / 0.99. Two
subjects split a third better than one does (s0327: 0.76 with tcia_ccth_a01's alone, 0.79 with
both others; s0328: 0.86 and 0.82 with one, 0.93 with both), hence all three in the shipped one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = [
    "ATLAS_PATH",
    "BINS",
    "LOBES",
    "LOBES_LEFT",
    "LOBES_RIGHT",
    "SIDES",
    "W_MAX",
    "atlas_subjects",
    "build_atlas",
    "load_atlas",
    "lobe_prior",
    "lung_coordinates",
    "save_atlas",
]

LOBES_LEFT = ("lung_upper_lobe_left", "lung_lower_lobe_left")
LOBES_RIGHT = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
#: The five lobes.
LOBES = LOBES_LEFT + LOBES_RIGHT
#: Each side's lobes, in the atlas's order.
SIDES: dict[str, tuple[str, ...]] = {"left": LOBES_LEFT, "right": LOBES_RIGHT}
#: The atlas shipped with the package (``bench/bench_lobe_atlas.py`` writes it).
ATLAS_PATH = Path(__file__).with_name("lobe_atlas.npz")
#: Bins of (u, v, w): medial-lateral, anterior-posterior, base-apex.
BINS = (8, 12, 24)
#: ``w`` (height above the base over the lung's depth) the bins reach; higher goes to the top bin.
W_MAX = 1.6


def _points(points: np.ndarray, what: str) -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3 or not len(p):
        raise ValueError(f"{what} must be a non-empty (n, 3) array, got shape {p.shape}")
    return p


def lung_coordinates(points: np.ndarray, side: str, frame: np.ndarray | None = None) -> np.ndarray:
    """``(n, 3)`` ``(u, v, w)`` of one lung's voxels (module docstring).

    Args:
        points: ``(n, 3)`` world RAS millimetres of the voxels (+x is the patient's right, +y
            anterior, +z superior).
        side: ``"left"`` or ``"right"``: the patient's side the lung is on.
        frame: ``(m, 3)`` the voxels whose bounding box defines the coordinates (the lung
            proper, without stray pieces far from it); default ``points``.
    """
    if side not in SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    p = _points(points, "points")
    f = p if frame is None else _points(frame, "frame")
    x, y, z = p.T
    lo, hi = f.min(axis=0), f.max(axis=0)
    extent = np.maximum(hi - lo, 1e-6)
    # RAS: the left lung's lateral side is its lowest x, the right lung's its highest.
    u = (hi[0] - x) / extent[0] if side == "left" else (x - lo[0]) / extent[0]
    v = (hi[1] - y) / extent[1]
    w = (z - lo[2]) / extent[1]
    return np.stack([u, v, w], axis=1)


def _bins(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = (BINS[0], BINS[1], BINS[2] / W_MAX)
    return tuple(np.clip((coords[:, i] * scale[i]).astype(np.int64), 0, BINS[i] - 1) for i in range(3))


def build_atlas(subjects: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray]], sigma: float = 1.0) -> dict[str, np.ndarray]:
    """``{side: (lobes, *BINS) float32}`` shares of each lobe per bin, from ``(masks, affine)``
    pairs (``masks``: lobe name to bool array, all on the grid of ``affine``, voxel to RAS).
    A side is counted in a subject where it has any lobe voxel; a lobe the subject lacks counts
    as none of that lung. Each subject's lung weighs the same, whatever its voxel size: a voxel
    counts one over the number of voxels of its lung."""
    counts = {side: np.zeros((len(lobes), *BINS)) for side, lobes in SIDES.items()}
    for masks, affine in subjects:
        affine = np.asarray(affine, dtype=np.float64)
        for side, lobes in SIDES.items():
            present = [masks[n] for n in lobes if n in masks]
            if not present:
                continue
            lung = np.any(present, axis=0)
            if not lung.any():
                continue
            index = np.argwhere(lung)
            where = _bins(lung_coordinates(index @ affine[:3, :3].T + affine[:3, 3], side))
            for k, name in enumerate(lobes):
                if name in masks:
                    np.add.at(counts[side][k], tuple(b[masks[name][tuple(index.T)]] for b in where), 1.0 / len(index))
    atlas = {}
    for side, c in counts.items():
        if not c.any():
            raise ValueError(f"no subject has a {side} lung: the lobe atlas needs both sides")
        c = np.stack([ndimage.gaussian_filter(ck, sigma) for ck in c]) if sigma > 0 else c
        total = c.sum(axis=0)
        empty = total <= 1e-6 * total.max()
        if empty.any():
            nearest = ndimage.distance_transform_edt(empty, return_distances=False, return_indices=True)
            c = c[(slice(None), *nearest)]
        atlas[side] = (c / c.sum(axis=0, keepdims=True)).astype(np.float32)
    return atlas


def atlas_subjects(datalist: str | Path) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """``{name: (lobe masks, affine)}`` of the subjects a datalist offers the atlas: its
    ``synthetic`` section's label maps with a lobe (TotalSegmentator v2 s0327, s0328 in the
    default one; a mask folder is read for its lobe files only), and its real CTs whose reference
    holds all five lobes (tcia_ccth_a01), on their own grids."""
    from volumed.data.synthesis import read_structures
    from volumed.io import read_volume
    from volumed.tasks.promptseg import load_promptseg_datalist
    from volumed.tasks.promptseg_data import load_synthetic_sources, load_validation_case

    out: dict[str, tuple[dict[str, np.ndarray], np.ndarray]] = {}
    for src in load_synthetic_sources(datalist):
        files = dict(src.files)
        if files.get("masks_dir") is not None:
            folder = Path(files["masks_dir"])
            found = {n: folder / f"{n}.nii.gz" for n in LOBES if (folder / f"{n}.nii.gz").is_file()}
            if not found:
                continue
            files = {"masks": found}
        classes, affine, names = read_structures(**files)
        masks = {n: classes == c for c, n in enumerate(names, 1) if n in LOBES}
        if masks:
            out[src.name] = (masks, np.asarray(affine, dtype=np.float64))
    for src in load_promptseg_datalist(datalist, allow_free_text=True):
        listed = len(src.terms) > len(src.absent)  # else a label map of every class it holds
        if listed and not set(LOBES) <= set(src.terms):
            continue
        volume = read_volume(src.image, modality=src.modality)
        case = load_validation_case(src, volume)
        masks = {t: m for t, m in zip(case.terms, case.masks) if t in LOBES and m.any()}
        if len(masks) == len(LOBES):
            name = src.image.parent.name if src.image.name.startswith("ct") else src.image.name.split(".")[0]
            out[name] = (masks, np.asarray(volume.affine, dtype=np.float64))
    return out


def save_atlas(atlas: Mapping[str, np.ndarray], path: Path = ATLAS_PATH, *, sources: str = "") -> Path:
    """Write ``atlas`` to ``path`` (npz, atomically: a temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, bins=np.asarray(BINS), w_max=np.float32(W_MAX), sources=np.asarray(sources),
                        **{side: np.asarray(atlas[side], dtype=np.float16) for side in SIDES})
    tmp.replace(path)
    return path


@lru_cache(maxsize=4)
def load_atlas(path: Path = ATLAS_PATH) -> dict[str, np.ndarray]:
    """The atlas at ``path`` (the shipped one by default): ``{side: (lobes, *BINS) float32}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lobe atlas {path} is missing: run `python bench/bench_lobe_atlas.py` to write it")
    with np.load(path) as f:
        if tuple(int(b) for b in f["bins"]) != BINS or not np.isclose(float(f["w_max"]), W_MAX):
            raise ValueError(f"lobe atlas {path} has bins {tuple(f['bins'])} / w_max {float(f['w_max'])}, this "
                             f"version of volumed reads {BINS} / {W_MAX}: rewrite it with bench/bench_lobe_atlas.py")
        atlas = {side: f[side].astype(np.float32) for side in SIDES}
    for side, lobes in SIDES.items():
        if atlas[side].shape != (len(lobes), *BINS):
            raise ValueError(f"lobe atlas {path}: {side} has shape {atlas[side].shape}, expected {(len(lobes), *BINS)}")
    return atlas


def lobe_prior(points: np.ndarray, side: str, atlas: Mapping[str, np.ndarray] | None = None,
               frame: np.ndarray | None = None) -> np.ndarray:
    """``(lobes of the side, n)`` the atlas's share of each lobe at each of one lung's voxels
    (``points``, world RAS mm; ``frame``, the voxels whose box defines the coordinates, default
    ``points``: :func:`lung_coordinates`)."""
    atlas = load_atlas() if atlas is None else atlas
    return atlas[side][(slice(None), *_bins(lung_coordinates(points, side, frame)))]
