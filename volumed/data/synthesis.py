"""CT images synthesised from label maps (after SynthSeg, Billot et al., Medical Image Analysis 2023).

Label maps without their CTs (TotalSegmentator subjects, an abdominal atlas, an AbdomenAtlas case)
teach the network *shape*: each training patch gets a new image drawn from its label map, with
random per-structure intensities from CT-plausible ranges (:mod:`volumed.data.hu_priors`), a random
elastic deformation, blur, noise and a multiplicative bias field, so that no intensity, texture
or scanner is the same twice and only the anatomy carries over.

Two steps::

    label map source (masks folder, id map + colour table, {name: mask})
      -> load_label_map_case: RAS, model spacing (nearest), one class per structure,
         body layers added where nothing is labelled (below), cropped to the body
         -> LabelMapCase: classes (1, x, y, z) int16, class_names, class_tissues, annotated terms
    per training patch (classes cropped with the patch, (1, px, py, pz)):
      -> CTSynthesizer: elastic deformation of the classes (TorchIO, nearest)
         -> targets from the deformed classes (term k = union of its classes)
         -> TorchIO RandomLabelsToImage: one mean and one std per TISSUE, drawn from its range in
            a phase drawn per patch (native / portal / arterial), each class within a few HU of
            its tissue's (all lobes, all bones, all muscles alike, as in a CT), in HU + 1000
            (attenuation, 0 = air), so the bias field multiplies attenuation, not HU
         -> texture (lung vessels, bone cortex) and, optionally, a contrast heart's wall
         -> TorchIO RandomBlur, RandomBiasField, RandomNoise -> HU -> the model's window, [0, 1]

Why TorchIO: it implements exactly the SynthSeg generator (``RandomLabelsToImage``, written after
Billot et al.) together with the deformation, blur, bias-field, noise and anisotropy transforms it
needs, on the tensors and affines we already use; it is maintained (releases every few months),
installs from PyPI without touching the pinned torch, and it is widely used in medical imaging.
cornucopia offers similar generators but is GPU-first and less established.

Body layers. A label map labels organs, bones and some muscles, not the body around them. So the
body is rebuilt: per axial slice, the convex hull of everything labelled (the trunk) is filled
with ``soft`` and ``fat`` (a smooth random split: mesentery, retroperitoneal fat), then wrapped in
a ``muscle`` wall and a ``fat`` subcutaneous layer of random thickness; everything outside is
``air``. Those four classes are never training targets. Optionally (:func:`extend_thighs`), a map
that ends across both femoral shafts gets thighs drawn below it, since no label map here reaches
mid-thigh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from volumed.data.hu_priors import PHASES, TISSUES, tissue_of
from volumed.errors import ConfigError

__all__ = [
    "BODY_CLASSES",
    "CTSynthesizer",
    "LabelMapCase",
    "add_body_layers",
    "extend_thighs",
    "read_colour_table",
    "read_structures",
]

#: Classes 0..3 of every synthetic class map: outside, subcutaneous fat, muscle wall, inner fill
#: fat, inner fill soft tissue. Structures follow from 5 on.
BODY_CLASSES: tuple[tuple[str, str], ...] = (
    ("outside", "air"),
    ("subcutaneous_fat", "fat"),
    ("body_wall", "muscle"),
    ("inner_fat", "fat"),
    ("inner_soft_tissue", "soft"),
)


def read_colour_table(path: str | Path) -> dict[int, str]:
    """A 3D Slicer colour table (``value name r g b a`` per line, ``#`` comments) as ``{value: name}``.

    Raises:
        ConfigError: a line that is not ``value name ...``.
    """
    path = Path(path)
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            out[int(parts[0])] = parts[1]
        except (ValueError, IndexError):
            raise ConfigError(f"line {n} is not 'value name r g b a': {line!r}", path) from None
    return out


def read_structures(
    *,
    masks_dir: str | Path | None = None,
    masks: Mapping[str, str | Path] | None = None,
    label: str | Path | None = None,
    colour_table: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read one label-map source into a class map on its own grid.

    Exactly one style: ``masks_dir`` (one binary mask per structure, ``<name>.nii.gz``, e.g. a
    TotalSegmentator ``segmentations/`` folder), ``masks`` (``{name: mask file}``) or ``label`` (an
    integer map) with ``colour_table`` (its names; values without a name become ``label_<v>``).

    Returns:
        ``(classes, affine, names)``: ``classes`` ``(X, Y, Z)`` int16 with 0 = unlabelled and
        ``c >= 1`` = ``names[c - 1]``; the voxel-to-RAS affine. Empty structures are dropped. Where
        masks overlap, the later file (sorted by name) wins.

    Raises:
        ConfigError: no style or several, a missing file, masks on different grids.
    """
    from volumed.io import read_label

    styles = [s for s in (masks_dir, masks, label) if s is not None]
    if len(styles) != 1:
        raise ConfigError("give exactly one of masks_dir, masks or label (with colour_table)", "label map")
    if label is not None:
        vol = read_label(label)
        ids = np.asarray(vol.data).astype(np.int64)
        table = read_colour_table(colour_table) if colour_table is not None else {}
        values = [int(v) for v in np.unique(ids) if v != 0]
        if len(values) > np.iinfo(np.int16).max:
            raise ConfigError(f"{len(values)} structures: too many for an int16 class map", label)
        lut = np.zeros(int(ids.max()) + 1, dtype=np.int16)
        for c, v in enumerate(values, 1):
            lut[v] = c
        return lut[np.clip(ids, 0, None)], vol.affine, [table.get(v, f"label_{v}") for v in values]
    if masks_dir is not None:
        folder = Path(masks_dir)
        files = sorted(folder.glob("*.nii.gz")) + sorted(folder.glob("*.nii"))
        if not files:
            raise ConfigError("no *.nii.gz masks in the folder", folder)
        items = [(f.name[: -len(".nii.gz")] if f.name.endswith(".nii.gz") else f.stem, f) for f in files]
    else:
        items = sorted((str(k), Path(v)) for k, v in dict(masks).items())  # type: ignore[arg-type]
    classes: np.ndarray | None = None
    affine = None
    names: list[str] = []
    for name, file in items:
        if not file.is_file():
            raise ConfigError(f"mask of {name!r} does not exist", file)
        vol = read_label(file)
        data = np.asarray(vol.data) > 0
        if classes is None:
            classes, affine = np.zeros(data.shape, dtype=np.int16), vol.affine
        elif data.shape != classes.shape or not np.allclose(vol.affine, affine, atol=1e-3):
            raise ConfigError(f"mask of {name!r} is on another grid than the first mask", file)
        if data.any():
            names.append(name)
            classes[data] = len(names)
    assert classes is not None and affine is not None
    return classes, affine, names


#: Mean HU of enhanced myocardium by contrast phase (:meth:`CTSynthesizer.add_heart_wall`): it
#: enhances less than the blood pool (native: as blood, so no wall is drawn).
MYOCARDIUM_HU: dict[str, tuple[float, float]] = {"portal": (80.0, 130.0), "arterial": (90.0, 160.0)}


def _hull_fill(mask2d: np.ndarray) -> np.ndarray:
    """The filled convex hull of a 2-D mask (the mask itself when it is degenerate)."""
    rows = np.flatnonzero(mask2d.any(1))
    if len(rows) == 0:
        return mask2d.copy()
    # The hull of all points is the hull of each row's two extreme points: far fewer to wrap.
    first = mask2d[rows].argmax(1)
    last = mask2d.shape[1] - 1 - mask2d[rows, ::-1].argmax(1)
    pts = np.unique(np.concatenate([np.c_[rows, first], np.c_[rows, last]]), axis=0).astype(np.float64)
    if len(pts) < 3:
        return mask2d.copy()
    try:
        hull = ConvexHull(pts)
    except QhullError:  # all points on a line
        return mask2d.copy()
    lo, hi = pts.min(0).astype(int), pts.max(0).astype(int) + 1
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 2)
    # Inside = on the inner side of every facet: normal . p + offset <= 0 (a small tolerance keeps
    # the hull's own boundary voxels).
    inside = (grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 1e-6).all(1).reshape(hi - lo)
    out = mask2d.copy()
    out[lo[0]:hi[0], lo[1]:hi[1]] |= inside
    return out


def _ball(radius: int) -> np.ndarray:
    r = int(radius)
    z, y, x = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
    return (x * x + y * y + z * z) <= r * r


def add_body_layers(
    classes: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, *, wall_mm: tuple[float, float] = (4.0, 9.0),
    fat_mm: tuple[float, float] = (6.0, 25.0),
) -> np.ndarray:
    """Fill the unlabelled body of a structure class map (``c >= 1`` = structure ``c``).

    Returns a new map with the structures shifted to ``c + len(BODY_CLASSES) - 1`` and the body
    classes of :data:`BODY_CLASSES` where nothing was labelled (module docstring): per axial slice
    the convex hull of all structures is the trunk (its unlabelled voxels split into inner fat and
    soft tissue by a smooth random field), then a muscle wall of ``wall_mm`` and subcutaneous fat
    of ``fat_mm`` (each drawn once per map), air outside.

    Args:
        classes: ``(X, Y, Z)`` int16, RAS, ``Z`` the axial axis.
        spacing: voxel size in mm.
    """
    labelled = classes > 0
    trunk = np.zeros_like(labelled)
    for k in range(classes.shape[2]):
        if labelled[:, :, k].any():
            trunk[:, :, k] = _hull_fill(labelled[:, :, k])
    sp = float(np.mean(spacing[:2]))
    wall_r = max(1, round(rng.uniform(*wall_mm) / sp))
    fat_r = max(1, round(rng.uniform(*fat_mm) / sp))
    # In-plane dilation only (a 2-D disc per slice): the body does not grow beyond the labelled slices.
    def grow(mask: np.ndarray, r: int) -> np.ndarray:
        disc = _ball(r)[:, :, r : r + 1]
        return ndimage.binary_dilation(mask, structure=disc)

    wall = grow(trunk, wall_r)
    body = grow(wall, fat_r)
    out = np.where(labelled, classes.astype(np.int32) + len(BODY_CLASSES) - 1, 0).astype(np.int16)
    # Smooth random split of the unlabelled trunk into fat and soft tissue (blobs of ~2 cm).
    field = ndimage.gaussian_filter(rng.standard_normal(classes.shape).astype(np.float32), sigma=[20.0 / s for s in spacing])
    free = trunk & ~labelled
    out[free & (field > 0)] = 3
    out[free & (field <= 0)] = 4
    out[wall & ~trunk] = 2
    out[body & ~wall] = 1
    return out


def extend_thighs(
    layered: np.ndarray, names: Sequence[str], spacing: Sequence[float], rng: np.random.Generator, *,
    length_mm: tuple[float, float] = (120.0, 200.0), thigh_mm: tuple[float, float] = (55.0, 75.0),
    fat_mm: tuple[float, float] = (8.0, 25.0), adduction_deg: tuple[float, float] = (3.0, 8.0), min_femur_mm: float = 60.0,
    gap_mm: float = 10.0,
) -> np.ndarray:
    """Thighs drawn below a body-layered class map that ends across both femoral shafts.

    A label map that stops at the upper thigh (TotalSegmentator s0327: the top 11 cm of the femurs)
    teaches no mid-thigh, and its body layers hull both thighs into one blob; a real CT that goes on
    to the knees then shows femoral shafts in two separate thighs that no training image held (the
    leave-one-out models call them "hip", docs/synthesis.md round 21). Where the lowest labelled
    slice holds both femurs, no hip bone, and each femur reaches at least ``min_femur_mm`` above it
    (a shaft, not a femoral head), the map is padded below with ``length_mm`` of thighs: each femur's
    lowest cross-section carried down, drifting towards the midline by the adduction angle, in a
    thigh of muscle (an ellipse of ``thigh_mm`` half-axes round a point a little medial and anterior
    of the femur, tapering by up to a fifth) inside subcutaneous fat, with at least ``gap_mm`` of air
    between the thighs.
    Other maps are returned as they are.

    Args:
        layered: ``(X, Y, Z)`` int16 from :func:`add_body_layers` (RAS, ``Z`` axial, structures from
            class ``len(BODY_CLASSES)`` on, in the order of ``names``).
        names: structure names, class ``len(BODY_CLASSES) + i`` is ``names[i]``.
        spacing: voxel size in mm.
    """
    offset = len(BODY_CLASSES)
    ids = {n: offset + i for i, n in enumerate(names)}
    femurs = [ids.get("femur_left"), ids.get("femur_right")]
    if None in femurs:
        return layered
    body_z = np.flatnonzero((layered > 0).any((0, 1)))
    if len(body_z) == 0:
        return layered
    k0 = int(body_z[0])
    bottom = layered[:, :, k0]
    hips = [ids[n] for n in ("hip_left", "hip_right") if n in ids]
    if not all((bottom == f).any() for f in femurs) or any((bottom == h).any() for h in hips):
        return layered
    for f in femurs:
        zs = np.flatnonzero((layered == f).any((0, 1)))
        if (zs.max() - k0) * spacing[2] < min_femur_mm:
            return layered
    n_new = int(round(rng.uniform(*length_mm) / spacing[2]))
    out = np.pad(layered, ((0, 0), (0, 0), (n_new, 0)))
    centres = [np.argwhere(bottom == f).mean(0) for f in femurs]
    mid_x = 0.5 * (centres[0][0] + centres[1][0]) * spacing[0]
    body = np.argwhere(bottom > 0)
    body_lo, body_hi = body.min(0) * np.asarray(spacing[:2]), (body.max(0) + 1) * np.asarray(spacing[:2])
    xs, ys = np.meshgrid(np.arange(out.shape[0]) * spacing[0], np.arange(out.shape[1]) * spacing[1], indexing="ij")
    draws = []
    for f, c in zip(femurs, centres):
        side = np.sign(c[0] * spacing[0] - mid_x)  # +1: the femur lies at higher x than the midline
        femur_x = np.argwhere(bottom == f)[:, 0] * spacing[0]
        femur_lateral = float(femur_x.max() + spacing[0] if side > 0 else femur_x.min())
        body_lateral = float(body_hi[0] if side > 0 else body_lo[0])
        room = abs(body_lateral - femur_lateral)  # body wall and fat lateral to the femur at the lowest slice
        fat = min(rng.uniform(*fat_mm), max(2.0, room - 8.0))
        lateral_edge = femur_lateral + side * min(room, fat + rng.uniform(8.0, 20.0))
        half_x = min(rng.uniform(*thigh_mm), abs(lateral_edge - mid_x) / 2.0)
        half_y = min(rng.uniform(*thigh_mm), (body_hi[1] - body_lo[1]) / 2.0 + 10.0)
        shape = dict(
            cx=lateral_edge - side * half_x, cy=c[1] * spacing[1] + rng.uniform(0.0, 10.0),  # a little anterior (RAS: +y)
            a=half_x, b=half_y, fat=fat, side=side,
            tan=math.tan(math.radians(rng.uniform(*adduction_deg))), taper=rng.uniform(0.0, 0.2),
        )
        draws.append((f, shape))
    for k in range(n_new):  # new slices 0..n_new-1; the map's old lowest slice is now n_new
        depth_mm = (n_new - k) * spacing[2]
        sl = np.zeros(out.shape[:2], dtype=out.dtype)
        femur_here = []
        for f, d in draws:
            dx_mm = -d["side"] * depth_mm * d["tan"]  # the shaft converges on the knee
            scale = 1.0 - d["taper"] * depth_mm / (n_new * spacing[2])
            a, b = d["a"] * scale, d["b"] * scale
            cx = d["cx"] + dx_mm + d["side"] * (d["a"] - a)  # tapering keeps the lateral edge's drift
            r = ((xs - cx) / a) ** 2 + ((ys - d["cy"]) / b) ** 2
            inner = ((xs - cx) / max(a - d["fat"], 1.0)) ** 2 + ((ys - d["cy"]) / max(b - d["fat"], 1.0)) ** 2
            from_mid = d["side"] * (xs - mid_x)  # the thighs stay apart, each wrapped in its fat
            sl[(r <= 1.0) & (from_mid >= gap_mm / 2.0) & (sl == 0)] = 1  # subcutaneous fat
            sl[(inner <= 1.0) & (from_mid >= gap_mm / 2.0 + d["fat"]) & (sl <= 1)] = 2  # muscle
            femur_here.append((f, np.roll(bottom == f, int(round(dx_mm / spacing[0])), axis=0)))
        for f, m in femur_here:
            sl[m] = f
        out[:, :, k] = sl
    return out


@dataclass
class LabelMapCase:
    """A label-map source in model space, ready for synthesis.

    Attributes:
        classes: ``(1, x, y, z)`` int16 class map (RAS, model spacing): 0..4 the body classes of
            :data:`BODY_CLASSES`, then one class per structure.
        class_names: name of each class (index = class id).
        class_tissues: tissue of each class (:data:`volumed.data.hu_priors.TISSUES` key).
        terms: the annotated terms (what the source can teach; see the datalist rules).
        term_classes: for each term, the class ids whose union is it (empty: annotated absent).
        name: where it came from.
    """

    classes: torch.Tensor
    class_names: tuple[str, ...]
    class_tissues: tuple[str, ...]
    terms: tuple[str, ...]
    term_classes: tuple[tuple[int, ...], ...]
    name: str = ""

    def lookup(self) -> torch.Tensor:
        """``(C, K)`` bool: class ``c`` belongs to term ``k``."""
        table = torch.zeros((len(self.class_names), len(self.terms)), dtype=torch.bool)
        for k, ids in enumerate(self.term_classes):
            for c in ids:
                table[c, k] = True
        return table

    def masks(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Term masks ``(K, ...)`` uint8 of a class map (default: the whole case), one lookup."""
        cls = (self.classes if classes is None else classes)[0].long()
        return self.lookup()[cls].movedim(-1, 0).to(torch.uint8)


class CTSynthesizer:
    """Draws a CT patch from a class-map patch (module docstring), with TorchIO.

    Args:
        class_tissues: tissue of each class id.
        spacing: voxel size of the patch, mm (blur and deformation are set in mm).
        ct_window: HU mapped to ``[0, 1]`` (the model's preprocessing).
        deform_mm: largest elastic displacement, mm (0: none).
        phases: contrast phases to draw from, uniformly.
        seed: seeds the generator (TorchIO draws from torch's global generator; this seeds it per
            call from our own generator so that a worker's samples are reproducible).
        structure_jitter_hu: how far a structure's mean may stray from its tissue's, HU (each
            tissue gets one mean per patch; see ``__call__``).
        texture: add the texture a CT has and a label map lacks (:meth:`add_texture`): vessels
            in the lungs, a cortical shell on bones.
        heart_wall: with contrast (portal, arterial), draw the heart as blood pool inside a
            darker myocardium and septum (:meth:`add_heart_wall`); a label map has one "heart".
        enhancement: ``(low, high)`` in [0, 1]: with contrast, each patch draws one fraction ``f``
            in this range and every tissue's mean range becomes ``native + f * (phase - native)``
            (both ends), so that a patch may enhance less than the phase's prior: contrast dose,
            injection rate and timing vary between scans, and a real portal-venous scan may show
            a spleen of 80 HU beside a liver of 90 HU, between the native and portal priors. The
            default ``(1, 1)`` draws nothing (the priors as they are, the same random stream).
        surroundings: probability that a patch gets arms beside the trunk, and (drawn on its
            own) the probability that it gets a scanner table under the back
            (:meth:`add_surroundings`); 0 (the default) draws nothing, the same random stream.
        class_names: name of each class id; arms are not drawn in a patch that holds a femur or
            hip (a synthetic arm beside the thighs would look like a thigh labelled background).

    Call: ``(classes (1, px, py, pz) int) -> (image (1, px, py, pz) float32 in [0, 1],
    deformed classes (1, px, py, pz) int16, phase)``.
    """

    def __init__(
        self,
        class_tissues: Sequence[str],
        spacing: Sequence[float],
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        deform_mm: float = 6.0,
        phases: Sequence[str] = PHASES,
        seed: int = 0,
        structure_jitter_hu: float = 5.0,
        texture: bool = True,
        heart_wall: bool = False,
        enhancement: Sequence[float] = (1.0, 1.0),
        surroundings: float = 0.0,
        class_names: Sequence[str] | None = None,
    ):
        import torchio as tio

        unknown = sorted(set(class_tissues) - set(TISSUES))
        if unknown:
            raise ConfigError(f"unknown tissues {unknown}; known: {sorted(TISSUES)}", "class_tissues")
        self.class_tissues = list(class_tissues)
        self.spacing = tuple(float(s) for s in spacing)
        self.window = (float(ct_window[0]), float(ct_window[1]))
        self.phases = tuple(phases)
        self.rng = np.random.default_rng(seed)
        self.structure_jitter_hu = float(structure_jitter_hu)
        self.texture = bool(texture)
        self.heart_wall = bool(heart_wall)
        low, high = (float(v) for v in enhancement)
        if not 0.0 <= low <= high <= 1.0:
            raise ConfigError(f"enhancement must be (low, high) with 0 <= low <= high <= 1, got {tuple(enhancement)}",
                              "enhancement")
        self.enhancement = (low, high)
        if not 0.0 <= float(surroundings) <= 1.0:
            raise ConfigError(f"surroundings must be a probability in [0, 1], got {surroundings!r}", "surroundings")
        self.surroundings = float(surroundings)
        if class_names is not None and len(class_names) != len(self.class_tissues):
            raise ConfigError(f"{len(class_names)} class names for {len(self.class_tissues)} classes", "class_names")
        self._limb = torch.tensor([n.startswith(("femur", "hip")) for n in class_names] if class_names is not None
                                  else [False] * len(self.class_tissues))
        self._heart = torch.tensor([t == "heart" for t in self.class_tissues])
        self._lung = torch.tensor([t == "lung" for t in self.class_tissues])
        self._bone = torch.tensor([t == "bone" for t in self.class_tissues])
        self.deform = (
            tio.RandomElasticDeformation(num_control_points=6, max_displacement=float(deform_mm), locked_borders=2)
            if deform_mm > 0 else None
        )  # fmt: skip
        sp_min = min(self.spacing)
        # Point-spread of the scanner and the reconstruction (sigma in mm), noise in HU, and a
        # smooth multiplicative field on attenuation of a few per cent (CT's cupping and
        # beam-hardening shading are tens of HU, not MR's bias fields).
        self.post = tio.Compose([
            tio.RandomBlur(std=(0.2 * sp_min, 0.6 * sp_min)),
            tio.RandomBiasField(coefficients=0.02, order=3, p=0.5),
            tio.RandomNoise(std=(2.0, 25.0)),
        ])  # fmt: skip

    def set_random_state(self, seed: int) -> "CTSynthesizer":
        self.rng = np.random.default_rng(seed)
        return self

    def _affine(self) -> np.ndarray:
        return np.diag([*self.spacing, 1.0])

    def __call__(self, classes: torch.Tensor, phase: str | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
        import torchio as tio

        classes = torch.as_tensor(classes)
        if classes.ndim != 4 or classes.shape[0] != 1:
            raise ConfigError(f"classes must be (1, x, y, z), got {tuple(classes.shape)}", "CTSynthesizer")
        if int(classes.max()) >= len(self.class_tissues):
            raise ConfigError(f"class id {int(classes.max())} has no tissue ({len(self.class_tissues)} classes)", "CTSynthesizer")
        # TorchIO draws from torch's global generator: seed it from ours, keep the caller's state.
        state = torch.random.get_rng_state()
        torch.manual_seed(int(self.rng.integers(0, 2**31 - 1)))
        try:
            label = tio.LabelMap(tensor=classes.to(torch.int64), affine=self._affine())
            subject = tio.Subject(label=label)
            if self.deform is not None:
                subject = self.deform(subject)
            deformed = subject["label"].data.to(torch.int16)
            phase = phase or str(self.rng.choice(self.phases))
            # One mean and one texture per TISSUE, drawn from its prior in this phase: in a CT the
            # five lobes, all bones, all muscles, both kidneys look alike. Drawing each structure
            # on its own (SynthSeg's brain setting) paints edges between lobes that no CT has, and
            # a network trained on them did not find the lobes of a real CT.
            # RandomLabelsToImage then draws each structure within +-structure_jitter_hu of it.
            present, contiguous = torch.unique(deformed.long(), return_inverse=True)
            tissue_mean: dict[str, float] = {}
            tissue_std: dict[str, float] = {}
            enhance = 1.0
            if phase != "native" and self.enhancement != (1.0, 1.0):
                enhance = float(self.rng.uniform(*self.enhancement))
            for name in sorted({self.class_tissues[c] for c in present.tolist()}):
                tissue_mean[name] = float(self.rng.uniform(*self.mean_range(name, phase, enhance)))
                tissue_std[name] = float(self.rng.uniform(*TISSUES[name].std))
            j = self.structure_jitter_hu
            means, stds = [], []
            for c in present.tolist():
                m, sd = tissue_mean[self.class_tissues[c]] + 1000.0, tissue_std[self.class_tissues[c]]  # attenuation: HU + 1000
                means.append((m - j, m + j))
                stds.append((0.9 * sd, 1.1 * sd))
            subject = tio.Subject(label=tio.LabelMap(tensor=contiguous.reshape(deformed.shape), affine=self._affine()))
            subject = tio.RandomLabelsToImage(label_key="label", image_key="image", mean=means, std=stds)(subject)
            if self.texture:
                subject["image"].set_data(self.add_texture(subject["image"].data, deformed))
            if self.heart_wall and phase != "native" and "heart" in tissue_mean:
                subject["image"].set_data(self.add_heart_wall(subject["image"].data, deformed, tissue_mean["heart"], phase))
            if self.surroundings > 0:
                subject["image"].set_data(self.add_surroundings(subject["image"].data, deformed, tissue_mean))
            subject = self.post(subject)
            hu = subject["image"].data.float() - 1000.0
        finally:
            torch.random.set_rng_state(state)
        lo, hi = self.window
        image = ((hu - lo) / (hi - lo)).clamp_(0.0, 1.0)
        return image, deformed, phase

    @staticmethod
    def mean_range(tissue: str, phase: str, enhance: float = 1.0) -> tuple[float, float]:
        """A tissue's mean-HU range in ``phase``, its enhancement over native scaled by
        ``enhance`` (1: the prior as it is; 0: native)."""
        low, high = TISSUES[tissue].mean_range(phase)
        if enhance == 1.0:
            return float(low), float(high)
        n_low, n_high = TISSUES[tissue].mean_range("native")
        return n_low + enhance * (low - n_low), n_high + enhance * (high - n_high)

    def add_heart_wall(self, attenuation: torch.Tensor, classes: torch.Tensor, blood_hu: float, phase: str) -> torch.Tensor:
        """The myocardium of a contrast-enhanced heart, on the drawn image (HU + 1000), before blur.

        A label map's "heart" is one structure, so a flat draw paints it as one pool of blood. In
        a contrast CT only the chambers are bright: the thorax crop's heart (arterial phase) has
        its blood at 466-578 HU (median, 90th percentile) inside a wall and septum of 131 HU (the
        quarter of its voxels under 250 HU), and a network that saw only flat hearts found its
        cavities alone (Dice 0.18-0.35, docs/synthesis.md round 14).
        Here the heart voxels within a random 3-9 mm of its boundary (the wall, computed on the
        patch) and a slab of random 6-12 mm through its centre at a random orientation (a
        septum) take a myocardium value drawn per patch (:data:`MYOCARDIUM_HU` of the phase),
        keeping the drawn noise. ``blood_hu`` is the heart's drawn mean (HU).
        """
        heart = self._heart[classes.long().clamp(min=0)][0].numpy()
        if not heart.any():
            return attenuation
        dist = ndimage.distance_transform_edt(heart, sampling=self.spacing)
        wall = heart & (dist <= float(self.rng.uniform(3.0, 9.0)))
        idx = np.argwhere(heart)
        centre = idx.mean(0) + self.rng.normal(0.0, 2.0, 3)
        normal = self.rng.normal(size=3)
        normal /= np.linalg.norm(normal) + 1e-9
        # The septum: heart voxels within half a random thickness of a plane through the centre
        # (distances of the heart's voxels only, not of the whole patch).
        offset = np.abs(((idx - centre) * np.asarray(self.spacing)) @ normal)
        muscle = wall.copy()
        muscle[tuple(idx[offset <= 0.5 * float(self.rng.uniform(6.0, 12.0))].T)] = True
        muscle = torch.from_numpy(muscle)[None]
        lo, hi = MYOCARDIUM_HU[phase]
        # Never brighter than the blood: portal blood (110-200 HU) and muscle (80-130) overlap.
        shift = min(float(self.rng.uniform(lo, hi)), float(blood_hu) - 30.0) - float(blood_hu)
        out = attenuation.clone()
        out[muscle] += shift
        return out

    def add_surroundings(self, attenuation: torch.Tensor, classes: torch.Tensor, tissue_mean: Mapping[str, float]) -> torch.Tensor:
        """Arms beside the trunk and a scanner table under the back, on the drawn image (HU +
        1000), before blur; only in the air outside the body (class 0), so no target changes.

        A label map ends at the skin, so every synthetic patch shows a trunk in air, and the real
        training CTs are cropped to the body. A real CT's field of view holds more: the DICOM slab
        (50 cm across) has both arms beside the abdomen and the table's two shells under the
        back. Every model trained without that scan left its 249 mL spleen unlabelled (Dice
        0.000-0.016 in every run since round 8, docs/synthesis.md); the same model, given the same
        image with the arms and the table set to air, finds it (0.009 -> 0.618, round 20).

        Per patch, each drawn with probability :attr:`surroundings`:

        * **arms** (not in a patch with a femur or hip): each side with probability 0.8, an
          elliptic cylinder of 70-130 x 80-130 mm, at the AP height of the trunk, 5 mm into to
          40 mm away from its side (voxels already body stay body), tilted a little along the
          slices; a 4-15 mm fat layer round muscle (the patch's fat and muscle means), one bone
          (humerus, 7-14 mm radius) or two (forearm, 5-9 mm), a cortical shell round marrow;
        * **a table**: its top 0-20 mm under the back (a foam pad between, half the time), two
          2-6 mm shells (100-900 HU) round a 15-50 mm low-density core, slightly curved, 400-520
          mm wide; thin shells are averaged over the voxel (partial volume), as a scanner does.
        """
        body = classes[0].numpy() != 0
        if not body.any():
            return attenuation
        rng = self.rng
        want_arms = rng.random() < self.surroundings
        want_table = rng.random() < self.surroundings
        if want_arms and bool(self._limb[classes.long().clamp(min=0)].any()):
            want_arms = False
        if not (want_arms or want_table):
            return attenuation
        nx, ny, nz = body.shape
        sx, sy, sz = self.spacing
        x = (np.arange(nx) * sx)[:, None, None]
        y = (np.arange(ny) * sy)[None, :, None]
        z = ((np.arange(nz) - 0.5 * (nz - 1)) * sz)[None, None, :]
        hu = np.full(body.shape, np.nan, dtype=np.float32)

        def mean_of(tissue: str) -> float:
            if tissue in tissue_mean:
                return float(tissue_mean[tissue])
            return float(rng.uniform(*TISSUES[tissue].mean_range("native")))

        rows = np.nonzero(body.any(axis=(0, 2)))[0]
        cols = np.nonzero(body.any(axis=(1, 2)))[0]
        if want_arms:
            fat, muscle = mean_of("fat"), mean_of("muscle")
            cortex, marrow = float(rng.uniform(400.0, 1000.0)), float(rng.uniform(-50.0, 200.0))
            for side in (-1, 1):
                if rng.random() >= 0.8:
                    continue
                cy = (0.5 * (rows[0] + rows[-1]) + rng.uniform(-0.2, 0.2) * (rows[-1] - rows[0])) * sy
                ax, ay = float(rng.uniform(35.0, 65.0)), float(rng.uniform(40.0, 65.0))
                band = np.abs(np.arange(ny) * sy - cy) < ay
                edges = [np.nonzero(body[:, band, k].any(axis=1))[0] for k in range(nz)]
                edges = [e[0] if side < 0 else e[-1] for e in edges if e.size]
                if not edges:
                    continue
                edge = float(np.median(edges))
                if (side < 0 and edge <= 0) or (side > 0 and edge >= nx - 1):
                    continue  # the trunk fills the patch on that side: an arm would lie outside it
                cx = edge * sx + side * (float(rng.uniform(-5.0, 40.0)) + ax)
                dx, dy = rng.uniform(-0.1, 0.1), rng.uniform(-0.05, 0.05)  # tilt, mm per mm of z
                px, py = x - (cx + dx * z), y - (cy + dy * z)
                arm = (px / ax) ** 2 + (py / ay) ** 2 <= 1.0
                t = float(rng.uniform(4.0, 15.0))
                core = (px / (ax - t)) ** 2 + (py / (ay - t)) ** 2 <= 1.0
                layer = np.where(core, muscle, fat).astype(np.float32)
                n_bones = int(rng.integers(1, 3))
                for _ in range(n_bones):
                    r = float(rng.uniform(7.0, 14.0) if n_bones == 1 else rng.uniform(5.0, 9.0))
                    bx, by = rng.uniform(-0.3, 0.3) * (ax - t - r), rng.uniform(-0.3, 0.3) * (ay - t - r)
                    d = np.sqrt((px - bx) ** 2 + (py - by) ** 2)
                    layer = np.where(d <= r, cortex, layer)
                    layer = np.where(d <= r - float(rng.uniform(2.0, 4.0)), marrow, layer)
                hu = np.where(arm & ~body, layer, hu)
        if want_table and rows[0] > 0:
            back = rows[0] * sy  # mm, the posterior-most row of the body
            pad = float(rng.uniform(0.0, 20.0))
            pad_hu = float(rng.uniform(-600.0, -80.0)) if rng.random() < 0.5 else -1000.0
            t1, core_mm, t2 = float(rng.uniform(2.0, 6.0)), float(rng.uniform(15.0, 50.0)), float(rng.uniform(2.0, 6.0))
            shell_hu, core_hu = float(rng.uniform(100.0, 900.0)), float(rng.uniform(-1000.0, -850.0))
            xc = 0.5 * (cols[0] + cols[-1]) * sx
            width = float(rng.uniform(200.0, 260.0))
            bend = float(rng.uniform(0.0, 3e-4))
            top = back - pad + bend * (x - xc) ** 2  # mm; layers run posteriorly (down in y) from it
            # Layer boundaries below the top (mm) and their HU; averaged over 4 samples per voxel.
            bounds = np.array([-pad, 0.0, t1, t1 + core_mm, t1 + core_mm + t2])
            values = np.array([pad_hu, shell_hu, core_hu, shell_hu], dtype=np.float32)
            acc = np.zeros((nx, ny, 1), dtype=np.float32)
            inside = np.zeros((nx, ny, 1), dtype=np.float32)
            for off in (-0.375, -0.125, 0.125, 0.375):
                depth = top - (y + off * sy)  # (nx, ny, 1)
                layer = np.searchsorted(bounds, depth, side="right") - 1
                hit = (layer >= 0) & (layer < len(values)) & (np.abs(x - xc) <= width)
                acc += np.where(hit, values[np.clip(layer, 0, len(values) - 1)], -1000.0)
                inside += hit
            table = np.broadcast_to(inside > 0, body.shape)
            hu = np.where(table & ~body & np.isnan(hu), np.broadcast_to(acc / 4.0, body.shape), hu)
        paint = ~np.isnan(hu)
        if not paint.any():
            return attenuation
        out = attenuation.clone()
        noise = rng.normal(0.0, float(rng.uniform(5.0, 20.0)), int(paint.sum())).astype(np.float32)
        out[0][torch.from_numpy(paint)] = torch.from_numpy(hu[paint] + noise + 1000.0).to(out.dtype).clamp_(min=0.0)
        return out

    def add_texture(self, attenuation: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Texture of a real CT that a class map lacks, on the drawn image (HU + 1000), before blur.

        * **Lung**: vessels and bronchial walls. The lobes of tcia_ccth_a01 at 4 mm measure a
          median of -667 HU with a bright tail (95th percentile -355; 12-23 % of voxels above
          -500), where a flat draw is symmetric. Smoothed noise thresholded at a random 5-20 % of
          the lung voxels marks vessel-like blobs, raised by 200-600 HU.
        * **Bone**: the cortical shell. The femurs of tcia_ccth_a01 measure 650 HU on their
          boundary voxels and 451 inside (std 433): boundary voxels raised by 200-700 HU.
        """
        import torch.nn.functional as F
        from monai.transforms import GaussianSmooth

        out = attenuation.clone()
        lut = classes.long().clamp(min=0)
        lung = self._lung[lut]
        if bool(lung.any()):
            sigma = float(self.rng.uniform(0.6, 1.2))
            gen = torch.Generator().manual_seed(int(self.rng.integers(0, 2**31 - 1)))
            noise = GaussianSmooth(sigma=sigma)(torch.randn(lung.shape, generator=gen))
            noise = torch.as_tensor(noise)
            values = noise[lung]
            frac = float(self.rng.uniform(0.05, 0.20))
            k = max(1, int(round((1.0 - frac) * values.numel())))
            cut = values.kthvalue(k).values
            out[lung & (noise > cut)] += float(self.rng.uniform(200.0, 600.0))
        bone = self._bone[lut]
        if bool(bone.any()):
            # Interior: every voxel of the 3 x 3 x 3 neighbourhood is bone (of any class).
            outside = (~bone).float()[None]  # (1, 1, x, y, z) after the channel dim below
            interior = F.max_pool3d(outside, 3, stride=1, padding=1)[0] == 0
            shell = bone & ~interior
            out[shell] += float(self.rng.uniform(200.0, 700.0))
        return out


def crop_to_body(classes: np.ndarray, margin: int) -> tuple[slice, slice, slice]:
    """Slices of the bounding box of ``classes > 0`` grown by ``margin`` voxels (within the map)."""
    nz = np.argwhere(classes > 0)
    if len(nz) == 0:
        return tuple(slice(0, n) for n in classes.shape)  # type: ignore[return-value]
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + 1 + margin, classes.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def to_model_space(classes: np.ndarray, affine: np.ndarray, target_spacing: Sequence[float] | None) -> np.ndarray:
    """A class map in RAS at ``target_spacing`` mm (nearest neighbour), with MONAI's transforms."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    t = MetaTensor(torch.as_tensor(classes.astype(np.float32))[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    t = Orientation(axcodes="RAS")(t)
    if target_spacing is not None:
        t = Spacing(pixdim=tuple(float(s) for s in target_spacing), mode="nearest")(t)
    return t.as_tensor()[0].round().to(torch.int16).numpy()


def load_label_map_case(
    *,
    name: str,
    terms: Sequence[str],
    term_structures: Sequence[Sequence[str]],
    target_spacing: Sequence[float] | None,
    margin: int = 8,
    seed: int = 0,
    thighs: bool = False,
    **source: str | Path | Mapping[str, str | Path] | None,
) -> LabelMapCase:
    """Read a label-map source (:func:`read_structures` keywords), bring it to model space, add
    the body layers and crop to the body: a :class:`LabelMapCase`.

    Args:
        name: for messages and logs.
        terms: the annotated terms.
        term_structures: for each term, the structure names (as read) whose union is it; empty:
            annotated absent.
        target_spacing: model spacing, mm.
        margin: voxels of air kept around the body.
        seed: the body layers' random thicknesses and fat/soft split.
        thighs: draw thighs below a map that ends across both femoral shafts
            (:func:`extend_thighs`, seeded from ``seed``).
    """
    classes, affine, names = read_structures(**source)  # type: ignore[arg-type]
    model = to_model_space(classes, affine, target_spacing)
    spacing = tuple(float(s) for s in (target_spacing or np.sqrt((affine[:3, :3] ** 2).sum(0))))
    layered = add_body_layers(model, spacing, np.random.default_rng(seed))
    if thighs:
        layered = extend_thighs(layered, names, spacing, np.random.default_rng([seed, 1]))
    box = crop_to_body(layered, margin)
    layered = layered[box]
    offset = len(BODY_CLASSES) - 1
    class_names = tuple(n for n, _ in BODY_CLASSES) + tuple(names)
    class_tissues = tuple(t for _, t in BODY_CLASSES) + tuple(tissue_of(n) for n in names)
    index = {n: i + 1 + offset for i, n in enumerate(names)}
    present = set(np.unique(layered).tolist())
    term_classes = tuple(tuple(index[s] for s in structures if s in index and index[s] in present) for structures in term_structures)
    return LabelMapCase(torch.as_tensor(layered)[None], class_names, class_tissues, tuple(terms), term_classes, name)


def phase_of_mean(hu: float, tissue: str) -> str:
    """The phase whose range for ``tissue`` is nearest to a measured mean ``hu`` (for reports)."""
    best, dist = PHASES[0], math.inf
    for p in PHASES:
        lo, hi = TISSUES[tissue].mean_range(p)
        d = 0.0 if lo <= hu <= hi else min(abs(hu - lo), abs(hu - hi))
        if d < dist:
            best, dist = p, d
    return best
