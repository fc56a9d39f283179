"""CSV files of free-text reports: read them strictly, and pair predictions with references.

A report table is a CSV with one report per row in a text column (``report_text`` by default, as
in CT-RATE) and any number of other columns. The identifying columns are those that are neither
the text column nor one of the 18 CT-RATE label columns (``AccessionNo`` in CT-RATE), unless the
caller names them.

Every problem a user can cause is a :class:`volumed.errors.ReportTableError` whose message names
the file and lists all problems with their row numbers (the header is line 1, so the first report
is row 2): not UTF-8 (with the byte offset), no header, a missing column (with the columns that
exist), empty reports, and, for pairs, different lengths or ids present on one side only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from volumed.errors import ReportTableError
from volumed.text.labels import ABNORMALITIES

DEFAULT_TEXT_COLUMN = "report_text"


@dataclass(frozen=True)
class ReportTable:
    """Reports of one CSV file.

    ``texts[i]`` is the report of CSV row ``i + 2``; ``ids[i]`` holds the values of
    ``id_columns`` for that row.
    """

    path: Path
    text_column: str
    id_columns: tuple[str, ...]
    ids: tuple[tuple[str, ...], ...]
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ReportTableError(["file not found"], path) from None
    except OSError as err:
        raise ReportTableError([f"cannot be read ({err.strerror or err})"], path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ReportTableError(
            [f"not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}); "
             "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"], path) from None


def read_report_table(path: str | Path, *, text_column: str = DEFAULT_TEXT_COLUMN,
                      id_columns: Sequence[str] | None = None, allow_empty: bool = False) -> ReportTable:
    """Read a CSV of reports; raise :class:`ReportTableError` listing every problem.

    Args:
        path: the CSV file (UTF-8, a header row).
        text_column: the column that holds the report text.
        id_columns: columns that identify a row; None takes every column that is neither the
            text nor a CT-RATE label column.
        allow_empty: accept empty reports (otherwise each is reported with its row number).
    """
    path = Path(path)
    text = _read_text(path)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ReportTableError([f"not a readable CSV ({err})"], path) from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ReportTableError(["empty file: no header row"], path)
    header = [cell.strip() for cell in rows[0]]
    problems = []
    if text_column not in header:
        problems.append(f"no column {text_column!r}; the columns are: {', '.join(map(repr, header))} "
                        "(choose one with --column)")
    if id_columns is None:
        id_columns = [c for c in header if c != text_column and c not in ABNORMALITIES]
    missing_ids = [c for c in id_columns if c not in header]
    if missing_ids:
        problems.append(f"no id column(s) {', '.join(map(repr, missing_ids))}; the columns are: {', '.join(map(repr, header))}")
    if problems:
        raise ReportTableError(problems, path)
    t_index = header.index(text_column)
    id_index = [header.index(c) for c in id_columns]
    texts, ids, empty, short = [], [], [], []
    for row_number, row in enumerate(rows[1:], start=2):
        if not row:  # a blank line is no row
            continue
        if len(row) <= max([t_index, *id_index]):
            short.append(row_number)
            continue
        report = row[t_index]
        if not report.strip():
            empty.append(row_number)
        texts.append(report)
        ids.append(tuple(row[i] for i in id_index))
    if short:
        problems.append(f"{len(short)} row(s) with fewer cells than the header: rows {_few(short)}")
    if empty and not allow_empty:
        problems.append(f"{len(empty)} empty report(s) in column {text_column!r}: rows {_few(empty)}")
    if not texts:
        problems.append("no reports: the file has a header but no rows")
    if problems:
        raise ReportTableError(problems, path)
    return ReportTable(path, text_column, tuple(id_columns), tuple(ids), tuple(texts))


def _few(items: Sequence, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def pair_tables(pred: ReportTable, ref: ReportTable) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """Predicted and reference texts in matching order, and the ids of the pairs.

    When both tables have id columns with the same names, rows are paired by id (order may
    differ); every id must be unique and present in both. Otherwise they are paired by row order
    and must have the same number of rows.
    """
    shared = tuple(c for c in pred.id_columns if c in ref.id_columns)
    if not shared:
        if len(pred) != len(ref):
            raise ReportTableError(
                [f"{len(pred)} predicted report(s) but {len(ref)} reference report(s) in {ref.path}, and no id column "
                 "common to both files to pair them by; give both files the same rows in the same order, or an id column"],
                pred.path)
        return list(pred.texts), list(ref.texts), [(str(i + 2),) for i in range(len(pred))]

    def keyed(table: ReportTable) -> dict[tuple[str, ...], str]:
        cols = [table.id_columns.index(c) for c in shared]
        out, dupes = {}, []
        for row_ids, text in zip(table.ids, table.texts):
            key = tuple(row_ids[i] for i in cols)
            if key in out:
                dupes.append("/".join(key))
            out[key] = text
        if dupes:
            raise ReportTableError([f"duplicate id(s) in {', '.join(shared)}: {_few(dupes)}"], table.path)
        return out

    p, r = keyed(pred), keyed(ref)
    only_pred = [k for k in p if k not in r]
    only_ref = [k for k in r if k not in p]
    if only_pred or only_ref:
        problems = []
        if only_pred:
            problems.append(f"{len(only_pred)} id(s) not in the reference {ref.path}: {_few(['/'.join(k) for k in only_pred])}")
        if only_ref:
            problems.append(f"{len(only_ref)} reference id(s) without a prediction: {_few(['/'.join(k) for k in only_ref])}")
        problems.append(f"{len(pred)} predicted vs {len(ref)} reference report(s), paired by {', '.join(shared)}")
        raise ReportTableError(problems, pred.path)
    keys = list(r)
    return [p[k] for k in keys], [r[k] for k in keys], keys
