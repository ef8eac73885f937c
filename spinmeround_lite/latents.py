"""The latent space: an autoencoder for images and normal maps, its latent scale, and a latent cache.

Section 3 of METHOD.md, notebook ``03_latent_space``.

The diffusion model works on latents, not pixels. A diffusers ``AutoencoderKL`` maps an image
``x (N, 3, H, W)`` in [0, 1] (given to it as ``2x - 1``) to a Gaussian posterior over latents ``(N, 4, h, w)``,
``h = H / f`` with ``f = 2 ** (len(block_out_channels) - 1)``. Normal maps go through the same autoencoder as
RGB images (``normal_rgb = (n + 1) / 2``, white where there is no head), as the paper does.

*Latent scale.* EDM's preconditioning assumes data of standard deviation ``sigma_data = 1``, so latents are
multiplied by ``scale = 1 / std(z)``, measured on the training renders (Stable Diffusion's VAE carries its own:
0.18215). ``LatentCodec.encode`` returns scaled latents, ``decode`` takes them.

The course trains a small autoencoder on the procedural renders (``ensure_vae``); where ``profile.vae_pretrained``
names a local folder (the SD1.5 VAE at ``paper``) it loads that instead. ``ensure_latent_cache`` encodes every
view of every identity once (``latents/<identity>.safetensors``) so training never runs the encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import zlib
from pathlib import Path
from typing import Iterable

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError
from .profiles import Profile, get_profile
from .runs import Run, atomic_folder, atomic_path, find_repo_root, read_json, write_json

CACHE_FORMAT = "spinmeround-lite/latents-v2"   # v2: background colours shared by all views of an identity
BG_SETS = 2               # background colours per identity in the cache (each with every view composited on it)
KL_WEIGHT = 1e-5          # weight of the KL term per latent element against the L1 + L2 per pixel
DECODER_GRAD_WEIGHT = 1.0  # image-gradient term when the decoder is trained on (finetune_decoder)
DECODER_FACE_WEIGHT = 10.0  # extra weight of the face's pixels then (ImagePool.batch_with_face_weights)
FACE_YAW, FACE_PITCH = 35.0, 20.0  # views this near frontal show the face (ImagePool.frontal)
POOL_VIEWS = 8000         # at most this many training views are held in memory for autoencoder training


# ----------------------------------------------------------------------------------------------
# local folders
# ----------------------------------------------------------------------------------------------
def resolve_local_folder(path: str | os.PathLike, what: str = "model", hint: str = "") -> Path:
    """An existing local folder: ``path`` as given, else relative to the course checkout. Clear error if absent."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p] + [
        r / p for r in {find_repo_root(Path(__file__).parent), find_repo_root()} if r is not None]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no {what} folder at {path} (looked in {tried}). This course never downloads weights: "
                            f"put a diffusers folder (config.json + *.safetensors) there{', ' + hint if hint else ''}.")


# ----------------------------------------------------------------------------------------------
# the autoencoder
# ----------------------------------------------------------------------------------------------
def norm_groups(channels: Iterable[int], most: int = 32, per_group: int = 4) -> int:
    """GroupNorm's group count for these block widths: the largest power of two <= ``most`` that divides every
    width and leaves at least ``per_group`` channels per group at the narrowest one.

    SD1.5 (320 channels, 32 groups) has 10 channels per group; a small model with one channel per group would
    normalise away each channel's per-image mean, i.e. the image's colour: the course's autoencoder reconstructs
    colours much sooner with 4 channels per group than with 1 (the multi-view UNet keeps ``per_group=1``, diffusers'
    usual choice, so saved models rebuild unchanged).
    """
    channels = list(channels)
    g = most
    while g > 1 and (any(c % g for c in channels) or min(channels) // g < per_group):
        g //= 2
    return g


def vae_config(profile: Profile | str) -> dict:
    """The ``AutoencoderKL`` configuration of a profile (``vae_channels``, ``vae_latent_channels``)."""
    p = get_profile(profile)
    ch = tuple(p.vae_channels)
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=ch,
        layers_per_block=1,
        latent_channels=p.vae_latent_channels,
        norm_num_groups=norm_groups(ch),      # >= 4 channels per group
        sample_size=p.resolution,
        scaling_factor=1.0,            # measured on the data after training (``measure_scale``)
    )


def build_vae(profile: Profile | str):
    """A fresh small ``AutoencoderKL`` for a profile."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(**vae_config(profile))


def save_vae(vae, folder: str | os.PathLike) -> None:
    """``save_pretrained`` on the CPU (safetensors), without the ``_name_or_path`` a loaded model carries (the
    folder it came from on this machine has no place in a committed checkpoint)."""
    folder = Path(folder)
    vae.to("cpu").save_pretrained(str(folder), safe_serialization=True)
    cfg = read_json(folder / "config.json")
    if cfg.pop("_name_or_path", None) is not None:
        write_json(folder / "config.json", cfg)


def load_vae(path: str | os.PathLike, subfolder: str | None = None):
    """An ``AutoencoderKL`` from a local diffusers folder (the SD1.5 VAE, or one ``ensure_vae`` saved); no hub.

    ``path`` may be the VAE folder itself or a pipeline folder with it in ``vae/``.
    """
    from diffusers import AutoencoderKL
    root = resolve_local_folder(path, what="autoencoder (AutoencoderKL)",
                                hint="or set vae_pretrained='' in the profile to train a small one")
    if subfolder is None:
        subfolder = next((s for s in ("", "vae") if (root / s / "config.json").exists()), None)
        if subfolder is None:
            raise FileNotFoundError(f"{root} holds no config.json (nor vae/config.json): "
                                    "it is not a diffusers AutoencoderKL folder")
    try:
        return AutoencoderKL.from_pretrained(str(root), subfolder=subfolder or None, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load an AutoencoderKL from {root / subfolder}: {e}") from None


class LatentCodec:
    """Images <-> scaled latents with an ``AutoencoderKL``.

    ``encode(img (..., 3, H, W) in [0, 1]) -> (..., C, h, w)``: the posterior mean times ``scale`` (deterministic,
    so a cache and a fresh encode agree). ``decode(z (..., C, h, w)) -> (..., 3, H, W)`` in [0, 1].
    The codec is for inference: it puts ``vae`` in eval mode with gradients off.
    """

    def __init__(self, vae, scale: float | None = None, resolution: int | None = None, batch: int = 64):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor if scale is None else scale)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or vae.config.sample_size)
        self.channels = vae.config.latent_channels
        self.batch = batch

    def __repr__(self) -> str:
        return (f"LatentCodec({self.resolution}px -> {self.channels}x{self.latent_res}x{self.latent_res}, "
                f"scale={self.scale:.4g}, device={self.device})")

    @property
    def latent_res(self) -> int:
        return self.resolution // self.factor

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device) -> "LatentCodec":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-3] != 3:
            raise ValueError(f"encode takes images (..., 3, H, W), got shape {tuple(img.shape)}")
        lead, x = img.shape[:-3], img.reshape(-1, *img.shape[-3:])
        out = [self.vae.encode(c.to(self.device, torch.float32) * 2 - 1).latent_dist.mean * self.scale
               for c in x.split(self.batch)]
        z = torch.cat(out) if out else x.new_zeros(0, self.channels, *(s // self.factor for s in x.shape[-2:]))
        return z.reshape(*lead, *z.shape[1:])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-3] != self.channels:
            raise ValueError(f"decode takes latents (..., {self.channels}, h, w), got shape {tuple(z.shape)}")
        lead, x = z.shape[:-3], z.reshape(-1, *z.shape[-3:])
        out = [(self.vae.decode(c.to(self.device, torch.float32) / self.scale).sample + 1) / 2
               for c in x.split(self.batch)]
        img = torch.cat(out).clamp(0, 1)
        return img.reshape(*lead, *img.shape[1:])


# ----------------------------------------------------------------------------------------------
# training data: every view's RGB and normal image
# ----------------------------------------------------------------------------------------------
class ImagePool:
    """All views of some identities as uint8 tensors: ``rgb``, ``normal_rgb`` (N, 3, H, W), ``alpha`` (N, 1, H, W).

    ``batch(n, generator)`` draws ``n`` images in [0, 1]: half RGB, half normal maps; each RGB image is put on a
    random colour instead of white with probability ``p_bg`` (the training recipe swaps backgrounds, so the
    autoencoder must handle coloured backgrounds too).
    """

    def __init__(self, ds, max_identities: int | None = None, progress: bool = True):
        from .faces import face_region

        rgb, nrm, alpha, frontal, face = [], [], [], [], []
        n = len(ds) if max_identities is None else min(max_identities, len(ds))
        for i in tqdm(range(n), desc="loading renders", disable=not progress, leave=False):
            d = ds.views(i, list(range(ds.views_per_identity)))
            rgb.append(_to_u8(d["rgb"]))
            nrm.append(_to_u8(d["normal_rgb"]))
            alpha.append(_to_u8(d["alpha"]))
            yaw = (d["yaw"].float() + 180) % 360 - 180
            frontal.append((yaw.abs() < FACE_YAW) & (d["pitch"].float().abs() < FACE_PITCH))
            R = d["rgb"].shape[-1]                    # the face of every view, wherever the camera put it
            face.append(face_region(d["c2w"].float(), d["K"].float(), R, R))
        self.rgb, self.normal_rgb, self.alpha = torch.cat(rgb), torch.cat(nrm), torch.cat(alpha)
        self.frontal = torch.cat(frontal)             # views that show the face (``face_box`` holds it)
        self.face = torch.cat(face)                   # (N, H, W) bool: the projected face box of each view
        self.resolution = self.rgb.shape[-1]

    def __len__(self) -> int:
        return len(self.rgb)

    def _draw(self, n: int, generator: torch.Generator | None, p_bg: float):
        idx = torch.randint(len(self), (n,), generator=generator)
        is_normal = torch.arange(n) % 2 == 1
        img = torch.where(is_normal[:, None, None, None], self.normal_rgb[idx], self.rgb[idx]).float() / 255
        swap = (torch.rand(n, generator=generator) < p_bg) & ~is_normal
        colour = torch.rand(n, 3, generator=generator)
        a = self.alpha[idx].float() / 255
        on_colour = composite(img, a, colour)
        return torch.where(swap[:, None, None, None], on_colour, img), idx, is_normal

    def batch(self, n: int, generator: torch.Generator | None = None, p_bg: float = 0.5) -> torch.Tensor:
        return self._draw(n, generator, p_bg)[0]

    def batch_with_face_weights(self, n: int, generator: torch.Generator | None = None, face_weight: float = 0.0,
                                p_bg: float = 0.5, face_region: str = "frontal") -> tuple[torch.Tensor, torch.Tensor]:
        """``batch`` plus per-pixel loss weights ``(n, 1, H, W)``: 1, and ``1 + face_weight`` on the face of the
        RGB views. The face is a few hundred of the 4096 pixels of a 64-pixel render, in one view of six:
        unweighted, an autoencoder spends its capacity on hair and skin.

        ``face_region="frontal"``: ``faces.face_box`` of the views within ``FACE_YAW`` / ``FACE_PITCH`` degrees of
        frontal (the first reference autoencoder's recipe); ``"projected"``: the face box of every view that sees
        the face, projected with its own camera (``faces.face_region``), so a face seen at 45 degrees counts too.
        """
        from .faces import face_box

        img, idx, is_normal = self._draw(n, generator, p_bg)
        w = torch.ones(n, 1, *img.shape[-2:])
        if face_region == "projected":
            w[:, 0] += face_weight * (self.face[idx] & ~is_normal[:, None, None]).float()
        elif face_region == "frontal":
            t, b, l, r = face_box(img.shape[-1])
            w[self.frontal[idx] & ~is_normal, :, t:b, l:r] += face_weight
        else:
            raise ValueError(f"face_region must be 'frontal' or 'projected', got {face_region!r}")
        return img, w


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def composite(rgb_white: torch.Tensor, alpha: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Put an image rendered on white onto a colour: ``rgb + (1 - alpha) (c - 1)``.

    ``rgb_white (N, 3, H, W)``, ``alpha (N, 1, H, W)``, ``colour (N, 3)`` -> ``(N, 3, H, W)``.
    """
    return rgb_white + (1 - alpha) * (colour[:, :, None, None] - 1)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def vae_loss(vae, x: torch.Tensor, kl_weight: float = KL_WEIGHT) -> tuple[torch.Tensor, dict]:
    """``L1 + L2`` reconstruction of ``x (N, 3, H, W)`` in [0, 1] plus ``kl_weight`` times the KL to N(0, I).

    Both terms are means (per pixel value, per latent element). The latent is sampled from the posterior
    (reparameterisation), as in Stable Diffusion's autoencoder training.
    """
    target = x * 2 - 1
    post = vae.encode(target).latent_dist
    z = post.sample()
    rec = vae.decode(z).sample
    l1 = (rec - target).abs().mean()
    l2 = ((rec - target) ** 2).mean()
    kl = post.kl().mean() / z[0].numel()
    loss = l1 + l2 + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(vae, pool: ImagePool, steps: int, batch: int, lr: float = 2e-3, kl_weight: float = KL_WEIGHT,
              seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Adam on ``vae_loss`` for ``steps`` batches from ``pool``: a linear warm-up over the first 100 steps (or a
    tenth of a shorter run), then a cosine decay to 5 % of ``lr``.

    Returns one dict of loss terms per step.
    """
    vae.to(device).train().requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    history = _adam_cosine(list(vae.parameters()), steps, lr, max(1, min(100, steps // 10)),
                           lambda: vae_loss(vae, pool.batch(batch, g).to(device), kl_weight),
                           "training the autoencoder", progress)
    vae.eval().requires_grad_(False)
    return history


def _adam_cosine(params: list, steps: int, lr: float, warm: int, loss_fn, desc: str, progress: bool) -> list[dict]:
    """Adam on ``loss_fn() -> (loss, parts)`` for ``steps`` steps: a linear warm-up over ``warm`` steps, then a
    cosine decay to 5 % of ``lr``. Returns the ``parts`` of every step."""
    opt = torch.optim.Adam(params, lr=lr)
    cosine = lambda s: min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    history = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        loss, parts = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(parts)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
    return history


def image_gradients(x: torch.Tensor) -> torch.Tensor:
    """Differences of neighbouring pixels, down and across, of ``x (N, C, H, W)``, flattened to ``(N, M)``."""
    return torch.cat([(x[..., 1:, :] - x[..., :-1, :]).flatten(1), (x[..., :, 1:] - x[..., :, :-1]).flatten(1)], 1)


def decoder_loss(vae, x: torch.Tensor, grad_weight: float = DECODER_GRAD_WEIGHT,
                 weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The decoder's loss with the encoder frozen: decode the posterior *mean* of ``x (N, 3, H, W)`` in [0, 1]
    (what ``LatentCodec`` and the diffusion model's latents are) and compare with ``x``: ``L1 + L2`` per pixel,
    each pixel counted ``weight (N, 1, H, W)`` times (default 1), plus ``grad_weight`` times the L1 distance of
    the image gradients (``image_gradients``).

    The gradient term is what sharpens: a decoder trained on L2 alone that is unsure where an eye's edge lies
    draws the average of the places, a blur; matching gradients makes a blurred edge cost as much as a misplaced
    one.
    """
    target = x * 2 - 1
    with torch.no_grad():
        z = vae.encode(target).latent_dist.mean
    rec = vae.decode(z).sample
    w = torch.ones_like(target[:, :1]) if weight is None else weight.to(target)
    l1 = (w * (rec - target).abs()).mean()
    l2 = (w * (rec - target) ** 2).mean()
    lg = (image_gradients(rec) - image_gradients(target)).abs().mean()
    loss = l1 + l2 + grad_weight * lg
    return loss, {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "grad": lg.item()}


def finetune_decoder(vae, pool: ImagePool, steps: int, batch: int, lr: float = 1e-3,
                     grad_weight: float = DECODER_GRAD_WEIGHT, face_weight: float = DECODER_FACE_WEIGHT,
                     seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                     face_region: str = "frontal") -> list[dict]:
    """Train the decoder (and ``post_quant_conv``) on with the encoder frozen: Adam on ``decoder_loss`` for
    ``steps`` batches from ``pool`` (the face's pixels weighted ``1 + face_weight``,
    ``ImagePool.batch_with_face_weights``), a 50-step warm-up, then a cosine decay to 5 % of ``lr``.

    The latents do not move (``vae_fingerprint`` stays the same), so latent caches and diffusion models made with
    the autoencoder keep working and only the pictures get sharper: Stable Diffusion's ft-EMA and ft-MSE
    decoders were made this way, "to keep compatibility with existing models". Returns one dict per step.
    """
    vae.to(device).train().requires_grad_(False)
    params = list(vae.decoder.parameters()) + (list(vae.post_quant_conv.parameters())
                                               if getattr(vae, "post_quant_conv", None) is not None else [])
    for t in params:
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)

    def loss_fn():
        x, w = pool.batch_with_face_weights(batch, g, face_weight, face_region=face_region)
        return decoder_loss(vae, x.to(device), grad_weight, w.to(device))

    history = _adam_cosine(params, steps, lr, max(1, min(50, steps // 4)), loss_fn, "training the decoder on",
                           progress)
    vae.eval().requires_grad_(False)
    return history


@torch.no_grad()
def measure_scale(vae, images: torch.Tensor, batch: int = 64) -> tuple[float, dict]:
    """``scale = 1 / std`` of the posterior means of ``images (N, 3, H, W)`` in [0, 1]; also their mean and std."""
    dev = next(vae.parameters()).device
    z = torch.cat([vae.encode(c.to(dev) * 2 - 1).latent_dist.mean for c in images.split(batch)])
    std = z.float().std().item()
    return 1.0 / std, {"mean": z.float().mean().item(), "std": std,
                       "channel_std": z.float().transpose(0, 1).flatten(1).std(1).tolist()}


@torch.no_grad()
def evaluate_codec(codec: LatentCodec, ds, max_identities: int = 8, views: int | None = None) -> dict:
    """Reconstruction quality on ``ds`` (use the held-out split): PSNR of RGB, angle error of normals in degrees,
    and the PSNR of the *face* alone.

    The normal angle is measured on head pixels (alpha > 0.5) between the decoded normal image
    (``metrics.normal_rgb_to_vec``) and the true unit normals. ``face_psnr_rgb``: RGB PSNR inside the box around
    the eyes, nose and mouth (``faces.face_box``) of the views within 30 degrees of frontal; the whole image's PSNR
    is mostly white background and hair, and says little about whether eyes survive the round trip
    (``nan`` when no view is that frontal).
    """
    from .faces import face_box
    from .metrics import normal_angle_error_deg, normal_rgb_to_vec, psnr
    psnrs, angles, faces = [], [], []
    t, b, l, r = face_box(ds.resolution)
    for i in range(min(max_identities, len(ds))):
        idx = list(range(ds.views_per_identity if views is None else min(views, ds.views_per_identity)))
        d = ds.views(i, idx)
        rec_rgb = codec.decode(codec.encode(d["rgb"])).cpu()
        rec_nrm = codec.decode(codec.encode(d["normal_rgb"])).cpu()
        psnrs.append(psnr(rec_rgb, d["rgb"]))
        angles.append(normal_angle_error_deg(normal_rgb_to_vec(rec_nrm), d["normal"], (d["alpha"] > 0.5).float()))
        yaw = (d["yaw"].float() + 180) % 360 - 180                      # the views' own angles, wrapped
        front = (yaw.abs() < 30) & (d["pitch"].float().abs() < 20)
        if front.any():
            faces.append(psnr(rec_rgb[front][..., t:b, l:r], d["rgb"][front][..., t:b, l:r]))
    face = torch.cat(faces).mean().item() if faces else float("nan")
    return {"psnr_rgb": torch.cat(psnrs).mean().item(), "normal_angle_err_deg": torch.cat(angles).mean().item(),
            "face_psnr_rgb": face}


# ----------------------------------------------------------------------------------------------
# the run's autoencoder
# ----------------------------------------------------------------------------------------------
def _check_vae(vae, profile: Profile, where) -> None:
    """The autoencoder must give the latents this run expects: ``latent_channels`` channels, ``latent_factor``
    times smaller. Its widths may differ (a reference autoencoder trained with other widths works)."""
    want_c, want_f = profile.vae_latent_channels, profile.latent_factor
    found_c, found_f = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    if (found_c, found_f) != (want_c, want_f):
        raise CheckpointError(f"{where} holds an autoencoder with {found_c}-channel latents {found_f}x smaller than "
                              f"the image; profile {profile.name!r} needs {want_c} channels, {want_f}x. Delete that "
                              "folder (or rerun the course with --fresh) to train a matching one.")


def build_trained_vae(run: Run, folder: Path, progress: bool = True) -> dict:
    """Train the profile's autoencoder on the training renders, measure its scale, save it to ``folder``."""
    from .dataset import HeadDataset, ensure_dataset
    p = run.profile
    root = ensure_dataset(run)
    train = HeadDataset(root, "train", cache=False)
    pool = ImagePool(train, max_identities=max(1, POOL_VIEWS // train.views_per_identity), progress=progress)
    vae = build_vae(p)
    t0 = time.perf_counter()
    history = train_vae(vae, pool, p.vae_steps, p.vae_batch, lr=p.vae_lr, seed=run.seed, device=run.device,
                        progress=progress)
    seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(run.seed + 1)
    sample = pool.batch(min(256, 2 * len(pool)), g, p_bg=0.5)
    scale, stats = measure_scale(vae, sample)
    vae.register_to_config(scaling_factor=scale)
    info = {"source": "trained", "steps": p.vae_steps, "batch": p.vae_batch, "lr": p.vae_lr, "seconds": seconds,
            "final_loss": history[-1]["loss"] if history else None, "latent_stats": stats, "scale": scale,
            "history": [h["loss"] for h in history]}
    if p.vae_decoder_steps:                          # the latents (and the scale) stay as measured above
        heldout = HeadDataset(root, "heldout", cache=False)
        info["decoder_finetunes"] = [_train_decoder_on(vae, pool, heldout, p, p.vae_decoder_steps, p.vae_decoder_lr,
                                                       DECODER_FACE_WEIGHT, run, progress)]
    save_vae(vae, folder)
    write_json(folder / "train.json", info)
    return info


def _train_decoder_on(vae, pool: ImagePool, heldout, p: Profile, steps: int, lr: float, face_weight: float,
                      run: Run, progress: bool, face_region: str = "frontal") -> dict:
    """``finetune_decoder`` with the held-out reconstructions measured before and after; -> its record."""
    fp = vae_fingerprint(LatentCodec(vae))
    before = evaluate_codec(LatentCodec(vae, resolution=p.resolution), heldout)
    t0 = time.perf_counter()
    history = finetune_decoder(vae, pool, steps, p.vae_batch, lr=lr, face_weight=face_weight, seed=run.seed + 2,
                               device=run.device, progress=progress, face_region=face_region)
    codec = LatentCodec(vae, resolution=p.resolution)
    if vae_fingerprint(codec) != fp:
        raise RuntimeError("the latents moved while only the decoder was trained: a bug in finetune_decoder")
    return {"steps": steps, "batch": p.vae_batch, "lr": lr, "grad_weight": DECODER_GRAD_WEIGHT,
            "face_weight": face_weight, "face_region": face_region, "seconds": time.perf_counter() - t0,
            "heldout_before": before,
            "heldout_after": evaluate_codec(codec, heldout), "history": [h["loss"] for h in history][::10]}


def finetune_run_decoder(run: Run, steps: int, lr: float | None = None, face_weight: float = DECODER_FACE_WEIGHT,
                         progress: bool = True, face_region: str = "frontal") -> dict:
    """Train the decoder of the run's autoencoder (``models/vae``) on for ``steps`` batches, the encoder frozen
    (``finetune_decoder``), measure the held-out reconstructions before and after (``evaluate_codec``), and put
    it back in place of the old one (written beside it, then renamed). The latents do not move, so the run's
    latent cache and every model trained on it stay valid. The step is recorded in ``train.json`` under
    ``"decoder_finetunes"``; -> that record.
    """
    from .dataset import HeadDataset, ensure_dataset
    p = run.profile
    folder = run.model_dir("vae")
    if not Run.is_complete(folder):
        raise FileNotFoundError(f"{folder} holds no finished autoencoder: build it first (ensure_vae, notebook 03)")
    root = ensure_dataset(run)
    train, heldout = HeadDataset(root, "train", cache=False), HeadDataset(root, "heldout", cache=False)
    vae = load_vae(folder)
    _check_vae(vae, p, folder)
    pool = ImagePool(train, max_identities=max(1, POOL_VIEWS // train.views_per_identity), progress=progress)
    lr = p.vae_decoder_lr if lr is None else lr
    record = _train_decoder_on(vae, pool, heldout, p, steps, lr, face_weight, run, progress, face_region)
    info = read_json(folder / "train.json") if (folder / "train.json").exists() else {}
    info.setdefault("decoder_finetunes", []).append(record)
    with atomic_folder(folder) as tmp:
        save_vae(vae, tmp)
        write_json(tmp / "train.json", info)
        Run.mark_complete(tmp)
    return record


def ensure_vae(run: Run, progress: bool = True) -> LatentCodec:
    """The run's ``LatentCodec``.

    ``profile.vae_pretrained`` set: that local folder (SD1.5's VAE), its own scaling factor. Otherwise
    ``run.model_dir("vae")``: built once (the course's reference autoencoder where the profile uses reference
    checkpoints and one is present, else trained by ``build_trained_vae``), then loaded.
    """
    p = run.profile
    if p.vae_pretrained:
        vae = load_vae(p.vae_pretrained)
        return LatentCodec(vae.to(run.device), resolution=p.resolution)
    folder = run.model_dir("vae")
    ref = run.reference_dir("vae")

    def build(f: Path):
        if ref is not None:
            Run.copy_files(ref, f)
            info = read_json(f / "train.json") if (f / "train.json").exists() else {}
            write_json(f / "train.json", {**info, "source": "reference"})
        else:
            build_trained_vae(run, f, progress=progress)

    run.ensure(folder, build)
    vae = load_vae(folder)
    _check_vae(vae, p, folder)
    return LatentCodec(vae.to(run.device), resolution=p.resolution)


def vae_fingerprint(codec: LatentCodec) -> str:
    """A short hash of the *latent space*: the autoencoder's configuration, scale, encoder and ``quant_conv``
    weights. A cache or a model made with another one is stale.

    The decoder is left out on purpose: a decoder trained on with the encoder frozen (``finetune_decoder``, as
    Stable Diffusion's ft-EMA / ft-MSE decoders were) turns the same latents into sharper images, and every cache
    and model made with the old decoder stays valid.
    """
    h = hashlib.sha1(json.dumps({k: v for k, v in dict(codec.vae.config).items() if not k.startswith("_")},
                                sort_keys=True, default=str).encode())
    h.update(f"{codec.scale:.8g}".encode())
    for name, t in codec.vae.state_dict().items():
        if name.split(".")[0] in ("encoder", "quant_conv"):
            h.update(name.encode())
            h.update(f"{t.double().sum().item():.10g}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# latent cache
# ----------------------------------------------------------------------------------------------
def _file_name(identity: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(identity))
    return f"{safe}.safetensors"


def background_colours(identity: str, sets: int = BG_SETS, seed: int = 0) -> torch.Tensor:
    """The random background colours of an identity, ``(sets, 3)`` in [0, 1]; same seed, same colours.

    Each colour is shared by *all* views of the identity: a training sample shows one background, as a photo
    session would. (The course's first cache drew one colour per view, so a target's background never matched its
    input view's: the model learnt that an input view's colours say nothing about a target's, and ignored its
    input; notebook 07, "is the model using its cameras and its input?")
    """
    g = torch.Generator().manual_seed((zlib.crc32(str(identity).encode()) + 1_000_003 * seed) % 2**63)
    return torch.rand(sets, 3, generator=g)


def encode_identity(codec: LatentCodec, views: dict, colours: torch.Tensor) -> dict:
    """Latents of one identity's views: ``views`` from ``HeadDataset.views`` (rgb, alpha, normal_rgb (V, ., H, W)).

    ``colours (K, 3)``: background colours, each shared by every view. Returns ``rgb``, ``normal`` ``(V, C, h, w)``,
    ``rgb_bg`` ``(K * V, C, h, w)`` (set ``k``: rows ``k V .. (k + 1) V``, every view on colour ``k``) and
    ``bg`` ``(K, 3)``.
    """
    rgb, alpha = views["rgb"], views["alpha"]
    V = rgb.shape[0]
    on_colour = [composite(rgb, alpha, c.expand(V, 3)) for c in colours]
    z = codec.encode(torch.cat([rgb, views["normal_rgb"], *on_colour])).cpu()
    return {"rgb": z[:V], "normal": z[V:2 * V], "rgb_bg": z[2 * V:], "bg": colours.clone()}


def build_latent_cache(run: Run, folder: Path, codec: LatentCodec, dtype: torch.dtype = torch.float16,
                       progress: bool = True) -> dict:
    """Encode every view of every identity (train and held-out) into ``folder/<identity>.safetensors``."""
    from safetensors.torch import save_file

    from .dataset import HeadDataset, ensure_dataset
    root = ensure_dataset(run)
    index = {"format": CACHE_FORMAT, "scale": codec.scale, "latent_res": codec.latent_res,
             "latent_channels": codec.channels, "dtype": str(dtype).replace("torch.", ""),
             "vae_fingerprint": vae_fingerprint(codec), "seed": run.seed, "identities": {}, "files": {}}
    n_images, seconds = 0, 0.0
    for split in ("train", "heldout"):
        ds = HeadDataset(root, split, cache=False)
        for i in tqdm(range(len(ds)), desc=f"encoding {split} latents", disable=not progress, leave=False):
            ident = ds.ids[i]
            V = ds.views_per_identity
            views = ds.views(i, list(range(V)))
            t0 = time.perf_counter()
            lat = encode_identity(codec, views, background_colours(ident, BG_SETS, run.seed))
            seconds += time.perf_counter() - t0
            n_images += (2 + BG_SETS) * V
            name = _file_name(ident)
            with atomic_path(folder / name) as tmp:
                save_file({k: v.to(dtype if k != "bg" else torch.float32).contiguous() for k, v in lat.items()},
                          str(tmp), metadata={"identity": str(ident), "split": split})
            index["identities"][str(ident)] = split
            index["files"][str(ident)] = name
    index["images"] = n_images
    index["encode_seconds"] = seconds
    index["encode_images_per_s"] = n_images / max(seconds, 1e-9)
    index["size_bytes"] = sum((folder / f).stat().st_size for f in index["files"].values())
    write_json(folder / "index.json", index)
    return index


class LatentCache:
    """The latent cache of a run: ``get(identity, idx, bg_set) -> dict(rgb, rgb_bg, normal (P, C, h, w), bg (P, 3))``.

    ``rgb_bg`` is every asked view on background colour ``bg_set`` (one of ``BG_SETS`` per identity, shared by all
    its views); ``bg`` that colour per view.

    ``identity`` is a name from ``ids`` (or an index into it); ``idx`` the view indices (all views if ``None``).
    Files are read once and kept in memory (in their stored dtype); ``get`` returns float32.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not (self.folder / "index.json").exists():
            raise FileNotFoundError(f"{self.folder} holds no latent cache (index.json): build it with "
                                    "latents.ensure_latent_cache(run)")
        self.index = read_json(self.folder / "index.json")
        if self.index.get("format") != CACHE_FORMAT:
            raise CheckpointError(f"{self.folder} is a latent cache of format {self.index.get('format')!r}, "
                                  f"this code reads {CACHE_FORMAT!r}: delete the folder to rebuild it")
        self.ids = list(self.index["identities"])
        self.scale = self.index["scale"]
        self.latent_res = self.index["latent_res"]
        self._mem: dict[str, dict] = {}

    def __repr__(self) -> str:
        return (f"LatentCache({len(self.ids)} identities, {self.latent_res}x{self.latent_res} latents, "
                f"{self.size_bytes / 2**20:.1f} MiB, '{self.folder}')")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size_bytes(self) -> int:
        return int(self.index.get("size_bytes", 0))

    def split(self, name: str) -> list[str]:
        return [i for i, s in self.index["identities"].items() if s == name]

    def _load(self, identity: str) -> dict:
        if identity not in self._mem:
            from safetensors.torch import load_file
            f = self.index["files"].get(identity)
            if f is None:
                raise KeyError(f"identity {identity!r} is not in the latent cache at {self.folder}")
            try:
                self._mem[identity] = load_file(str(self.folder / f))
            except Exception as e:
                raise CheckpointError(f"{self.folder / f} is unreadable ({e}): delete {self.folder} to rebuild the "
                                      "cache") from None
        return self._mem[identity]

    def get(self, identity: str | int, idx=None, bg_set: int = 0) -> dict:
        if isinstance(identity, int):
            identity = self.ids[identity]
        d = self._load(str(identity))
        V = d["rgb"].shape[0]
        idx = torch.arange(V) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        k = int(bg_set) % d["bg"].shape[0]
        return {"rgb": d["rgb"][idx].float(), "normal": d["normal"][idx].float(),
                "rgb_bg": d["rgb_bg"][k * V + idx].float(), "bg": d["bg"][k].float().expand(len(idx), 3).clone()}


def ensure_latent_cache(run: Run, codec: LatentCodec | None = None, progress: bool = True) -> LatentCache:
    """The run's latent cache (``run.root / "latents"``), built once; rebuilt when the autoencoder changed."""
    codec = codec or ensure_vae(run, progress=progress)
    folder = run.root / "latents"
    fresh = False
    if Run.is_complete(folder):
        try:
            index = read_json(folder / "index.json")
            fresh = (index.get("vae_fingerprint") != vae_fingerprint(codec)          # another autoencoder, or
                     or index.get("format") != CACHE_FORMAT)                          # an older cache layout
        except (FileNotFoundError, ValueError):
            fresh = True
    run.ensure(folder, lambda f: build_latent_cache(run, f, codec, progress=progress), fresh=fresh)
    return LatentCache(folder)


__all__ = ["resolve_local_folder", "norm_groups", "vae_config", "build_vae", "save_vae", "load_vae", "LatentCodec",
           "ImagePool",
           "composite", "vae_loss", "train_vae", "image_gradients", "decoder_loss", "finetune_decoder",
           "measure_scale", "evaluate_codec", "build_trained_vae", "finetune_run_decoder",
           "ensure_vae",
           "vae_fingerprint", "background_colours", "encode_identity", "build_latent_cache", "LatentCache",
           "ensure_latent_cache"]
