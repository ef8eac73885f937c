"""The SpinMeRound model: the multi-view UNet and the identity context behind EDM's preconditioning.

Notebook 05. ``SpinModel.denoise`` is the one function training and every sampler call::

    D = model.denoise(x, sigma, cond, mask, rays, id_emb)

For each sample b and view v (latents have 8 channels: image latent 4 + normal latent 4):

* a *target* view (``mask[b, v]`` False) enters the network as ``c_in(s_b) x[b, v]`` and comes back as
  ``D = c_skip(s_b) x[b, v] + c_out(s_b) F[b, v]`` (``edm.py``);
* a *conditioning* view (``mask[b, v]`` True) enters clean, as ``cond[b, v]``, and comes back as ``cond[b, v]``.

The network input per view is ``[latent (8) | ray map (144) | mask (1)] = 153`` channels, the noise level enters
as ``c_noise = ln(s) / 4`` per sample, and the cross-attention context is the identity context
``IdentityContext(id_emb)`` (77 tokens); ``id_emb=None`` gives the empty prompt (the unconditional branch of
classifier-free guidance).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import edm
from .checkpoints import CheckpointError, check_config, load_checkpoint, save_checkpoint
from .profiles import Profile, get_profile
from .raymaps import mask_channel

LATENT_CHANNELS = 8   # image latent (4) + normal latent (4)
KIND = "spinmeround-lite/SpinModel-v1"


def model_config(p: Profile, sigma_data: float = edm.SIGMA_DATA, prediction: str = "v") -> dict:
    """Everything that fixes the shapes and meaning of a ``SpinModel`` checkpoint of profile ``p``."""
    keys = ["resolution", "vae_channels", "vae_latent_channels", "ray_origin_freqs", "ray_dir_freqs",
            "ray_origin_min_freq_log2", "ray_dir_min_freq_log2",
            "unet_channels", "unet_layers_per_block", "unet_head_dim", "unet_heads", "unet_attn_levels",
            "unet_3d_levels", "text_hidden", "text_layers", "text_heads"]
    cfg = {"kind": KIND, "sigma_data": float(sigma_data), "prediction": prediction, "latent_res": p.latent_res}
    cfg.update({k: getattr(p, k) for k in keys if hasattr(p, k)})
    return cfg


class SpinModel(nn.Module):
    """Multi-view UNet ``unet`` + identity context ``context`` behind EDM preconditioning.

    unet: ``unet(x (B,V,153,h,w), c_noise (B,), context (B,77,D)) -> (B,V,8,h,w)`` (``mvunet.MultiViewUNet``).
    context: ``context(id_emb (B,512) or None) -> (B or 1,77,D)`` (``tokens.IdentityContext``).
    """

    def __init__(self, unet: nn.Module, context: nn.Module, sigma_data: float = edm.SIGMA_DATA,
                 prediction: str = "v", config: dict | None = None):
        super().__init__()
        if prediction not in edm.PREDICTIONS:
            raise ValueError(f"prediction must be one of {edm.PREDICTIONS}, got {prediction!r}")
        self.unet = unet
        self.context = context
        self.sigma_data = float(sigma_data)
        self.prediction = prediction
        self.config = dict(config or {}, sigma_data=self.sigma_data, prediction=prediction)
        if hasattr(unet, "config_dict"):
            self.config["mvunet"] = unet.config_dict()   # rebuilds the exact architecture on load

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: Profile | str, pretrained: bool = True, sigma_data: float = edm.SIGMA_DATA,
                     prediction: str = "v") -> "SpinModel":
        """A fresh model of ``profile``'s sizes (UNet from ``profile.unet_pretrained`` when ``pretrained``)."""
        from .mvunet import MultiViewUNet, build_mvunet, unet_config
        from .tokens import IdentityContext
        p = get_profile(profile)
        if pretrained:
            unet = build_mvunet(p)
        else:
            from diffusers import UNet2DConditionModel
            unet = MultiViewUNet(UNet2DConditionModel(**unet_config(p)), levels_3d=p.unet_3d_levels)
        return cls(unet, IdentityContext(p), sigma_data, prediction, config=model_config(p, sigma_data, prediction))

    @classmethod
    def from_config(cls, p: Profile, config: dict) -> "SpinModel":
        """An untrained model of profile ``p`` with the architecture a saved ``config`` describes (its ``mvunet``
        entry)."""
        from .mvunet import MultiViewUNet
        from .tokens import IdentityContext
        sd, pred = config.get("sigma_data", edm.SIGMA_DATA), config.get("prediction", "v")
        if "mvunet" not in config:
            return cls.from_profile(p, pretrained=False, sigma_data=sd, prediction=pred)
        unet = MultiViewUNet.from_config(config["mvunet"])
        return cls(unet, IdentityContext(p), sd, pred, config=model_config(p, sd, pred))

    # ------------------------------------------------------------------------------------------
    def identity_context(self, id_emb: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Cross-attention context (batch, 77, D); ``id_emb`` None -> the empty prompt for every sample."""
        ctx = self.context(id_emb)
        if ctx.shape[0] != batch:
            ctx = ctx.expand(batch, *ctx.shape[1:])
        return ctx

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                rays: torch.Tensor, id_emb: torch.Tensor | None = None,
                context: torch.Tensor | None = None, drop_id: torch.Tensor | None = None) -> torch.Tensor:
        """EDM denoiser D(x; sigma) of every view.

        x (B,V,8,h,w) noisy latents (target views); sigma (B,) or a number; cond (B,V,8,h,w) clean latents of
        the conditioning views (other views ignored); mask (B,V) bool, True = conditioning view;
        rays (B,V,144,h,w); id_emb (B,512) or None (empty prompt); context (B,77,D) overrides ``id_emb`` when
        given; drop_id (B,) bool gives the samples marked True the empty prompt instead of their identity
        (classifier-free guidance dropout in training). Returns D (B,V,8,h,w) in float32, equal to ``cond``
        on conditioning views.
        """
        B, V, C, h, w = x.shape
        if C != LATENT_CHANNELS:
            raise ValueError(f"x must have {LATENT_CHANNELS} latent channels (image 4 + normal 4), got {C}")
        if cond.shape != x.shape:
            raise ValueError(f"cond must have the shape of x {tuple(x.shape)}, got {tuple(cond.shape)}")
        if rays.shape[:2] != (B, V) or rays.shape[-2:] != (h, w):
            raise ValueError(f"rays must be (B, V, 144, h, w) = ({B}, {V}, 144, {h}, {w}), got {tuple(rays.shape)}")
        mask = torch.as_tensor(mask, device=x.device).bool()
        if mask.shape != (B, V):
            raise ValueError(f"mask must be (B, V) = {(B, V)}, got {tuple(mask.shape)}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)

        c_skip, c_out, c_in, c_noise = edm.edm_coefficients(sigma, self.sigma_data, self.prediction)
        c_skip, c_out, c_in = (c.view(B, 1, 1, 1, 1) for c in (c_skip, c_out, c_in))
        m = mask.view(B, V, 1, 1, 1)
        x, cond = x.float(), cond.float()

        latent_in = torch.where(m, cond, c_in * x)                                   # (B,V,8,h,w)
        net_in = torch.cat([latent_in, rays.to(x), mask_channel(mask, h, w).to(x)], dim=2)   # (B,V,153,h,w)
        if context is None:
            context = self.identity_context(id_emb, B)
        if drop_id is not None:
            empty = self.identity_context(None, B)
            context = torch.where(drop_id.to(x.device).bool().view(B, 1, 1), empty, context)
        F = self.unet(net_in, c_noise, context).float()                              # (B,V,8,h,w)
        D = c_skip * x + c_out * F
        return torch.where(m, cond, D)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Same as ``denoise`` (so a distributed wrapper that calls ``forward`` sees every parameter)."""
        return self.denoise(*args, **kwargs)

    # ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike, state_dict: dict | None = None, info: dict | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` to ``folder`` (``state_dict`` defaults to this model's)."""
        cfg = dict(self.config, **(info or {}))
        return save_checkpoint(folder, state_dict if state_dict is not None else self.state_dict(), cfg)

    @classmethod
    def load(cls, folder: str | os.PathLike, profile: Profile | str, device: str | torch.device = "cpu"
             ) -> "SpinModel":
        """Load a ``SpinModel`` saved by ``save`` for ``profile``; another configuration -> ``CheckpointError``."""
        p = get_profile(profile)
        state, found = load_checkpoint(folder, device="cpu")
        for k in ("ray_origin_min_freq_log2", "ray_dir_min_freq_log2"):   # checkpoints from before these settings
            found.setdefault(k, 0)
        check_config(found, {k: v for k, v in model_config(p).items() if k not in ("sigma_data", "prediction")},
                     where=folder)
        model = cls.from_config(p, found)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{folder} does not fit the {p.name} model: missing {sorted(missing)[:5]}, unexpected "
                f"{sorted(unexpected)[:5]}. Delete that folder and train again (notebook 05).")
        model.config.update({k: v for k, v in found.items() if k not in model.config})
        return model.to(device).eval()
