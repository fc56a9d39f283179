"""Findings from free-text reports: what, where, how big, and whether it is there at all.

One report (or one finding sentence, as ``volumed ground --finding`` will take it)::

    report text ──truncation policy (at most max_words words, cut at a sentence end)──▶ text
        ──split_sentences / split_clauses (volumed.text.sentences)──▶ sentences, phrases
        ──looks_english──▶ non-English sentences are kept aside, with no findings
        ──find_mentions(FINDING_TYPES patterns)──▶ mentions, each negated / uncertain
          (the NegBio/CheXpert cue lists, as implemented once in volumed.text.sentences)
        ──per mention──▶ Finding(type, location term + region + side, size in mm)

Offsets in every :class:`~volumed.text.sentences.Span` are character offsets into the report
(into the possibly truncated text, which is a prefix of the input).

Rules a reader would otherwise have to guess:

- **Phrases** are the clauses of :func:`~volumed.text.sentences.split_clauses`: a sentence cut at
  ';', ':', "but", "however", ", the", ... They scope negation, and they scope location and size.
- **Finding type** is one name of :data:`FINDING_TYPES` (its keys, in priority order). Where
  patterns of several types overlap, the longest match wins ("calcified nodule" is one nodule, not
  a calcification and a nodule; "ground-glass nodule" is a nodule, "ground-glass areas" an
  opacity); a tie goes to the type listed first.
- **Location**: the words of the phrase are matched against the project vocabulary
  (:class:`~volumed.data.vocab.Vocabulary`: every term's name and synonyms, plus the report
  words in :data:`REPORT_SYNONYMS` such as "hepatic" or "middle lobe"); the longest match wins.
  The match nearest to the finding gives ``location_term``. Regions the vocabulary has no term
  for (pleura, mediastinum, hilum, ...: :data:`REGIONS`) give ``region``. When the finding's
  own phrase names no location, the phrases of the same sentence that hold no finding of their
  own are searched ("In the right lung lower lobe, there is a 5 mm nodule").
- **Side** is the side of the term when it has one (``kidney_left``); otherwise the side word
  ("right", "left", "bilateral", "both") inside the location words, else the one nearest to the
  finding in its phrase. A paired group term is narrowed by the side: "nodule in the lower lobe on
  the right" gives ``lung_lower_lobe_right``; "both lungs" stays ``lung`` with side "bilateral".
- **Size**: numbers with a unit (mm, cm, millimetre, centimetre), converted to mm and rounded to
  0.01 mm. "12 x 8 mm", "1.2 x 0.8 cm", "12 mm x 8 mm" and "27x28x46 mm" give every axis;
  a range "3-5 mm" gives its upper end only, as do "up to 16 mm" and "less than 5 mm" (a bound is
  reported as the number, not as a measurement). The size nearest to the finding in the same
  scope as the location is taken. A number without a unit is never a size (HU values, segment
  numbers).
- **Negated and uncertain** come from :func:`~volumed.text.sentences.find_mentions`; a negated
  finding keeps its type, location and size (an evaluation needs "No nodule in the right lung"
  to know where nothing should be found). :attr:`Finding.positive` is "not negated".

Bad input (see docs/grounding.md):

- an empty or whitespace-only sentence or report raises
  :class:`~volumed.errors.ReportTextError`;
- a sentence with no location gives a finding whose ``location_term``, ``region`` and ``side``
  are None: the caller grounds it from the sentence alone;
- a non-English sentence (:func:`looks_english`) gives no findings and is listed in
  :attr:`ParsedReport.non_english`; :func:`parse_sentence` raises for it, and
  :func:`parse_report` raises when no sentence of the report is English;
- a report longer than ``max_words`` (default :data:`DEFAULT_MAX_WORDS`) is truncated at the
  last sentence end that fits (``on_overflow="truncate"``, :attr:`ParsedReport.truncated` is
  True and a warning is logged) or refused (``on_overflow="error"``). The rules are linear in the
  text, so the limit is not for the parser: every positive finding becomes a query, a text
  embedding and a full-size mask downstream, and an unbounded report must not become an
  unbounded number of masks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from volumed.data.vocab import Vocabulary, default_vocabulary, normalize_text
from volumed.errors import ReportTextError
from volumed.text.labels import RULES
from volumed.text.sentences import Mention, Span, find_mentions, split_clauses, split_sentences

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_WORDS",
    "FINDING_TYPES",
    "REGIONS",
    "REPORT_SYNONYMS",
    "Finding",
    "Location",
    "ParsedReport",
    "ParsedSentence",
    "Size",
    "find_locations",
    "find_sizes",
    "looks_english",
    "parse_report",
    "parse_sentence",
]

#: Words kept by :func:`parse_report` by default: 1.6 times the longest of CT-RATE's 800
#: labelled reports (1243 words), so no real report is cut.
DEFAULT_MAX_WORDS = 2000

_MOD = r"(?:calcified|calcific|ground[\s-]*glass|solid|sub-?solid|part-?solid|non-?solid|hypodense|hyperdense|" \
       r"isodense|subpleural|parenchymal|spiculated|pulmonary|nonspecific|non-specific|metastatic)"

#: Finding types and their patterns (case-insensitive regular expressions), in priority order.
#: "effusion" covers any fluid collection (pleural, pericardial, ascites); "opacity" covers
#: ground glass, infiltration and density increase; "calcification" covers calcified plaques;
#: "plaque" the non-calcified atheroma; "device" is CT-RATE's "Medical material"
#: (the patterns of :data:`volumed.text.labels.RULES`, reused).
FINDING_TYPES: dict[str, tuple[str, ...]] = {
    "lymph node": (
        r"\b(?:enlarged\s+|pathologic(?:al)?\s+|conglomerat\w*\s+)?lymph\s*nod(?:e|es|ules?)\b",
        r"\blymphadenopath\w*", r"\blymphadenomegal\w*", r"\bLAPs?\b",
    ),
    "nodule": (
        rf"\b(?:{_MOD}\s+){{0,3}}(?:micro)?nodul(?:e|es|ar\s+lesions?|ar\s+opacit(?:y|ies)|ar\s+densit(?:y|ies))\b",
    ),
    "mass": (rf"\b(?:{_MOD}\s+|soft[\s-]+tissue\s+){{0,2}}mass(?:es)?(?:\s+lesions?)?\b",),
    "cyst": (r"\b(?:\w+\s+)?cysts?\b", r"\bcystic\s+(?:lesions?|formations?|areas?)\b"),
    "lesion": (rf"\b(?:{_MOD}\s+|lytic\s+|sclerotic\s+|blastic\s+|focal\s+){{0,2}}lesions?\b",),
    "effusion": (
        r"\b(?:pleural\s+|pericardial\s+)?effusions?\b", r"\bhydrothorax\b", r"\bfluid\s+collections?\b",
        r"\bascites\b",
    ),
    "opacity": (
        r"\bground[\s-]*glass(?:\s+(?:opacit(?:y|ies)|areas?|densit(?:y|ies)|appearances?|pattern))?",
        r"\bopacit(?:y|ies)\b", r"\binfiltrat\w*", r"\bdensity\s+increases?\b", r"\bincreased?\s+density\b",
    ),
    "consolidation": (r"\bconsolidat\w*",),
    "atelectasis": (r"\b(?:\w+\s+)?atelecta\w*",),
    "calcification": (
        r"\bcalcifications?\b",
        r"\bcalci(?:fied|fic)\s+(?:atheroma\w*\s+|atherosclerotic\s+)?(?:plaques?|changes?)\b",
    ),
    "plaque": (r"\b(?:atheroma\w*|atherosclerotic)\s+(?:plaques?|changes?)\b", r"\bplaques?\b", r"\batherosclerosis\b"),
    "emphysema": (r"\b(?:\w+\s+)?emphysema\w*", r"\bbullae?\b", r"\bbullous\b"),
    "bronchiectasis": (r"\bbronchiect\w*",),
    "thickening": (r"\b(?:\w+\s+)?thickening\b", r"\bthickness\s+increases?\b"),
    "fibrosis": (r"\bfibro\w*", r"\bsequel\w*", r"\bscar\w*"),
    "hernia": (r"\b(?:hiat(?:al|us)\s+)?hernia\w*",),
    "pneumothorax": (r"\bpneumothora\w*",),
    "fracture": (r"\bfractur\w*",),
    "stone": (r"\bcalcul(?:us|i)\b", r"\bstones?\b", r"\b\w*lithiasis\b"),
    # "The liver is enlarged." as well as "hepatomegaly"; not the "enlarged" of lymph nodes (above).
    "enlargement": (r"\b\w+megal(?:y|ic)\b", r"\baneurysm\w*", r"\bectasia\b",
                    r"(?<!node\s)(?<!nodes\s)\benlarge(?:d|ment)\b(?!(?:\s+\w+){0,3}?\s+(?:lymph|nod))"),
    "steatosis": (r"\b(?:hepato)?steatosis\b", r"\bfatty\s+liver\b"),
    "mosaic attenuation": (r"\bmosaic(?:\s+attenuation)?(?:\s+pattern)?\b",),
    "degenerative change": (r"\bdegenerative\s+changes?\b", r"\bosteophyt\w*"),
    "device": RULES["Medical material"].patterns,
}
# Words that look like a finding but are not one here ("portal vein" is not a port catheter;
# "effusion-thickening" reads twice otherwise).
_EXCLUDE: tuple[str, ...] = (*RULES["Medical material"].exclude, r"\bnodular\s+(?:thicken\w*|contour\w*)")

#: The organ an "X-megaly" names when no location word does ("Hepatomegaly."): root -> vocabulary term.
_MEGALY_ORGANS: dict[str, str] = {"hepato": "liver", "spleno": "spleen", "cardio": "heart", "nephro": "kidney"}
_MEGALY = re.compile(r"\b(" + "|".join(_MEGALY_ORGANS) + r")megal", re.IGNORECASE)

#: Regions of a report that the vocabulary has no term for: name -> pattern.
REGIONS: dict[str, str] = {
    "pleura": r"\bpleura[el]?\b",
    "pericardium": r"\bpericardi(?:al|um)\b",
    "mediastinum": r"\b(?:mediastin\w*|paratracheal|pretracheal|subcarinal|prevascular|paraaortic|paraesophageal|"
                   r"aorticopulmonary)\b",
    "hilum": r"\bhil(?:ar|um|i)\b",
    "axilla": r"\baxill(?:a|ae|ary)\b",
    "chest wall": r"\bchest\s+wall\b",
    "coronary arteries": r"\bcoronar(?:y|ies)\b",
    "pulmonary artery": r"\bpulmonary\s+(?:arter(?:y|ies)|trunk)\b",
    "breast": r"\bbreasts?\b",
}

#: Report words for vocabulary terms that the vocabulary itself does not list: word -> term.
REPORT_SYNONYMS: dict[str, str] = {
    "hepatic": "liver", "renal": "kidney", "splenic": "spleen", "pancreatic": "pancreas",
    "aortic": "aorta", "thoracic aorta": "aorta", "abdominal aorta": "aorta", "cardiac": "heart",
    "gastric": "stomach", "esophageal": "esophagus", "tracheal": "trachea", "vertebral": "vertebrae",
    "middle lobe": "lung_middle_lobe_right", "lingula": "lung_upper_lobe_left",
    "lingular": "lung_upper_lobe_left", "lung parenchyma": "lung", "pulmonary": "lung",
    "bilateral lungs": "lung",
}
# Vocabulary forms that report prose uses in other senses: "long axis", "atlas", "T2" (MR).
_AMBIGUOUS = re.compile(r"(?:axis|atlas|hip|[ctls]\d{1,2})")
# "pulmonary artery", "pulmonary vein": the adjective names the lung only before other words.
_NOT_AFTER_PULMONARY = {"artery", "arteries", "trunk", "vein", "veins", "embolism", "hypertension", "valve"}

_SIDE_WORDS = {"right": "right", "left": "left", "bilateral": "bilateral", "bilaterally": "bilateral",
               "both": "bilateral"}
_WORD = re.compile(r"[^\W_]+")

_NUM = r"\d+(?:[.,]\d+)?"
_UNIT = r"(?:mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)\b"
_SEP = r"\s*(?:x|×|\*|by)\s*"
_RANGE = re.compile(rf"(?<![\w.,])({_NUM})\s*(?:-|–|to)\s*({_NUM})\s*({_UNIT})", re.IGNORECASE)
_DIMS = re.compile(rf"(?<![\w.,]){_NUM}(?:\s*{_UNIT})?(?:{_SEP}{_NUM}(?:\s*{_UNIT})?){{0,2}}", re.IGNORECASE)
_AXIS = re.compile(rf"({_NUM})(?:\s*({_UNIT}))?", re.IGNORECASE)

# Function words of English, and of the languages radiology reports are most often written in
# (German, Spanish, Portuguese, French, Italian, Turkish, Dutch) that are not also English words
# or word pieces of English reports ("non-", "un-", "e" are left out on purpose).
_ENGLISH = frozenset(
    "the a an of in on at to and or with without no not is are was were be been there this that these those "
    "which as by for from into both right left than has have it its".split()
)
_FOREIGN = frozenset(
    "der die das und ist nicht kein keine keinen mit im ein eine einer rechts links beidseits nachweis "
    "el la los las del y se con sin una es derecho izquierdo derecha izquierda está son hay observa observan derrame "
    "le les des du et est une avec sans pas dans droit droite gauche "
    "il lo gli di nel della destro sinistro senza nessun nessuna "
    "ve bir ile bu da için olarak izlendi mevcut saptanmadı sağ sol izlenmiştir "
    "het van een niet geen rechter linker".split()
)


@dataclass(frozen=True)
class Size:
    """A size in the text: ``mm`` holds one value per axis given, in millimetres."""

    mm: tuple[float, ...]
    span: Span


@dataclass(frozen=True)
class Location:
    """A place named in the text.

    Attributes:
        term: canonical vocabulary term (``lung_lower_lobe_right``, ``liver``), or None for a
            region without a term.
        region: a name of :data:`REGIONS` ("pleura"), or None for a vocabulary term.
        side: "left", "right", "bilateral", or None.
        span: the words that named it.
    """

    term: str | None
    region: str | None
    side: str | None
    span: Span


@dataclass(frozen=True)
class Finding:
    """One finding of a report, with its polarity, type, location and size.

    Attributes:
        text: the phrase (clause) the finding stands in: the query for grounding.
        span: the words that name the finding ("12 mm nodule" has span "nodule").
        phrase: ``text`` with its offsets.
        sentence: the sentence around the phrase.
        finding_type: a key of :data:`FINDING_TYPES` ("nodule", "effusion", ...).
        negated: the finding is denied ("No pleural effusion").
        uncertain: the finding is hedged ("cannot be excluded", "suspicious for", "?").
        location_term: canonical vocabulary term, or None when no vocabulary location is named.
        region: a :data:`REGIONS` name named with it ("pleura"), or None.
        side: "left", "right", "bilateral", or None.
        size_mm: one value per axis in mm (``(12.0, 8.0)`` for "12 x 8 mm"); empty when no size.
        location_span: the words of the location (term, else region), or None.
        size_span: the words of the size, or None.
        locations: every location named in the finding's scope (its phrase, else the sentence's
            phrases without a finding), in text order: "consolidation in the right lung upper
            lobe, lower lobe and left lung lower lobe" names three, of which the nearest gives
            ``location_term``. Their terms are as written, not narrowed by side words.
    """

    text: str
    span: Span
    phrase: Span
    sentence: Span
    finding_type: str
    negated: bool
    uncertain: bool
    location_term: str | None = None
    region: str | None = None
    side: str | None = None
    size_mm: tuple[float, ...] = ()
    location_span: Span | None = None
    size_span: Span | None = None
    locations: tuple[Location, ...] = ()

    @property
    def positive(self) -> bool:
        """Affirmed or hedged: not negated (CT-RATE's convention, as in volumed.text.labels)."""
        return not self.negated


@dataclass(frozen=True)
class ParsedSentence:
    """One sentence: its phrases, its findings, and whether it reads as English."""

    span: Span
    phrases: tuple[Span, ...]
    findings: tuple[Finding, ...]
    english: bool = True

    @property
    def text(self) -> str:
        return self.span.text


@dataclass(frozen=True)
class ParsedReport:
    """A parsed report.

    Attributes:
        text: the text that was parsed: the input, or its first sentences when truncated.
        sentences: every sentence of ``text``, in order.
        n_words: words in the input.
        n_words_parsed: words in ``text``.
        truncated: the input was longer than ``max_words`` and was cut.
    """

    text: str
    sentences: tuple[ParsedSentence, ...]
    n_words: int
    n_words_parsed: int
    truncated: bool = False

    @property
    def findings(self) -> list[Finding]:
        """All findings, affirmed, hedged and negated, in report order."""
        return [f for s in self.sentences for f in s.findings]

    @property
    def positive_findings(self) -> list[Finding]:
        """Findings that are not negated: the ones to ground."""
        return [f for f in self.findings if f.positive]

    @property
    def non_english(self) -> list[Span]:
        """Sentences set aside because they do not read as English."""
        return [s.span for s in self.sentences if not s.english]


# ------------------------------------------------------------------------------------- pieces


def looks_english(text: str) -> bool:
    """Whether ``text`` reads as English, by a rule simple enough to state.

    Not English: more than 10% of its letters are outside ASCII (Turkish, Greek, Cyrillic,
    Chinese, ...), or it holds more function words of German, Spanish, Portuguese, French,
    Italian, Turkish or Dutch than of English, or at least two of them and no more English ones.
    Everything else passes, so a telegraphic English line without function words ("Bilateral
    hilar lymphadenopathy.", "Examination within normal limits") is parsed; so is a foreign
    sentence that uses none of the listed words, which then gives no findings either. No sentence
    of CT-RATE's 800 labelled reports is refused (tests/unit/text/test_reports.py).
    """
    letters = [c for c in text if c.isalpha()]
    if letters and sum(not c.isascii() for c in letters) > 0.1 * len(letters):
        return False
    words = [w.casefold() for w in _WORD.findall(text)]
    english = sum(w in _ENGLISH for w in words)
    foreign = sum(w in _FOREIGN for w in words)
    return not (foreign > english or (foreign >= 2 and foreign >= english))


def find_sizes(text: str, offset: int = 0) -> list[Size]:
    """Every size with a unit in ``text``, in mm (see the module doc for ranges and bounds).

    ``offset`` is added to the spans (the position of ``text`` in its report).
    """
    sizes: list[Size] = []
    taken: list[tuple[int, int]] = []
    for m in _RANGE.finditer(text):
        upper = _to_mm(m.group(2), m.group(3))
        sizes.append(Size((upper,), Span(m.group(0), offset + m.start(), offset + m.end())))
        taken.append(m.span())
    for m in _DIMS.finditer(text):
        if any(m.start() < b and a < m.end() for a, b in taken):
            continue
        axes = [(a.group(1), a.group(2)) for a in _AXIS.finditer(m.group(0))]
        last_unit = axes[-1][1]
        if last_unit is None:
            continue  # "segment 7", "50 HU": no unit, no size
        # "12 mm x 8 mm" gives each axis its own unit; "12 x 8 mm" shares the last one.
        mm = tuple(_to_mm(value, unit or last_unit) for value, unit in axes)
        sizes.append(Size(mm, Span(m.group(0), offset + m.start(), offset + m.end())))
    return sorted(sizes, key=lambda s: s.span.start)


def _to_mm(value: str, unit: str) -> float:
    number = float(value.replace(",", "."))
    factor = 10.0 if unit.lower().startswith(("cm", "centi")) else 1.0
    return round(number * factor, 2)


@lru_cache(maxsize=8)
def _surfaces(vocabulary: Vocabulary) -> tuple[dict[tuple[str, ...], str], int]:
    """Token tuple of every vocabulary surface form (and report synonym) -> term name."""
    table: dict[tuple[str, ...], str] = {}
    for name in vocabulary.names:
        for surface in (name.replace("_", " "), *vocabulary.term(name).synonyms):
            key = normalize_text(surface)
            if not _AMBIGUOUS.fullmatch(key):
                table.setdefault(tuple(key.split()), name)
    for word, name in REPORT_SYNONYMS.items():
        if name in vocabulary:
            table.setdefault(tuple(normalize_text(word).split()), name)
    return table, max(len(k) for k in table)


def _side_of(name: str) -> str | None:
    for side in ("left", "right"):
        if name.endswith(f"_{side}") or f"_{side}_" in name:
            return side
    return None


def _narrow(vocabulary: Vocabulary, name: str, side: str | None) -> str:
    """A paired group narrowed to one side: ``lung_lower_lobes`` + "right" -> ``lung_lower_lobe_right``."""
    if side not in ("left", "right") or _side_of(name):
        return name
    parts = [p for p in vocabulary.term(name).parts if _side_of(p) == side]
    return parts[0] if len(parts) == 1 else name


def find_locations(text: str, offset: int = 0, vocabulary: Vocabulary | None = None) -> list[Location]:
    """Vocabulary terms and :data:`REGIONS` named in ``text``, longest match first, in text order.

    The side of a term is its own ("left kidney") or a side word inside its words ("both
    lungs"); the side of a region comes from a side word inside its words only. Narrowing by a
    side word elsewhere in the phrase is done per finding (see the module doc).
    """
    vocabulary = vocabulary or default_vocabulary()
    table, longest = _surfaces(vocabulary)
    words = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(text)]
    keys = [normalize_text(w) for w, _, _ in words]
    found: list[Location] = []
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            name = table.get(tuple(keys[i:i + n]))
            if name is None:
                continue
            if keys[i:i + n] == ["pulmonary"] and i + 1 < len(keys) and keys[i + 1] in _NOT_AFTER_PULMONARY:
                continue
            a, b = words[i][1], words[i + n - 1][2]
            inner = [_SIDE_WORDS[k] for k in keys[i:i + n] if k in _SIDE_WORDS]
            side = _side_of(name) or (inner[0] if inner else None)
            if side == "bilateral" and not vocabulary.term(name).parts:
                side = None  # "both" inside a name of one structure says nothing
            found.append(Location(name, None, side, Span(text[a:b], offset + a, offset + b)))
            i += n
            break
        else:
            i += 1
    taken = [(loc.span.start - offset, loc.span.end - offset) for loc in found]
    for region, pattern in REGIONS.items():
        for m in re.finditer(pattern, text, re.IGNORECASE):
            if any(m.start() < y and x < m.end() for x, y in taken):
                continue
            found.append(Location(None, region, None, Span(m.group(0), offset + m.start(), offset + m.end())))
    return sorted(found, key=lambda loc: loc.span.start)


def _side_words(text: str, offset: int) -> list[tuple[str, Span]]:
    return [(_SIDE_WORDS[m.group(0).casefold()], Span(m.group(0), offset + m.start(), offset + m.end()))
            for m in _WORD.finditer(text) if m.group(0).casefold() in _SIDE_WORDS]


def _gap(a: Span, b: Span) -> int:
    return max(0, max(a.start, b.start) - min(a.end, b.end))


def _nearest(items: Sequence, target: Span, span_of) -> object | None:
    return min(items, key=lambda x: (_gap(span_of(x), target), span_of(x).start), default=None)


# -------------------------------------------------------------------------------------- parse


_TYPE_PATTERNS = {name: [re.compile(p, re.IGNORECASE) for p in patterns] for name, patterns in FINDING_TYPES.items()}
_ALL_PATTERNS = [p for patterns in _TYPE_PATTERNS.values() for p in patterns]
_EXCLUDE_PATTERNS = [re.compile(p, re.IGNORECASE) for p in _EXCLUDE]


def _type_of(words: str) -> str:
    for name, patterns in _TYPE_PATTERNS.items():
        if any(p.fullmatch(words) for p in patterns):
            return name
    for name, patterns in _TYPE_PATTERNS.items():  # a match shaped by look-arounds
        if any(p.search(words) for p in patterns):
            return name
    raise AssertionError(f"no finding type matches {words!r}")  # find_mentions matched it


@dataclass(frozen=True)
class _Phrase:
    span: Span
    locations: tuple[Location, ...]
    sizes: tuple[Size, ...]
    sides: tuple[tuple[str, Span], ...]
    mentions: tuple[Mention, ...]


def _finding(mention: Mention, own: _Phrase, others: Sequence[_Phrase], vocabulary: Vocabulary) -> Finding:
    # Location and size come from the finding's phrase, else from the sentence's phrases that hold
    # no finding of their own ("In the right lung lower lobe, there is a 5 mm nodule").
    spare = [p for p in others if not p.mentions]
    terms = [loc for loc in own.locations if loc.term] or [loc for p in spare for loc in p.locations if loc.term]
    regions = [loc for loc in own.locations if loc.region] or [loc for p in spare for loc in p.locations if loc.region]
    sizes = list(own.sizes) or [s for p in spare for s in p.sizes]
    term = _nearest(terms, mention.span, lambda loc: loc.span)
    region = _nearest(regions, mention.span, lambda loc: loc.span)
    size = _nearest(sizes, mention.span, lambda s: s.span)
    anchor = term or region
    side = anchor.side if anchor is not None else None
    if side is None:
        sides = list(own.sides) or [s for p in spare for s in p.sides]
        near = _nearest(sides, anchor.span if anchor is not None else mention.span, lambda s: s[1])
        side = near[0] if near is not None else None
    name = _narrow(vocabulary, term.term, side) if term is not None else None
    megaly = _MEGALY.match(mention.span.text)
    if megaly is not None and vocabulary.lookup(_MEGALY_ORGANS[megaly.group(1).lower()]) is not None:
        # The word names its organ, whatever location words stand nearby ("Dilatation of the aorta, cardiomegaly").
        name = _narrow(vocabulary, _MEGALY_ORGANS[megaly.group(1).lower()], side)
    if name is not None and _side_of(name):
        side = _side_of(name)
    return Finding(
        text=own.span.text,
        span=mention.span,
        phrase=own.span,
        sentence=mention.sentence,
        finding_type=_type_of(mention.span.text),
        negated=mention.negated,
        uncertain=mention.uncertain,
        location_term=name,
        region=region.region if region is not None else None,
        side=side,
        size_mm=size.mm if size is not None else (),
        location_span=anchor.span if anchor is not None else None,
        size_span=size.span if size is not None else None,
        locations=tuple(sorted(terms + regions, key=lambda loc: loc.span.start)),
    )


def _parse_sentence_span(sentence: Span, vocabulary: Vocabulary) -> ParsedSentence:
    clauses = split_clauses(sentence)
    if not looks_english(sentence.text):
        return ParsedSentence(sentence, tuple(clauses), (), english=False)
    mentions = find_mentions(sentence.text, _ALL_PATTERNS, exclude=_EXCLUDE_PATTERNS, sentences=[sentence])
    phrases = []
    for clause in clauses:
        local = clause.text
        phrases.append(_Phrase(
            clause,
            tuple(find_locations(local, clause.start, vocabulary)),
            tuple(find_sizes(local, clause.start)),
            tuple(_side_words(local, clause.start)),
            tuple(m for m in mentions if m.clause == clause),
        ))
    findings = []
    for phrase in phrases:
        others = [p for p in phrases if p is not phrase]
        findings.extend(_finding(m, phrase, others, vocabulary) for m in phrase.mentions)
    return ParsedSentence(sentence, tuple(clauses), tuple(findings), english=True)


def _truncate(text: str, max_words: int) -> tuple[str, int]:
    """The longest prefix of whole sentences with at most ``max_words`` words (a cut inside the
    first sentence when it alone is longer), and the words of the input."""
    words = list(_WORD.finditer(text))
    if len(words) <= max_words:
        return text, len(words)
    limit = words[max_words - 1].end()  # end of the last word allowed
    end = 0
    for sentence in split_sentences(text):
        if sentence.end > limit:
            break
        end = sentence.end
    return text[: end or limit], len(words)


def parse_report(
    text: str,
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    on_overflow: Literal["truncate", "error"] = "truncate",
    vocabulary: Vocabulary | None = None,
) -> ParsedReport:
    """Split a report into sentences and phrases and find each sentence's findings.

    Args:
        text: the report.
        max_words: words kept (see the module doc for why there is a limit).
        on_overflow: "truncate": keep the whole sentences that fit and log a warning;
            "error": raise instead.
        vocabulary: the anatomy vocabulary; None uses the built-in one.

    Raises:
        ReportTextError: an empty report, a report longer than ``max_words`` with
            ``on_overflow="error"``, a report none of whose sentences is English, or a
            ``max_words`` below 1.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportTextError(f"empty report {text!r}: there is no sentence to parse")
    if max_words < 1:
        raise ReportTextError(f"max_words must be at least 1, got {max_words}")
    if on_overflow not in ("truncate", "error"):
        raise ReportTextError(f"on_overflow must be 'truncate' or 'error', got {on_overflow!r}")
    vocabulary = vocabulary or default_vocabulary()
    kept, n_words = _truncate(text, max_words)
    truncated = len(kept) < len(text)
    if truncated:
        if on_overflow == "error":
            raise ReportTextError(f"the report has {n_words} words, more than max_words={max_words}")
        log.warning("report of %d words truncated to its first %d characters (max_words=%d)",
                    n_words, len(kept), max_words)
    sentences = tuple(_parse_sentence_span(s, vocabulary) for s in split_sentences(kept))
    if not sentences:
        raise ReportTextError(f"report {text[:80]!r} holds no words")
    if not any(s.english for s in sentences):
        raise ReportTextError(f"the report does not read as English ({sentences[0].text[:80]!r}); "
                              "the finding rules and the text encoder are English only")
    for s in sentences:
        if not s.english:
            log.warning("sentence %r does not read as English; it gives no findings", s.text[:80])
    n_parsed = n_words if not truncated else len(_WORD.findall(kept))
    return ParsedReport(kept, sentences, n_words, n_parsed, truncated)


def parse_sentence(text: str, *, vocabulary: Vocabulary | None = None) -> ParsedSentence:
    """Parse one finding sentence (``--finding "12 mm nodule in the right lower lobe"``).

    The text is taken as one sentence even when it holds several (phrases still split it).

    Raises:
        ReportTextError: the sentence is empty, holds no words, does not read as English, or is
            longer than :data:`DEFAULT_MAX_WORDS` words.
    """
    if not isinstance(text, str) or not text.strip():
        raise ReportTextError(f"empty finding sentence {text!r}; describe a finding, e.g. "
                              "'12 mm nodule in the right lower lobe'")
    stripped = text.strip()
    if not _WORD.search(stripped):
        raise ReportTextError(f"finding sentence {text!r} holds no words")
    n_words = len(_WORD.findall(stripped))
    if n_words > DEFAULT_MAX_WORDS:
        raise ReportTextError(f"a finding sentence of {n_words} words is longer than {DEFAULT_MAX_WORDS}; "
                              "pass a long text as a report, which is truncated at a sentence end")
    if not looks_english(stripped):
        raise ReportTextError(f"finding sentence {stripped[:80]!r} does not read as English; "
                              "the finding rules and the text encoder are English only")
    start = text.index(stripped)
    return _parse_sentence_span(Span(stripped, start, start + len(stripped)), vocabulary or default_vocabulary())
