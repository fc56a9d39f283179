"""CT intensity priors: the Hounsfield units of each tissue, by contrast phase.

Used in two places, so that synthetic and augmented images agree on what a tissue looks like:

* label-map synthesis (:mod:`volumed.data.synthesis`) draws each structure's mean and texture
  from its tissue's range in a randomly chosen phase;
* contrast-phase augmentation of real scans (:mod:`volumed.data.ct_augment`) moves the blood-pool
  structures (and the enhancing organs) to a mean drawn from the same ranges.

Three phases: ``native`` (no contrast; blood about 40 HU), ``portal`` (portal venous, ~70 s after
injection: vessels about 150 HU, liver and spleen enhanced) and ``arterial`` (~25-35 s: aorta and
left heart 300-500 HU, kidney cortex bright, veins barely opacified). The ranges are those of
radiology texts (e.g. Lee, Sagel, Stanley & Heiken, *Computed Body Tomography with MRI
Correlation*; Bae, Radiology 2010, "Intravenous contrast medium administration and scan timing
at CT") and were checked against the four real CTs of ``../shared/data`` (non-contrast
example_ct_sm and tcia_ccth_a01, portal-venous DICOM slab, contrast thorax crop): see
``docs/synthesis.md`` for the measured means (``bench/bench_hu_priors.py``).

Each prior is a range for the *mean* of a structure (drawn once per structure and sample) and a
range for the voxel-to-voxel *standard deviation* (texture and noise inside it), both in HU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PHASES", "TISSUES", "Tissue", "tissue_of"]

#: Contrast phases, in the order used by the augmentation.
PHASES: tuple[str, ...] = ("native", "portal", "arterial")

Range = tuple[float, float]


@dataclass(frozen=True)
class Tissue:
    """HU prior of one tissue.

    Attributes:
        mean: ``{phase: (low, high)}`` range of a structure's mean HU in each phase.
        std: ``(low, high)`` range of the voxel standard deviation inside a structure, HU.
        blood_pool: the tissue enhances with contrast (its mean depends on the phase).
    """

    mean: dict[str, Range]
    std: Range
    blood_pool: bool = False

    def mean_range(self, phase: str) -> Range:
        return self.mean.get(phase, self.mean["native"])


def _same(r: Range) -> dict[str, Range]:
    return {p: r for p in PHASES}


TISSUES: dict[str, Tissue] = {
    # Outside the body and in the airways.
    "air": Tissue(_same((-1010.0, -990.0)), (2.0, 10.0)),
    "airway": Tissue(_same((-1000.0, -880.0)), (10.0, 40.0)),
    # Lobes include their vessels and bronchi: -860 in healthy inflated lung, up to about -500
    # in dependent or poorly inflated parts (tcia_ccth_a01's lower lobes measure -522 and -593).
    "lung": Tissue(_same((-880.0, -500.0)), (30.0, 140.0)),
    "fat": Tissue(_same((-130.0, -70.0)), (8.0, 30.0)),
    # Unlabelled tissue inside the body: mesentery, vessels, nodes and fat strands.
    "soft": Tissue(_same((-60.0, 50.0)), (15.0, 45.0)),
    # Back muscles with fatty infiltration measure 24-27 HU on the real scans.
    "muscle": Tissue(_same((20.0, 65.0)), (8.0, 30.0)),
    "liver": Tissue({"native": (45.0, 70.0), "portal": (90.0, 140.0), "arterial": (60.0, 95.0)}, (8.0, 20.0), True),
    "spleen": Tissue({"native": (30.0, 55.0), "portal": (100.0, 140.0), "arterial": (80.0, 150.0)}, (8.0, 25.0), True),
    # At 3 mm the renal sinus fat pulls a kidney's mean down (13-19 HU on example_ct_sm).
    "kidney": Tissue({"native": (10.0, 45.0), "portal": (130.0, 200.0), "arterial": (150.0, 260.0)}, (10.0, 40.0), True),
    # Fatty pancreas of older patients: 3 HU on example_ct_sm, 71 HU portal venous on the DICOM slab.
    "pancreas": Tissue({"native": (-10.0, 50.0), "portal": (60.0, 120.0), "arterial": (80.0, 140.0)}, (10.0, 30.0), True),
    "gland": Tissue({"native": (20.0, 50.0), "portal": (50.0, 100.0), "arterial": (50.0, 110.0)}, (10.0, 25.0), True),
    "thyroid": Tissue({"native": (70.0, 120.0), "portal": (100.0, 160.0), "arterial": (120.0, 200.0)}, (10.0, 25.0), True),
    # Hollow organs: water, food, faeces or gas; wide ranges on purpose (colon -521 and -674,
    # small bowel -237 HU on the real scans: gas).
    "stomach": Tissue(_same((-200.0, 60.0)), (15.0, 150.0)),
    "bowel": Tissue(_same((-400.0, 60.0)), (15.0, 200.0)),
    "colon": Tissue(_same((-800.0, 50.0)), (30.0, 300.0)),
    "bile": Tissue(_same((-5.0, 30.0)), (5.0, 15.0)),
    "urine": Tissue(_same((-5.0, 25.0)), (5.0, 15.0)),
    "water": Tissue(_same((-5.0, 25.0)), (5.0, 15.0)),
    # Blood pools.
    # Up to 600 HU: the CT pulmonary angiogram's pulmonary artery measures 553 HU.
    "artery": Tissue({"native": (30.0, 55.0), "portal": (130.0, 220.0), "arterial": (250.0, 600.0)}, (8.0, 25.0), True),
    # Arterial up to 600: the thorax crop's chambers measure 466-578 HU (median, 90th percentile).
    "heart": Tissue({"native": (30.0, 55.0), "portal": (110.0, 200.0), "arterial": (200.0, 600.0)}, (10.0, 40.0), True),
    "vein": Tissue({"native": (30.0, 55.0), "portal": (110.0, 190.0), "arterial": (40.0, 130.0)}, (8.0, 25.0), True),
    "portal_vein": Tissue({"native": (30.0, 55.0), "portal": (140.0, 230.0), "arterial": (60.0, 140.0)}, (8.0, 25.0), True),
    # Bone: cancellous and cortical mixed at 1.5-3 mm: osteoporotic vertebrae 124-136 HU
    # (example_ct_sm), femurs 570-582 HU (tcia_ccth_a01), a humerus 734 HU (DICOM slab).
    "bone": Tissue(_same((100.0, 750.0)), (60.0, 300.0)),
    "cartilage": Tissue(_same((80.0, 220.0)), (20.0, 60.0)),
    "disc": Tissue(_same((60.0, 110.0)), (10.0, 25.0)),
    "cord": Tissue(_same((15.0, 45.0)), (8.0, 20.0)),
    "brain": Tissue(_same((25.0, 45.0)), (5.0, 12.0)),
}

# Structure name -> tissue, first match wins. Names are TotalSegmentator classes, 3D Slicer atlas
# names (spl_abdominal_atlas) and free text ("pulmonary artery"), lower-cased.
_RULES: tuple[tuple[str, str], ...] = (
    (r"^lung|pulmonary_(upper|lower|middle)", "lung"),
    (r"trachea|bronch", "airway"),
    (r"kidney_cyst|renal_pelvis|ureter|cyst", "water"),
    (r"intervertebral|disc", "disc"),
    (r"costal_cartilage|cartilage", "cartilage"),
    (r"vertebra|^rib|_rib|rib\d|femur|hip|sacrum|coccyx|pelvis$|^bone|humerus|scapula|clavicula|sternum|skull"
     r"|cervical\d|thoracic\d|lumbar\d|tibia|fibula|patella", "bone"),
    (r"heart|atrial_appendage|myocardium|ventricle|atrium", "heart"),
    # Pulmonary veins carry the left heart's (arterial) blood.
    (r"pulmonary_vein", "artery"),
    (r"portal|splenic_vein|mesenteric_vein", "portal_vein"),
    (r"vena|vein", "vein"),
    (r"aorta|artery|arteries|trunk|carotid|subclavian", "artery"),
    (r"liver|hepatic_parenchyma", "liver"),
    (r"spleen", "spleen"),
    (r"kidney", "kidney"),
    (r"pancrea", "pancreas"),
    (r"thyroid", "thyroid"),
    (r"adrenal|prostate|gland", "gland"),
    (r"gall", "bile"),
    (r"bladder", "urine"),
    (r"stomach|esophag|oesophag", "stomach"),
    (r"colon|rectum|sigmoid|caecum|cecum", "colon"),
    (r"bowel|duoden|ileum|jejun", "bowel"),
    (r"spinal_cord|spinal cord", "cord"),
    (r"brain", "brain"),
    (r"muscle|gluteus|iliopsoas|psoas|autochthon|iliacus|erector|oblique|rectus|quadratus", "muscle"),
    (r"fat", "fat"),
)


def tissue_of(name: str) -> str:
    """The tissue (a key of :data:`TISSUES`) of a structure name; ``"soft"`` when no rule knows it.

    >>> tissue_of("vertebrae_L1"), tissue_of("pulmonary artery"), tissue_of("postcava")
    ('bone', 'artery', 'vein')
    """
    text = name.strip().lower().replace(" ", "_")
    if text in ("postcava", "precava"):  # AbdomenAtlas names of the venae cavae
        return "vein"
    for pattern, tissue in _RULES:
        if re.search(pattern, text):
            return tissue
    return "soft"
