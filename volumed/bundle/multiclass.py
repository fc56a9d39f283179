"""The pieces of the plain multi-class segmentation bundles (``bundles/volumed_stunet_{s,b,l,h}_ct``)
that their ``configs/inference.json`` instantiates by ``_target_`` where MONAI has no component.

From MONAI, in the config: the preprocessing (``EnsureTyped``, ``Orientationd``, ``Spacingd``,
``CropForegroundd``, ``ScaleIntensityRanged``), the ``SlidingWindowInferer``, the postprocessing
(``Activationsd`` softmax) and the ``Dataset``. From here:

* :func:`load_bundle_weights`: the weights, after the bundle's checks; a bundle that ships no
  weights (configs only, until trained) is refused with a message saying so and how to train it;
* :class:`MultiClassRunner`: ``evaluator``. Per image: read (``LoadVolumed``), preprocess, slide
  the window, softmax, then back onto the input's grid by volumed's inversion (trilinear per class
  score, argmax on the original grid: :func:`volumed.data.transforms.invert_scores_to_labels`),
  and write ``labels.nii.gz`` (value k = class k of ``channel_def``) with ``labels.json``, staged
  and published whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from volumed.bundle.inputs import dataset_images
from volumed.errors import ConfigError, OutputExistsError, VolumeReadError

__all__ = ["WEIGHTS_NAME", "MultiClassResult", "MultiClassRunner", "load_bundle_weights"]

WEIGHTS_NAME = "model.safetensors"
LABELS_NAME = "labels.nii.gz"
TABLE_NAME = "labels.json"


def load_bundle_weights(network: torch.nn.Module, bundle_root: str | Path, device: str | torch.device = "cpu",
                        *, strict_monai: bool = False) -> torch.nn.Module:
    """Load ``models/model.safetensors`` into ``network`` after the bundle's checks (metadata,
    MONAI version, sha256 against ``large_files.yml``); eval mode on ``device``.

    Raises:
        ConfigError: the bundle ships no weights (configs only until trained), or a check fails.
        WeightsLoadError: hash mismatch, or weights that do not fit the network.
    """
    from volumed.bundle.loader import check_bundle
    from volumed.encoders.weights import load_encoder_weights

    root = Path(bundle_root)
    weights = root / "models" / WEIGHTS_NAME
    root, _, _, _ = check_bundle(root, strict_monai=strict_monai)  # refuses a configs-only bundle by name
    if not weights.is_file():
        raise ConfigError(f"no models/{WEIGHTS_NAME}: python -m monai.bundle run --config_file {root}/configs/train.json "
                          f"--bundle_root {root} writes it (output_dir/{WEIGHTS_NAME})", root)
    load_encoder_weights(network, weights, key_map=None, strict=True)
    return network.to(torch.device(device)).eval()


@dataclass(frozen=True)
class MultiClassResult:
    """What :class:`MultiClassRunner` wrote for one image: the folder, the label map, the table,
    and the voxel count of each class found (``{name: voxels}``)."""

    out_dir: Path
    label_map: Path
    label_table: Path
    voxels: dict[str, int]

    def summary(self) -> list[str]:
        found = [f"{name} ({n} voxels)" for name, n in self.voxels.items() if n]
        absent = [name for name, n in self.voxels.items() if not n]
        return [f"found {len(found)} of {len(self.voxels)} class(es): {', '.join(found) or 'none'}",
                f"absent ({len(absent)}): {', '.join(absent) or 'none'}", f"wrote {self.out_dir}"]


class MultiClassRunner:
    """The ``evaluator`` of a multi-class segmentation bundle.

    Args:
        network: the loaded network (``@network``): ``(B, 1, X, Y, Z) -> (B, C + 1, X, Y, Z)`` logits.
        dataset: MONAI ``Dataset`` of ``{"image": path}`` items whose ``transform`` is the bundle's
            ``preprocessing`` (it must start with ``volumed.bundle.transforms.LoadVolumed``).
        inferer: a MONAI inferer (``SlidingWindowInferer``).
        postprocessing: a MONAI transform on ``{"pred": (C + 1, x, y, z)}`` (``Activationsd`` softmax).
        classes: class names in channel order, background excluded (``channel_def`` 1..C).
        output_dir: output folder; with several images, one subfolder per image.
        overwrite: replace earlier outputs.
        device: the network's device.
        print_summary: print what was found per image.
    """

    def __init__(self, network: torch.nn.Module, dataset, inferer, postprocessing, classes: Sequence[str] | Mapping,
                 output_dir: str | Path, *, overwrite: bool = False, device: str | torch.device = "cpu",
                 print_summary: bool = True) -> None:
        self.network, self.dataset, self.inferer, self.postprocessing = network, dataset, inferer, postprocessing
        if isinstance(classes, Mapping):  # a channel_def: {"0": "background", "1": ...}
            classes = [classes[k] for k in sorted(classes, key=int) if int(k) > 0]
        self.classes = list(classes)
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.device = torch.device(device)
        self.print_summary = bool(print_summary)
        self.results: list[MultiClassResult] = []

    def _images(self) -> list[str]:
        images = dataset_images(self.dataset)
        for image in images:
            if not Path(str(image)).exists():
                raise VolumeReadError("no such file or folder", image)
        return [str(i) for i in images]

    @torch.no_grad()
    def _segment(self, image: str, out: Path) -> MultiClassResult:
        import numpy as np

        from volumed.data.transforms import (
            PreprocessConfig,
            PreprocessedCase,
            invert_scores_to_labels,
        )
        from volumed.io import read_volume
        from volumed.io.atomic import atomic_write_text
        from volumed.io.writer import write_label_map

        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise OutputExistsError("output folder is not empty; pass --overwrite true or another folder", out)
        volume = read_volume(image)
        item = self.dataset.transform({"image": volume})
        case = PreprocessedCase(image=item["image"], label=None, transform=self.dataset.transform,
                                config=PreprocessConfig(modality="CT", label_keys=()), original=volume)
        logits = self.inferer(item["image"].as_tensor()[None].to(self.device), self.network)[0].cpu()
        if logits.shape[0] != len(self.classes) + 1:
            raise ConfigError(f"the network gives {logits.shape[0]} channels, the bundle names {len(self.classes)} classes + background",
                              "classes")
        scores = self.postprocessing({"pred": logits})["pred"]
        labels = invert_scores_to_labels(torch.as_tensor(scores), case)
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(self.classes) + 1)
        voxels = {name: int(counts[k]) for k, name in enumerate(self.classes, start=1)}
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.volumed-", dir=out.parent))
        try:
            write_label_map(labels, volume, staging / LABELS_NAME)
            table = {"background": 0, "labels": {str(k): name for k, name in enumerate(self.classes, start=1)},
                     "voxels": voxels, "image": str(image)}
            atomic_write_text(staging / TABLE_NAME, json.dumps(table, indent=2) + "\n")
            out.mkdir(parents=True, exist_ok=True)
            for name in (LABELS_NAME, TABLE_NAME):
                os.replace(staging / name, out / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return MultiClassResult(out, out / LABELS_NAME, out / TABLE_NAME, voxels)

    def run(self) -> list[MultiClassResult]:
        images = self._images()
        self.network.eval()
        self.results = []
        for image in images:
            out = self.output_dir if len(images) == 1 else self.output_dir / Path(image.rstrip("/")).name.split(".")[0]
            result = self._segment(image, out)
            if self.print_summary:
                for line in result.summary():
                    print(line)
            self.results.append(result)
        return self.results
