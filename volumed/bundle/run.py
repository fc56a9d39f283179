"""``volumed run BUNDLE IMAGE -o OUT``: a bundle's ``configs/inference.json``, run the way
``python -m monai.bundle run`` runs it, after the bundle's checks.

Both go through MONAI's ``ConfigWorkflow`` with the same config and the same overrides
(``bundle_root``, ``input_image``, ``output_dir``, ``prompts``, ...), so they write the same files;
``volumed run`` adds the checks of :func:`volumed.bundle.loader.check_bundle` before anything is
parsed (the config's network loader repeats the weight checks, so MONAI's runner is covered too)
and turns the bundle's errors into one-line messages.

Security: like MONAI's runner, this executes the ``_target_`` and ``$`` expressions of the
bundle's config; run only bundles you trust.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from volumed.errors import ConfigError

__all__ = ["run_bundle", "bundle_overrides"]


def bundle_overrides(
    bundle: str | Path,
    image: str | Path,
    output_dir: str | Path,
    *,
    prompts: Sequence[str] | None = None,
    all_terms: bool = False,
    device: str | None = None,
    overwrite: bool = False,
    postprocess: bool = True,
    free_text: bool = False,
    allow_untrained: bool = False,
    progress: bool = False,
    dicom_uids=None,
    findings: Sequence[str] | None = None,
    report: str | Path | None = None,
) -> dict:
    """The config-id overrides that ``volumed run`` passes, the same ids a user passes to
    ``python -m monai.bundle run`` (``--input_image``, ``--output_dir``, ``--prompts``, ...).

    ``prompts`` ``None`` keeps the bundle's default prompt list (``displayable_configs#prompts``)
    unless ``all_terms``, which then segments every trained term. ``dicom_uids`` (a
    :class:`volumed.io.writer.DicomOutputUids`) fixes the UIDs of the DICOM SEG and SR
    (``evaluator#dicom_uids``, a bundle-runner argument, not a top-level config id).

    For the grounding bundle (``bundles/volumed_ground_ct``), ``findings`` replaces its default
    finding sentences (``displayable_configs#findings``) and ``report`` (a text or a text file)
    adds a report's finding clauses, as ``volumed ground --finding/--report`` do; a report alone
    grounds the report only. For the CT-CLIP bundle (``bundles/volumed_clip_ct``), ``findings``
    are the abnormality names to score (default: the bundle's list).
    """
    overrides: dict = {"bundle_root": str(bundle), "input_image": str(image), "output_dir": str(output_dir),
                       "overwrite": bool(overwrite), "free_text": bool(free_text),
                       "allow_untrained": bool(allow_untrained), "progress": bool(progress),
                       "print_summary": False}  # the caller prints the results
    if prompts:
        overrides["prompts"] = list(prompts)
    elif all_terms:
        overrides["prompts"] = []
    if all_terms:
        overrides["all_terms"] = True
    if findings:
        overrides["findings"] = list(findings)
    elif report:
        overrides["findings"] = []
    if report:
        overrides["report"] = str(report)
    if device is not None:
        overrides["device"] = f"$torch.device({device!r})"
    if not postprocess:
        overrides["displayable_configs#connected_components"] = False
    if dicom_uids is not None:
        from dataclasses import asdict

        overrides["evaluator#dicom_uids"] = asdict(dicom_uids)
    return overrides


def run_bundle(bundle: str | Path, image: str | Path, output_dir: str | Path, *, strict_monai: bool = False, **options) -> list:
    """Check ``bundle`` (:func:`volumed.bundle.loader.check_bundle`), then run its
    ``configs/inference.json`` on ``image`` into ``output_dir``; ``options`` as in
    :func:`bundle_overrides`. Returns what the config's ``run`` returns (for the promptseg bundle,
    one :class:`volumed.inference.segment.SegmentationResult` per image; for the grounding bundle, one
    :class:`volumed.inference.ground.GroundingResult`; for the CT-CLIP bundle, one
    :class:`volumed.inference.classify.ClassificationResult`).

    Raises:
        ConfigError, WeightsLoadError: the bundle's checks (naming the file and the problem).
        VolumedError: any input error of the workflow (image, prompts, output folder).
    """
    from monai.bundle import ConfigWorkflow

    from volumed.bundle.loader import INFERENCE_CONFIG, check_bundle
    from volumed.errors import VolumedError

    from volumed.errors import VolumeReadError

    root, _, notes, _ = check_bundle(bundle, strict_monai=strict_monai)
    # Cheap before expensive: parsing the config loads the network before the image is read.
    if str(image) and not Path(image).exists():
        raise VolumeReadError("no such file or folder", image)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    with warnings.catch_warnings():
        # MONAI warns that configs run code on every parse; check_bundle has vetted this bundle's files.
        warnings.simplefilter("ignore")
        workflow = ConfigWorkflow(config_file=str(root / INFERENCE_CONFIG), meta_file=str(root / "configs" / "metadata.json"),
                                  logging_file=False, workflow_type="infer", **bundle_overrides(root, image, output_dir, **options))
    try:
        workflow.initialize()
        results = workflow.run()
        workflow.finalize()
    except RuntimeError as err:
        # MONAI wraps errors raised while evaluating a config expression; give back the user's error.
        cause = err
        while cause is not None and not isinstance(cause, VolumedError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from err
        raise
    out = results[0] if results else []
    if not isinstance(out, list):
        raise ConfigError(f"the bundle's run gave {type(out).__name__}, not a list of results", root / INFERENCE_CONFIG)
    return out
