"""The datalist's label-map-only section and the patches drawn from it (volumed.tasks.promptseg_data):
term mapping, errors, leave-one-out selection, synthetic patches whose targets follow the deformed
labels, and real patches with the CT augmentations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volumed.data.synthesis import BODY_CLASSES
from volumed.errors import ConfigError, DatalistError
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti
from volumed.tasks.promptseg_data import (
    PromptSegDataModule,
    PromptSegPatchDataset,
    load_synthetic_case,
    load_synthetic_sources,
)
from volumed.data.transforms import PreprocessConfig

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def label_maps(tmp_path_factory) -> Path:
    """Two label-map sources: a masks folder with TotalSegmentator names, and masks with
    AbdomenAtlas names; plus a CT with a TotalSegmentator-id map."""
    root = tmp_path_factory.mktemp("label_maps")
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    shape = (40, 32, 24)
    organs = {
        "liver": (slice(20, 34), slice(6, 24), slice(4, 20)),
        "spleen": (slice(4, 12), slice(8, 20), slice(8, 18)),
        "aorta": (slice(16, 20), slice(4, 8), slice(2, 22)),
        "vertebrae_L1": (slice(16, 22), slice(0, 4), slice(2, 22)),
    }
    (root / "ts").mkdir()
    for name, box in organs.items():
        m = np.zeros(shape, np.uint8)
        m[box] = 1
        write_nifti(Volume(m, affine, "unknown"), root / "ts" / f"{name}.nii.gz")
    write_nifti(Volume(np.zeros(shape, np.uint8), affine, "unknown"), root / "ts" / "heart.nii.gz")
    (root / "aa").mkdir()
    for name, src in (("postcava", "aorta"), ("liver", "liver")):
        m = np.zeros(shape, np.uint8)
        m[organs[src]] = 1
        write_nifti(Volume(m, affine, "unknown"), root / "aa" / f"{name}.nii.gz")
    ct = np.full(shape, -1000.0, np.float32)
    ct[2:38, 0:30, :] = 40.0
    ids = np.zeros(shape, np.uint8)
    ids[organs["liver"]] = 5
    ids[organs["aorta"]] = 52
    ct[ids == 52] = 200.0
    write_nifti(Volume(ct, affine, "CT"), root / "ct.nii.gz")
    write_nifti(Volume(ids, affine, "unknown"), root / "seg.nii.gz")
    return root


def _datalist(root: Path, synthetic: list, training: list | None = None) -> Path:
    path = root / f"datalist_{len(list(root.glob('datalist_*.json')))}.json"
    doc = {"modality": {"0": "CT"}, "training": training or [], "synthetic": synthetic}
    path.write_text(json.dumps(doc))
    return path


def test_synthetic_sources_map_structures_to_terms(label_maps):
    path = _datalist(label_maps, [
        {"name": "ts", "masks_dir": "ts", "terms": ["liver", "spleen", "aorta", "heart", "kidney_left"]},
        {"masks_dir": "aa", "structure_terms": {"postcava": "inferior_vena_cava"}},
    ])  # fmt: skip
    ts, aa = load_synthetic_sources(path)
    assert ts.name == "ts" and ts.terms == ("liver", "spleen", "aorta", "heart", "kidney_left")
    # heart: a mask file, empty; kidney_left: no file; both annotated absent.
    assert dict(zip(ts.terms, ts.term_structures)) == {
        "liver": ("liver",), "spleen": ("spleen",), "aorta": ("aorta",), "heart": ("heart",), "kidney_left": ()}
    assert aa.name == "aa" and aa.terms == ("inferior_vena_cava", "liver")  # without 'terms': all mapped ones
    case = load_synthetic_case(ts, PreprocessConfig(target_spacing=(3.0, 3.0, 3.0)))
    assert case.image is None and case.synthetic is not None and case.terms == ts.terms
    present = {t: bool(m.any()) for t, m in zip(case.terms, case.masks)}
    assert present == {"liver": True, "spleen": True, "aorta": True, "heart": False, "kidney_left": False}
    # The vertebra is synthesised (a class of its own, bone) though it is no term here.
    assert case.synthetic.class_tissues[case.synthetic.class_names.index("vertebrae_L1")] == "bone"
    assert case.regions["abdomen"][0] >= 1


def test_synthetic_sources_report_every_problem(label_maps):
    path = _datalist(label_maps, [
        {"masks_dir": "ts", "label": "seg.nii.gz"},
        {"masks_dir": "nowhere"},
        {"masks_dir": "aa", "structure_terms": {"precava": "inferior_vena_cava"}, "terms": ["livr"]},
        {"label": "seg.nii.gz", "colour_table": "missing.ctbl", "colour": 1},
    ])  # fmt: skip
    with pytest.raises(DatalistError) as err:
        load_synthetic_sources(path)
    text = str(err.value)
    for expected in ("synthetic[0]: give exactly one", "synthetic[1]: masks_dir does not exist",
                     "synthetic[2]: structure_terms names structures the source does not have: ['precava']",
                     "synthetic[2]: unknown term 'livr'", "synthetic[3]: unknown keys ['colour']",
                     "synthetic[3]: colour_table does not exist"):  # fmt: skip
        assert expected in text, (expected, text)
    assert load_synthetic_sources(_datalist(label_maps, [])) == []
    assert load_synthetic_sources(REPO / "configs" / "datalists" / "promptseg_ct_real.json") == []  # no section


def test_synthetic_patches_follow_the_deformed_labels(label_maps):
    path = _datalist(label_maps, [{"name": "ts", "masks_dir": "ts", "terms": ["liver", "spleen", "aorta", "heart"]}])
    case = load_synthetic_case(load_synthetic_sources(path)[0], PreprocessConfig(target_spacing=(3.0, 3.0, 3.0)))
    terms = ["aorta", "heart", "liver", "spleen", "stomach"]
    ds = PromptSegPatchDataset([case], terms, (32, 32, 16), fg_rate=1.0, length=6, deform_mm=6.0).set_random_state(0)
    for i in range(6):
        item = ds[i]
        assert item["synthetic"] and item["image"].shape == (1, 32, 32, 16) and item["target"].shape == (5, 32, 32, 16)
        assert item["annotated"].tolist() == [True, True, True, True, False]
        assert float(item["image"].min()) >= 0 and float(item["image"].max()) <= 1
        hu = item["image"][0] * 2000 - 1000
        liver = item["target"][2] > 0
        if liver.sum() > 50:
            # The liver's voxels have a liver's HU in some phase (blur smears the edge a little).
            assert 0 < float(hu[liver].median()) < 160
        outside = (item["target"].sum(0) == 0) & (hu < -900)
        assert not (outside & liver).any()
        assert not item["target"][1].any()  # heart: annotated, absent
    # Same seed, same patches.
    again = PromptSegPatchDataset([case], terms, (32, 32, 16), fg_rate=1.0, length=6, deform_mm=6.0).set_random_state(0)
    assert torch.equal(again[3]["image"], ds.set_random_state(0)[3]["image"])


def _mixed_datalist(root: Path) -> Path:
    """One real CT (liver, aorta, spleen) and two label-map sources."""
    return _datalist(
        root,
        [{"name": "ts", "masks_dir": "ts", "terms": ["liver", "aorta"]}, {"masks_dir": "aa", "structure_terms": {"postcava": "inferior_vena_cava"}}],
        [{"image": "ct.nii.gz", "label": "seg.nii.gz", "terms": ["liver", "aorta", "spleen"]}],
    )  # fmt: skip


def test_datamodule_selects_real_synthetic_and_leaves_one_out(label_maps):
    path = _mixed_datalist(label_maps)
    common = dict(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=4, contrast_phase=1.0, field_of_view=0.5,
                  slice_thickness=0.5, augment=True)  # fmt: skip
    dm = PromptSegDataModule(**common)
    dm.setup()
    assert [c.name.split("/")[-1] for c in dm.cases] == ["ct.nii.gz", "synthetic:ts", "synthetic:aa"]
    real = dm.cases[0]
    assert real.pool_tissues == ("artery", "liver") and abs(real.pool_means[0] - 200.0) < 1.0
    assert dm.terms == ["aorta", "inferior_vena_cava", "liver", "spleen"]
    for i in range(6):
        item = dm.train_set[i]
        assert item["image"].shape == (1, 32, 32, 16) and float(item["image"].max()) <= 1.0
    only = PromptSegDataModule(**common, exclude=["ct.nii.gz", "synthetic:nothing"])
    only.setup()
    assert [c.name for c in only.cases] == ["synthetic:ts", "synthetic:aa"]
    fold = PromptSegDataModule(**common, exclude=["aa"], synthetic=True, real=False)
    fold.setup()
    assert [c.name for c in fold.cases] == ["synthetic:ts"]
    with pytest.raises(ConfigError, match="no training cases left"):
        PromptSegDataModule(**common, real=False, synthetic=False).setup()


def test_synthetic_share_sets_the_patch_mix(label_maps):
    path = _mixed_datalist(label_maps)
    common = dict(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=20)
    equal = PromptSegDataModule(**common)
    equal.setup()
    assert [equal.train_set.case_of.count(k) for k in range(3)] == [7, 7, 6]  # round robin
    dm = PromptSegDataModule(**common, synthetic_share=0.8)
    dm.setup()
    order = dm.train_set.case_of
    assert len(order) == 20 and order.count(0) == 4 and order.count(1) == 8 and order.count(2) == 8
    synthetic = sum(bool(dm.train_set[i]["synthetic"]) for i in range(20))
    assert synthetic == 16
    # Extremes keep at least one patch of each kind; a share with no cases of a kind is refused.
    tiny = PromptSegDataModule(**{**common, "samples_per_epoch": 4}, synthetic_share=0.99)
    tiny.setup()
    assert tiny.train_set.case_of.count(0) == 1
    with pytest.raises(ConfigError, match="synthetic_share 0.5 needs real cases"):
        PromptSegDataModule(**common, real=False, synthetic_share=0.5).setup()
    with pytest.raises(ConfigError, match=r"synthetic_share must be a fraction in \[0, 1\], got 1.5"):
        PromptSegDataModule(**common, synthetic_share=1.5).setup()


def test_shipped_datalist_resolves(shared_data):
    """The default model's datalist: four real CTs and four label maps, every term mapped."""
    from volumed.tasks.promptseg_data import load_promptseg_datalist

    path = REPO / "configs" / "datalists" / "promptseg_ct_all.json"
    real = load_promptseg_datalist(path, allow_free_text=True)
    synthetic = load_synthetic_sources(path)
    assert len(real) == 4 and [s.name for s in synthetic] == ["s0327", "s0328", "spl_abdominal_atlas", "abdomenatlas_bdmap_00000338"]
    # The two TotalSegmentator-output entries are one structure per voxel; the thorax crop holds no
    # abdominal or pelvic organ below the liver dome.
    assert [s.exclusive for s in real] == [False, False, True, True]
    assert {"kidney_left", "urinary_bladder", "femur_right"} <= set(real[2].absent) and "liver" not in real[2].absent
    spl = synthetic[2]
    assert dict(zip(spl.terms, spl.term_structures))["portal_vein_and_splenic_vein"] == (
        "portal_vein_and_superior_mesenteric_vein", "splenic_vein")
    assert dict(zip(spl.terms, spl.term_structures))["kidney_right"] == ("right_kidney",)
    assert "inferior_vena_cava" in synthetic[3].terms and all(synthetic[0].term_structures)
    assert len(BODY_CLASSES) == 5


def test_heart_wall_reaches_the_synthesizers_from_the_datamodule(label_maps):
    """`--data.synthetic_heart_wall true` (the M-hw runs of bench_generalisation.py) turns the
    wall on in every label map's synthesizer and in none by default."""
    path = _mixed_datalist(label_maps)
    for flag in (False, True):
        dm = PromptSegDataModule(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=2,
                                 **({"synthetic_heart_wall": True} if flag else {}))
        dm.setup()
        synths = [s for s in dm.train_set.synthesizers if s is not None]
        assert len(synths) == 2 and all(s.heart_wall is flag for s in synths)


def test_enhancement_reaches_the_synthesizers_from_the_datamodule(label_maps):
    """`--data.synthetic_enhancement [0.4, 1.0]` reaches every label map's synthesizer; (1, 1) by default."""
    path = _mixed_datalist(label_maps)
    for given, expected in (({}, (1.0, 1.0)), ({"synthetic_enhancement": [0.4, 1.0]}, (0.4, 1.0))):
        dm = PromptSegDataModule(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=2, **given)
        dm.setup()
        synths = [s for s in dm.train_set.synthesizers if s is not None]
        assert len(synths) == 2 and all(s.enhancement == expected for s in synths)


def test_surroundings_reach_the_synthesizers_and_give_the_label_maps_room_around_the_body(label_maps):
    """`--data.synthetic_surroundings 0.5` reaches every label map's synthesizer, and a label
    map's patches get air beside the trunk (96 mm a side) and behind it (64 mm), where the arms
    and the table are drawn; off by default, the label maps padded as before."""
    path = _mixed_datalist(label_maps)
    shapes = {}
    for p in (0.0, 0.5):
        dm = PromptSegDataModule(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=2, synthetic_surroundings=p)
        dm.setup()
        ds = dm.train_set
        synths = [(k, s) for k, s in enumerate(ds.synthesizers) if s is not None]
        assert len(synths) == 2 and all(s.surroundings == p for _, s in synths)
        shapes[p] = [tuple(ds.base[k]["classes"].shape[1:]) for k, _ in synths]
        real = [k for k, s in enumerate(ds.synthesizers) if s is None]
        assert all("image" in ds.base[k] for k in real)
        sample = ds[0]
        assert tuple(sample["image"].shape[1:]) == (32, 32, 16)
    spacing = dm.train_set.spacing
    for off, on in zip(shapes[0.0], shapes[0.5]):
        assert on[0] - off[0] == 2 * round(96 / spacing[0]) and on[1] - off[1] == round(64 / spacing[1]) and on[2] == off[2]


def test_box_crop_cuts_real_and_synthetic_patches_to_a_box_in_air(label_maps):
    """`--data.box_crop 1`: every patch, real or synthetic, keeps a box around its centre with
    air and no target around it in-plane (what inference gives a scan exported as a crop)."""
    path = _mixed_datalist(label_maps)

    def widths(box_crop: float) -> list[tuple[int, int, bool]]:
        dm = PromptSegDataModule(datalist=str(path), patch_size=(32, 32, 16), samples_per_epoch=8, box_crop=box_crop,
                                 target_spacing=(10.0, 10.0, 10.0))  # fmt: skip
        dm.setup()
        ds = dm.train_set
        assert (ds.box is not None) == (box_crop > 0)
        out = []
        for i in range(len(ds)):
            item = ds[i]
            image, target = item["image"][0], item["target"]
            cols = (image > 0).any(1).any(1).nonzero().flatten()
            rows = (image > 0).any(0).any(1).nonzero().flatten()
            outside = torch.ones_like(image, dtype=torch.bool)
            outside[int(cols.min()) : int(cols.max()) + 1, int(rows.min()) : int(rows.max()) + 1] = False
            assert int(target[:, outside].sum()) == 0
            out.append((len(cols), len(rows), bool(item["synthetic"])))
        return out

    # A box of 100-300 mm is 10-30 voxels at 10 mm (the patch: 32); outside it air and no target.
    cut = widths(1.0)
    assert {s for _, _, s in cut} == {True, False}
    assert all(0 < w <= 30 and 0 < h <= 30 for w, h, _ in cut)
    assert any(w > 30 or h > 30 for w, h, _ in widths(0.0))  # without it, the body reaches further
    with pytest.raises(ConfigError, match="box_crop"):
        PromptSegDataModule(datalist=str(path), patch_size=(32, 32, 16), box_crop=1.5).setup()
