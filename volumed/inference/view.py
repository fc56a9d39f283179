"""``volumed view``: one self-contained HTML page for a ``volumed segment`` output folder.

The page needs no network and no files beside it: the CT, the label map, the colours, the
statistics table and the report are all inside it, and a small inline script draws them::

    OUT/labels.nii.gz + labels.json     label map (X, Y, Z) on the CT grid, value -> term
    OUT/statistics.json                 the CT's path ("image"), per term present / mL / HU / confidence
    OUT/report.txt                      the findings in words
    CT (statistics.json "image", or image=)  (X, Y, Z) HU
      -> both reoriented to RAS by flips/permutations only (preview.to_ras: exact, no resampling)
      -> both subsampled by one integer stride per axis (page grid), the finest-spaced axes first,
         until at most ``max_voxels`` voxels (and the page under ``max_bytes``)
      -> CT windowed to uint8 (WINDOWS; MR: 0.5-99.5th percentiles), labels uint8 or uint16,
         and a second label layer from masks/ for voxels a structure lost to the priority rule
      -> each zlib-compressed, base64, in a JSON block; the script inflates them with the browser's
         DecompressionStream("deflate") and draws axial / coronal / sagittal slices on canvases

What the page shows: three views in radiological convention (as preview.py: axial with the
patient's right on the left and anterior at the top, coronal and sagittal with superior at the top,
pixels square in millimetres), a slider per view, a click on a view moving the other two to that
point, an opacity slider, a checkbox per structure found (colour :func:`preview.label_color`, the
same as preview.png), the statistics table (structure, present, volume mL, mean HU, confidence or
the bound of an absent structure's probability), and report.txt split into sentences: hovering a
sentence (or a table row, or a checkbox's label) that names a structure shows that structure's mask
strongly, the others dimmed, and moves the three views to its centroid.

The URL's fragment sets the initial state, so that a link (and the test) can show one view of the
case: ``page.html#off=liver,spleen`` (those unticked; ``off=all``), ``#focus=liver`` (as if its
sentence were hovered), ``#alpha=1`` (overlay opacity 0..1), joined by ``&``. Names are canonical
terms, spaces or underscores alike.

Which structures a sentence names: canonical name, its readable form ("kidney left"), the prompt,
and the vocabulary's synonyms ("left kidney"), case-insensitive, whole words, the longest match
winning where two overlap (:func:`report_sentences`).

Overlapping masks: the label map keeps one value per voxel (labels.json's priority rule), so a
structure can lose some or all of its voxels to another. The page also carries a second layer,
built from masks/, holding such a lost structure where it lies under another: it is drawn where
the structure above is unticked, and when its sentence is hovered, so every found structure can
be seen (a third structure on the same voxel is not kept).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from volumed.errors import ConfigError
from volumed.inference.stats import ml_text
from volumed.io.atomic import atomic_write_text, check_writable
from volumed.io.volume import Volume

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_VOXELS", "PAGE_NAME", "WINDOWS", "ReportSentence", "ViewPage",
           "ViewStructure", "page_strides", "render_view", "report_sentences", "window_to_uint8"]

#: Default page file name inside the output folder.
PAGE_NAME = "view.html"
#: CT windows (level, width) in HU. ``soft`` (W 400, L 40, preview.png's) suits the abdominal and
#: mediastinal organs most terms name; ``lung`` (W 1500, L -600) shows lobes, airways and vessels in
#: the lung; ``bone`` (W 1800, L 400) vertebrae, ribs and hips. One window per page: the CT is
#: embedded as 8 bits already windowed, which keeps the page small.
WINDOWS: dict[str, tuple[float, float]] = {"soft": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}
#: Page-grid voxel budget: 16 M voxels is a 256 x 256 x 250 CT, as sharp as a screen panel shows.
DEFAULT_MAX_VOXELS = 16_000_000
#: Page size budget (bytes); above it the page grid is coarsened further.
DEFAULT_MAX_BYTES = 15_000_000

_TEMPLATE = "view_template.html"
_WORD = r"[0-9A-Za-z]"


@dataclass(frozen=True)
class ViewStructure:
    """One row of the page's table: a term of labels.json with its statistics.

    Attributes:
        value: label value; name: canonical term; display_name: with " (untrained)" where so.
        present: the mask is not empty; color: ``#rrggbb`` (:func:`preview.label_color`).
        volume_ml, mean_intensity (``unit``: "HU" for CT), confidence: from statistics.json
            (``None`` where absent); max_probability_bound: an absent term's bound.
        centroid: voxel index ``(i, j, k)`` on the page grid (RAS order) of its label-map voxels,
            ``None`` when it holds none (absent, or every voxel won by another term).
        on_page: the page grid (subsampled) still holds voxels of it, in the label map or in the
            layer under it.
    """

    value: int
    name: str
    display_name: str
    present: bool
    color: str
    volume_ml: float | None
    mean_intensity: float | None
    unit: str
    confidence: float | None
    max_probability_bound: float | None
    centroid: tuple[int, int, int] | None
    on_page: bool
    rejected: dict | None = None


@dataclass(frozen=True)
class ReportSentence:
    """A piece of report.txt: ``text`` (with its trailing whitespace) and the label ``values`` of
    the structures it names, in order of mention (empty for whitespace and sentences naming none)."""

    text: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class ViewPage:
    """What :func:`render_view` wrote.

    Attributes:
        path: the HTML file; size_bytes: its size.
        image: the CT that was read.
        shape: page grid ``(X, Y, Z)`` in RAS order; spacing_mm: its voxel size.
        strides: subsampling of each RAS axis from the CT grid.
        window: the CT window's name (``WINDOWS``) or ``"percentile"`` (MR).
        structures: every term of labels.json, by value.
        sentences: report.txt in pieces.
    """

    path: Path
    size_bytes: int
    image: Path
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    strides: tuple[int, int, int]
    window: str
    structures: tuple[ViewStructure, ...]
    sentences: tuple[ReportSentence, ...]


# ------------------------------------------------------------------------------------ pure parts


def page_strides(shape: Sequence[int], spacing: Sequence[float], max_voxels: int) -> tuple[int, int, int]:
    """One integer stride per axis so that the subsampled grid has at most ``max_voxels`` voxels.

    The axes whose subsampled spacing (spacing x stride) is finest are coarsened first, together
    when equal (both in-plane axes of a CT), so thin in-plane pixels go before thick slices and the
    page grid tends towards isotropic voxels.
    """
    if max_voxels < 1:
        raise ValueError(f"max_voxels must be positive, got {max_voxels}")
    strides = [1, 1, 1]

    def count(axis: int) -> int:  # voxels along ``axis`` after subsampling: ceil(n / stride)
        return -(-int(shape[axis]) // strides[axis])

    while math.prod(count(a) for a in range(3)) > max_voxels:
        finest = min(float(spacing[a]) * strides[a] for a in range(3) if count(a) > 1)
        for axis in range(3):
            if count(axis) > 1 and math.isclose(float(spacing[axis]) * strides[axis], finest, rel_tol=1e-6):
                strides[axis] += 1
    return tuple(strides)  # type: ignore[return-value]


def window_to_uint8(data: np.ndarray, modality: str, window: str = "soft") -> tuple[np.ndarray, str]:
    """Intensities -> uint8 for display: a CT window of :data:`WINDOWS` (HU), or for other
    modalities the 0.5-99.5th percentiles. Returns the bytes and the window's name."""
    data = np.asarray(data, dtype=np.float32)
    if modality == "CT":
        if window not in WINDOWS:
            raise ConfigError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}", "volumed view")
        level, width = WINDOWS[window]
        lo, hi, name = level - width / 2, level + width / 2, window
    else:
        lo, hi = (float(v) for v in np.percentile(data[:: max(1, data.shape[0] // 128)], [0.5, 99.5]))
        hi, name = (hi if hi > lo else lo + 1.0), "percentile"
    scaled = np.clip((data - lo) * (255.0 / (hi - lo)), 0, 255)
    return np.rint(scaled).astype(np.uint8), name


def _surfaces(name: str, prompt: str | None) -> set[str]:
    """The phrases that name a term in a text: canonical name, readable form, prompt, synonyms."""
    from volumed.data.vocab import default_vocabulary

    found = {name, re.sub(r"[_\s]+", " ", name).strip()}
    if prompt:
        found.add(prompt.strip())
    vocab = default_vocabulary()
    if name in vocab:
        found.update(vocab.term(name).synonyms)
    return {s for s in found if s}


def _phrase_pattern(surface: str) -> str:
    # Words separated by any run of spaces or underscores, bounded by non-alphanumerics, so
    # "kidney left" finds "kidney_left" and "liver" is not found inside "deliver".
    words = [re.escape(w) for w in re.split(r"[_\s]+", surface.strip()) if w]
    return rf"(?<!{_WORD})" + r"[_\s]+".join(words) + rf"(?!{_WORD})"


def report_sentences(text: str, surfaces: Mapping[int, Sequence[str]]) -> list[ReportSentence]:
    """Split ``text`` into sentences and say which label values each names.

    A sentence ends at a line end or after ``.``, ``!`` or ``?`` followed by whitespace (so the
    decimals of "0.93" do not end one). ``surfaces`` maps a label value to the phrases naming it;
    matching is case-insensitive on whole words, and where two matches overlap the longer wins
    ("left kidney" over "kidney"). Concatenating the pieces' texts gives ``text`` back.
    """
    patterns = [(value, re.compile(_phrase_pattern(s), re.IGNORECASE)) for value, phrases in surfaces.items()
                for s in phrases if s.strip()]
    pieces: list[ReportSentence] = []
    for line in text.splitlines(keepends=True):
        start = 0
        bounds = [m.end() for m in re.finditer(r"[.!?]\s+(?=\S)", line)]
        for end in bounds + [len(line)]:
            chunk = line[start:end]
            start = end
            if not chunk:
                continue
            matches = sorted(((m.start(), m.end(), value) for value, p in patterns for m in p.finditer(chunk)),
                             key=lambda t: (-(t[1] - t[0]), t[0]))
            taken: list[tuple[int, int, int]] = []
            for s, e, value in matches:
                if all(e <= ts or s >= te for ts, te, _ in taken):
                    taken.append((s, e, value))
            values: list[int] = []
            for _, _, value in sorted(taken):
                if value not in values:
                    values.append(value)
            pieces.append(ReportSentence(chunk, tuple(values)))
    return pieces


# --------------------------------------------------------------------------- the output folder


@dataclass(frozen=True)
class _SegmentOutput:
    labels_path: Path
    table: dict
    statistics: dict
    report: str


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read it as JSON ({err})", path) from err


def _read_segment_output(out_dir: Path) -> _SegmentOutput:
    from volumed.inference.segment import LABELS_NAME, REPORT_NAME, STATISTICS_NAME, TABLE_NAME

    if not out_dir.is_dir():
        raise ConfigError("not a folder; pass the output folder of `volumed segment`", out_dir)
    missing = [n for n in (LABELS_NAME, TABLE_NAME) if not (out_dir / n).is_file()]
    if missing:
        raise ConfigError(f"not a `volumed segment` output folder: no {' and no '.join(missing)}", out_dir)
    table = _read_json(out_dir / TABLE_NAME)
    if not isinstance(table.get("labels"), dict):
        raise ConfigError("no \"labels\" table (value -> term)", out_dir / TABLE_NAME)
    stats_path = out_dir / STATISTICS_NAME
    statistics = _read_json(stats_path) if stats_path.is_file() else {}
    report_path = out_dir / REPORT_NAME
    report = report_path.read_text(encoding="utf-8", errors="replace") if report_path.is_file() else ""
    return _SegmentOutput(out_dir / LABELS_NAME, table, statistics, report)


def _read_image(recorded: str | None, image: str | Path | None, modality: str | None, out_dir: Path) -> Volume:
    """The CT the segmentation was made on: ``image`` when given, else statistics.json's path."""
    from volumed.io import read_volume

    if image is None:
        if not recorded:
            raise ConfigError("statistics.json records no image path; pass the CT with --image PATH", out_dir)
        path = Path(recorded)
        if not path.exists():
            raise ConfigError(f"the segmented image {path} (recorded in statistics.json) is not there; "
                              "pass it with --image PATH", out_dir)
    else:
        path = Path(image)
    return read_volume(path, modality=modality if modality in ("CT", "MR") else None)


def _structures(table: dict, statistics: dict, present_on_page: Mapping[int, tuple[tuple[int, int, int] | None, bool]]
                ) -> list[ViewStructure]:
    from volumed.inference.preview import label_color

    by_name = statistics.get("terms", {}) if isinstance(statistics.get("terms"), dict) else {}
    rows = []
    for key, entry in sorted(table["labels"].items(), key=lambda kv: int(kv[0])):
        value = int(key)
        name = str(entry.get("name", key))
        stats = by_name.get(name, {})
        intensity = stats.get("intensity") or {}
        present = bool(stats.get("present", stats.get("voxels", 0) > 0)) if stats else value in present_on_page
        centroid, on_page = present_on_page.get(value, (None, False))
        rgb = label_color(value)
        rows.append(ViewStructure(
            value=value,
            name=name,
            display_name=name + ("" if entry.get("trained", True) else " (untrained)"),
            present=present,
            color="#" + "".join(f"{int(round(c * 255)):02x}" for c in rgb),
            volume_ml=stats.get("volume_ml"),
            mean_intensity=intensity.get("mean"),
            unit=str(intensity.get("unit") or ("HU" if statistics.get("modality") == "CT" else "intensity")),
            confidence=stats.get("confidence"),
            max_probability_bound=stats.get("max_probability_bound"),
            rejected=stats.get("rejected"),
            centroid=centroid,
            on_page=on_page,
        ))
    return rows


def _pack(array: np.ndarray) -> str:
    """``(X, Y, Z)`` array -> base64 of zlib-compressed bytes in (Z, Y, X) C order, i.e. the flat
    index the page's script uses: ``(k * NY + j) * NX + i``, little-endian."""
    flat = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))
    if flat.dtype.itemsize > 1:
        flat = flat.astype(flat.dtype.newbyteorder("<"), copy=False)
    return base64.b64encode(zlib.compress(flat.tobytes(), 6)).decode("ascii")


def _hidden_layer(out_dir: Path, table: dict, statistics: dict, labels: np.ndarray, volume: Volume,
                  ornt: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[float, float, float]]]:
    """The second layer under the label map, and each structure's centroid (RAS voxel indices).

    Masks overlap, the label map keeps one value per voxel (priority rule), so a structure can
    lose part or all of its voxels there. The second layer holds, where a mask is set but the
    label map shows another value, one such structure (0 elsewhere): the smallest first (by
    statistics.json's voxel count), as a small structure is the one most easily lost entirely.
    The page shows it when the structure above is unticked, and when it is hovered. Centroids are
    the masks' own; without a masks/ file, the label map's voxels of that value.
    """
    from volumed.inference.segment import MASKS_DIR, mask_file_name

    hidden = np.zeros_like(labels)
    centres: dict[int, tuple[float, float, float]] = {}
    counts = statistics.get("terms", {}) if isinstance(statistics.get("terms"), dict) else {}

    def size(item: tuple[str, dict]) -> tuple[float, int]:
        voxels = (counts.get(str(item[1].get("name"))) or {}).get("voxels")
        return (float(voxels) if isinstance(voxels, (int, float)) else math.inf, int(item[0]))

    for key, entry in sorted(table["labels"].items(), key=size):
        value = int(key)
        path = out_dir / MASKS_DIR / f"{mask_file_name(str(entry.get('name', key)))}.nii.gz"
        mask = None
        if path.is_file():
            image = nib.load(str(path))
            if tuple(image.shape) == volume.shape and np.allclose(image.affine, volume.affine, atol=1e-3):
                mask = nib.orientations.apply_orientation(np.asarray(image.dataobj) > 0, ornt)
        if mask is None:
            mask = labels == value
        if not mask.any():
            continue
        centres[value] = tuple(float(c) for c in ndimage.center_of_mass(mask))  # type: ignore[assignment]
        hidden[mask & (labels != value) & (hidden == 0)] = value
    return hidden, centres


# ------------------------------------------------------------------------------------- the page


def render_view(
    out_dir: str | Path,
    output: str | Path | None = None,
    *,
    image: str | Path | None = None,
    window: str = "soft",
    max_voxels: int = DEFAULT_MAX_VOXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
) -> ViewPage:
    """Write the viewer page of a ``volumed segment`` output folder (see the module docstring).

    Args:
        out_dir: the output folder (labels.nii.gz, labels.json, statistics.json, report.txt).
        output: the HTML file; default ``out_dir/view.html``.
        image: the CT; default: the path statistics.json records.
        window: CT window, a key of :data:`WINDOWS`.
        max_voxels: page-grid voxel budget; max_bytes: page size budget (the grid is coarsened
            until the page fits, down to 1 voxel per axis).
        overwrite: replace an existing page.

    Raises:
        OutputExistsError: the page exists and ``overwrite`` is false (checked first).
        ConfigError: not a segment output folder, the CT not found, or not on the label map's grid.
        VolumeReadError, InvalidVolumeError, DicomSeriesError: unreadable CT or label map.
    """
    from volumed.inference.preview import to_ras
    from volumed.io import read_label

    out_dir = Path(out_dir)
    page_path = Path(output) if output is not None else out_dir / PAGE_NAME
    check_writable(page_path, overwrite)
    if window not in WINDOWS:
        raise ConfigError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}", "volumed view")
    seg = _read_segment_output(out_dir)
    volume = _read_image(seg.statistics.get("image"), image, seg.statistics.get("modality"), out_dir)
    recorded_shape = seg.statistics.get("shape")
    if recorded_shape and tuple(int(n) for n in recorded_shape) != volume.shape:
        raise ConfigError(f"image shape {volume.shape} is not the segmented image's {tuple(recorded_shape)} "
                          "(statistics.json); pass the CT that was segmented with --image", volume.source.path)
    labels_vol = read_label(seg.labels_path)
    if labels_vol.shape != volume.shape or not np.allclose(labels_vol.affine, volume.affine, atol=1e-3):
        raise ConfigError(f"the label map ({labels_vol.shape}) is not on this image's grid {volume.shape}; "
                          "pass the CT that was segmented with --image", volume.source.path)

    ct, spacing = to_ras(volume)
    ornt = nib.orientations.io_orientation(volume.affine)
    labels = nib.orientations.apply_orientation(np.asarray(labels_vol.data), ornt)
    values = sorted(int(v) for v in seg.table["labels"])
    dtype = np.uint8 if max(values, default=0) < 256 else np.uint16
    labels = labels.astype(dtype, copy=False)
    hidden, centres_full = _hidden_layer(out_dir, seg.table, seg.statistics, labels, volume, ornt)
    start = ndimage.center_of_mass(labels > 0) if labels.any() else tuple((n - 1) / 2 for n in labels.shape)
    ct8, window_name = window_to_uint8(ct, volume.modality, window)
    template = resources.files("volumed.inference").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    surfaces = {int(k): sorted(_surfaces(str(e.get("name", k)), e.get("prompt"))) for k, e in seg.table["labels"].items()}
    sentences = report_sentences(seg.report, surfaces)

    budget = max_voxels
    while True:
        strides = page_strides(ct.shape, spacing, budget)
        grid = tuple(slice(None, None, s) for s in strides)
        ct_page, lab_page, hidden_page = ct8[grid], labels[grid], hidden[grid]
        held = set(int(v) for v in np.unique(lab_page)) | set(int(v) for v in np.unique(hidden_page))
        shape = lab_page.shape

        def on_grid(point: Sequence[float]) -> tuple[int, int, int]:
            return tuple(int(min(round(c / s), n - 1)) for c, s, n in zip(point, strides, shape))  # type: ignore[return-value]

        structures = _structures(seg.table, seg.statistics, {v: (on_grid(c), v in held) for v, c in centres_full.items()})
        page = _page_html(template, out_dir, volume, seg, structures, sentences, ct_page, lab_page, hidden_page,
                          tuple(sp * s for sp, s in zip(spacing, strides)), strides, window_name, on_grid(start))
        size = len(page.encode("utf-8"))
        if size <= max_bytes or math.prod(shape) <= 1:
            break
        budget = max(1, int(math.prod(shape) * 0.9 * max_bytes / size))
    atomic_write_text(page_path, page, overwrite=overwrite)
    return ViewPage(
        path=page_path,
        size_bytes=size,
        image=Path(volume.source.path) if volume.source.path else Path(str(image)),
        shape=tuple(int(n) for n in ct_page.shape),  # type: ignore[arg-type]
        spacing_mm=tuple(float(sp * s) for sp, s in zip(spacing, strides)),  # type: ignore[arg-type]
        strides=strides,
        window=window_name,
        structures=tuple(structures),
        sentences=tuple(sentences),
    )


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _page_html(template: str, out_dir: Path, volume: Volume, seg: _SegmentOutput, structures: Sequence[ViewStructure],
               sentences: Sequence[ReportSentence], ct: np.ndarray, labels: np.ndarray, hidden: np.ndarray,
               spacing: Sequence[float], strides: Sequence[int], window: str, cursor: Sequence[int]) -> str:
    esc = html.escape
    by_value = {s.value: s for s in structures}
    image_name = volume.source.path.name if volume.source.path else "image"
    found = [s for s in structures if s.present]

    toggles = "\n".join(
        f'<label class="toggle{"" if s.on_page else " offpage"}" data-values="{s.value}" title="{esc(s.name)}">'
        f'<input type="checkbox" data-value="{s.value}" checked><span class="swatch" style="background:{s.color}">'
        f'</span>{esc(s.display_name)}{"" if s.on_page else " *"}</label>'
        for s in found)
    if any(not s.on_page for s in found):
        toggles += '\n<p class="note">* not on the page: too small for its subsampled grid, or under two other structures</p>'

    rows = []
    for s in structures:
        if s.present:
            evidence = _fmt(s.confidence, 2)
        else:
            evidence = "" if s.max_probability_bound is None else f"p &le; {s.max_probability_bound:.2f}"
            if s.rejected:
                evidence = f"rejected: {ml_text(s.rejected['volume_ml'])} mL at mean p {s.rejected['confidence']:.2f}"
                if s.rejected.get("rule") == "anatomy":
                    evidence += f", on the slices of {', '.join(s.rejected['conflicts_with'])}"
                elif s.rejected.get("rule") == "outside_body":
                    evidence += ", outside the body"
                elif s.rejected.get("rule") == "hu":
                    evidence += f", {s.rejected['mean_hu']:g} HU without contrast"
        volume_ml = "" if s.volume_ml is None else ml_text(s.volume_ml)
        rows.append(
            f'<tr class="{"present" if s.present else "absent"}" data-values="{s.value}">'
            f'<td>{s.value}</td><td><span class="swatch" style="background:{s.color if s.present else "transparent"}">'
            f'</span>{esc(s.display_name)}</td><td>{"yes" if s.present else "no"}</td>'
            f'<td class="num">{volume_ml if s.present else ""}</td>'
            f'<td class="num">{_fmt(s.mean_intensity, 1)}</td><td class="num">{evidence}</td></tr>')
    unit = next((s.unit for s in structures if s.present), "HU" if volume.modality == "CT" else "intensity")

    report_parts = []
    for piece in sentences:
        text = esc(piece.text)
        if piece.values:
            names = ", ".join(by_value[v].name for v in piece.values if v in by_value)
            report_parts.append(f'<span class="sentence" data-values="{" ".join(map(str, piece.values))}" '
                                f'title="{esc(names)}">{text}</span>')
        else:
            report_parts.append(text)

    data = {
        "shape": [int(n) for n in ct.shape],
        "spacing": [float(s) for s in spacing],
        "label_bytes": labels.dtype.itemsize,
        "ct": _pack(ct),
        "labels": _pack(labels),
        "hidden": _pack(hidden),
        "structures": [{"value": s.value, "name": s.name, "color": s.color, "present": s.present,
                        "centroid": list(s.centroid) if s.centroid else None} for s in structures],
        "cursor": [int(c) for c in cursor],
    }
    # "</" inside a script element would end it early.
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    threshold = seg.table.get("threshold", seg.statistics.get("threshold"))
    subtitle = (f"{volume.modality}, {' x '.join(map(str, volume.shape))} voxels of "
                f"{' x '.join(f'{s:.3g}' for s in volume.spacing)} mm; shown on a "
                f"{' x '.join(map(str, ct.shape))} grid of {' x '.join(f'{s:.3g}' for s in spacing)} mm"
                + (f" (every {' / '.join(map(str, strides))} voxel)" if any(s > 1 for s in strides) else "")
                + (f"; window {window} (L {WINDOWS[window][0]:g} / W {WINDOWS[window][1]:g} HU)" if window in WINDOWS else "")
                + (f"; probability threshold {threshold:g}" if isinstance(threshold, (int, float)) else ""))
    fields = {
        "TITLE": esc(f"{image_name}: {len(found)} of {len(structures)} structure(s) found"),
        "SUBTITLE": esc(subtitle),
        "SOURCE": esc(str(out_dir)),
        "TOGGLES": toggles or '<p class="note">no structure was found</p>',
        "UNIT": esc(unit),
        "ROWS": "\n".join(rows),
        "REPORT": "".join(report_parts) or '<span class="note">no report.txt in the folder</span>',
        "DATA": blob,
    }
    return re.sub(r"@@([A-Z]+)@@", lambda m: fields[m.group(1)], template)

