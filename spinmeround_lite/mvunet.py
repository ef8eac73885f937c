"""The multi-view UNet: a diffusers ``UNet2DConditionModel`` whose self-attention sees every view of a sample.

Section 3 of METHOD.md, notebook ``04_3d_attention``.

Per view the UNet reads ``153 = 4 + 4 + 144 + 1`` channels at latent resolution ``(h, w)``::

    channels   0:4     image latent  (noisy for target views, clean for conditioning views)
    channels   4:8     normal latent (likewise)
    channels   8:152   ray map (``raymaps.raymap``: NeRF-encoded ray origin 93 + direction 51)
    channel  152       mask: 1 for a conditioning (given) view, 0 for a view to generate

and predicts ``8`` channels (image latent + normal latent). Cross-attention to the identity context
``(B, 77, D)`` is per view, as in the 2D model.

**3D attention.** A 2D UNet runs every image alone: its self-attention (``attn1`` of each transformer block) mixes
the ``L = h * w`` tokens of one image. With ``V`` views of one head in a batch of ``B * V`` images, 3D attention
regroups the tokens so that the views of a sample attend to each other, with the *same* weights::

    (B * V, L, C)  ->  (B, V * L, C)  ->  softmax(Q K^T / sqrt(d)) V  ->  (B * V, L, C)

This runs wherever the feature map is at most 32x32 (``levels_3d = -1``, the paper's absolute rule: with its
64x64 latents every level but the finest; with the course's 16x16 latents every level), where ``V * L`` stays
small enough. An earlier version of this course took "all but the finest" for the rule; at 16x16 latents that left
the only level that sees the face at full latent resolution blind to the other views (notebook 07, "is the model
using its cameras and its input?"). The released SpinMeRound code *replaces* the 2D self-attention of
those levels by the 3D one (this module does the same: no new weights, so a 2D checkpoint loads unchanged),
while the paper's summary describes 3D layers *inserted* between the 2D ones. Notebook 04 shows both ideas.

It is written as diffusers attention processors (``MultiViewAttnProcessor``): the number of views reaches them
through ``cross_attention_kwargs={"num_views": V}``, which every processor of the model accepts, so diffusers
warns about nothing. ``attention="naive"`` computes ``softmax(Q K^T / sqrt(d)) V`` explicitly (the teaching
version; it holds the ``(V L) x (V L)`` matrix), ``"fused"`` calls ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .latents import norm_groups, resolve_local_folder
from .profiles import Profile, get_profile

IMAGE_LATENT, NORMAL_LATENT, RAY_CHANNELS, MASK_CHANNELS = 4, 4, 144, 1
IN_CHANNELS = IMAGE_LATENT + NORMAL_LATENT + RAY_CHANNELS + MASK_CHANNELS   # 153
OUT_CHANNELS = IMAGE_LATENT + NORMAL_LATENT                                  # 8


# ----------------------------------------------------------------------------------------------
# attention, naive and fused
# ----------------------------------------------------------------------------------------------
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              mask: torch.Tensor | None = None, naive: bool = False) -> torch.Tensor:
    """``softmax(Q K^T * scale + mask) V`` for ``q (B, H, N, d)``, ``k, v (B, H, M, d)`` -> ``(B, H, N, d)``.

    ``naive=True`` builds the ``(B, H, N, M)`` matrix of scores; otherwise PyTorch's fused kernel
    (``F.scaled_dot_product_attention``) computes the same without storing it whole.
    ``scale`` defaults to ``1 / sqrt(d)``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not naive:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale)
    return attention_probs(q, k, scale, mask) @ v


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention matrix ``softmax(Q K^T * scale + mask)``: ``(B, H, N, d), (B, H, M, d) -> (B, H, N, M)``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.float().softmax(dim=-1).to(q.dtype)


def fold_views(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """Tokens of the views of a sample side by side: ``(B * V, L, C) -> (B, V * L, C)`` (views stay in order)."""
    bv, L, C = x.shape
    if bv % num_views:
        raise ValueError(f"a batch of {bv} images is not a whole number of samples of {num_views} views")
    return x.reshape(bv // num_views, num_views * L, C)


def unfold_views(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """The inverse of ``fold_views``: ``(B, V * L, C) -> (B * V, L, C)``."""
    b, VL, C = x.shape
    return x.reshape(b * num_views, VL // num_views, C)


class MultiViewAttnProcessor:
    """A diffusers attention processor; ``joint=True`` makes self-attention span all views of a sample.

    Called by ``diffusers.models.attention_processor.Attention.forward`` with ``hidden_states (B * V, L, C)``,
    ``encoder_hidden_states`` (``None`` for self-attention, the context ``(B * V, 77, D)`` for cross-attention)
    and ``num_views = V`` from ``cross_attention_kwargs``. Cross-attention is always per view; self-attention
    is per view when ``joint=False`` (exactly diffusers' ``AttnProcessor2_0``) or over ``(B, V * L, C)`` when
    ``joint=True``. ``naive=True`` computes the attention matrix explicitly (same result, more memory).
    """

    def __init__(self, joint: bool = False, naive: bool = False):
        self.joint = joint
        self.naive = naive

    def __repr__(self) -> str:
        return f"MultiViewAttnProcessor(joint={self.joint}, naive={self.naive})"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 num_views: int = 1) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:                                             # (N, C, H, W) -> (N, H*W, C)
            n, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(n, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:                                 # per image, before any folding
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        self_attention = encoder_hidden_states is None
        fold = self.joint and self_attention and num_views > 1
        if fold:
            if attention_mask is not None:
                raise ValueError("3D self-attention takes no attention mask (every view sees every view)")
            hidden_states = fold_views(hidden_states, num_views)         # (B, V*L, C)

        batch, seq_len, _ = hidden_states.shape
        context = hidden_states if self_attention else encoder_hidden_states
        if not self_attention and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        out = attention(q, k, v, scale=attn.scale, mask=attention_mask, naive=self.naive)
        out = out.transpose(1, 2).reshape(batch, seq_len, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))                       # linear, dropout

        if fold:
            out = unfold_views(out, num_views)                          # (B*V, L, C)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(n, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ----------------------------------------------------------------------------------------------
# levels of the UNet
# ----------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)(\.|$)")


def level_of(name: str, num_levels: int) -> int:
    """Resolution level of a submodule name: 0 is the finest (the latent resolution), ``num_levels - 1`` the coarsest.

    ``down_blocks.i`` is level ``i``, ``up_blocks.j`` level ``num_levels - 1 - j``, ``mid_block`` the coarsest.
    """
    m = _BLOCK.match(name)
    if m:
        i = int(m.group(2))
        return i if m.group(1) == "down_blocks" else num_levels - 1 - i
    if name.startswith("mid_block"):
        return num_levels - 1
    raise ValueError(f"{name!r} belongs to no level of the UNet")


MAX_3D_SIDE = 32   # 3D attention wherever the feature map is at most 32x32 (METHOD.md section 3)


def resolve_levels_3d(levels_3d: int | Iterable[int], num_levels: int, latent_res: int | None = None) -> set[int]:
    """Which levels get 3D self-attention.

    ``-1`` is the paper's rule, an absolute one: every level whose feature map is at most ``MAX_3D_SIDE`` (32) on a
    side, level ``l`` being ``latent_res / 2^l`` (with the paper's 64x64 latents: all but the finest; with 16x16
    latents: every level). Without ``latent_res`` it falls back to "all but the finest". An int ``k >= 0`` means
    the ``k`` coarsest levels (``0``: none, a plain 2D UNet run per view); a list names the levels (0 = finest).
    """
    if isinstance(levels_3d, int):
        if levels_3d < 0 and latent_res:
            return {lv for lv in range(num_levels) if latent_res / 2 ** lv <= MAX_3D_SIDE}
        k = num_levels - 1 if levels_3d < 0 else min(levels_3d, num_levels)
        return set(range(num_levels - k, num_levels))
    levels = {int(x) for x in levels_3d}
    bad = [x for x in levels if not 0 <= x < num_levels]
    if bad:
        raise ValueError(f"levels {bad} do not exist: this UNet has levels 0..{num_levels - 1}")
    return levels


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------
class MultiViewUNet(nn.Module):
    """``x (B, V, 153, h, w), c_noise (B,), context (B, 77, D) -> (B, V, 8, h, w)``.

    Wraps a ``UNet2DConditionModel`` (``self.unet``; its weights are the model's weights) and installs a
    ``MultiViewAttnProcessor`` on every attention layer: joint self-attention at ``levels_3d`` (see
    ``resolve_levels_3d``), per-view attention elsewhere. ``attention`` is ``"fused"`` or ``"naive"``.
    With ``V = 1`` (or ``levels_3d = 0``) it is exactly the 2D UNet applied to each view.
    """

    def __init__(self, unet, levels_3d: int | Iterable[int] = -1, attention: str = "fused"):
        super().__init__()
        self.unet = unet
        self.num_levels = len(unet.config.block_out_channels)
        self.levels_3d: set[int] = set()
        self.attention_mode = attention
        self.set_attention(levels_3d, attention)

    # configuration -----------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def cross_attention_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    def set_attention(self, levels_3d: int | Iterable[int] | None = None, attention: str | None = None) -> None:
        """Install processors: 3D self-attention at ``levels_3d``, ``"fused"`` or ``"naive"`` attention."""
        if levels_3d is not None:
            self.levels_3d = resolve_levels_3d(levels_3d, self.num_levels, self.unet.config.sample_size)
        if attention is not None:
            if attention not in ("fused", "naive"):
                raise ValueError(f"attention must be 'fused' or 'naive', not {attention!r}")
            self.attention_mode = attention
        naive = self.attention_mode == "naive"
        procs = {}
        for name in self.unet.attn_processors:
            self_attn = ".attn1." in name
            procs[name] = MultiViewAttnProcessor(
                joint=self_attn and level_of(name, self.num_levels) in self.levels_3d, naive=naive)
        self.unet.set_attn_processor(procs)

    def config_dict(self) -> dict:
        """Everything needed to rebuild this model (``MultiViewUNet.from_config``), JSON-friendly."""
        cfg = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        return {"unet": cfg, "levels_3d": sorted(self.levels_3d), "attention": self.attention_mode}

    @classmethod
    def from_config(cls, config: dict) -> "MultiViewUNet":
        from diffusers import UNet2DConditionModel
        return cls(UNet2DConditionModel.from_config(config["unet"]), levels_3d=config["levels_3d"],
                   attention=config.get("attention", "fused"))

    # forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        """``x (B, V, C_in, h, w)``, ``c_noise (B,)`` (or a number), ``context (B, T, D)`` -> ``(B, V, C_out, h, w)``.

        The ``V`` views become ``B * V`` images; each view gets its sample's ``c_noise`` and context.
        """
        if x.ndim != 5:
            raise ValueError(f"x must be (B, V, C, h, w), got shape {tuple(x.shape)}")
        B, V, C, h, w = x.shape
        if C != self.in_channels:
            raise ValueError(f"x has {C} channels per view, this UNet takes {self.in_channels}")
        if context.ndim != 3 or context.shape[0] != B:
            raise ValueError(f"context must be (B={B}, T, D), got shape {tuple(context.shape)}")
        c_noise = torch.as_tensor(c_noise, dtype=torch.float32, device=x.device)
        c_noise = c_noise.reshape(-1).expand(B) if c_noise.numel() == 1 else c_noise.reshape(B)
        out = self.unet(
            x.reshape(B * V, C, h, w),
            c_noise.repeat_interleave(V),                                   # (B*V,)
            encoder_hidden_states=context.repeat_interleave(V, dim=0),      # (B*V, T, D)
            cross_attention_kwargs={"num_views": V},
            return_dict=False,
        )[0]
        return out.reshape(B, V, -1, h, w)


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
def unet_config(profile: Profile | str, in_channels: int = IN_CHANNELS, out_channels: int = OUT_CHANNELS) -> dict:
    """The ``UNet2DConditionModel`` configuration of a profile (``unet_*`` fields, ``text_hidden``)."""
    p = get_profile(profile)
    ch = tuple(p.unet_channels)
    n = len(ch)
    attn = set(p.unet_attn_levels) if p.unet_attn_levels else set(range(n))
    if p.unet_heads:
        heads = (p.unet_heads,) * n
    else:
        bad = [c for c in ch if c % p.unet_head_dim]
        if bad:
            raise ValueError(f"unet_channels {ch} are not multiples of unet_head_dim {p.unet_head_dim}")
        heads = tuple(c // p.unet_head_dim for c in ch)
    return dict(
        sample_size=p.latent_res,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=ch,
        layers_per_block=p.unet_layers_per_block,
        attention_head_dim=heads,          # diffusers' name for the number of heads per level
        cross_attention_dim=p.text_hidden,
        norm_num_groups=norm_groups(ch, per_group=1),   # largest <= 32 dividing every width, as checkpoints have
    )


def load_unet2d(path: str | Path, subfolder: str | None = None):
    """A 2D ``UNet2DConditionModel`` from a local diffusers folder (no hub access).

    ``path`` may be the UNet folder itself or a pipeline folder with the UNet in ``unet/`` or ``arc2face/``
    (Arc2Face's layout); ``subfolder`` names it explicitly.
    """
    from diffusers import UNet2DConditionModel
    root = resolve_local_folder(path, what="2D UNet (UNet2DConditionModel)",
                                hint="or set unet_pretrained='' to start from random weights")
    if subfolder is None:
        subfolder = next((s for s in ("", "unet", "arc2face") if (root / s / "config.json").exists()), None)
        if subfolder is None:
            raise FileNotFoundError(f"{root} holds no config.json (nor unet/config.json, arc2face/config.json): "
                                    "it is not a diffusers UNet2DConditionModel folder")
    return UNet2DConditionModel.from_pretrained(str(root), subfolder=subfolder or None, local_files_only=True)


@torch.no_grad()
def widen_from_2d(unet2d, in_channels: int = IN_CHANNELS, out_channels: int = OUT_CHANNELS,
                  out_init: str = "copy"):
    """A ``UNet2DConditionModel`` with ``in_channels`` inputs and ``out_channels`` outputs made from a 2D one.

    ``unet2d`` is a model or a local folder (``load_unet2d``). All weights are copied; ``conv_in`` gains input
    channels after the old ones (the old 4 become the image latent channels 0:4) with *zero* weights, so at init
    the widened model gives the 2D model's output whatever the normal latents, ray maps and mask hold.
    ``conv_out`` gains output channels: ``out_init="copy"`` repeats the old output filters (the normal latent
    half starts as a copy of the image half's filters, so it starts from a working denoiser's features),
    ``"zero"`` starts them at zero. The old output channels are unchanged either way.
    """
    from diffusers import UNet2DConditionModel
    if isinstance(unet2d, (str, Path)):
        unet2d = load_unet2d(unet2d)
    old_in, old_out = unet2d.config.in_channels, unet2d.config.out_channels
    if in_channels < old_in or out_channels < old_out:
        raise ValueError(f"cannot narrow a UNet ({old_in} -> {in_channels} inputs, "
                         f"{old_out} -> {out_channels} outputs)")
    if out_init not in ("copy", "zero"):
        raise ValueError(f"out_init must be 'copy' or 'zero', not {out_init!r}")
    config = {k: v for k, v in dict(unet2d.config).items() if not k.startswith("_")}
    config.update(in_channels=in_channels, out_channels=out_channels)
    wide = UNet2DConditionModel.from_config(config)
    state = {k: v.float() for k, v in unet2d.state_dict().items()}

    w_in = state["conv_in.weight"]                                      # (C0, old_in, k, k)
    state["conv_in.weight"] = torch.cat([w_in, w_in.new_zeros(w_in.shape[0], in_channels - old_in, *w_in.shape[2:])], 1)

    w_out, b_out = state["conv_out.weight"], state["conv_out.bias"]     # (old_out, C0, k, k), (old_out,)
    src = torch.arange(out_channels) % old_out
    new_w, new_b = w_out[src].clone(), b_out[src].clone()
    if out_init == "zero":
        new_w[old_out:] = 0
        new_b[old_out:] = 0
    state["conv_out.weight"], state["conv_out.bias"] = new_w, new_b
    wide.load_state_dict(state)
    return wide


def build_mvunet(profile: Profile | str, pretrained: str | Path = "", levels_3d: int | Iterable[int] | None = None,
                 attention: str = "fused") -> MultiViewUNet:
    """The multi-view UNet of a profile: from a 2D checkpoint folder (``pretrained`` or ``profile.unet_pretrained``,
    widened by ``widen_from_2d``) where one is named, else with random weights from ``unet_config(profile)``.

    ``levels_3d`` defaults to ``profile.unet_3d_levels``.
    """
    from diffusers import UNet2DConditionModel
    p = get_profile(profile)
    levels_3d = p.unet_3d_levels if levels_3d is None else levels_3d
    pretrained = pretrained or p.unet_pretrained
    if pretrained:
        unet = widen_from_2d(load_unet2d(pretrained))
        if unet.config.cross_attention_dim != p.text_hidden:
            raise ValueError(f"the 2D UNet at {pretrained} cross-attends to {unet.config.cross_attention_dim}-d "
                             f"context, profile {p.name!r} has text_hidden={p.text_hidden}: use a matching profile")
    else:
        unet = UNet2DConditionModel(**unet_config(p))
        zero_condition_inputs(unet)
    return MultiViewUNet(unet, levels_3d=levels_3d, attention=attention)


@torch.no_grad()
def zero_condition_inputs(unet, latent_channels: int = OUT_CHANNELS) -> None:
    """Start the input conv's weights of the ray-map and mask channels (``latent_channels:``) at zero.

    A model widened from a 2D checkpoint starts so (``widen_from_2d``); a model built from scratch did not, and its
    144 ray channels then entered through a *random* projection that training barely moved (the first cpu
    reference: their weights ended at 0.34 of norm per channel against 0.37 at initialisation, the latents' at 0.79),
    a per-camera random offset on every feature of the first layer. Starting at zero, the camera enters only as far
    as training makes it useful (notebook 07, "is the model using its cameras and its input?").
    """
    unet.conv_in.weight[:, latent_channels:] = 0.0


# ----------------------------------------------------------------------------------------------
# counting: parameters and FLOPs per level, attention cost
# ----------------------------------------------------------------------------------------------
def _part_of(name: str, num_levels: int) -> str:
    if name.startswith(("down_blocks.", "up_blocks.")):
        kind, i = name.split(".")[:2]
        return f"{kind.split('_')[0]} {level_of(name, num_levels)}"
    if name.startswith("mid_block"):
        return "mid"
    return {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "conv_out"}.get(
        name.split(".")[0], "time embedding")


def level_table(model: MultiViewUNet, views: int, latent_res: int, batch: int = 1, context_len: int = 77) -> list[dict]:
    """Parameters and forward FLOPs per part of the UNet for ``batch`` samples of ``views`` views.

    Rows: ``part`` (``down i``, ``mid``, ``up i``, ``conv_in``, ...), ``level``, ``res`` (token grid side),
    ``tokens_3d`` (tokens one self-attention sees: ``V * L`` at 3D levels, ``L`` elsewhere), ``params``,
    ``gflops`` (counted by ``torch.utils.flop_counter``: 2 FLOPs per multiply-add) and ``attn_gflops``
    (of those, the attention matrix products ``Q K^T`` and ``P V``).
    """
    from torch.utils.flop_counter import FlopCounterMode
    n = model.num_levels
    unet = model.unet
    rows: dict[str, dict] = {}
    for name, prm in unet.named_parameters():
        part = _part_of(name, n)
        rows.setdefault(part, {"part": part, "params": 0, "gflops": 0.0, "attn_gflops": 0.0})
        rows[part]["params"] += prm.numel()
    dev = next(unet.parameters()).device
    x = torch.zeros(batch, views, model.in_channels, latent_res, latent_res, device=dev)
    ctx = torch.zeros(batch, context_len, model.cross_attention_dim, device=dev)
    counter = FlopCounterMode(display=False)
    mode = model.attention_mode
    model.set_attention(attention="naive")          # the counter sees the matrix products (the CPU fused kernel
    try:                                            # is not in its table); the FLOPs are the same
        with torch.no_grad(), counter:
            model(x, torch.zeros(batch, device=dev), ctx)
    finally:
        model.set_attention(attention=mode)
    prefix = "MultiViewUNet.unet."
    attn_ops = ("bmm",)
    for mod, ops in counter.get_flop_counts().items():
        if not mod.startswith(prefix):
            continue
        rest = mod[len(prefix):]
        top = rest.split(".")[0]
        depth = 2 if top in ("down_blocks", "up_blocks") else 1
        if rest.count(".") + 1 != depth:                 # count each op once: at the part's own module
            continue
        part = _part_of(rest, n)
        rows[part]["gflops"] += sum(ops.values()) / 1e9
        rows[part]["attn_gflops"] += sum(v for op, v in ops.items() if any(a in str(op) for a in attn_ops)) / 1e9
    out = []
    for part, r in rows.items():
        lvl = int(part.split()[1]) if part.startswith(("down ", "up ")) else (n - 1 if part == "mid" else None)
        r["level"] = lvl
        r["res"] = latent_res // 2 ** lvl if lvl is not None else latent_res
        r["tokens_3d"] = (views if lvl in model.levels_3d else 1) * r["res"] ** 2 if lvl is not None else None
        out.append(r)
    def order(r):            # the path of the data: conv_in, time, down 0.., mid, up n-1.., conv_out
        fixed = {"conv_in": -2, "time embedding": -1, "mid": 100, "conv_out": 1000}
        if r["part"] in fixed:
            return fixed[r["part"]]
        return r["level"] if r["part"].startswith("down") else 200 - r["level"]
    return sorted(out, key=order)


def attention_memory_bytes(tokens: int, heads: int, head_dim: int, batch: int = 1, bytes_per: int = 4,
                           naive: bool = True) -> int:
    """Analytic working memory of one attention call beyond its inputs.

    Naive: the score matrix and its softmax, ``2 * B * H * N^2`` numbers, plus the output ``B * H * N * d``.
    Fused (flash / memory-efficient kernels): the output and a per-row max and sum, ``B * H * N * (d + 2)``;
    the ``N x N`` matrix is never stored.
    """
    n = batch * heads * tokens
    return bytes_per * (n * (2 * tokens + head_dim) if naive else n * (head_dim + 2))


def benchmark_attention(tokens: int, heads: int, head_dim: int, batch: int = 1, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, repeats: int = 3, naive: bool = False, seed: int = 0,
                        warmup: bool = True) -> dict:
    """Time (median seconds) and peak memory of ``attention`` over ``tokens = V * L`` tokens.

    Memory on CUDA is measured (``torch.cuda.max_memory_allocated`` above the inputs); on CPU it is the analytic
    figure of ``attention_memory_bytes`` (PyTorch's CPU allocator keeps no peak statistic), reported with
    ``memory_method``.
    """
    device = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=g, dtype=torch.float32).to(device, dtype)
               for _ in range(3))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    with torch.no_grad():
        if warmup or cuda:
            attention(q, k, v, naive=naive)              # first call: kernel selection, allocator growth
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = attention(q, k, v, naive=naive)
            sync()
            times.append(time.perf_counter() - t0)
            del out
    times.sort()
    if cuda:
        mem, method = torch.cuda.max_memory_allocated(device) - base, "measured (torch.cuda.max_memory_allocated)"
    else:
        mem = attention_memory_bytes(tokens, heads, head_dim, batch, torch.finfo(dtype).bits // 8, naive=naive)
        method = "analytic (score matrix size)"
    return {"tokens": tokens, "naive": naive, "seconds": times[len(times) // 2], "peak_bytes": int(mem),
            "memory_method": method, "device": str(device)}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def copy_as_2d(model: MultiViewUNet):
    """A deep copy of the wrapped UNet with diffusers' default processors (the plain 2D model)."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet = copy.deepcopy(model.unet)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


__all__ = ["IN_CHANNELS", "OUT_CHANNELS", "MultiViewAttnProcessor", "MultiViewUNet", "attention", "attention_probs",
           "fold_views", "unfold_views", "level_of", "resolve_levels_3d", "unet_config", "load_unet2d",
           "widen_from_2d", "build_mvunet", "level_table", "attention_memory_bytes", "benchmark_attention",
           "count_params", "copy_as_2d"]
