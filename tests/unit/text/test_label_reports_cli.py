"""`volumed label-reports` and `volumed evaluate-reports`: round trips and bad input, through the real CLI."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from volumed.cli import app, main
from volumed.text.labels import ABNORMALITIES

REPORTS = "AccessionNo,report_text,Cardiomegaly\nx1,Cardiomegaly. No pleural effusion.,1\nx2,\"Pleural effusion, atelectatic changes.\",0\n"


def _run(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr()


def test_label_reports_round_trip(tmp_path):
    src = tmp_path / "reports.csv"
    src.write_text(REPORTS, encoding="utf-8")
    out = tmp_path / "labels.csv"
    result = CliRunner().invoke(app, ["label-reports", str(src), "-o", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["AccessionNo", *ABNORMALITIES]  # the label column of the input is not an id
    assert [r["AccessionNo"] for r in rows] == ["x1", "x2"]
    assert rows[0]["Cardiomegaly"] == "1" and rows[0]["Pleural effusion"] == "0"
    assert rows[1]["Pleural effusion"] == "1" and rows[1]["Atelectasis"] == "1"
    again = CliRunner().invoke(app, ["label-reports", str(src), "-o", str(out)])
    assert again.exit_code != 0  # refuses to overwrite
    assert CliRunner().invoke(app, ["label-reports", str(src), "-o", str(out), "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("content, problem", [
    ("AccessionNo,report_text\nx1,Effusion\xe9\n".encode("latin-1"), "not UTF-8"),
    (b"AccessionNo,findings\nx1,Effusion.\n", "no column 'report_text'"),
    (b"AccessionNo,report_text\nx1,Effusion.\nx2,\n", "empty report"),
])
def test_label_reports_bad_input(tmp_path, capsys, content, problem):
    src = tmp_path / "bad.csv"
    src.write_bytes(content)
    out = tmp_path / "labels.csv"
    code, captured = _run(["label-reports", str(src), "-o", str(out)], capsys)
    assert code == 2 and problem in captured.err and "bad.csv" in captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # nothing written, no temp file left


def test_evaluate_reports_round_trip_and_mismatch(tmp_path, capsys):
    ref = tmp_path / "ref.csv"
    ref.write_text(REPORTS, encoding="utf-8")
    out = tmp_path / "metrics.json"
    code, captured = _run(["evaluate-reports", "--pred", str(ref), "--ref", str(ref), "-o", str(out)], capsys)
    assert code in (0, None), captured.err
    assert "BLEU-4" in captured.out and "CE F1 (macro" in captured.out
    scores = json.loads(out.read_text())
    assert scores["bleu"]["bleu_4"] == pytest.approx(1.0) and scores["clinical"]["micro_f1"] == 1.0
    pred = tmp_path / "pred.csv"
    pred.write_text("AccessionNo,report_text\nx1,Cardiomegaly.\n", encoding="utf-8")
    out2 = tmp_path / "m2.json"
    code, captured = _run(["evaluate-reports", "--pred", str(pred), "--ref", str(ref), "-o", str(out2)], capsys)
    assert code == 2 and "pred.csv" in captured.err and "without a prediction" in captured.err and "x2" in captured.err
    assert not out2.exists()
