"""volumed.metrics.report: BLEU/METEOR/ROUGE-L against known values, clinical efficacy, report CSVs."""

from __future__ import annotations

import pytest

from volumed.errors import ConfigError, ReportTableError
from volumed.metrics.report import clinical_efficacy, evaluate_reports, tokenize
from volumed.text.report_table import pair_tables, read_report_table

REPORTS = ["There is a small pleural effusion on the right. No nodule was detected.",
           "Cardiomegaly. Atelectasis in the left lower lobe.",
           "Emphysematous changes in both lungs."]


def test_identical_texts_score_one():
    m = evaluate_reports(REPORTS, REPORTS)
    assert m.bleu == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert m.rouge_l == pytest.approx(1.0)
    assert m.meteor > 0.99  # METEOR's fragmentation penalty keeps it just below 1
    assert m.clinical.micro_f1 == 1.0 and m.clinical.macro_f1 == 1.0
    assert m.clinical.macro_classes == 4  # effusion, cardiomegaly, atelectasis, emphysema


def test_known_values_and_disjoint_texts():
    m = evaluate_reports(["the heart is normal"], ["the heart is enlarged"])
    # 3 of 4 unigrams match; bigrams 2 of 3: BLEU-1 = 0.75, BLEU-2 = sqrt(0.75 * 2/3)
    assert m.bleu[0] == pytest.approx(0.75)
    assert m.bleu[1] == pytest.approx((0.75 * 2 / 3) ** 0.5)
    assert m.rouge_l == pytest.approx(0.75)
    zero = evaluate_reports(["alpha beta"], ["gamma delta"])
    assert zero.bleu[0] == 0.0 and zero.rouge_l == 0.0 and zero.meteor == 0.0


def test_clinical_efficacy_counts():
    ce = clinical_efficacy([[1, 0], [1, 1], [0, 0]], [[1, 0], [0, 1], [0, 1]], names=["a", "b"])
    assert (ce.per_class["a"].tp, ce.per_class["a"].fp, ce.per_class["a"].fn) == (1, 1, 0)
    assert (ce.per_class["b"].tp, ce.per_class["b"].fp, ce.per_class["b"].fn) == (1, 0, 1)
    assert ce.micro_precision == pytest.approx(2 / 3) and ce.micro_recall == pytest.approx(2 / 3)
    assert ce.macro_f1 == pytest.approx((2 / 3 + 2 / 3) / 2)
    # Negation matters: "no effusion" against "effusion" is a miss.
    m = evaluate_reports(["No pleural effusion."], ["Pleural effusion."])
    assert m.clinical.micro_recall == 0.0


def test_tokenize_keeps_numbers():
    assert tokenize("Nodule of 2.3 mm.") == ["nodule", "of", "2.3", "mm", "."]


def test_mismatched_lengths_refused():
    with pytest.raises(ConfigError, match="pair"):
        evaluate_reports(["a"], ["a", "b"])


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_report_table_problems(tmp_path):
    with pytest.raises(ReportTableError, match="not UTF-8.*line 2") as err:
        read_report_table(_write(tmp_path / "latin.csv", "id,report_text\n1,Pleural effusion \xe9\n", "latin-1"))
    assert "latin.csv" in str(err.value)
    with pytest.raises(ReportTableError, match="no column 'report_text'.*'id', 'text'"):
        read_report_table(_write(tmp_path / "cols.csv", "id,text\n1,x\n"))
    with pytest.raises(ReportTableError, match="empty report.*rows 3"):
        read_report_table(_write(tmp_path / "empty.csv", "id,report_text\n1,Effusion.\n2,  \n"))
    with pytest.raises(ReportTableError, match="no header"):
        read_report_table(_write(tmp_path / "nothing.csv", ""))


def test_pairing_by_id_and_by_order(tmp_path):
    pred = read_report_table(_write(tmp_path / "p.csv", "id,report_text\nb,Emphysema.\na,Effusion.\n"))
    ref = read_report_table(_write(tmp_path / "r.csv", "id,report_text\na,Pleural effusion.\nb,Emphysema.\n"))
    p, r, ids = pair_tables(pred, ref)
    assert ids == [("a",), ("b",)] and p == ["Effusion.", "Emphysema."]
    other = read_report_table(_write(tmp_path / "o.csv", "id,report_text\na,x\nc,y\n"))
    with pytest.raises(ReportTableError, match="not in the reference.*c"):
        pair_tables(other, ref)
    short = read_report_table(_write(tmp_path / "s.csv", "report_text\nx\n"))
    longer = read_report_table(_write(tmp_path / "l.csv", "report_text\nx\ny\n"))
    with pytest.raises(ReportTableError, match="1 predicted report.*2 reference"):
        pair_tables(short, longer)
