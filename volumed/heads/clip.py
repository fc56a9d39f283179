"""CT-CLIP head: a volume and its report in one embedding space, and zero-shot findings from it.

Hamamci et al., "Developing Generalist Foundation Models from a Multimodal Dataset for 3D Computed
Tomography" (CT-CLIP, 2024). An independent implementation of its contrastive head on volumed's
encoders and text stack::

    volume (B, 1, X, Y, Z) in [0, 1] ──registry encoder (CT-ViT by default)──▶ last feature map
        ──mean over its tokens──▶ pooled (B, C) ──visual_projection (C -> E, no bias)──▶ L2-norm ─┐
                                                                                                 ├─▶ logits = s · v tᵀ (B, N)
    report ──frozen TextEncoder, sentence-averaged (report_embedding)──▶ (N, D)                  │
        ──text_projection (D -> E, no bias, or a small MLP)──▶ L2-norm ─────────────────────────┘

    s = exp(logit_scale), learned, started at 1 / 0.07 and clamped to at most 100 (CLIP's rule)
    loss = (CE(logits, targets) + CE(logitsᵀ, targets)) / 2     symmetric InfoNCE

Targets: pair ``i`` is the positive of row ``i``. Two cases of a batch with the very same report
text (two normal phantoms, two "No acute findings." reports) are each other's positives too: the
target row is uniform over the cases with the same text, rather than teaching the model to tell
apart reports that say the same.

**Zero-shot classification** (CT-CLIP's protocol): for a finding X, the prompts "X is present."
and "X is not present." are embedded; the probability that the volume holds X is the softmax of
``s · cos(volume, present)`` against ``s · cos(volume, absent)``. Any finding name works; the 18
CT-RATE abnormalities (:data:`volumed.text.labels.ABNORMALITIES`) are the default list.

**Memory.** A volume larger than the encoder's input (``input_size``) is tiled with MONAI's
:func:`monai.data.utils.dense_patch_slices`; tiles are encoded ``sw_batch_size`` at a time, and
their pooled features are averaged (:func:`embed_volume`), so memory is that of one batch of
tiles whatever the volume's size. With mean pooling, and a volume whose size is a multiple of the
tile, this average is the mean over all tokens of the volume, as for a volume that fits (otherwise
the last tile, flush with the edge, overlaps its neighbour and those tokens count twice). A smaller volume is padded with 0
(air after the CT window) up to ``input_size``. Reports: see :func:`report_embedding`.

Differences from CT-CLIP's code, on purpose: the text encoder is frozen (MiniLM, offline) and only
a projection is learned, where CT-CLIP fine-tunes CXR-BERT; the visual embedding is a mean over
tokens (CT-CLIP flattens a fixed 24 x 24 token grid into a linear layer, which ties it to one
input size and rules out tiling).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from volumed.encoders.registry import create_encoder
from volumed.errors import ConfigError, ReportTextError, WeightsLoadError

__all__ = [
    "CLIP_CONFIG_NAME",
    "ClipConfig",
    "VolumeTextCLIP",
    "ZeroShotPrompts",
    "build_clip_model",
    "clip_loss",
    "clip_targets",
    "embed_volume",
    "load_clip_package",
    "NEGATION_MODES",
    "NO_FINDING_TEXT",
    "prompt_pair_embeddings",
    "report_embedding",
    "report_sentences",
    "save_clip_package",
    "zero_shot_prompts",
    "zero_shot_probabilities",
]

CLIP_CONFIG_NAME = "clip.json"
WEIGHTS_NAME = "model.safetensors"
#: CLIP's cap on the learned logit scale (a temperature of at least 0.01).
MAX_LOGIT_SCALE = 100.0
CLIP_POOLINGS = ("mean", "max")


class VolumeTextCLIP(nn.Module):
    """Volume encoder + visual and text projections + learned temperature.

    Args:
        encoder: a registry preset (:func:`volumed.encoders.create_encoder`), e.g. ``"ctvit_base"``.
        encoder_kwargs: overrides of the preset (``{"dim": 64, "patch_size": 8}``).
        text_dim: D, the frozen text embedding size (384 for MiniLM).
        embed_dim: E, the shared embedding size.
        text_hidden: 0 for a linear text projection (CT-CLIP's); > 0 for ``Linear-GELU-Linear``
            with that hidden width (more room, since the text encoder itself is frozen).
        in_channels: image channels.
        init_temperature: start of the temperature (CLIP: 0.07).
        max_logit_scale: the clamp on ``exp(logit_scale)``.
        pooling: ``"mean"`` over the feature map's tokens (CT-CLIP's choice: the whole volume) or
            ``"max"`` (a small focal finding, a nodule, is a few tokens that a mean dilutes).
        feature_level: which of the encoder's maps is pooled (``-1``: the deepest; ``1``: a finer
            one, where a small lesion still has its own voxels).
    """

    def __init__(
        self,
        encoder: str = "ctvit_tiny",
        encoder_kwargs: dict | None = None,
        text_dim: int = 384,
        embed_dim: int = 256,
        text_hidden: int = 0,
        in_channels: int = 1,
        init_temperature: float = 0.07,
        max_logit_scale: float = MAX_LOGIT_SCALE,
        pooling: str = "mean",
        feature_level: int = -1,
    ) -> None:
        super().__init__()
        if pooling not in CLIP_POOLINGS:
            raise ConfigError(f"VolumeTextCLIP: pooling must be one of {', '.join(CLIP_POOLINGS)}, got {pooling!r}")
        if embed_dim < 1 or text_dim < 1 or text_hidden < 0:
            raise ConfigError(f"VolumeTextCLIP: embed_dim and text_dim must be >= 1 and text_hidden >= 0, "
                              f"got {embed_dim}, {text_dim}, {text_hidden}")
        if not 0.0 < init_temperature <= 1.0 or max_logit_scale < 1.0:
            raise ConfigError(f"VolumeTextCLIP: init_temperature in (0, 1] and max_logit_scale >= 1, "
                              f"got {init_temperature}, {max_logit_scale}")
        self.encoder = create_encoder(encoder, in_channels=in_channels, **dict(encoder_kwargs or {}))
        info = self.encoder.feature_info
        try:
            feature_dim = int(info[int(feature_level)].channels)
        except IndexError:
            raise ConfigError(f"VolumeTextCLIP: feature_level {feature_level} out of range: the encoder "
                              f"{encoder!r} returns {len(info)} maps") from None
        self.pooling, self.feature_level = pooling, int(feature_level)
        self.visual_projection = nn.Linear(feature_dim, embed_dim, bias=False)
        if text_hidden:
            self.text_projection: nn.Module = nn.Sequential(
                nn.Linear(text_dim, text_hidden), nn.GELU(), nn.Linear(text_hidden, embed_dim, bias=False))
        else:
            self.text_projection = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = float(max_logit_scale)
        self.feature_dim = feature_dim
        self.text_dim = int(text_dim)

    def pooled_features(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, X, Y, Z)`` -> ``(B, feature_dim)``: the mean (or the maximum, with
        ``pooling="max"``) of the encoder's map ``feature_level`` over its tokens (mean of the
        last map: for CT-ViT exactly ``CTViTOutput.pooled``)."""
        feature = self.encoder(image)[self.feature_level]
        if self.pooling == "max":
            return feature.amax(dim=(2, 3, 4))
        return feature.mean(dim=(2, 3, 4))

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, feature_dim)`` -> unit-norm volume embeddings ``(B, E)``."""
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, X, Y, Z)`` -> unit-norm ``(B, E)`` (the volume must fit the encoder; see :func:`embed_volume`)."""
        return self.embed_pooled(self.pooled_features(image))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """Frozen text embeddings ``(N, D)`` -> unit-norm ``(N, E)``."""
        if text.ndim != 2 or text.shape[1] != self.text_dim:
            raise ConfigError(f"text embeddings must be (N, {self.text_dim}), got {tuple(text.shape)}")
        return F.normalize(self.text_projection(text), dim=-1)

    @property
    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped to ``[1, max_logit_scale]`` (a scalar tensor)."""
        return self.logit_scale.clamp(0.0, math.log(self.max_logit_scale)).exp()

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``image`` ``(B, C, X, Y, Z)``, ``text`` ``(N, D)`` -> logits ``(B, N)``."""
        return self.scale * self.embed_image(image) @ self.embed_text(text).t()


def clip_targets(texts: Sequence[str] | None, n: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n, n)`` target distribution: row ``i`` uniform over the pairs whose report equals report ``i``
    (the identity when all differ, or when ``texts`` is None)."""
    if texts is None:
        return torch.eye(n, device=device)
    if len(texts) != n:
        raise ConfigError(f"clip_targets: {len(texts)} texts for {n} pairs")
    ids = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    group = torch.tensor([ids[t] for t in texts], device=device)
    same = (group[:, None] == group[None, :]).float()
    return same / same.sum(1, keepdim=True)


def clip_loss(logits: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of square ``logits`` ``(B, B)`` (rows: volumes, columns: reports).

    ``targets`` ``(B, B)``: rows are probability distributions (:func:`clip_targets`); None is the
    identity. The target matrix is symmetric, so the same one serves both directions.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ConfigError(f"clip_loss needs square logits (B, B), got {tuple(logits.shape)}")
    if targets is None:
        targets = torch.eye(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))


# ------------------------------------------------------------------------------------ zero-shot


@dataclass(frozen=True)
class ZeroShotPrompts:
    """A finding and its prompt pair (CT-CLIP's wording)."""

    finding: str
    present: str
    absent: str


def zero_shot_prompts(findings: Sequence[str]) -> list[ZeroShotPrompts]:
    """``"X is present."`` / ``"X is not present."`` for each finding (duplicates dropped, order kept).

    Raises:
        ReportTextError: an empty finding name.
    """
    out, seen = [], set()
    for name in findings:
        if not isinstance(name, str) or not name.strip():
            raise ReportTextError(f"empty finding name {name!r}; name a finding, e.g. 'Pleural effusion'")
        clean = " ".join(name.split()).rstrip(".")
        if clean.lower() in seen:
            continue
        seen.add(clean.lower())
        out.append(ZeroShotPrompts(clean, f"{clean} is present.", f"{clean} is not present."))
    return out


def zero_shot_probabilities(image_embedding: torch.Tensor, present: torch.Tensor, absent: torch.Tensor,
                            scale: torch.Tensor | float) -> torch.Tensor:
    """Probability of each finding: softmax over (present, absent) of the scaled cosines.

    Args:
        image_embedding: unit-norm ``(B, E)``.
        present, absent: unit-norm ``(F, E)`` embeddings of the prompt pairs.
        scale: the model's logit scale.

    Returns:
        ``(B, F)`` in ``[0, 1]``.
    """
    logits = torch.stack([image_embedding @ present.t(), image_embedding @ absent.t()], dim=-1) * scale
    return logits.softmax(dim=-1)[..., 0]


# ------------------------------------------------------------------------------------ memory


@torch.no_grad()
def embed_volume(model: VolumeTextCLIP, image: torch.Tensor, input_size: Sequence[int], *, overlap: float = 0.0,
                 sw_batch_size: int = 1) -> tuple[torch.Tensor, int]:
    """Unit-norm embedding ``(E,)`` of one model-space volume of any size, and the number of tiles.

    ``image`` ``(C, X, Y, Z)``: padded with 0 up to ``input_size`` where smaller, then tiled with
    ``input_size`` tiles (MONAI's :func:`monai.data.utils.dense_patch_slices`, interval
    ``input_size * (1 - overlap)``, the last tile flush with the edge); tile features are pooled by
    the encoder and averaged (their maximum, for a model with ``pooling="max"``: then the result is
    the maximum over every token of the volume), then projected. Peak memory: ``sw_batch_size`` tiles.
    """
    from monai.data.utils import dense_patch_slices

    if image.ndim != 4:
        raise ConfigError(f"embed_volume takes one volume (C, X, Y, Z), got shape {tuple(image.shape)}")
    roi = tuple(int(s) for s in input_size)
    if len(roi) != 3 or min(roi) < 1 or not 0.0 <= float(overlap) < 1.0 or int(sw_batch_size) < 1:
        raise ConfigError(f"embed_volume: input_size needs 3 sizes, overlap in [0, 1), sw_batch_size >= 1; "
                          f"got {input_size}, {overlap}, {sw_batch_size}")
    pad = [max(r - s, 0) for r, s in zip(roi, image.shape[1:])]
    if any(pad):
        image = F.pad(image, [v for p in reversed(pad) for v in (p // 2, p - p // 2)], value=0.0)
    size = tuple(int(s) for s in image.shape[1:])
    interval = tuple(max(1, int(r * (1.0 - float(overlap)))) for r in roi)
    slices = dense_patch_slices(size, roi, interval)
    device = next(model.parameters()).device
    use_max = getattr(model, "pooling", "mean") == "max"
    total = torch.full((model.feature_dim,), -math.inf if use_max else 0.0, dtype=torch.float64, device=device)
    for start in range(0, len(slices), int(sw_batch_size)):
        batch = torch.stack([image[(slice(None), *s)] for s in slices[start : start + int(sw_batch_size)]]).to(device)
        features = model.pooled_features(batch.float()).double()
        total = torch.maximum(total, features.amax(0)) if use_max else total + features.sum(0)
    pooled = (total if use_max else total / len(slices)).float()[None]
    return model.embed_pooled(pooled)[0], len(slices)


def report_sentences(text: str, max_words: int | None = None) -> list[str]:
    """The sentences of a report that :func:`report_embedding` embeds: split by
    :func:`volumed.text.sentences.split_sentences`, kept while the running word count stays within
    ``max_words`` (default :data:`volumed.text.reports.DEFAULT_MAX_WORDS`, 2000; a first sentence
    longer than that is kept alone).

    Raises:
        ReportTextError: an empty report, or one with no words.
    """
    from volumed.text.reports import DEFAULT_MAX_WORDS
    from volumed.text.sentences import split_sentences

    if not isinstance(text, str) or not text.strip():
        raise ReportTextError(f"empty report {text!r}: there is nothing to embed")
    limit = DEFAULT_MAX_WORDS if max_words is None else int(max_words)
    if limit < 1:
        raise ReportTextError(f"max_words must be at least 1, got {max_words}")
    kept, words = [], 0
    for span in split_sentences(text):
        n = len(span.text.split())
        if kept and words + n > limit:
            break
        kept.append(span.text)
        words += n
    if not kept:
        raise ReportTextError(f"report {text[:80]!r} holds no sentence")
    return kept


#: What a report with nothing left to embed (every sentence negated) is embedded as, under
#: ``negated="drop"``: one shared point, so a normal report and an absent prompt coincide.
NO_FINDING_TEXT = "No abnormality."

#: How negated sentences enter a text embedding (:func:`report_embedding`).
NEGATION_MODES = ("keep", "drop")


def _all_negated(sentence: str) -> bool:
    """Whether every finding of ``sentence`` is negated (the CheXpert/NegBio patterns of
    :func:`volumed.text.reports.parse_sentence`); a sentence without a finding the parser knows
    is not."""
    from volumed.text.reports import parse_sentence

    findings = parse_sentence(sentence).findings
    return bool(findings) and all(f.negated for f in findings)


def report_embedding(encoder, texts: Sequence[str], *, max_words: int | None = None,
                     negated: str = "keep") -> torch.Tensor:
    """Frozen text embeddings ``(N, D)`` of reports, by the truncation policy of the CLIP head.

    Policy: a report is split into sentences (:func:`report_sentences`: at most ``max_words``
    words, default 2000, whole sentences); each sentence is embedded by the text encoder, which
    truncates a sentence beyond its token limit (``encoder.max_length``, 256 word pieces for
    MiniLM: only a run-on "sentence" of about 200 words loses its tail); the report's embedding is
    the mean of its sentence embeddings, L2-normalised. So every sentence of a report of ordinary
    length counts, whereas embedding the report as one text would silently keep its first 256
    word pieces only (about 180 words: the findings of a long report would be lost). A
    10,000-word report is embedded from its first 2000 words' sentences, in batches of the
    encoder's ``batch_size``: time and memory are bounded. Identical sentences (normal findings
    that recur across reports) are embedded once.

    ``negated="drop"`` leaves out the sentences whose findings are all negated ("No lung
    nodule.", "Pleural effusion is not present."), and embeds a report left with none as
    :data:`NO_FINDING_TEXT`. A frozen sentence encoder hardly tells "No lung nodule." from
    "Lung nodule is present." (the same words), so with ``"keep"`` the zero-shot prompt pair of a
    finding lies on the wrong side of what training aligned the images with (docs/clip.md). With
    ``"drop"`` every normal report and every "X is not present." prompt embed as the same point,
    and a positive prompt lies among the reports that state the finding. Zero-shot prompts go
    through this function too (one-sentence reports), so the two sides always match.
    """
    if negated not in NEGATION_MODES:
        raise ConfigError(f"negated must be one of {NEGATION_MODES}, got {negated!r}")
    per_report = [report_sentences(t, max_words) for t in texts]
    if negated == "drop":
        # Each distinct sentence is parsed once (normal sentences recur across reports).
        dropped = {s for s in dict.fromkeys(s for sentences in per_report for s in sentences) if _all_negated(s)}
        per_report = [[s for s in sentences if s not in dropped] or [NO_FINDING_TEXT] for sentences in per_report]
    unique = list(dict.fromkeys(s for sentences in per_report for s in sentences))
    if not unique:
        return torch.empty(0, encoder.dim)
    table = encoder.encode(unique)
    index = {s: k for k, s in enumerate(unique)}
    rows = [table[[index[s] for s in sentences]].mean(0) for sentences in per_report]
    return F.normalize(torch.stack(rows), dim=-1)


def prompt_pair_embeddings(encoder, findings: Sequence[str], negated: str = "keep") -> tuple[list[ZeroShotPrompts], torch.Tensor, torch.Tensor]:
    """``(prompts, present (F, D), absent (F, D))``: each finding's prompt pair
    (:func:`zero_shot_prompts`), embedded as one-sentence reports by :func:`report_embedding`
    (``negated`` as the package's ``clip.json`` says), so prompts and training reports always
    share one text path: training validation, ``volumed classify`` and the bundle's runner."""
    prompts = zero_shot_prompts(findings)
    present = report_embedding(encoder, [p.present for p in prompts], negated=negated)
    absent = report_embedding(encoder, [p.absent for p in prompts], negated=negated)
    return prompts, present, absent


# ------------------------------------------------------------------------------------ package


@dataclass
class ClipConfig:
    """What ``clip.json`` records: the network, the text model, the preprocessing and the input size.

    Attributes:
        encoder, encoder_kwargs, embed_dim, text_hidden, in_channels, pooling, feature_level:
            :class:`VolumeTextCLIP` arguments.
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder; text_model_hash: its
            sha256, checked at load (other embeddings would mean nothing to the projection).
        text_dim: D.
        preprocessing: :class:`volumed.data.transforms.PreprocessConfig` fields.
        input_size: the encoder's input (model-space voxels); larger volumes are tiled.
        overlap: tile overlap for :func:`embed_volume`.
        findings: the default zero-shot findings (CT-RATE's 18 when empty).
        max_report_words: the report truncation (:func:`report_sentences`).
        negated: how negated sentences enter reports and prompts (:func:`report_embedding`);
            ``"keep"`` for packages written before the option existed.
        version, training, metrics: format version; the recipe and held-out scores, for the record.
    """

    encoder: str = "ctvit_tiny"
    encoder_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 256
    text_hidden: int = 0
    in_channels: int = 1
    pooling: str = "mean"
    feature_level: int = -1
    text_model: str = "default"
    text_model_hash: str = ""
    text_dim: int = 384
    preprocessing: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] = (40, 40, 100)
    overlap: float = 0.0
    findings: list[str] = field(default_factory=list)
    max_report_words: int = 2000
    negated: str = "keep"
    version: str = "0.1.0"
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: Path | None = None) -> ClipConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"bad CLIP config: unknown keys {unknown}", where)
        data = dict(data)
        if "input_size" in data:
            data["input_size"] = tuple(int(s) for s in data["input_size"])
            if len(data["input_size"]) != 3:
                raise ConfigError(f"bad CLIP config: input_size needs 3 sizes, got {data['input_size']}", where)
        if data.get("negated", "keep") not in NEGATION_MODES:
            raise ConfigError(f"bad CLIP config: negated must be one of {NEGATION_MODES}, got {data['negated']!r}", where)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def build_clip_model(config: ClipConfig) -> VolumeTextCLIP:
    """The untrained network described by ``config``."""
    return VolumeTextCLIP(config.encoder, config.encoder_kwargs, text_dim=config.text_dim, embed_dim=config.embed_dim,
                          text_hidden=config.text_hidden, in_channels=config.in_channels, pooling=config.pooling,
                          feature_level=config.feature_level)


def is_clip_package(path: str | Path) -> bool:
    return (Path(path) / CLIP_CONFIG_NAME).is_file()


def save_clip_package(model: VolumeTextCLIP, config: ClipConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``clip.json`` and ``model.safetensors`` (atomically; refuses to overwrite unless ``overwrite``)."""
    from volumed.encoders.weights import save_weights
    from volumed.io.atomic import atomic_write_text, check_writable

    out = Path(out_dir)
    for name in (CLIP_CONFIG_NAME, WEIGHTS_NAME):
        check_writable(out / name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS_NAME, overwrite=overwrite)
    atomic_write_text(out / CLIP_CONFIG_NAME, config.to_json() + "\n", overwrite=overwrite)
    return out


def read_clip_config(path: str | Path) -> ClipConfig:
    """``path/clip.json`` (cheap: no network is built).

    Raises:
        ConfigError: no ``clip.json`` (not a CLIP model folder) or an unreadable one.
    """
    root = Path(path)
    cpath = root / CLIP_CONFIG_NAME
    if not root.is_dir():
        raise ConfigError("model folder does not exist", root)
    if not cpath.is_file():
        raise ConfigError(f"not a CLIP model folder: {CLIP_CONFIG_NAME} is missing (train one with "
                          "`volumed train clip`)", root)
    try:
        return ClipConfig.from_dict(json.loads(cpath.read_text(encoding="utf-8")), cpath)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
        raise ConfigError(f"unreadable CLIP config ({err})", cpath) from err


def load_clip_package(path: str | Path) -> tuple[VolumeTextCLIP, ClipConfig]:
    """Rebuild and load a CLIP package (strict: every key must fit).

    Raises:
        ConfigError: see :func:`read_clip_config`. WeightsLoadError: missing weights or keys that do not fit.
    """
    from volumed.encoders.weights import load_encoder_weights

    root = Path(path)
    config = read_clip_config(root)
    if not (root / WEIGHTS_NAME).is_file():
        raise WeightsLoadError(f"{WEIGHTS_NAME} is missing", root)
    model = build_clip_model(config)
    load_encoder_weights(model, root / WEIGHTS_NAME, key_map=None, strict=True)
    return model.eval(), config

