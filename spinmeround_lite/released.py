"""The released SpinMeRound weights in the course: key map, converter, conventions and loading.

Notebook ``11_the_real_model``; README, "Using the released SpinMeRound weights".

The authors released inference code and weights (``spmr.ckpt``, a PyTorch Lightning checkpoint of their
``MultiViewUNetModel``; ``configs/inference.yaml`` gives its configuration, ``RELEASED_UNET`` below). This
module maps that UNet onto the course's ``mvunet.MultiViewUNet`` and wraps it so the course's own sampler,
spin (steps A, B, C), splatting and evaluation run the real model:

* **Key map** (``key_map``, ``convert_unet_state``). The released UNet has the SD1.5 layout in the original
  LDM naming (``input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight``), the course's the diffusers naming
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``). Blocks map by their position
  (level, index), ResNet internals by a fixed rename (``in_layers.0 -> norm1``, ...), transformer internals keep
  their names. The conversion refuses to finish unless every released key lands on a course key of the same shape
  and every course key is filled: 686 keys, 859,961,608 parameters at full size.
* **3D attention.** The released code builds a 2D ``SpatialTransformer`` at level 0 (64x64 latents) and a
  ``SpatialTransformer3D`` at every coarser level and in the middle block, with the same weights as a 2D one; in
  the 3D block only the self-attention runs over the tokens of all views of a sample,
  ``(b f) l c -> b (f l) c``. That is the course's ``MultiViewUNet(levels_3d=-1)`` exactly (rows ``b * V + v``).
* **Conditioning** (``ReleasedSpinModel``). Per view the UNet reads ``[c_in * latent (8) | ray map (144, the
  released convention: raymaps.released_raymap) | mask (1)]`` where, unlike the course's model, the mask is 1 for
  views to generate and 0 for the given view, and the given view's clean latent is also multiplied by ``c_in``
  (the released sampler writes it into the state, then the denoiser scales the whole state). Denoiser scaling:
  v-prediction with EDM's ``c_noise = ln(sigma) / 4``, sigma_data 1. Identity: Arc2Face's CLIP text encoder with
  the ArcFace embedding in place of the word ``id`` (``tokens.IdentityContext`` follows that scheme), ArcFace from
  insightface's antelopev2 pack (``glintr100.onnx``). Autoencoder: SD1.5's, scale 0.18215.
* **Classifier-free guidance** (the released ``VanillaCFGSpMR`` guider). The unconditional branch replaces the
  given view's latent by ``empty_latent`` (the autoencoder's latent of an all-zero image in [-1, 1], mid grey, in
  both the image and the normal half), zeroes that view's 145 condition channels (ray map and mask), and encodes
  the empty prompt ``""`` (the released text embedder encodes every string it is given, the empty one included).
  ``denoise(..., id_emb=None)`` is that branch, so ``sampling.cfg_denoiser`` runs the released guidance unchanged.
* **Sampling.** Steps B and C: Euler on the Karras schedule 0.002 .. 700, 50 steps, scale 3.5 (``released_profile``).
  Step A (the input's normals): no guidance, 50 Euler steps on the schedule of SD's DDPM betas
  (``ddpm_sigmas``: 14.6 .. 0.13, DDPM steps 999 .. 19), reconstruction guidance with weight 1e5 on the image channels.

Small differences that remain, stated so nobody looks for them: the released sampler starts from noise times
``sqrt(1 + sigma_max^2)`` (700.0007 instead of 700) and encodes images by sampling the autoencoder's posterior
(the course takes its mean); the released app crops photos with PanoHead's 3DDFA pipeline and removes the
background with a face parser (the course aligns by 5 keypoints to its own framing: give the released model a
PanoHead-style crop on white and ``align=False``). Which released angle is the course's yaw: ``cameras``.

Command line::

    python -m spinmeround_lite.released convert weights/spmr.ckpt --out weights/spinmeround/ [--ema] [--dtype float16]
    python -m spinmeround_lite.released check [--weights weights/]      # which files are present, which missing
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import edm
from .profiles import Profile, get_profile

KIND = "spinmeround-lite/released-unet-v1"
UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
SCALE_FACTOR = 0.18215            # the SD1.5 autoencoder's latent scale (configs/inference.yaml)
CFG_SCALE = 3.5                   # the released guider's scale
SAMPLE_STEPS = 50
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0
NORMALS_WEIGHT = 1e5              # gradient weight of the released step A

# configs/inference.yaml, network_config.params (image_size is unused by the network)
RELEASED_UNET = dict(in_channels=153, out_channels=8, model_channels=320, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                     use_linear_in_transformer=False, transformer_depth=1, context_dim=768, use_checkpoint=False,
                     legacy=False)
LATENT_RES = 64                   # 512 px images, autoencoder factor 8

RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


class ReleasedCheckpointError(RuntimeError):
    """A released checkpoint that cannot be read safely, or whose keys do not map completely."""


class MissingWeightsError(FileNotFoundError):
    """Files of the released model are missing; the message names each and where it goes."""


# ----------------------------------------------------------------------------------------------
# the released configuration -> the course's
# ----------------------------------------------------------------------------------------------
_UNSUPPORTED = {"dims": 2, "num_classes": None, "use_scale_shift_norm": False, "resblock_updown": False,
                "use_new_attention_order": False, "use_linear_in_transformer": False, "num_head_channels": -1,
                "disable_self_attentions": None, "num_attention_blocks": None, "disable_middle_self_attn": False,
                "adm_in_channels": None, "camera_dim": None, "n_embed": None, "legacy": False,
                "use_spatial_transformer": True, "conv_resample": True}


def check_released_config(cfg: dict) -> dict:
    """The released UNet options this converter handles (those of ``configs/inference.yaml``); others refused."""
    bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in _UNSUPPORTED.items() if k in cfg and cfg[k] != v]
    if isinstance(cfg.get("transformer_depth", 1), (list, tuple)) or isinstance(cfg.get("num_res_blocks"),
                                                                                  (list, tuple)):
        bad.append("per-level transformer_depth / num_res_blocks")
    if bad:
        raise ValueError("this released UNet configuration has options the course's MultiViewUNet does not "
                         "reproduce: " + "; ".join(bad))
    return cfg


def levels(cfg: dict) -> tuple[int, int, list[bool]]:
    """(levels, ResNet blocks per level, whether each level has attention: ``2^l in attention_resolutions``)."""
    n = len(cfg["channel_mult"])
    return n, int(cfg["num_res_blocks"]), [2 ** lv in set(cfg["attention_resolutions"]) for lv in range(n)]


def diffusers_config(cfg: dict, latent_res: int = LATENT_RES) -> dict:
    """The ``UNet2DConditionModel`` configuration of a released ``MultiViewUNetModel`` configuration."""
    check_released_config(cfg)
    n, nrb, attn = levels(cfg)
    mc = int(cfg["model_channels"])
    return dict(
        sample_size=latent_res, in_channels=int(cfg["in_channels"]), out_channels=int(cfg["out_channels"]),
        down_block_types=tuple("CrossAttnDownBlock2D" if attn[lv] else "DownBlock2D" for lv in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if attn[lv] else "UpBlock2D" for lv in reversed(range(n))),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(mc * m for m in cfg["channel_mult"]), layers_per_block=nrb,
        attention_head_dim=int(cfg["num_heads"]),          # diffusers' name for the number of heads (8 in SD1.5)
        cross_attention_dim=int(cfg["context_dim"]), transformer_layers_per_block=int(cfg["transformer_depth"]),
        norm_num_groups=32, norm_eps=1e-5, use_linear_projection=False,
        flip_sin_to_cos=True, freq_shift=0,                # the released timestep embedding is [cos, sin]
    )


def mvunet_config(cfg: dict, latent_res: int = LATENT_RES) -> dict:
    """``MultiViewUNet.from_config`` input: the diffusers UNet and 3D self-attention at every level but level 0
    (where the released code builds ``SpatialTransformer3D``: levels 1.., and the middle block)."""
    n = len(cfg["channel_mult"])
    return {"unet": diffusers_config(cfg, latent_res), "levels_3d": list(range(1, n)), "attention": "fused"}


def build_unet(cfg: dict = RELEASED_UNET, latent_res: int = LATENT_RES, device: str | torch.device | None = None):
    """A course ``MultiViewUNet`` shaped like the released UNet (random weights; ``device="meta"``: no memory)."""
    from .mvunet import MultiViewUNet
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            return MultiViewUNet.from_config(mvunet_config(cfg, latent_res))
    model = MultiViewUNet.from_config(mvunet_config(cfg, latent_res))
    return model.to(device) if device is not None else model


# ----------------------------------------------------------------------------------------------
# the key map
# ----------------------------------------------------------------------------------------------
def module_map(cfg: dict) -> dict[str, tuple[str, str]]:
    """Released module prefix -> (course module prefix, kind): kind ``"resnet"`` renames the ResNet internals,
    ``"same"`` keeps the rest of the key. Course prefixes are diffusers names inside ``MultiViewUNet.unet``."""
    n, nrb, attn = levels(cfg)
    m: dict[str, tuple[str, str]] = {
        "time_embed.0": ("time_embedding.linear_1", "same"), "time_embed.2": ("time_embedding.linear_2", "same"),
        "input_blocks.0.0": ("conv_in", "same"),
        "middle_block.0": ("mid_block.resnets.0", "resnet"), "middle_block.1": ("mid_block.attentions.0", "same"),
        "middle_block.2": ("mid_block.resnets.1", "resnet"),
        "out.0": ("conv_norm_out", "same"), "out.2": ("conv_out", "same"),
    }
    for lv in range(n):                                   # input_blocks: 1 + lv (nrb + 1) + j, then a downsampler
        for j in range(nrb):
            i = 1 + lv * (nrb + 1) + j
            m[f"input_blocks.{i}.0"] = (f"down_blocks.{lv}.resnets.{j}", "resnet")
            if attn[lv]:
                m[f"input_blocks.{i}.1"] = (f"down_blocks.{lv}.attentions.{j}", "same")
        if lv < n - 1:
            m[f"input_blocks.{(lv + 1) * (nrb + 1)}.0.op"] = (f"down_blocks.{lv}.downsamplers.0.conv", "same")
    for u in range(n):                                    # output_blocks: u (nrb + 1) + j, u = 0 the coarsest level
        lv = n - 1 - u
        for j in range(nrb + 1):
            i = u * (nrb + 1) + j
            m[f"output_blocks.{i}.0"] = (f"up_blocks.{u}.resnets.{j}", "resnet")
            if attn[lv]:
                m[f"output_blocks.{i}.1"] = (f"up_blocks.{u}.attentions.{j}", "same")
        if lv > 0:
            last = u * (nrb + 1) + nrb
            m[f"output_blocks.{last}.{2 if attn[lv] else 1}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", "same")
    return m


def key_map(keys, cfg: dict) -> tuple[dict[str, str], list[str]]:
    """Map released UNet keys (without ``model.diffusion_model.``) to diffusers keys.

    Returns ``(mapping, unmapped)``: each key's module is the longest released prefix in ``module_map``.
    """
    mods = module_map(cfg)
    by_len = sorted(mods, key=len, reverse=True)
    mapping, unmapped = {}, []
    for k in keys:
        mod = next((p for p in by_len if k.startswith(p + ".")), None)
        if mod is None:
            unmapped.append(k)
            continue
        new, kind = mods[mod]
        rest = k[len(mod) + 1:]
        if kind == "resnet":
            sub = next((s for s in RESNET_RENAMES if rest.startswith(s + ".")), None)
            if sub is None:
                unmapped.append(k)
                continue
            rest = RESNET_RENAMES[sub] + rest[len(sub):]
        mapping[k] = f"{new}.{rest}"
    return mapping, unmapped


@dataclass
class ConversionReport:
    mapped: int
    params: int
    missing: list[str]            # course keys no released key filled
    unexpected: list[str]         # released keys with no course key (or a key of another shape)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        s = f"{self.mapped} keys mapped ({self.params:,} parameters), {len(self.missing)} missing, " \
            f"{len(self.unexpected)} unexpected"
        if self.missing:
            s += "\n  missing: " + ", ".join(self.missing[:8]) + (" ..." if len(self.missing) > 8 else "")
        if self.unexpected:
            s += "\n  unexpected: " + ", ".join(self.unexpected[:8]) + (" ..." if len(self.unexpected) > 8 else "")
        return s


def convert_unet_state(state: dict[str, torch.Tensor], cfg: dict = RELEASED_UNET, latent_res: int = LATENT_RES,
                       strict: bool = True) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Released UNet state (keys without ``model.diffusion_model.``) -> ``MultiViewUNet`` state (keys ``unet.*``).

    Every released key must map to a course key of the same shape and every course key must be filled
    (checked against a course model built on the ``meta`` device); ``strict`` raises
    ``ReleasedCheckpointError`` otherwise. Tensors are not copied (meta tensors stay meta).
    """
    target = build_unet(cfg, latent_res, device="meta").state_dict()
    mapping, unmapped = key_map(state.keys(), cfg)
    out, unexpected = {}, list(unmapped)
    for k, new in mapping.items():
        full = f"unet.{new}"
        if full not in target or tuple(target[full].shape) != tuple(state[k].shape):
            got = tuple(target[full].shape) if full in target else "no such key"
            unexpected.append(f"{k} -> {full} ({tuple(state[k].shape)} vs {got})")
            continue
        out[full] = state[k]
    missing = sorted(set(target) - set(out))
    report = ConversionReport(len(out), sum(t.numel() for t in out.values()), missing, sorted(unexpected))
    if strict and not report.ok:
        raise ReleasedCheckpointError("the released UNet does not map completely onto the course's:\n"
                                      + report.summary())
    return out, report


# ----------------------------------------------------------------------------------------------
# reading the released checkpoint (safely) and converting it
# ----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat state dict of a released checkpoint: ``.ckpt``/``.pt``/``.pth`` (a pickle, read with
    ``torch.load(weights_only=True)`` only) or ``.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file. Download the released spmr.ckpt (the SpinMeRound "
                                "repository's README links it) and give its path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReleasedCheckpointError(
            f"{path} is a pickle that holds more than tensors, and a weights-only load refuses it ({first}). "
            "This course never unpickles arbitrary objects. If you trust the file, extract its tensors once in "
            "a separate Python session:\n"
            "  import torch; from safetensors.torch import save_file\n"
            f"  sd = torch.load('{path}', map_location='cpu', weights_only=False)['state_dict']\n"
            f"  save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\n"
            "then convert the .safetensors file.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReleasedCheckpointError(f"{path} holds no flat state dict of tensors (nor one under 'state_dict')")
    return obj


def split_released(state: dict[str, torch.Tensor], ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's tensors (keys without ``model.diffusion_model.``) and a count of every other key group.

    ``ema=True`` takes the UNet's exponential-moving-average copy (``model_ema.diffusion_model<key without
    dots>``, as PyTorch Lightning's LitEma stores it) where the checkpoint has one.
    """
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    if not unet and any(k.startswith(("input_blocks.", "middle_block.")) for k in state):
        unet = {k: v for k, v in state.items()}               # a bare UNet state dict
    others: dict[str, int] = {}
    for k in state:
        if not k.startswith(UNET_PREFIX) and k not in unet:
            group = ".".join(k.split(".")[:2]) if k.startswith("conditioner.") else k.split(".")[0]
            others[group] = others.get(group, 0) + 1
    if ema:
        ema_keys = {k: EMA_PREFIX + ("diffusion_model." + k).replace(".", "") for k in unet}
        absent = [v for v in ema_keys.values() if v not in state]
        if absent:
            raise ReleasedCheckpointError(f"--ema: the checkpoint has no EMA copy of the UNet ({len(absent)} of "
                                          f"{len(unet)} keys absent, e.g. {absent[0]}); convert without --ema")
        unet = {k: state[v] for k, v in ema_keys.items()}
    if not unet:
        raise ReleasedCheckpointError(f"no UNet keys (prefix {UNET_PREFIX!r}) in the checkpoint; its key groups: "
                                      + ", ".join(f"{g} ({n})" for g, n in sorted(others.items())))
    return unet, others


def convert(src: str | os.PathLike, out: str | os.PathLike, ema: bool = False, dtype: str | None = None,
            cfg: dict = RELEASED_UNET) -> dict:
    """Convert a released checkpoint into a course folder: ``model.safetensors`` (MultiViewUNet) + ``config.json``."""
    from .checkpoints import save_checkpoint
    state = read_checkpoint(src)
    unet, others = split_released(state, ema=ema)
    course, report = convert_unet_state(unet, cfg)
    if dtype:
        course = {k: v.to(getattr(torch, dtype)) for k, v in course.items()}
    info = {"kind": KIND, "mvunet": mvunet_config(cfg), "released_config": cfg, "source": str(src),
            "ema": ema, "keys_mapped": report.mapped, "params": report.params, "missing": report.missing,
            "unexpected": report.unexpected, "other_key_groups": others,
            "dtype": str(next(iter(course.values())).dtype).replace("torch.", "")}
    save_checkpoint(out, course, info)
    return info


def load_unet(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The converted released UNet (a course ``MultiViewUNet``) from a folder ``convert`` wrote."""
    from .checkpoints import CheckpointError, load_checkpoint
    from .mvunet import MultiViewUNet
    state, cfg = load_checkpoint(folder, device="cpu")
    if cfg.get("kind") != KIND:
        raise CheckpointError(f"{folder} is not a converted released UNet (config kind {cfg.get('kind')!r}); run "
                              "`python -m spinmeround_lite.released convert spmr.ckpt --out <folder>`")
    model = MultiViewUNet.from_config(cfg["mvunet"])
    model.load_state_dict(state, strict=True)
    model = model.to(device)
    return (model.to(dtype) if dtype is not None else model).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# the released model, behind the course's SpinModel interface
# ----------------------------------------------------------------------------------------------
class ReleasedSpinModel(nn.Module):
    """The released UNet and conditioning behind ``SpinModel.denoise``'s signature (module doc, "Conditioning").

    unet: ``MultiViewUNet`` (``load_unet``); context: ``tokens.IdentityContext`` (Arc2Face's encoder) or any
    ``context(id_emb or None, batch_size) -> (B, 77, D)``; empty_latent (8, h, w): the latent of the all-zero
    image (``empty_latent_of(codec)``). ``rays`` given to ``denoise`` must be released ray maps
    (``raymaps.released_raymap``); ``spin`` makes them so for the released profile.
    """

    def __init__(self, unet: nn.Module, context, empty_latent: torch.Tensor, sigma_data: float = 1.0):
        super().__init__()
        self.unet = unet
        self.context = context
        self.register_buffer("empty_latent", empty_latent.float().reshape(8, *empty_latent.shape[-2:]))
        self.sigma_data = float(sigma_data)
        self.prediction = "v"
        self.config = {"kind": KIND, "sigma_data": self.sigma_data, "prediction": "v", "released": True}

    def identity_context(self, id_emb: torch.Tensor | None, batch: int) -> torch.Tensor:
        ctx = self.context(id_emb) if id_emb is not None else self.context(None)
        return ctx.expand(batch, *ctx.shape[1:]) if ctx.shape[0] != batch else ctx

    def network_input(self, x: torch.Tensor, c_in: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                      rays: torch.Tensor, unconditional: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(UNet input (B, V, 153, h, w), the state it scaled (B, V, 8, h, w)) in the released arrangement."""
        B, V, _, h, w = x.shape
        m = mask.view(B, V, 1, 1, 1)
        given = self.empty_latent.to(x).expand(B, V, 8, h, w) if unconditional else cond
        state = torch.where(m, given, x)                                        # the given view's latent in x
        cond_ch = torch.cat([rays.to(x), (~mask).to(x).view(B, V, 1, 1, 1).expand(B, V, 1, h, w)], dim=2)
        if unconditional:
            cond_ch = torch.where(m, torch.zeros_like(cond_ch), cond_ch)       # the given view's 145 channels: 0
        return torch.cat([c_in * state, cond_ch], dim=2), state

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                rays: torch.Tensor, id_emb: torch.Tensor | None = None, context: torch.Tensor | None = None,
                drop_id: torch.Tensor | None = None) -> torch.Tensor:
        """``D(x; sigma)`` (B, V, 8, h, w) as the released denoiser computes it; given views come back as ``cond``.

        ``id_emb=None`` (and no ``context``) is the released unconditional branch: empty prompt, the given
        views' latents replaced by ``empty_latent`` and their ray map and mask channels zeroed.
        """
        if drop_id is not None:
            raise ValueError("the released model is for sampling; it takes no drop_id (training dropout)")
        B, V, C, h, w = x.shape
        mask = torch.as_tensor(mask, device=x.device).bool().reshape(B, V)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        c_skip, c_out, c_in, c_noise = edm.edm_coefficients(sigma, self.sigma_data, "v")
        c_skip, c_out, c_in = (c.view(B, 1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        x, cond = x.float(), cond.float()
        unconditional = id_emb is None and context is None
        net_in, state = self.network_input(x, c_in, cond, mask, rays, unconditional)
        if context is None:
            context = self.identity_context(id_emb, B)
        dtype = next(self.unet.parameters()).dtype
        F = self.unet(net_in.to(dtype), c_noise, context.to(dtype)).float()
        D = c_skip * state + c_out * F
        return torch.where(mask.view(B, V, 1, 1, 1), cond, D)

    def forward(self, *args, **kwargs):
        return self.denoise(*args, **kwargs)


@torch.no_grad()
def empty_latent_of(codec) -> torch.Tensor:
    """The released ``empty_image``: the latent (8, h, w) of the all-zero image in [-1, 1] (0.5 grey in [0, 1]),
    the same 4 channels twice (image half and normal half)."""
    R = codec.resolution
    z = codec.encode(torch.full((1, 3, R, R), 0.5)).float().cpu()[0]
    return torch.cat([z, z], 0)


def ddpm_sigmas(n: int = SAMPLE_STEPS, linear_start: float = 0.00085, linear_end: float = 0.012,
                timesteps: int = 1000) -> torch.Tensor:
    """The released step A schedule (``LegacyDDPMDiscretization``): SD's linear-in-sqrt betas, ``n`` of the 1000
    DDPM steps roughly equally spaced, ``sigma = sqrt((1 - a) / a)``, decreasing, then 0. (n + 1,) float64."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy())
    idx = np.linspace(timesteps - 1, 0, n, endpoint=False).astype(int)[::-1] if n < timesteps \
        else np.arange(timesteps)
    ac = alphas_cumprod[idx]
    sig = torch.tensor((1 - ac) / ac, dtype=torch.float32) ** 0.5             # float32, as computed there
    return torch.cat([torch.flip(sig, (0,)).double(), torch.zeros(1, dtype=torch.float64)])


# ----------------------------------------------------------------------------------------------
# the files, the profile, the parts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFile:
    path: str                     # relative to the weights folder
    what: str
    source: str
    alternatives: tuple = ()      # other accepted relative paths


WEIGHT_FILES = (
    WeightFile("spinmeround/model.safetensors", "the released multi-view UNet, converted",
               "`python -m spinmeround_lite.released convert <your spmr.ckpt> --out weights/spinmeround/` "
               "(spmr.ckpt from the released SpinMeRound repository's weights link)"),
    WeightFile("spinmeround/config.json", "its configuration (written by the same convert command)",
               "written together with model.safetensors"),
    WeightFile("arc2face/encoder/config.json", "Arc2Face's CLIP text encoder, configuration",
               "Arc2Face's release (its models/encoder/ folder)"),
    WeightFile("arc2face/encoder/model.safetensors", "Arc2Face's CLIP text encoder, weights",
               "Arc2Face's release (models/encoder/)", ("arc2face/encoder/pytorch_model.bin",)),
    WeightFile("arc2face/tokenizer/vocab.json", "the CLIP ViT-L/14 tokenizer, vocabulary",
               "openai/clip-vit-large-patch14 (or an SD1.5 checkout's tokenizer/ folder)"),
    WeightFile("arc2face/tokenizer/merges.txt", "the CLIP ViT-L/14 tokenizer, merges", "the same tokenizer"),
    WeightFile("sd15-vae/config.json", "the SD1.5 autoencoder (diffusers folder), configuration",
               "an SD1.5 checkout's vae/ folder (latent scale 0.18215)"),
    WeightFile("sd15-vae/diffusion_pytorch_model.safetensors", "the SD1.5 autoencoder, weights",
               "the same vae/ folder"),
    WeightFile("insightface/antelopev2/glintr100.onnx", "insightface antelopev2's ArcFace (identity embedding)",
               "insightface's antelopev2 model pack"),
    WeightFile("insightface/antelopev2/scrfd_10g_bnkps.onnx", "antelopev2's face detector (5 keypoints)",
               "the same antelopev2 pack"),
)


def weights_folder(weights_dir: str | os.PathLike | None = None) -> Path:
    """``weights_dir``, else ``$SMR_WEIGHTS``, else ``<checkout>/weights``."""
    from .identity import weights_root
    return Path(weights_dir) if weights_dir else weights_root()


def missing_files(weights_dir: str | os.PathLike | None = None) -> list[WeightFile]:
    """The released model's files that are not where the course looks for them."""
    root = weights_folder(weights_dir)
    return [f for f in WEIGHT_FILES if not any((root / p).exists() for p in (f.path, *f.alternatives))]


def missing_message(missing: list[WeightFile], weights_dir: str | os.PathLike | None = None) -> str:
    root = weights_folder(weights_dir)
    lines = [f"The `paper` profile runs the released SpinMeRound model, and {len(missing)} of its files are "
             f"missing under {root} (set $SMR_WEIGHTS or weights_dir to use another folder):"]
    for f in missing:
        alt = f" (or {', '.join(f.alternatives)})" if f.alternatives else ""
        lines.append(f"  {root / f.path}{alt}\n      {f.what}; from {f.source}")
    lines.append("Nothing is downloaded by the course. README, 'Using the released SpinMeRound weights', has the "
                 "whole list; `python -m spinmeround_lite.released check` prints it again.")
    return "\n".join(lines)


def require_files(weights_dir: str | os.PathLike | None = None) -> Path:
    """The weights folder when every released file is there; ``MissingWeightsError`` naming each missing one."""
    missing = missing_files(weights_dir)
    if missing:
        raise MissingWeightsError(missing_message(missing, weights_dir))
    return weights_folder(weights_dir)


def released_profile(base: Profile | str = "paper") -> Profile:
    """The ``paper`` profile with the released model's sampling settings and conventions (``extra``)."""
    p = get_profile(base)
    extra = dict(p.extra, model="released", camera_convention="released", normals_schedule="ddpm",
                 id_backend="insightface")
    return p.replace(resolution=512, vae_channels=(128, 256, 512, 512), vae_latent_channels=4, text_hidden=768,
                     sample_steps=SAMPLE_STEPS, cfg_scale=CFG_SCALE, sample_sigma_min=SIGMA_MIN,
                     sample_sigma_max=SIGMA_MAX, ray_origin_freqs=15, ray_dir_freqs=8, extra=extra)


def is_released(profile: Profile) -> bool:
    return profile.extra.get("model") == "released"


def camera_convention(profile: Profile) -> str:
    return profile.extra.get("camera_convention", "opencv")


def view_cameras(profile: Profile, yaws, pitch: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Released-convention cameras at course ``yaws`` (..., V), ``pitch``: the course's c2w of each view
    (``cameras.released_c2w``), its K, and the released ray maps (..., V, 144, h, w)."""
    from . import cameras
    from .raymaps import released_raymap
    yaws = torch.as_tensor(yaws, dtype=torch.float32)
    angles = cameras.released_angles(yaws, torch.full_like(yaws, float(pitch)))
    rays = released_raymap(angles, profile.latent_res, profile.latent_res, origin_freqs=profile.ray_origin_freqs,
                           dir_freqs=profile.ray_dir_freqs)
    return cameras.released_c2w(angles), cameras.intrinsics(profile.resolution), rays


def load_parts(weights_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None):
    """Everything ``spin`` needs from the released files: ``(model, codec, encoder, profile)``.

    model: ``ReleasedSpinModel``; codec: ``latents.LatentCodec`` of the SD1.5 autoencoder (scale 0.18215);
    encoder: insightface antelopev2 ArcFace; profile: ``released_profile()``. Missing files:
    ``MissingWeightsError`` naming each and where it goes.
    """
    from .identity import InsightFaceEncoder
    from .latents import LatentCodec, load_vae
    from .tokens import IdentityContext
    root = require_files(weights_dir)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    profile = released_profile()
    vae = load_vae(root / "sd15-vae")
    codec = LatentCodec(vae.to(device), scale=SCALE_FACTOR, resolution=profile.resolution, batch=8)
    context = IdentityContext(root / "arc2face").to(device).eval().requires_grad_(False)
    unet = load_unet(root / "spinmeround", device=device, dtype=dtype)
    model = ReleasedSpinModel(unet, context, empty_latent_of(codec)).to(device).eval()
    encoder = InsightFaceEncoder(root / "insightface" / "antelopev2" / "glintr100.onnx",
                                 root / "insightface" / "antelopev2" / "scrfd_10g_bnkps.onnx")
    return model, codec, encoder, profile


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.released",
                                 description="The released SpinMeRound weights in the course.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert spmr.ckpt (or a .safetensors of its state dict) to a course folder")
    c.add_argument("checkpoint")
    c.add_argument("--out", required=True, help="output folder (the course looks in weights/spinmeround/)")
    c.add_argument("--ema", action="store_true", help="take the UNet's EMA copy where the checkpoint has one")
    c.add_argument("--dtype", default="", choices=["", "float32", "float16", "bfloat16"],
                   help="store the weights in this dtype (default: as in the checkpoint)")
    k = sub.add_parser("check", help="list the released model's files: present or missing, and where they go")
    k.add_argument("--weights", default="", help="weights folder (default: $SMR_WEIGHTS, else <checkout>/weights)")
    args = ap.parse_args(argv)
    if args.cmd == "convert":
        try:
            info = convert(args.checkpoint, args.out, ema=args.ema, dtype=args.dtype or None)
        except (FileNotFoundError, ReleasedCheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: info[k] for k in ("keys_mapped", "params", "missing", "unexpected", "other_key_groups",
                                                "dtype", "ema")} | {"out": str(args.out)}, indent=1))
        return 0
    missing = missing_files(args.weights or None)
    root = weights_folder(args.weights or None)
    for f in WEIGHT_FILES:
        print(f"{'missing' if f in missing else 'present'}  {root / f.path}")
    if missing:
        print("\n" + missing_message(missing, args.weights or None))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
