"""Report phantom cohorts: balanced, deterministic, and labelled by the CT-RATE extractor as intended."""

from __future__ import annotations

import pytest

from volumed.data.report_phantoms import make_report_cohort, nodule_report
from volumed.errors import ConfigError
from volumed.text.labels import ABNORMALITIES, label_report


def test_cohort_is_balanced_interleaved_and_labelled_by_the_extractor():
    cohort = make_report_cohort(8, seed=3, shape=(48, 48, 32), spacing=(6.0, 6.0, 6.0))
    assert [p.nodule for p in cohort] == [False, True] * 4
    for p in cohort:
        labels = label_report(p.report)
        assert labels.positives() == (["Lung nodule"] if p.nodule else [])
        nodules = [l for l in p.case.lesions if l.kind == "lung_nodule"]
        assert bool(nodules) == p.nodule
        if p.nodule:
            assert max(l.diameter_mm for l in nodules) >= 12.0
            assert all(l.location in p.report for l in nodules)
    # Deterministic, and another seed is another cohort (held-out cases).
    again = make_report_cohort(8, seed=3, shape=(48, 48, 32), spacing=(6.0, 6.0, 6.0))
    assert [p.case.case_id for p in again] == [p.case.case_id for p in cohort]
    other = make_report_cohort(8, seed=4, shape=(48, 48, 32), spacing=(6.0, 6.0, 6.0))
    assert not {p.case.case_id for p in other} & {p.case.case_id for p in cohort}
    assert "Lung nodule" in ABNORMALITIES


def test_report_text_names_every_lobe_once():
    cohort = make_report_cohort(2, seed=0)
    assert nodule_report(cohort[0].case) == "No lung nodule. No pleural effusion."
    assert cohort[1].report.startswith(("There is a nodule in the ", "There are nodules in the "))


def test_impossible_cohorts_are_refused():
    with pytest.raises(ConfigError, match="at least 2"):
        make_report_cohort(1, seed=0)
    with pytest.raises(ConfigError, match="min_nodule_mm"):
        make_report_cohort(2, seed=0, min_nodule_mm=1000.0, max_scan=10)
