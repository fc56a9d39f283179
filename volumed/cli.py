"""The ``volumed`` command.

Errors caused by input (a :class:`volumed.errors.VolumedError`) are printed as one line on
stderr with exit code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from volumed.errors import ConfigError, VolumedError

app = typer.Typer(
    name="volumed",
    help="3D medical imaging on MONAI: read CT/MR volumes and DICOM series, preview them, and run models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
encoders_app = typer.Typer(help="Inspect the registered 3D encoders (STU-Net, CT-ViT, SwinUNETR).", no_args_is_help=True)
app.add_typer(encoders_app, name="encoders")
bundle_app = typer.Typer(help="MONAI bundles: make one from a checkpoint, record and check the weights' sha256.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
dicomweb_app = typer.Typer(help="DICOMweb PACS round trip: QIDO-RS/WADO-RS a series, run a bundle, STOW-RS the DICOM SEG and SR into its study.", no_args_is_help=True)
app.add_typer(dicomweb_app, name="dicomweb")

_CREDENTIALS_HELP = ("File with the PACS credentials: JSON {\"user\": ..., \"password\": ...} or {\"token\": ...}, or one line "
                     "user:password. Default: VOLUMED_DICOMWEB_TOKEN, or VOLUMED_DICOMWEB_USER and VOLUMED_DICOMWEB_PASSWORD, "
                     "from the environment. Never on the command line.")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors on stderr."),
) -> None:
    """volumed: CT/MR volumes in, masks, findings and reports out, in the scan's own geometry."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    if not debug:
        # highdicom logs every copied DICOM module at INFO: noise for a user.
        logging.getLogger("highdicom").setLevel(logging.WARNING)


@app.command()
def info(
    path: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    modality: Optional[str] = typer.Option(None, "--modality", help="Override the modality: CT or MR."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Print a volume's geometry (shape, spacing, orientation, affine), intensity statistics and series UIDs."""
    from volumed.io import read_volume
    from volumed.io.info import describe_volume

    summary = describe_volume(read_volume(path, series_uid=series_uid, modality=modality))
    typer.echo(json.dumps(summary.to_dict(), indent=2) if as_json else summary.to_text())


@app.command()
def preview(
    path: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    label: Optional[Path] = typer.Option(None, "--label", "-l", help="Label map to overlay (any grid: resampled onto the image in world space)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """Write three orthogonal slices (axial, coronal, sagittal) as a PNG, with an optional label overlay."""
    from volumed.inference.preview import render_preview
    from volumed.io import read_label, read_volume

    vol = read_volume(path, series_uid=series_uid)
    lab = read_label(label, vol).data if label is not None else None
    render_preview(vol, output, label=lab, overwrite=overwrite, title=f"{Path(path).name}  {vol.orientation}  "
                   f"{' x '.join(map(str, vol.shape))}  {', '.join(f'{s:.3g}' for s in vol.spacing)} mm")
    typer.echo(f"wrote {output}")


@app.command("segment")
def segment_command(
    image: Optional[Path] = typer.Argument(None, help="NIfTI/NRRD/MHA file or DICOM series folder."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Structure to segment, repeatable: liver, 'left kidney', 'L1 vertebra'."),
    all_terms: bool = typer.Option(False, "--all", help="Also segment every structure the model was trained on (for the image's modality)."),
    free_text: bool = typer.Option(False, "--free-text", help="Accept prompts outside the anatomy vocabulary (flagged free_text in labels.json)."),
    allow_untrained: bool = typer.Option(False, "--allow-untrained", help="Segment prompts the model was never trained on (see --list-terms), flagged untrained in every output."),
    list_terms: bool = typer.Option(False, "--list-terms", help="Print the structures the model was trained on, and exit."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (config.json + model.safetensors); default: bundles/volumed_promptseg_ct/models."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder: masks/, labels.nii.gz, labels.json, statistics.json, preview.png (+ segmentation.dcm, report_sr.dcm for DICOM)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    modality: Optional[str] = typer.Option(None, "--modality", help="CT or MR, when the reader cannot tell (it recognises CT by air at -1000 HU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in OUTPUT."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the network: cpu, cuda, cuda:1."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the sliding windows."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess", help="Keep only the largest connected component of structures that are one body (liver, heart, a kidney, ...; the rule per term is in labels.json), masks inside the body, and on CT the five lung lobes (when all are prompted) filled to the lungs' air; --no-postprocess writes the raw masks with every fragment."),
    anatomy_check: bool = typer.Option(True, "--anatomy-check/--no-anatomy-check", help="Report absent a found structure that lies on the axial slices of structures it never shares a slice with (a femur beside the liver); statistics.json says which. Acts when several structures are found."),
    datalist: Optional[Path] = typer.Option(None, "--datalist", help="Batch: segment every case of this MSD JSON ('testing', else 'training') or CSV into OUTPUT/<case id>/; finished cases are skipped on a re-run; failures are listed in OUTPUT/batch_summary.json."),
    devices: int = typer.Option(1, "--devices", help="Batch: worker processes sharing the cases (with --device cuda: one GPU each)."),
    num_workers: int = typer.Option(1, "--num-workers", help="Batch: threads per worker reading the next volumes ahead (0: none)."),
) -> None:
    """Segment anatomy named by text prompts; masks, label map, statistics and preview on the input's grid.

    The summary says which structures were found (volume, confidence = mean probability inside
    the mask) and which are absent (with an upper bound of their probability).
    """
    from volumed.inference.segment import read_package_config, segment

    if list_terms:
        from volumed.data.vocab import default_vocabulary

        path, config = read_package_config(model)
        vocab = default_vocabulary()
        typer.echo(f"{path}: trained on {len(config.terms)} term(s) for {', '.join(config.modalities)}:")
        for term in config.terms:
            typer.echo(f"  {term}" + ("" if term in vocab else "  (free text: prompt it with --free-text)"))
        return
    if datalist is not None:
        from volumed.inference.batch import run_batch

        if image is not None:
            raise ConfigError("give either IMAGE or --datalist, not both", "volumed segment")
        if output is None:
            raise ConfigError("missing --output/-o OUT (the folder that receives one folder per case)", "volumed segment")
        summary = run_batch(datalist, output, prompt, model_dir=model, all_terms=all_terms, allow_free_text=free_text,
                            allow_untrained=allow_untrained, postprocess=postprocess, anatomy_check=anatomy_check, devices=devices,
                            num_workers=num_workers, device=device, overwrite=overwrite, progress=progress)  # fmt: skip
        for line in summary.lines():
            typer.echo(line, err=line.startswith("failed:"))
        if summary.failed:
            raise typer.Exit(1)
        return
    missing = [what for what, value in (("IMAGE", image), ("--output/-o OUT", output)) if value is None]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)} (or pass --list-terms)", "volumed segment")
    result = segment(image, prompt, model_dir=model, out_dir=output, all_terms=all_terms, allow_free_text=free_text,
                     allow_untrained=allow_untrained, series_uid=series_uid, modality=modality, overwrite=overwrite,
                     device=device, progress=progress, postprocess=postprocess, anatomy_check=anatomy_check)
    for line in result.summary():
        typer.echo(line, err=line.startswith("warning:"))


@app.command("ground")
def ground_command(
    image: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    finding: List[str] = typer.Option([], "--finding", "-f", help="A finding sentence to ground, repeatable: '12 mm nodule in the right lower lobe'."),
    report: Optional[Path] = typer.Option(None, "--report", help="A report text file; each finding clause is grounded (negated ones are listed, with no mask)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Grounding model folder (config.json, grounding.json, model.safetensors) from `volumed train ground`; default: bundles/volumed_ground_ct/models (trained on phantoms: experimental for findings)."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: masks/finding_NN.nii.gz, grounding.json (+ grounding_seg.dcm for DICOM)."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    modality: Optional[str] = typer.Option(None, "--modality", help="CT or MR, when the reader cannot tell."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in OUTPUT."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the network: cpu, cuda."),
    anatomy_model: Optional[str] = typer.Option(None, "--anatomy-model", help="Segmentation model folder that answers sentences naming one structure only ('The right lower lobe of the lung.'); default: the default segmenter; 'self': the grounding model's own location query."),
    body_only: bool = typer.Option(True, "--body-mask/--no-body-mask", help="Keep findings inside the patient's body (CT: tissue above -500 HU, its holes filled, 5 mm margin); no finding in the air, on the table or outside the field of view."),
    organ_margin: float = typer.Option(10.0, "--organ-margin", min=0.0, help="Keep a finding near the structure its sentence names ('... in the right liver lobe': liver), as the anatomy model segments it, grown by this many mm plus the stated size."),
    organ_gate: bool = typer.Option(True, "--organ-gate/--no-organ-gate", help="Turn the structure gate of --organ-margin on or off."),
) -> None:
    """Ground finding sentences: one mask per positive sentence on the input's grid, grounding.json
    (sentence -> mask file, confidence, volume, location) and a DICOM SEG for DICOM input."""
    from volumed.inference.ground import ground

    if report is not None and not report.is_file():
        raise ConfigError("report file does not exist", report)
    result = ground(image, finding, report=report, model_dir=model, out_dir=output, overwrite=overwrite,
                    series_uid=series_uid, modality=modality, device=device, anatomy_model=anatomy_model,
                    body_only=body_only, organ_margin_mm=organ_margin if organ_gate else None)
    for line in result.summary():
        typer.echo(line, err=line.startswith("warning:"))


@app.command("classify")
def classify_command(
    image: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    finding: List[str] = typer.Option([], "--finding", "-f", help="A finding to score besides the model's list (the 18 CT-RATE abnormalities by default), repeatable: 'Lung nodule', 'Liver cyst'."),
    model: Optional[Path] = typer.Option(None, "--model", help="CLIP model folder (clip.json + model.safetensors) from `volumed train clip`."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON file to write (atomically): per-finding probabilities and prompts."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    modality: Optional[str] = typer.Option(None, "--modality", help="CT or MR, when the reader cannot tell."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the network: cpu, cuda."),
) -> None:
    """Zero-shot finding probabilities (CT-CLIP): "X is present." against "X is not present." for
    each finding; a table on stdout and, with -o, a JSON file."""
    from volumed.inference.classify import classify

    if model is None:
        raise ConfigError("no default CLIP model: the shipped bundle was trained on phantoms only and its scores "
                          "on a real CT mean nothing (bundles/volumed_clip_ct/docs/README.md); pass --model DIR, a "
                          "package written by `volumed train clip`, or --model bundles/volumed_clip_ct/models to try "
                          "it anyway (docs/clip.md)", "volumed classify")
    result = classify(image, finding, model_dir=model, output=output, overwrite=overwrite, series_uid=series_uid,
                      modality=modality, device=device)
    typer.echo(result.to_table())
    typer.echo(f"({result.tiles} tile(s) of {' x '.join(map(str, result.input_size))} voxels; zero-shot scores, not calibrated)")
    if output is not None:
        typer.echo(f"wrote {output}")


@app.command("report")
def report_command(
    image: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder: report.txt, report.json (+ report_sr.dcm for DICOM), and the segmentation unless --from-segmentation."),
    from_segmentation: Optional[Path] = typer.Option(None, "--from-segmentation", help="Report on this existing `volumed segment` output folder of IMAGE instead of segmenting again."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Structure to segment, repeatable; default: every structure the model was trained on."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder; default: bundles/volumed_promptseg_ct/models."),
    series_uid: Optional[str] = typer.Option(None, "--series-uid", help="SeriesInstanceUID, when the folder holds several series."),
    modality: Optional[str] = typer.Option(None, "--modality", help="CT or MR, when the reader cannot tell."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in OUTPUT (with --from-segmentation DIR -o DIR: segment's report.txt and SR)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the network: cpu, cuda, cuda:1."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the sliding windows."),
) -> None:
    """Structured, grounded report: organ volumes against approximate adult ranges, lesions, absent
    structures with their evidence and HU flags, one sentence per finding, each linked in report.json
    to its masks and measurements; for DICOM input a DICOM SR (TID 1500) referencing the SEG segments."""
    from volumed.inference.reporting import write_report

    result = write_report(image, output, from_segmentation=from_segmentation, prompts=prompt, model_dir=model,
                          series_uid=series_uid, modality=modality, overwrite=overwrite, device=device, progress=progress)
    for line in result.summary():
        typer.echo(line, err=line.startswith("warning:"))


@app.command("view")
def view_command(
    out_dir: Path = typer.Argument(..., help="Output folder of `volumed segment` / `volumed run` (labels.nii.gz, labels.json, statistics.json, report.txt)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="HTML file to write; default: OUT_DIR/view.html."),
    image: Optional[Path] = typer.Option(None, "--image", help="The segmented image, when the path statistics.json records is not there (moved, another machine)."),
    window: str = typer.Option("soft", "--window", help="CT window: soft (W 400 / L 40 HU, organs), lung (W 1500 / L -600), bone (W 1800 / L 400)."),
    max_voxels: int = typer.Option(16_000_000, "--max-voxels", help="Subsample the volume to at most this many voxels (the page stays under 15 MB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the page if it exists."),
) -> None:
    """Write one self-contained HTML page (no network at view time): axial, coronal and sagittal
    slices with the masks, a slider per view, a checkbox per structure, the statistics table, and
    the report, where hovering a sentence shows the mask of the structure it names."""
    from volumed.inference.view import render_view

    page = render_view(out_dir, output, image=image, window=window, max_voxels=max_voxels, overwrite=overwrite)
    found = sum(s.present for s in page.structures)
    typer.echo(f"wrote {page.path} ({page.size_bytes / 1e6:.1f} MB; {found} of {len(page.structures)} structure(s) found; "
               f"{' x '.join(map(str, page.shape))} voxels of {' x '.join(f'{s:.3g}' for s in page.spacing_mm)} mm)")


@app.command("run")
def run_command(
    bundle: Path = typer.Argument(..., help="Bundle folder, e.g. bundles/volumed_promptseg_ct."),
    image: Path = typer.Argument(..., help="NIfTI/NRRD/MHA file or DICOM series folder."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (what volumed segment writes)."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Structure to segment, repeatable; default: the bundle's prompt list."),
    all_terms: bool = typer.Option(False, "--all", help="Segment every structure the model was trained on."),
    free_text: bool = typer.Option(False, "--free-text", help="Accept prompts outside the anatomy vocabulary."),
    allow_untrained: bool = typer.Option(False, "--allow-untrained", help="Segment prompts the model was never trained on, flagged untrained."),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device; default: the bundle's (cuda if available, else cpu)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs of an earlier run in OUTPUT."),
    postprocess: bool = typer.Option(True, "--postprocess/--no-postprocess", help="Largest connected component of one-body structures."),
    strict_monai: bool = typer.Option(False, "--strict-monai", help="Refuse any MONAI version other than the bundle's monai_version (default: warn)."),
    finding: List[str] = typer.Option([], "--finding", "-f", help="Grounding bundle: a finding sentence to ground; CLIP bundle: an abnormality to score. Repeatable; default: the bundle's list."),
    report: Optional[Path] = typer.Option(None, "--report", help="Grounding bundle: a report text file; each finding clause is grounded."),
) -> None:
    """Run a MONAI bundle's configs/inference.json on one image, after checking the bundle.

    Same config, same overrides and same outputs as
    `python -m monai.bundle run --config_file BUNDLE/configs/inference.json --bundle_root BUNDLE
    --input_image IMAGE --output_dir OUTPUT`; before it runs, the metadata is validated, the
    installed MONAI is compared with monai_version and the weights' sha256 with large_files.yml.
    """
    from volumed.bundle.run import run_bundle

    results = run_bundle(bundle, image, output, prompts=prompt or None, all_terms=all_terms, device=device,
                         overwrite=overwrite, postprocess=postprocess, free_text=free_text,
                         allow_untrained=allow_untrained, strict_monai=strict_monai, findings=finding or None,
                         report=report)
    for result in results:
        for line in result.summary():
            typer.echo(line, err=line.startswith("warning:"))


@dicomweb_app.command("run")
def dicomweb_run(
    url: str = typer.Option(..., "--url", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web (no user:password@ in it)."),
    study: str = typer.Option(..., "--study", help="StudyInstanceUID to segment."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder, e.g. bundles/volumed_promptseg_ct."),
    series: Optional[str] = typer.Option(None, "--series", help="SeriesInstanceUID; default: the study's one series of the bundle's modality (CT)."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Structure to segment, repeatable; default: the bundle's prompt list."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also keep the local outputs here (what volumed run writes); default: a temporary folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the local outputs of an earlier run in --output (the PACS is never overwritten)."),
    credentials_file: Optional[Path] = typer.Option(None, "--credentials-file", help=_CREDENTIALS_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device; default: the bundle's (cuda if available, else cpu)."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for each PACS request."),
) -> None:
    """Segment a study's series from a PACS and store the DICOM SEG and SR into the same study.

    QIDO-RS finds the series, WADO-RS retrieves it, the bundle runs (as `volumed run`), and only
    then STOW-RS stores the SEG and SR. Their UIDs derive from the source series, the bundle's name
    and version and the prompts: running again stores nothing twice ("already stored"). A failed
    step names itself (QIDO, WADO, inference, STOW) and leaves the PACS unchanged.
    """
    from volumed.serve.dicomweb import check_url, load_credentials, run_round_trip

    url = check_url(url)
    outcome = run_round_trip(url, study, bundle, series_uid=series, prompts=prompt,
                             credentials=load_credentials(credentials_file), output_dir=output, overwrite=overwrite,
                             device=device, timeout_s=timeout)
    typer.echo(outcome.summary())


@dicomweb_app.command("watch")
def dicomweb_watch(
    url: str = typer.Option(..., "--url", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web."),
    bundle: Path = typer.Option(..., "--bundle", help="Bundle folder, e.g. bundles/volumed_promptseg_ct."),
    interval: float = typer.Option(60.0, "--interval", help="Seconds between polls, 5 to 3600."),
    prompt: List[str] = typer.Option([], "--prompt", "-p", help="Structure to segment, repeatable; default: the bundle's prompt list."),
    credentials_file: Optional[Path] = typer.Option(None, "--credentials-file", help=_CREDENTIALS_HELP),
    device: Optional[str] = typer.Option(None, "--device", help="Torch device; default: the bundle's."),
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds to wait for each PACS request."),
    once: bool = typer.Option(False, "--once", help="Poll once, process what is new, and exit."),
) -> None:
    """Poll the PACS for series of the bundle's modality without this bundle's SEG, and run the
    round trip on each. SIGINT/SIGTERM: the series in progress is finished, then exit 0."""
    from volumed.serve.dicomweb import check_url, load_credentials, watch

    url = check_url(url)
    outcomes = watch(url, bundle, interval_s=interval, prompts=prompt, credentials=load_credentials(credentials_file),
                     device=device, timeout_s=timeout, once=once, on_outcome=lambda o: typer.echo(o.summary()))
    typer.echo(f"watch stopped: {sum(o.status == 'stored' for o in outcomes)} series processed")


@bundle_app.command("hash")
def bundle_hash(bundle: Path = typer.Argument(..., help="Bundle folder whose models/ weights to record.")) -> None:
    """Record the sha256 of every weight file under BUNDLE/models in BUNDLE/large_files.yml (after retraining)."""
    from volumed.bundle.integrity import RECORD_NAME, record_hashes

    for record in record_hashes(bundle):
        typer.echo(f"{record.sha256}  {record.path}")
    typer.echo(f"wrote {Path(bundle) / RECORD_NAME}")


@bundle_app.command("verify")
def bundle_verify(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    strict_monai: bool = typer.Option(False, "--strict-monai", help="Refuse any MONAI version other than monai_version."),
) -> None:
    """Check a bundle without running it: layout, metadata against the schema, MONAI version, weights' sha256."""
    from volumed.bundle.loader import check_bundle

    root, metadata, notes, hashes = check_bundle(bundle, strict_monai=strict_monai)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)
    typer.echo(f"{root}: version {metadata['version']}, metadata valid, "
               + ", ".join(f"{path} sha256 ok" for path in hashes))


@bundle_app.command("new")
def bundle_new(
    name: str = typer.Argument(..., help="Folder name of the new bundle (under --bundles-dir)."),
    from_checkpoint: Path = typer.Option(..., "--from-checkpoint", help="A trained package folder (config.json + model.safetensors; + grounding.json for --task ground; clip.json + model.safetensors for --task clip), or a weights file (.safetensors/.pt/.ckpt) with --config."),
    task: str = typer.Option("promptseg", "--task", help="What the model does: promptseg (text-prompted segmentation), ground (finding grounding), clip (CT-CLIP zero-shot classification) or report (segmentation, then the structured report)."),
    bundles_dir: Path = typer.Option(Path("bundles"), "--bundles-dir", help="Where bundles live."),
    base: Optional[Path] = typer.Option(None, "--base", help="Bundle whose LICENSE, configs and docs to start from (default: the task's bundle)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Package config.json of a weights-file checkpoint's network."),
    changelog: Optional[str] = typer.Option(None, "--changelog", help="Changelog line of the new version."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle NAME (its version is bumped)."),
) -> None:
    """Write a complete bundle from a training checkpoint: configs, docs, LICENSE, models, sha256 record; version and changelog bumped."""
    from volumed.bundle.new import new_bundle

    made = new_bundle(from_checkpoint, name, task=task, bundles_dir=bundles_dir, base=base, config=config,
                      changelog=changelog, overwrite=overwrite)
    typer.echo(f"wrote {made.path}: version {made.version}, {len(made.terms)} term(s), models/model.safetensors sha256 {made.sha256}")


@encoders_app.command("list")
def encoders_list(
    input_size: int = typer.Option(128, "--input-size", help="Cube edge (voxels) for the FLOPs and memory columns."),
) -> None:
    """Table of encoder presets: parameters, memory and FLOPs (counted on the meta device, so free)."""
    from volumed.encoders.summary import format_table, summarize_all

    typer.echo(format_table(summarize_all(input_size=input_size)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def pretrain(ctx: typer.Context) -> None:
    """VoCo self-supervised pretraining (LightningCLI): volumed pretrain --config configs/pretrain_voco-cpu.yaml [--trainer.max_steps N]."""
    from volumed.tasks.cli_pretrain import main as pretrain_main

    pretrain_main(list(ctx.args))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="What to train: promptseg (text-prompted segmentation), multiclass (plain STU-Net), report (report generator), ground (finding grounding), clip (CT-CLIP volume-report alignment)."),
) -> None:
    """Train a head (LightningCLI): volumed train promptseg --config configs/train_promptseg-cpu.yaml [--trainer.max_steps N].

    Every task takes Lightning's --trainer.devices, --trainer.num_nodes, --trainer.strategy (ddp, fsdp) and --trainer.precision."""
    tasks = {"promptseg": "volumed.tasks.cli_train", "multiclass": "volumed.tasks.cli_multiclass", "report": "volumed.tasks.cli_report",
             "ground": "volumed.tasks.cli_ground", "clip": "volumed.tasks.cli_clip"}
    if task not in tasks:
        raise ConfigError(f"unknown training task {task!r}; available: {', '.join(sorted(tasks))}", "volumed train")
    import importlib

    importlib.import_module(tasks[task]).main(list(ctx.args))


@app.command("finetune")
def finetune_command(
    bundle: Path = typer.Option(..., "--bundle", help="Text-prompted segmentation bundle to start from (e.g. bundles/volumed_promptseg_ct)."),
    datalist: Path = typer.Option(..., "--datalist", help="Training scans: MSD-style JSON or CSV (docs/finetune.md); free-text terms allowed."),
    terms: List[str] = typer.Option([], "--terms", help="Train only these annotated terms (repeatable; default: all)."),
    method: str = typer.Option("full", "--method", help="full | freeze-encoder | lora (peft adapters, merged at the end)."),
    shots: Optional[int] = typer.Option(None, "--shots", help="Use only the first K training scans."),
    name: Optional[str] = typer.Option(None, "--name", help="New bundle's folder name (default <bundle>_finetuned, next to it)."),
    bundles_dir: Optional[Path] = typer.Option(None, "--bundles-dir", help="Where the new bundle goes (default: next to --bundle)."),
    val_datalist: Optional[Path] = typer.Option(None, "--val-datalist", help="Scans for validation Dice and early stopping (default: the datalist's 'validation' section, else the training scans)."),
    max_steps: int = typer.Option(300, "--max-steps", help="Optimizer steps at most."),
    val_every: int = typer.Option(25, "--val-every", help="Steps between validations (one progress-bar epoch)."),
    patience: int = typer.Option(4, "--patience", help="Validations without a better Dice before stopping."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default 3e-4; LoRA 1e-3)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank (--method lora)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoints, CSV and TensorBoard logs (default runs/finetune/<name>)."),
    precision: str = typer.Option("32-true", "--precision", help="Lightning precision: 32-true, bf16-mixed (faster on AVX512-BF16 CPUs and GPUs), 16-mixed."),
    accelerator: str = typer.Option("cpu", "--accelerator", help="Lightning accelerator: cpu, gpu, auto."),
    devices: str = typer.Option("1", "--devices", help="Lightning devices."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patch sampling and augmentation."),
    changelog: Optional[str] = typer.Option(None, "--changelog", help="Changelog line of the new version (default: what was fine-tuned, Dice before and after)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle NAME (version bumped) and earlier work-dir outputs."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Epoch progress bar."),
) -> None:
    """Fine-tune a bundle's text-prompted segmenter on new scans and write the result as a new bundle."""
    import torch

    from volumed.tasks.finetune import finetune

    if threads:
        torch.set_num_threads(threads)
    result = finetune(
        bundle, datalist, name=name, bundles_dir=bundles_dir, terms=terms or None, method=method, shots=shots,
        max_steps=max_steps, val_every=val_every, patience=patience, lr=lr, val_datalist=val_datalist, work_dir=work_dir,
        lora_rank=lora_rank, precision=precision, accelerator=accelerator,
        devices=int(devices) if devices.isdigit() else devices, seed=seed, changelog=changelog, overwrite=overwrite,
        progress=progress,
    )  # fmt: skip
    typer.echo(f"weights loaded from {bundle}:\n{result.load_report}")
    typer.echo(f"method {result.method}: {result.trainable_parameters:,} of {result.total_parameters:,} parameters trained, "
               f"{result.steps} steps" + (" (stopped early)" if result.stopped_early else ""))
    typer.echo(f"validation Dice ({result.validation}):")
    for term in result.terms:
        before, after = result.start_dice.get(term), result.best_dice.get(term)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        typer.echo(f"  {term}: {fmt(before)} -> {fmt(after)}")
    typer.echo(f"wrote bundle {result.bundle} (version {result.version}); logs in {result.work_dir}")
    if result.below_start:
        typer.echo(f"warning: the new bundle scores below {bundle} on the validation scans for "
                   f"{', '.join(result.below_start)}: keep using {bundle} for them, or fine-tune with more shots or "
                   "steps, or a lower --lr (its changelog says so too)", err=True)


@app.command("label-reports")
def label_reports_command(
    reports: Path = typer.Argument(..., help="CSV of reports (UTF-8, a header row)."),
    output: Path = typer.Option(..., "--output", "-o", help="CSV to write: the id column(s) plus one 0/1 column per CT-RATE finding."),
    column: str = typer.Option("report_text", "--column", help="Column that holds the report text."),
    id_column: List[str] = typer.Option([], "--id-column", help="Identifying column to copy, repeatable; default: every column that is neither the text nor a CT-RATE label."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar over the reports."),
) -> None:
    """Label the 18 CT-RATE abnormalities in free-text reports (rules with negation; volumed.text.labels)."""
    from volumed.text.label_csv import label_report_csv

    n, positives = label_report_csv(reports, output, text_column=column, id_columns=id_column or None,
                                    overwrite=overwrite, progress=progress)
    typer.echo(f"wrote {output}: {n} report(s), {positives} positive finding(s)")


@app.command("evaluate-reports")
def evaluate_reports_command(
    pred: Path = typer.Option(..., "--pred", help="CSV of generated reports."),
    ref: Path = typer.Option(..., "--ref", help="CSV of reference reports (paired by a shared id column, else by row order)."),
    column: str = typer.Option("report_text", "--column", help="Text column in both files."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON file for the scores."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L and clinical-efficacy P/R/F1 (micro, macro) of generated reports."""
    from volumed.io.atomic import atomic_write_text, check_writable
    from volumed.metrics.report import evaluate_reports
    from volumed.text.report_table import pair_tables, read_report_table

    if output is not None:
        check_writable(output, overwrite)
    predictions, references, _ = pair_tables(read_report_table(pred, text_column=column),
                                             read_report_table(ref, text_column=column))
    metrics = evaluate_reports(predictions, references)
    typer.echo(metrics.to_table())
    if metrics.meteor_wordnet is None:
        typer.echo("warning: no WordNet found (apt-get install wordnet-base, or set VOLUMED_WORDNET_DIR): "
                   "METEOR counts exact and stem matches only", err=True)
    if output is not None:
        atomic_write_text(output, json.dumps(metrics.to_dict(), indent=2) + "\n", overwrite=overwrite)
        typer.echo(f"wrote {output}")


@app.command("evaluate-grounding")
def evaluate_grounding_command(
    datalist: Path = typer.Argument(..., help="Finding-level datalist (JSON: image, findings[{text, mask, mask_label, category}])."),
    model: Path = typer.Option(..., "--model", help="Grounding model folder (config.json, grounding.json, model.safetensors)."),
    section: str = typer.Option("validation", "--section", help="Datalist section to score."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON file: the summary and one row per finding."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    anatomy_model: Optional[str] = typer.Option(None, "--anatomy-model", help="As for `volumed ground`."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the network: cpu, cuda."),
    body_only: bool = typer.Option(True, "--body-mask/--no-body-mask", help="As for `volumed ground`."),
    organ_margin: float = typer.Option(10.0, "--organ-margin", min=0.0, help="As for `volumed ground`."),
    organ_gate: bool = typer.Option(True, "--organ-gate/--no-organ-gate", help="As for `volumed ground`."),
) -> None:
    """ReXGroundingCT-style scores of a grounding model on a finding-level datalist: per-finding
    Dice, hit rate (all, focal, non-focal), component hit rate, false positives on negated and
    absent sentences."""
    from dataclasses import asdict

    from volumed.data.grounding_datalist import load_grounding_datalist
    from volumed.inference.ground import GroundingPredictor, evaluate_grounding
    from volumed.io.atomic import atomic_write_text, check_writable

    if output is not None:
        check_writable(output, overwrite)
    cases = load_grounding_datalist(datalist, section=section)
    predictor = GroundingPredictor.from_package(model, device=device, anatomy_model=anatomy_model,
                                                 body_only=body_only,
                                                 organ_margin_mm=organ_margin if organ_gate else None)
    metrics, rows = evaluate_grounding(predictor, cases)
    summary = asdict(metrics)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if output is not None:
        record = {"datalist": str(datalist), "section": section, "model": str(model), "summary": summary,
                  "findings": [{"image": str(image), "text": text, **asdict(score)} for image, text, score in rows]}
        atomic_write_text(output, json.dumps(record, indent=2) + "\n", overwrite=overwrite)
        typer.echo(f"wrote {output}")


def main(argv: Optional[List[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="volumed")
    except VolumedError as err:
        if debug:
            raise
        msg = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        typer.echo(f"volumed: error: {msg}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("volumed: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
