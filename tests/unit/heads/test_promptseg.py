"""Term-query decoder (volumed.heads.promptseg): shapes, one encoder pass, term independence,
every encoder family, gradients, padding, chunking, position encoding, errors, a tiny overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import compute_dice

from volumed.data.phantoms import make_case
from volumed.encoders import create_encoder
from volumed.errors import ConfigError
from volumed.heads.promptseg import (
    PADDING_LOGIT,
    InputWindows,
    PromptSegmenter,
    SinCosPositionEncoding3D,
    TermQueryDecoder,
    create_prompt_segmenter,
)

TEXT_DIM = 16
SMALL = dict(text_dim=TEXT_DIM, embed_dim=24, num_layers=2, num_heads=4, pixel_dim=8)
SHAPE = (32, 32, 32)  # swin_tiny's smallest valid input (total stride 32)


@pytest.fixture(scope="module")
def model() -> PromptSegmenter:
    torch.manual_seed(0)
    return create_prompt_segmenter("swin_tiny", **SMALL).eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))


def _terms(n: int, batch: int | None = None, seed: int = 2) -> torch.Tensor:
    shape = (n, TEXT_DIM) if batch is None else (batch, n, TEXT_DIM)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_output_shape_for_1_3_24_terms_from_one_set_of_features(model, image):
    with torch.no_grad():
        features = model.encode_image(image)
        for n in (1, 3, 24):
            logits = model.decode(features, _terms(n))
            assert logits.shape == (2, n, *SHAPE)
            assert torch.isfinite(logits).all()
        # per-image terms (B, N, D) give the same shape as shared terms (N, D)
        assert model.decode(features, _terms(3, batch=2)).shape == (2, 3, *SHAPE)


def test_encoder_runs_once_per_forward_whatever_the_number_of_terms(model, image):
    calls = []
    handle = model.encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            for n in (1, 3, 24):
                calls.clear()
                assert model(image, _terms(n), chunk_size=5).shape[1] == n
                assert len(calls) == 1, f"encoder ran {len(calls)} times for {n} terms"
    finally:
        handle.remove()


def test_logits_of_a_term_do_not_depend_on_the_other_terms(model, image):
    terms = _terms(6)
    with torch.no_grad():
        features = model.encode_image(image)
        together = model.decode(features, terms)
        alone = model.decode(features, terms[4:5])
        perm = torch.tensor([3, 5, 0, 4, 1, 2])
        permuted = model.decode(features, terms[perm])
        chunked = model.decode(features, terms, chunk_size=4)
    torch.testing.assert_close(together[:, 4:5], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted, together[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, together, atol=1e-5, rtol=1e-5)
    # different terms do give different masks (the test above is not vacuous)
    assert (together[:, 0] - together[:, 1]).abs().max() > 1e-3


def test_iter_decode_yields_chunks_covering_all_terms(model, image):
    terms = _terms(7)
    with torch.no_grad():
        features = model.encode_image(image)
        full = model.decode(features, terms)
        chunks = list(model.iter_decode(features, terms, chunk_size=3))
    assert [(s.start, s.stop) for s, _ in chunks] == [(0, 3), (3, 6), (6, 7)]
    assert [c.shape[1] for _, c in chunks] == [3, 3, 1]
    torch.testing.assert_close(torch.cat([c for _, c in chunks], dim=1), full, atol=1e-5, rtol=1e-5)


def test_query_mask_pads_terms_without_changing_the_others(model, image):
    terms = _terms(4, batch=2)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    with torch.no_grad():
        plain = model(image, terms)
        masked = model(image, terms, query_mask=mask)
    assert (masked[1, 2:] == PADDING_LOGIT).all()
    torch.testing.assert_close(masked[0], plain[0])
    torch.testing.assert_close(masked[1, :2], plain[1, :2])
    assert torch.sigmoid(masked[1, 2:]).max() == 0.0


@pytest.mark.parametrize(
    "name, shape",
    [
        ("stunet_tiny", (64, 32, 32)),  # 6 maps, strides 1..32
        ("swin_tiny", (32, 32, 32)),  # 5 maps, strides 2..32
        ("ctvit_tiny", (40, 40, 20)),  # 1 coarse map at stride 20 x 20 x 10
    ],
)
def test_works_on_every_encoder_family(name, shape):
    torch.manual_seed(0)
    model = create_prompt_segmenter(name, **SMALL).eval()
    assert model.decoder.num_memory_levels == min(3, len(model.encoder.feature_info))
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        logits = model(x, _terms(3))
    assert logits.shape == (1, 3, *shape)
    assert torch.isfinite(logits).all()
    # the image matters: another image gives other logits
    with torch.no_grad():
        other = model(torch.randn(1, 1, *shape), _terms(3))
    assert (logits - other).abs().max() > 1e-4


def test_pixel_levels_can_skip_the_full_resolution_map():
    torch.manual_seed(0)
    model = create_prompt_segmenter("stunet_tiny", pixel_levels=[1, 2, 3, 4, 5], **SMALL)
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 1, 64, 32, 32))
        pixel, memory, _ = model.decoder.pixel_features(features)
        logits = model.decode(features, _terms(2))
    assert pixel.shape == (1, 8, 32, 16, 16)  # stride 2, upsampled afterwards
    assert memory.shape == (1, 8 * 4 * 4 + 4 * 2 * 2 + 2 * 1 * 1, 24)  # strides 8, 16, 32
    assert logits.shape == (1, 2, 64, 32, 32)


def test_gradient_reaches_encoder_decoder_and_text_projection(image):
    torch.manual_seed(0)
    model = create_prompt_segmenter("swin_tiny", **SMALL)
    terms = _terms(3).requires_grad_(True)
    logits = model(image[:1], terms)
    (logits * torch.randn_like(logits)).mean().backward()
    groups = {
        "encoder": model.encoder,
        "fpn": model.decoder.fpn,
        "transformer": model.decoder.layers,
        "text_proj": model.decoder.text_proj,
        "mask_embed": model.decoder.mask_embed,
    }
    for name, module in groups.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"{name}: parameters without gradient"
        assert sum(g.abs().sum() for g in grads) > 0, f"{name}: gradient is zero"
    assert terms.grad is not None and terms.grad.abs().sum() > 0


def test_position_encoding_shares_one_frame_across_strides():
    enc = SinCosPositionEncoding3D(dim=26)  # 26 = 3 axes x 8 + 2 zero channels
    fine = enc((8, 8, 8))
    coarse = enc((4, 4, 4), stride=(2, 2, 2))
    assert fine.shape == (512, 26) and coarse.shape == (64, 26)
    assert (fine[:, 24:] == 0).all()
    assert torch.unique(fine, dim=0).shape[0] == 512  # every voxel has its own code
    # a stride-2 token sits at the centre of input voxels 2i, 2i+1: those are its nearest codes
    dist = torch.cdist(coarse.double(), fine.double())
    nearest = dist.topk(8, largest=False).indices.sort(dim=1).values  # the 2x2x2 voxels it covers
    fine_idx = torch.arange(512).reshape(8, 8, 8)
    expected = torch.stack(
        [fine_idx[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2].flatten().sort().values
         for i in range(4) for j in range(4) for k in range(4)]
    )  # fmt: skip
    assert torch.equal(nearest, expected)


def test_invalid_arguments_raise_config_error(model, image):
    features = model.encode_image(image)
    with pytest.raises(ConfigError, match=r"term_embeddings has shape \(3, 10\), expected \(N, 16\)"):
        model.decode(features, torch.randn(3, 10))
    with pytest.raises(ConfigError, match="got 4 feature maps, but feature_info describes 5"):
        model.decode(features[:4], _terms(2))
    with pytest.raises(ConfigError, match=r"query_mask has shape \(2, 3\), expected \(2, 2\)"):
        model.decode(features, _terms(2), query_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="chunk_size must be a positive integer"):
        model.decode(features, _terms(2), chunk_size=0)
    with pytest.raises(ConfigError, match=r"image must be \(B, C, X, Y, Z\)"):
        model(image[0], _terms(2))
    with pytest.raises(ConfigError, match=r"num_heads \(5\) must divide embed_dim \(24\)"):
        TermQueryDecoder(model.encoder.feature_info, embed_dim=24, num_heads=5)
    with pytest.raises(ConfigError, match="pixel_levels must be increasing indices in 0..4"):
        TermQueryDecoder(model.encoder.feature_info, pixel_levels=[0, 5])
    with pytest.raises(ConfigError, match="the decoder was built for feature_info"):
        PromptSegmenter(create_encoder("stunet_tiny"), model.decoder)
    with pytest.raises(ConfigError, match="unknown encoder 'swin_tny'"):
        create_prompt_segmenter("swin_tny")


def test_overfits_one_phantom_from_random_term_embeddings():
    """100 Adam steps on one case: the liver query reaches Dice > 0.8 (0.89-0.91 over seeds 0-3;
    about 12 s on 2 idle cores)."""
    torch.manual_seed(0)
    case = make_case(0, shape=(64, 64, 32))
    names = {v: k for k, v in case.label_names.items()}
    organs = ["liver", "spleen", "stomach"]
    # A soft-tissue window scaled to about [-1, 1]; in-plane 2x average pooling to 32^3 keeps
    # the step cheap (swin_tiny needs every axis divisible by 32).
    image = torch.from_numpy(np.clip(case.image.data, -200.0, 300.0) / 250.0 - 0.2).float()[None, None]
    label = torch.from_numpy(case.label.data.astype(np.int64))
    target = torch.stack([(label == names[o]).float() for o in organs])[None]
    image = F.avg_pool3d(image, (2, 2, 1))
    target = (F.avg_pool3d(target, (2, 2, 1)) >= 0.5).float()
    assert image.shape == (1, 1, 32, 32, 32) and target[0, 0].sum() > 2000

    model = create_prompt_segmenter("swin_tiny", text_dim=32, embed_dim=32, num_layers=1, num_heads=4, pixel_dim=16)
    terms = torch.randn(len(organs), 32)  # stand-ins for MiniLM embeddings of the organ names
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # Clipping and a cosine decay keep the short run from the loss spikes Adam shows at this
    # rate; without them the final Dice varies by seed between 0.7 and 0.9.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)

    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)  # soft Dice + BCE, per term

    def hard_dice(logits: torch.Tensor) -> torch.Tensor:
        return compute_dice((logits > 0).float(), target)[0]  # (organs,)

    with torch.no_grad():
        assert hard_dice(model(image, terms))[0] < 0.5  # untrained: no liver yet
    for _ in range(100):
        loss = loss_fn(model(image, terms), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    with torch.no_grad():
        dice = hard_dice(model(image, terms))
    assert dice[0] > 0.8, f"liver Dice {dice[0]:.3f} after 100 steps"


def test_fpn_level_key_map_puts_each_checkpoint_level_on_its_own_level():
    """A decoder given the stride-1 level ([0..5]) starts from one without it ([1..5]): every
    lateral and memory output lands on the same encoder level, not one level off."""
    from volumed.encoders.weights import load_encoder_weights
    from volumed.heads.promptseg import TermQueryDecoder, fpn_level_key_map

    encoder = create_encoder("stunet_tiny")
    info = encoder.feature_info
    torch.manual_seed(0)
    old = TermQueryDecoder(info, embed_dim=32, num_layers=1, num_heads=2, pixel_dim=8, num_memory_levels=2,
                           pixel_levels=[1, 2, 3, 4, 5])
    new = TermQueryDecoder(info, embed_dim=32, num_layers=1, num_heads=2, pixel_dim=8, num_memory_levels=2,
                           pixel_levels=[0, 1, 2, 3, 4, 5])
    report = load_encoder_weights(new, old.state_dict(), key_map=fpn_level_key_map([1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], 2),
                                  strict=False)
    assert report.mismatched == [] and report.unexpected == []
    for j, level in enumerate([1, 2, 3, 4, 5]):  # laterals: the same level
        assert torch.equal(new.fpn.inner_blocks[level].weight, old.fpn.inner_blocks[j].weight), level
    for j, level in ((3, 4), (4, 5)):  # memory outputs: the same level
        assert torch.equal(new.fpn.layer_blocks[level].weight, old.fpn.layer_blocks[j].weight), level
    # The finest output (per-voxel embedding) starts from the old finest; level 0's lateral is new.
    assert torch.equal(new.fpn.layer_blocks[0].weight, old.fpn.layer_blocks[0].weight)
    assert any("fpn.inner_blocks.0." in k for k in report.missing)
    # Keys outside the FPN keep their names; the same levels map to themselves.
    same = fpn_level_key_map([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], 2)
    assert same("segmenter.decoder.fpn.inner_blocks.3.weight") == "segmenter.decoder.fpn.inner_blocks.3.weight"
    assert same("segmenter.encoder.stem.weight") == "segmenter.encoder.stem.weight"


def test_input_windows_add_the_image_through_each_hu_window():
    windows = InputWindows([[-160, 240], [-1000, -500]])  # input scale -1000..1000 HU -> [0, 1]
    hu = torch.tensor([-1000.0, -750.0, -160.0, 40.0, 240.0, 1000.0])
    x = ((hu + 1000.0) / 2000.0).view(1, 1, 6, 1, 1)
    out = windows(x)
    assert out.shape == (1, 3, 6, 1, 1) and torch.equal(out[:, :1], x)
    torch.testing.assert_close(out[0, 1].flatten(), torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(out[0, 2].flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 1.0]))
    windows.set_scale((-200.0, 300.0))  # another preprocessing window: 0.48 is 40 HU there
    torch.testing.assert_close(windows(torch.tensor([0.48]).view(1, 1, 1, 1, 1))[0, 1].flatten(), torch.tensor([0.5]))
    assert windows.state_dict() == {}  # nothing in the weights: the windows are config
    for bad in ([[240, -160]], [[0]], []):
        with pytest.raises(ConfigError, match="window"):
            InputWindows(bad)


def test_a_segmenter_with_input_windows_reads_more_channels_and_starts_as_the_plain_one():
    from volumed.encoders.weights import load_encoder_weights

    torch.manual_seed(0)
    plain = create_prompt_segmenter("stunet_tiny", **SMALL).eval()
    windowed = create_prompt_segmenter("stunet_tiny", input_windows=[[-160, 240]], **SMALL).eval()
    first = next(k for k, v in windowed.state_dict().items() if v.ndim >= 3)
    assert windowed.state_dict()[first].shape[1] == 2 and plain.state_dict()[first].shape[1] == 1
    report = load_encoder_weights(windowed, plain.state_dict(), key_map=None, in_channels="pad", strict=True)
    assert report.adapted and not report.mismatched
    image = torch.rand(1, 1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(windowed(image, _terms(3)), plain(image, _terms(3)))
