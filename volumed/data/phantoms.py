"""Synthetic CT-like (or T1-weighted MR-like) cohorts of the lower chest and upper abdomen.

Each case is a patient-shaped volume with TotalSegmentator-compatible organ labels, 0-3 lesions
of known kind, size and location, and a short report naming them. Cases are cheap (about
0.1 s each at the default 96 x 96 x 64 grid) and bit-for-bit reproducible from ``(seed, index)``,
so tests, examples and CPU training recipes can use them instead of real data.

Geometry (the volumed convention): ``data[i, j, k]`` with ``affine = diag(spacing)`` plus an
origin that puts world ``(0, 0, 0)`` at the grid centre, so the axes are RAS+:
``+x`` = patient's Right, ``+y`` = Anterior, ``+z`` = Superior. The liver therefore lies at
positive world x, the spleen at negative x, the vertebrae posterior (negative y) and the lungs
above the diaphragm (higher z). The patient's mid-sagittal plane is ``x = 0``. The anatomy is
drawn in millimetres, so a different ``shape``/``spacing`` changes the field of view (the
default 288 x 288 x 192 mm holds the whole body cross-section; a smaller one crops it).

Labels (:data:`PHANTOM_LABELS`) use the ids and names of the TotalSegmentator ``total`` task.
Lesions are not in the organ label map (the liver under a liver lesion stays ``liver``); they are
in a separate ``lesion_map`` where lesion ``k`` (1-based) has the value ``LESION_ID_BASE + k``.

Model, in short: body = ellipse anteriorly, flattened posteriorly; subcutaneous fat and a muscle
wall around a fatty cavity; diaphragm domes (right higher) separating the lungs (five lobes
split by an oblique and a horizontal fissure, with a few vessels) and heart from the liver,
stomach (with a gas cap), spleen and kidneys; aorta and IVC in front of the spine; vertebrae
(T6-L5 as the field of view needs) with cortex, cancellous bone, discs, posterior elements and
the spinal cord; paraspinal muscles; unlabelled bowel loops. A case is non-contrast or portal
venous (``contrast``). Noise is Gaussian (CT, sigma 10-18 HU) or Rician (MR).

Determinism: only ``+ - * /``, ``sqrt`` and comparisons shape the anatomy (no transcendental
functions whose last bit may vary between CPUs), and all randomness comes from
``numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=(index,))))``. A test pins the digest
of one case, so a change of numpy's streams or of the phantom shows up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import IntEnum
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from volumed.data.datalist import DatalistEntry, write_datalist
from volumed.errors import ConfigError
from volumed.io.atomic import atomic_write_text, check_writable
from volumed.io.volume import SourceInfo, Volume
from volumed.io.writer import write_nifti

__all__ = [
    "LESION_ID_BASE",
    "PHANTOM_LABELS",
    "Lesion",
    "PhantomCase",
    "make_case",
    "make_cohort",
    "write_cohort",
]

#: The structures a phantom can hold: TotalSegmentator ``total`` task name -> label id.
PHANTOM_LABELS: dict[str, int] = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 5,
    "stomach": 6,
    "lung_upper_lobe_left": 10,
    "lung_lower_lobe_left": 11,
    "lung_upper_lobe_right": 12,
    "lung_middle_lobe_right": 13,
    "lung_lower_lobe_right": 14,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "vertebrae_T11": 33,
    "vertebrae_T10": 34,
    "vertebrae_T9": 35,
    "vertebrae_T8": 36,
    "vertebrae_T7": 37,
    "vertebrae_T6": 38,
    "heart": 51,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "spinal_cord": 79,
    "autochthon_left": 86,
    "autochthon_right": 87,
}

#: Lesion ``k`` (1-based, in creation order) has the value ``LESION_ID_BASE + k`` in ``lesion_map``.
LESION_ID_BASE = 200

_L = PHANTOM_LABELS
_LUNG_LOBES = {
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
}
# Vertebral levels from inferior to superior; T10's centre sits near the right dome.
_VERTEBRAE = ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8", "T7", "T6")


class _Tissue(IntEnum):
    """What a voxel is made of; each modality maps tissues to intensities (:data:`_INTENSITY`)."""

    AIR = 0
    FAT = 1  # subcutaneous
    MUSCLE = 2
    INNER_FAT = 3  # visceral and mediastinal fat
    BOWEL = 4
    GAS = 5  # bowel and stomach gas
    LUNG = 6
    LUNG_VESSEL = 7
    LIVER = 8
    SPLEEN = 9
    KIDNEY = 10
    STOMACH = 11  # gastric fluid content
    AORTA = 12
    IVC = 13
    HEART = 14
    CORTICAL_BONE = 15
    CANCELLOUS_BONE = 16
    DISC = 17
    CANAL = 18  # spinal cord and CSF


# (modality, contrast) -> per-tissue (mean, per-case sd). CT in HU (non-contrast / portal
# venous); MR is a T1-weighted-like scale in arbitrary units (fat bright, fluid and air dark).
_T = _Tissue
_INTENSITY: dict[tuple[str, bool], dict[_Tissue, tuple[float, float]]] = {
    ("CT", False): {
        _T.AIR: (-1000, 0), _T.FAT: (-100, 8), _T.MUSCLE: (45, 4), _T.INNER_FAT: (-90, 8), _T.BOWEL: (30, 5),
        _T.GAS: (-950, 10), _T.LUNG: (-850, 20), _T.LUNG_VESSEL: (40, 5), _T.LIVER: (60, 4), _T.SPLEEN: (50, 4),
        _T.KIDNEY: (30, 4), _T.STOMACH: (15, 4), _T.AORTA: (40, 4), _T.IVC: (38, 4), _T.HEART: (40, 4),
        _T.CORTICAL_BONE: (750, 40), _T.CANCELLOUS_BONE: (420, 30), _T.DISC: (80, 8), _T.CANAL: (25, 4),
    },
    ("CT", True): {
        _T.AIR: (-1000, 0), _T.FAT: (-100, 8), _T.MUSCLE: (55, 4), _T.INNER_FAT: (-90, 8), _T.BOWEL: (70, 8),
        _T.GAS: (-950, 10), _T.LUNG: (-850, 20), _T.LUNG_VESSEL: (150, 10), _T.LIVER: (105, 6), _T.SPLEEN: (110, 6),
        _T.KIDNEY: (155, 8), _T.STOMACH: (15, 4), _T.AORTA: (200, 12), _T.IVC: (130, 10), _T.HEART: (160, 10),
        _T.CORTICAL_BONE: (750, 40), _T.CANCELLOUS_BONE: (430, 30), _T.DISC: (85, 8), _T.CANAL: (25, 4),
    },
    ("MR", False): {
        _T.AIR: (0, 0), _T.FAT: (900, 30), _T.MUSCLE: (300, 15), _T.INNER_FAT: (850, 30), _T.BOWEL: (350, 20),
        _T.GAS: (5, 2), _T.LUNG: (20, 5), _T.LUNG_VESSEL: (60, 10), _T.LIVER: (450, 20), _T.SPLEEN: (350, 15),
        _T.KIDNEY: (320, 15), _T.STOMACH: (150, 15), _T.AORTA: (80, 10), _T.IVC: (90, 10), _T.HEART: (150, 15),
        _T.CORTICAL_BONE: (30, 5), _T.CANCELLOUS_BONE: (500, 30), _T.DISC: (250, 15), _T.CANAL: (300, 15),
    },
    ("MR", True): {
        _T.AIR: (0, 0), _T.FAT: (900, 30), _T.MUSCLE: (350, 15), _T.INNER_FAT: (850, 30), _T.BOWEL: (500, 30),
        _T.GAS: (5, 2), _T.LUNG: (20, 5), _T.LUNG_VESSEL: (300, 30), _T.LIVER: (700, 25), _T.SPLEEN: (600, 25),
        _T.KIDNEY: (650, 25), _T.STOMACH: (150, 15), _T.AORTA: (900, 30), _T.IVC: (800, 30), _T.HEART: (700, 30),
        _T.CORTICAL_BONE: (30, 5), _T.CANCELLOUS_BONE: (550, 30), _T.DISC: (250, 15), _T.CANAL: (300, 15),
    },
}


@dataclass(frozen=True)
class _LesionKind:
    """A kind of lesion: where it can sit, how it reads, its intensity and size ranges."""

    kind: str
    organs: tuple[str, ...]
    finding: str  # the noun phrase in the report ("hypodense lesion")
    intensity: dict[tuple[str, bool], tuple[float, float]]  # (modality, contrast) -> (low, high)
    diameter_mm: tuple[float, float]
    weight: float


_LESION_KINDS: tuple[_LesionKind, ...] = (
    _LesionKind(
        "liver_hypodense_lesion", ("liver",), "hypodense lesion",
        {("CT", False): (10, 20), ("CT", True): (35, 50), ("MR", False): (150, 250), ("MR", True): (250, 350)},
        (8.0, 30.0), 3.0,
    ),
    _LesionKind(
        "kidney_cyst", ("kidney_right", "kidney_left"), "hypodense cyst",
        {("CT", False): (0, 10), ("CT", True): (2, 12), ("MR", False): (60, 120), ("MR", True): (60, 120)},
        (6.0, 30.0), 2.0,
    ),
    _LesionKind(
        "kidney_hyperdense_lesion", ("kidney_right", "kidney_left"), "hyperdense lesion",
        {("CT", False): (65, 85), ("CT", True): (200, 230), ("MR", False): (650, 800), ("MR", True): (850, 950)},
        (6.0, 25.0), 1.0,
    ),
    _LesionKind(
        "lung_nodule", tuple(_LUNG_LOBES), "solid nodule",
        {("CT", False): (20, 45), ("CT", True): (40, 70), ("MR", False): (250, 350), ("MR", True): (400, 500)},
        (6.0, 25.0), 3.0,
    ),
    _LesionKind(
        "spleen_hypodense_lesion", ("spleen",), "hypodense lesion",
        {("CT", False): (15, 25), ("CT", True): (40, 60), ("MR", False): (150, 250), ("MR", True): (250, 350)},
        (8.0, 25.0), 1.0,
    ),
)


@dataclass(frozen=True)
class Lesion:
    """One rendered lesion; every size is measured on the rendered mask.

    Attributes:
        id: its value in the case's ``lesion_map`` (``LESION_ID_BASE + k``, k = 1, 2, ...).
        kind: ``"liver_hypodense_lesion"``, ``"kidney_cyst"``, ``"kidney_hyperdense_lesion"``,
            ``"lung_nodule"`` or ``"spleen_hypodense_lesion"``.
        organ: the TotalSegmentator name of the structure holding it (``"liver"``,
            ``"lung_lower_lobe_right"``, ...); every lesion voxel carries that organ's label.
        location: the phrase used in the report (``"right liver lobe"``,
            ``"upper pole of the left kidney"``, ``"right lower lobe"``, ``"spleen"``).
        diameter_mm: largest extent of the mask along x, y or z (voxel count times spacing),
            the size the report states (rounded to mm).
        extent_mm: the mask's extent along x, y, z (mm).
        axes_mm: the drawn ellipsoid's full axes along x, y, z (mm), before voxelisation.
        center_ras: ellipsoid centre in RAS world mm.
        center_voxel: the voxel holding the centre (always inside the mask).
        hu: nominal intensity before noise (HU for CT; arbitrary T1-like units for MR).
        voxel_count: number of voxels in the mask.
        volume_ml: ``voxel_count`` times the voxel volume, in mL.
    """

    id: int
    kind: str
    organ: str
    location: str
    diameter_mm: float
    extent_mm: tuple[float, float, float]
    axes_mm: tuple[float, float, float]
    center_ras: tuple[float, float, float]
    center_voxel: tuple[int, int, int]
    hu: float
    voxel_count: int
    volume_ml: float

    @property
    def sentence(self) -> str:
        """The report sentence naming this lesion, e.g. ``"A 12 mm hypodense lesion in the right liver lobe."``."""
        finding = next(k.finding for k in _LESION_KINDS if k.kind == self.kind)
        size = int(np.floor(self.diameter_mm + 0.5))  # half up: 10.5 mm reads "11 mm"
        article = "An" if str(size).startswith("8") or size in (11, 18) else "A"  # "an 8 mm", "an 18 mm"
        return f"{article} {size} mm {finding} in the {self.location}."


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case.

    Attributes:
        case_id: ``"phantom-s<seed>-<index>"``.
        image: the volume, ``(X, Y, Z)`` float32 holding whole numbers (HU for CT).
        label: uint8 organ label map on the same grid (TotalSegmentator ``total`` ids).
        lesion_map: uint8 map of the lesions (``LESION_ID_BASE + k``; 0 elsewhere).
        label_names: id -> name of the organ labels present in ``label``, ascending ids.
        lesions: the lesions, in id order.
        report: a few deterministic sentences naming each lesion (size, location) and normals.
        terms: the names of the structures present (``label_names`` values, ascending id).
        contrast: whether the case is contrast-enhanced (portal venous).
        seed, index: what :func:`make_case` was called with.
    """

    case_id: str
    image: Volume
    label: Volume
    lesion_map: Volume
    label_names: dict[int, str]
    lesions: tuple[Lesion, ...]
    report: str
    terms: tuple[str, ...]
    contrast: bool
    seed: int
    index: int


# ------------------------------------------------------------------------------------ geometry


class _Grid:
    """World coordinates (RAS mm) of the voxel centres, and masks of simple shapes on them."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        origin = -(np.asarray(shape, dtype=np.float64) - 1) / 2 * self.spacing
        self.affine = np.diag([*self.spacing, 1.0])
        self.affine[:3, 3] = origin
        self.axes = [origin[a] + np.arange(shape[a]) * self.spacing[a] for a in range(3)]
        self.x, self.y, self.z = self.axes

    def box(self, center: Sequence[float], half: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie within ``center +- half`` (mm); ``None`` if empty."""
        sl = []
        for a in range(3):
            lo = int(np.searchsorted(self.axes[a], center[a] - half[a], side="left"))
            hi = int(np.searchsorted(self.axes[a], center[a] + half[a], side="right"))
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)  # type: ignore[return-value]

    def ellipsoid(self, center: Sequence[float], semi: Sequence[float]) -> np.ndarray:
        """Boolean ``(X, Y, Z)`` mask of the voxel centres inside an axis-aligned ellipsoid (mm)."""
        mask = np.zeros(self.shape, dtype=bool)
        box = self.box(center, semi)
        if box is not None:
            mask[box] = self.ellipsoid_in(box, center, semi)
        return mask

    def ellipsoid_in(
        self, box: tuple[slice, slice, slice], center: Sequence[float], semi: Sequence[float]
    ) -> np.ndarray:
        """The ellipsoid's mask restricted to ``box`` (shape of the box)."""
        d = [np.square((self.axes[a][box[a]] - center[a]) / semi[a]) for a in range(3)]
        return d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :] <= 1.0

    def ellipse_xy(self, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        """Boolean ``(X, Y)`` mask inside an ellipse in the axial plane."""
        return np.square((self.x - cx) / ax)[:, None] + np.square((self.y - cy) / ay)[None, :] <= 1.0


@dataclass
class _Canvas:
    """The maps being painted; later strokes win."""

    tissue: np.ndarray  # uint8 _Tissue
    label: np.ndarray  # uint8 organ ids

    def paint(self, mask: np.ndarray, tissue: _Tissue, label: int | None = None) -> None:
        self.tissue[mask] = tissue
        if label is not None:
            self.label[mask] = label


# ------------------------------------------------------------------------------------ anatomy


@dataclass(frozen=True)
class _Anatomy:
    """Per-case anatomical parameters (mm), drawn once from the case's generator."""

    body_a: float  # half width (x)
    body_b: float  # half depth (y)
    body_cy: float  # body centre y (table height)
    fat: float  # subcutaneous fat thickness
    wall: float  # muscle wall thickness
    dome_z: float  # height of the right diaphragm dome; the left one is 10 mm lower
    y_vb: float  # vertebral body centre y
    scale: float  # overall size factor


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    s = rng.uniform(0.92, 1.06)
    body_b = 100.0 * s * rng.uniform(0.95, 1.1)
    body_cy = rng.uniform(-6.0, 6.0)
    return _Anatomy(
        body_a=128.0 * s,
        body_b=body_b,
        body_cy=body_cy,
        fat=body_b * rng.uniform(0.08, 0.2),
        wall=rng.uniform(8.0, 14.0),
        dome_z=30.0 + rng.uniform(-8.0, 8.0),
        # The vertebral body's centre lies about 39% of the way from the back to the front.
        y_vb=body_cy - 0.22 * body_b,
        scale=s,
    )


def _body_xy(g: _Grid, an: _Anatomy, inset: float) -> np.ndarray:
    """Axial body outline shrunk by ``inset`` mm: an ellipse in front, flattened behind (the back
    rests on the table), using only squares so the outline is the same on every CPU."""
    a, b = an.body_a - inset, an.body_b - inset
    u = np.square(g.x / a)[:, None]
    v = ((g.y - an.body_cy) / b)[None, :]
    return np.where(v >= 0, u + np.square(v), u + np.square(np.square(v))) <= 1.0


def _dome_z(g: _Grid, an: _Anatomy) -> np.ndarray:
    """``(X, Y)`` height of the diaphragm: two domes, lowest laterally and posteriorly (recesses)."""
    top = np.where(g.x >= 0, an.dome_z, an.dome_z - 10.0)[:, None]
    r2 = np.square((np.abs(g.x) - 55.0 * an.scale) / (65.0 * an.scale))[:, None] + np.square(
        (g.y - an.body_cy) / (85.0 * an.scale)
    )[None, :]
    return top - 45.0 * np.minimum(r2, 1.5)


def _jitter(rng: np.random.Generator, c: Sequence[float], sd: float = 4.0) -> np.ndarray:
    return np.asarray(c, dtype=np.float64) + np.clip(rng.normal(0.0, sd, 3), -2 * sd, 2 * sd)


def _render_anatomy(g: _Grid, an: _Anatomy, rng: np.random.Generator) -> tuple[_Canvas, dict[str, np.ndarray]]:
    """Paint tissues and organ labels; also return the anatomical centre/semi-axes of the kidneys
    (the report names kidney poles relative to the whole kidney, even where the grid crops it)."""
    cv = _Canvas(np.zeros(g.shape, np.uint8), np.zeros(g.shape, np.uint8))
    s, zd = an.scale, an.dome_z
    full_z = np.ones(g.shape[2], dtype=bool)

    def prism(xy: np.ndarray, zs: np.ndarray = full_z) -> np.ndarray:
        return xy[:, :, None] & zs[None, None, :]

    body = _body_xy(g, an, 0.0)
    cv.paint(prism(body), _T.FAT)
    cv.paint(prism(_body_xy(g, an, an.fat)), _T.MUSCLE)
    cavity_xy = _body_xy(g, an, an.fat + an.wall)
    cavity = prism(cavity_xy)
    cv.paint(cavity, _T.INNER_FAT)
    above = g.z[None, None, :] > _dome_z(g, an)[:, :, None]  # thorax side of the diaphragm
    below = cavity & ~above

    # Bowel loops below the liver: unlabelled soft tissue, some with gas.
    for _ in range(int(rng.integers(6, 13))):
        c = (rng.uniform(-80, 80) * s, an.body_cy + rng.uniform(-20, 60) * s, zd + rng.uniform(-160, -70))
        r = rng.uniform(10, 20, 3) * s
        loop = g.ellipsoid(c, r) & below
        cv.paint(loop, _T.BOWEL)
        if rng.random() < 0.4:
            cv.paint(loop & g.ellipsoid(c, r * 0.5), _T.GAS)

    # Lungs: two ellipses in the thorax, split into lobes by the fissures.
    lung_cy = an.body_cy - 5.0 * s
    fissure = (g.y - lung_cy)[None, :, None] + 0.9 * (g.z - (zd + 30.0))[None, None, :]  # < 0: lower lobe
    lower = np.broadcast_to(fissure < rng.uniform(-8, 8), g.shape)
    middle_z = (g.z < zd + 45.0 + rng.uniform(-8, 8))[None, None, :]
    for side in (1, -1):  # +1: patient's right (positive x)
        lx = side * 68.0 * s + rng.uniform(-4, 4)
        lung = prism(g.ellipse_xy(lx, lung_cy, 58.0 * s, 78.0 * s)) & cavity & above & (g.z < zd + 220.0)[None, None, :]
        lung &= (side * g.x > 12.0 * s)[:, None, None]  # mediastinum between the lungs
        if side == 1:
            cv.paint(lung & lower, _T.LUNG, _L["lung_lower_lobe_right"])
            cv.paint(lung & ~lower & middle_z, _T.LUNG, _L["lung_middle_lobe_right"])
            cv.paint(lung & ~lower & ~middle_z, _T.LUNG, _L["lung_upper_lobe_right"])
        else:
            cv.paint(lung & lower, _T.LUNG, _L["lung_lower_lobe_left"])
            cv.paint(lung & ~lower, _T.LUNG, _L["lung_upper_lobe_left"])

    heart_center = _jitter(rng, (-18 * s, an.body_cy + 45 * s, zd + 48))
    heart = g.ellipsoid(heart_center, np.array([58.0, 40.0, 52.0]) * s * rng.uniform(0.9, 1.1))
    cv.paint(heart & cavity & above, _T.HEART, _L["heart"])

    # Abdominal organs, each clipped to the cavity below the diaphragm.
    def organ(center, semi) -> np.ndarray:
        return g.ellipsoid(_jitter(rng, center), np.asarray(semi) * s * rng.uniform(0.88, 1.12)) & below

    stomach = organ((-55 * s, an.body_cy + 28 * s, zd - 45), (36, 36, 45))
    cv.paint(stomach, _T.STOMACH, _L["stomach"])
    sc = np.argwhere(stomach)
    if len(sc):  # a gas cap rises to the anterior (upper, supine) part of the lumen
        y_cut = np.quantile(g.y[sc[:, 1]], 0.9)
        cv.paint(stomach & (g.y > y_cut)[None, :, None], _T.GAS)
    cv.paint(organ((-78 * s, an.body_cy - 35 * s, zd - 52), (24, 46, 44)), _T.SPLEEN, _L["spleen"])
    front = an.body_cy + an.body_b - an.fat - an.wall  # inner surface of the anterior wall
    right_lobe = organ((58 * s, an.y_vb + 0.55 * (front - an.y_vb), zd - 55), (64, 80, 74))
    left_lobe = organ((-12 * s, an.body_cy + 35 * s, zd - 32), (52, 38, 34))
    liver = right_lobe | left_lobe
    cv.paint(liver, _T.LIVER, _L["liver"])
    kidneys: dict[str, np.ndarray] = {}
    for name, side, dz in (("kidney_right", 1, -92.0), ("kidney_left", -1, -78.0)):
        c = _jitter(rng, (side * 62 * s, an.y_vb - 4 * s, zd + dz))
        semi = np.array([26, 30, 52]) * s * rng.uniform(0.9, 1.1)
        kidneys[name] = np.concatenate([c, semi])
        cv.paint(g.ellipsoid(c, semi) & below, _T.KIDNEY, _L[name])

    # Great vessels: the aorta runs left-anterolateral to the spine in the chest and in front of
    # it in the abdomen; the IVC, right of it, ends in the right atrium.
    ao_r = rng.uniform(10.0, 13.0) * s
    for k, z in enumerate(g.z):
        t = min(max((z - (zd - 20.0)) / 40.0, 0.0), 1.0)  # 0: abdomen, 1: thorax
        lumen = g.ellipse_xy(-(12.0 + 13.0 * t) * s, an.y_vb + (20.0 - 12.0 * t) * s + ao_r, ao_r, ao_r) & body
        cv.tissue[:, :, k][lumen], cv.label[:, :, k][lumen] = _T.AORTA, _L["aorta"]
    ivc = prism(g.ellipse_xy(22 * s, an.y_vb + 30 * s, 13 * s, 9 * s), g.z < zd + 5.0)
    cv.paint(ivc, _T.IVC, _L["inferior_vena_cava"])

    muscle_xy = _body_xy(g, an, an.fat)
    canal_y = an.y_vb - 26.0 * s
    for name, side in (("autochthon_right", 1), ("autochthon_left", -1)):
        cv.paint(prism(g.ellipse_xy(side * 30 * s, canal_y - 30 * s, 22 * s, 21 * s) & muscle_xy), _T.MUSCLE, _L[name])
    _render_spine(g, an, cv, rng, canal_y)
    _render_lung_vessels(g, an, cv, rng)
    return cv, kidneys


def _render_spine(g: _Grid, an: _Anatomy, cv: _Canvas, rng: np.random.Generator, canal_y: float) -> None:
    """Vertebrae slice by slice: body (cortex, cancellous core), disc, arch, processes, cord."""
    s = an.scale
    level_h = 31.0 * s
    t10_z = an.dome_z + rng.uniform(-8, 8)
    outer = g.ellipse_xy(0, an.y_vb, 22 * s, 17 * s)
    core = g.ellipse_xy(0, an.y_vb, 19 * s, 14 * s)
    canal = g.ellipse_xy(0, canal_y, 9 * s, 8 * s)
    cord = g.ellipse_xy(0, canal_y, 5 * s, 5 * s)
    ring = g.ellipse_xy(0, canal_y, 15 * s, 14 * s) & ~canal & (g.y < an.y_vb - 10 * s)[None, :]
    yy, xx = g.y[None, :], np.abs(g.x)[:, None]
    spinous = (xx < 4 * s) & (yy < canal_y - 10 * s) & (yy > canal_y - 42 * s)
    transverse = (xx < 32 * s) & (np.abs(yy - canal_y) < 5 * s)
    t10 = _VERTEBRAE.index("T10")
    for k, z in enumerate(g.z):
        level = int(np.floor((z - t10_z) / level_h + 0.5))
        u = z - (t10_z + level * level_h)  # position within the level, mm from its centre
        idx = t10 + level
        if not 0 <= idx < len(_VERTEBRAE):
            continue
        lab = _L[f"vertebrae_{_VERTEBRAE[idx]}"]
        t, lbl = cv.tissue[:, :, k], cv.label[:, :, k]
        if abs(u) < 12.5 * s:
            t[outer], lbl[outer] = _T.CORTICAL_BONE, lab
            t[core] = _T.CANCELLOUS_BONE
        else:
            t[outer], lbl[outer] = _T.DISC, 0
        posterior = ring | (spinous if abs(u) < 10 * s else False) | (transverse if abs(u) < 6 * s else False)
        if abs(u) < 13 * s:
            t[posterior], lbl[posterior] = _T.CANCELLOUS_BONE, lab
        t[canal], lbl[canal] = _T.CANAL, 0
        lbl[cord] = _L["spinal_cord"]


def _render_lung_vessels(g: _Grid, an: _Anatomy, cv: _Canvas, rng: np.random.Generator) -> None:
    """A few straight vessels radiating from each hilum, one voxel thick, painted inside the lungs."""
    lung_ids = np.array([_L[n] for n in _LUNG_LOBES], dtype=np.uint8)
    inv = np.linalg.inv(g.affine)
    for side in (1, -1):
        hilum = np.array([side * 40.0 * an.scale, an.y_vb + 45.0 * an.scale, an.dome_z + 45.0])
        for _ in range(int(rng.integers(5, 9))):
            d = rng.normal(0.0, 1.0, 3)
            d[0] = side * (abs(d[0]) + 0.5)  # outwards, towards the chest wall
            d /= np.sqrt(np.sum(np.square(d)))
            pts = hilum + np.arange(0.0, rng.uniform(40.0, 100.0), 1.0)[:, None] * d
            ijk = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
            ijk = ijk[np.all((ijk >= 0) & (ijk < np.asarray(g.shape)), axis=1)]
            i, j, k = ijk.T
            hit = np.isin(cv.label[i, j, k], lung_ids)
            cv.tissue[i[hit], j[hit], k[hit]] = _T.LUNG_VESSEL


# ------------------------------------------------------------------------------------ lesions


def _lesion_location(organ: str, center: np.ndarray, kidneys: dict[str, np.ndarray]) -> str:
    """The report's phrase for a lesion centred at ``center`` (RAS mm) in ``organ``."""
    if organ == "liver":
        # The mid-sagittal plane (x = 0) stands in for the falciform ligament.
        return "right liver lobe" if center[0] > 0 else "left liver lobe"
    if organ in _LUNG_LOBES:
        return _LUNG_LOBES[organ]
    if organ in kidneys:
        cz, semi_z = kidneys[organ][2], kidneys[organ][5]
        side = "right" if organ.endswith("right") else "left"
        if center[2] > cz + semi_z / 3:
            part = "upper pole"
        elif center[2] < cz - semi_z / 3:
            part = "lower pole"
        else:
            part = "interpolar region"
        return f"{part} of the {side} kidney"
    return organ


def _place_lesions(
    g: _Grid,
    label: np.ndarray,
    count: int,
    rng: np.random.Generator,
    modality: str,
    contrast: bool,
    kidneys: dict[str, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Put ``count`` non-touching ellipsoidal lesions fully inside their organs.

    Returns the lesion map (uint8), the lesion intensity map (float, NaN outside lesions) and the
    lesions. A lesion that finds no room after a few tries (an organ cropped by a small field of
    view) is left out, so a case may hold fewer than ``count``.
    """
    lesion_map = np.zeros(g.shape, np.uint8)
    values = np.full(g.shape, np.nan, np.float32)
    lesions: list[Lesion] = []
    distance: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # organ -> (box origin, distance map mm)
    spacing = g.spacing
    weights = np.array([k.weight for k in _LESION_KINDS])
    for _ in range(count):
        for _attempt in range(6):
            kind = _LESION_KINDS[int(rng.choice(len(_LESION_KINDS), p=weights / weights.sum()))]
            organ = kind.organs[int(rng.integers(len(kind.organs)))]
            if organ not in distance:
                distance[organ] = _distance_inside(label == _L[organ], spacing)
            lo, dist = distance[organ]
            d = rng.uniform(*kind.diameter_mm)
            semi = np.full(3, d / 2) * np.where(np.arange(3) == rng.integers(3), 1.0, rng.uniform(0.7, 1.0, 3))
            # The centre moves off the voxel centre by at most half a voxel, and little enough that
            # the voxel still lies inside the ellipsoid, so every voxel within semi.max() + 0.9
            # voxel of it must be organ for the whole lesion to be.
            room = dist > semi.max() + 0.9 * spacing.max()
            for other in lesions:
                ov = np.asarray(other.center_voxel) - lo
                far = np.max(other.axes_mm) / 2 + semi.max() + 2 * spacing.max()
                room &= _far_from(room.shape, ov, spacing, far)
            cand = np.flatnonzero(room)
            if len(cand) == 0:
                continue
            vox = np.array(np.unravel_index(cand[int(rng.integers(len(cand)))], room.shape)) + lo
            step = np.minimum(0.5 * spacing, 0.99 * semi / np.sqrt(3.0))
            center = np.array([g.axes[a][vox[a]] for a in range(3)]) + rng.uniform(-1.0, 1.0, 3) * step
            box = g.box(center, semi)
            if box is None:
                continue
            mask = np.zeros(g.shape, dtype=bool)
            mask[box] = g.ellipsoid_in(box, center, semi)
            if not mask[tuple(vox)] or np.any(label[mask] != _L[organ]) or np.any(lesion_map[mask]):
                continue  # cannot happen by construction; never render a lesion that breaks the contract
            lid = LESION_ID_BASE + len(lesions) + 1
            hu = float(np.rint(rng.uniform(*kind.intensity[(modality, contrast)])))
            lesion_map[mask] = lid
            values[mask] = hu
            idx = np.argwhere(mask)
            extent = (idx.max(0) - idx.min(0) + 1) * spacing
            n = int(mask.sum())
            lesions.append(
                Lesion(
                    id=lid,
                    kind=kind.kind,
                    organ=organ,
                    location=_lesion_location(organ, center, kidneys),
                    diameter_mm=float(extent.max()),
                    extent_mm=tuple(float(e) for e in extent),
                    axes_mm=tuple(float(2 * r) for r in semi),
                    center_ras=tuple(float(c) for c in center),
                    center_voxel=tuple(int(v) for v in vox),
                    hu=hu,
                    voxel_count=n,
                    volume_ml=float(n * np.prod(spacing) / 1000.0),
                )
            )
            break
    return lesion_map, values, lesions


def _distance_inside(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) from each organ voxel to the nearest non-organ voxel centre, on the organ's
    bounding box padded by one voxel (so the grid edge counts as outside)."""
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return np.zeros(3, np.int64), np.zeros((1, 1, 1))
    lo, hi = idx.min(0), idx.max(0) + 1
    crop = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    return lo, dist


def _far_from(shape: tuple[int, ...], center: np.ndarray, spacing: np.ndarray, radius: float) -> np.ndarray:
    """Boolean ``shape``: voxels farther than ``radius`` mm from the voxel ``center``."""
    d = [np.square((np.arange(shape[a]) - center[a]) * spacing[a]) for a in range(3)]
    return d[0][:, None, None] + d[1][None, :, None] + d[2][None, None, :] > radius * radius


# ------------------------------------------------------------------------------------ report


def _report(lesions: Sequence[Lesion], modality: str, contrast: bool) -> str:
    """Technique, then findings organ by organ (each lesion with size and location) and normals."""
    by = {k: [l.sentence for l in lesions if l.kind.split("_")[0] == k] for k in ("lung", "liver", "spleen", "kidney")}
    if modality == "CT":
        tech = "Contrast-enhanced CT" if contrast else "Non-contrast CT"
    else:
        tech = "Contrast-enhanced T1-weighted MR" if contrast else "T1-weighted MR"
    out = [f"{tech} of the lower chest and upper abdomen."]
    out += by["lung"] or ["No pulmonary nodules."]
    out.append("No pleural effusion.")
    out += by["liver"] or ["The liver is normal in size without focal lesions."]
    out += by["spleen"]
    out.append("The spleen is normal in size.")
    out += by["kidney"] or ["Both kidneys are unremarkable."]
    out.append("The abdominal aorta is normal in calibre.")
    return " ".join(out)


# ------------------------------------------------------------------------------------ public API


def _check_args(
    shape: Sequence[int], spacing: Sequence[float], lesion_rate: float, modality: str, max_lesions: int
) -> tuple[tuple[int, int, int], tuple[float, float, float], str]:
    """Validated ``(shape, spacing, modality)``; :class:`ConfigError` naming the bad argument."""
    try:
        shape_t = tuple(int(v) for v in shape)
        spacing_t = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise ConfigError(f"shape and spacing must be 3 numbers, got shape={shape!r}, spacing={spacing!r}") from None
    if len(shape_t) != 3 or min(shape_t) < 8:
        raise ConfigError(f"shape must be 3 sizes of at least 8 voxels, got {shape!r}")
    if len(spacing_t) != 3 or not all(np.isfinite(spacing_t)) or min(spacing_t) <= 0:
        raise ConfigError(f"spacing must be 3 positive sizes in mm, got {spacing!r}")
    if not 0.0 <= float(lesion_rate) <= 1.0:
        raise ConfigError(f"lesion_rate must be a probability in [0, 1], got {lesion_rate!r}")
    if not 0 <= int(max_lesions) <= 3:
        raise ConfigError(f"max_lesions must be 0 to 3, got {max_lesions!r}")
    mod = str(modality).upper()
    if mod not in ("CT", "MR"):
        raise ConfigError(f"modality must be 'CT' or 'MR', got {modality!r}")
    return shape_t, spacing_t, mod  # type: ignore[return-value]


def make_case(
    seed: int,
    *,
    index: int = 0,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    lesion_rate: float = 0.7,
    max_lesions: int = 3,
    contrast_rate: float = 0.5,
    modality: str = "CT",
) -> PhantomCase:
    """One synthetic case, identical for identical arguments.

    Args:
        seed, index: the case's identity; its generator is
            ``Generator(PCG64(SeedSequence(seed, spawn_key=(index,))))``, so case ``index`` of
            :func:`make_cohort` can be remade alone.
        shape: grid size ``(X, Y, Z)`` in voxels.
        spacing: voxel size in mm; the field of view is ``shape * spacing``.
        lesion_rate: probability that the case has lesions; if it has, their number is uniform in
            ``1..max_lesions``.
        max_lesions: at most this many lesions (0 to 3).
        contrast_rate: probability that the case is contrast-enhanced (portal venous phase).
        modality: ``"CT"`` (HU) or ``"MR"`` (T1-weighted-like, arbitrary units).

    Returns:
        A :class:`PhantomCase`.
    """
    shape_t, spacing_t, mod = _check_args(shape, spacing, lesion_rate, modality, max_lesions)
    if int(seed) < 0 or int(index) < 0:
        raise ConfigError(f"seed and index must be non-negative integers, got seed={seed!r}, index={index!r}")
    if not 0.0 <= float(contrast_rate) <= 1.0:
        raise ConfigError(f"contrast_rate must be a probability in [0, 1], got {contrast_rate!r}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed), spawn_key=(int(index),))))
    g = _Grid(shape_t, spacing_t)
    contrast = bool(rng.random() < contrast_rate)
    an = _draw_anatomy(rng)
    cv, kidneys = _render_anatomy(g, an, rng)

    # Per-case intensity of each tissue: its mean plus a normal deviation, clipped at 2 sd so
    # no case falls outside the plausible range.
    table = np.zeros(len(_Tissue), np.float32)
    for tissue, (mean, sd) in _INTENSITY[(mod, contrast)].items():
        table[tissue] = mean + (float(np.clip(rng.normal(0.0, sd), -2 * sd, 2 * sd)) if sd else 0.0)
    image = table[cv.tissue]

    has_lesions = bool(rng.random() < lesion_rate) and max_lesions > 0
    count = int(rng.integers(1, max_lesions + 1)) if has_lesions else 0
    lesion_map, lesion_values, lesions = _place_lesions(g, cv.label, count, rng, mod, contrast, kidneys)
    inside = lesion_map > 0
    image[inside] = lesion_values[inside]

    if mod == "CT":
        image += rng.standard_normal(g.shape, dtype=np.float32) * np.float32(rng.uniform(10.0, 18.0))
        image = np.clip(np.rint(image), -1024, 3071)
    else:  # magnitude images: Rician noise keeps air positive and dark
        sigma = np.float32(rng.uniform(8.0, 15.0))
        re = image + rng.standard_normal(g.shape, dtype=np.float32) * sigma
        im = rng.standard_normal(g.shape, dtype=np.float32) * sigma
        image = np.clip(np.rint(np.sqrt(re * re + im * im)), 0, 4095)
    image = image.astype(np.float32)

    case_id = f"phantom-s{int(seed)}-{int(index):03d}"
    header = {"phantom_seed": int(seed), "phantom_index": int(index), "contrast": contrast}
    source = SourceInfo(format="array", header=header)
    present = np.unique(cv.label)
    names_by_id = {v: k for k, v in PHANTOM_LABELS.items()}
    label_names = {int(i): names_by_id[int(i)] for i in present if i}
    return PhantomCase(
        case_id=case_id,
        image=Volume(image, g.affine, modality=mod, source=source),
        label=Volume(cv.label, g.affine, modality="unknown", source=source),
        lesion_map=Volume(lesion_map, g.affine, modality="unknown", source=source),
        label_names=label_names,
        lesions=tuple(lesions),
        report=_report(lesions, mod, contrast),
        terms=tuple(label_names.values()),
        contrast=contrast,
        seed=int(seed),
        index=int(index),
    )


def make_cohort(
    n: int,
    seed: int,
    *,
    shape: Sequence[int] = (96, 96, 64),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    lesion_rate: float = 0.7,
    max_lesions: int = 3,
    contrast_rate: float = 0.5,
    modality: str = "CT",
) -> list[PhantomCase]:
    """``n`` cases: ``make_case(seed, index=i, ...)`` for ``i < n`` (so a cohort's first cases do
    not depend on ``n``). See :func:`make_case` for the arguments."""
    if int(n) < 1:
        raise ConfigError(f"n must be at least 1, got {n!r}")
    _check_args(shape, spacing, lesion_rate, modality, max_lesions)
    return [
        make_case(
            seed, index=i, shape=shape, spacing=spacing, lesion_rate=lesion_rate, max_lesions=max_lesions,
            contrast_rate=contrast_rate, modality=modality,
        )
        for i in range(int(n))
    ]


def write_cohort(cases: Sequence[PhantomCase], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write a cohort as files and return the datalist's path.

    Layout (paths in the datalist and JSON are relative to ``out_dir``)::

        out_dir/images/<case_id>.nii.gz   image (int16 HU for CT)
        out_dir/labels/<case_id>.nii.gz   organ label map (uint8, TotalSegmentator ids)
        out_dir/lesions/<case_id>.nii.gz  lesion map (uint8, LESION_ID_BASE + k)
        out_dir/datalist.csv              image,label,report,terms,modality,case_id,lesion_map
        out_dir/lesions.json              {"label_names", "lesion_id_base", "cases": [{case_id,
                                           image, label, lesion_map, contrast, report, lesions}]}

    Every file is written atomically; if any exists and ``overwrite`` is false, nothing is
    written. The datalist is written last, so it never names a file that is not there.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is false.
        ConfigError: no cases, or two cases with the same ``case_id``.
    """
    cases = list(cases)
    if not cases:
        raise ConfigError("no cases to write", out_dir)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"case ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}", out_dir)
    out = Path(out_dir).expanduser()
    rel = {c.case_id: {k: f"{k}/{c.case_id}.nii.gz" for k in ("images", "labels", "lesions")} for c in cases}
    datalist_path, json_path = out / "datalist.csv", out / "lesions.json"
    for p in [datalist_path, json_path, *(out / r for paths in rel.values() for r in paths.values())]:
        check_writable(p, overwrite)

    entries, records, names = [], [], {}
    for c in cases:
        r = rel[c.case_id]
        write_nifti(c.image, out / r["images"], overwrite=overwrite, dtype=np.int16)
        write_nifti(c.label, out / r["labels"], overwrite=overwrite)
        write_nifti(c.lesion_map, out / r["lesions"], overwrite=overwrite)
        names.update(c.label_names)
        entries.append(
            DatalistEntry(
                image=out / r["images"],
                label=out / r["labels"],
                report=c.report,
                terms=c.terms,
                modality=c.image.modality,
                extra={"case_id": c.case_id, "lesion_map": r["lesions"]},
            )
        )
        records.append(
            {
                "case_id": c.case_id,
                "image": r["images"],
                "label": r["labels"],
                "lesion_map": r["lesions"],
                "contrast": c.contrast,
                "report": c.report,
                "lesions": [asdict(les) for les in c.lesions],
            }
        )
    doc = {
        "label_names": {str(k): v for k, v in sorted(names.items())},
        "lesion_id_base": LESION_ID_BASE,
        "cases": records,
    }
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n", overwrite=overwrite)
    return write_datalist(entries, datalist_path, overwrite=overwrite)
