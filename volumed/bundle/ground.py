"""The pieces of the finding-grounding bundle (``bundles/volumed_ground_ct``) that its
``configs/inference.json`` instantiates by ``_target_`` where MONAI has no component for them.

From MONAI, in the config: the preprocessing (``EnsureTyped``, ``Orientationd``, ``Spacingd``,
``CropForegroundd``, ``ScaleIntensityRanged``), the ``SlidingWindowInferer`` and the ``Dataset``.
From here:

* :func:`network_from_package`: ``network_def``, the untrained
  :class:`~volumed.heads.grounding.GroundingModel` described by ``models/config.json`` and
  ``models/grounding.json`` (architecture only, cheap);
* :func:`load_bundle_weights`: the weights after the bundle's checks (sha256 against
  ``large_files.yml``, MONAI version), read as safetensors (that of the promptseg bundle);
* :func:`finding_embeddings`: the network's text inputs for finding sentences (for
  ``monai.bundle verify_net_in_out`` and the TorchScript export);
* :class:`FixedFindingGrounder`: ``export_network_def``, the network with its findings frozen in
  (``forward(image)``), which ``monai.bundle ckpt_export`` can trace;
* :class:`GroundingPostprocessing`: ``postprocessing``: threshold and the smallest instance kept.
  MONAI's ``AsDiscreted`` + ``Invertd`` would need every sentence's full-resolution probability map
  after inversion and say nothing about instances; ``volumed ground`` thresholds on the input grid
  after inverting boxes around each finding, and splits the mask into 26-connected instances
  (:func:`volumed.heads.grounding.connected_instances`), and the bundle must write the same masks;
* :class:`GroundingRunner`: ``evaluator``: :func:`volumed.inference.ground.ground` with the
  config's network, preprocessing, inferer and postprocessing, on every item of ``dataset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from volumed.bundle.promptseg import load_bundle_weights
from volumed.bundle.inputs import dataset_images
from volumed.bundle.transforms import LoadVolumed
from volumed.errors import ConfigError
from volumed.heads.grounding import GroundingModel, build_grounding_model, read_grounding_config
from volumed.inference.package import CONFIG_NAME, read_config

__all__ = [
    "network_from_package",
    "load_bundle_weights",
    "read_grounding_config",
    "finding_embeddings",
    "FixedFindingGrounder",
    "fixed_finding_grounder",
    "GroundingPostprocessing",
    "GroundingRunner",
]


def network_from_package(model_dir: str | Path) -> GroundingModel:
    """The grounding network described by ``model_dir`` (``config.json`` + ``grounding.json``),
    untrained.

    ``forward(image (B, 1, X, Y, Z) in [0, 1], sentence (N, 384), location (N, 384),
    has_location (N,) bool, modality "CT")`` gives gated logits ``(B, N, X, Y, Z)``, one channel
    per finding sentence.
    """
    grounding = read_grounding_config(model_dir)
    return build_grounding_model(read_config(model_dir), gate_kernel=grounding.gate_kernel)


def finding_embeddings(model_dir: str | Path, findings: Sequence[str]) -> dict[str, torch.Tensor]:
    """The network's text inputs for ``findings`` as ``volumed ground`` makes them: each sentence
    parsed (location term), embedded by the package's text model (checked against its hash).

    Returns ``{"sentence": (N, D), "location": (N, D), "has_location": (N,) bool}``, the keyword
    arguments of :meth:`GroundingModel.forward` after the image. Negated sentences are refused:
    ``volumed ground`` never runs them through the network.
    """
    from volumed.heads.grounding import finding_queries
    from volumed.inference.segment import PromptSegPredictor
    from volumed.tasks.ground import encode_queries

    queries = finding_queries(list(findings))
    negated = [q.text for q in queries if q.negated]
    if negated:
        raise ConfigError(f"negated sentences are never grounded (no mask): {negated}", "findings")
    encoder = PromptSegPredictor._load_text_encoder(read_config(model_dir))
    sentence, location, has = encode_queries(queries, encoder)
    return {"sentence": sentence.float(), "location": location.float(), "has_location": has.to(torch.bool)}


class FixedFindingGrounder(GroundingModel):
    """The network with its finding sentences frozen in: ``forward(image (B, 1, X, Y, Z)) -> (B, N, X, Y, Z)``.

    For exports that take the image only (``monai.bundle ckpt_export`` traces ``net(image)``).
    It shares the wrapped network's modules, so its state dict has the same keys; the embeddings
    are non-persistent buffers and the modality is fixed.
    """

    def __init__(self, network: GroundingModel, sentence: torch.Tensor, location: torch.Tensor,
                 has_location: torch.Tensor, modality: str = "CT"):
        torch.nn.Module.__init__(self)  # not GroundingModel's: the modules are the network's
        self.text_condition = network.text_condition
        self.segmenter = network.segmenter
        self.location = network.location
        self.gate_kernel = network.gate_kernel
        self.modality = modality
        self.register_buffer("sentence", torch.as_tensor(sentence, dtype=torch.float32), persistent=False)
        self.register_buffer("location_text", torch.as_tensor(location, dtype=torch.float32), persistent=False)
        self.register_buffer("has_location", torch.as_tensor(has_location, dtype=torch.bool), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, self.sentence, self.location_text, self.has_location, self.modality)


def fixed_finding_grounder(network: GroundingModel, model_dir: str | Path, findings: Sequence[str]) -> FixedFindingGrounder:
    """``export_network_def``: ``network`` with the embeddings of ``findings`` frozen in."""
    return FixedFindingGrounder(network, **finding_embeddings(model_dir, findings))


@dataclass
class GroundingPostprocessing:
    """What happens to the sentence probabilities after the sliding window.

    Attributes:
        threshold: probability above which a voxel is in a sentence's mask; ``None``: the package's.
        min_instance_voxels: 26-connected components smaller than this are dropped from a mask;
            ``None``: the package's (``grounding.json``).
        body_only: findings only inside the patient's body (CT).
        organ_margin_mm: findings only near the structure their sentence names, as the default
            segmenter segments it, grown by this margin plus the stated size; ``None``: no such
            gate. Both as :class:`volumed.inference.ground.GroundingPredictor`.
    """

    threshold: float | None = None
    min_instance_voxels: int | None = None
    body_only: bool = True
    organ_margin_mm: float | None = 10.0

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"postprocessing threshold must be in (0, 1), got {self.threshold!r}", "postprocessing")
        if self.min_instance_voxels is not None and int(self.min_instance_voxels) < 0:
            raise ConfigError(f"postprocessing min_instance_voxels must be >= 0, got {self.min_instance_voxels!r}",
                              "postprocessing")
        if self.organ_margin_mm is not None and float(self.organ_margin_mm) < 0:
            raise ConfigError(f"postprocessing organ_margin_mm must be >= 0 or null, got {self.organ_margin_mm!r}",
                              "postprocessing")


class GroundingRunner:
    """The ``evaluator`` of the grounding bundle: grounds ``findings`` (and the finding clauses of
    ``report``) in every image of ``dataset`` with the config's components, writing what
    ``volumed ground`` writes (``masks/finding_NN.nii.gz``, ``grounding.json``, a DICOM SEG for
    DICOM input).

    Args:
        bundle_root: the bundle folder (its ``models/`` is the grounding package).
        network: the loaded :class:`GroundingModel` (``@network``).
        dataset: a MONAI ``Dataset`` of ``{"image": path}`` items whose ``transform`` is the
            bundle's ``preprocessing``.
        inferer: a MONAI ``SlidingWindowInferer``.
        postprocessing: a :class:`GroundingPostprocessing`.
        findings: finding sentences, one query each.
        report: a report text, or the path of a text file holding one ("" or None: none).
        output_dir: outputs folder; with several images, one subfolder per image.
        overwrite: replace the outputs of an earlier run.
        device: torch device of the network.
        print_summary: print each image's summary on stdout.
        val_handlers: MONAI's evaluator handler slot (``handlers`` property); unused.
    """

    def __init__(self, bundle_root: str | Path, network: GroundingModel, dataset, inferer,
                 postprocessing: GroundingPostprocessing, findings: Sequence[str] | str, output_dir: str | Path, *,
                 report: str | None = None, overwrite: bool = False, device: str | torch.device = "cpu",
                 print_summary: bool = True, val_handlers: Sequence | None = None) -> None:
        self.bundle_root = Path(bundle_root)
        self.model_dir = self.bundle_root / "models"
        self.network = network
        self.dataset = dataset
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.findings = [findings] if isinstance(findings, str) else list(findings or [])
        self.report = str(report) if report else None
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.device = torch.device(device)
        self.print_summary = bool(print_summary)
        self.val_handlers = list(val_handlers or [])
        self.results: list = []

    def _images(self) -> list[str]:
        return dataset_images(self.dataset)

    def predictor(self):
        """The :class:`volumed.inference.ground.GroundingPredictor` of the config's components."""
        from volumed.inference.ground import GroundingPredictor

        config = read_config(self.model_dir)
        grounding = read_grounding_config(self.model_dir)
        if self.postprocessing.threshold is not None:
            config = replace(config, threshold=float(self.postprocessing.threshold))
        if self.postprocessing.min_instance_voxels is not None:
            grounding = replace(grounding, min_instance_voxels=int(self.postprocessing.min_instance_voxels))
        return GroundingPredictor(self.network, config, grounding, device=self.device,
                                  preprocessing=self.dataset.transform, inferer=self.inferer,
                                  body_only=bool(self.postprocessing.body_only),
                                  organ_margin_mm=self.postprocessing.organ_margin_mm)

    def run(self) -> list:
        """Ground in each image; returns the :class:`volumed.inference.ground.GroundingResult` list."""
        from volumed.inference.ground import ground

        if not (self.model_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"bundle has no models/{CONFIG_NAME}", self.bundle_root)
        images = self._images()
        predictor = self.predictor()
        loader = next((t for t in getattr(self.dataset.transform, "transforms", ()) if isinstance(t, LoadVolumed)), None)
        read_options = {"series_uid": loader.series_uid, "modality": loader.modality} if loader is not None else {}
        self.results = []
        for image in images:
            out = self.output_dir if len(images) == 1 else self.output_dir / Path(image.rstrip("/")).name.split(".")[0]
            result = ground(image, self.findings, report=self.report, model_dir=self.model_dir, out_dir=out,
                            overwrite=self.overwrite, predictor=predictor, **read_options)
            if self.print_summary:
                for line in result.summary():
                    print(line)
            self.results.append(result)
        return self.results
