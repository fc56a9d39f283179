"""Datalists: which volumes (and labels, reports, terms) make up a data set.

Two formats are read, both into a list of :class:`DatalistEntry`:

- **MSD / decathlon JSON** (what MONAI's ``load_decathlon_datalist`` reads)::

      {"dataroot": "/data/Task03_Liver",            # optional; also "base_dir"
       "modality": {"0": "CT"},                      # optional; default for every entry
       "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
       "validation": [...],
       "test": ["imagesTs/b.nii.gz", {"image": "imagesTs/c.nii.gz"}]}

  An entry may also hold ``report`` (text), ``terms`` (a list, or one string separated by ``;``
  or ``|``) and ``modality``; any other key is kept in :attr:`DatalistEntry.extra`.
  ``row`` is the 0-based index of the entry in its section (problems read ``training[3]``).

- **CSV** with a header row and the columns ``image, label, report, terms, modality`` (only
  ``image`` is needed; header names are matched case-insensitively). ``terms`` are separated by
  ``;`` or ``|``; ``report`` is free text and may hold commas, quotes and newlines when quoted
  as the csv module does. Other columns are kept as strings in :attr:`DatalistEntry.extra`.
  ``row`` is the 1-based record number counting the header as row 1 (the first entry is row 2),
  so a report spanning several lines still counts as one row. Rows whose cells are all empty are
  skipped. The ``section`` argument does not apply to CSV.

Relative paths are resolved against the datalist's own folder; for JSON, against its
``"dataroot"`` (or ``"base_dir"``) key when present, itself relative to the JSON's folder. ``~``
is expanded. Paths are made absolute but symlinks are not resolved.

Everything is validated before anything is returned, and all problems are reported at once in
one :class:`~volumed.errors.DatalistError` whose message lists them with their row.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from volumed.errors import ConfigError, DatalistError
from volumed.io.atomic import atomic_write_text, check_writable

__all__ = [
    "DATALIST_COLUMNS",
    "DatalistEntry",
    "load_datalist",
    "normalise_modality",
    "split_terms",
    "write_datalist",
]

#: The columns (CSV) or keys (JSON) that map onto :class:`DatalistEntry` fields, in write order.
DATALIST_COLUMNS: tuple[str, ...] = ("image", "label", "report", "terms", "modality")

#: Accepted modality spellings (upper-cased) and the modality they mean. MSD JSON files name MR
#: sequences rather than the modality ({"0": "FLAIR", "1": "T1w"}), so those count as MR.
_MODALITY_ALIASES: dict[str, str] = {
    "CT": "CT",
    "MR": "MR",
    "MRI": "MR",
    **{seq: "MR" for seq in ("T1", "T1W", "T1GD", "T1C", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD")},
}

_TERM_SEPARATORS = (";", "|")


@dataclass(frozen=True)
class DatalistEntry:
    """One case of a datalist.

    Attributes:
        image: absolute path of the image file, or of a DICOM series folder.
        label: absolute path of the label map, or ``None``.
        report: free-text report, or ``None``.
        terms: anatomy/finding terms for text-prompted tasks, in file order, without duplicates.
        modality: ``"CT"`` or ``"MR"`` (normalised upper case), or ``None`` when not given.
        row: CSV record number (header = row 1, first entry = row 2) or 0-based JSON index.
        extra: the entry's other columns/keys, unchanged (CSV values are strings).
    """

    image: Path
    label: Path | None = None
    report: str | None = None
    terms: tuple[str, ...] = ()
    modality: str | None = None
    row: int = 0
    extra: dict[str, Any] = field(default_factory=dict, hash=False)  # hash=False: entries stay hashable


def normalise_modality(value: str) -> str | None:
    """``"CT"`` or ``"MR"`` for an accepted spelling (case-insensitive, see module doc), else ``None``."""
    return _MODALITY_ALIASES.get(str(value).strip().upper())


def split_terms(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Terms from a ``;``/``|``-separated string (or a list), stripped, empties and repeats dropped."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    parts: list[str] = []
    for item in items:
        text = str(item)
        for sep in _TERM_SEPARATORS[1:]:
            text = text.replace(sep, _TERM_SEPARATORS[0])
        parts.extend(t.strip() for t in text.split(_TERM_SEPARATORS[0]))
    return tuple(dict.fromkeys(t for t in parts if t))


# ------------------------------------------------------------------------------------ reading


def load_datalist(
    path: str | Path,
    *,
    section: str = "training",
    require: Sequence[str] = ("image",),
    check_files: bool = True,
) -> list[DatalistEntry]:
    """Read and validate an MSD JSON or CSV datalist (chosen by the ``.json``/``.csv`` suffix).

    Args:
        path: the datalist file.
        section: JSON section to read (``"training"``, ``"validation"``, ``"test"``, ...).
        require: columns/keys that must be present and non-empty in every entry. ``"image"`` is
            always required, whether listed or not.
        check_files: check that every image (a file, or a non-empty DICOM folder) and label
            exists.

    Returns:
        The entries in file order.

    Raises:
        DatalistError: listing every problem with its row: missing or misspelt columns, empty
            required cells, missing files, a label without an image, terms without a label, an
            unknown modality (CT and MR are accepted), duplicate images, malformed JSON (with
            line and column), a missing section (naming the available ones), an empty datalist,
            a file that is not UTF-8.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "datalist file does not exist" if not path.exists() else "datalist path is not a file"
        raise DatalistError([problem], path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise DatalistError([f"unknown datalist format {path.suffix!r}; expected .json (MSD) or .csv"], path)
    required = tuple(dict.fromkeys(("image", *require)))
    text = _read_utf8(path)
    folder = path.absolute().parent
    if suffix == ".json":
        rows, base, problems = _json_rows(text, path, folder, section)
    else:
        rows, base, problems = _csv_rows(text, path, folder, required)
    entries = _validate(rows, base, required, check_files, problems)
    if problems:
        raise DatalistError(problems, path)
    return entries


@dataclass
class _RawRow:
    """One entry before validation: where it is (``where`` prefixes its problems) and its values."""

    row: int
    where: str
    values: dict[str, Any]
    extra: dict[str, Any]
    default_modality: str | None = None
    bad: set[str] = field(default_factory=set)  # keys whose value had the wrong type (reported)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: spreadsheet programs prepend a byte-order mark to CSV exports.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DatalistError(
            [f"not UTF-8 text: byte 0x{data[err.start]:02x} at line {line}; save the file as UTF-8"], path
        ) from None


def _json_rows(text: str, path: Path, folder: Path, section: str) -> tuple[list[_RawRow], Path, list[str]]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatalistError([f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"], path) from None
    if not isinstance(doc, dict):
        raise DatalistError([f"the top level must be a JSON object of sections, got {type(doc).__name__}"], path)
    problems: list[str] = []
    base = folder
    root = doc.get("dataroot", doc.get("base_dir"))
    if root is not None:
        if isinstance(root, str) and root.strip():
            base = folder / Path(root).expanduser()
        else:
            problems.append(f"'dataroot'/'base_dir' must be a non-empty path string, got {root!r}")
    sections = [k for k, v in doc.items() if isinstance(v, list)]
    if section not in doc:
        avail = ", ".join(repr(s) for s in sections) or "none"
        raise DatalistError([f"section {section!r} not found; available sections: {avail}"], path)
    items = doc[section]
    if not isinstance(items, list):
        raise DatalistError([f"section {section!r} must be a list of entries, got {type(items).__name__}"], path)
    if not items:
        raise DatalistError([f"empty datalist: section {section!r} has no entries"], path)
    default_modality = _json_default_modality(doc.get("modality"), problems)
    rows: list[_RawRow] = []
    for i, item in enumerate(items):
        where = f"{section}[{i}]"
        if isinstance(item, str):
            item = {"image": item}  # MSD "test" sections list bare image paths
        if not isinstance(item, dict):
            problems.append(f"{where}: an entry must be an object or an image path string, got {type(item).__name__}")
            continue
        values = {k: item.get(k) for k in DATALIST_COLUMNS}
        extra = {k: v for k, v in item.items() if k not in DATALIST_COLUMNS}
        raw = _RawRow(i, where, values, extra, default_modality)
        for key in ("image", "label", "report", "modality"):
            v = values[key]
            if v is not None and not isinstance(v, str):
                problems.append(f"{where}: {key!r} must be a string, got {type(v).__name__} {v!r}")
                values[key] = None
                raw.bad.add(key)
        terms = values["terms"]
        if terms is not None and not (
            isinstance(terms, str) or (isinstance(terms, list) and all(isinstance(t, str) for t in terms))
        ):
            problems.append(f"{where}: 'terms' must be a list of strings or a ';'-separated string, got {terms!r}")
            values["terms"] = None
            raw.bad.add("terms")
        problems.extend(f"{where}: {near}" for near in _near_misses(extra.keys(), item.keys(), "key"))
        rows.append(raw)
    return rows, base, problems


def _json_default_modality(value: Any, problems: list[str]) -> str | None:
    """The dataset-level modality of an MSD JSON: ``{"0": "CT"}``, ``{"0": "T2", "1": "ADC"}`` or ``"CT"``."""
    if value is None:
        return None
    names = list(value.values()) if isinstance(value, dict) else [value]
    mods = {normalise_modality(n) if isinstance(n, str) else None for n in names}
    if None in mods or len(mods) != 1:
        problems.append(f"top-level 'modality' {value!r} is not one of CT, MR (an MSD modality map of one kind)")
        return None
    return mods.pop()


def _csv_rows(text: str, path: Path, folder: Path, required: tuple[str, ...]) -> tuple[list[_RawRow], Path, list[str]]:
    # strict=True: an unclosed quote is an error instead of silently swallowing the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    problems: list[str] = []
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)  # leading blank lines
        if header is None:
            raise DatalistError(["empty datalist: the CSV file has no header row"], path)
        records = list(reader)
    except csv.Error as err:
        raise DatalistError([f"malformed CSV near line {reader.line_num}: {err}"], path) from None

    names = [h.strip() for h in header]
    keys = [n.lower() if n.lower() in DATALIST_COLUMNS else n for n in names]
    seen: dict[str, int] = {}
    for col, key in enumerate(keys, start=1):
        if key and key in seen:
            problems.append(f"row 1: column {col} {names[col - 1]!r} repeats column {seen[key]}")
        seen.setdefault(key, col)
    missing = [key for key in required if key not in seen]
    for key in missing:
        problems.append(f"row 1: missing required column {key!r} (columns: {', '.join(n for n in names if n)})")
    problems.extend(f"row 1: {near}" for near in _near_misses([k for k in keys if k], keys, "column"))

    rows: list[_RawRow] = []
    for number, cells in enumerate(records, start=2):
        if not any(c.strip() for c in cells):
            continue
        where = f"row {number}"
        if len(cells) > len(keys):
            problems.append(
                f"{where}: {len(cells)} cells but the header has {len(keys)} columns (an unquoted comma in the report?)"
            )
        values: dict[str, Any] = {k: None for k in DATALIST_COLUMNS}
        extra: dict[str, Any] = {}
        for col, key in enumerate(keys):
            cell = cells[col] if col < len(cells) else ""
            if not key:
                if cell.strip():
                    problems.append(f"{where}: a value {cell!r} in column {col + 1}, which has no name in the header")
                continue
            if seen[key] != col + 1:
                continue  # a repeated column; already reported
            if key in DATALIST_COLUMNS:
                # Reports keep their inner line breaks; only surrounding whitespace goes.
                values[key] = cell.strip() or None
            else:
                extra[key] = cell
        # A missing column was reported once for the header, not again for every row.
        rows.append(_RawRow(number, where, values, extra, bad=set(missing)))
    if not rows:
        raise DatalistError(problems + ["empty datalist: the CSV file has a header but no data rows"], path)
    return rows, folder, problems


def _near_misses(unknown_keys: Iterable[str], all_keys: Iterable[str], what: str) -> list[str]:
    """Problems for unknown keys that look like a misspelt standard one ('lable' for 'label')."""
    present = {k.lower() for k in all_keys}
    out = []
    for key in unknown_keys:
        if key.lower() in DATALIST_COLUMNS:
            continue
        missing = [c for c in DATALIST_COLUMNS if c not in present]
        close = difflib.get_close_matches(key.lower(), missing, n=1, cutoff=0.75)
        if close:
            out.append(f"unknown {what} {key!r} (did you mean {close[0]!r}?)")
    return out


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _validate(
    rows: list[_RawRow], base: Path, required: tuple[str, ...], check_files: bool, problems: list[str]
) -> list[DatalistEntry]:
    """Check each raw row, appending to ``problems``; build the entries (only used if none)."""
    entries: list[DatalistEntry] = []
    first_seen: dict[str, str] = {}
    for r in rows:
        v = r.values
        image_s, label_s = v["image"], v["label"]
        image_s = image_s.strip() if isinstance(image_s, str) and image_s.strip() else None
        label_s = label_s.strip() if isinstance(label_s, str) and label_s.strip() else None
        if image_s is None and "image" not in r.bad:
            problems.append(f"{r.where}: label given without an image" if label_s else f"{r.where}: empty 'image'")
        for key in required:
            if key == "image" or key in r.bad:
                continue
            if _blank(v.get(key) if key in DATALIST_COLUMNS else r.extra.get(key)):
                # A required key absent from a JSON entry, or an empty CSV cell.
                problems.append(f"{r.where}: empty {key!r}")
        image = _resolve(base, image_s) if image_s else None
        label = _resolve(base, label_s) if label_s else None
        if check_files:
            if image is not None and not image.exists():
                problems.append(f"{r.where}: image {image_s!r} does not exist ({image})")
            elif image is not None and image.is_dir() and not any(p.is_file() for p in image.rglob("*")):
                problems.append(f"{r.where}: image folder {image_s!r} holds no files (expected a DICOM series)")
            if label is not None and not label.exists():
                problems.append(f"{r.where}: label {label_s!r} does not exist ({label})")
        terms = split_terms(v["terms"])
        if terms and label is None:
            problems.append(f"{r.where}: terms {'; '.join(terms)!r} given but no label")
        modality = r.default_modality
        if isinstance(v["modality"], str) and v["modality"].strip():
            modality = normalise_modality(v["modality"])
            if modality is None:
                problems.append(f"{r.where}: unknown modality {v['modality']!r}; expected CT or MR")
        if image is not None:
            key = os.path.normpath(str(image.absolute()))
            if key in first_seen:
                problems.append(f"{r.where}: image {image_s!r} duplicates {first_seen[key]}")
            else:
                first_seen[key] = r.where
        if image is None:
            continue
        report = v["report"] if isinstance(v["report"], str) and v["report"].strip() else None
        entries.append(
            DatalistEntry(
                image=image.absolute(),
                label=label.absolute() if label is not None else None,
                report=report,
                terms=terms,
                modality=modality,
                row=r.row,
                extra=dict(r.extra),
            )
        )
    return entries


# ------------------------------------------------------------------------------------ writing


def write_datalist(
    entries: Sequence[DatalistEntry],
    path: str | Path,
    *,
    overwrite: bool = False,
    section: str = "training",
) -> Path:
    """Write ``entries`` as CSV or MSD JSON (by the suffix of ``path``), atomically.

    Paths inside the datalist's folder are written relative to it, so the folder can be moved;
    others stay absolute. Terms are joined with ``;`` (CSV) or written as a list (JSON). CSV
    ``extra`` columns follow the standard ones in first-seen order; non-string values are written
    as JSON text. ``row`` is not written. :func:`load_datalist` reads the result back to the same
    entries (up to ``row`` and, for CSV, extra values becoming strings).

    Args:
        entries: the cases to write (at least one).
        path: ``*.csv`` or ``*.json``.
        overwrite: replace an existing file.
        section: the JSON section to write the entries into.

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        ConfigError: the suffix is neither ``.csv`` nor ``.json``.
        DatalistError: no entries, a term holding a separator, an extra key shadowing a column.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"unknown datalist format {path.suffix!r}; expected .csv or .json", path)
    check_writable(path, overwrite)
    entries = list(entries)
    problems: list[str] = []
    if not entries:
        problems.append("no entries to write")
    for i, e in enumerate(entries):
        for t in e.terms:
            if any(sep in t for sep in _TERM_SEPARATORS):
                problems.append(f"entry {i}: term {t!r} holds a separator (';' or '|')")
        for k in e.extra:
            if k in DATALIST_COLUMNS or not k:
                problems.append(f"entry {i}: extra key {k!r} is empty or shadows a standard column")
    if problems:
        raise DatalistError(problems, path)
    folder = path.absolute().parent
    if suffix == ".csv":
        text = _to_csv(entries, folder)
    else:
        text = _to_json(entries, folder, section)
    return atomic_write_text(path, text, overwrite=overwrite)


def _rel(p: Path | None, folder: Path) -> str:
    if p is None:
        return ""
    a = p.expanduser().absolute()
    return a.relative_to(folder).as_posix() if a.is_relative_to(folder) else str(a)


def _to_csv(entries: list[DatalistEntry], folder: Path) -> str:
    extra_keys = list(dict.fromkeys(k for e in entries for k in e.extra))
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*DATALIST_COLUMNS, *extra_keys])
    for e in entries:
        w.writerow(
            [
                _rel(e.image, folder),
                _rel(e.label, folder),
                e.report or "",
                ";".join(e.terms),
                e.modality or "",
                *(_csv_cell(e.extra.get(k)) for k in extra_keys),
            ]
        )
    return buf.getvalue()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _to_json(entries: list[DatalistEntry], folder: Path, section: str) -> str:
    items = []
    for e in entries:
        item: dict[str, Any] = {"image": _rel(e.image, folder)}
        if e.label is not None:
            item["label"] = _rel(e.label, folder)
        if e.report is not None:
            item["report"] = e.report
        if e.terms:
            item["terms"] = list(e.terms)
        if e.modality is not None:
            item["modality"] = e.modality
        item.update(_jsonable(e.extra))
        items.append(item)
    return json.dumps({section: items}, indent=2, ensure_ascii=False) + "\n"


def _jsonable(extra: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in extra.items()}
