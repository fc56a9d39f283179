"""CT-CLIP head: loss, temperature, zero-shot prompts, sliding-window embedding, report policy, package."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from volumed.errors import ConfigError, ReportTextError, WeightsLoadError
from volumed.heads.clip import (
    ClipConfig,
    VolumeTextCLIP,
    build_clip_model,
    clip_loss,
    clip_targets,
    embed_volume,
    load_clip_package,
    read_clip_config,
    report_embedding,
    report_sentences,
    save_clip_package,
    zero_shot_prompts,
    zero_shot_probabilities,
)

TINY = dict(encoder="ctvit_tiny", encoder_kwargs={"patch_size": 4, "depth_patch_size": 4, "dim": 32}, embed_dim=16)
INPUT = (16, 16, 8)


def tiny_model(seed: int = 0) -> VolumeTextCLIP:
    torch.manual_seed(seed)
    return VolumeTextCLIP(**TINY).eval()


class FakeTextEncoder:
    """A stand-in for TextEncoder: one fixed random unit vector per distinct text; records calls."""

    dim = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        rows = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(t)) % (2**31))
            rows.append(F.normalize(torch.randn(self.dim, generator=g), dim=0))
        return torch.stack(rows)


def test_symmetric_infonce_rewards_matched_pairs():
    v = F.normalize(torch.randn(6, 16), dim=-1)
    matched = 50.0 * v @ v.t()
    shuffled = 50.0 * v @ v[torch.tensor([1, 2, 3, 4, 5, 0])].t()
    assert clip_loss(matched) < 0.1 < 2.0 < clip_loss(shuffled)
    logits = torch.randn(5, 5)
    expected = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    assert clip_loss(logits) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ConfigError, match="square"):
        clip_loss(torch.randn(3, 4))


def test_identical_reports_are_each_others_positives():
    t = clip_targets(["a", "b", "a", "c"], 4)
    assert torch.allclose(t[0], torch.tensor([0.5, 0.0, 0.5, 0.0])) and torch.allclose(t[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(t.sum(1), torch.ones(4)) and torch.equal(t, t.t())
    assert torch.equal(clip_targets(["a", "b"], 2), torch.eye(2))
    # Two identical reports: matching a volume with its twin's report is no longer a mistake.
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    assert clip_loss(logits, clip_targets(["n", "x", "n"], 3)) < clip_loss(logits)


def test_learned_temperature_starts_at_clip_value_and_is_clamped():
    m = tiny_model()
    assert float(m.scale) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert float(m.scale) == pytest.approx(100.0)
    assert m.logit_scale.requires_grad
    image, text = torch.rand(2, 1, *INPUT), torch.randn(3, 384)
    logits = m(image, text)
    assert logits.shape == (2, 3) and float(logits.abs().max()) <= 100.0 + 1e-4
    with pytest.raises(ConfigError, match=r"\(N, 384\)"):
        m.embed_text(torch.randn(3, 10))


def test_zero_shot_prompt_pairs_and_probabilities():
    p = zero_shot_prompts(["Lung nodule", "lung nodule", " Pleural  effusion. "])
    assert [(x.finding, x.present, x.absent) for x in p] == [
        ("Lung nodule", "Lung nodule is present.", "Lung nodule is not present."),
        ("Pleural effusion", "Pleural effusion is present.", "Pleural effusion is not present.")]
    with pytest.raises(ReportTextError, match="empty finding"):
        zero_shot_prompts(["Lung nodule", "  "])
    present, absent = F.normalize(torch.randn(2, 8), dim=-1), F.normalize(torch.randn(2, 8), dim=-1)
    image = torch.stack([present[0], absent[0]])  # looks like "finding 0 present", then "absent"
    probs = zero_shot_probabilities(image, present, absent, 50.0)
    assert probs.shape == (2, 2) and probs[0, 0] > 0.99 and probs[1, 0] < 0.01
    # The pair's softmax: swapping the prompts gives 1 - p.
    assert torch.allclose(zero_shot_probabilities(image, absent, present, 50.0), 1 - probs, atol=1e-6)


def test_a_volume_that_fits_is_embedded_as_one_tile():
    m = tiny_model()
    x = torch.rand(1, *INPUT)
    emb, tiles = embed_volume(m, x, INPUT)
    assert tiles == 1 and emb.shape == (16,)
    assert torch.allclose(emb, m.embed_image(x[None])[0], atol=1e-5)
    assert float(emb.norm()) == pytest.approx(1.0, abs=1e-5)


def test_a_larger_volume_is_tiled_and_the_pooled_features_averaged():
    m = tiny_model()
    shapes = []
    hook = m.encoder.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape)))
    x = torch.rand(1, 32, 16, 24)  # 2 x 1 x 3 tiles of 16 x 16 x 8
    emb, tiles = embed_volume(m, x, INPUT, sw_batch_size=2)
    hook.remove()
    assert tiles == 6
    # Memory: the encoder never saw more than sw_batch_size tiles, each of the input size.
    assert shapes == [(2, 1, *INPUT)] * 3
    with torch.no_grad():
        parts = [m.pooled_features(x[None, :, i:i + 16, :, k:k + 8]) for i in (0, 16) for k in (0, 8, 16)]
        expected = m.embed_pooled(torch.cat(parts).mean(0, keepdim=True))[0]
    assert torch.allclose(emb, expected, atol=1e-5)
    # Not what a resize or a single crop would give.
    assert not torch.allclose(emb, m.embed_image(x[None, :, :16, :, :8])[0], atol=1e-3)


def test_max_pooling_of_a_finer_map_is_the_maximum_over_every_token_of_the_volume():
    """pooling="max" (a focal finding is a few tokens that a mean dilutes): tiles combine by their
    maximum, so the tiled embedding is that of the whole volume's maximum, whichever tile holds it."""
    torch.manual_seed(0)
    m = VolumeTextCLIP(encoder="stunet_tiny", encoder_kwargs={"strides": [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2},
                       embed_dim=16, pooling="max", feature_level=1).eval()
    assert m.feature_dim == m.encoder.feature_info[1].channels
    x = torch.rand(1, 32, 16, 16)  # 2 x 1 x 2 tiles of 16 x 16 x 8
    emb, tiles = embed_volume(m, x, INPUT)
    with torch.no_grad():
        maps = [m.encoder(x[None, :, i:i + 16, :, k:k + 8])[1] for i in (0, 16) for k in (0, 8)]
        expected = m.embed_pooled(torch.stack([f.amax(dim=(2, 3, 4)) for f in maps]).amax(0))[0]
        mean_pooled = m.embed_pooled(torch.stack([f.mean(dim=(2, 3, 4)) for f in maps]).mean(0))[0]
    assert tiles == 4 and torch.allclose(emb, expected, atol=1e-5)
    assert not torch.allclose(emb, mean_pooled, atol=1e-3)
    with pytest.raises(ConfigError, match="pooling"):
        VolumeTextCLIP(**TINY, pooling="attention")
    with pytest.raises(ConfigError, match="feature_level 7"):
        VolumeTextCLIP(**TINY, feature_level=7)


def test_a_smaller_volume_is_padded_with_air():
    m = tiny_model()
    x = torch.rand(1, 10, 16, 8)
    emb, tiles = embed_volume(m, x, INPUT)
    padded = F.pad(x, (0, 0, 0, 0, 3, 3))
    assert tiles == 1 and torch.allclose(emb, m.embed_image(padded[None])[0], atol=1e-5)
    with pytest.raises(ConfigError, match="one volume"):
        embed_volume(m, x[None], INPUT)


def test_report_sentences_keep_whole_sentences_up_to_max_words():
    report = "No pleural effusion. " + "There is a nodule in the right lower lobe. " * 2
    assert report_sentences(report) == ["No pleural effusion.", "There is a nodule in the right lower lobe.",
                                        "There is a nodule in the right lower lobe."]
    assert report_sentences(report, max_words=12) == ["No pleural effusion.", "There is a nodule in the right lower lobe."]
    assert report_sentences(report, max_words=2) == ["No pleural effusion."]
    assert report_sentences("one two three four", max_words=2) == ["one two three four"]  # a long first sentence stays
    for bad in ("", "   "):
        with pytest.raises(ReportTextError, match="empty report"):
            report_sentences(bad)


def test_a_10000_word_report_is_cut_at_2000_words_and_sentence_averaged():
    sentence = "The lungs show scattered small nodules measuring up to four millimetres in diameter."  # 13 words
    long_report = " ".join(f"{sentence[:-1]} number {i}." for i in range(667))  # 15 words each: 10,005 words
    assert len(long_report.split()) > 10_000
    kept = report_sentences(long_report)
    assert sum(len(s.split()) for s in kept) <= 2000 and len(kept) == 2000 // 15
    enc = FakeTextEncoder()
    emb = report_embedding(enc, [long_report, "A. B. A."])
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=1), torch.ones(2))
    # Only the kept sentences were embedded, each once (duplicates across reports too).
    embedded = [t for call in enc.calls for t in call]
    assert len(embedded) == len(set(embedded)) == len(kept) + 2
    a, b = enc.encode(["A."])[0], enc.encode(["B."])[0]
    assert torch.allclose(emb[1], F.normalize((2 * a + b) / 3, dim=0), atol=1e-6)


def test_dropping_negated_sentences_puts_normal_reports_on_the_absent_prompt():
    from volumed.heads.clip import NO_FINDING_TEXT

    enc = FakeTextEncoder()
    texts = ["No lung nodule.", "Lung nodule is not present.", "No pleural effusion. No lung nodule.",
             "A 12 mm nodule in the right lower lobe. No pleural effusion.", "Lung nodule is present.",
             "The heart is normal."]
    drop = report_embedding(enc, texts, negated="drop")
    none = enc.encode([NO_FINDING_TEXT])[0]
    # Everything negated: the one shared point, whatever the words.
    for row in drop[:3]:
        assert torch.allclose(row, none, atol=1e-6)
    # The negated sentence of a positive report is left out; unparsed statements stay.
    assert torch.allclose(drop[3], enc.encode(["A 12 mm nodule in the right lower lobe."])[0], atol=1e-6)
    assert torch.allclose(drop[4], enc.encode(["Lung nodule is present."])[0], atol=1e-6)
    assert torch.allclose(drop[5], enc.encode(["The heart is normal."])[0], atol=1e-6)
    keep = report_embedding(enc, texts)
    assert not torch.allclose(keep[0], keep[1])  # "keep" embeds the words as written
    with pytest.raises(ConfigError, match="negated"):
        report_embedding(enc, texts, negated="ignore")
    with pytest.raises(ConfigError, match="negated"):
        ClipConfig.from_dict({"negated": "ignore"})
    assert ClipConfig.from_dict({}).negated == "keep"  # packages from before the option


def test_package_round_trip_and_bad_folders(tmp_path):
    m = tiny_model(seed=3)
    cfg = ClipConfig(**TINY, input_size=INPUT, preprocessing={"target_spacing": None}, findings=["Lung nodule"])
    out = save_clip_package(m, cfg, tmp_path / "pkg")
    loaded, cfg2 = load_clip_package(out)
    assert cfg2.input_size == INPUT and cfg2.findings == ["Lung nodule"]
    x = torch.rand(1, 1, *INPUT)
    assert torch.allclose(loaded.embed_image(x), m.embed_image(x), atol=1e-6)
    assert float(loaded.scale) == pytest.approx(float(m.scale))
    with pytest.raises(Exception, match="exists"):
        save_clip_package(m, cfg, out)
    with pytest.raises(ConfigError, match="clip.json is missing"):
        read_clip_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_clip_config(tmp_path / "nowhere")
    (out / "model.safetensors").unlink()
    with pytest.raises(WeightsLoadError, match="missing"):
        load_clip_package(out)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "clip.json").write_text('{"encoder": "ctvit_tiny", "colour": 1}')
    with pytest.raises(ConfigError, match="unknown keys"):
        read_clip_config(tmp_path / "bad")


def test_any_registry_encoder_can_be_the_volume_encoder():
    torch.manual_seed(0)
    cfg = ClipConfig(encoder="stunet_tiny", encoder_kwargs={"channels": [4, 8, 16], "depths": [1, 1, 1],
                                                            "strides": [[2, 2, 2], [2, 2, 2]]}, embed_dim=8)
    m = build_clip_model(cfg).eval()
    emb = m.embed_image(torch.rand(2, 1, 16, 16, 8))
    assert emb.shape == (2, 8) and m.feature_dim == 16
    assert math.isclose(float(emb.norm(dim=1)[0]), 1.0, rel_tol=1e-5)
    # The pooling and the pooled level travel with the package's config.
    cfg.pooling, cfg.feature_level = "max", 1
    m = build_clip_model(cfg)
    assert (m.pooling, m.feature_level, m.feature_dim) == ("max", 1, 8)
    assert ClipConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_the_bundle_export_wrapper_keeps_the_pooling():
    """FixedPromptCLIP (the bundle's TorchScript network) pools as the network it wraps."""
    from volumed.bundle.clip import FixedPromptCLIP

    torch.manual_seed(0)
    m = VolumeTextCLIP(encoder="stunet_tiny", encoder_kwargs={"strides": [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2},
                       embed_dim=16, pooling="max", feature_level=1).eval()
    text = torch.randn(4, 384)
    wrapped = FixedPromptCLIP(m, text).eval()
    x = torch.rand(2, 1, 16, 16, 8)
    with torch.no_grad():
        assert torch.allclose(wrapped(x), m(x, text), atol=1e-5)
