"""One loader for pretrained weights and one checkpoint writer (timm's "weights in one place").

:func:`load_encoder_weights` puts the tensors of a checkpoint into a model and returns a
:class:`LoadReport` that lists what was loaded, missing, unexpected, shape-mismatched and
adapted. It accepts the checkpoints the field publishes, whatever their wrapping:

* files: ``.pt`` / ``.pth`` / ``.bin`` (``torch.save``), Lightning ``.ckpt``, ``.safetensors``, and
  a MONAI bundle folder (``models/model.pt``, else ``models/model.safetensors``). The format is
  recognised from the file's first bytes, not its suffix. PyTorch files are always read with
  ``torch.load(map_location="cpu", weights_only=True)``: a checkpoint can never run code, and one
  that holds pickled Python objects is refused with :class:`~volumed.errors.WeightsLoadError`;
* containers: the state dict is taken from the first of :data:`CONTAINER_KEYS` that holds a
  dict (``state_dict`` of Lightning, ``model`` of MONAI/timm training scripts, ``network_weights``
  of nnU-Net, ``student`` of self-distillation), repeatedly, until a flat ``{name: tensor}`` dict
  remains; ``container="teacher"`` (or any other key) picks a specific one;
* names: with ``key_map="auto"`` a prefix rule ``old -> new`` is searched that makes the most
  checkpoint names equal to model names (``module.`` of DDP, ``model.`` of Lightning,
  ``encoder.`` of a full segmentation network, ``swin_vit.`` / ``module.swinViT.`` of
  VoCo/MONAI Swin checkpoints, ...). A prefix is changed only when that increases the number of
  matching names, so a checkpoint that already fits is left alone; among rules that match
  equally many, the one leaving the fewest checkpoint keys unexpected wins, so the encoder part
  of a full network is selected and the rest reported as ``ignored``. Known renames between
  code bases (:data:`KNOWN_RENAMES`) are applied under the same rule.

Input-channel adaptation (``in_channels``): when the model's input convolution (its first
``*weight`` of >= 3 dims) differs from the checkpoint only in its input-channel dimension (dim 1),
say ``c -> C``, that weight and every other one differing only by the same ``c -> C`` in dim 1
(the other convolutions reading the input, such as a residual 1x1 shortcut) are adapted instead
of being reported as mismatched; see :func:`adapt_input_channels`. (A hidden layer whose input
width changed by exactly the image's ``c -> C`` would be taken for one too; encoder widths are
far from image channel counts.) Patch embeddings that flatten the channels into a linear layer
(CT-ViT) are not adapted: they are reported as mismatched.

:func:`save_weights` is the project's one checkpoint writer (``.pt``/``.pth``/``.safetensors``,
atomic, never overwriting unless asked).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union

import safetensors.torch
import torch
import torch.nn as nn

from volumed.errors import ConfigError, WeightsLoadError
from volumed.io.atomic import atomic_output

__all__ = [
    "CONTAINER_KEYS",
    "KNOWN_RENAMES",
    "Adaptation",
    "Checkpoint",
    "KeyRename",
    "LoadReport",
    "ShapeMismatch",
    "adapt_input_channels",
    "load_encoder_weights",
    "read_state_dict",
    "save_weights",
]

logger = logging.getLogger("volumed.encoders.weights")

InChannelsMode = Literal["repeat", "mean", "pad", "reinit"]
#: ``"auto"``, ``{old_prefix: new_prefix}``, a callable ``name -> new name`` (``None`` drops the
#: entry), or ``None`` for the names as they are.
KeyMap = Union[str, Mapping[str, str], Callable[[str], Union[str, None]], None]

#: Keys tried, in this order, to find the state dict inside a checkpoint dict: Lightning
#: (``state_dict``), MONAI SSL / timm / DINO-style training scripts (``model``), ``net``, nnU-Net
#: (``network_weights``), ``module``, then the student of a self-distillation checkpoint. A
#: ``teacher`` is never picked implicitly (pass ``container="teacher"``): which of the two to
#: use is a modelling decision, not a file-format detail.
CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "net", "network_weights", "module", "student")

_IN_CHANNEL_MODES = ("repeat", "mean", "pad", "reinit")
_KEY_MAP_KINDS = "key_map must be 'auto', a dict {old_prefix: new_prefix}, a callable or None"
_SAVE_SUFFIXES = (".pt", ".pth", ".safetensors")
# Prefix depths searched by key_map="auto": checkpoint prefixes like ``model.module.encoder.``
# (Lightning + DDP + full network) need 3 components; model-side prefixes are a wrapper's
# submodules (``swinViT.``), rarely deeper than 2.
_MAX_OLD_PREFIX_DEPTH = 4
_MAX_NEW_PREFIX_DEPTH = 3


@dataclass(frozen=True)
class KeyRename:
    """A renaming of checkpoint names between code bases, applied only when it helps.

    Attributes:
        pattern: regular expression searched in each checkpoint name.
        replacement: ``re.sub`` replacement.
        description: what the rename undoes, shown in the report.
    """

    pattern: re.Pattern
    replacement: str
    description: str

    def apply(self, key: str) -> str:
        return self.pattern.sub(self.replacement, key)


#: Renames ``key_map="auto"`` tries after the prefix search; each is kept only if it increases
#: the number of checkpoint names that match the model.
KNOWN_RENAMES: tuple[KeyRename, ...] = (
    # The original Swin UNETR / self-supervised Swin code (and timm) names the MLP layers fc1/fc2;
    # MONAI's SwinTransformer uses monai.networks.blocks.MLPBlock, whose layers are linear1/linear2
    # (MONAI's own SwinUNETR.load_from does this mapping by hand).
    KeyRename(re.compile(r"(^|\.)mlp\.fc([12])\."), r"\1mlp.linear\2.", "mlp.fcN -> mlp.linearN (Swin MLP naming)"),
    # MONAI's SSL/DAE SwinUNETR checkpoints hold one more level in the stage names
    # (``layers1.0.0.blocks``), see monai.networks.nets.swin_unetr.filter_swinunetr.
    KeyRename(re.compile(r"(^|\.)(layers[1-4])\.0\.0\."), r"\1\2.0.", "layersN.0.0. -> layersN.0. (MONAI DAE Swin)"),
)


class ShapeMismatch(NamedTuple):
    """A tensor present in both, with different shapes; it is not loaded."""

    key: str
    checkpoint_shape: tuple[int, ...]
    model_shape: tuple[int, ...]


class Adaptation(NamedTuple):
    """A tensor loaded (or deliberately left at its initialisation) after an adaptation."""

    key: str
    how: str


@dataclass
class LoadReport:
    """What :func:`load_encoder_weights` did; model keys unless stated otherwise.

    Attributes:
        source: the file read (``None`` when a state dict was passed).
        model_tensors: number of entries in the model's state dict.
        loaded: model keys filled from the checkpoint (adapted ones included).
        missing: model keys with no checkpoint entry; they keep the model's initialisation.
        unexpected: checkpoint keys (original names) that map to no model key.
        mismatched: keys present in both with different shapes; never loaded.
        adapted: input-channel adaptations (``repeat``/``mean`` are also in ``loaded``;
            ``reinit`` keeps the model's initialisation).
        ignored: checkpoint keys (original names) deliberately not used: outside the prefix the
            key map selected (the decoder of a full network when the model is its encoder),
            dropped by a callable key map, or not tensors.
        prefix_map: the prefix rules applied, ``{old: new}`` (empty: names used as they are).
        renames: descriptions of the renames applied on top of the prefix rules.
        container: the keys unwrapped to reach the state dict, e.g. ``("state_dict",)``.
    """

    source: Path | None
    model_tensors: int
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[ShapeMismatch] = field(default_factory=list)
    adapted: list[Adaptation] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    prefix_map: dict[str, str] = field(default_factory=dict)
    renames: list[str] = field(default_factory=list)
    container: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is missing, unexpected or mismatched (what ``strict=True`` demands)."""
        return not (self.missing or self.unexpected or self.mismatched)

    def format_table(self, max_rows: int = 20) -> str:
        """A plain-text table of the report; each list is cut after ``max_rows`` lines."""
        src = str(self.source) if self.source is not None else "<state dict>"
        if self.container:
            src += "  [" + "][".join(repr(c) for c in self.container) + "]"
        rules = ", ".join(f"{old!r} -> {new!r}" for old, new in self.prefix_map.items()) or "names used as they are"
        lines = [f"{'checkpoint':<12}{src}", f"{'key map':<12}{rules}"]
        lines += [f"{'':<12}rename {r}" for r in self.renames]
        lines.append(f"{'loaded':<12}{len(self.loaded)} of {self.model_tensors} model tensors")

        def section(title: str, rows: list[str], note: str = "") -> None:
            lines.append(f"{title:<12}{len(rows)}{note}")
            lines.extend(f"    {r}" for r in rows[:max_rows])
            if len(rows) > max_rows:
                lines.append(f"    ... and {len(rows) - max_rows} more")

        width = max((len(k) for k, *_ in [*self.adapted, *self.mismatched]), default=0)
        section("adapted", [f"{a.key:<{width}}  {a.how}" for a in self.adapted])
        section("missing", self.missing, "  (keep the model's initialisation)" if self.missing else "")
        mism = [
            f"{m.key:<{width}}  checkpoint {tuple(m.checkpoint_shape)}  model {tuple(m.model_shape)}"
            for m in self.mismatched
        ]
        section("mismatched", mism, "  (not loaded)" if mism else "")
        section("unexpected", self.unexpected)
        section("ignored", self.ignored, "  (not part of the selected weights)" if self.ignored else "")
        return "\n".join(lines)

    def problems(self, limit: int = 10) -> str:
        """One line naming the missing, unexpected and mismatched keys (``limit`` of each)."""
        mism = [
            f"{m.key} (checkpoint {tuple(m.checkpoint_shape)} vs model {tuple(m.model_shape)})" for m in self.mismatched
        ]
        parts = [
            f"{len(keys)} {what}: {_truncate(keys, limit)}"
            for what, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", mism))
            if keys
        ]
        return "; ".join(parts) or "none"


def _truncate(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _resolve_file(source: str | Path) -> Path:
    """The checkpoint file for ``source``; a folder is read as a MONAI bundle."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("model.pt", "model.safetensors"):
            if (path / "models" / name).is_file():
                return path / "models" / name
        hint = ""
        if (path / "models" / "model.ts").exists():
            hint = " (models/model.ts is TorchScript, which holds code; it is not read)"
        raise WeightsLoadError(
            f"a folder, but not a MONAI bundle with models/model.pt or models/model.safetensors{hint}", path
        )
    if not path.is_file():
        raise WeightsLoadError("checkpoint file not found", path)
    return path


def _sniff(path: Path) -> str:
    """``"torch"`` (zip or legacy pickle), ``"safetensors"``, or raise for anything else."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise WeightsLoadError("empty file, not a checkpoint", path)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"  # torch.save's zip archive, or its legacy pickle (starts with a PROTO opcode)
    # safetensors: an 8-byte little-endian header length, then a JSON header.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    raise WeightsLoadError(
        f"not a checkpoint: neither a PyTorch file (zip or pickle) nor safetensors (first bytes {head[:8]!r})", path
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for bad files; all mean "unreadable"
        text = str(err)
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if forbidden:
            problem = (
                f"refused: the file holds a pickled Python object ({forbidden.group(1)}), not only tensors; "
                "checkpoints are read with torch.load(weights_only=True) so that a file can never run code. "
                "Re-save the weights as a state dict (volumed.encoders.weights.save_weights or "
                "torch.save(model.state_dict(), ...))"
            )
        elif "TorchScript" in text:
            problem = "a TorchScript archive (compiled code), not a state dict; re-save its state_dict() as weights"
        elif "WeightsUnpickler error" in text:
            reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
            problem = f"not loadable with torch.load(weights_only=True): {reason or 'unsupported pickle content'}"
        else:
            first = text.strip().splitlines()[0] if text.strip() else "no details"
            problem = f"cannot be read as a PyTorch checkpoint (truncated or corrupt?): {type(err).__name__}: {first}"
        raise WeightsLoadError(problem, path) from err


def _load_file(path: Path) -> Any:
    if _sniff(path) == "safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # SafetensorError and OSError: both mean an unusable file
            raise WeightsLoadError(f"cannot be read as safetensors (truncated or corrupt?): {err}", path) from err
    return _torch_load(path)


def _unwrap(obj: Any, container: str | None, path: Path | None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Descend through container keys until a flat ``{name: value}`` dict remains."""
    chain: list[str] = []
    while isinstance(obj, Mapping):
        if container is not None and isinstance(obj.get(container), Mapping):
            key: str | None = container
        else:
            key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        chain.append(key)
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsLoadError(f"holds a {type(obj).__name__}, not a dict of tensors", path)
    if container is not None and container not in chain:
        found = _truncate([str(k) for k in obj], 10)
        raise WeightsLoadError(f"has no container {container!r} (found keys: {found})", path)
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        hint = "; pass container='teacher' to use the teacher" if isinstance(obj.get("teacher"), Mapping) else ""
        raise WeightsLoadError(f"holds no tensors (keys: {_truncate([str(k) for k in obj], 10)}){hint}", path)
    return dict(obj), tuple(chain)


class Checkpoint(NamedTuple):
    """A checkpoint unwrapped to its state dict (see :func:`read_state_dict`).

    Attributes:
        state_dict: the flat ``{name: value}`` dict; values are tensors, plus any non-tensor
            entries stored beside them.
        path: the file read (``None`` when a dict was passed).
        container: the keys unwrapped to reach ``state_dict``, e.g. ``("state_dict",)``.
    """

    state_dict: dict[str, Any]
    path: Path | None
    container: tuple[str, ...]


def read_state_dict(source: str | Path | Mapping[str, Any], *, container: str | None = None) -> Checkpoint:
    """Read a checkpoint and unwrap it to its state dict.

    Args:
        source: a ``.pt``/``.pth``/``.ckpt``/``.safetensors`` file, a MONAI bundle folder, or an
            already-loaded checkpoint dict.
        container: a key to unwrap first (e.g. ``"teacher"``); by default :data:`CONTAINER_KEYS`.

    Returns:
        :class:`Checkpoint` with the flat state dict, the file read and the unwrapped keys.

    Raises:
        WeightsLoadError: missing, empty, truncated or unknown file; pickled Python objects;
            no tensors inside.
    """
    path = None if isinstance(source, Mapping) else _resolve_file(source)
    state, chain = _unwrap(source if path is None else _load_file(path), container, path)
    return Checkpoint(state, path, chain)


# --------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------


def _prefixes(key: str, max_depth: int) -> list[str]:
    """``""`` and the dotted prefixes of ``key`` with up to ``max_depth`` components (never all of it)."""
    parts = key.split(".")
    return [""] + [".".join(parts[:i]) + "." for i in range(1, min(max_depth, len(parts) - 1) + 1)]


class _PrefixRule(NamedTuple):
    old: str
    new: str
    names: int  # checkpoint keys under ``old`` whose new name is a model key
    shapes: int  # ... and whose shape equals the model's
    leftover: int  # checkpoint keys under ``old`` whose new name is not a model key (unexpected)


def _rank_prefix_rules(
    ckpt_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]
) -> list[_PrefixRule]:
    """All rules ``old -> new`` that map at least one checkpoint key onto a model key, best first.

    Each checkpoint key ``old + s`` votes for every rule under which ``new + s`` is a model key;
    a rule's vote count is exactly the number of keys it maps. Ties go to the rule with the most
    equal shapes, then to the one leaving the fewest unexpected keys (so that for a full
    SwinUNETR checkpoint ``module.swinViT. -> swinViT.`` beats ``module. -> ''``: the decoder is
    left out rather than reported as unexpected), then to the one that changes the fewest name
    components (the identity first).
    """
    by_suffix: dict[str, list[str]] = {}
    for mkey in model_shapes:
        for new in _prefixes(mkey, _MAX_NEW_PREFIX_DEPTH):
            by_suffix.setdefault(mkey[len(new) :], []).append(new)
    under: dict[str, int] = {}
    names: dict[tuple[str, str], int] = {}
    shapes: dict[tuple[str, str], int] = {}
    for ckey, cshape in ckpt_shapes.items():
        for old in _prefixes(ckey, _MAX_OLD_PREFIX_DEPTH):
            under[old] = under.get(old, 0) + 1
            suffix = ckey[len(old) :]
            for new in by_suffix.get(suffix, ()):
                rule = (old, new)
                names[rule] = names.get(rule, 0) + 1
                shapes[rule] = shapes.get(rule, 0) + (model_shapes[new + suffix] == cshape)
    # dicts keep insertion order, so equal rules stay in the order the checkpoint first shows them
    ranked = [_PrefixRule(o, n, names[(o, n)], shapes[(o, n)], under[o] - names[(o, n)]) for o, n in names]
    ranked.sort(key=lambda r: (-r.names, -r.shapes, r.leftover, r.old.count(".") + r.new.count(".")))
    return ranked


def _apply_prefix(key: str, rules: Mapping[str, str]) -> str | None:
    """``key`` with its longest matching old prefix replaced; ``None`` if no rule applies."""
    for old in sorted(rules, key=len, reverse=True):
        if key.startswith(old):
            return rules[old] + key[len(old) :]
    return None


def _matched_keys(keys: list[str], rule: _PrefixRule, model_shapes: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(k for k in keys if k.startswith(rule.old) and rule.new + k[len(rule.old) :] in model_shapes)


def _renamed(key: str, renames: list[KeyRename]) -> str:
    for rename in renames:
        key = rename.apply(key)
    return key


def _auto_key_map(
    ckpt_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]
) -> tuple[list[KeyRename], dict[str, str]]:
    """Choose the renames and the single prefix rule that match the most model keys."""

    def ranked_with(renames: list[KeyRename]) -> tuple[list[_PrefixRule], list[str]]:
        shapes = {_renamed(k, renames): s for k, s in ckpt_shapes.items()}
        return _rank_prefix_rules(shapes, model_shapes), list(shapes)

    renames: list[KeyRename] = []
    ranked, keys = ranked_with(renames)
    for rename in KNOWN_RENAMES:
        if not any(rename.pattern.search(k) for k in ckpt_shapes):
            continue
        candidate, candidate_keys = ranked_with(renames + [rename])
        if candidate and (not ranked or candidate[0].names > ranked[0].names):
            renames.append(rename)
            ranked, keys = candidate, candidate_keys
    if not ranked:
        return renames, {}

    # Two rules that map different checkpoint keys equally well (e.g. ``student.`` and
    # ``teacher.`` in one flat dict) are a real ambiguity: say so instead of guessing silently.
    top = ranked[0]
    chosen = _matched_keys(keys, top, model_shapes)
    rivals = [r for r in ranked[1:] if r[2:] == top[2:] and _matched_keys(keys, r, model_shapes) != chosen]
    if rivals:
        logger.warning(
            "key_map='auto': prefix rules %s map different checkpoint keys equally well; using %r -> %r "
            "(pass key_map={old: new} to choose)",
            ", ".join(f"{r.old!r} -> {r.new!r}" for r in [top, *rivals[:4]]),
            top.old,
            top.new,
        )
    return renames, ({} if top.old == top.new == "" else {top.old: top.new})


def _map_keys(
    keys: list[str], key_map: KeyMap, ckpt_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, str | None], dict[str, str], list[str]]:
    """New name for every checkpoint key (``None``: ignored), the prefix rules and renames used."""
    if key_map is None:
        return {k: k for k in keys}, {}, []
    if isinstance(key_map, str):
        if key_map != "auto":
            raise ConfigError(f"{_KEY_MAP_KINDS}; got {key_map!r}")
        renames, prefix_map = _auto_key_map(ckpt_shapes, model_shapes)
        mapped: dict[str, str | None] = {}
        for k in keys:
            new = _renamed(k, renames)
            # keys outside the chosen old prefix map to None: they are "ignored", not unexpected
            mapped[k] = _apply_prefix(new, prefix_map) if prefix_map else new
        return mapped, prefix_map, [r.description for r in renames]
    if isinstance(key_map, Mapping):
        rules = {str(o): str(n) for o, n in key_map.items()}
        # Names outside every rule are kept: an explicit map renames, it does not select.
        return {k: _apply_prefix(k, rules) or k for k in keys}, rules, []
    if callable(key_map):
        mapped = {}
        for k in keys:
            new = key_map(k)
            if new is not None and not isinstance(new, str):
                raise ConfigError(f"key_map callable returned {type(new).__name__} for {k!r}; expected str or None")
            mapped[k] = new
        return mapped, {}, [f"callable {getattr(key_map, '__name__', repr(key_map))}"]
    raise ConfigError(f"{_KEY_MAP_KINDS}; got {type(key_map).__name__}")


# --------------------------------------------------------------------------------------------
# Input-channel adaptation
# --------------------------------------------------------------------------------------------


def adapt_input_channels(weight: torch.Tensor, in_channels: int, mode: InChannelsMode = "repeat") -> torch.Tensor:
    """Adapt a convolution weight ``(C_out, c, *kernel)`` to ``in_channels`` input channels.

    Both modes keep the layer's response to a channel-replicated input, ``x`` copied into every
    channel, the same as the original's (``W' * [x]*in_channels == W * [x]*c``), so activation
    scales are unchanged and a model given its old input repeated behaves exactly as before:

    * ``"repeat"``: more channels: tile the ``c`` filters cyclically and scale by
      ``c / in_channels`` (exact when ``c`` divides ``in_channels``); fewer channels: sum the
      filters that fold onto each new channel (channel ``i`` onto ``i % in_channels``), exact;
    * ``"mean"``: every new channel gets the mean filter scaled by ``c / in_channels``; for the
      channel-agnostic case (the new channels are not the old ones, e.g. CT -> 4 MR sequences).

    With ``c == 1`` or ``in_channels == 1`` the two modes give the same weights.

    * ``"pad"``: the first ``c`` filters as they are, zeros for the new channels (fewer channels:
      the first ``in_channels`` kept): the layer answers the old channels exactly as before and
      ignores the new ones until training gives them weight; for channels *added* to the old
      input (e.g. the image through a second intensity window,
      :class:`volumed.heads.promptseg.InputWindows`).

    Args:
        weight: ``(C_out, c, k1, ..., kn)``.
        in_channels: the new input-channel count.
        mode: ``"repeat"``, ``"mean"`` or ``"pad"`` (``"reinit"`` is handled by the loader: it
            keeps the model's own tensor).

    Returns:
        ``(C_out, in_channels, k1, ..., kn)``, same dtype.
    """
    if weight.ndim < 3:
        raise ConfigError(
            f"adapt_input_channels: expected a conv weight (C_out, C_in, *kernel), got shape {tuple(weight.shape)}"
        )
    if in_channels < 1:
        raise ConfigError(f"adapt_input_channels: in_channels must be >= 1, got {in_channels}")
    c = weight.shape[1]
    if mode == "mean":
        return weight.mean(dim=1, keepdim=True).repeat_interleave(in_channels, dim=1) * (c / in_channels)
    if mode == "pad":
        out = weight.new_zeros((weight.shape[0], in_channels, *weight.shape[2:]))
        keep = min(c, in_channels)
        out[:, :keep] = weight[:, :keep]
        return out
    if mode != "repeat":
        raise ConfigError(f"adapt_input_channels: mode must be 'repeat', 'mean' or 'pad', got {mode!r}")
    if in_channels >= c:
        return weight[:, torch.arange(in_channels) % c] * (c / in_channels)
    folded = weight.new_zeros((weight.shape[0], in_channels, *weight.shape[2:]))
    return folded.index_add_(1, torch.arange(c) % in_channels, weight)


def _input_conv_key(model_shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The model's input convolution: its first ``*weight`` entry with >= 3 dims.

    Encoders register their stem or patch embedding first; ``>= 3`` dims skips norms (1-D),
    linear layers and relative-position tables (2-D).
    """
    return next((k for k, s in model_shapes.items() if k.endswith("weight") and len(s) >= 3), None)


def _only_dim1_differs(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) >= 3 and a[1] != b[1] and a[:1] == b[:1] and a[2:] == b[2:]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_encoder_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    key_map: KeyMap = "auto",
    in_channels: InChannelsMode = "repeat",
    strict: bool = False,
    *,
    container: str | None = None,
) -> LoadReport:
    """Load a checkpoint's tensors into ``model`` (in place) and report what happened.

    Args:
        model: the module to fill (an encoder from :func:`~volumed.encoders.create_encoder`, a
            full network, any ``nn.Module``).
        source: checkpoint file (``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``), MONAI bundle
            folder, or an already-loaded checkpoint/state dict.
        key_map: ``"auto"`` (see the module docstring), ``{old_prefix: new_prefix}`` (longest
            prefix wins; other names kept), a callable ``name -> name`` (``None`` drops the
            entry), or ``None`` to use the names as they are.
        in_channels: what to do when the input convolution differs only in its input-channel
            count: ``"repeat"`` / ``"mean"`` / ``"pad"`` (see :func:`adapt_input_channels`), or
            ``"reinit"`` to keep the model's own initialisation for it. Either way the key is
            listed in ``report.adapted``, not in ``mismatched``.
        strict: raise :class:`WeightsLoadError` if anything is missing, unexpected or
            mismatched; the model is then left untouched. ``ignored`` entries never count.
        container: checkpoint key to unwrap first (e.g. ``"teacher"``); default
            :data:`CONTAINER_KEYS`.

    Returns:
        :class:`LoadReport`; it is also logged as a table at INFO on
        ``volumed.encoders.weights``, with a WARNING when something is missing, unexpected or
        mismatched.

    Raises:
        WeightsLoadError: unreadable checkpoint (see :func:`read_state_dict`), two checkpoint
            keys mapped onto one name, or ``strict=True`` and the checkpoint does not fit.
        ConfigError: invalid ``key_map`` or ``in_channels``.
    """
    if in_channels not in _IN_CHANNEL_MODES:
        raise ConfigError(f"in_channels must be one of {', '.join(_IN_CHANNEL_MODES)}; got {in_channels!r}")
    raw, path, chain = read_state_dict(source, container=container)
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    model_state = model.state_dict()
    # (a module's get_extra_state() may put non-tensors in its state dict; they carry no weights)
    model_shapes = {k: tuple(v.shape) for k, v in model_state.items() if isinstance(v, torch.Tensor)}
    ckpt_shapes = {k: tuple(v.shape) for k, v in tensors.items()}

    mapped, prefix_map, renames = _map_keys(list(tensors), key_map, ckpt_shapes, model_shapes)
    report = LoadReport(
        source=path,
        model_tensors=len(model_shapes),
        prefix_map=prefix_map,
        renames=renames,
        container=chain,
        ignored=[k for k in raw if k not in tensors] + [k for k, new in mapped.items() if new is None],
    )
    by_model_key: dict[str, str] = {}
    for ckey, new in mapped.items():
        if new is None:
            continue
        if new in by_model_key:
            raise WeightsLoadError(
                f"the key map sends both {by_model_key[new]!r} and {ckey!r} to {new!r}; pass an explicit key_map", path
            )
        by_model_key[new] = ckey
    report.unexpected = [ckey for new, ckey in by_model_key.items() if new not in model_shapes]

    # The input convolution fixes which (checkpoint, model) channel pair is an input-channel
    # change; other convolutions reading the input (e.g. a residual 1x1 shortcut) show the same
    # pair, while a genuinely wrong layer width elsewhere does not and stays "mismatched".
    channel_pair: tuple[int, int] | None = None
    first = _input_conv_key(model_shapes)
    if first is not None and first in by_model_key:
        cshape, mshape = ckpt_shapes[by_model_key[first]], model_shapes[first]
        if _only_dim1_differs(cshape, mshape):
            channel_pair = (cshape[1], mshape[1])

    to_load: dict[str, torch.Tensor] = {}
    for mkey, mshape in model_shapes.items():
        if mkey not in by_model_key:
            report.missing.append(mkey)
            continue
        tensor = tensors[by_model_key[mkey]]
        cshape = tuple(tensor.shape)
        if cshape == mshape:
            to_load[mkey] = tensor
            report.loaded.append(mkey)
        elif channel_pair is not None and _only_dim1_differs(cshape, mshape) and (cshape[1], mshape[1]) == channel_pair:
            change = f"{cshape[1]} -> {mshape[1]} input channels"
            if in_channels == "reinit":
                report.adapted.append(Adaptation(mkey, f"reinit ({change}): kept the model's initialisation"))
            else:
                to_load[mkey] = adapt_input_channels(tensor, mshape[1], in_channels)
                report.loaded.append(mkey)
                report.adapted.append(Adaptation(mkey, f"{in_channels} ({change})"))
        else:
            report.mismatched.append(ShapeMismatch(mkey, cshape, mshape))

    if strict and not report.ok:
        # Checked before anything is copied: a strict load is all or nothing.
        raise WeightsLoadError(
            f"strict=True and the checkpoint does not fit {type(model).__name__}: {report.problems()}", path
        )

    # load_state_dict (not tensor.copy_) so that modules' own loading hooks run; it also casts
    # dtypes and moves tensors to the model's device. Missing keys were handled above.
    model.load_state_dict(to_load, strict=False)

    logger.info("weights for %s:\n%s", type(model).__name__, report.format_table())
    if not report.ok:
        logger.warning(
            "%s: weights for %s do not fit completely: %s",
            path if path is not None else "<state dict>",
            type(model).__name__,
            report.problems(limit=5),
        )
    return report


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _tensors_to_save(model_or_state_dict: nn.Module | Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    if not isinstance(state, Mapping):
        raise ConfigError(f"save_weights: expected an nn.Module or a state dict, got {type(state).__name__}", path)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"save_weights: entry {key!r} is a {type(value).__name__}, not a tensor; only tensors are written "
                "(anything else could not be read back with weights_only=True)",
                path,
            )
        t = value.detach().cpu()
        storage = t.untyped_storage()
        # safetensors refuses tensors that share memory (tied weights), and torch.save writes the
        # whole storage behind a view: give such tensors their own compact copy.
        if not t.is_contiguous() or storage.nbytes() != t.numel() * t.element_size() or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(storage.data_ptr())
        out[str(key)] = t
    return out


def save_weights(
    model_or_state_dict: nn.Module | Mapping[str, Any], path: str | Path, *, overwrite: bool = False
) -> Path:
    """Write a model's (or a state dict's) tensors to ``.pt``/``.pth`` or ``.safetensors``.

    The file is written to a temporary name in the same folder and renamed into place, so a crash
    never leaves a partial checkpoint under ``path``; parent folders are created. The output is
    a flat ``{name: tensor}`` dict on the CPU, readable by :func:`load_encoder_weights` and by
    ``torch.load(..., weights_only=True)`` / ``safetensors.torch.load_file``.

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()`` is written) or a mapping of
            names to tensors.
        path: output file; the suffix chooses the format.
        overwrite: replace an existing file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        ConfigError: unsupported suffix, or a state-dict entry that is not a tensor.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _SAVE_SUFFIXES:
        allowed = ", ".join(_SAVE_SUFFIXES)
        raise ConfigError(f"save_weights: unsupported suffix {suffix or '(none)'!r}; use one of {allowed}", path)
    tensors = _tensors_to_save(model_or_state_dict, path)
    with atomic_output(path, overwrite=overwrite) as tmp:
        if suffix == ".safetensors":
            safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    return path
