"""Label a CSV of reports and write the labels as CSV (``volumed label-reports``).

Output columns: the input's id column(s), then one 0/1 column per CT-RATE abnormality, named
exactly as in CT-RATE's header, so the output can be compared with CT-RATE's label files
column by column. The input is checked completely before any labelling; the output is written
to a temporary file next to it and renamed when complete, never over an existing file unless
``overwrite``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from volumed.io.atomic import atomic_output, check_writable
from volumed.text.labels import ABNORMALITIES, label_report
from volumed.text.report_table import DEFAULT_TEXT_COLUMN, read_report_table


def label_report_csv(reports: str | Path, output: str | Path, *, text_column: str = DEFAULT_TEXT_COLUMN,
                     id_columns: Sequence[str] | None = None, overwrite: bool = False,
                     progress: bool = False) -> tuple[int, int]:
    """Label every report of ``reports``; write ``output``. Returns (reports, positive labels)."""
    check_writable(output, overwrite)  # cheap checks first: before reading and labelling
    table = read_report_table(reports, text_column=text_column, id_columns=id_columns)
    rows, positives = [], 0
    for ids, text in tqdm(list(zip(table.ids, table.texts)), desc="labelling reports", unit="report",
                          disable=not progress or len(table) < 200):
        vector = label_report(text).vector()
        positives += sum(vector)
        rows.append([*ids, *vector])
    with atomic_output(output, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([*table.id_columns, *ABNORMALITIES])
            writer.writerows(rows)
    return len(rows), positives
