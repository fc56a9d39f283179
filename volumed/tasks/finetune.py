"""``volumed finetune``: adapt a bundle's text-prompted segmenter to a new cohort; the result is a new bundle.

Pipeline::

    bundle B (models/config.json + model.safetensors, sha256 checked against large_files.yml)
        --volumed.encoders.weights.load_encoder_weights (the report is printed)-->
    PromptSegModule with B's network, preprocessing, patch, padding, presence rule
        --method--> full            every weight trains
                    freeze-encoder  the STU-Net encoder is frozen; text conditioning and decoder train
                    lora            peft LoRA adapters (rank r) on every Conv3d of the encoder and
                                    every Linear/Conv3d of the decoder; the rest is frozen, and the
                                    adapters are merged back into plain weights at the end
    datalist (MSD JSON or CSV, volumed.tasks.promptseg_data) [--terms T ...] [--shots K]
        --> PromptSegDataModule at B's spacing and window (real scans only, no synthesis)
    Lightning Trainer: max_steps, validation Dice every val_every steps on whole scans (their
        original grid, the path of ``volumed segment``), EarlyStopping on val/dice, the best
        weights kept (ModelCheckpoint), CSV and TensorBoard logs, an epoch progress bar
        --> package (work_dir/package) --> ``volumed bundle new NAME`` (version bump, changelog)

New terms need no new output layer: a term is a text query (its MiniLM embedding), so a structure
the bundle never saw is trained by naming it in the datalist (free text allowed). The package's
term list is the bundle's plus the fine-tuned ones; the old terms were not trained on the new data,
so full fine-tuning may degrade them (forgetting): ``freeze-encoder`` and ``lora`` change less.

Validation: ``val_datalist`` (section ``validation``, else ``training``). Without one, the datalist's
``validation`` section when it has one; otherwise the training scans themselves, which serves
early stopping only and says nothing about unseen scans (the log says so).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from volumed.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("full", "freeze-encoder", "lora")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        bundle: the new bundle folder; version: its version.
        method: ``full`` | ``freeze-encoder`` | ``lora``.
        terms: the fine-tuned terms.
        steps: optimizer steps run; stopped_early: EarlyStopping ended the run.
        start_dice / best_dice: validation Dice per term before training and of the kept weights.
        trainable_parameters / total_parameters: during training (LoRA adapters included).
        validation: where validation Dice came from (a datalist section, or "training scans").
        work_dir: checkpoints, CSV and TensorBoard logs, the package.
        load_report: the weight loader's report.
    """

    bundle: Path
    version: str
    method: str
    terms: list[str]
    steps: int
    stopped_early: bool
    start_dice: dict[str, float] = field(default_factory=dict)
    best_dice: dict[str, float] = field(default_factory=dict)
    trainable_parameters: int = 0
    total_parameters: int = 0
    validation: str = ""
    work_dir: Path = Path(".")
    load_report: str = ""

    @property
    def below_start(self) -> list[str]:
        """Terms whose kept weights score below the base bundle's on the validation scans (the
        checkpoint kept is the best *during* training; the start is not one of the candidates)."""
        return below_start(self.start_dice, self.best_dice)


def below_start(start_dice: dict[str, float], best_dice: dict[str, float]) -> list[str]:
    """Terms with a validation Dice lower after fine-tuning than before it."""
    return [t for t, v in best_dice.items() if t in start_dice and v < start_dice[t]]

    def to_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return d


def lora_targets(net: torch.nn.Module, rank: int) -> list[str]:
    """Names of the layers that get LoRA adapters: every Conv3d, and every Linear outside the
    attention blocks (``nn.MultiheadAttention`` uses its weights directly, not its ``out_proj``
    module, so an adapter there would never run), whose narrower side exceeds ``rank`` (a rank-r
    update of an r-channel layer is no cheaper than the layer; the 1-channel stem trains fully).
    1 x 1 x 1 convolutions (shortcuts, FPN laterals) train fully too: they are small, and peft's
    merge of a 1 x 1 x 1 Conv3d adapter takes it for a 2D one and fails (peft 0.21)."""
    names = []
    for name, module in net.named_modules():
        if ".cross_attn" in name or name.endswith("cross_attn"):
            continue
        if isinstance(module, torch.nn.Conv3d) and min(module.in_channels, module.out_channels) > rank:
            if tuple(module.kernel_size) != (1, 1, 1):
                names.append(name)
        elif isinstance(module, torch.nn.Linear) and min(module.in_features, module.out_features) > rank:
            names.append(name)
    return names


def apply_method(net: torch.nn.Module, method: str, *, lora_rank: int = 8, lora_alpha: float = 16.0) -> torch.nn.Module:
    """Set what trains (in place; returns ``net``). See the module docstring for the methods."""
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}", "--method")
    net.requires_grad_(True)
    if method == "freeze-encoder":
        net.segmenter.encoder.requires_grad_(False)
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        if lora_rank < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {lora_rank}", "--lora-rank")
        targets = lora_targets(net, int(lora_rank))
        layers = {n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)) and "cross_attn" not in n}
        narrow = layers - set(targets)  # attention stays frozen
        config = LoraConfig(r=int(lora_rank), lora_alpha=float(lora_alpha), target_modules=targets, lora_dropout=0.0)
        inject_adapter_in_model(config, net)
        for name, p in net.named_parameters():
            # Adapters train; so do the narrow layers left without one (the stem: a few hundred weights).
            p.requires_grad_("lora_" in name or name.rpartition(".")[0] in narrow)
    return net


def merge_lora(net: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into their base layers and put the plain layers back (in place): the
    network has the bundle's architecture and state-dict keys again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, module.get_base_layer())
    return net


def count_parameters(net: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    total = sum(p.numel() for p in net.parameters())
    return sum(p.numel() for p in net.parameters() if p.requires_grad), total


def _has_section(datalist: Path, section: str) -> bool:
    if datalist.suffix.lower() != ".json":
        return False
    try:
        return bool(json.loads(datalist.read_text()).get(section))
    except (OSError, ValueError):
        return False


def finetune(
    bundle: str | Path,
    datalist: str | Path,
    *,
    name: str | None = None,
    bundles_dir: str | Path | None = None,
    terms: Sequence[str] | None = None,
    method: str = "full",
    shots: int | None = None,
    max_steps: int = 300,
    val_every: int = 25,
    patience: int = 4,
    lr: float | None = None,
    val_datalist: str | Path | None = None,
    work_dir: str | Path | None = None,
    lora_rank: int = 8,
    batch_size: int = 1,
    precision: str = "32-true",
    accelerator: str = "cpu",
    devices: int | str = 1,
    seed: int = 0,
    changelog: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``bundle`` on ``datalist`` and write the new bundle ``bundles_dir/name``.

    Args:
        bundle: a promptseg bundle folder (``configs/metadata.json``, ``models/``).
        datalist: training scans (:mod:`volumed.tasks.promptseg_data` formats; free-text terms allowed).
        name: the new bundle's folder name (default ``<bundle>_finetuned``); bundles_dir: where it
            goes (default: next to ``bundle``).
        terms: train only these annotated terms (default: all of the datalist's).
        method: ``full``, ``freeze-encoder`` or ``lora`` (module docstring).
        shots: use only the first K training scans.
        max_steps: optimizer steps at most; val_every: steps between validations; patience:
            validations without improvement before EarlyStopping ends the run.
        lr: AdamW learning rate (default 3e-4, LoRA 1e-3).
        val_datalist: scans to validate on (module docstring for the default).
        work_dir: checkpoints, logs and the package (default ``runs/finetune/<name>``).
        lora_rank: LoRA rank. batch_size: patches per step.
        precision, accelerator, devices: Lightning Trainer settings (``bf16-mixed`` is faster on
            CPUs with AVX512-BF16, BENCHMARKS.md).
        changelog: the new version's changelog line (default: says what was fine-tuned).
        overwrite: replace an existing bundle ``name`` (its version is bumped) and work_dir outputs.

    Raises:
        ConfigError, DatalistError, WeightsLoadError, OutputExistsError: before any training.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from volumed.bundle.loader import check_bundle
    from volumed.bundle.new import check_bundle_name, new_bundle
    from volumed.environment import software_versions
    from volumed.errors import OutputExistsError
    from volumed.inference.package import read_config
    from volumed.tasks.promptseg import PromptSegDataModule, PromptSegModule

    bundle = Path(bundle)
    datalist = Path(datalist)
    if method not in METHODS:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}", "--method")
    if shots is not None and shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}", "--shots")
    if max_steps < 1 or val_every < 1 or patience < 1:
        raise ConfigError(f"max_steps, val_every and patience must be positive, got {max_steps}, {val_every}, {patience}", "finetune")
    if not datalist.is_file():
        raise ConfigError("datalist does not exist", datalist)
    check_bundle(bundle)  # layout, metadata, weights' sha256 and MONAI version: before anything else
    models = bundle / "models"
    base = read_config(models)
    name = name or f"{bundle.name}_finetuned"
    check_bundle_name(name, "--name")  # before training, not after it
    bundles_dir = Path(bundles_dir) if bundles_dir is not None else bundle.parent
    dest = bundles_dir / name
    if dest.resolve() == bundle.resolve() and not overwrite:
        raise OutputExistsError("fine-tuning into the bundle it starts from needs --overwrite (its version is bumped)", dest)
    if dest.exists() and not overwrite:
        raise OutputExistsError("bundle exists already; pass --overwrite or another --name", dest)
    work = Path(work_dir) if work_dir is not None else Path("runs") / "finetune" / name
    if (work / "package").exists() and not overwrite:
        raise OutputExistsError("work folder holds an earlier fine-tuning run; pass --overwrite or another --work-dir", work)

    if val_datalist is not None:
        val_path, val_section = Path(val_datalist), "validation" if _has_section(Path(val_datalist), "validation") else "training"
        validation = f"{val_path} ({val_section})"
    elif _has_section(datalist, "validation"):
        val_path, val_section = datalist, "validation"
        validation = f"{datalist} (validation)"
    else:
        val_path, val_section = datalist, "training"
        validation = "training scans"
        log.warning("no validation scans: early stopping watches Dice on the training scans, which says nothing "
                    "about unseen scans (give --val-datalist)")  # fmt: skip

    pre = base.preprocessing
    L.seed_everything(seed, workers=True)
    dm = PromptSegDataModule(
        str(datalist), patch_size=tuple(base.patch_size), batch_size=batch_size, fg_rate=0.8, sampling="class",
        augment=True, samples_per_epoch=val_every * batch_size, target_spacing=tuple(pre.get("target_spacing") or (1.0, 1.0, 1.0)),
        ct_window=tuple(pre.get("ct_window", (-1000.0, 1000.0))), margin=int(pre.get("margin", 8)),
        default_modality=str(pre.get("modality", "CT")), allow_free_text=True, seed=seed, synthetic=False,
        pad_mode=base.pad_mode, terms=list(terms) if terms else None, max_cases=shots,
        val_datalist=str(val_path), val_section=val_section,
    )  # fmt: skip
    module = PromptSegModule(
        encoder=base.encoder, encoder_kwargs=base.encoder_kwargs, decoder_kwargs=base.decoder_kwargs,
        init_weights=str(models / "model.safetensors"), text_model=base.text_model,
        lr=lr if lr is not None else (1e-3 if method == "lora" else 3e-4), warmup_steps=min(20, max_steps // 10),
        patch_size=tuple(base.patch_size), overlap=base.overlap, threshold=base.threshold, presence=base.presence, seed=seed,
    )  # fmt: skip
    load_report = getattr(module, "init_load_report", None)
    report_text = load_report.format_table() if load_report is not None else ""
    if report_text:
        log.info("weights from %s:\n%s", models / "model.safetensors", report_text)
    module.model_config.postprocess = dict(base.postprocess)
    apply_method(module.net, method, lora_rank=lora_rank)
    trainable, total = count_parameters(module.net)
    log.info("method %s: %d of %d parameters train", method, trainable, total)

    work.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(dirpath=work / "checkpoints", filename="best", monitor="val/dice", mode="max",
                                 save_top_k=1, save_weights_only=True, enable_version_counter=False)  # fmt: skip
    early = EarlyStopping(monitor="val/dice", mode="max", patience=patience, min_delta=0.0)
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, precision=precision, max_steps=max_steps, val_check_interval=val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=min(10, val_every),
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=work, callbacks=[checkpoint, early],
        logger=[CSVLogger(work, name="logs"), TensorBoardLogger(work, name="tensorboard")],
    )  # fmt: skip
    start = trainer.validate(module, datamodule=dm, verbose=False)
    start_dice = dict(getattr(module, "validation_dice", {}))
    if not dm.validation_cases:
        raise ConfigError(f"no validation scans with the fine-tuned terms in {validation}", val_path)
    log.info("validation Dice before fine-tuning (%s): %s", validation, _fmt(start_dice))
    del start
    trainer.fit(module, datamodule=dm)

    best_dice = dict(getattr(module, "validation_dice", {}))
    if checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        trainer.validate(module, datamodule=dm, verbose=False)
        best_dice = dict(getattr(module, "validation_dice", {}))
    if method == "lora":
        merge_lora(module.net)
    trained_terms = list(dm.terms)
    module.model_config.terms = list(dict.fromkeys([*base.terms, *trained_terms]))
    info = {
        "command": "volumed finetune", "base_bundle": str(bundle), "base_version": base.version, "method": method,
        "datalist": str(datalist), "terms": trained_terms, "shots": shots, "steps": int(trainer.global_step),
        "validation": validation, "start_dice": start_dice, "best_dice": best_dice, "seed": seed,
        "software": software_versions(),
    }  # fmt: skip
    module.model_config.training = {**base.training, "finetune": info}
    module.model_config.metrics = {}
    package = module.export_package(work / "package", info)
    stopped = bool(early.stopped_epoch) or trainer.should_stop and trainer.global_step < max_steps
    worse = below_start(start_dice, best_dice)
    if worse:
        log.warning("the kept weights score below the base bundle on the validation scans for %s (%s -> %s): the "
                    "new bundle is worse than %s there; try more shots or steps, or a lower --lr", ", ".join(worse),
                    _fmt({t: start_dice[t] for t in worse}), _fmt({t: best_dice[t] for t in worse}), bundle)
    text = changelog or (f"fine-tuned ({method}, {trainer.global_step} steps) on {datalist.name} for "
                         f"{', '.join(trained_terms)}; validation Dice {_fmt(start_dice)} -> {_fmt(best_dice)}"
                         + (f"; below the base bundle's Dice for {', '.join(worse)}" if worse else ""))  # fmt: skip
    made = new_bundle(package, name, bundles_dir=bundles_dir, base=bundle, changelog=text, overwrite=overwrite)
    return FinetuneResult(
        bundle=made.path, version=made.version, method=method, terms=trained_terms, steps=int(trainer.global_step),
        stopped_early=stopped, start_dice=start_dice, best_dice=best_dice, trainable_parameters=trainable,
        total_parameters=total, validation=validation, work_dir=work, load_report=report_text,
    )  # fmt: skip


def _fmt(scores: dict[str, float]) -> str:
    return ", ".join(f"{t} {v:.3f}" for t, v in scores.items()) or "none"
