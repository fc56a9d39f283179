"""Datalists: MSD JSON and CSV reading, all-problems-at-once validation, atomic writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volumed.data.datalist import DatalistEntry, load_datalist, split_terms, write_datalist
from volumed.errors import ConfigError, DatalistError, OutputExistsError


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """A folder with a few (empty) image/label files and a DICOM series folder."""
    for name in ("imagesTr/a.nii.gz", "imagesTr/b.nii.gz", "labelsTr/a.nii.gz", "labelsTr/b.nii.gz", "dcm/s1/1.dcm"):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "empty_dir").mkdir()
    return tmp_path


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _problems(excinfo: pytest.ExceptionInfo) -> list[str]:
    return excinfo.value.problems


# ---------------------------------------------------------------------------------- MSD JSON


def test_msd_json_sections_relative_paths_and_modality(files: Path):
    doc = {
        "name": "Liver",
        "modality": {"0": "CT"},
        "training": [
            {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz", "terms": ["liver", "liver tumour"]},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz", "spacing": [1, 1, 2.5], "modality": "mr"},
        ],
        "test": ["imagesTr/a.nii.gz", {"image": "dcm/s1"}],
    }
    path = _write(files / "dataset.json", json.dumps(doc))
    train = load_datalist(path)
    assert [e.image for e in train] == [files / "imagesTr/a.nii.gz", files / "imagesTr/b.nii.gz"]
    assert train[0].label == files / "labelsTr/a.nii.gz"
    assert train[0].terms == ("liver", "liver tumour")
    assert train[0].modality == "CT"  # from the top-level MSD map
    assert train[1].modality == "MR"  # an entry's own modality wins, normalised to upper case
    assert train[1].extra == {"spacing": [1, 1, 2.5]}
    assert [e.row for e in train] == [0, 1]
    assert len(set(train)) == 2  # entries are hashable despite their extra dict
    test = load_datalist(path, section="test")
    assert [e.image for e in test] == [files / "imagesTr/a.nii.gz", files / "dcm/s1"]
    assert test[0].label is None and test[0].terms == ()


def test_json_dataroot_resolves_relative_paths(files: Path):
    sub = files / "lists"
    sub.mkdir()
    path = _write(sub / "dl.json", json.dumps({"dataroot": "..", "training": [{"image": "imagesTr/a.nii.gz"}]}))
    assert load_datalist(path)[0].image == (sub / ".." / "imagesTr/a.nii.gz").absolute()
    path = _write(sub / "dl2.json", json.dumps({"base_dir": str(files / "imagesTr"), "training": [{"image": "b.nii.gz"}]}))
    assert load_datalist(path)[0].image == files / "imagesTr/b.nii.gz"


def test_json_missing_section_lists_available(files: Path):
    path = _write(files / "d.json", json.dumps({"training": [{"image": "imagesTr/a.nii.gz"}], "test": [], "name": "x"}))
    with pytest.raises(DatalistError) as ei:
        load_datalist(path, section="validation")
    msg = str(ei.value)
    assert str(path) in msg and "'validation' not found" in msg and "'training', 'test'" in msg
    with pytest.raises(DatalistError, match="empty datalist"):
        load_datalist(path, section="test")


def test_malformed_json_reports_line_and_column(files: Path):
    path = _write(files / "bad.json", '{\n  "training": [\n    {"image": "a.nii.gz",}\n  ]\n}\n')
    with pytest.raises(DatalistError) as ei:
        load_datalist(path)
    # The decoder's wording differs between Python versions; the position does not.
    (problem,) = ei.value.problems
    assert problem.startswith("malformed JSON at line 3, column 26: "), problem


def test_json_all_problems_at_once(files: Path):
    doc = {
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/missing.nii.gz"},
            {"label": "labelsTr/b.nii.gz"},
            {"image": "imagesTr/a.nii.gz", "modality": "PET"},
            {"image": "imagesTr/b.nii.gz", "terms": "liver;spleen"},
            {"image": 5},
            {"image": "empty_dir", "lable": "labelsTr/a.nii.gz"},
            42,
        ]
    }
    path = _write(files / "dl.json", json.dumps(doc))
    with pytest.raises(DatalistError) as ei:
        load_datalist(path)
    got = _problems(ei)
    expected = [
        "training[0]: label 'labelsTr/missing.nii.gz' does not exist",
        "training[1]: label given without an image",
        "training[2]: unknown modality 'PET'; expected CT or MR",
        "training[2]: image 'imagesTr/a.nii.gz' duplicates training[0]",
        "training[3]: terms 'liver; spleen' given but no label",
        "training[4]: 'image' must be a string, got int 5",
        "training[5]: unknown key 'lable' (did you mean 'label'?)",
        "training[5]: image folder 'empty_dir' holds no files",
        "training[6]: an entry must be an object or an image path string, got int",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in got), (e, got)
    assert len(got) == len(expected), got
    assert f"{len(expected)} problem(s)" in str(ei.value)


# ---------------------------------------------------------------------------------- CSV


def test_csv_reads_quoted_multiline_reports_terms_and_extra_columns(files: Path):
    text = (
        "Image,label,report,terms,modality,patient_age\n"
        'imagesTr/a.nii.gz,labelsTr/a.nii.gz,"Liver normal, spleen normal.\nNo ""effusion"".",liver|spleen; liver,ct,61\n'
        "imagesTr/b.nii.gz,,,,MR,\n"
        ",,,,,\n"
        "dcm/s1,,One line.,,,70\n"
    )
    path = _write(files / "dl.csv", "\ufeff" + text)  # with a spreadsheet byte-order mark
    entries = load_datalist(path)
    assert len(entries) == 3
    a, b, c = entries
    assert a.report == 'Liver normal, spleen normal.\nNo "effusion".'
    assert a.terms == ("liver", "spleen")
    assert a.modality == "CT" and b.modality == "MR" and c.modality is None
    assert a.extra == {"patient_age": "61"}
    assert b.label is None and b.report is None and b.terms == ()
    assert c.image == files / "dcm/s1"  # a DICOM series folder is a valid image
    # Row numbers count records (header = 1), not physical lines; the blank row is skipped.
    assert [e.row for e in entries] == [2, 3, 5]


def test_csv_all_problems_with_row_numbers(files: Path):
    text = (
        "image,label,terms,modality,reprot\n"
        "imagesTr/a.nii.gz,labelsTr/a.nii.gz,liver,CT,\n"  # row 2: fine
        "imagesTr/nope.nii.gz,,,CT,\n"  # row 3: missing file
        ",labelsTr/b.nii.gz,,,\n"  # row 4: label without image
        "imagesTr/b.nii.gz,,spleen,xray,\n"  # row 5: terms without label, bad modality
        "imagesTr/a.nii.gz,labelsTr/b.nii.gz,,,\n"  # row 6: duplicate of row 2
        "imagesTr/b.nii.gz,,,,,extra cell\n"  # row 7: too many cells, duplicate of row 5
    )
    path = _write(files / "dl.csv", text)
    with pytest.raises(DatalistError) as ei:
        load_datalist(path)
    got = _problems(ei)
    expected = [
        "row 1: unknown column 'reprot' (did you mean 'report'?)",
        "row 3: image 'imagesTr/nope.nii.gz' does not exist",
        "row 4: label given without an image",
        "row 5: terms 'spleen' given but no label",
        "row 5: unknown modality 'xray'; expected CT or MR",
        "row 6: image 'imagesTr/a.nii.gz' duplicates row 2",
        "row 7: 6 cells but the header has 5 columns",
        "row 7: image 'imagesTr/b.nii.gz' duplicates row 5",
    ]
    for e in expected:
        assert any(p.startswith(e) for p in got), (e, got)
    assert len(got) == len(expected), got
    assert str(path) in str(ei.value)


def test_csv_required_columns_and_cells(files: Path):
    path = _write(files / "dl.csv", "image,report\nimagesTr/a.nii.gz,\nimagesTr/b.nii.gz,Fine.\n")
    assert len(load_datalist(path, require=("image",))) == 2
    with pytest.raises(DatalistError) as ei:
        load_datalist(path, require=("image", "label", "report"))
    # The missing column is reported once, not for every row; the empty cell with its row.
    assert _problems(ei) == [
        "row 1: missing required column 'label' (columns: image, report)",
        "row 2: empty 'report'",
    ]


def test_check_files_false_skips_existence(tmp_path: Path):
    path = _write(tmp_path / "dl.csv", "image,label\nnot/there.nii.gz,nor/this.nii.gz\n")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(path)
    (e,) = load_datalist(path, check_files=False)
    assert e.image == tmp_path / "not/there.nii.gz" and e.label == tmp_path / "nor/this.nii.gz"


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("dl.csv", b"", "empty datalist: the CSV file has no header row"),
        ("dl.csv", b"image,label\n", "empty datalist: the CSV file has a header but no data rows"),
        ("dl.csv", b"image,report\na.nii.gz,caf\xe9\n", "not UTF-8 text: byte 0xe9 at line 2"),
        ("dl.csv", b'image,report\na.nii.gz,"unclosed\n', "malformed CSV"),
        ("dl.json", b"[1, 2]", "the top level must be a JSON object"),
        ("dl.txt", b"image\n", "unknown datalist format '.txt'"),
    ],
)
def test_file_level_problems(tmp_path: Path, name: str, content: bytes, message: str):
    path = _write(tmp_path / name, content)
    with pytest.raises(DatalistError) as ei:
        load_datalist(path, check_files=False)
    assert ei.value.path == path
    assert any(p.startswith(message) for p in ei.value.problems), ei.value.problems


def test_missing_file(tmp_path: Path):
    with pytest.raises(DatalistError, match="datalist file does not exist"):
        load_datalist(tmp_path / "none.json")


def test_split_terms():
    assert split_terms(" liver ; spleen|kidney_left;;liver ") == ("liver", "spleen", "kidney_left")
    assert split_terms(["a|b", "c"]) == ("a", "b", "c")
    assert split_terms(None) == ()


# ---------------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_write_then_load_round_trip(files: Path, tmp_path_factory, suffix: str):
    outside = tmp_path_factory.mktemp("elsewhere") / "c.nii.gz"
    outside.write_bytes(b"x")
    entries = [
        DatalistEntry(
            image=files / "imagesTr/a.nii.gz",
            label=files / "labelsTr/a.nii.gz",
            report='A 12 mm lesion, "hypodense".\nNo effusion.',
            terms=("liver", "lesion"),
            modality="CT",
            extra={"case_id": "a"},
        ),
        DatalistEntry(image=files / "dcm/s1", modality="MR", extra={"case_id": "s1"}),
        DatalistEntry(image=outside, extra={"case_id": "outside"}),
    ]
    out = files / f"list{suffix}"
    assert write_datalist(entries, out) == out
    back = load_datalist(out)
    for w, r in zip(entries, back):
        assert (r.image, r.label, r.report, r.terms, r.modality, r.extra) == (
            w.image, w.label, w.report, w.terms, w.modality, w.extra
        )
    assert len(back) == 3
    # Paths under the datalist's folder are written relative (the folder can be moved), others
    # absolute; no temporary file is left behind.
    text = out.read_text()
    assert str(files) not in text and "imagesTr/a.nii.gz" in text and str(outside) in text
    assert [p.name for p in files.iterdir() if p.is_file()] == [out.name]


def test_write_refuses_to_overwrite(files: Path):
    entry = [DatalistEntry(image=files / "imagesTr/a.nii.gz")]
    out = write_datalist(entry, files / "dl.csv")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError) as ei:
        write_datalist([DatalistEntry(image=files / "imagesTr/b.nii.gz")], out)
    assert ei.value.path == out and out.read_bytes() == before
    write_datalist([DatalistEntry(image=files / "imagesTr/b.nii.gz")], out, overwrite=True)
    assert load_datalist(out)[0].image == files / "imagesTr/b.nii.gz"


def test_write_rejects_bad_input(files: Path):
    with pytest.raises(ConfigError, match="unknown datalist format '.txt'"):
        write_datalist([DatalistEntry(image=files / "a")], files / "dl.txt")
    with pytest.raises(DatalistError) as ei:
        write_datalist([DatalistEntry(image=files / "a", terms=("a;b",), extra={"label": "x"})], files / "dl.csv")
    assert ei.value.problems == [
        "entry 0: term 'a;b' holds a separator (';' or '|')",
        "entry 0: extra key 'label' is empty or shadows a standard column",
    ]
    with pytest.raises(DatalistError, match="no entries to write"):
        write_datalist([], files / "dl.json")
    assert not (files / "dl.csv").exists() and not (files / "dl.json").exists()
