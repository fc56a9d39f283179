"""Segment codes (volumed.io.coding): SNOMED CT found by meaning in pydicom's dictionary, also
where TotalSegmentator words differ from SNOMED CT's; the local 99VOLUMED scheme otherwise."""

import pytest

from volumed.io.coding import LOCAL_SCHEME, structure_code


@pytest.mark.parametrize("name, code, laterality", [
    ("liver", ("10200004", "SCT", "Liver"), None),
    ("kidney_left", ("64033007", "SCT", "Kidney"), "Left"),
    # TotalSegmentator's words for concepts SNOMED CT names otherwise (a synonym each).
    ("small_bowel", ("30315005", "SCT", "Small intestine"), None),
    ("urinary_bladder", ("89837001", "SCT", "Bladder"), None),
    ("clavicula_right", ("51299004", "SCT", "Clavicle"), "Right"),
    ("atrial_appendage_left", ("33626005", "SCT", "Left auricular appendage"), None),  # the side is in the concept
])
def test_snomed_ct_codes(name, code, laterality):
    c = structure_code(name)
    assert not c.local and c.type == code
    assert (c.laterality[2] if c.laterality else None) == laterality


def test_local_code_when_snomed_ct_has_none_in_the_dictionary():
    c = structure_code("portal_vein_and_splenic_vein")
    assert c.local and c.type == ("portal_ve-60236e", LOCAL_SCHEME, "portal vein and splenic vein") and c.laterality is None
