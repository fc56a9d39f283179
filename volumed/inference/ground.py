"""``volumed ground``: finding sentences -> one mask per positive sentence, on the input's grid.

Pipeline (one image, ``N`` sentences)::

    read_volume (NIfTI / NRRD / MHA / DICOM series)                original grid (X, Y, Z), affine
      -> sentences (--finding, repeatable) and the findings of a report (--report), parsed
         (volumed.text.reports): negated, type, location term, side, size (mm)
      -> negated sentences: listed, no mask, never run through the model
      -> anatomy sentences (one structure and nothing else: "The right lower lobe of the lung."):
         answered by a segmenter (--anatomy-model; default: the default segmenter) for that
         term, when it trained on it; otherwise by the grounding model's own location query
      -> the others: sentence + location embeddings (TextEncoder) -> GroundingModel.queries (N', D)
      -> the shared predictor (volumed.inference.segment.PromptSegPredictor): the package's
         preprocessing, MONAI sliding windows (the encoder runs once per window for all
         sentences), inversion of the probabilities onto the original grid
      -> per sentence, its search region: the body (volumed.inference.body; CT only) and, when the
         sentence names a structure the anatomy model knows, that structure as the anatomy model
         segments it, grown by 10 mm plus the stated size; probabilities outside it are 0
      -> per sentence: mask = probability > threshold; 26-connected components = instances;
         confidence = mean probability inside the mask

Outputs in ``out_dir`` (staged in a hidden folder next to it, published only when complete;
existing outputs are refused unless ``overwrite``, and then replaced as a whole):

* ``masks/finding_<nn>.nii.gz``: uint8 mask of positive sentence ``nn`` (1-based, in input
  order), on the input grid; empty when nothing was found;
* ``grounding.json``: per sentence: ``sentence``, ``negated``, ``mask`` (file, or null for a
  negated one), ``found``, ``confidence`` (mean probability inside the mask), ``max_probability``,
  ``volume_ml``, ``location`` (term, region, side and the text the query was conditioned on),
  ``finding_type``, ``size_mm``, ``uncertain``, ``anatomy``, ``instances`` (components: voxels, mL, centre in
  voxels and RAS mm, bounding box, confidence) and ``search_region`` (``kind`` organ, body or
  image; for an organ its ``term`` and ``margin_mm``);
* ``grounding_seg.dcm``: for a DICOM series, a DICOM SEG with one segment per found sentence
  (where sentences overlap, a voxel goes to the sentence with the highest probability; the
  NIfTI masks keep the overlaps).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from volumed.errors import ConfigError, OutputExistsError, VolumedError
from volumed.heads.grounding import (
    FindingQuery,
    GatedSegmenter,
    GroundingConfig,
    GroundingModel,
    Instance,
    connected_instances,
    finding_queries,
    load_grounding_package,
)
from volumed.inference.package import PromptSegConfig
from volumed.io.volume import Volume

__all__ = [
    "GROUNDING_JSON",
    "GROUNDING_SEG",
    "GroundedFinding",
    "GroundingPredictor",
    "GroundingResult",
    "evaluate_grounding",
    "default_ground_model_dir",
    "ground",
]

GROUNDING_JSON = "grounding.json"
GROUNDING_SEG = "grounding_seg.dcm"
MASKS_DIR = "masks"


@dataclass
class GroundedFinding:
    """One sentence and where it is.

    Attributes:
        query: the parsed sentence.
        mask: bool ``(X, Y, Z)`` on the input grid; None for a negated sentence (never predicted).
        confidence: mean probability inside the mask; None when the mask is empty or negated.
        max_probability: peak probability inside the mask; None likewise.
        volume_ml: mask volume in mL (0 when empty or negated).
        instances: the mask's 26-connected components, largest first.
        search_region: where the mask was allowed to be (:meth:`GroundingPredictor.ground`):
            ``{"kind": "organ", "term", "margin_mm"}`` (plus ``"structures"`` when the region is
            more than the named structure: a lobe's whole lung), ``{"kind": "body"}`` or
            ``{"kind": "image"}``; None for a negated sentence or one answered by the anatomy model.
    """

    query: FindingQuery
    mask: np.ndarray | None
    confidence: float | None = None
    max_probability: float | None = None
    volume_ml: float = 0.0
    instances: list[Instance] = field(default_factory=list)
    search_region: dict | None = None

    @property
    def found(self) -> bool:
        return self.mask is not None and bool(self.mask.any())


class GroundingPredictor:
    """A loaded grounding package, ready to ground sentences in images.

    Args:
        model, config, grounding: :func:`volumed.heads.grounding.load_grounding_package`.
        text_encoder: default: the one named by ``config.text_model``, checked against its hash.
        device, sw_batch_size: as :class:`volumed.inference.segment.PromptSegPredictor`.
        preprocessing, inferer: a MONAI bundle's ``preprocessing`` and ``SlidingWindowInferer``
            (``bundles/volumed_ground_ct``), as :class:`volumed.inference.segment.PromptSegPredictor`
            takes them; default: the package's preprocessing and window.
        anatomy_model: the segmentation package that answers *anatomy sentences* (a sentence that
            names one structure and nothing else, :attr:`FindingQuery.anatomy`): ``None`` for the
            default segmenter (``bundles/volumed_promptseg_ct/models``, loaded on the first such
            sentence), a package folder, or ``"self"`` for the grounding model's own location
            query. The grounding head's segmenter was fine-tuned on finding phantoms and no longer
            segments anatomy on real CT (BENCHMARKS.md, "Grounding: anatomy sentences on the
            real CTs"), so by default the segmenter it started from answers.
        body_only: keep the grounding model's findings inside the patient's body
            (:func:`volumed.inference.body.body_mask`, CT only): no probability outside it, so no
            mask, instance or confidence there. Anatomy sentences answered by the segmenter are
            not masked (its masks are the ones ``volumed segment`` writes).
        organ_margin_mm: keep a finding whose place names a structure the anatomy model knows
            ("... in the right liver lobe": ``liver``) within that structure as the anatomy model
            segments it (holes filled; a lobe: its whole lung; a mask the package's presence rule
            calls absent: none), grown by this margin plus the finding's stated size; None: no such
            gate. The grounding model's own location query does not hold masks to the
            named organ on real CT; the segmenter does. When the anatomy model does not know the
            structure (a group such as ``lung``), does not find it, was not trained on the image's
            modality, or is ``"self"``, the finding is kept in the body only. Held-out phantoms:
            false positives 0.43 -> 0.10 at the same hit rate (docs/grounding.md).
    """

    def __init__(self, model: GroundingModel, config: PromptSegConfig, grounding: GroundingConfig, *,
                 text_encoder=None, device: str | torch.device = "cpu", sw_batch_size: int = 1,
                 preprocessing=None, inferer=None, anatomy_model: str | Path | None = None,
                 body_only: bool = True, organ_margin_mm: float | None = 10.0):
        from volumed.inference.segment import PromptSegPredictor

        self.body_only = body_only
        self.organ_margin_mm = organ_margin_mm
        self.anatomy_model = anatomy_model
        self._anatomy = None
        self.model = model
        self.config = config
        self.grounding = grounding
        # Full-resolution blending: the location gate acts on full-resolution logits, so the
        # lazy coarse-logit blending of `volumed segment` does not apply.
        self.predictor = PromptSegPredictor(model, config, text_encoder=text_encoder, device=device,
                                            sw_batch_size=sw_batch_size, lazy_blending=False,
                                            preprocessing=preprocessing, inferer=inferer)

    @classmethod
    def from_package(cls, path: str | Path, **kwargs) -> GroundingPredictor:
        """Load a grounding package; a bundle's ``models/`` folder has its weights checked
        against the bundle's sha256 first (as :meth:`PromptSegPredictor.from_package`)."""
        from volumed.bundle.integrity import verify_bundle_package

        verify_bundle_package(path)
        model, config, grounding = load_grounding_package(path)
        return cls(model, config, grounding, **kwargs)

    def queries(self, queries: Sequence[FindingQuery], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2N, D)`` decoder queries of non-negated ``queries`` (:meth:`GroundingModel.queries`)
        and ``has_location`` ``(N,)``."""
        from volumed.tasks.ground import encode_queries

        sentence, location, has = encode_queries(list(queries), self.predictor.text_encoder)
        device = self.predictor.device
        with torch.inference_mode():
            return self.model.queries(sentence.to(device), location.to(device), has.to(device), modality), has

    def anatomy_predictor(self):
        """The :class:`~volumed.inference.segment.PromptSegPredictor` that answers anatomy
        sentences, or None to answer them with the grounding model's location query."""
        if str(self.anatomy_model) == "self":
            return None
        if self._anatomy is None:
            from volumed.inference.segment import PromptSegPredictor, default_model_dir

            path = Path(self.anatomy_model) if self.anatomy_model is not None else default_model_dir()
            self._anatomy = PromptSegPredictor.from_package(path, device=self.predictor.device)
        return self._anatomy

    def _finish(self, volume: Volume, queries: Sequence[FindingQuery], found_pieces, todo: list[int],
                threshold: float, out: list[GroundedFinding], within=None, regions=None) -> None:
        """Masks, confidences and instances of ``todo`` on the original grid, into ``out``;
        ``found_pieces``: ``(j, pieces)`` for rows ``j`` of ``todo`` (as
        :meth:`~volumed.inference.segment.PromptSegPredictor.iter_original` yields them; a row
        not yielded or with no pieces found nothing); ``within``: bool mask on the original grid
        outside which probabilities are 0, or one such mask (or None) per row; ``regions``:
        their descriptions, per row."""
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        done = set()
        for j, pieces in found_pieces:
            k = todo[j]
            done.add(k)
            prob = np.zeros(volume.shape, dtype=np.float32)
            for where, values in pieces or ():
                prob[where] = np.maximum(prob[where], values)
            inside = within[j] if isinstance(within, list) else within
            if inside is not None:
                prob[~inside] = 0.0
            instances, mask = connected_instances(prob > threshold, volume.affine, prob,
                                                  int(self.grounding.min_instance_voxels))
            found = bool(mask.any())
            out[k] = GroundedFinding(
                queries[k], mask, float(prob[mask].mean()) if found else None,
                float(prob[mask].max()) if found else None, float(mask.sum()) * voxel_ml, instances,
                regions[j] if regions else None)
        for j, k in enumerate(todo):
            if k not in done:
                out[k] = GroundedFinding(queries[k], np.zeros(volume.shape, dtype=bool),
                                         search_region=regions[j] if regions else None)

    def ground(self, volume: Volume, queries: Sequence[FindingQuery]) -> list[GroundedFinding]:
        """Ground every query in ``volume`` (modality CT or MR); negated ones get no mask; anatomy
        sentences are answered by :meth:`anatomy_predictor` (see the class)."""
        queries = list(queries)
        out = [GroundedFinding(q, None) for q in queries]
        todo = [k for k, q in enumerate(queries) if not q.negated]
        anatomy = self.anatomy_predictor() if any(queries[k].anatomy for k in todo) else None
        # Terms the anatomy model never trained on stay with the grounding model's location query.
        by_anatomy = [k for k in todo if anatomy is not None and queries[k].anatomy
                      and queries[k].location_term in anatomy.config.terms]
        todo = [k for k in todo if k not in by_anatomy]
        gate, gate_terms = self._gate(volume, [queries[k] for k in todo])
        anatomy = anatomy or gate
        # One anatomy pass for both uses: the anatomy sentences' masks and the findings' organs.
        terms = sorted({queries[k].location_term for k in by_anatomy} | set(gate_terms))
        organs = self._anatomy_pieces(anatomy, volume, terms) if terms else {}
        if by_anatomy:
            # The segmenter's own threshold and component rules (largest component of a femur,
            # ...): the mask is the one `volumed segment -p TERM` writes.
            found = ((j, organs.get(queries[k].location_term)) for j, k in enumerate(by_anatomy))
            self._finish(volume, queries, found, by_anatomy, float(anatomy.config.threshold), out)
        if not todo:
            return out
        threshold = float(self.config.threshold)
        seg = self.predictor
        case = seg.preprocess(volume)
        q, has = self.queries([queries[k] for k in todo], volume.modality)
        is_anatomy = torch.tensor([queries[k].anatomy for k in todo], dtype=torch.bool, device=seg.device)
        probs = _predict_gated(seg, GatedSegmenter(self.model, has.to(seg.device), is_anatomy), case, q)
        # No gate (none asked, or the segmenter cannot read this modality): the findings keep the
        # body, even where an anatomy sentence's structure was segmented.
        threshold_organ = float(gate.config.threshold) if gate is not None else None
        within, regions = self._search_regions(volume, [queries[k] for k in todo], organs if gate is not None else {},
                                               threshold_organ, getattr(gate.config, "presence", None) if gate else None)
        self._finish(volume, queries, seg.iter_original(probs, case), todo, threshold, out, within=within, regions=regions)
        return out

    @staticmethod
    def _anatomy_pieces(anatomy, volume: Volume, terms: Sequence[str]) -> dict[str, list]:
        """One preprocessing and one sliding-window pass of the anatomy model over ``terms``:
        each found term's pieces on the original grid (``iter_original``), with the segmenter's
        component rules applied."""
        from volumed.inference.postprocess import ComponentFilter

        case = anatomy.preprocess(volume)
        resolved = anatomy.resolve_prompts(list(terms), volume.modality)
        probs = anatomy.predict_probabilities(case, anatomy.term_queries(resolved, volume.modality))
        components = ComponentFilter(anatomy.postprocess_rules(resolved), float(anatomy.config.threshold))
        return {terms[j]: pieces for j, pieces in anatomy.iter_original(probs, case, components) if pieces}

    def _gate(self, volume: Volume, queries: Sequence[FindingQuery]) -> tuple:
        """The anatomy model that gates findings to their named structure (None: no organ gate)
        and the structures to segment for it: those of ``queries`` it knows."""
        anatomy = self.anatomy_predictor() if self.organ_margin_mm is not None and queries else None
        if anatomy is None or volume.modality not in anatomy.config.modalities:
            return None, []  # e.g. a CT segmenter and an MR: no structure to gate with
        named = {q.location_term for q in queries if q.location_term in anatomy.config.terms}
        # A lobe's finding is searched in its whole lung (:meth:`_search_regions`): every lobe of that side.
        return anatomy, sorted({t for term in named for t in _region_terms(term) if t in anatomy.config.terms})

    def _search_regions(self, volume: Volume, queries: Sequence[FindingQuery], organ_pieces: dict,
                        threshold: float | None, presence: dict | None = None) -> tuple[list, list[dict]]:
        """Per query: where its finding may be (a bool mask on the original grid, or None for
        anywhere) and its description (:attr:`GroundedFinding.search_region`). The named structure
        as the anatomy model segments it (``organ_pieces``, above ``threshold``: holes filled,
        grown by ``organ_margin_mm`` plus the stated size) within the body; the body alone when
        the anatomy model does not know the structure or does not find it (see the class).

        Two rules of ``volumed segment`` apply to the structure: its package's ``presence`` rule
        (a small and unsure mask is absent, so the finding keeps the body rather than a stray
        fragment far from it), and a lobe stands for its whole lung (every lobe of that side the
        model finds): the fissures are the least certain part of a segmenter's lobes (lobe Dice
        0.5-0.85 on scans it never saw, BENCHMARKS.md), the side of a lung is not, and the
        sentence's own location query still says where in the lung."""
        from scipy import ndimage

        from volumed.inference.stats import presence_rejects

        body = None
        if self.body_only:
            from volumed.inference.body import body_mask

            body = body_mask(volume)
        kind = {"kind": "image"} if body is None else {"kind": "body"}
        within = [body] * len(queries)
        regions = [dict(kind) for _ in queries]
        if self.organ_margin_mm is None:
            return within, regions
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        organs = {}
        for term in {t for q in queries for t in _region_terms(q.location_term)} & set(organ_pieces):
            prob = np.zeros(volume.shape, dtype=np.float32)  # pieces may overlap: each voxel once
            for where, values in organ_pieces[term]:
                prob[where] = np.maximum(prob[where], values)
            mask = prob > threshold
            voxels = int(np.count_nonzero(mask))
            if voxels and not presence_rejects(presence, voxels * voxel_ml, float(prob[mask].mean(dtype=np.float64))):
                organs[term] = mask
        spacing = np.asarray(volume.spacing)
        for i, q in enumerate(queries):
            used = [t for t in _region_terms(q.location_term) if t in organs]
            if not used:
                continue
            organ = np.logical_or.reduce([organs[t] for t in used])
            margin = float(self.organ_margin_mm) + (max(q.size_mm) if q.size_mm else 0.0)
            region = _grow(ndimage.binary_fill_holes(organ), margin, spacing)
            within[i] = region if body is None else region & body
            regions[i] = {"kind": "organ", "term": q.location_term, "margin_mm": round(margin, 1)}
            if used != [q.location_term]:
                regions[i]["structures"] = used
        return within, regions


def _region_terms(term: str | None) -> tuple[str, ...]:
    """The structures whose union is the search region of a finding in ``term``: a lobe's whole
    lung (every lobe of its side), else the structure itself."""
    from volumed.data.lobe_atlas import SIDES

    for lobes in SIDES.values():
        if term in lobes:
            return tuple(lobes)
    return (term,) if term else ()


def _grow(mask: np.ndarray, margin_mm: float, spacing) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` (Euclidean distance in mm, on its bounding box plus the
    margin only)."""
    from scipy import ndimage

    where = np.argwhere(mask)
    pad = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    lo = np.maximum(where.min(axis=0) - pad, 0)
    hi = np.minimum(where.max(axis=0) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grown = np.zeros_like(mask)
    grown[box] = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= margin_mm
    return grown


class _GatedModel(torch.nn.Module):
    """What the shared predictor reads of a model: ``.segmenter``."""

    def __init__(self, segmenter: GatedSegmenter):
        super().__init__()
        self.segmenter = segmenter


def _predict_gated(seg, gated: GatedSegmenter, case, queries: torch.Tensor) -> torch.Tensor:
    """The shared predictor's sliding windows (``PromptSegPredictor.predict_probabilities``) run
    with the gated segmenter: ``(N, x, y, z)`` probabilities on the model grid."""
    model = seg.model
    seg.model = _GatedModel(gated).eval()
    try:
        return seg.predict_probabilities(case, queries)
    finally:
        seg.model = model


def evaluate_grounding(predictor: GroundingPredictor, cases, *, min_overlap: int = 1):
    """Score a predictor on finding-level datalist cases (:func:`load_grounding_datalist`).

    Every finding of every case is grounded (negated sentences predict nothing) and scored
    against its reference (:func:`volumed.metrics.grounding.score_finding`).

    Returns:
        ``(GroundingMetrics, per-finding list of (case image, text, FindingScore))``.
    """
    from volumed.io import read_label, read_volume
    from volumed.metrics.grounding import grounding_metrics, score_finding

    scores, rows = [], []
    for case in cases:
        volume = read_volume(case.image, modality=case.modality)
        queries = finding_queries([f.text for f in case.findings]) if case.findings else []
        results = predictor.ground(volume, queries)
        for f, r in zip(case.findings, results):
            ref = None
            if f.mask is not None:
                data = read_label(f.mask, reference=volume).data
                ref = data == f.mask_label if f.mask_label is not None else data > 0
            pred = r.mask if r.mask is not None else np.zeros(volume.shape, dtype=bool)
            s = score_finding(pred, ref, focal=f.focal, min_overlap=min_overlap)
            scores.append(s)
            rows.append((case.image, f.text, s))
    return grounding_metrics(scores), rows


# ------------------------------------------------------------------------------------ the command


@dataclass(frozen=True)
class GroundingResult:
    """What ``ground`` wrote: ``out_dir``, ``grounding_json``, ``dicom_seg`` (or None), the
    ``findings`` (masks not kept: see the files), ``warnings`` and ``seconds``."""

    out_dir: Path
    grounding_json: Path
    dicom_seg: Path | None
    findings: tuple[dict, ...]
    warnings: tuple[str, ...] = ()
    seconds: dict = field(default_factory=dict)

    def summary(self) -> list[str]:
        lines = []
        for f in self.findings:
            if f.get("normal"):
                lines.append(f"normal: {f['sentence']!r} (no finding, no mask)")
            elif f["negated"]:
                lines.append(f"negated: {f['sentence']!r} (no mask)")
            elif f["found"]:
                lines.append(f"found: {f['sentence']!r} -> {f['mask']} ({f['volume_ml']:.2f} mL, "
                             f"{len(f['instances'])} instance(s), confidence {f['confidence']:.2f})")
            else:
                lines.append(f"not found: {f['sentence']!r} (empty mask {f['mask']})")
        lines += [f"warning: {w}" for w in self.warnings]
        lines.append(f"wrote {self.grounding_json}")
        return lines


def _existing(out_dir: Path) -> list[Path]:
    found = [out_dir / n for n in (GROUNDING_JSON, GROUNDING_SEG) if (out_dir / n).exists()]
    if (out_dir / MASKS_DIR).exists():
        found.append(out_dir / MASKS_DIR)
    return found


def _finding_record(k: int, f: GroundedFinding, mask_name: str | None) -> dict:
    q = f.query
    return {
        "index": k,
        "sentence": q.text,
        "negated": q.negated,
        "mask": mask_name,
        "found": f.found,
        "confidence": f.confidence,
        "max_probability": f.max_probability,
        "volume_ml": round(f.volume_ml, 4),
        "location": {"term": q.location_term, "region": q.region, "side": q.side, "query_text": q.location},
        "finding_type": q.finding_type,
        "size_mm": list(q.size_mm),
        "uncertain": q.uncertain,
        "anatomy": q.anatomy,
        "normal": q.normal,
        "instances": [i.to_dict() for i in f.instances],
        "search_region": f.search_region,
    }


def default_ground_model_dir() -> Path:
    """``<repo>/bundles/volumed_ground_ct/models``: the shipped grounding package (trained on
    phantoms: experimental for findings, docs/grounding.md)."""
    return Path(__file__).resolve().parents[2] / "bundles" / "volumed_ground_ct" / "models"


def ground(
    image_path: str | Path,
    findings: Sequence[str] = (),
    *,
    report: str | Path | None = None,
    model_dir: str | Path | None = None,
    out_dir: str | Path,
    overwrite: bool = False,
    series_uid: str | None = None,
    modality: str | None = None,
    device: str = "cpu",
    predictor: GroundingPredictor | None = None,
    anatomy_model: str | Path | None = None,
    body_only: bool = True,
    organ_margin_mm: float | None = 10.0,
) -> GroundingResult:
    """Ground finding sentences (and a report's findings) in one image; write masks,
    ``grounding.json`` and, for DICOM input, a DICOM SEG (see the module docstring).

    Args:
        findings: sentences, each one query ("12 mm nodule in the right lower lobe").
        report: a report text, or the path of a text file holding one; each finding clause is a query.
        model_dir: a grounding package (``volumed train ground``); default: the shipped bundle's
            (:func:`default_ground_model_dir`).
        predictor: ground with this predictor (a bundle's network, preprocessing and inferer:
            :class:`volumed.bundle.ground.GroundingRunner`) instead of loading ``model_dir``'s.
        anatomy_model: who answers anatomy sentences (:class:`GroundingPredictor`); default: the
            default segmenter.
        body_only: findings only inside the patient's body (:class:`GroundingPredictor`).
        organ_margin_mm: findings only near the structure their sentence names, as the anatomy
            model segments it (:class:`GroundingPredictor`); None: no such gate.

    Raises:
        OutputExistsError: outputs exist and not ``overwrite`` (checked first).
        ConfigError: no sentences, an empty or non-English sentence, not a grounding package, an
            image of another modality. Reader errors for an unreadable image.
    """
    from volumed.heads.grounding import is_grounding_package
    from volumed.inference.package import package_version, read_config
    from volumed.io import read_volume
    from volumed.io.atomic import atomic_write_text, check_creatable
    from volumed.io.writer import write_nifti

    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError("output path exists and is not a folder", out)
    check_creatable(out)
    existing = _existing(out) if out.is_dir() else []
    if existing and not overwrite:
        raise OutputExistsError(f"output folder holds outputs of an earlier run ({', '.join(p.name for p in existing)}); "
                                "pass overwrite=True (--overwrite) or another folder", out)
    # Cheap checks before the network is built: model folder, sentences, image.
    model_dir = Path(model_dir) if model_dir is not None else default_ground_model_dir()
    if not is_grounding_package(model_dir):
        raise ConfigError("not a grounding model folder (no grounding.json); train one with `volumed train ground`",
                          model_dir)
    config = read_config(model_dir)
    report_text = None
    if report is not None:
        rp = Path(report)
        report_text = rp.read_text(encoding="utf-8") if rp.is_file() else str(report)
    queries = finding_queries(list(findings), report_text)
    volume = read_volume(image_path, series_uid=series_uid, modality=modality)
    if volume.modality not in ("CT", "MR"):
        raise ConfigError("cannot tell whether the image is CT or MR; name it with --modality", image_path)
    if volume.modality not in config.modalities:
        raise ConfigError(f"the model was trained on {', '.join(config.modalities)} images only; this image is "
                          f"{volume.modality}", model_dir)
    if predictor is None:
        predictor = GroundingPredictor.from_package(model_dir, device=device, anatomy_model=anatomy_model,
                                                     body_only=body_only, organ_margin_mm=organ_margin_mm)
    t_read = time.perf_counter()
    results = predictor.ground(volume, queries)
    t_pred = time.perf_counter()

    warnings: list[str] = []
    records = []
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.volumed-", dir=out.parent))
    try:
        (staging / MASKS_DIR).mkdir()
        number = 0
        label = np.zeros(volume.shape, dtype=np.uint16 if len(results) > 254 else np.uint8)
        best = np.zeros(volume.shape, dtype=np.float32)
        segments = []
        for k, r in enumerate(results):
            name = None
            if r.mask is not None:
                number += 1
                name = f"{MASKS_DIR}/finding_{number:02d}.nii.gz"
                write_nifti(volume.with_data(r.mask.astype(np.uint8), modality=volume.modality), staging / name)
                if r.found:
                    # The SEG's label map: the most probable sentence wins a shared voxel; ties go to the earlier.
                    conf = np.float32(r.confidence)
                    win = r.mask & (best < conf)
                    label[win], best[win] = k + 1, conf
                    segments.append(k)
            records.append(_finding_record(k + 1, r, name))
        doc = {
            "image": str(volume.source.path) if volume.source.path else str(image_path),
            "modality": volume.modality,
            "shape": list(volume.shape),
            "spacing_mm": list(volume.spacing),
            "threshold": float(predictor.config.threshold),
            "confidence": "mean probability inside the mask (the model's, not a measured accuracy)",
            "model": {"path": str(model_dir), "encoder": config.encoder, "version": package_version(model_dir, config)},
            "findings": records,
        }
        if volume.source.format == "dicom":
            _write_seg(label, volume, [k for k in segments if np.any(label == k + 1)], results, staging, warnings)
        atomic_write_text(staging / GROUNDING_JSON, json.dumps(doc, indent=2) + "\n")
        has_seg = (staging / GROUNDING_SEG).exists()
        out.mkdir(parents=True, exist_ok=True)
        trash = staging / ".replaced"
        trash.mkdir()
        for n in (MASKS_DIR, GROUNDING_SEG, GROUNDING_JSON):  # grounding.json last: it names the others
            if (out / n).exists():
                os.replace(out / n, trash / n)
            if (staging / n).exists():
                os.replace(staging / n, out / n)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t_end = time.perf_counter()
    return GroundingResult(out, out / GROUNDING_JSON, out / GROUNDING_SEG if has_seg else None, tuple(records),
                           tuple(warnings), {"read": t_read - t0, "predict": t_pred - t_read, "write": t_end - t_pred})


def _write_seg(label: np.ndarray, volume: Volume, segments: list[int], results: list[GroundedFinding], staging: Path,
               warnings: list[str]) -> None:
    from volumed.io.writer import SegmentSpec, write_dicom_seg

    if not segments:
        warnings.append("DICOM SEG skipped: no sentence was found in the image")
        return
    specs = []
    for k in segments:
        q = results[k].query
        name = "_".join(p for p in (q.finding_type or "finding", q.location_term) if p)
        specs.append(SegmentSpec(k + 1, name, label=f"finding {k + 1}: {q.finding_type or 'finding'}"[:64],
                                 description=f"'{q.text}', mean probability {results[k].confidence:.2f}"[:1024]))
    try:
        write_dicom_seg(label, volume, specs, staging / GROUNDING_SEG, series_description="volumed grounding")
    except VolumedError as err:
        warnings.append(f"DICOM SEG skipped: {err}")
