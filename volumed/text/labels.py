"""Clinical labels from free-text chest-CT reports: the 18 CT-RATE abnormalities, by rules.

::

    report text ──split_sentences / split_clauses──▶ clauses
        ──per abnormality: mention patterns (minus exclusions)──▶ mentions
        ──negation / uncertainty scope (volumed.text.sentences)──▶ label 1 if any mention is
          affirmed or hedged, else 0

Names are exactly those of the CT-RATE label header (:data:`ABNORMALITIES`, in its order).

CT-RATE conventions the rules follow (read off its manually labelled reports):

- uncertain findings count as present ("nodule ... (intrapulmonary lymph node?)" is a nodule);
- a finding named only to be denied is absent ("Pericardial effusion-thickening was not observed",
  "No enlarged lymph nodes ... in pathological dimensions were detected");
- atherosclerotic or calcific plaques of the coronary arteries are "Coronary artery wall
  calcification"; of the aorta and other arteries, "Arterial wall calcification";
- catheters, ports, tubes, stents, pacemakers, sternotomy wires, clips, prostheses are "Medical
  material";
- sequelae, fibrotic bands and fibroatelectasis are "Pulmonary fibrotic sequela";
- ground glass, infiltration, density increase, opacities are "Lung opacity".

How the rules were developed and how well they do (5-fold F1 on the 800 labelled reports) is in
``bench/bench_report_labels.py`` and BENCHMARKS.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from volumed.text.sentences import Mention, Span, find_mentions, split_sentences

#: The 18 CT-RATE abnormalities, named and ordered as in the header of CT-RATE's label files.
ABNORMALITIES: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)


@dataclass(frozen=True)
class Rule:
    """Mention patterns of one abnormality and the phrases that look alike but are not it."""

    patterns: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    neutral: tuple[str, ...] = ()


# "An effusion of 17 mm ... in the deepest part of the pericardial area", "fluid in the pericardial recess".
_PERICARDIAL_FLUID = r"\b(?:effusion|fluid)\b[^.;]*?\bpericardi(?:al|um)\b"
_CORONARY = r"\b(?:coronar\w*(?:\s+\w+){0,2}|LAD|RCA|LCx|circumflex|left\s+anterior\s+descending(?:\s+artery)?|diagonal\s+branch\w*)"
_NOT_LUNG = r"(?:thyroid|adrenal|breast|liver|hepatic|spleen|splenic|kidney|renal|pancrea\w*|pleura|subcutaneous)"
_CALC = r"(?:calcif\w*|atherosclero\w*|atheroma\w*|atheromatous|calcific)"

RULES: dict[str, Rule] = {
    "Medical material": Rule(
        patterns=(
            r"\bcatheter\w*", r"\bport\b", r"\bstents?\b", r"\bpacemaker\w*", r"\bprosthe\w+", r"\btube\b",
            r"\bcannula\w*", r"\bdrain(?:age)?\b", r"\bsutures?\b", r"\bclips?\b", r"\bsternotomy\b",
            r"\bwires?\b", r"\bcerclage\w*", r"\bgraft\w*", r"\bcoils?\b", r"\belectrodes?\b", r"\bleads?\b(?=.*\b(?:pacemaker|cardiac|heart|ventricle|atrium)\b)",
            r"\b(?:surgical|operation|metallic|postoperative|PEG|suture)\s+material\w*", r"\bmetallic\b", r"\bPEG\b",
            r"\bendotracheal\b", r"\btracheostomy\b", r"\bnasogastric\b", r"\bvalve\s+replacement\b",
            r"\bprosthetic\b", r"\bICD\b", r"\bshunt\b", r"\bfilter\b", r"\bscrews?\b", r"\bfixation\s+plates?\b",
        ),
        exclude=(r"\bport(?:al)?\s+ven\w*", r"\bportal\b", r"\bsupport\w*",),
    ),
    "Arterial wall calcification": Rule(
        patterns=(
            rf"{_CALC}[^.;]*?\b(?:aort\w*|arter\w*|vascular|vessels?|carotid|subclavian|brachiocephalic|iliac)",
            rf"\b(?:aort\w*|arter\w*|vascular|vessels?|carotid|subclavian|brachiocephalic)\b[^.;]*?{_CALC}",
            r"\batherosclero\w*(?![^.;]*\b(?:coronar\w*|LAD|RCA|circumflex)\b)",
        ),
        exclude=(_CORONARY, r"\bcalcif\w*\s+(?:\w+\s+)?lymph\s+nod\w*", r"\baortic\s+valve\w*"),
    ),
    "Cardiomegaly": Rule(
        patterns=(
            r"\bcardiomegal\w*",
            r"\bheart\b[^.;]*?\b(?:enlarged|increased|larger\s+than\s+normal|enlargement)",
            r"\b(?:enlarged|increased)\s+(?:heart|cardiac)\b",
            r"\b(?:cardiothoracic|CTR)\b[^.;]*?\bincrease\w*", r"\bincrease\w*[^.;]*?\b(?:cardiothoracic|CTR)\b",
            r"\bincrease\w*\s+in\s+heart\s+size",
        ),
    ),
    "Pericardial effusion": Rule(
        patterns=(
            r"\bpericardial\s+(?:effusion|fluid)\w*", r"\b(?:effusion|fluid)\w*\s+(?:in|within)\s+(?:the\s+)?pericardi\w*",
            r"\bpericardial\s+(?:effusion-)?thickening", r"\beffusion-thickening\s+(?:in|of)\s+the\s+pericardi\w*",
            r"\bpericardial\s+(?:\w+\s+)?effusion", _PERICARDIAL_FLUID,
        ),
    ),
    "Coronary artery wall calcification": Rule(
        patterns=(
            rf"{_CALC}[^.;]*?{_CORONARY}",
            rf"{_CORONARY}[^.;]*?{_CALC}",
            r"\bcoronary\s+(?:artery\s+)?plaque\w*",
        ),
    ),
    "Hiatal hernia": Rule(
        patterns=(r"\bhiat(?:al|us)\s+hernia\w*", r"\bhernia\w*[^.;]*?\bhiatus\b", r"\bhiatus\b[^.;]*?\bhernia\w*"),
    ),
    "Lymphadenopathy": Rule(
        patterns=(
            r"\blymphadenopath\w*", r"\blymphadenomegal\w*",
            r"\blymph\s+nodes?\b[^.;]*?\bpathologic(?:al)?\s+(?:size|dimension)\w*",
            r"\bpathologic(?:al)?\s+(?:size|dimension)\w*[^.;]*?\blymph\s+nodes?\b",
            r"\benlarged\s+(?:\w+\s+){0,2}lymph\s+nodes?\b", r"\blymph\s+nodes?\b[^.;]*?\benlarged\b",
            r"\bconglomerat\w*\s+lymph", r"\bLAPs?\b", r"\bpathological\s+lymph\s+nodes?\b",
            # CT-RATE marks any affirmed mediastinal/hilar/axillary node, even "millimetric".
            r"\blymph\s+nod(?:e|es|ules?)\b",
        ),
        # CT-RATE labels observed nodes "that did not reach pathological size" as present.
        neutral=(r"\b(?:that|which)\s+(?:did|do|does)\s+not\s+reach\b", r"\bnot\s+reaching\b",
                 r"\b(?:that\s+)?(?:are|is|were|was)\s+not\s+(?:in\s+)?pathologic(?:al)?\b", r"\bnot\s+in\s+pathologic(?:al)?\b"),
        exclude=(r"\blymph\s+nodes?\s+stations?\b", r"\bintra-?(?:pulmonary|parenchymal)\s+lymph\s+nod\w*", r"\b(?:intra-?pulmonary|perifissural|subpleural)\b[^.;]*?\blymph\s+nod\w*"),
    ),
    "Emphysema": Rule(
        patterns=(r"\bemphysem\w*",),
        exclude=(r"\bsubcutaneous\s+emphysem\w*", r"\bemphysem\w*\s+in\s+the\s+subcutaneous",),
    ),
    "Atelectasis": Rule(
        patterns=(r"\batelecta\w*",),
    ),
    "Lung nodule": Rule(
        patterns=(r"\bnodul\w*", r"\bmicronodul\w*"),
        exclude=(
            # "nodular" as an adjective of another finding: consolidation, ground glass, thickening.
            r"\bnodul\w*\s+(?:\w+\s+){0,2}(?:consolidat\w*|ground|infiltrat\w*|thicken\w*|thickness|calcif\w*|densit\w*|opacit\w*|formation)",
            r"\bhypodense\s+(?:\w+\s+)?nodul\w*",
            # Nodules of other organs.
            rf"\b{_NOT_LUNG}\b[^.;]*?\bnodul\w*", rf"\bnodul\w*[^.;]*?\b{_NOT_LUNG}\b",
        ),
    ),
    "Lung opacity": Rule(
        patterns=(
            r"\bground[\s-]*glass\w*", r"\bfrosted\s+glass\b", r"\bopacit\w*", r"\binfiltrat\w*", r"\bdensity\s+increase\w*",
            r"\bincreased?\s+density\b", r"\bincreases?\s+in\s+density\b", r"\bdensities\b",
        ),
        exclude=(
            # A ground-glass nodule is labelled a nodule, not an opacity.
            r"\bground[\s-]*glass\s+(?:density\s+)?nodul\w*",
            # "Active infiltration" stands in CT-RATE's translations for "no active infiltration".
            r"\bactive\s+infiltrat\w*",
            # Densities that are scars, fat, air, metal or outside the lung.
            r"\b(?:sequela\w*|pleuro-?parenchymal|fibrotic|linear|band[\s-]*like|reticul\w*|metallic|soft\s+tissue|fat|fatty|air|"
            r"calcific|material|stent|contrast|parenchymal\s+sequela\w*)\s+(?:\w+\s+){0,2}(?:density|densities)\b(?:\s+increase\w*)?",
            r"\b(?:density|densities|infiltrat\w*)\b(?:\s+increase\w*)?[^.;]*?\b(?:fat\w*|perirenal|perinephric|subcutaneous|omental|"
            r"perigastric|bones?|skin|adrenal|liver|kidneys?|breast|sequela\w*|fibrotic|atelecta\w*|leukemic)\b",
            r"\b(?:fat\w*|perirenal|perinephric|subcutaneous|omental|perigastric|bones?|skin|adrenal|liver|breast|leukemic)\b[^.;]*?\b(?:density|densities|infiltrat\w*)\b(?:\s+increase\w*)?",
        ),
    ),
    "Pulmonary fibrotic sequela": Rule(
        patterns=(r"\bfibro\w*", r"\bsequel\w*", r"\bscar\w*", r"\bfibrotic\b"),
    ),
    "Pleural effusion": Rule(
        patterns=(
            r"\bpleural\s+effusion\w*", r"\beffusion\w*", r"\bhydrothorax\b", r"\bhydropn\w*",
            r"\bfluid\s+(?:in|within)\s+(?:the\s+)?pleural\b",
        ),
        exclude=(r"\bpericardial\s+(?:\w+\s+)?effusion\w*", _PERICARDIAL_FLUID),
    ),
    "Mosaic attenuation pattern": Rule(
        patterns=(r"\bmosaic\w*",),
    ),
    "Peribronchial thickening": Rule(
        patterns=(r"\bperibronch\w*\s+(?:\w+\s+){0,3}thick\w*", r"\bbronchial\s+wall\s+thick\w*",
                  r"\bperibronch\w*\b[^.;]*?\bthick\w*", r"\bthick\w*[^.;]*?\bperibronch\w*"),
    ),
    "Consolidation": Rule(
        patterns=(r"\bconsolidat\w*",),
    ),
    "Bronchiectasis": Rule(
        patterns=(r"\bbronchiect\w*",),
    ),
    "Interlobular septal thickening": Rule(
        patterns=(r"\b(?:interlobular\s+)?septal\s+thick\w*", r"\binter(?:lobular|lobar|septal)\b[^.;]*?\bthick\w*",
                  r"\bthick\w*[^.;]*?\binter(?:lobular|lobar)\s+sept\w*", r"\binterlobular\s+septal\s+\w+"),
    ),
}

_COMPILED = {name: tuple([re.compile(p, re.IGNORECASE) for p in group] for group in (r.patterns, r.exclude, r.neutral))
             for name, r in RULES.items()}


@dataclass(frozen=True)
class ReportLabels:
    """The 18 labels of one report and the mentions that decided them.

    ``labels[name]`` is 1 or 0 for every name in :data:`ABNORMALITIES`; ``evidence[name]`` holds
    the mentions found for it (affirmed, hedged and negated), with offsets into the report.
    """

    labels: dict[str, int]
    evidence: dict[str, tuple[Mention, ...]] = field(default_factory=dict)

    def vector(self) -> list[int]:
        """The labels in :data:`ABNORMALITIES` order."""
        return [self.labels[name] for name in ABNORMALITIES]

    def positives(self) -> list[str]:
        return [name for name in ABNORMALITIES if self.labels[name]]


def label_report(text: str) -> ReportLabels:
    """Label one report: 1 for an abnormality with at least one affirmed or hedged mention."""
    sentences: Sequence[Span] = split_sentences(text or "")
    labels, evidence = {}, {}
    for name in ABNORMALITIES:
        patterns, exclude, neutral = _COMPILED[name]
        mentions = tuple(find_mentions(text, patterns, exclude=exclude, neutral=neutral, sentences=sentences))
        evidence[name] = mentions
        labels[name] = int(any(m.positive for m in mentions))
    return ReportLabels(labels, evidence)


def label_reports(texts: Iterable[str]) -> list[ReportLabels]:
    """:func:`label_report` for each text."""
    return [label_report(t) for t in texts]
