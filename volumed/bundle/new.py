"""``volumed bundle new --from-checkpoint CKPT --task promptseg|ground NAME``: a complete bundle
from a training result, so that fine-tuning ends in a bundle in one command.

The new bundle is the base bundle (``bundles/volumed_promptseg_ct`` by default: LICENSE, configs,
docs) with ``models/`` replaced by the checkpoint's package, and everything that depends on the
weights made to agree with them: the label names (``channel_def`` and ``num_channels`` of the
``pred`` output, ``displayable_configs#prompts``) become the package's terms, the version is
bumped (minor) with a changelog entry, the MONAI / PyTorch / NumPy versions become the installed
ones, and ``large_files.yml`` records the new weights' sha256. The result is validated against the
schema before it is published; it is staged next to the destination and moved in whole.

``--task ground`` (``bundles/volumed_ground_ct``): the checkpoint is a grounding package
(config.json + grounding.json + model.safetensors, what ``volumed train ground`` writes) or a
weights file whose ``--config`` has a grounding.json beside it. Its label names are the bundle's
default finding sentences, which do not depend on the weights, so ``channel_def`` and
``displayable_configs#findings`` are kept.

``--task clip`` (``bundles/volumed_clip_ct``): the checkpoint is a CLIP package (clip.json +
model.safetensors, what ``volumed train clip`` writes) or a weights file with ``--config`` a
clip.json. Its terms are the package's default findings; the bundle's label names (its default
abnormalities) are kept.

``--task report`` (``bundles/volumed_report_ct``): the checkpoint is a segmentation package, as for
``promptseg`` (the report bundle segments, then writes the structured report), and the label names
become its terms in the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from volumed.errors import ConfigError, OutputExistsError

__all__ = ["TASKS", "NewBundle", "new_bundle", "bump_version", "check_bundle_name"]

TASKS = {"promptseg": "volumed_promptseg_ct", "ground": "volumed_ground_ct", "clip": "volumed_clip_ct",
         "report": "volumed_report_ct"}  # task -> the bundle whose configs a new bundle starts from


@dataclass(frozen=True)
class NewBundle:
    """What :func:`new_bundle` wrote: the folder, its version and terms, the weights' sha256."""

    path: Path
    version: str
    terms: tuple[str, ...]
    sha256: str


def bump_version(version: str) -> str:
    """``"0.1.3"`` -> ``"0.2.0"``: new weights are a new minor version of the bundle."""
    try:
        major, minor, _ = (int(v) for v in str(version).split("+")[0].split("-")[0].split("."))
    except ValueError as err:
        raise ConfigError(f"bundle version {version!r} is not MAJOR.MINOR.PATCH", "configs/metadata.json") from err
    return f"{major}.{minor + 1}.0"


@dataclass(frozen=True)
class _PackageKind:
    """How one task's model package is read, built and written (``config_name`` is the file that
    describes its network; ``build`` makes the untrained network from a folder holding it, with the
    other arguments ``save`` takes after the model)."""

    label: str
    config_name: str
    load: Callable[[Path], tuple]
    build: Callable[[Path], tuple]
    save: Callable[..., object]


def _package_kind(task: str) -> _PackageKind:
    from volumed.inference.package import CONFIG_NAME, build_model, load_package, read_config, save_package

    if task == "ground":
        from volumed.heads.grounding import (
            build_grounding_model,
            load_grounding_package,
            read_grounding_config,
            save_grounding_package,
        )

        def build_ground(folder: Path) -> tuple:
            package, grounding = read_config(folder), read_grounding_config(folder)  # refuses a folder without grounding.json
            return build_grounding_model(package, gate_kernel=grounding.gate_kernel), (package, grounding)

        return _PackageKind("grounding package", CONFIG_NAME, load_grounding_package, build_ground, save_grounding_package)
    if task == "clip":
        from volumed.heads.clip import CLIP_CONFIG_NAME, build_clip_model, load_clip_package, read_clip_config, save_clip_package

        def build_clip(folder: Path) -> tuple:
            config = read_clip_config(folder)
            return build_clip_model(config), (config,)

        return _PackageKind("CLIP package", CLIP_CONFIG_NAME, load_clip_package, build_clip, save_clip_package)

    def build_promptseg(folder: Path) -> tuple:
        package = read_config(folder)
        return build_model(package), (package,)

    return _PackageKind("package", CONFIG_NAME, load_package, build_promptseg, save_package)


def _package_from_checkpoint(checkpoint: Path, config: Path | None, staging_models: Path, task: str = "promptseg") -> None:
    """Write ``staging_models`` (the task's package: config.json + model.safetensors, plus
    grounding.json for ``ground``; clip.json + model.safetensors for ``clip``) from a package
    folder, or from a weights file (.safetensors / .pt / .pth / .ckpt, read without unpickling code,
    a Lightning checkpoint's ``net.`` prefix removed) and the package config describing its network
    (``config``, default: the one beside the file)."""
    from volumed.encoders.weights import load_encoder_weights, read_state_dict

    kind = _package_kind(task)
    if checkpoint.is_dir():
        if config is not None:
            raise ConfigError(f"--config is for a weights file; a package folder brings its own {kind.config_name}", config)
        model, *rest = kind.load(checkpoint)  # strict: every key, every shape
        kind.save(model, *rest, staging_models)
        return
    if not checkpoint.is_file():
        raise ConfigError(f"no such checkpoint (a {kind.label} folder or a .safetensors/.pt/.ckpt file)", checkpoint)
    config_path = Path(config or checkpoint.parent / kind.config_name)
    if not config_path.is_file():
        raise ConfigError(f"a weights file needs the {kind.label} {kind.config_name} of its network (--config); none at "
                          f"{config_path}", checkpoint)
    if config_path.name != kind.config_name:
        raise ConfigError(f"--config must be a {kind.label}'s {kind.config_name}", config_path)
    model, rest = kind.build(config_path.parent)
    state = read_state_dict(checkpoint).state_dict
    if any(k.startswith("net.") for k in state):  # a Lightning module's checkpoint
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        raise ConfigError("the checkpoint holds LoRA adapters not merged into their layers (a `volumed finetune "
                          "--method lora` training checkpoint); use the merged package that run wrote "
                          "(<work-dir>/package) or the bundle it made", checkpoint)
    load_encoder_weights(model, state, key_map=None, strict=True)
    kind.save(model, *rest, staging_models)


def check_bundle_name(name: str, source: str = "NAME") -> None:
    """Refuse a bundle folder name that is not letters, digits, ``_`` or ``-`` (``source``: the
    argument to name in the message)."""
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"bundle name must be letters, digits, '_' or '-', got {name!r}", source)


def new_bundle(
    checkpoint: str | Path,
    name: str,
    *,
    task: str = "promptseg",
    bundles_dir: str | Path = "bundles",
    base: str | Path | None = None,
    config: str | Path | None = None,
    changelog: str | None = None,
    overwrite: bool = False,
) -> NewBundle:
    """Write ``bundles_dir/name`` from ``checkpoint`` (see the module docstring).

    Args:
        checkpoint: a package folder (``config.json`` + ``model.safetensors``, what
            ``volumed train promptseg --package_dir`` writes) or a weights file with ``config``.
        name: the bundle's folder name (letters, digits, ``_``, ``-``).
        task: ``"promptseg"``, ``"ground"`` (a grounding package) or ``"clip"`` (a CLIP package);
            see the module docstring.
        bundles_dir: where bundles live.
        base: the bundle whose LICENSE, configs and docs are copied; default ``bundles_dir/<task's bundle>``.
            When ``name`` already exists (an update, with ``overwrite``), that bundle is the base.
        config: the package ``config.json`` of a weights-file checkpoint.
        changelog: the new version's changelog line (default: names the checkpoint).
        overwrite: replace an existing bundle ``name`` (its version is bumped).

    Raises:
        ConfigError: unknown task, bad name, missing base, a checkpoint that does not fit its config.
        OutputExistsError: ``name`` exists and not ``overwrite``.
    """
    from volumed.bundle.integrity import record_hashes
    from volumed.bundle.metadata import validate_metadata
    from volumed.inference.package import read_config

    if task not in TASKS:
        raise ConfigError(f"unknown bundle task {task!r}; available: {', '.join(sorted(TASKS))}", "--task")
    check_bundle_name(name)
    root = Path(bundles_dir)
    dest = root / name
    if dest.exists() and not overwrite:
        raise OutputExistsError("bundle exists already; pass --overwrite to replace its weights (the version is bumped)", dest)
    base_dir = dest if dest.exists() else Path(base) if base is not None else root / TASKS[task]
    if not (base_dir / "configs" / "metadata.json").is_file():
        raise ConfigError("base bundle has no configs/metadata.json", base_dir)
    checkpoint = Path(checkpoint)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.new-", dir=root))
    try:
        for item in ("LICENSE", "configs", "docs"):
            src = base_dir / item
            if src.is_dir():
                shutil.copytree(src, staging / item)
            elif src.is_file():
                shutil.copy2(src, staging / item)
        _package_from_checkpoint(checkpoint, Path(config) if config else None, staging / "models", task)
        if task == "clip":
            from volumed.heads.clip import read_clip_config

            terms = list(read_clip_config(staging / "models").findings)
        else:
            terms = list(read_config(staging / "models").terms)
        if not terms and task in ("promptseg", "report"):
            raise ConfigError("the checkpoint's package lists no trained terms", checkpoint)
        base_meta = json.loads((base_dir / "configs" / "metadata.json").read_text(encoding="utf-8"))
        note = changelog or f"weights from {checkpoint.name}"
        _update_configs(staging, terms, note, channels=task in ("promptseg", "report"))
        (sha,) = [r.sha256 for r in record_hashes(staging, name)]
        metadata = validate_metadata(staging)
        _readme_provenance(staging / "docs" / "README.md", name, str(metadata["version"]), base_dir.name,
                           str(base_meta.get("version", "?")), note, terms, _package_kind(task).config_name)
        _plain_modes(staging)
        _publish(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return NewBundle(dest, str(metadata["version"]), tuple(terms), sha)


def _update_configs(staging: Path, terms: list[str], changelog: str, *, channels: bool = True) -> None:
    """Version, changelog and software versions; with ``channels``, the label names (``pred``'s
    channel_def, ``displayable_configs#prompts``) become ``terms``."""
    import monai
    import numpy
    import torch

    from volumed.io.atomic import atomic_write_text

    meta_path = staging / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    version = bump_version(meta["version"])
    meta["version"] = version
    meta["changelog"] = {version: changelog, **meta.get("changelog", {})}
    meta["monai_version"] = monai.__version__.split("+")[0]
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = numpy.__version__
    if not channels:
        atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n", overwrite=True)
        return
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["num_channels"] = len(terms)
    pred["channel_def"] = {str(k): t for k, t in enumerate(terms)}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n", overwrite=True)
    infer_path = staging / "configs" / "inference.json"
    if infer_path.is_file():
        infer = json.loads(infer_path.read_text(encoding="utf-8"))
        infer.setdefault("displayable_configs", {})["prompts"] = terms
        atomic_write_text(infer_path, json.dumps(infer, indent=2) + "\n", overwrite=True)


#: The lines ``volumed bundle new`` puts at the top of a new bundle's docs/README.md (replaced, not
#: stacked, when the bundle is updated again).
README_BEGIN, README_END = "<!-- volumed bundle new: provenance -->", "<!-- end of provenance -->"


def _readme_provenance(readme: Path, name: str, version: str, base: str, base_version: str, note: str,
                       terms: list[str], config_name: str) -> None:
    """Head the copied README with what this bundle is: the base bundle's text below it describes
    the base bundle's weights (their training data and scores), not these."""
    from volumed.io.atomic import atomic_write_text

    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    if text.startswith(README_BEGIN) and README_END in text:  # an update: the text is still the first base's
        old_head, text = text.split(README_END, 1)
        text = text.lstrip("\n")
        first = re.search(r"copied from `([^`]+)` (\S+?), so", old_head)
        if first:
            base, base_version = first.group(1), first.group(2)
    shown = ", ".join(terms[:12]) + (f" and {len(terms) - 12} more" if len(terms) > 12 else "")
    head = (f"{README_BEGIN}\n# {name} {version}: made by `volumed bundle new` ({note})\n\n"
            f"**Read this first.** These weights are not the ones the text below describes: the configs and the "
            f"text are copied from `{base}` {base_version}, so its figures (training data, Dice, timings) are "
            f"that bundle's. This bundle's own record is `configs/metadata.json` (version and changelog) and "
            f"`models/{config_name}` (the training recipe and the scores measured with these weights, under "
            f"`training` and `metrics`); its weights' sha256 is in `large_files.yml`."
            + (f" Terms it was trained on: {shown}." if terms else "") + f"\n{README_END}\n\n")
    atomic_write_text(readme, head + text, overwrite=True)


def _plain_modes(root: Path) -> None:
    """Folders 0777 and files 0666 less the umask, as if written directly: the temporary folder
    (``mkdtemp``) and atomically written files (``mkstemp``) start private (0700 / 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _publish(staging: Path, dest: Path) -> None:
    """Move the staged bundle to ``dest``; an existing ``dest`` is swapped out whole."""
    if not dest.exists():
        os.replace(staging, dest)
        staging.mkdir()  # the caller's cleanup expects it
        return
    trash = staging.parent / f"{staging.name}.old"
    os.replace(dest, trash)
    try:
        os.replace(staging, dest)
    except OSError:
        os.replace(trash, dest)
        raise
    staging.mkdir()
    shutil.rmtree(trash, ignore_errors=True)
