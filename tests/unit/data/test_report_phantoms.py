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


def test_chest_field_of_view_keeps_the_lungs_nodules_and_vessels_in_world_coordinates():
    """``field_of_view="chest"`` crops every volume to the lungs' box plus the margin; the crop keeps
    the world coordinates (the affine's origin moves), every lung voxel, the nodules and the vessels."""
    import numpy as np

    from volumed.data.phantoms import LESION_ID_BASE, make_case

    kw = dict(shape=(96, 96, 64), spacing=(3.0, 3.0, 3.0))
    whole = make_report_cohort(4, seed=0, **kw)
    chest = make_report_cohort(4, seed=0, field_of_view="chest", **kw)
    assert [p.case.case_id for p in chest] == [p.case.case_id for p in whole]
    assert [p.report for p in chest] == [p.report for p in whole]
    lungs = [10, 11, 12, 13, 14]
    for w, c in zip(whole, chest):
        wi, ci = w.case.image, c.case.image
        assert ci.shape < wi.shape and np.prod(ci.shape) < 0.5 * np.prod(wi.shape)
        assert c.case.label.shape == ci.shape == c.case.lesion_map.shape
        # The crop's first voxel is the same world point as the voxel it came from.
        start = np.rint(np.linalg.solve(wi.affine, ci.affine[:, 3])[:3]).astype(int)
        sl = tuple(slice(s, s + n) for s, n in zip(start, ci.shape))
        np.testing.assert_array_equal(wi.data[sl], ci.data)
        np.testing.assert_allclose(ci.affine[:3, :3], wi.affine[:3, :3])
        assert np.isin(c.case.label.data, lungs).sum() == np.isin(w.case.label.data, lungs).sum()
        for k, lesion in enumerate(c.case.lesions, start=1):
            if lesion.kind == "lung_nodule":
                assert (c.case.lesion_map.data == LESION_ID_BASE + k).sum() == (w.case.lesion_map.data == LESION_ID_BASE + k).sum()
        assert set(c.case.label_names) <= set(w.case.label_names)
    # The whole field of view is the phantom unchanged.
    case = make_case(0, index=whole[0].case.index, lesion_rate=0.9, **kw)
    np.testing.assert_array_equal(whole[0].case.image.data, case.image.data)
    with pytest.raises(ConfigError, match="field_of_view"):
        make_report_cohort(2, seed=0, field_of_view="abdomen")
