"""``volumed classify``: zero-shot finding probabilities of one volume with a CT-CLIP package.

::

    check: model folder (clip.json), output file (writable, not there unless overwrite), findings
    read_volume (NIfTI / NRRD / MHA / DICOM series; the reader's errors for bad input)
      -> the package's preprocessing (RAS, spacing, body crop, CT window -> [0, 1]) (1, x, y, z)
      -> embed_volume: tiles of the package's input_size (MONAI dense_patch_slices), pooled
         features averaged over tiles, projected (volumed.heads.clip)            (E,)
      -> per finding X: "X is present." / "X is not present." (frozen text encoder, projected)
         probability = softmax(s cos(v, present), s cos(v, absent))[present]
    -> a table on stdout, and OUT.json written atomically

Findings: the package's list (the 18 CT-RATE abnormalities unless it was trained with others),
then every ``--finding`` given (a name already listed is not repeated). The probabilities are
zero-shot scores of a contrastive model, not calibrated probabilities, and there is no threshold
of presence in them; a package's ``metrics`` hold the F1-maximising thresholds measured on its
validation data, where it had some.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from volumed.errors import ConfigError
from volumed.heads.clip import (
    ClipConfig,
    VolumeTextCLIP,
    embed_volume,
    load_clip_package,
    prompt_pair_embeddings,
    read_clip_config,
    zero_shot_prompts,
    zero_shot_probabilities,
)

__all__ = ["ClassificationResult", "ClipClassifier", "FindingProbability", "classify"]


@dataclass(frozen=True)
class FindingProbability:
    """One finding: its name, the prompt pair, the probability, and where it came from
    (``"model"``: the package's list; ``"user"``: ``--finding``)."""

    finding: str
    probability: float
    present_prompt: str
    absent_prompt: str
    source: str


@dataclass(frozen=True)
class ClassificationResult:
    """What :func:`classify` computed (and wrote to ``output``, when given)."""

    image: str
    model: str
    findings: tuple[FindingProbability, ...]
    tiles: int
    model_shape: tuple[int, int, int]
    input_size: tuple[int, int, int]
    output: Path | None = None
    seconds: dict = field(default_factory=dict)

    def probabilities(self) -> dict[str, float]:
        return {f.finding: f.probability for f in self.findings}

    def to_dict(self) -> dict:
        return {
            "image": self.image,
            "model": self.model,
            "method": "zero-shot CT-CLIP: softmax over the prompt pair 'X is present.' / 'X is not present.'",
            "note": "zero-shot scores of a contrastive model, not calibrated probabilities",
            "findings": [asdict(f) for f in self.findings],
            "embedding": {"tiles": self.tiles, "model_shape": list(self.model_shape), "input_size": list(self.input_size)},
            "seconds": self.seconds,
        }

    def summary(self) -> list[str]:
        """The table's lines, then where the JSON went (what ``volumed run`` prints)."""
        return self.to_table().splitlines() + ([f"wrote {self.output}"] if self.output is not None else [])

    def to_table(self) -> str:
        width = max([len("finding"), *(len(f.finding) for f in self.findings)])
        rows = [f"{'finding':<{width}}  probability", f"{'-' * width}  -----------"]
        rows += [f"{f.finding:<{width}}  {f.probability:11.3f}" + ("  (user)" if f.source == "user" else "")
                 for f in self.findings]
        return "\n".join(rows)


class ClipClassifier:
    """A loaded CLIP package with its text encoder: ``probabilities(volume, findings)``.

    Raises:
        ConfigError: the text model differs from the one the package was trained with.
    """

    def __init__(self, model: VolumeTextCLIP, config: ClipConfig, model_dir: Path, device: str = "cpu") -> None:
        from volumed.text.encoder import TextEncoder

        self.model = model.to(device)
        self.config = config
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.text = TextEncoder(None if config.text_model == "default" else config.text_model, device=device)
        if config.text_model_hash and self.text.model_hash != config.text_model_hash:
            raise ConfigError("the text model's files differ from those the CLIP model was trained with "
                              f"(sha256 {self.text.model_hash[:12]} vs {config.text_model_hash[:12]})", self.model_dir)

    @classmethod
    def from_package(cls, model_dir: str | Path, device: str = "cpu") -> ClipClassifier:
        model, config = load_clip_package(model_dir)
        return cls(model, config, Path(model_dir), device)

    def default_findings(self) -> list[str]:
        from volumed.text.labels import ABNORMALITIES

        return list(self.config.findings or ABNORMALITIES)

    def model_image(self, volume) -> torch.Tensor:
        """The volume in model space, ``(1, x, y, z)`` in [0, 1], by the package's preprocessing."""
        from volumed.data.transforms import PreprocessConfig, preprocess

        settings = {k: tuple(v) if isinstance(v, list) else v for k, v in self.config.preprocessing.items()}
        settings["modality"] = volume.modality if volume.modality in ("CT", "MR") else settings.get("modality", "CT")
        return preprocess(volume, config=PreprocessConfig(**settings)).image.as_tensor().float()

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor, findings: Sequence[str], sw_batch_size: int = 1) -> tuple[torch.Tensor, int]:
        """Model-space ``image`` (1, x, y, z) -> ``(F,)`` zero-shot probabilities and the number of tiles."""
        _prompts, present, absent = prompt_pair_embeddings(self.text, findings, self.config.negated)
        present, absent = (self.model.embed_text(t.to(self.device)) for t in (present, absent))
        embedding, tiles = embed_volume(self.model, image, self.config.input_size, overlap=self.config.overlap,
                                        sw_batch_size=sw_batch_size)
        return zero_shot_probabilities(embedding[None], present, absent, self.model.scale)[0].cpu(), tiles


def classify(
    image_path: str | Path,
    findings: Sequence[str] = (),
    *,
    model_dir: str | Path,
    output: str | Path | None = None,
    overwrite: bool = False,
    series_uid: str | None = None,
    modality: str | None = None,
    device: str = "cpu",
    sw_batch_size: int = 1,
) -> ClassificationResult:
    """Zero-shot probabilities of the package's findings and of ``findings`` for one image; writes
    ``output`` (JSON, atomically) when given.

    Raises:
        ConfigError: not a CLIP model folder, an empty finding name, an unknown modality.
        OutputExistsError: ``output`` exists and not ``overwrite`` (checked before any work).
        Reader errors (:mod:`volumed.io.reader`) for a missing or unreadable image.
    """
    from volumed.io import read_volume
    from volumed.io.atomic import atomic_write_text, check_writable

    t0 = time.perf_counter()
    # Cheap checks first: model folder, output, finding names; then the image; then the networks.
    config = read_clip_config(model_dir)
    if output is not None:
        check_writable(output, overwrite)
    user = [p.finding for p in zero_shot_prompts(findings)] if findings else []
    volume = read_volume(image_path, series_uid=series_uid, modality=modality)
    if volume.modality not in ("CT", "MR"):
        raise ConfigError("cannot tell whether the image is CT or MR; name it with --modality", image_path)
    trained_on = config.preprocessing.get("modality", "CT")
    if volume.modality != trained_on:
        raise ConfigError(f"the CLIP model was trained on {trained_on} images; this image is {volume.modality}", model_dir)
    t_read = time.perf_counter()
    classifier = ClipClassifier.from_package(model_dir, device=device)
    defaults = classifier.default_findings()
    known = {f.lower() for f in defaults}
    names = defaults + [f for f in user if f.lower() not in known]
    sources = ["model"] * len(defaults) + ["user"] * (len(names) - len(defaults))
    image = classifier.model_image(volume)
    probs, tiles = classifier.probabilities(image, names, sw_batch_size=sw_batch_size)
    t_pred = time.perf_counter()
    prompts = zero_shot_prompts(names)
    result = ClassificationResult(
        image=str(image_path), model=str(model_dir),
        findings=tuple(FindingProbability(p.finding, round(float(v), 6), p.present, p.absent, s)
                       for p, v, s in zip(prompts, probs.tolist(), sources)),
        tiles=tiles, model_shape=tuple(int(s) for s in image.shape[1:]), input_size=tuple(config.input_size),
        output=Path(output) if output is not None else None,
        seconds={"read": round(t_read - t0, 3), "classify": round(t_pred - t_read, 3)})
    if output is not None:
        atomic_write_text(output, json.dumps(result.to_dict(), indent=2) + "\n", overwrite=overwrite)
    return result
