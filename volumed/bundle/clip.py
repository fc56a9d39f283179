"""The pieces of the CT-CLIP zero-shot classification bundle (``bundles/volumed_clip_ct``) that its
``configs/inference.json`` instantiates by ``_target_`` where MONAI has no component for them.

From MONAI, in the config: the preprocessing (``EnsureTyped``, ``Orientationd``,
``ScaleIntensityRanged``: the package's, which neither resamples nor crops) and the ``Dataset``.
From here:

* :func:`network_from_package`: ``network_def``, the untrained
  :class:`~volumed.heads.clip.VolumeTextCLIP` described by ``models/clip.json``;
  ``forward(image (B, 1, X, Y, Z), text (N, 384)) -> logits (B, N)``;
* :func:`load_bundle_weights`: the weights after the bundle's checks (sha256, MONAI version);
* :func:`prompt_embeddings`: the text input for a list of abnormalities: each finding's prompt
  pair ("X is present." / "X is not present."), present prompts first, then absent ones;
* :class:`FixedPromptCLIP`: ``export_network_def``, the network with its prompts frozen in
  (``forward(image) -> (B, 2F)`` logits), which ``monai.bundle ckpt_export`` can trace;
* :class:`TileEmbeddingInferer`: ``inferer``. A volume larger than the encoder's input is cut
  into tiles (MONAI's ``dense_patch_slices``), their pooled features averaged, then projected
  (:func:`volumed.heads.clip.embed_volume`). MONAI's ``SlidingWindowInferer`` blends *spatial*
  outputs window by window; the embedding of a volume is one vector, not a map, so it does not apply;
* :class:`ZeroShotPostprocessing`: ``postprocessing``: per finding, the softmax of the scaled
  cosines over its prompt pair (:func:`volumed.heads.clip.zero_shot_probabilities`);
* :class:`ClipRunner`: ``evaluator``: for every item of ``dataset``, what ``volumed classify``
  computes and writes (``classification.json`` in ``output_dir``).

The outputs are probabilities per abnormality for the whole volume, so "on the input's grid"
does not apply to this bundle: there is no image output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from volumed.bundle.inputs import dataset_images
from volumed.bundle.transforms import LoadVolumed
from volumed.errors import ConfigError
from volumed.heads.clip import (
    VolumeTextCLIP,
    build_clip_model,
    embed_volume,
    prompt_pair_embeddings,
    read_clip_config,
    zero_shot_prompts,
)

__all__ = [
    "OUTPUT_NAME",
    "network_from_package",
    "load_bundle_weights",
    "prompt_embeddings",
    "FixedPromptCLIP",
    "fixed_prompt_clip",
    "TileEmbeddingInferer",
    "ZeroShotPostprocessing",
    "ClipRunner",
]

OUTPUT_NAME = "classification.json"


def network_from_package(model_dir: str | Path) -> VolumeTextCLIP:
    """The network described by ``model_dir/clip.json``, untrained."""
    return build_clip_model(read_clip_config(model_dir))


def load_bundle_weights(network: torch.nn.Module, bundle_root: str | Path, device: str | torch.device = "cpu", *,
                        strict_monai: bool = False) -> torch.nn.Module:
    """``models/model.safetensors`` into ``network`` after the bundle's checks (metadata, MONAI
    version, sha256 against ``large_files.yml``); eval mode on ``device``."""
    from volumed.bundle.promptseg import load_bundle_weights as load

    return load(network, bundle_root, device, strict_monai=strict_monai)


def _text_encoder(model_dir: str | Path, device: str | torch.device = "cpu"):
    from volumed.text.encoder import TextEncoder

    config = read_clip_config(model_dir)
    encoder = TextEncoder(None if config.text_model == "default" else config.text_model, device=str(device))
    if config.text_model_hash and encoder.model_hash != config.text_model_hash:
        raise ConfigError("the text model's files differ from those the CLIP model was trained with "
                          f"(sha256 {encoder.model_hash[:12]} vs {config.text_model_hash[:12]})", Path(model_dir))
    return encoder


def prompt_embeddings(model_dir: str | Path, findings: Sequence[str], encoder=None) -> torch.Tensor:
    """``(2F, D)`` frozen text embeddings: the F "X is present." prompts, then the F "X is not
    present." prompts (duplicates dropped, as :func:`volumed.heads.clip.zero_shot_prompts`)."""
    encoder = encoder or _text_encoder(model_dir)
    _prompts, present, absent = prompt_pair_embeddings(encoder, list(findings), read_clip_config(model_dir).negated)
    return torch.cat([present, absent]).float()


class FixedPromptCLIP(VolumeTextCLIP):
    """The network with its prompt embeddings frozen in: ``forward(image (B, 1, X, Y, Z)) -> (B, 2F)``
    logits (present prompts, then absent ones). Shares the wrapped network's modules (same state
    dict keys); the embeddings are a non-persistent buffer."""

    def __init__(self, network: VolumeTextCLIP, text: torch.Tensor):
        torch.nn.Module.__init__(self)  # not VolumeTextCLIP's: the modules are the network's
        self.encoder = network.encoder
        self.visual_projection = network.visual_projection
        self.text_projection = network.text_projection
        self.logit_scale = network.logit_scale
        self.max_logit_scale = network.max_logit_scale
        self.feature_dim = network.feature_dim
        self.text_dim = network.text_dim
        self.pooling = network.pooling
        self.feature_level = network.feature_level
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, self.text)


def fixed_prompt_clip(network: VolumeTextCLIP, model_dir: str | Path, findings: Sequence[str]) -> FixedPromptCLIP:
    """``export_network_def``: ``network`` with the prompt pairs of ``findings`` frozen in."""
    return FixedPromptCLIP(network, prompt_embeddings(model_dir, findings))


class TileEmbeddingInferer:
    """``inferer(image (C, X, Y, Z), network) -> (unit-norm embedding (E,), tiles)``: tiles of
    ``roi_size`` (interval ``roi_size * (1 - overlap)``, the last flush with the edge; a smaller
    volume is padded with air), pooled features averaged, projected
    (:func:`volumed.heads.clip.embed_volume`). Peak memory: ``sw_batch_size`` tiles."""

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.0, sw_batch_size: int = 1) -> None:
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1 or not 0.0 <= self.overlap < 1.0 or self.sw_batch_size < 1:
            raise ConfigError(f"TileEmbeddingInferer: roi_size needs 3 sizes, overlap in [0, 1), sw_batch_size >= 1; "
                              f"got {roi_size}, {overlap}, {sw_batch_size}", "inferer")

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, network: VolumeTextCLIP) -> tuple[torch.Tensor, int]:
        return embed_volume(network, image, self.roi_size, overlap=self.overlap, sw_batch_size=self.sw_batch_size)


class ZeroShotPostprocessing:
    """``(embedding (E,), present (F, E), absent (F, E), scale) -> (F,)`` probabilities: the softmax
    over each prompt pair of the scaled cosines (:func:`volumed.heads.clip.zero_shot_probabilities`).
    Zero-shot scores of a contrastive model, not calibrated probabilities; no threshold."""

    def __call__(self, embedding: torch.Tensor, present: torch.Tensor, absent: torch.Tensor,
                 scale: torch.Tensor | float) -> torch.Tensor:
        from volumed.heads.clip import zero_shot_probabilities

        return zero_shot_probabilities(embedding[None], present, absent, scale)[0]


class ClipRunner:
    """The ``evaluator`` of the CLIP bundle: zero-shot probabilities of ``findings`` for every image
    of ``dataset``, computed as ``volumed classify`` computes them, written to
    ``output_dir/classification.json`` (what ``volumed classify -o`` writes).

    Args:
        bundle_root: the bundle folder (its ``models/`` is the CLIP package).
        network: the loaded :class:`VolumeTextCLIP` (``@network``).
        dataset: a MONAI ``Dataset`` of ``{"image": path}`` items whose ``transform`` is the bundle's
            ``preprocessing`` (it starts with ``volumed.bundle.transforms.LoadVolumed``).
        inferer: a :class:`TileEmbeddingInferer`.
        postprocessing: a :class:`ZeroShotPostprocessing`.
        findings: abnormality names (each becomes "X is present." / "X is not present.").
        output_dir: outputs folder; with several images, one subfolder per image.
        overwrite: replace an earlier ``classification.json``.
        device: the network's device.
        print_summary: print each image's table on stdout.
        val_handlers: MONAI's evaluator handler slot (``handlers`` property); unused.
    """

    def __init__(self, bundle_root: str | Path, network: VolumeTextCLIP, dataset, inferer: TileEmbeddingInferer,
                 postprocessing: ZeroShotPostprocessing, findings: Sequence[str] | str, output_dir: str | Path, *,
                 overwrite: bool = False, device: str | torch.device = "cpu", print_summary: bool = True,
                 val_handlers: Sequence | None = None) -> None:
        self.bundle_root = Path(bundle_root)
        self.model_dir = self.bundle_root / "models"
        self.network, self.dataset, self.inferer, self.postprocessing = network, dataset, inferer, postprocessing
        self.findings = [findings] if isinstance(findings, str) else list(findings or [])
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.device = torch.device(device)
        self.print_summary = bool(print_summary)
        self.val_handlers = list(val_handlers or [])
        self.results: list = []

    def _images(self) -> list[str]:
        return dataset_images(self.dataset)

    @torch.no_grad()
    def run(self) -> list:
        """Classify each image; returns the :class:`volumed.inference.classify.ClassificationResult` list."""
        from volumed.inference.classify import ClassificationResult, FindingProbability
        from volumed.io import read_volume
        from volumed.io.atomic import atomic_write_text, check_writable

        config = read_clip_config(self.model_dir)
        images = self._images()
        if not self.findings:
            raise ConfigError("no findings to classify: pass --findings \"['Lung nodule']\"", "findings")
        prompts = zero_shot_prompts(self.findings)  # refuses empty names before any image is read
        outputs = [self.output_dir / OUTPUT_NAME if len(images) == 1 else
                   self.output_dir / Path(i.rstrip("/")).name.split(".")[0] / OUTPUT_NAME for i in images]
        for out in outputs:
            check_writable(out, self.overwrite)
        loader = next((t for t in getattr(self.dataset.transform, "transforms", ()) if isinstance(t, LoadVolumed)), None)
        read_options = {"series_uid": loader.series_uid, "modality": loader.modality} if loader is not None else {}
        network = self.network.to(self.device).eval()
        encoder = _text_encoder(self.model_dir, self.device)
        _same, present, absent = prompt_pair_embeddings(encoder, self.findings, config.negated)
        present, absent = (network.embed_text(t.to(self.device)) for t in (present, absent))
        trained_on = config.preprocessing.get("modality", "CT")
        # As volumed classify marks them: "model" for the package's own findings, "user" for others.
        from volumed.text.labels import ABNORMALITIES

        known = {f.lower() for f in (config.findings or ABNORMALITIES)}
        sources = ["model" if p.finding.lower() in known else "user" for p in prompts]
        self.results = []
        for image_path, out in zip(images, outputs):
            t0 = time.perf_counter()
            volume = read_volume(image_path, **read_options)
            if volume.modality != trained_on:
                raise ConfigError(f"the CLIP model was trained on {trained_on} images; this image is {volume.modality}",
                                  image_path)
            t_read = time.perf_counter()
            image = self.dataset.transform({"image": volume})["image"].as_tensor().float()
            embedding, tiles = self.inferer(image, network)
            probs = self.postprocessing(embedding, present, absent, network.scale).cpu()
            t_pred = time.perf_counter()
            result = ClassificationResult(
                image=str(image_path), model=str(self.model_dir),
                findings=tuple(FindingProbability(p.finding, round(float(v), 6), p.present, p.absent, source)
                               for p, v, source in zip(prompts, probs.tolist(), sources)),
                tiles=int(tiles), model_shape=tuple(int(s) for s in image.shape[1:]),
                input_size=tuple(int(s) for s in self.inferer.roi_size), output=out,
                seconds={"read": round(t_read - t0, 3), "classify": round(t_pred - t_read, 3)})
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(result.to_dict(), indent=2) + "\n", overwrite=self.overwrite)
            if self.print_summary:
                print(result.to_table())
                print(f"wrote {out}")
            self.results.append(result)
        return self.results
