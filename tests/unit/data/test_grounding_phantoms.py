"""Finding sentences for phantom lesions, written as a finding-level datalist."""

from __future__ import annotations

import numpy as np

from volumed.data.grounding_datalist import load_grounding_datalist
from volumed.data.grounding_phantoms import phantom_findings, write_grounding_phantoms
from volumed.data.phantoms import make_case
from volumed.io import read_label
from volumed.text.reports import parse_sentence

SHAPE, SPACING = (64, 64, 48), (4.0, 4.0, 4.0)
LOBE_TERMS = {"right lower lobe": "lung_lower_lobe_right", "left upper lobe": "lung_upper_lobe_left"}


def test_each_lesion_gets_a_sentence_with_its_size_and_location_and_the_others_have_no_lesion():
    seen = set()
    for index in range(8):
        case = make_case(3, index=index, shape=SHAPE, spacing=SPACING, lesion_rate=1.0)
        findings = phantom_findings(case)
        lesions = {les.id: les for les in case.lesions}
        assert sorted(f.lesion_id for f in findings if f.kind == "lesion") == sorted(lesions)
        organs_with_lesions = {les.organ for les in case.lesions}
        assert findings == phantom_findings(case)  # reproducible
        for f in findings:
            (parsed,) = parse_sentence(f.text).findings
            seen.add(f.kind)
            if f.kind == "lesion":
                les = lesions[f.lesion_id]
                assert not parsed.negated and parsed.size_mm == (float(np.floor(les.diameter_mm + 0.5)),)
                # The parsed location is the lesion's organ (a liver lobe parses as the liver).
                assert parsed.location_term == les.organ, (f.text, parsed.location_term, les.organ)
            else:
                assert parsed.negated == (f.kind == "negated")
                assert parsed.location_term not in organs_with_lesions, f.text
    assert seen == {"lesion", "negated", "absent"}


def test_cohort_is_a_finding_level_datalist_whose_masks_are_the_lesions(tmp_path):
    path = write_grounding_phantoms(tmp_path / "g", 3, 5, shape=SHAPE, spacing=SPACING)
    cases = load_grounding_datalist(path)
    assert len(cases) == 3 and all(c.modality == "CT" and c.report for c in cases)
    for case, index in zip(cases, range(3)):
        ph = make_case(5, index=index, shape=SHAPE, spacing=SPACING, lesion_rate=1.0)
        present = [f for f in case.findings if f.mask is not None]
        assert len(present) == len(ph.lesions) and all(f.focal for f in present)
        for f in present:
            mask = read_label(f.mask).data == f.mask_label
            assert np.array_equal(mask, ph.lesion_map.data == f.mask_label)
        absent = [f for f in case.findings if f.mask is None]
        assert absent and all(f.focal is None for f in absent)


def test_anatomy_sentences_name_one_organ_each_and_leave_the_other_sentences_alone(tmp_path):
    from volumed.heads.grounding import finding_queries

    case = make_case(3, index=2, shape=SHAPE, spacing=SPACING, lesion_rate=1.0)
    plain = phantom_findings(case)
    findings = phantom_findings(case, anatomy=20)
    assert findings[: len(plain)] == plain
    organs = [f for f in findings if f.kind == "anatomy"]
    # One per organ in the field of view that can hold a lesion (lobes, liver, spleen, kidneys).
    assert 5 <= len(organs) <= 9 and len({f.place for f in organs}) == len(organs)
    for f in organs:
        (q,) = finding_queries([f.text])
        assert q.anatomy and q.location_term == f.place == case.label_names[f.organ_id], f.text
    assert len([f for f in phantom_findings(case, anatomy=2) if f.kind == "anatomy"]) == 2

    path = write_grounding_phantoms(tmp_path / "g", 2, 3, shape=SHAPE, spacing=SPACING, anatomy=3, first_index=2)
    first = load_grounding_datalist(path)[0]
    anatomy = [f for f in first.findings if f.focal is False]
    assert len(anatomy) == 3 and all(f.mask.parent.name == "labels" for f in anatomy)
    for f in anatomy:
        assert np.array_equal(read_label(f.mask).data == f.mask_label, case.label.data == f.mask_label)
        assert (read_label(f.mask).data == f.mask_label).sum() > 100
