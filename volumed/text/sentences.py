"""Sentence handling for radiology reports: split, find mentions, decide negation and uncertainty.

The pipeline for one report::

    report text ──split_sentences──▶ [Sentence(text, start, end)]         (character offsets)
        ──clauses──▶ [Clause]         (a sentence cut at ';', ':', 'but', 'however', 'except', ...)
        ──find_mentions(patterns)──▶ [Mention(span, negated, uncertain)]

A mention is a regular-expression match inside a clause. It is **negated** when a negation cue
stands before it in the same clause ("no", "without", "free of", "absence of", "neither/nor"),
or after it in the same clause ("... was not observed", "... not detected", "... is normal",
"... within normal limits", "... is absent"). It is **uncertain** when a hedge stands in the same
clause ("?", "possible", "suspicious for", "cannot be excluded", "cannot exclude", "may be",
"compatible with", "worrisome for", "versus").
Uncertain mentions count as positive in CT-RATE labelling (its labels mark "nodule (lymph
node?)" as a nodule), so callers decide; negation wins over uncertainty except for "cannot be
excluded"/"not ruled out", which are uncertain, not negative.

The rules are our own regular expressions. They were written with the NegBio/CheXpert labeller's
negation and uncertainty patterns (MIT; ``../shared/data/chexpert_labeler_phrases/patterns``) as a
checklist of the cue words worth covering; those patterns are dependency-graph rules that need a
parser, so none of their text is used here. The cue lists were completed by reading CT-RATE
reports ("was not observed", "were not detected", "did not reach pathological size").

Offsets are character offsets into the original report, so a grounding step can point at the
exact words a label came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

# A sentence ends at '.', '!' or '?' followed by space (not inside "2.3 mm"), at a full-width
# stop of Chinese or Japanese text (no space follows it), at a double quote (CT-RATE impressions
# are quoted fragments), at a bullet, or at a line break.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])\s*|\s*[\"\u201c\u201d\u2022\n\r]+\s*")

# Clause breaks: a negation's scope ends here ("No effusion; atelectasis is seen").
_CLAUSE_BREAK = re.compile(
    r"\s*[;:]\s*|,?\s+\b(?:but|however|although|whereas|except(?:\s+for)?|apart\s+from|other\s+than|"
    r"while|besides|in\s+addition|additionally|on\s+the\s+other\s+hand)\b\s*|\s+-\s+|\s*,\s+(?=(?:and\s+)?(?:a|an|the|there|[0-9])\b)",
    re.IGNORECASE,
)

# Negation before the mention, within the clause.
PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|free\s+of|absence\s+of|absent|neither|nor|negative\s+for|never|"
    r"no\s+evidence\s+of|rather\s+than|instead\s+of|resolved|regressed|disappeared)\b",
    re.IGNORECASE,
)
# Negation after the mention, within the clause ("Pericardial effusion was not observed").
POST_NEGATION = re.compile(
    r"\b(?:(?:was|were|is|are|has|have|had|been|could|can|did|does|do)\s+(?:not|n't)\b|not\s+"
    r"(?:seen|observed|detected|found|present|identified|noted|visualized|demonstrated|monitored|evident)|"
    r"(?:is|are|was|were)\s+(?:absent|normal|natural|unremarkable)|within\s+normal\s+limits|"
    r"(?:was|were|is|are|has|have)\s+(?:been\s+)?(?:\w+ly\s+)?(?:regressed|resolved|disappeared|removed)|"
    r"is\s+not|are\s+not|none)\b",
    re.IGNORECASE,
)
# Hedges: the finding is possible, not certain.
UNCERTAINTY = re.compile(
    r"\?|\b(?:possibl[ey]|probabl[ey]|suspicious|suspected|suspicion|questionable|likely|may|might|"
    r"could\s+be|cannot\s+be\s+(?:excluded|ruled\s+out)|can\s*not\s+be\s+(?:excluded|ruled\s+out)|"
    r"not\s+(?:be\s+)?(?:excluded|ruled\s+out)|compatible\s+with|consistent\s+with|suggestive\s+of|"
    r"in\s+favou?r\s+of|differential|doubtful|equivocal|rule\s+out|"
    # Cues of CheXpert's uncertainty pattern lists that CT-RATE reports also use: "cannot exclude X",
    # "worrisome for", "concerning for", "X versus Y", "borderline", "presumably", "indeterminate".
    r"can\s*not\s+exclude|could\s+not\s+(?:be\s+)?exclude[sd]?|worrisome|concern(?:ing)?\s+for|versus|vs|"
    r"borderline|presum(?:ably|ed|ptive)|indeterminate)\b",
    re.IGNORECASE,
)
# "cannot be excluded" is uncertainty that contains "not": it must not read as a negation.
_NOT_A_NEGATION = re.compile(
    r"\b(?:can\s*not|could\s+not|not)\s+(?:be\s+)?(?:excluded|exclude|ruled\s+out|rule\s+out|distinguished|differentiated|evaluated|"
    r"assessed|be\s+evaluated|optimally)\b|\bnot\s+only\b|\bno\s+(?:change|significant\s+change)\b|"
    # "a nodule, which was not observed in the previous examination, is observed": new, not absent.
    r"\b(?:which\s+|that\s+)?(?:was|were|is|are)\s+not\s+(?:observed|detected|seen|present|visible)\s+(?:in|on)\s+(?:the\s+)?"
    r"(?:previous|prior|last|former)\b|\b(?:do|does|did)\s+not\s+(?:differ|change)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Span:
    """A piece of the report: ``text == report[start:end]``."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Mention:
    """A pattern match in a clause, with the decision about its polarity.

    ``span`` is the matched words, ``clause`` the clause that scopes the negation, ``sentence``
    the sentence around it (all with offsets into the report).
    """

    span: Span
    clause: Span
    sentence: Span
    negated: bool
    uncertain: bool

    @property
    def positive(self) -> bool:
        """Affirmed or hedged (CT-RATE convention: uncertain counts as present)."""
        return not self.negated


def _pieces(text: str, offset: int, pattern: re.Pattern) -> list[Span]:
    out, pos = [], 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            out.append((pos, match.start()))
        pos = match.end()
    if pos < len(text):
        out.append((pos, len(text)))
    spans = []
    for a, b in out:
        piece = text[a:b]
        stripped = piece.strip()
        if not stripped or not re.search(r"\w", stripped):
            continue
        lead = len(piece) - len(piece.lstrip())
        spans.append(Span(stripped, offset + a + lead, offset + a + lead + len(stripped)))
    return spans


def split_sentences(text: str) -> list[Span]:
    """Sentences of ``text`` with character offsets; empty and punctuation-only pieces are dropped."""
    return _pieces(text, 0, _SENTENCE_BREAK)


@lru_cache(maxsize=4096)
def _clauses(sentence: Span) -> tuple[Span, ...]:
    return tuple(_pieces(sentence.text, sentence.start, _CLAUSE_BREAK))


def split_clauses(sentence: Span) -> list[Span]:
    """Clauses of a sentence: the scope within which a negation or hedge cue applies."""
    # Cached: a labeller asks for the clauses of the same sentence once per finding.
    return list(_clauses(sentence))


def _masked(text: str) -> str:
    # Blank out "cannot be excluded", "not only", ... so that their "not" reads as no negation.
    return _NOT_A_NEGATION.sub(lambda m: " " * len(m.group(0)), text)


def polarity(clause: str, start: int, end: int, *, pre_window: int = 12) -> tuple[bool, bool]:
    """``(negated, uncertain)`` for the words ``clause[start:end]``.

    A pre-negation cue counts when at most ``pre_window`` words separate it from the mention
    ("No enlarged lymph nodes ... were detected" has the cue right before). A post-negation cue
    counts anywhere after the mention in the clause.
    """
    masked = _masked(clause)
    # A long mention ("lymph nodes were not observed in pathological size") can hold its own
    # negation: cues inside the span count, before it as pre-negation, after its start as post.
    negated = False
    for cue in PRE_NEGATION.finditer(masked[:end]):
        if len(re.findall(r"\w+", masked[cue.end():start])) <= pre_window:
            negated = True
    if POST_NEGATION.search(masked[start:]):
        negated = True
    uncertain = bool(UNCERTAINTY.search(clause))
    return negated, uncertain


def _compile(patterns: Iterable[re.Pattern | str]) -> list[re.Pattern]:
    return [re.compile(p, re.IGNORECASE) if isinstance(p, str) else p for p in patterns]


def find_mentions(text: str, patterns: Iterable[re.Pattern | str], *, exclude: Sequence[re.Pattern | str] = (),
                  neutral: Sequence[re.Pattern | str] = (), sentences: Sequence[Span] | None = None) -> list[Mention]:
    """Every match of any of ``patterns`` in ``text``, with its negation and uncertainty.

    A match that overlaps a match of an ``exclude`` pattern in the same clause is skipped
    ("subcutaneous emphysema" is not emphysema of the lung). Words matched by a ``neutral``
    pattern are ignored by the negation cues ("lymph nodes that did not reach pathological size
    were observed" affirms lymph nodes). ``sentences`` may be passed to reuse a split.
    """
    compiled, excluded, neutralised = _compile(patterns), _compile(exclude), _compile(neutral)
    mentions: list[Mention] = []
    for sentence in sentences if sentences is not None else split_sentences(text):
        for clause in split_clauses(sentence):
            blocked = [(m.start(), m.end()) for p in excluded for m in p.finditer(clause.text)]
            # Overlapping matches of several patterns are one mention: keep the longest, so
            # that "lymph node" inside "no lymph node in pathological size" is not judged alone.
            matches = sorted({m.span(): m for p in compiled for m in p.finditer(clause.text)}.values(),
                             key=lambda m: (m.start() - m.end(), m.start()))
            judged = clause.text
            for p in neutralised:
                judged = p.sub(lambda m: " " * len(m.group(0)), judged)
            kept: list[tuple[int, int]] = []
            for match in matches:
                a, b = match.span()
                if any(a < y and x < b for x, y in blocked + kept):
                    continue
                kept.append((a, b))
            for match in sorted((m for m in matches if m.span() in kept), key=lambda m: m.start()):
                a, b = match.span()
                negated, uncertain = polarity(judged, a, b)
                span = Span(match.group(0), clause.start + a, clause.start + b)
                mentions.append(Mention(span, clause, sentence, negated, uncertain))
    return mentions
