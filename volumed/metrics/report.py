"""Report-generation metrics: BLEU-1..4, METEOR, ROUGE-L and clinical efficacy (CE) P/R/F1.

::

    predicted texts, reference texts (paired, same length N)
      ── lower-case word tokens ──▶ nltk corpus_bleu (BLEU-n, uniform weights over 1..n grams, no smoothing)
                                   nltk meteor_score (exact, Porter-stem and WordNet-synonym matches; mean over N)
      ── rouge-score (ROUGE-L F-measure, its own tokenizer; mean over N)
      ── volumed.text.labels (18 CT-RATE findings per text) ──▶ CE precision / recall / F1:
           micro: pooled over all N x 18 decisions;
           macro: mean over the findings positive in at least one reference or prediction
                  (a finding absent from both sides says nothing about the generator)

The n-gram metrics come from the maintained libraries (nltk, rouge-score), not re-implemented.

WordNet for METEOR: nltk cannot download its data at run time here, and no PyPI package ships it.
:func:`wordnet_reader` uses, in order, nltk's own ``wordnet`` corpus when installed, the folder
in ``$VOLUMED_WORDNET_DIR``, or the Debian/Ubuntu package ``wordnet-base``
(``/usr/share/wordnet``, WordNet 3.0: ``apt-get install wordnet-base``). Without any, METEOR
still counts exact and stem matches but no synonyms; :attr:`ReportMetrics.meteor_wordnet` is then
None and the CLI says so. Scores with and without WordNet are not comparable.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from volumed.errors import ConfigError
from volumed.text.labels import ABNORMALITIES, label_report

log = logging.getLogger(__name__)

WORDNET_ENV = "VOLUMED_WORDNET_DIR"
SYSTEM_WORDNET_DIRS = (Path("/usr/share/wordnet"), Path("/usr/local/share/wordnet"))

# The 45 lexicographer files of WordNet 3.0 (lexnames(5WN)); Debian's wordnet-base lacks the
# file that nltk's reader requires, and METEOR never uses it beyond loading.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_WORDNET_FILES = ("data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun",
                  "index.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc")

_TOKEN = re.compile(r"[a-z0-9]+(?:[.'][a-z0-9]+)*|[^\sa-z0-9]", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """Lower-case word and punctuation tokens ("2.3 mm" stays one number)."""
    return _TOKEN.findall(text.lower())


class _NoSynonyms:
    """A WordNet stand-in with no synsets: METEOR then matches exact words and stems only."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


def _stage_system_wordnet(source: Path) -> Path:
    from volumed.text.encoder import default_cache_dir

    # A folder nltk accepts: copies of the dictionary files (nltk refuses symlinks that lead
    # outside its data path) plus the lexnames file it requires; about 30 MB, made once.
    staged = default_cache_dir().parent / "wordnet" / re.sub(r"[^\w.-]", "_", str(source.resolve()))
    staged.mkdir(parents=True, exist_ok=True)
    for name in _WORDNET_FILES:
        target = staged / name
        if target.is_symlink():
            target.unlink()
        if not target.exists() or target.stat().st_size != (source / name).stat().st_size:
            tmp = staged / f".{name}.tmp"
            shutil.copyfile(source / name, tmp)
            tmp.replace(target)
    lexnames = staged / "lexnames"
    if not lexnames.exists():
        lexnames.write_text("".join(f"{i:02d}\t{n}\t{_POS_NUMBER[n.split('.')[0]]}\n" for i, n in enumerate(_LEXNAMES)))
    return staged


@lru_cache(maxsize=1)
def wordnet_reader() -> tuple[object | None, str | None]:
    """``(reader, source)`` of the WordNet METEOR uses for synonyms, or ``(None, None)``."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _SystemWordNet(WordNetCorpusReader):
        # nltk maps other WordNet versions onto its own "wordnet" corpus for multilingual
        # lookups, which needs that corpus; English synonyms for METEOR need no mapping.
        def map_wn(self, version="wordnet"):
            return None

    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet, "nltk_data wordnet"
    except (LookupError, OSError):
        pass
    candidates = [Path(os.environ[WORDNET_ENV])] if os.environ.get(WORDNET_ENV) else []
    candidates += [d for d in SYSTEM_WORDNET_DIRS if d not in candidates]
    for folder in candidates:
        if not all((folder / name).is_file() for name in _WORDNET_FILES[:8]):
            continue
        try:
            root = folder if (folder / "lexnames").is_file() else _stage_system_wordnet(folder)
            if str(root) not in nltk.data.path:
                nltk.data.path.append(str(root))  # nltk only opens corpora under its data path
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "multilingual functions are not available": not used
                reader = _SystemWordNet(str(root), None)
            reader.synsets("effusion")
            return reader, str(folder)
        except (OSError, ValueError, LookupError, PermissionError) as err:
            log.warning("WordNet in %s could not be loaded (%s)", folder, err)
    return None, None


@dataclass(frozen=True)
class ClassScore:
    """Precision, recall, F1 of one finding, with its counts over the paired reports."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int


@dataclass(frozen=True)
class ClinicalEfficacy:
    """CE scores from the labels the extractor finds in predictions and references."""

    micro_precision: float
    micro_recall: float
    micro_f1: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    macro_classes: int
    per_class: dict[str, ClassScore] = field(default_factory=dict)


@dataclass(frozen=True)
class ReportMetrics:
    """All scores of a set of predicted reports against their references (``n`` pairs)."""

    n: int
    bleu: tuple[float, float, float, float]
    meteor: float
    rouge_l: float
    clinical: ClinicalEfficacy
    meteor_wordnet: str | None

    def to_dict(self) -> dict:
        out = asdict(self)
        out["bleu"] = {f"bleu_{i + 1}": v for i, v in enumerate(self.bleu)}
        return out

    def to_table(self) -> str:
        ce = self.clinical
        rows = [(f"BLEU-{i + 1}", v) for i, v in enumerate(self.bleu)]
        rows += [("METEOR" + ("" if self.meteor_wordnet else " (no WordNet: exact+stem only)"), self.meteor),
                 ("ROUGE-L", self.rouge_l),
                 ("CE precision (micro)", ce.micro_precision), ("CE recall (micro)", ce.micro_recall),
                 ("CE F1 (micro)", ce.micro_f1),
                 (f"CE precision (macro, {ce.macro_classes} findings)", ce.macro_precision),
                 (f"CE recall (macro, {ce.macro_classes} findings)", ce.macro_recall),
                 (f"CE F1 (macro, {ce.macro_classes} findings)", ce.macro_f1)]
        width = max(len(name) for name, _ in rows)
        lines = [f"{self.n} report pair(s)", *(f"{name:<{width}}  {value:.4f}" for name, value in rows), "",
                 f"{'finding':<34}  {'P':>6}  {'R':>6}  {'F1':>6}  {'TP':>4}  {'FP':>4}  {'FN':>4}"]
        for name, s in ce.per_class.items():
            lines.append(f"{name:<34}  {s.precision:6.3f}  {s.recall:6.3f}  {s.f1:6.3f}  {s.tp:4d}  {s.fp:4d}  {s.fn:4d}")
        return "\n".join(lines)


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def clinical_efficacy(pred_labels: Sequence[Sequence[int]], ref_labels: Sequence[Sequence[int]],
                      names: Sequence[str] = ABNORMALITIES) -> ClinicalEfficacy:
    """CE precision/recall/F1 from 0/1 label vectors (one per report, in ``names`` order)."""
    if len(pred_labels) != len(ref_labels):
        raise ConfigError(f"{len(pred_labels)} predicted vs {len(ref_labels)} reference label vectors")
    per_class, totals, macro = {}, [0, 0, 0], []
    for j, name in enumerate(names):
        tp = sum(1 for p, r in zip(pred_labels, ref_labels) if p[j] and r[j])
        fp = sum(1 for p, r in zip(pred_labels, ref_labels) if p[j] and not r[j])
        fn = sum(1 for p, r in zip(pred_labels, ref_labels) if r[j] and not p[j])
        per_class[name] = ClassScore(*_prf(tp, fp, fn), tp, fp, fn)
        totals = [totals[0] + tp, totals[1] + fp, totals[2] + fn]
        if tp + fp + fn:
            macro.append(per_class[name])
    mp, mr, mf = _prf(*totals)
    k = len(macro)
    mean = (lambda attr: sum(getattr(s, attr) for s in macro) / k) if k else (lambda attr: 0.0)
    return ClinicalEfficacy(mp, mr, mf, mean("precision"), mean("recall"), mean("f1"), k, per_class)


def evaluate_reports(predictions: Sequence[str], references: Sequence[str]) -> ReportMetrics:
    """BLEU-1..4, METEOR, ROUGE-L and CE scores of ``predictions`` against ``references`` (paired)."""
    if len(predictions) != len(references):
        raise ConfigError(f"{len(predictions)} predictions but {len(references)} references: they must pair up")
    if not predictions:
        raise ConfigError("no reports to evaluate")
    from nltk.translate.bleu_score import corpus_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    hyp = [tokenize(t) for t in predictions]
    ref = [tokenize(t) for t in references]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a higher-order n-gram never matches: BLEU is then 0
        bleu = tuple(float(corpus_bleu([[r] for r in ref], hyp, weights=tuple([1.0 / n] * n))) for n in (1, 2, 3, 4))
    wordnet, source = wordnet_reader()
    meteor = sum(meteor_score([r], h, wordnet=wordnet or _NoSynonyms()) for r, h in zip(ref, hyp)) / len(hyp)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(hyp)
    pred_labels = [label_report(t).vector() for t in predictions]
    ref_labels = [label_report(t).vector() for t in references]
    return ReportMetrics(len(hyp), bleu, float(meteor), float(rouge_l), clinical_efficacy(pred_labels, ref_labels), source)
