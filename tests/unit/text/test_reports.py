"""volumed.text.reports: finding type, location, size, negation and bad input, on real report sentences."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from volumed.data.vocab import default_vocabulary, radgenome_to_canonical
from volumed.errors import ConfigError, ReportTextError
from volumed.text.reports import (
    DEFAULT_MAX_WORDS,
    FINDING_TYPES,
    Finding,
    ParsedReport,
    find_locations,
    find_sizes,
    looks_english,
    parse_report,
    parse_sentence,
)
from volumed.text.sentences import split_sentences


@pytest.fixture(scope="module")
def ct_rate_reports(shared_data) -> list[str]:
    path = shared_data / "ct_rate_reports" / "train.csv"
    if not path.exists():
        pytest.skip(f"{path} not found")
    with open(path, encoding="utf-8", newline="") as fh:
        return [row["report_text"] for row in csv.DictReader(fh)]


def _findings_of(report: str, sentence: str) -> list[Finding]:
    """The findings that :func:`parse_report` gives for ``sentence`` inside the real ``report``."""
    start = report.index(sentence)
    parsed = parse_report(report)
    return [f for f in parsed.findings if start <= f.span.start < start + len(sentence)]


# Real sentences of CT-RATE's labelled reports (../shared/data/ct_rate_reports/train.csv), each
# parsed inside its own report: (sentence, finding words, type, negated, uncertain, term, side, size_mm).
CT_RATE_SENTENCES = [
    ("A 3 mm diameter nodule is observed in the subpleural area of the left lung lower lobe laterobasal segment.",
     "nodule", "nodule", False, False, "lung_lower_lobe_left", "left", (3.0,)),
    ("A 16 x 12 mm lymphadenopathy was observed in the left hilum.",
     "lymphadenopathy", "lymph node", False, False, None, "left", (16.0, 12.0)),
    ("8x5.7 mm parenchymal nodule in the lower lobe of the right lung",
     "parenchymal nodule", "nodule", False, False, "lung_lower_lobe_right", "right", (8.0, 5.7)),
    ("There is an effusion measuring 1 cm in its thickest part in the anterior pericardial area.",
     "effusion", "effusion", False, False, None, None, (10.0,)),
    ("Two adjacent nodules with a diameter of 3 mm are observed in the lingular segment of the left lung.",
     "nodules", "nodule", False, False, "lung_upper_lobe_left", "left", (3.0,)),
    ("A 13 mm diameter calculus is observed in the gallbladder lumen.",
     "calculus", "stone", False, False, "gallbladder", None, (13.0,)),
    ("A 16 mm in diameter, faintly circumscribed, hypodense nodule in the lateral crus of the left adrenal gland.",
     "hypodense nodule", "nodule", False, False, "adrenal_gland_left", "left", (16.0,)),
    ("In the left lobe of the thyroid gland, a nodule of approximately 34x27 mm in size",
     "nodule", "nodule", False, False, "thyroid_gland", "left", (34.0, 27.0)),
    ("Ground-glass areas in the middle lobe of the right lung",
     "Ground-glass areas", "opacity", False, False, "lung_middle_lobe_right", "right", ()),
    ("There is minimal bronchiectasis in the lower lobe of the left lung, especially in the central parts.",
     "bronchiectasis", "bronchiectasis", False, False, "lung_lower_lobe_left", "left", ()),
    ("Wall calcifications in the aorta.", "calcifications", "calcification", False, False, "aorta", None, ()),
    # Negated: the finding keeps its type and location, so that an evaluation knows where nothing should be.
    ("No solid mass was detected in both kidneys.", "solid mass", "mass", True, False, "kidney", "bilateral", ()),
    ("Pericardial effusion-thickening was not observed.",
     "Pericardial effusion", "effusion", True, False, None, None, ()),
    ("Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.",
     "wall thickening", "thickening", True, False, "esophagus", None, ()),
    (("No enlarged lymph nodes in prevascular, pre-paratracheal, subcarinal or bilateral hilar-axillary "
      "pathological dimensions were detected."), "enlarged lymph nodes", "lymph node", True, False, None, "bilateral", ()),
    # An enlarged organ: the "-megaly" word names its organ, even beside another location word.
    ("Hepatomegaly, periportal edema.", "Hepatomegaly", "enlargement", False, False, "liver", None, ()),
    ("Dilatation of the ascending and descending aorta, cardiomegaly",
     "cardiomegaly", "enlargement", False, False, "heart", None, ()),
    ("Spleen CC size measured 142 mm and increased (splenomegaly).",
     "splenomegaly", "enlargement", False, False, "spleen", None, (142.0,)),
    # Uncertain: hedged, not negated.
    ("Possible neoplastic lesion cannot be excluded.", "lesion", "lesion", False, True, None, None, ()),
    ("Mosaic attenuation pattern in both lungs (small vessel disease? small airway disease?).",
     "Mosaic attenuation pattern", "mosaic attenuation", False, True, "lung", "bilateral", ()),
]


@pytest.mark.realdata
@pytest.mark.parametrize("sentence, words, kind, negated, uncertain, term, side, size_mm", CT_RATE_SENTENCES)
def test_real_ct_rate_sentences(ct_rate_reports, sentence, words, kind, negated, uncertain, term, side, size_mm):
    report = next((r for r in ct_rate_reports if sentence in r), None)
    assert report is not None, f"not a CT-RATE sentence: {sentence!r}"
    matches = [f for f in _findings_of(report, sentence) if f.span.text == words]
    assert matches, [f.span.text for f in _findings_of(report, sentence)]
    f = matches[0]
    assert report[f.span.start:f.span.end] == words  # offsets point into the report
    assert (f.finding_type, f.negated, f.uncertain) == (kind, negated, uncertain)
    assert (f.location_term, f.side, f.size_mm) == (term, side, size_mm)
    assert f.positive is (not negated)


@pytest.mark.realdata
def test_regions_without_a_term_are_named(ct_rate_reports):
    (f,) = _findings_of(next(r for r in ct_rate_reports if "lymphadenopathy was observed in the left hilum" in r),
                        "A 16 x 12 mm lymphadenopathy was observed in the left hilum.")
    assert f.region == "hilum" and f.location_span.text == "hilum"
    effusion = _findings_of(next(r for r in ct_rate_reports if "Pericardial effusion-thickening was not observed" in r),
                            "Pericardial effusion-thickening was not observed.")[0]
    assert effusion.region == "pericardium"


@pytest.mark.realdata
def test_every_ct_rate_sentence_reads_as_english_and_parses(ct_rate_reports):
    sentences = [s.text for r in ct_rate_reports for s in split_sentences(r)]
    assert len(sentences) > 15000
    assert [s for s in sentences if not looks_english(s)] == []
    parsed = [parse_report(r) for r in ct_rate_reports[:100]]
    findings = [f for p in parsed for f in p.findings]
    assert {f.finding_type for f in findings} <= set(FINDING_TYPES)
    positives = [f for f in findings if f.positive]
    # Most positive findings of a chest CT report name where they are.
    located = [f for f in positives if f.location_term or f.region]
    assert len(located) >= 0.6 * len(positives)


@pytest.mark.realdata
def test_a_finding_keeps_every_location_of_its_phrase(ct_rate_reports):
    sentence = ("Nodular consolidation areas were observed in the right lung upper lobe posterior, lower lobe "
                "laterobasal, and left lung lower lobe mediobasal segment in the case")
    report = next(r for r in ct_rate_reports if sentence in r)
    (f,) = _findings_of(report, sentence)
    assert f.finding_type == "consolidation" and f.location_term == "lung_upper_lobe_right"
    assert [loc.term for loc in f.locations] == ["lung_upper_lobe_right", "lung_lower_lobes", "lung_lower_lobe_left"]


def _radgenome(shared_data):
    folder = shared_data / "radgenome_chestct_subset"
    if not folder.exists():
        pytest.skip(f"{folder} not found")
    return folder


@pytest.mark.realdata
def test_radgenome_location_phrases_match_the_vocabulary_mapping(shared_data):
    """RadGenome-ChestCT's region phrases: the parser finds the term that radgenome_to_canonical gives."""
    counts = json.loads((_radgenome(shared_data) / "train_location_sentences.json").read_text(encoding="utf-8"))
    checked = 0
    for key in counts:
        path = key.removeprefix("<Location>").strip().rstrip(".")
        expected = radgenome_to_canonical(path)
        if expected is None:
            continue
        leaf = path.split("/")[-1]
        terms = [loc.term for loc in find_locations(leaf) if loc.term]
        assert terms and terms[-1] == expected, (path, terms)
        checked += 1
    assert checked >= 10


@pytest.mark.realdata
def test_lobes_agree_with_radgenome_annotations(shared_data, ct_rate_reports):
    """RadGenome-ChestCT annotated, per CT-RATE volume, the lung lobes its abnormalities lie in. For
    the volumes whose report is among CT-RATE's 800 labelled ones, the lobes named by the report's
    positive findings cover those annotations (report-level recall; measured 80/85 = 0.94)."""
    folder = _radgenome(shared_data)
    with open(shared_data / "ct_rate_reports" / "train.csv", encoding="utf-8", newline="") as fh:
        reports = {r["AccessionNo"]: r["report_text"] for r in csv.DictReader(fh)}
    with open(shared_data / "ct_rate_reports" / "map_train_classifier.csv", encoding="utf-8", newline="") as fh:
        accession = {r["NameinCTRATE"]: r["AccessionNo"] for r in csv.DictReader(fh)}
    annotated: dict[str, set[str]] = {}
    with open(folder / "train_vqa_location.csv", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            term = radgenome_to_canonical(row["Anatomy"])
            if term and term.startswith("lung_") and term not in ("lung_left", "lung_right"):
                annotated.setdefault(row["Volumename"].rsplit("_", 1)[0], set()).add(term)
    vocabulary = default_vocabulary()

    def family(name: str) -> set[str]:  # a term and the terms it is made of
        return {name}.union(*(family(p) for p in vocabulary.term(name).parts))

    hits = total = 0
    for volume, lobes in annotated.items():
        if accession.get(volume) not in reports:
            continue
        named = {loc.term for f in parse_report(reports[accession[volume]]).positive_findings
                 for loc in f.locations if loc.term}
        for lobe in lobes:
            total += 1
            hits += any(lobe in family(t) or t in family(lobe) for t in named)
    assert total >= 50
    assert hits / total >= 0.85


@pytest.mark.realdata
@pytest.mark.parametrize("phrase, kind", [
    ("Pericardial effusion.", "effusion"),
    ("Calcific atheroma plaques.", "calcification"),
    ("Atheroma plaques.", "plaque"),
    ("Sliding type hiatal hernia.", "hernia"),
    ("Nonspecific nodules.", "nodule"),
    ("Linear atelectasis.", "atelectasis"),
    ("Lymph node.", "lymph node"),
    ("Hypodense lesion.", "lesion"),
    ("Ground glass areas.", "opacity"),
    ("Consolidation.", "consolidation"),
    ("Hepatosteatosis.", "steatosis"),
    ("Osteophytes.", "degenerative change"),
])
def test_radgenome_abnormality_phrases(shared_data, phrase, kind):
    counts = json.loads((_radgenome(shared_data) / "train_abnormalities_sentences.json").read_text(encoding="utf-8"))
    assert f"<Abnormality> {phrase}" in counts  # a real RadGenome phrase
    (finding,) = parse_sentence(phrase).findings
    assert finding.finding_type == kind and finding.positive


# ---------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("text, sizes", [
    ("A 12 x 8 mm nodule", [(12.0, 8.0)]),
    ("a 1.2 x 0.8 cm mass", [(12.0, 8.0)]),
    ("measuring 12 mm x 8 mm", [(12.0, 8.0)]),
    ("a mass of 27x28x46 mm", [(27.0, 28.0, 46.0)]),
    ("8.5x3.5mm lymph node", [(8.5, 3.5)]),
    ("nodules measuring 3-5 mm", [(5.0,)]),
    ("a 2 centimetre cyst", [(20.0,)]),
    ("50 HU in segment 7 on series 3", []),
    ("24 mm on the right and 18 mm on the left", [(24.0,), (18.0,)]),
])
def test_sizes_in_mm(text, sizes):
    found = find_sizes(text)
    assert [s.mm for s in found] == sizes
    assert all(text[s.span.start:s.span.end] == s.span.text for s in found)


def test_issue_example_and_side_narrowing():
    (f,) = parse_sentence("12 mm nodule in the right lower lobe").findings
    assert (f.finding_type, f.location_term, f.side, f.size_mm, f.negated) == ("nodule", "lung_lower_lobe_right", "right", (12.0,), False)
    (g,) = parse_sentence("Nodule in the lower lobe on the right measuring 1.2 cm.").findings
    assert (g.location_term, g.side, g.size_mm) == ("lung_lower_lobe_right", "right", (12.0,))
    (h,) = parse_sentence("In the right lung lower lobe, there is a 5 mm nodule.").findings  # location in another phrase
    assert (h.location_term, h.size_mm, h.text) == ("lung_lower_lobe_right", (5.0,), "there is a 5 mm nodule.")


def test_negation_and_uncertainty():
    (no,) = parse_sentence("No pleural effusion.").findings
    assert no.negated and not no.positive and no.region == "pleura"
    (maybe,) = parse_sentence("Pleural effusion cannot be excluded.").findings
    assert maybe.uncertain and maybe.positive
    both = parse_sentence("No pneumothorax; a small right pleural effusion is seen.")
    assert [(f.finding_type, f.negated, f.side) for f in both.findings] == [("pneumothorax", True, None), ("effusion", False, "right")]
    assert [p.text for p in both.phrases] == ["No pneumothorax", "a small right pleural effusion is seen."]


def test_report_is_split_into_sentences_and_phrases():
    report = "Emphysema in both lungs. No nodule; atelectasis in the left lower lobe, the largest 15 mm."
    parsed = parse_report(report)
    assert [s.text for s in parsed.sentences] == ["Emphysema in both lungs.", "No nodule; atelectasis in the left lower lobe, the largest 15 mm."]
    assert [p.text for p in parsed.sentences[1].phrases] == ["No nodule", "atelectasis in the left lower lobe", "the largest 15 mm."]
    assert [(f.finding_type, f.positive) for f in parsed.findings] == [("emphysema", True), ("nodule", False), ("atelectasis", True)]
    atelectasis = parsed.positive_findings[-1]
    # "the largest 15 mm" is a phrase without a finding of its own: its size goes to the sentence's finding.
    assert (atelectasis.location_term, atelectasis.size_mm) == ("lung_lower_lobe_left", (15.0,))
    assert isinstance(parsed, ParsedReport) and not parsed.truncated and parsed.n_words == parsed.n_words_parsed == 16


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_sentence_and_report_are_clear_errors(text):
    with pytest.raises(ReportTextError, match="empty finding sentence"):
        parse_sentence(text)
    with pytest.raises(ReportTextError, match="empty report"):
        parse_report(text)
    assert issubclass(ReportTextError, ConfigError)  # the CLI prints it on one line, exit 2


def test_punctuation_only_sentence_is_an_error():
    with pytest.raises(ReportTextError, match="no words"):
        parse_sentence("...")
    with pytest.raises(ReportTextError, match="no words"):
        parse_report(" . ; ")


def test_sentence_without_location_gives_a_finding_without_location():
    (f,) = parse_sentence("A 12 mm nodule.").findings
    assert (f.finding_type, f.size_mm) == ("nodule", (12.0,))
    assert f.location_term is None and f.region is None and f.side is None and f.location_span is None
    # and a sentence with a location but no finding gives no finding
    assert parse_sentence("The right lower lobe.").findings == ()


@pytest.mark.parametrize("sentence", [
    "Sağ akciğer alt lobda 5 mm nodül izlendi.",   # Turkish, CT-RATE's original language
    "Kein Nachweis eines Pleuraergusses rechts.",   # German
    "No se observa derrame pleural.",               # Spanish
    "右肺下叶见一结节。",                              # Chinese
])
def test_non_english_sentence(sentence, caplog):
    assert not looks_english(sentence)
    with pytest.raises(ReportTextError, match="does not read as English"):
        parse_sentence(sentence)
    with pytest.raises(ReportTextError, match="does not read as English"):
        parse_report(sentence)
    # Inside an English report: set aside with a warning, and no findings from it.
    report = f"A 4 mm nodule in the left upper lobe. {sentence} No pleural effusion."
    with caplog.at_level(logging.WARNING, logger="volumed.text.reports"):
        parsed = parse_report(report)
    assert [s.text for s in parsed.non_english] == [sentence]
    assert "does not read as English" in caplog.text
    assert [f.finding_type for f in parsed.findings] == ["nodule", "effusion"]


def test_report_of_10000_words_is_truncated_at_a_sentence_end(caplog):
    sentence = "A 4 mm nodule is observed in the right lung lower lobe and no pleural effusion was detected. "  # 18 words
    report = sentence * 556 + "word " * 7  # 10,015 words
    assert len(report.split()) == 10015
    with caplog.at_level(logging.WARNING, logger="volumed.text.reports"):
        parsed = parse_report(report)
    assert parsed.truncated and parsed.n_words == len(report.split())
    assert parsed.n_words_parsed <= DEFAULT_MAX_WORDS and parsed.n_words_parsed == 18 * (DEFAULT_MAX_WORDS // 18)
    assert report.startswith(parsed.text) and parsed.text.endswith("detected.")  # whole sentences only
    assert len(parsed.positive_findings) == DEFAULT_MAX_WORDS // 18
    assert "truncated" in caplog.text
    with pytest.raises(ReportTextError, match="more than max_words=2000"):
        parse_report(report, on_overflow="error")
    # A caller may allow more; nothing else limits the rules.
    assert not parse_report(report, max_words=20000).truncated


def test_one_endless_sentence_is_cut_at_the_word_limit():
    report = "nodule " * 10000
    parsed = parse_report(report, max_words=50)
    assert parsed.truncated and parsed.n_words_parsed == 50 and parsed.n_words == 10000
    with pytest.raises(ReportTextError, match="longer than"):
        parse_sentence(report)
