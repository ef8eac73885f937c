"""The multi-view UNet: 3D attention is the 2D model at V = 1, mixes views within a sample only, is view
permutation-equivariant, widening a 2D checkpoint keeps its outputs, fused and naive attention agree."""

import logging
import warnings

import pytest
import torch

from spinmeround_lite.mvunet import (
    IN_CHANNELS,
    OUT_CHANNELS,
    MultiViewUNet,
    attention,
    build_mvunet,
    copy_as_2d,
    fold_views,
    level_of,
    level_table,
    load_unet2d,
    resolve_levels_3d,
    unet_config,
    unfold_views,
)
from spinmeround_lite.profiles import get_profile

P = get_profile("test")          # channels (16, 32), 8x8 latents, 32-d context
H = P.latent_res


def inputs(B=2, V=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, IN_CHANNELS, H, H, generator=g)
    c_noise = torch.randn(B, generator=g)
    ctx = torch.randn(B, 77, P.text_hidden, generator=g)
    return x, c_noise, ctx


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_mvunet(P).eval()


@torch.no_grad()
def test_shapes_and_channels(model):
    x, c, ctx = inputs()
    y = model(x, c, ctx)
    assert y.shape == (2, 3, OUT_CHANNELS, H, H)
    assert model.in_channels == 153 and model.out_channels == 8
    assert model.levels_3d == {0, 1}                                 # 8x8 latents: every level is <= 32x32
    with pytest.raises(ValueError, match="channels"):
        model(x[:, :, :10], c, ctx)


@pytest.mark.floats
@torch.no_grad()
def test_one_view_equals_2d_unet(model):
    """Measured over model and input seeds 0-5, ATEN_CPU_CAPABILITY=default and native, one thread: at V = 1 the
    3D and 2D models agree exactly (max difference 0; tolerance 1e-5 for other kernels); at V = 3 they differ by
    0.084 +- 0.022 (0.057 to 0.128; bound 1e-3). A model whose 3D attention is off (per-view attention) differs
    by 0 at V = 3 and fails."""
    unet2d = copy_as_2d(model)                                       # same weights, diffusers' default processors
    x, c, ctx = inputs(V=1)
    y3d = model(x, c, ctx)[:, 0]
    y2d = unet2d(x[:, 0], c, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(y3d, y2d, atol=1e-5, rtol=1e-5)
    # with several views the 3D model is no longer the 2D model run per view
    x, c, ctx = inputs(V=3)
    y3d = model(x, c, ctx)
    y2d = unet2d(x.flatten(0, 1), c.repeat_interleave(3), encoder_hidden_states=ctx.repeat_interleave(3, 0)).sample
    assert (y3d.flatten(0, 1) - y2d).abs().max() > 1e-3


@pytest.mark.floats
@torch.no_grad()
def test_permuting_views_permutes_outputs(model):
    """Measured over model and input seeds 0-5, ATEN_CPU_CAPABILITY=default and native, one thread: permuted
    outputs differ from the permuted output by 1.7e-6 +- 0.2e-6 (float32 rounding of the attention's sums over
    views, at most 1.9e-6); views differ from each other by 1.5 +- 0.25 (at least 1.3), which a view-order-dependent
    model would show. Tolerance 1e-4: 50 times the rounding, 10 000 times below a broken model's difference."""
    x, c, ctx = inputs(V=4)                                          # ray maps are channels 8:152 of x: they move too
    perm = torch.tensor([2, 0, 3, 1])
    y = model(x, c, ctx)
    y_perm = model(x[:, perm], c, ctx)
    torch.testing.assert_close(y_perm, y[:, perm], atol=1e-4, rtol=0)
    assert (y[:, 0] - y[:, 1]).abs().max() > 1e-3                   # views really differ


@pytest.mark.floats
@torch.no_grad()
@pytest.mark.parametrize("levels_3d", [-1, 0])
def test_views_mix_within_a_sample_only(model, levels_3d):
    """Measured over model and input seeds 0-5, ATEN_CPU_CAPABILITY=default and native, one thread: the changed
    view moves by 1.15 +- 0.3 (at least 0.81; bound 1e-2); with 3D attention every other view of its sample by at
    least 0.017 +- 0.0015 (at least 0.014; bound 1e-4); with 2D attention the other views, and other samples in
    both cases, by exactly 0 (bound 1e-6)."""
    model.set_attention(levels_3d=levels_3d)
    try:
        x, c, ctx = inputs(B=3, V=4)
        y = model(x, c, ctx)
        x2 = x.clone()
        x2[1, 2] += torch.randn(x2[1, 2].shape, generator=torch.Generator().manual_seed(5))
        d = (model(x2, c, ctx) - y).abs().flatten(2).amax(-1)       # (B, V) largest change
    finally:
        model.set_attention(levels_3d=-1)
    assert d[1, 2] > 1e-2                                            # the changed view
    others = d[1, torch.tensor([0, 1, 3])]
    if levels_3d == 0:
        assert others.max() < 1e-6                                  # 2D: views are independent
    else:
        assert others.min() > 1e-4                                  # 3D: every other view of that sample moves
    assert d[0].max() < 1e-6 and d[2].max() < 1e-6                 # never another sample


@pytest.mark.floats
@torch.no_grad()
def test_fused_and_naive_attention_agree(model):
    """Measured over model and input seeds 0-5, ATEN_CPU_CAPABILITY=default and native, one thread: max difference
    1.6e-6 +- 0.2e-6 (at most 2.1e-6) on outputs of size 1.5 +- 0.1: float32 rounding; tolerance 1e-5 + 1e-5 |y|."""
    x, c, ctx = inputs(V=3)
    y_fused = model(x, c, ctx)
    model.set_attention(attention="naive")
    try:
        y_naive = model(x, c, ctx)
    finally:
        model.set_attention(attention="fused")
    torch.testing.assert_close(y_naive, y_fused, atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(3, 2, 2, 50, 8).unbind(0)
    torch.testing.assert_close(attention(q, k, v, naive=True), attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_fold_views_round_trip():
    t = torch.randn(6, 5, 4)                                         # B=2, V=3, L=5, C=4
    f = fold_views(t, 3)
    assert f.shape == (2, 15, 4)
    torch.testing.assert_close(f[1, 5:10], t[4])                     # sample 1, view 1
    torch.testing.assert_close(unfold_views(f, 3), t)
    with pytest.raises(ValueError):
        fold_views(t, 4)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _forward_messages(fn):
    handler, logger = _Records(), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            fn()
    finally:
        logger.removeHandler(handler)
    return handler.messages + [str(w.message) for w in caught]


def test_no_warnings_with_views(model):
    x, c, ctx = inputs(V=4)
    assert _forward_messages(lambda: model(x, c, ctx)) == []
    # the capture works: diffusers' stock processors complain about the same keyword
    unet2d = copy_as_2d(model)
    msgs = _forward_messages(lambda: unet2d(x[:, 0], c, encoder_hidden_states=ctx,
                                            cross_attention_kwargs={"num_views": 4}))
    assert any("num_views" in m for m in msgs)


@pytest.mark.floats
@torch.no_grad()
def test_widened_2d_checkpoint_equals_2d_model(tmp_path):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    UNet2DConditionModel(**unet_config(P, in_channels=4, out_channels=4)).save_pretrained(tmp_path / "unet")
    unet2d = UNet2DConditionModel.from_pretrained(tmp_path / "unet", local_files_only=True).eval()
    model = build_mvunet(P, pretrained=str(tmp_path)).eval()         # finds unet/ inside the folder
    assert (model.in_channels, model.out_channels) == (153, 8)
    x, c, ctx = inputs(V=1)                                          # new channels (normals, rays, mask) random
    y = model(x, c, ctx)[:, 0]
    y2d = unet2d(x[:, 0, :4], c, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(y[:, :4], y2d, atol=1e-5, rtol=1e-5)  # old channels: the 2D model
    torch.testing.assert_close(y[:, 4:], y2d, atol=1e-5, rtol=1e-5)  # out_init="copy": normal half starts the same
    assert model.unet.conv_in.weight[:, 4:].abs().max() == 0


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_unet2d(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet2d(tmp_path)


def test_levels_and_counts():
    assert level_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1", 3) == 0
    assert level_of("up_blocks.0.attentions.1", 3) == 2 and level_of("mid_block.attentions.0", 3) == 2
    assert resolve_levels_3d(-1, 4) == {1, 2, 3} and resolve_levels_3d(0, 4) == set()
    # the paper's absolute rule: levels of at most 32x32 (64x64 latents: all but the finest; 16x16: all)
    assert resolve_levels_3d(-1, 4, latent_res=64) == {1, 2, 3}
    assert resolve_levels_3d(-1, 3, latent_res=16) == {0, 1, 2}
    assert resolve_levels_3d(1, 4) == {3} and resolve_levels_3d([0, 2], 4) == {0, 2}
    sd_like = get_profile("test").replace(unet_channels=(8, 16, 16, 16), unet_heads=2, unet_attn_levels=(0, 1, 2))
    cfg = unet_config(sd_like)
    assert cfg["down_block_types"][-1] == "DownBlock2D" and cfg["up_block_types"][0] == "UpBlock2D"
    m = MultiViewUNet(__import__("diffusers").UNet2DConditionModel(**cfg), levels_3d=[1, 2, 3])
    joint = {n for n, p in m.unet.attn_processors.items() if p.joint}
    assert joint and all(".attn1." in n and not n.startswith("down_blocks.0") and not n.startswith("up_blocks.3")
                         for n in joint)
    rows = level_table(m, views=2, latent_res=8)
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in m.parameters())
    mid = next(r for r in rows if r["part"] == "mid")
    assert mid["tokens_3d"] == 2 * 1 and mid["attn_gflops"] > 0
