"""Report head: visual prefix shapes, what each LM mode trains, the loss mask, generation and its guard."""

from __future__ import annotations

import pytest
import torch

from volumed.errors import ConfigError
from volumed.heads.report import IGNORE_INDEX, VisualPrefix, apply_lm_mode, create_report_generator
from volumed.text.causal_lm import load_causal_lm

# Three stride-2 stages: a 32 x 32 x 16 input keeps a 4 x 4 x 2 deepest map.
STRIDES = [[2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
IMAGE = (2, 1, 32, 32, 16)


def _generator(tokenizer_dir, mode="full", **kwargs):
    torch.manual_seed(0)
    lm = load_causal_lm("tiny", tokenizer=tokenizer_dir, tiny_config={"hidden_size": 32, "intermediate_size": 64,
                                                                     "num_hidden_layers": 1, "max_position_embeddings": 64})
    defaults = dict(encoder_kwargs={"strides": STRIDES}, lm_mode=mode, resampler_dim=32, resampler_layers=1,
                    num_visual_tokens=4, max_report_tokens=16)
    return create_report_generator("stunet_tiny", lm, **{**defaults, **kwargs})


@pytest.mark.parametrize("pooling", ["perceiver", "conv", "max"])
def test_visual_prefix_gives_a_fixed_number_of_tokens_in_the_lm_width(pooling):
    prefix = VisualPrefix(in_channels=16, lm_dim=24, num_tokens=8, pooling=pooling, dim=32, num_layers=1, num_heads=4)
    for size in [(4, 4, 2), (3, 5, 2)]:
        assert prefix(torch.randn(2, 16, *size)).shape == (2, 8, 24)


def test_visual_prefix_rejects_a_conv_grid_that_does_not_make_num_tokens():
    with pytest.raises(ConfigError, match="token_grid"):
        VisualPrefix(16, 24, num_tokens=8, pooling="conv", token_grid=(2, 2, 1))
    with pytest.raises(ConfigError, match="pooling"):
        VisualPrefix(16, 24, pooling="mean")


def test_lm_modes_train_nothing_adapters_or_everything(tokenizer_dir):
    counts = {}
    for mode in ("frozen", "lora", "full"):
        g = _generator(tokenizer_dir, mode)
        trainable = [n for n, p in g.lm.named_parameters() if p.requires_grad]
        counts[mode] = sum(p.numel() for p in g.lm.parameters() if p.requires_grad)
        if mode == "lora":
            assert trainable and all("lora_" in n for n in trainable)
        # The visual path always trains.
        assert all(p.requires_grad for p in g.visual.parameters())
    assert counts["frozen"] == 0 < counts["lora"] < counts["full"]
    with pytest.raises(ConfigError, match="lm_mode"):
        apply_lm_mode(torch.nn.Linear(2, 2), "prefix")


def test_loss_is_taken_on_report_tokens_and_eos_only(tokenizer_dir):
    g = _generator(tokenizer_dir)
    reports = ["No lung nodule.", "There is a nodule in the right lower lobe."]
    inputs = g.build_inputs(torch.randn(IMAGE), reports)
    n = g.prefix_length
    assert (inputs.labels[:, :n] == IGNORE_INDEX).all()
    eos = g.tokenizer.eos_token_id
    for row, text in zip(inputs.labels, reports):
        kept = row[row != IGNORE_INDEX].tolist()
        assert kept[-1] == eos and g.tokenizer.decode(kept[:-1]) == text
    assert inputs.attention_mask.sum(1).tolist() == [n + len(g.tokenize_reports([t])[0][0]) for t in reports]
    loss = g(torch.randn(IMAGE), reports)
    loss.backward()
    assert torch.isfinite(loss) and g.visual.projector[0].weight.grad is not None


def test_generate_greedy_and_beam_within_the_length_guard(tokenizer_dir):
    g = _generator(tokenizer_dir).eval()
    image = torch.randn(IMAGE)
    lm_generate, produced = g.lm.generate, []

    def recording_generate(**kwargs):
        out = lm_generate(**kwargs)
        produced.append(out.shape)
        return out

    g.lm.generate = recording_generate
    for beams in (1, 3):
        out = g.generate(image, max_new_tokens=5, num_beams=beams)
        assert len(out) == 2 and all(isinstance(t, str) for t in out)
        # Only new tokens come back (inputs_embeds), at most max_new_tokens of them.
        assert produced[-1][0] == 2 and 1 <= produced[-1][1] <= 5
    # The guard: never past max_report_tokens, never past the LM's positions after the prefix.
    assert g.max_new_tokens_for(None) == 16
    assert g.max_new_tokens_for(1000) == 16
    g.max_report_tokens = 1000
    assert g.max_new_tokens_for(1000) == 64 - g.prefix_length
    with pytest.raises(ConfigError, match="max_new_tokens"):
        g.max_new_tokens_for(0)


def test_a_prefix_longer_than_the_lm_context_is_refused(tokenizer_dir):
    with pytest.raises(ConfigError, match="no room"):
        _generator(tokenizer_dir, num_visual_tokens=64)
