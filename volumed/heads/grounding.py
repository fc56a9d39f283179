"""Grounding head: a finding sentence as a query of the term-query decoder, conditioned on its location.

A finding sentence ("A 12 mm nodule in the right lower lobe.") is parsed
(:mod:`volumed.text.reports`) and becomes one query; the network is the text-prompted segmenter
(encoder + :class:`~volumed.heads.promptseg.TermQueryDecoder`) with one more learned step in front
of the decoder, the location conditioning::

    sentence ──TextEncoder──▶ s (N, D)        parsed location term ──TextEncoder──▶ l (N, D)
    q = W_l·l + W_s·s   (has a location)    W_l: Linear(D, D), starts as the identity
                                            W_s: Linear(D, D), starts as sentence_weight x identity
    q = s + e_none      (no location parsed)      e_none: learned (D,), starts at 0
    q ──modality embedding (CT/MR)──▶ TermQueryDecoder ──▶ logits (B, N, X, Y, Z)

Why this start: with a small ``sentence_weight`` the query of "a nodule in the right lower lobe"
starts as the query the anatomy model (``volumed segment``, whose weights a grounding model can
start from) answers with the right lower lobe. The untrained head therefore already points at
the organ that holds the finding; training narrows the organ down to the finding, through
``W_s`` (what the sentence says: nodule or cyst, its size) and the decoder.

The location text is the canonical vocabulary term, the one ``volumed segment`` embeds for the
same structure ("lung_lower_lobe_right", "liver"), so the query carries the place twice: in the
words of the sentence and in the term the anatomy decoder already knows.

**Location gate.** The location term is also a query of its own, answered by the same decoder
(one more query per sentence; the decoder is term-independent): the organ's logits ``b``. They
are dilated (3D max pooling, ``gate_kernel`` voxels: a lesion the anatomy model leaves out of its
organ, a hypodense liver lesion, still lies inside the dilated organ) and gate the sentence's
logits ``a``::

    logits = a + log sigmoid(maxpool(b))      (sentences with a location; a alone otherwise)

so a finding can only be found where its named organ is: "a nodule in the right lower lobe" is
never answered with a nodule of the left lung, whatever the sentence path learned. Sentence and location
embeddings come from the frozen text encoder; only ``W``, ``e_none``, the modality table and the
segmenter are trained.

After thresholding, a mask is split into 26-connected components, the **instances** (one per
lesion of "multiple nodules"), and its **confidence** is the mean probability inside the mask.
A **negated** finding ("No pleural effusion.") is never a query: it yields no mask.

``GroundingModel`` is a :class:`~volumed.inference.package.TextPromptedSegmenter` (same
``segmenter`` and ``text_condition``), so the shared predictor (sliding window, inversion to the
original grid: :class:`volumed.inference.segment.PromptSegPredictor`) runs it unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from volumed.errors import ConfigError, WeightsLoadError
from volumed.inference.package import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PromptSegConfig,
    TextPromptedSegmenter,
    build_segmenter,
    read_config,
)

__all__ = [
    "GROUNDING_CONFIG_NAME",
    "FindingQuery",
    "GatedSegmenter",
    "GroundingConfig",
    "GroundingModel",
    "Instance",
    "LocationConditioning",
    "build_grounding_model",
    "connected_instances",
    "finding_queries",
    "is_grounding_package",
    "load_grounding_package",
    "read_grounding_config",
    "location_text",
    "save_grounding_package",
]

#: The file that marks a model folder as a grounding package (next to config.json and model.safetensors).
GROUNDING_CONFIG_NAME = "grounding.json"


# ------------------------------------------------------------------------------------ queries


@dataclass(frozen=True)
class FindingQuery:
    """One sentence (or clause) to ground.

    Attributes:
        text: the words embedded as the query (the sentence as written, or the finding's clause
            when a sentence holds several findings in separate clauses).
        negated: every finding in it is negated ("No pleural effusion."): no mask is made.
        finding_type: the parsed type of its first positive finding ("nodule"), or None when the
            parser found no finding (a free sentence is still grounded).
        location_term: canonical vocabulary term of its location, or None.
        region: a region without a vocabulary term ("pleura"), or None.
        side: "left", "right", "bilateral" or None.
        size_mm: the stated size per axis, in mm (empty if none).
        uncertain: the finding is hedged ("cannot be excluded").
        anatomy: the sentence names one structure and nothing else ("The right lower lobe of the
            lung.", "the abdominal aorta"), or the enlargement of a whole organ ("Hepatomegaly.",
            "The spleen is enlarged."; a non-focal finding whose mask is the organ): it is
            grounded to that structure, by the anatomy model's answer for ``location_term`` (the
            gate's query, undilated), not by the sentence head, which learnt focal findings.
        normal: the sentence holds no finding and says that what it names is normal ("The liver
            is normal.", "Unremarkable pancreas.", "within normal limits"): NegBio's and the
            CheXpert labeler's negation patterns read "X is normal/unremarkable" as X negated,
            so it is ``negated`` too (no mask), and reported as a normal statement.
    """

    text: str
    negated: bool = False
    finding_type: str | None = None
    location_term: str | None = None
    region: str | None = None
    side: str | None = None
    size_mm: tuple[float, ...] = ()
    uncertain: bool = False
    anatomy: bool = False
    normal: bool = False

    @property
    def location(self) -> str | None:
        """The location conditioning text (:func:`location_text`), or None."""
        return location_text(self.location_term, self.side)

    def to_dict(self) -> dict:
        return {"negated": self.negated, "finding_type": self.finding_type, "location_term": self.location_term,
                "region": self.region, "side": self.side, "size_mm": list(self.size_mm), "uncertain": self.uncertain,
                "anatomy": self.anatomy, "normal": self.normal}


def location_text(location_term: str | None, side: str | None = None) -> str | None:
    """The text embedded for a location: the canonical vocabulary term, exactly what ``volumed
    segment`` embeds for that structure ("lung_lower_lobe_right", "liver"), so that the anatomy
    decoder knows it; None without a term. ``side`` is not added: it stays in the sentence."""
    return location_term or None


def finding_queries(sentences: Sequence[str] = (), report: str | None = None) -> list[FindingQuery]:
    """Queries of the given finding sentences, then of a report's findings.

    Each ``sentences`` item is one query, whatever it holds; it is negated when the parser finds
    findings in it and every one is negated. A ``report`` is split into sentences and clauses
    (:func:`volumed.text.reports.parse_report`); each clause that holds a finding is a query, and
    clauses without one (technique, "The spleen is normal in size.") are skipped.

    Raises:
        ReportTextError (a ConfigError): an empty or non-English sentence, an empty report.
        ConfigError: neither sentences nor a report.
    """
    from volumed.text.reports import parse_report, parse_sentence

    sentences = [sentences] if isinstance(sentences, str) else list(sentences)
    if not sentences and not (report and report.strip()):
        raise ConfigError("give at least one finding sentence (--finding) or a report (--report)", "findings")
    out: list[FindingQuery] = []
    for text in sentences:
        parsed = parse_sentence(text)
        out.append(_query(text.strip(), [f for f in parsed.findings]))
    if report is not None:
        parsed_report = parse_report(report)
        for sentence in parsed_report.sentences:
            by_phrase: dict[tuple[int, int], list] = {}
            for f in sentence.findings:
                by_phrase.setdefault((f.phrase.start, f.phrase.end), []).append(f)
            if len(by_phrase) == 1:
                out.append(_query(sentence.text.strip(), next(iter(by_phrase.values()))))
            else:
                out.extend(_query(fs[0].text.strip(), fs) for fs in by_phrase.values())
    return out


#: Words an anatomy sentence may hold besides its one structure ("The right lower lobe of the lung.").
_ANATOMY_FILLER = frozenset({"the", "a", "an", "of", "in", "its", "whole", "entire", "structure", "organ", "region"})


#: A statement of normality (the CheXpert labeler's "normal|unremarkable" negation lemmas, and
#: "within normal limits" / "no abnormality"); "abnormal" does not match.
_NORMAL = re.compile(r"\b(?:normal|unremarkable|no\s+(?:\w+\s+)?abnormalit(?:y|ies))\b", re.IGNORECASE)


def _anatomy_query(text: str) -> FindingQuery:
    """For ``text`` holding no finding: a normal statement (negated, no mask) when it says what it
    names is normal; an anatomy query when it names exactly one vocabulary structure and
    otherwise only filler words; else a free query without a location."""
    from volumed.text.reports import find_locations

    locations = find_locations(text)
    if _NORMAL.search(text):
        loc = locations[0] if len(locations) == 1 else None
        return FindingQuery(text, negated=True, normal=True, location_term=loc.term if loc else None,
                            side=loc.side if loc else None)
    if len(locations) != 1 or locations[0].term is None:
        return FindingQuery(text)
    loc = locations[0]
    rest = text[: loc.span.start] + " " + text[loc.span.end :]
    if any(w not in _ANATOMY_FILLER for w in re.findall(r"[a-z]+", rest.lower())):
        return FindingQuery(text)
    return FindingQuery(text, location_term=loc.term, side=loc.side, anatomy=True)


#: An enlargement of a whole organ ("Hepatomegaly.", "The spleen is enlarged."), not an aneurysm,
#: and of an organ whose mask is the finding (not "enlargement of the pulmonary conus", a vessel
#: segment the parser places in the lung, nor a duct "in" the pancreas).
_ORGAN_ENLARGEMENT = re.compile(r"megal|enlarg", re.IGNORECASE)
_ENLARGEABLE_ORGANS = frozenset({"liver", "spleen", "heart", "kidney", "kidney_left", "kidney_right", "thyroid_gland",
                                 "prostate", "adrenal_gland_left", "adrenal_gland_right"})


def _query(text: str, findings: Sequence) -> FindingQuery:
    if not findings:
        return _anatomy_query(text)
    positive = [f for f in findings if not f.negated]
    f = positive[0] if positive else findings[0]
    # The mask of an enlarged organ is the organ (a non-focal finding): answered as an anatomy
    # sentence, by the segmenter, not by the finding head, which learnt focal lesions.
    whole_organ = (bool(positive) and f.finding_type == "enlargement" and f.location_term in _ENLARGEABLE_ORGANS
                   and _ORGAN_ENLARGEMENT.search(f.span.text) is not None)
    return FindingQuery(text, negated=not positive, finding_type=f.finding_type, location_term=f.location_term,
                        region=f.region, side=f.side, size_mm=tuple(f.size_mm), uncertain=bool(f.uncertain),
                        anatomy=whole_organ)


# ------------------------------------------------------------------------------------ network


class LocationConditioning(nn.Module):
    """``q = W_l l + W_s s`` for queries with a location, ``q = s + e_none`` for those without.

    Args:
        text_dim: D, the text embedding size.
        sentence_weight: ``W_s`` starts as this times the identity (``W_l`` as the identity,
            ``e_none`` at zero); see the module docstring.

    ``forward(sentence (N, D), location (N, D), has_location (N,) bool) -> (N, D)``.
    """

    def __init__(self, text_dim: int, sentence_weight: float = 1.0):
        super().__init__()
        self.location_proj = nn.Linear(text_dim, text_dim)
        self.sentence_proj = nn.Linear(text_dim, text_dim)
        with torch.no_grad():
            for proj, gain in ((self.location_proj, 1.0), (self.sentence_proj, float(sentence_weight))):
                proj.weight.copy_(torch.eye(text_dim) * gain)
                proj.bias.zero_()
        self.no_location = nn.Parameter(torch.zeros(text_dim))

    def forward(self, sentence: torch.Tensor, location: torch.Tensor, has_location: torch.Tensor) -> torch.Tensor:
        if sentence.ndim != 2 or location.shape != sentence.shape or has_location.shape != sentence.shape[:1]:
            raise ConfigError(f"LocationConditioning: expected sentence and location (N, D) and has_location (N,), got "
                              f"{tuple(sentence.shape)}, {tuple(location.shape)}, {tuple(has_location.shape)}")
        has = has_location.to(sentence.dtype)[:, None]
        with_location = self.location_proj(location) + self.sentence_proj(sentence)
        return has * with_location + (1 - has) * (sentence + self.no_location)


class GroundingModel(TextPromptedSegmenter):
    """A :class:`TextPromptedSegmenter` whose queries are location-conditioned finding sentences,
    gated by their location's organ (see the module docstring).

    Args:
        segmenter: the :class:`~volumed.heads.promptseg.PromptSegmenter`.
        text_dim: D.
        sentence_weight: initial weight of the sentence in the query (:class:`LocationConditioning`).
        gate_kernel: the location gate's dilation (odd, voxels of the model grid; 1: none).

    ``forward(image (B, C, X, Y, Z), sentence (N, D), location (N, D), has_location (N,), modality)``
    -> gated logits ``(B, N, X, Y, Z)``.
    """

    def __init__(self, segmenter, text_dim: int, sentence_weight: float = 1.0, gate_kernel: int = 9):
        super().__init__(segmenter, text_dim)
        if int(gate_kernel) < 1 or int(gate_kernel) % 2 == 0:
            raise ConfigError(f"GroundingModel: gate_kernel must be a positive odd number, got {gate_kernel!r}")
        self.location = LocationConditioning(text_dim, sentence_weight)
        self.gate_kernel = int(gate_kernel)

    def queries(self, sentence: torch.Tensor, location: torch.Tensor, has_location: torch.Tensor,
                modality: str = "CT") -> torch.Tensor:
        """``(2N, D)``: the N modality- and location-conditioned sentence queries, then the N
        location (gate) queries."""
        q = self.condition(self.location(sentence, location, has_location), modality)
        return torch.cat([q, self.condition(location, modality)], dim=0)

    def gate(self, logits: torch.Tensor, has_location: torch.Tensor, anatomy: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` ``(B, 2N, ...)`` (sentence queries, then gate queries) -> gated ``(B, N, ...)``.
        ``has_location`` ``(N,)`` or ``(B, N)``. ``anatomy`` ``(N,)`` or ``(B, N)`` bool: those
        channels are the location query's own logits, undilated and with their gradient (an
        anatomy sentence is its structure; training on it teaches the gate where the organ is)."""
        n = logits.shape[1] // 2
        if anatomy is not None and bool(anatomy.any()):
            gated = self.gate(logits, has_location)
            pick = anatomy.to(torch.bool)
            pick = pick[None] if pick.ndim == 1 else pick
            return torch.where(pick[:, :, None, None, None], logits[:, n:], gated)
        # The gate is the anatomy model's answer and gets no gradient: otherwise the cheapest way
        # to say "nothing" for an absent sentence is to close the gate (forget the organ), after
        # which no finding in that organ can be found either.
        a, b = logits[:, :n], logits[:, n:].detach()
        if self.gate_kernel > 1:
            b = F.max_pool3d(b, self.gate_kernel, stride=1, padding=self.gate_kernel // 2)
        has = has_location.to(a.dtype)
        has = has[None] if has.ndim == 1 else has
        return a + has[:, :, None, None, None] * F.logsigmoid(b)

    def forward(self, image: torch.Tensor, sentence: torch.Tensor, location: torch.Tensor,  # type: ignore[override]
                has_location: torch.Tensor, modality: str = "CT") -> torch.Tensor:
        logits = self.segmenter(image, self.queries(sentence, location, has_location, modality))
        return self.gate(logits, has_location)


class GatedSegmenter(nn.Module):
    """The segmenter as the shared sliding-window predictor calls it (``(window, queries) ->
    logits``), with the location gate applied: ``queries`` are :meth:`GroundingModel.queries`
    (2N rows), the output has N channels. ``decoder`` is the wrapped decoder's."""

    def __init__(self, model: GroundingModel, has_location: torch.Tensor, anatomy: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("has_location", has_location.to(torch.bool), persistent=False)
        self.register_buffer("anatomy", torch.zeros_like(self.has_location) if anatomy is None else anatomy.to(torch.bool),
                             persistent=False)

    @property
    def decoder(self):
        return self.model.segmenter.decoder

    def forward(self, image: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return self.model.gate(self.model.segmenter(image, queries), self.has_location, self.anatomy)


@dataclass
class GroundingConfig:
    """What ``grounding.json`` records (the network and preprocessing are in ``config.json``).

    Attributes:
        conditioning: how the location enters the query; ``"add"`` (:class:`LocationConditioning`).
        gate_kernel: the location gate's dilation, voxels of the model grid (:class:`GroundingModel`).
        finding_types: finding types seen in training (others are grounded, and flagged).
        locations: location terms seen in training.
        min_instance_voxels: components smaller than this are dropped from a mask (0: keep all).
        version: format version.
        training, metrics: the recipe and the held-out scores, for the record.
    """

    conditioning: str = "add"
    gate_kernel: int = 9
    finding_types: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    min_instance_voxels: int = 0
    version: str = "0.1.0"
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: Path | None = None) -> GroundingConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"bad grounding config: unknown keys {unknown}", where)
        if data.get("conditioning", "add") != "add":
            raise ConfigError(f"bad grounding config: conditioning must be 'add', got {data['conditioning']!r}", where)
        return cls(**data)


def build_grounding_model(config: PromptSegConfig, sentence_weight: float = 1.0, gate_kernel: int = 9) -> GroundingModel:
    """The untrained grounding network for the segmenter described by ``config``."""
    return GroundingModel(build_segmenter(config), config.text_dim, sentence_weight, gate_kernel)


def is_grounding_package(path: str | Path) -> bool:
    return (Path(path) / GROUNDING_CONFIG_NAME).is_file()


def save_grounding_package(model: GroundingModel, config: PromptSegConfig, grounding: GroundingConfig,
                           out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``config.json``, ``grounding.json`` and ``model.safetensors`` (atomically; refuses to
    overwrite unless ``overwrite``)."""
    from volumed.encoders.weights import save_weights
    from volumed.io.atomic import atomic_write_text, check_writable

    out = Path(out_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME, GROUNDING_CONFIG_NAME):
        check_writable(out / name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS_NAME, overwrite=overwrite)
    atomic_write_text(out / CONFIG_NAME, config.to_json() + "\n", overwrite=overwrite)
    atomic_write_text(out / GROUNDING_CONFIG_NAME, json.dumps(asdict(grounding), indent=2, sort_keys=True) + "\n",
                      overwrite=overwrite)
    return out


def read_grounding_config(model_dir: str | Path) -> GroundingConfig:
    """``model_dir/grounding.json``, what makes a package folder a grounding package.

    Raises:
        ConfigError: no ``grounding.json`` (a segmentation model folder), or an unreadable one.
    """
    root = Path(model_dir)
    path = root / GROUNDING_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"not a grounding model folder: {GROUNDING_CONFIG_NAME} is missing (a `volumed segment` "
                          "model cannot ground sentences; train one with `volumed train ground`)", root)
    try:
        return GroundingConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"unreadable grounding config ({err})", path) from err


def load_grounding_package(path: str | Path) -> tuple[GroundingModel, PromptSegConfig, GroundingConfig]:
    """Rebuild and load a grounding package (strict: every key must fit).

    Raises:
        ConfigError: not a grounding package (no ``grounding.json``: a segmentation model folder),
            or an unreadable config. WeightsLoadError: missing weights or keys that do not fit.
    """
    from volumed.encoders.weights import load_encoder_weights

    root = Path(path)
    grounding = read_grounding_config(root)
    config = read_config(root)
    if not (root / WEIGHTS_NAME).is_file():
        raise WeightsLoadError(f"{WEIGHTS_NAME} is missing", root)
    model = build_grounding_model(config, gate_kernel=grounding.gate_kernel)
    load_encoder_weights(model, root / WEIGHTS_NAME, key_map=None, strict=True)
    return model.eval(), config, grounding


# ------------------------------------------------------------------------------------ instances


@dataclass(frozen=True)
class Instance:
    """One 26-connected component of a grounded mask.

    Attributes:
        index: 1-based, largest first.
        voxels: its voxel count; volume_ml: its volume in mL.
        center_voxel: its centroid (voxel indices, float); center_ras: the same in RAS mm.
        bbox_voxel: ``((x0, x1), (y0, y1), (z0, z1))``, end exclusive.
        confidence: mean probability inside it (None when no probabilities were given).
    """

    index: int
    voxels: int
    volume_ml: float
    center_voxel: tuple[float, float, float]
    center_ras: tuple[float, float, float]
    bbox_voxel: tuple[tuple[int, int], ...]
    confidence: float | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def connected_instances(mask: np.ndarray, affine: np.ndarray, probabilities: np.ndarray | None = None,
                        min_voxels: int = 0) -> tuple[list[Instance], np.ndarray]:
    """The 26-connected components of ``mask`` ``(X, Y, Z)`` as instances, largest first.

    Args:
        mask: bool mask on a grid with the 4x4 voxel-to-RAS ``affine``.
        probabilities: optional ``(X, Y, Z)`` float, for each instance's confidence.
        min_voxels: components with fewer voxels are dropped (and cleared in the returned mask).

    Returns:
        ``(instances, kept_mask)``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ConfigError(f"connected_instances: mask must be 3D, got shape {mask.shape}")
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return [], mask
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    order = [int(i) for i in np.argsort(-sizes[1:], kind="stable") + 1 if sizes[i] >= max(1, min_voxels)]
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    objects = ndimage.find_objects(labels)
    kept = np.isin(labels, order) if len(order) < n else mask
    out = []
    for rank, i in enumerate(order, start=1):
        box = objects[i - 1]
        local = labels[box] == i
        idx = np.argwhere(local) + np.array([s.start for s in box])
        center = idx.mean(0)
        ras = (np.asarray(affine, dtype=np.float64) @ np.append(center, 1.0))[:3]
        conf = float(probabilities[box][local].mean()) if probabilities is not None else None
        out.append(Instance(rank, int(sizes[i]), int(sizes[i]) * voxel_ml, tuple(float(c) for c in center),
                            tuple(float(c) for c in ras), tuple((s.start, s.stop) for s in box), conf))
    return out, kept
