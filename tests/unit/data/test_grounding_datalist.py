"""Finding-level datalists: reading, all-problems-at-once validation with file names, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volumed.data.grounding_datalist import (
    FindingAnnotation,
    GroundingCase,
    load_grounding_datalist,
    write_grounding_datalist,
)
from volumed.errors import DatalistError, OutputExistsError


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    for name in ("images/a.nii.gz", "images/b.nii.gz", "masks/a_0.nii.gz", "masks/a.nii.gz"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc, encoding="utf-8")
    return path


GOOD = {
    "modality": "CT",
    "training": [
        {"image": "images/a.nii.gz", "report": "A 12 mm nodule in the right lower lobe. No pleural effusion.",
         "findings": [
             {"text": "A 12 mm nodule in the right lower lobe.", "mask": "masks/a_0.nii.gz", "category": "focal"},
             {"text": "Ground glass in both lungs.", "mask": "masks/a.nii.gz", "mask_label": 2, "category": "non-focal"},
             {"text": "No pleural effusion.", "mask": None},
         ],
         "study": "S1"},
        {"image": "images/b.nii.gz", "findings": []},
    ],
}


def test_reads_findings(folder):
    cases = load_grounding_datalist(_write(folder / "g.json", GOOD))
    a, b = cases
    assert a.image == folder / "images/a.nii.gz" and a.modality == "CT" and a.extra == {"study": "S1"}
    nodule, glass, effusion = a.findings
    assert (nodule.mask, nodule.focal, nodule.mask_label, nodule.present) == (folder / "masks/a_0.nii.gz", True, None, True)
    assert (glass.focal, glass.mask_label, glass.index) == (False, 2, 1)
    assert (effusion.mask, effusion.focal, effusion.present) == (None, None, False)
    assert b.findings == () and b.report is None


def test_every_problem_at_once_with_file_names(folder):
    doc = {
        "training": [
            {"image": "images/missing.nii.gz", "findings": [
                {"text": "", "mask": "masks/a_0.nii.gz", "category": "focal"},
                {"text": "A nodule.", "mask": "masks/nope.nii.gz"},
                {"text": "Effusion.", "mask": "masks/a.nii.gz", "category": "diffuse", "mask_label": 0},
                {"text": "No nodule.", "mask_label": 3},
                {"text": "Mass.", "mask": "masks/a.nii.gz", "catgory": "focal"},
                "a bare string",
            ]},
            {"image": "images/b.nii.gz", "finding": []},
            {"image": "images/b.nii.gz", "findings": [], "modality": "PET"},
        ]
    }
    with pytest.raises(DatalistError) as info:
        load_grounding_datalist(_write(folder / "bad.json", doc))
    err = info.value
    message = str(err)
    assert str(folder / "bad.json") in message  # the datalist file
    expected = [
        "training[0]: image 'images/missing.nii.gz' does not exist",
        "training[0].findings[0]: 'text' must be a non-empty finding sentence",
        "training[0].findings[1]: mask 'masks/nope.nii.gz' does not exist",
        "training[0].findings[1]: a finding with a mask needs 'category' 'focal' or 'non-focal', got None",
        "training[0].findings[2]: a finding with a mask needs 'category' 'focal' or 'non-focal', got 'diffuse'",
        "training[0].findings[2]: 'mask_label' must be a positive integer, got 0",
        "training[0].findings[3]: 'mask_label' 3 given without a 'mask'",
        "training[0].findings[4]: unknown key 'catgory' (did you mean 'category'?)",
        "training[0].findings[5]: a finding must be an object",
        "training[1]: unknown key 'finding' (did you mean 'findings'?)",
        "training[1]: 'findings' must be a list",
        "training[2]: image 'images/b.nii.gz' duplicates training[1]",
        "training[2]: unknown modality 'PET'",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in err.problems), (text, err.problems)
    assert len(err.problems) == len(expected) + 1  # findings[4] also lacks its category
    assert f"{len(err.problems)} problem(s)" in message


@pytest.mark.parametrize("content, problem", [
    ("{not json", "malformed JSON at line 1"),
    ('{"validation": []}', "section 'training' not found; available sections: 'validation'"),
    ('{"training": []}', "must be a non-empty list"),
    ("[]", "top level must be a JSON object"),
])
def test_file_level_problems(folder, content, problem):
    with pytest.raises(DatalistError, match=problem):
        load_grounding_datalist(_write(folder / "x.json", content))


def test_not_json_or_missing(folder):
    with pytest.raises(DatalistError, match="is JSON"):
        load_grounding_datalist(_write(folder / "x.csv", "image\n"))
    with pytest.raises(DatalistError, match="does not exist"):
        load_grounding_datalist(folder / "nothing.json")


def test_round_trip(folder):
    cases = load_grounding_datalist(_write(folder / "g.json", GOOD))
    out = write_grounding_datalist(cases, folder / "copy.json")
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["training"][0]["findings"][0]["mask"] == "masks/a_0.nii.gz"  # relative to the datalist
    assert load_grounding_datalist(out) == cases
    with pytest.raises(OutputExistsError):
        write_grounding_datalist(cases, out)
    case = GroundingCase(folder / "images/a.nii.gz", (FindingAnnotation("No effusion.", None),), extra={"image": "x"})
    with pytest.raises(DatalistError, match="shadows"):
        write_grounding_datalist([case], folder / "bad.json")
