"""The grounding head: sentence queries, location conditioning and gate, instances, the package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from volumed.errors import ConfigError
from volumed.heads.grounding import (
    GatedSegmenter,
    GroundingConfig,
    LocationConditioning,
    build_grounding_model,
    connected_instances,
    finding_queries,
    is_grounding_package,
    load_grounding_package,
    location_text,
    save_grounding_package,
)
from volumed.inference.package import PromptSegConfig


def tiny_config(**kw) -> PromptSegConfig:
    return PromptSegConfig(
        encoder="stunet_tiny",
        encoder_kwargs={"strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [2, 2, 1]]},
        decoder_kwargs=dict(embed_dim=32, num_layers=1, num_heads=4, pixel_dim=8, num_memory_levels=2,
                            pixel_levels=[1, 2, 3, 4, 5]),
        preprocessing=dict(modality="CT", target_spacing=[6.0, 6.0, 6.0], margin=2),
        patch_size=(64, 64, 16), modalities=["CT"], **kw)


def test_sentences_and_report_clauses_become_queries():
    q1, q2, q3 = finding_queries(["12 mm nodule in the right lower lobe", "No pleural effusion.",
                                  "Something is odd here."])
    assert q1.text == "12 mm nodule in the right lower lobe" and not q1.negated
    assert (q1.finding_type, q1.location_term, q1.side, q1.size_mm) == ("nodule", "lung_lower_lobe_right", "right", (12.0,))
    assert q1.location == "lung_lower_lobe_right"
    assert q2.negated and q2.finding_type == "effusion"
    assert not q3.negated and q3.finding_type is None and q3.location is None  # grounded from its words alone
    report = "Non-contrast CT of the chest. A 2 cm hypodense lesion in the right liver lobe. No pleural effusion."
    queries = finding_queries(report=report)
    assert [q.text for q in queries] == ["A 2 cm hypodense lesion in the right liver lobe.", "No pleural effusion."]
    assert [q.negated for q in queries] == [False, True] and queries[0].location_term == "liver"
    with pytest.raises(ConfigError, match="at least one finding sentence"):
        finding_queries([])
    with pytest.raises(ConfigError, match="empty"):
        finding_queries(["   "])
    assert location_text(None) is None and location_text("liver", "right") == "liver"


def test_location_conditioning_starts_at_the_location_and_keeps_unlocated_sentences():
    torch.manual_seed(0)
    cond = LocationConditioning(8, sentence_weight=0.1)
    s, l = torch.randn(3, 8), torch.randn(3, 8)
    has = torch.tensor([True, False, True])
    q = cond(s, l, has)
    torch.testing.assert_close(q[0], l[0] + 0.1 * s[0])
    torch.testing.assert_close(q[1], s[1])  # no location: the sentence itself (+ e_none = 0)
    q.sum().backward()
    assert cond.no_location.grad is not None and cond.location_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="has_location"):
        cond(s, l, has[:2])


def test_location_gate_suppresses_findings_outside_the_dilated_organ():
    model = build_grounding_model(tiny_config(), gate_kernel=3)
    logits = torch.zeros(1, 4, 8, 8, 8)
    logits[:, :2] = 5.0  # two sentences, confident everywhere
    logits[:, 2:] = -20.0  # their organs: absent ...
    logits[0, 2, 4, 4, 4] = 20.0  # ... but one voxel of the first sentence's organ
    gated = model.gate(logits, torch.tensor([True, False]))
    assert gated.shape == (1, 2, 8, 8, 8)
    # Sentence 0: kept in the organ dilated by one voxel (3 x 3 x 3), suppressed elsewhere.
    assert torch.all(gated[0, 0, 3:6, 3:6, 3:6] > 4.9) and float(gated[0, 0, 0, 0, 0]) < -10
    assert torch.equal(gated[0, 1], logits[0, 1])  # no location: no gate
    # The gate gets no gradient: an absent sentence cannot be learned by forgetting the organ.
    leaf = logits.clone().requires_grad_(True)
    model.gate(leaf, torch.tensor([True, True])).sum().backward()
    assert torch.all(leaf.grad[:, 2:] == 0) and torch.any(leaf.grad[:, :2] != 0)
    # The wrapper the shared predictor calls: (window, 2N queries) -> N gated channels.
    wrapped = GatedSegmenter(model, torch.tensor([True, False]))
    out = wrapped(torch.rand(1, 1, 64, 64, 16), torch.randn(4, 384))
    assert out.shape == (1, 2, 64, 64, 16) and wrapped.decoder is model.segmenter.decoder
    with pytest.raises(ConfigError, match="odd"):
        build_grounding_model(tiny_config(), gate_kernel=4)
    # An anatomy sentence is its structure: the location query's own logits, undilated.
    both = model.gate(logits, torch.tensor([True, True]), anatomy=torch.tensor([True, False]))
    assert torch.equal(both[0, 0], logits[0, 2])
    assert torch.equal(both[0, 1], model.gate(logits, torch.tensor([True, True]))[0, 1])
    out = GatedSegmenter(model, torch.tensor([True, True]), torch.tensor([True, False]))(
        torch.rand(1, 1, 64, 64, 16), torch.randn(4, 384))
    assert out.shape == (1, 2, 64, 64, 16)
    # In a batch (training), anatomy is (B, N), and an anatomy channel trains its location query.
    leaf = logits.expand(2, -1, -1, -1, -1).clone().requires_grad_(True)
    pick = torch.tensor([[True, False], [False, False]])
    batched = model.gate(leaf, torch.tensor([[True, True], [True, True]]), anatomy=pick)
    assert torch.equal(batched[0, 0], logits[0, 2])
    assert torch.equal(batched[1, 0], model.gate(logits, torch.tensor([True, True]))[0, 0])
    batched.sum().backward()
    assert torch.all(leaf.grad[0, 2] == 1) and torch.all(leaf.grad[1, 2:] == 0) and torch.all(leaf.grad[0, 3] == 0)


def test_a_sentence_that_only_names_a_structure_is_an_anatomy_query():
    q = finding_queries(["The right lower lobe of the lung.", "the abdominal aorta", "Urinary bladder.",
                         "Streak artefact over the liver.", "The liver and the spleen.",
                         "A 12 mm nodule in the right lower lobe."])
    assert [(x.anatomy, x.location_term) for x in q] == [
        (True, "lung_lower_lobe_right"), (True, "aorta"), (True, "urinary_bladder"),
        (False, None),  # more than a structure, and no finding the parser knows: a free query
        (False, None),  # two structures
        (False, "lung_lower_lobe_right"),  # a finding
    ]
    assert q[0].side == "right" and q[0].finding_type is None and q[0].to_dict()["anatomy"] is True


def test_a_normal_statement_is_negated_not_grounded():
    """"The liver is normal." holds no finding: grounded as a free sentence it once gave 321 mL in
    26 pieces over the body. NegBio's / the CheXpert labeler's negation patterns read "X is
    normal/unremarkable" as X negated, so it is negated (no mask) and flagged normal; "abnormal"
    and a named structure alone are not."""
    q = finding_queries(["The liver is normal.", "Unremarkable pancreas.", "The kidneys are unremarkable.",
                         "Examination within normal limits.", "There is no abnormality in the spleen.",
                         "The liver.", "Abnormal enhancement of the liver.",
                         "Heart size is normal, no pericardial effusion.", "A 12 mm nodule in the right lower lobe."])
    assert [(x.negated, x.normal, x.anatomy) for x in q] == [
        (True, True, False), (True, True, False), (True, True, False), (True, True, False), (True, True, False),
        (False, False, True),  # names a structure only: grounded to it
        (False, False, False),  # "abnormal" is not "normal"
        (True, False, False),  # a (negated) finding: the finding decides
        (False, False, False),
    ]
    assert [x.location_term for x in q[:5]] == ["liver", "pancreas", "kidney", None, "spleen"]
    assert q[0].to_dict()["normal"] is True and q[5].to_dict()["normal"] is False


def test_an_enlarged_organ_is_grounded_to_the_organ():
    """"Hepatomegaly." / "The spleen is enlarged." are non-focal findings: the parser names the
    organ (from the word itself when no location word does) and the query is an anatomy query
    (the segmenter's mask of the organ), not a lesion search. Negated, an aneurysm (a segment of
    a vessel) and two organs in one word stay findings."""
    q = finding_queries(["Hepatomegaly.", "Mild cardiomegaly is noted.", "The spleen is enlarged, measuring 15 cm.",
                         "Enlargement of the left kidney.", "The heart is not enlarged.",
                         "Aneurysmal dilatation of the abdominal aorta.", "Hepatosplenomegaly.",
                         "Enlarged mediastinal lymph nodes."])
    assert [(x.anatomy, x.negated, x.location_term, x.finding_type) for x in q] == [
        (True, False, "liver", "enlargement"), (True, False, "heart", "enlargement"),
        (True, False, "spleen", "enlargement"), (True, False, "kidney_left", "enlargement"),
        (False, True, "heart", "enlargement"), (False, False, "aorta", "enlargement"),
        (False, False, None, "enlargement"), (False, False, None, "lymph node"),
    ]
    assert q[2].size_mm == (150.0,)


def test_connected_components_are_instances_largest_first():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:3, 1:3, 1:3] = True  # 8 voxels
    mask[6:9, 6:9, 6:9] = True  # 27 voxels
    mask[0, 9, 9] = True  # 1 voxel
    mask[3, 3, 3] = True  # touches the first block at a corner: same component (26-connected)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    probs = mask * 0.8
    instances, kept = connected_instances(mask, affine, probs)
    assert [i.voxels for i in instances] == [27, 9, 1] and [i.index for i in instances] == [1, 2, 3]
    assert instances[0].volume_ml == pytest.approx(27 * 8 / 1000) and instances[0].center_ras == (14.0, 14.0, 14.0)
    assert instances[0].bbox_voxel == ((6, 9), (6, 9), (6, 9)) and instances[0].confidence == pytest.approx(0.8)
    big, kept = connected_instances(mask, affine, min_voxels=5)
    assert [i.voxels for i in big] == [27, 9] and not kept[0, 9, 9] and kept.sum() == 36
    none, empty = connected_instances(np.zeros((4, 4, 4), bool), affine)
    assert none == [] and not empty.any()
    with pytest.raises(ConfigError, match="3D"):
        connected_instances(np.zeros((4, 4)), affine)


def test_package_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = build_grounding_model(config, sentence_weight=0.3, gate_kernel=5)
    with torch.no_grad():
        model.location.no_location.add_(0.5)
    out = save_grounding_package(model, config, GroundingConfig(gate_kernel=5, locations=["liver"]), tmp_path / "g")
    assert is_grounding_package(out) and json.loads((out / "grounding.json").read_text())["gate_kernel"] == 5
    loaded, cfg, gcfg = load_grounding_package(out)
    assert gcfg.locations == ["liver"] and loaded.gate_kernel == 5 and cfg.encoder == "stunet_tiny"
    x, s, l = torch.rand(1, 1, 64, 64, 16), torch.randn(2, 384), torch.randn(2, 384)
    has = torch.tensor([True, False])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, s, l, has), model(x, s, l, has))
    (out / "grounding.json").unlink()
    with pytest.raises(ConfigError, match="not a grounding model folder"):
        load_grounding_package(out)
