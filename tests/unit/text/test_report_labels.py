"""volumed.text.sentences and volumed.text.labels: negation scope, CT-RATE conventions, accuracy on real reports."""

from __future__ import annotations

import csv
import random

import pytest

from volumed.text.labels import ABNORMALITIES, RULES, label_report
from volumed.text.sentences import find_mentions, split_clauses, split_sentences


def test_sentences_keep_offsets_and_decimals():
    text = 'Nodule of 2.3 mm in the right lung. No effusion; atelectasis is seen. " Emphysema.'
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == ["Nodule of 2.3 mm in the right lung.", "No effusion; atelectasis is seen.", "Emphysema."]
    assert all(text[s.start:s.end] == s.text for s in sentences)
    assert [c.text for c in split_clauses(sentences[1])] == ["No effusion", "atelectasis is seen."]


@pytest.mark.parametrize("sentence, negated", [
    ("No pleural effusion was detected.", True),
    ("Pleural effusion-thickening was not observed.", True),
    ("Pleural effusion was not detected in either hemithorax.", True),
    ("The lungs are free of pleural effusion.", True),
    ("Pleural effusion is seen on the right.", False),
    ("Pleural effusion cannot be excluded.", False),  # uncertain, not negated
    ("No pneumothorax; pleural effusion is seen.", False),  # the negation's scope ends at ';'
])
def test_negation_scope(sentence, negated):
    (mention,) = find_mentions(sentence, [r"\bpleural\s+effusion"])
    assert mention.negated is negated
    assert sentence[mention.span.start:mention.span.end].lower() == "pleural effusion"


@pytest.mark.parametrize("sentence", [
    "Cannot exclude a small pleural effusion.",        # CheXpert pre-negation uncertainty: "cannot exclude"
    "We can not exclude pleural effusion.",            # its "not" is no negation
    "Findings worrisome for pleural effusion.",        # CheXpert post-negation uncertainty: "worrisome for"
    "Pleural effusion versus pleural thickening.",     # "XXX versus YYY"
    "Borderline pleural effusion on the left.",
])
def test_chexpert_uncertainty_cues_are_hedges_not_negations(sentence):
    (mention,) = find_mentions(sentence, [r"\bpleural\s+effusion"])
    assert mention.uncertain and not mention.negated


def test_uncertain_mentions_count_as_present():
    (mention,) = find_mentions("Nodules in the fissure (intrapulmonary lymph node?).", [r"\bnodules?\b"])
    assert mention.uncertain and mention.positive


@pytest.mark.parametrize("report, expected", [
    ("Thoracic CT examination within normal limits. Heart contour, size are normal.", set()),
    ("Atelectatic changes in the right lower lobe.", {"Atelectasis"}),
    ("Emphysematous changes in both lungs. Bronchiectatic changes in the left lower lobe.", {"Emphysema", "Bronchiectasis"}),
    ("Calcific atheroma plaques in the coronary arteries.", {"Coronary artery wall calcification"}),
    ("Calcified atherosclerotic changes in the thoracic aorta and coronary arteries.",
     {"Arterial wall calcification", "Coronary artery wall calcification"}),
    ("Pericardial fluid of 8 mm is observed.", {"Pericardial effusion"}),
    ("Effusion reaching 2 cm is observed in the pericardial space.", {"Pericardial effusion"}),
    ("A hiatus hernia is present.", {"Hiatal hernia"}),
    ("No enlarged lymph nodes in pathological dimensions were detected.", set()),
    ("Lymph nodes that did not reach pathological dimensions were observed in the mediastinum.", {"Lymphadenopathy"}),
    ("Patchy ground glass areas in the left lower lobe.", {"Lung opacity"}),
    ("A 4 mm ground-glass nodule in the right upper lobe.", {"Lung nodule"}),
    ("Subcutaneous emphysema in the chest wall.", set()),
    ("A nodule in the left thyroid lobe.", set()),
    ("A port catheter in the superior vena cava.", {"Medical material"}),
    ("The cardiothoracic index increased in favor of the heart.", {"Cardiomegaly"}),
    ("Interlobular septal thickness increases in both lungs.", {"Interlobular septal thickening"}),
    ("A 3 mm nodule, which was not observed in the previous examination, is observed.", {"Lung nodule"}),
])
def test_reports(report, expected):
    assert set(label_report(report).positives()) == expected


def test_names_and_empty_report():
    assert len(ABNORMALITIES) == 18 and set(RULES) == set(ABNORMALITIES)
    result = label_report("")
    assert result.vector() == [0] * 18


@pytest.mark.realdata
def test_macro_f1_on_held_out_ct_rate_fold(shared_data):
    """The rules were written reading folds 0-3 only; fold 4 (160 reports) was scored once, 0.935."""
    path = shared_data / "ct_rate_reports" / "train.csv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[2:] == list(ABNORMALITIES)  # names exactly as in CT-RATE's header
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)  # the folds of bench/bench_report_labels.py
    held_out = [rows[i] for position, i in enumerate(order) if position % 5 == 4]
    f1s = []
    predictions = [label_report(r["report_text"]).labels for r in held_out]
    for name in ABNORMALITIES:
        tp = sum(1 for r, p in zip(held_out, predictions) if r[name] == "1" and p[name])
        fp = sum(1 for r, p in zip(held_out, predictions) if r[name] == "0" and p[name])
        fn = sum(1 for r, p in zip(held_out, predictions) if r[name] == "1" and not p[name])
        f1s.append(2 * tp / (2 * tp + fp + fn))
    assert sum(f1s) / len(f1s) >= 0.91  # measured 0.935
    assert min(f1s) >= 0.70  # measured 0.774 (Peribronchial thickening)
