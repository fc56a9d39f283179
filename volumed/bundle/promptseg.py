"""The pieces of the text-prompted segmentation bundle (``bundles/volumed_promptseg_ct``) that its
``configs/inference.json`` instantiates by ``_target_`` where MONAI has no component for them.

What MONAI provides is taken from MONAI in the config: the preprocessing steps (``EnsureTyped``,
``Orientationd``, ``Spacingd``, ``CropForegroundd``, ``ScaleIntensityRanged``), the
``SlidingWindowInferer`` and the ``Dataset``. From here come:

* :func:`network_from_package`: ``network_def``, the untrained network described by
  ``models/config.json`` (architecture only, cheap);
* :func:`load_bundle_weights`: the weights, after the bundle's checks (sha256 against
  ``large_files.yml``, MONAI version against ``monai_version``), read as safetensors;
* :class:`PromptSegPostprocessing`: ``postprocessing``, the per-term connected-component rule and
  threshold. MONAI's ``KeepLargestConnectedComponentd`` + ``Invertd`` + ``AsDiscreted`` would need
  every term's full-resolution probability map (N x X x Y x Z floats) and run after inversion;
  volumed keeps the largest component on the model grid before inversion and inverts only boxes
  around each structure (``volumed.inference.segment``), and the bundle must write the same masks;
* :class:`PromptSegRunner`: ``evaluator``, which runs ``volumed.inference.segment.segment`` with
  the config's network, preprocessing, inferer and postprocessing on every item of ``dataset``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from volumed.bundle.transforms import LoadVolumed
from volumed.errors import ConfigError
from volumed.inference.package import CONFIG_NAME, WEIGHTS_NAME, PromptSegConfig, TextPromptedSegmenter, build_model, read_config

__all__ = [
    "network_from_package",
    "load_bundle_weights",
    "prompt_embeddings",
    "FixedPromptSegmenter",
    "PromptSegPostprocessing",
    "PromptSegRunner",
]

log = logging.getLogger(__name__)


def network_from_package(model_dir: str | Path) -> TextPromptedSegmenter:
    """The network described by ``model_dir/config.json``, with untrained weights.

    ``forward(image (B, 1, X, Y, Z) float32 in [0, 1], text (N, 384) text embeddings, modality "CT")``
    gives logits ``(B, N, X, Y, Z)``, one channel per prompt.
    """
    return build_model(read_config(model_dir))


def prompt_embeddings(model_dir: str | Path, prompts: Sequence[str]) -> torch.Tensor:
    """``(N, D)`` text embeddings of ``prompts`` as the predictor makes them: each prompt resolved
    to its canonical term (free text kept as written), embedded by the package's text model
    (checked against its hash)."""
    from volumed.inference.segment import PromptSegPredictor, resolve_prompts

    config = read_config(model_dir)
    terms = resolve_prompts(list(prompts), "CT", trained_terms=config.terms, allow_free_text=True)
    encoder = PromptSegPredictor._load_text_encoder(config)
    return encoder.encode_cached([t.name for t in terms]).float()


class FixedPromptSegmenter(TextPromptedSegmenter):
    """The network with its prompts frozen in: ``forward(image (B, 1, X, Y, Z)) -> (B, N, X, Y, Z)``.

    For exports that take the image only (``monai.bundle ckpt_export`` traces ``net(image)``). It
    shares the wrapped network's modules, so its state dict has the same keys; the text
    embeddings are a non-persistent buffer (not in the state dict) and the modality is fixed.
    """

    def __init__(self, network: TextPromptedSegmenter, text: torch.Tensor, modality: str = "CT"):
        torch.nn.Module.__init__(self)  # not TextPromptedSegmenter's: the modules are the network's
        self.text_condition = network.text_condition
        self.segmenter = network.segmenter
        self.modality = modality
        self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(image, self.text, self.modality)


def load_bundle_weights(
    network: torch.nn.Module, bundle_root: str | Path, device: str | torch.device = "cpu", *, strict_monai: bool = False
) -> torch.nn.Module:
    """Load the bundle's ``models/model.safetensors`` into ``network`` after checking that it is
    the recorded file (sha256, :func:`volumed.bundle.integrity.verify_hashes`) and that the
    installed MONAI matches ``monai_version`` (:func:`volumed.bundle.loader.check_bundle`, the
    checks of ``volumed.bundle.load``); the network is returned in eval mode on ``device``.

    Raises:
        WeightsLoadError: hash mismatch (naming the file), missing file, or weights that do not fit.
        ConfigError: no hash record, or another MONAI major version (any other version with
            ``strict_monai``).
    """
    from volumed.bundle.loader import check_bundle
    from volumed.encoders.weights import load_encoder_weights

    root, _, _, _ = check_bundle(bundle_root, strict_monai=strict_monai)
    load_encoder_weights(network, root / "models" / WEIGHTS_NAME, key_map=None, strict=True)
    return network.to(torch.device(device)).eval()


@dataclass
class PromptSegPostprocessing:
    """What happens to the network's output after the sliding window, per term.

    Attributes:
        connected_components: keep only the largest 26-connected component of each structure that
            is one body (liver, heart, a kidney; ``volumed segment``'s default); False keeps every
            component of every term (``--no-postprocess``).
        rules: per-term overrides ``{term: "largest_component" | None}``
            (:mod:`volumed.inference.postprocess`).
        threshold: probability above which a voxel is in a mask; ``None``: the package's.
    """

    connected_components: bool = True
    rules: Mapping[str, str | None] = field(default_factory=dict)
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise ConfigError(f"postprocessing threshold must be in (0, 1), got {self.threshold!r}", "postprocessing")

    @property
    def segment_argument(self) -> bool | dict[str, str | None]:
        """The ``postprocess`` argument of :func:`volumed.inference.segment.segment`."""
        if not self.connected_components:
            return False
        return dict(self.rules) if self.rules else True


class PromptSegRunner:
    """The ``evaluator`` of the promptseg bundle: segments every image of ``dataset`` for
    ``prompts`` with the config's components, writing what ``volumed segment`` writes.

    Args:
        bundle_root: the bundle folder (its ``models/`` holds ``config.json``).
        network: the loaded network (``@network``).
        dataset: a MONAI ``Dataset`` whose ``data`` are ``{"image": path}`` items and whose
            ``transform`` is the bundle's ``preprocessing``.
        inferer: a MONAI ``SlidingWindowInferer`` (roi, overlap, batch of windows).
        postprocessing: a :class:`PromptSegPostprocessing`.
        prompts: anatomy prompts; free text is accepted when it is a term the model was trained on
            (or with ``free_text``).
        output_dir: outputs folder; with several images, one subfolder per image (its file name).
        all_terms: add every trained term (``volumed segment --all``).
        device: torch device of the network.
        progress: a progress bar over the sliding windows.
        print_summary: print each image's summary (what was found, where the outputs are) on stdout.
        dicom_uids: Series and SOP Instance UIDs of the DICOM SEG and SR
            (:class:`volumed.io.writer.DicomOutputUids` fields as a mapping); one image only.
        val_handlers: MONAI's evaluator handler slot (the ``handlers`` property); unused.
    """

    def __init__(
        self,
        bundle_root: str | Path,
        network: TextPromptedSegmenter,
        dataset,
        inferer,
        postprocessing: PromptSegPostprocessing,
        prompts: Sequence[str] | str,
        output_dir: str | Path,
        *,
        all_terms: bool = False,
        free_text: bool = False,
        allow_untrained: bool = False,
        overwrite: bool = False,
        device: str | torch.device = "cpu",
        progress: bool = False,
        print_summary: bool = True,
        val_handlers: Sequence | None = None,
        dicom_uids: Mapping[str, str] | None = None,
    ) -> None:
        self.bundle_root = Path(bundle_root)
        self.model_dir = self.bundle_root / "models"
        self.network = network
        self.dataset = dataset
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        self.output_dir = Path(output_dir)
        self.all_terms = bool(all_terms)
        self.free_text = bool(free_text)
        self.allow_untrained = bool(allow_untrained)
        self.overwrite = bool(overwrite)
        self.device = torch.device(device)
        self.progress = bool(progress)
        self.print_summary = bool(print_summary)
        self.val_handlers = list(val_handlers or [])
        self.dicom_uids = dict(dicom_uids) if dicom_uids else None
        self.results: list = []

    def _config(self) -> PromptSegConfig:
        config = read_config(self.model_dir)
        if self.postprocessing.threshold is not None:
            from dataclasses import replace

            config = replace(config, threshold=float(self.postprocessing.threshold))
        return config

    def _items(self) -> list[str]:
        data = getattr(self.dataset, "data", None)
        if not data:
            raise ConfigError("the dataset holds no image; pass --input_image PATH", "dataset")
        images = []
        for item in data:
            image = item.get("image") if isinstance(item, Mapping) else None
            if image in (None, ""):
                raise ConfigError("no input image: pass --input_image PATH (a NIfTI/NRRD file or a DICOM series folder)", "input_image")
            images.append(str(image))
        return images

    def run(self) -> list:
        """Segment each image; returns the :class:`volumed.inference.segment.SegmentationResult` list."""
        from volumed.inference.segment import PromptSegPredictor

        if (self.bundle_root / "models" / CONFIG_NAME).is_file() is False:
            raise ConfigError(f"bundle has no models/{CONFIG_NAME}", self.bundle_root)
        images = self._items()
        if self.dicom_uids and len(images) > 1:
            raise ConfigError(f"dicom_uids name one SEG and one SR: give one image, not {len(images)}", "dicom_uids")
        config = self._config()
        predictor = PromptSegPredictor(self.network, config, device=self.device, preprocessing=self.dataset.transform,
                                       inferer=self.inferer)
        # The reader's options live on the preprocessing's LoadVolumed; segment() reads the image with them.
        loader = next((t for t in getattr(self.dataset.transform, "transforms", ()) if isinstance(t, LoadVolumed)), None)
        read_options = {"series_uid": loader.series_uid, "modality": loader.modality} if loader is not None else {}
        self.results = []
        for image in images:
            out = self.output_dir if len(images) == 1 else self.output_dir / Path(image.rstrip("/")).name.split(".")[0]
            result = self._process(image, out, dict(
                model_dir=self.model_dir, all_terms=self.all_terms, allow_free_text=self.free_text,
                allow_untrained=self.allow_untrained, overwrite=self.overwrite, progress=self.progress,
                postprocess=self.postprocessing.segment_argument, predictor=predictor, dicom_uids=self.dicom_uids,
                **read_options))
            if self.print_summary:
                for line in result.summary():
                    print(line)
            self.results.append(result)
        return self.results

    def _process(self, image: str, out: Path, options: dict):
        """One image's outputs into ``out``: :func:`volumed.inference.segment.segment` with ``options``
        (the runner's settings and predictor, the reader's options). Subclasses write more from it."""
        from volumed.inference.segment import segment

        return segment(image, self.prompts, out_dir=out, **options)
