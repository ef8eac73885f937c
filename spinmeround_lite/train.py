"""Training the multi-view model with EDM, on one CPU, one GPU or many (Hugging Face ``accelerate``).

Notebook 05; METHOD.md section 4. One training sample is ``P = profile.views_per_sample`` views of one identity
(8 in the paper), drawn at random from its rig views:

* **stage 1** (the first ``stage1_fraction`` of the steps): 1 conditioning view;
  **stage 2**: 0, 1 or 3 conditioning views, each with p = 1/3 (at most ``P - 1``);
* conditioning views enter clean with mask 1, the others (targets) noisy with mask 0; the loss is on targets;
* background: with p = 0.5 all views of the sample use the latents of the renders composited on one random colour
  in pixel space, the same for every view (``rgb_bg``, cached by ``latents.py``) instead of the white-background ones
  (``rgb``);
* classifier-free guidance dropout, p = 0.15 per sample: identity -> the empty prompt *and* conditioning latents
  -> zeros, together, so the unconditional branch the samplers use (``sampling.cfg_denoiser``) is one the
  model has seen 15 % of the time;
* identity: the 512-d embedding of the identity's frontal view by the frozen ``cond`` encoder of notebook 01
  (computed once per training run for every identity);
* noise: ``ln sigma ~ N(P_mean + 0.5 ln N, P_std^2)`` with ``N = P - 1`` target views (7 for P = 8, the paper's
  log-SNR shift), drawn per sample.

The text encoder (``tokens.IdentityContext``) is **trained jointly** with the UNet, as Arc2Face fine-tunes CLIP's:
the course's encoder is a small CLIP text model that starts from random weights, so frozen it would hand the
UNet a fixed random code of the identity; trained, it learns which directions of the embedding matter.

Reproducibility. Every random choice of step ``t`` (identities, views, conditioning count, background, dropout,
sigma, noise) comes from one generator seeded by ``(seed, t, micro-batch, process)``: a run killed after a
checkpoint and resumed draws exactly the batches the uninterrupted run draws, so on CPU it reaches bitwise
the same weights (``tests/test_train.py``).

    python -m spinmeround_lite.train --profile test --out /tmp/spin --steps 12
    accelerate launch --multi_gpu --num_processes 2 -m spinmeround_lite.train --profile test --out /tmp/spin
    accelerate launch --multi_gpu --num_processes 2 -m spinmeround_lite.train --device cpu ...   # 2 CPU processes

Several processes on one machine go through ``accelerate launch --multi_gpu`` (torchrun underneath); with
``--device cpu`` (or no GPU) they train on the CPU with the gloo backend. ``accelerate launch --cpu`` alone starts
a single process (accelerate >= 1.x runs several CPU processes only through MPI, ``--mpirun_hostfile``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import edm
from .artifacts import find_model
from .checkpoints import CheckpointError, load_checkpoint, module_fingerprint, save_checkpoint
from .latents import BG_SETS
from .model import SpinModel, model_config
from .profiles import Profile
from .raymaps import profile_raymap
from .runs import Run, read_json, write_json

P_UNCOND = 0.15          # classifier-free guidance dropout (paper)
P_BACKGROUND = 0.5       # random background colour instead of white (paper)
STAGE2_CONDS = (0, 1, 3)  # conditioning views in stage 2, each with p = 1/3 (paper)
GRAD_CLIP = 1.0          # gradient norm clipping
KEEP_CHECKPOINTS = 2     # training checkpoints kept on disk (the newest ones)
GRID_IDENTITIES = 2      # held-out identities in the periodic sample grids
CHECKPOINT_FORMAT = "spinmeround-lite/train-checkpoint-v1"


# ----------------------------------------------------------------------------------------------
# settings read from the profile
# ----------------------------------------------------------------------------------------------
def mixed_precision(profile: Profile, device: torch.device | str) -> str:
    """``profile.mixed_precision`` resolved: ``"auto"`` is bf16 on CUDA devices that support it, else ``"no"``;
    ``"fp16"`` (fp16 autocast with a gradient scaler, for GPUs without bf16 such as the T4) is ``"no"`` off CUDA."""
    mp = profile.mixed_precision
    dev = torch.device(device)
    if mp == "fp16" and dev.type != "cuda":
        return "no"
    if mp != "auto":
        return mp
    return "bf16" if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def n_targets_for_shift(profile: Profile) -> int:
    """N of the log-SNR shift: the target views of a one-conditioning-view sample, ``P - 1`` (paper: 7)."""
    return max(profile.views_per_sample - 1, 1)


def stage_of(step: int, total_steps: int, profile: Profile) -> int:
    """1 for the first ``stage1_fraction`` of the steps, then 2."""
    return 1 if step < round(profile.stage1_fraction * total_steps) else 2


def warmup_steps(total_steps: int) -> int:
    """Linear learning-rate warm-up length: a tenth of the run, at most 1000 steps."""
    return max(1, min(1000, total_steps // 10))


def lr_at(step: int, total_steps: int, profile: Profile) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total_steps`` run.

    A linear warm-up (``warmup_steps``) to ``profile.lr``, constant, and over the last ``profile.lr_decay_steps``
    steps a cosine decay to 5 % of it: a constant rate keeps the weights moving around the minimum (the EMA averages
    that out only in part); letting it fall at the end is what sharpens the fine detail (measured in issue 12's
    overfit check).
    """
    rate = profile.lr * min(1.0, (step + 1) / warmup_steps(total_steps))
    decay = min(int(profile.lr_decay_steps), total_steps)
    start = total_steps - decay
    if decay > 0 and step >= start:
        t = (step - start + 1) / decay
        rate *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))
    return rate


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The one CPU generator of (seed, step, micro-batch, process): all randomness of that batch."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------------------------
# data: multi-view samples from the latent cache
# ----------------------------------------------------------------------------------------------
def frontal_view(yaw: torch.Tensor, pitch: torch.Tensor) -> int:
    """Index of the view closest to the frontal one (yaw 0, pitch 0)."""
    yaw = (torch.as_tensor(yaw, dtype=torch.float32) + 180) % 360 - 180
    return int(torch.argmin(yaw**2 + torch.as_tensor(pitch, dtype=torch.float32) ** 2))


def face_weights(c2w: torch.Tensor, K: torch.Tensor, resolution: int, latent_res: int, strength: float
                 ) -> torch.Tensor:
    """Loss weights (V, 1, h, w) that make the face of each view count ``1 + strength`` times: 1 everywhere, plus
    ``strength`` on ``faces.face_region`` of each view (its projected face box) at latent resolution.
    The face is a small part of each image and of a random rig (the eyes are 2-3 pixels at 64 px, the back half
    of the views has no face), so with the paper's uniform loss it earns a few per cent of the gradient.
    """
    from .faces import face_region

    w = torch.ones(c2w.shape[0], 1, latent_res, latent_res)
    if strength <= 0:
        return w
    return w + strength * face_region(c2w, K, resolution, latent_res)[:, None].float()


def spread_views(yaw: torch.Tensor, start: int, n: int) -> list[int]:
    """``n`` views: ``start`` and the ``n - 1`` views whose yaw is nearest ``yaw[start] + k 360 / n``."""
    yaw = torch.as_tensor(yaw, dtype=torch.float32)
    out = [start]
    for k in range(1, n):
        want = float(yaw[start]) + k * 360.0 / n
        d = ((yaw - want + 180) % 360 - 180).abs()
        d[out] = float("inf")
        out.append(int(torch.argmin(d)))
    return out


class TrainData:
    """Everything a training step reads: latents, cameras and identity embeddings of every identity.

    ``batch(step, micro, rank, stage, batch_size)`` -> dict with
    ``x0`` (B,P,8,h,w) clean latents [image 4 | normal 4]; ``mask`` (B,P) bool, True = conditioning view;
    ``rays`` (B,P,144,h,w); ``id_emb`` (B,512); ``drop`` (B,) bool (CFG dropout: empty prompt and zero
    conditioning latents); ``drop_id`` (B,) bool (empty prompt: ``drop``, or always without identity);
    ``bg`` (B,) bool (random background); ``sigma`` (B,); ``noise`` (B,P,8,h,w); ``channels`` (latent channels
    the loss counts: 8, or 4 for ``image_only``); ``identity`` list of names; ``views`` (B,P) indices.

    Recipe options, the paper's ablations (recorded in the model's config): ``cond_views`` a fixed number of
    conditioning views instead of the two stages (0 = "without input image"); ``use_identity=False`` always the
    empty prompt ("without identity embedding"); ``image_only=True`` normal latents zeroed and left out of the
    loss ("without normal generation"). The course's own option: ``face_weight > 0`` adds ``weight`` (B,P,1,h,w)
    to the batch, the face of each target counting ``1 + face_weight`` times in the loss (``face_weights``);
    0 is the paper's uniform loss.
    """

    def __init__(self, run: Run, progress: bool = True, cond_views: int | None = None, use_identity: bool = True,
                 image_only: bool = False, identities: list[str] | None = None, face_weight: float = 0.0):
        from .dataset import HeadDataset, ensure_dataset
        from .identity import ensure_encoder
        from .latents import ensure_latent_cache

        self.run, self.profile = run, run.profile
        self.cond_views, self.use_identity, self.image_only = cond_views, bool(use_identity), bool(image_only)
        self.face_weight = float(face_weight)
        if not (self.face_weight >= 0):
            raise ValueError(f"face_weight must be >= 0 (0 = the paper's uniform loss), got {face_weight}")
        self._face_w: dict[str, torch.Tensor] = {}       # identity -> (V, 1, h, w), computed once
        root = ensure_dataset(run)
        self.train = HeadDataset(root, split="train", cache=False)      # training reads the latent cache;
        self.train_ids = list(self.train.ids) if identities is None else [str(i) for i in identities]
        unknown = sorted(set(self.train_ids) - set(self.train.ids))
        if unknown:
            raise ValueError(f"identities {unknown[:5]} are not training identities of {root}")
        self.heldout = HeadDataset(root, split="heldout", cache=False)  # renders only once, for cameras
        self.cache = ensure_latent_cache(run, progress=progress)
        self.resolution = self.train.resolution
        self.latent_res = self.cache.latent_res
        self.P = min(self.profile.views_per_sample, self.train.views_per_identity)
        self.cameras = {}                                  # identity -> (c2w (V,4,4), K (V,3,3), yaw, pitch)
        encoder = ensure_encoder(run, "cond")
        self.id_emb = self._embed_identities(encoder, progress)
        # the latent space and identity space this model learns in: a model only works with these two
        self.fingerprints = {"vae_fingerprint": self.cache.index.get("vae_fingerprint", ""),
                             "id_cond_fingerprint": module_fingerprint(encoder)}

    def camera(self, ds, i: int):
        """(c2w (V,4,4), K (V,3,3), yaw (V,), pitch (V,)) of identity ``i`` of ``ds``, read once."""
        name = ds.ids[i]
        if name not in self.cameras:
            a = ds.arrays(i)
            c2w = torch.as_tensor(a["c2w"], dtype=torch.float32)
            K = torch.as_tensor(a["K"], dtype=torch.float32)
            K = K.expand(len(c2w), 3, 3) if K.ndim == 2 else K
            self.cameras[name] = (c2w, K.contiguous(), torch.as_tensor(a["yaw"], dtype=torch.float32),
                                  torch.as_tensor(a["pitch"], dtype=torch.float32))
        return self.cameras[name]

    @torch.no_grad()
    def _embed_identities(self, encoder, progress: bool) -> dict[str, torch.Tensor]:
        """Identity embedding (512,) of every identity: the frozen ``cond`` encoder on its frontal view."""
        names, images = [], []
        todo = [(ds, i) for ds in (self.train, self.heldout) for i in range(len(ds))]
        for ds, i in tqdm(todo, desc="frontal views", disable=not progress, leave=False):
            _, _, yaw, pitch = self.camera(ds, i)
            names.append(ds.ids[i])
            images.append(ds.views(i, [frontal_view(yaw, pitch)])["rgb"][0])
        emb = encoder.embed(torch.stack(images)).float().cpu()                 # (N, 512) unit vectors
        return dict(zip(names, emb))

    def rays(self, ds, i: int, idx) -> torch.Tensor:
        """Ray maps (P,144,h,w) of views ``idx`` of identity ``i``."""
        c2w, K, _, _ = self.camera(ds, i)
        idx = torch.as_tensor(idx, dtype=torch.long)
        return profile_raymap(self.profile, c2w[idx], K[idx])

    def face_weight_maps(self, ds, i: int, idx) -> torch.Tensor:
        """Loss weights (P,1,h,w) of views ``idx`` of identity ``i`` (``face_weights``, ``face_weight``)."""
        name = ds.ids[i]
        if name not in self._face_w:
            c2w, K, _, _ = self.camera(ds, i)
            self._face_w[name] = face_weights(c2w, K, self.resolution, self.latent_res, self.face_weight)
        return self._face_w[name][torch.as_tensor(idx, dtype=torch.long)]

    def latents(self, name: str, idx, background: bool = False, bg_set: int = 0) -> torch.Tensor:
        """Clean latents (P,8,h,w) = [image | normal] of views ``idx``; ``background``: every view on the identity's
        background colour ``bg_set`` (one colour for the whole sample)."""
        z = self.cache.get(name, list(idx), bg_set=bg_set)
        return torch.cat([z["rgb_bg"] if background else z["rgb"], z["normal"]], dim=1)

    def batch(self, step: int, micro: int = 0, rank: int = 0, stage: int = 2, batch_size: int | None = None,
              seed: int | None = None) -> dict:
        B = batch_size or self.profile.batch_size
        g = step_generator(self.run.seed if seed is None else seed, step, micro, rank)
        P, ds = self.P, self.train
        x0, mask, rays, emb, drop, bg, names, views, weight = [], [], [], [], [], [], [], [], []
        for _ in range(B):
            i = ds.ids.index(self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=g))])
            idx = torch.randperm(ds.views_per_identity, generator=g)[:P].tolist()
            if self.face_weight > 0:
                weight.append(self.face_weight_maps(ds, i, idx))
            if self.cond_views is not None:
                n_cond = int(self.cond_views)
            elif stage == 1:
                n_cond = 1
            else:
                n_cond = STAGE2_CONDS[int(torch.randint(len(STAGE2_CONDS), (1,), generator=g))]
            n_cond = min(n_cond, P - 1)
            use_bg = bool(torch.rand((), generator=g) < P_BACKGROUND)
            bg_set = int(torch.randint(BG_SETS, (1,), generator=g))
            dropped = bool(torch.rand((), generator=g) < P_UNCOND)
            name = ds.ids[i]
            x0.append(self.latents(name, idx, use_bg, bg_set))
            mask.append(torch.arange(P) < n_cond)            # the first n_cond of the random views condition
            rays.append(self.rays(ds, i, idx))
            emb.append(self.id_emb[name])
            drop.append(dropped)
            bg.append(use_bg)
            names.append(name)
            views.append(idx)
        x0 = torch.stack(x0)
        sigma = edm.sample_training_sigma(B, n_targets=n_targets_for_shift(self.profile), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if self.image_only:
            x0[:, :, 4:] = 0.0
        drop = torch.tensor(drop)
        out = dict(x0=x0, mask=torch.stack(mask), rays=torch.stack(rays), id_emb=torch.stack(emb),
                   drop=drop, drop_id=drop | (not self.use_identity), bg=torch.tensor(bg), sigma=sigma,
                   noise=noise, channels=4 if self.image_only else 8, identity=names, views=torch.tensor(views),
                   stage=stage)
        if weight:
            out["weight"] = torch.stack(weight)
        return out

    def options(self) -> dict:
        """The recipe options, as recorded in the model's config."""
        opts = {"cond_views": self.cond_views, "use_identity": self.use_identity, "image_only": self.image_only}
        if self.face_weight > 0:
            opts["face_weight"] = self.face_weight             # absent = 0, the paper's loss (older checkpoints)
        if len(self.train_ids) != len(self.train.ids):
            opts["train_identities"] = self.train_ids          # a run on some heads only (the overfit check)
        return opts


def encoder_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def training_loss(model, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """EDM loss of one batch: noise the targets, condition on clean views, weigh, average over targets.

    ``x = x0 + sigma n``; conditioning latents are ``x0`` (zeros where the sample is dropped for CFG);
    ``D = model(x, sigma, cond, mask, rays, id_emb, drop_id=drop_id)``; loss = ``edm_loss(D, x0, sigma, ~mask)``
    on the first ``batch["channels"]`` latent channels (all 8 unless the image-only ablation), weighted by
    ``batch["weight"]`` where present (``TrainData(face_weight=...)``).
    """
    x0 = batch["x0"].to(device)
    sigma = batch["sigma"].to(device)
    mask = batch["mask"].to(device)
    drop = batch["drop"].to(device)
    drop_id = batch.get("drop_id", batch["drop"]).to(device)
    x = x0 + sigma.view(-1, 1, 1, 1, 1) * batch["noise"].to(device)              # noisy targets
    cond = torch.where(drop.view(-1, 1, 1, 1, 1), torch.zeros_like(x0), x0)        # CFG: zero images
    D = model(x, sigma, cond, mask, batch["rays"].to(device), batch["id_emb"].to(device), drop_id=drop_id)
    c = int(batch.get("channels", x0.shape[2]))
    weight = batch.get("weight")
    return edm.edm_loss(D[:, :, :c], x0[:, :, :c], sigma, ~mask,
                        weight=None if weight is None else weight.to(device))


# ----------------------------------------------------------------------------------------------
# EMA, checkpoints, pictures
# ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights: ``ema <- d ema + (1 - d) w`` after each optimizer step.

    ``d = min(decay, (1 + t) / (10 + t))`` at step ``t``: short runs average their recent weights instead of
    remembering the random initialisation. Buffers are copied. Kept in float32.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        params = dict(model.named_parameters())
        for k, v in model.state_dict().items():
            if k in params and v.is_floating_point():
                self.state[k].lerp_(params[k].detach().float(), 1 - d)
            else:
                self.state[k].copy_(v)


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as safetensors tensors ``state/<param>/<name>`` + JSON for everything else."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state/{pid}/{name}"] = v
            else:
                scalars[f"{pid}/{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, name = key.split("/", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete training checkpoints under ``out/checkpoints``, oldest first."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and Run.is_complete(p))


def newest_weights(out: Path) -> tuple[dict, dict, int]:
    """The weights to export from a training folder: its final export when complete, else its newest checkpoint's
    EMA weights. -> ``(state_dict, config, step)``; ``FileNotFoundError`` when it holds neither yet."""
    from .checkpoints import load_checkpoint

    if Run.is_complete(out):
        state, config = load_checkpoint(out)
        return state, config, int(config.get("step", 0))
    ck = checkpoint_dirs(out)
    if not ck:
        raise FileNotFoundError(f"{out} holds no complete export and no checkpoint yet")
    state, config = load_checkpoint(ck[-1], name="ema.safetensors")
    return state, config, int(ck[-1].name.split("_")[-1])


def save_training_checkpoint(out: Path, step: int, model: SpinModel, ema: EMA, opt, trainer_state: dict) -> Path:
    """Write ``out/checkpoints/step_<step>/`` atomically: built as ``*.tmp``, renamed when whole.

    Holds ``model.safetensors`` (weights), ``ema.safetensors`` (EMA weights), ``optimizer.safetensors``,
    ``rng.safetensors`` (torch RNG states), ``config.json`` (model configuration) and ``trainer_state.json``
    (step, losses, optimizer settings). ``COMPLETE`` is written last.
    """
    final = Path(out) / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    cfg = dict(model.config, step=step)
    save_checkpoint(tmp, model.state_dict(), cfg, name="model.safetensors")
    save_checkpoint(tmp, ema.state, cfg, name="ema.safetensors")
    opt_tensors, opt_meta = flatten_optimizer(opt)
    save_checkpoint(tmp, opt_tensors, cfg, name="optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_checkpoint(tmp, rng, cfg, name="rng.safetensors")
    write_json(tmp / "trainer_state.json", dict(trainer_state, format=CHECKPOINT_FORMAT, step=step, optimizer=opt_meta))
    Run.mark_complete(tmp, {"step": step})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(folder: Path, model: SpinModel, ema: EMA, opt, profile: Profile,
                             options: dict | None = None) -> dict:
    """Restore weights, EMA, optimizer and RNG states from ``folder``; returns its ``trainer_state``.

    The checkpoint must match ``profile``'s model and the recipe ``options`` (else ``CheckpointError``)."""
    expected = {k: v for k, v in model_config(profile).items() if k not in ("sigma_data", "prediction")}
    expected.update(options or {})
    state, _ = load_checkpoint(folder, expected, name="model.safetensors")
    model.load_state_dict(state)
    ema_state, _ = load_checkpoint(folder, name="ema.safetensors")
    for k, v in ema_state.items():
        ema.state[k] = v.to(ema.state[k].device, ema.state[k].dtype)
    ts = read_json(Path(folder) / "trainer_state.json")
    if ts.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{folder} is not a training checkpoint of this trainer ({ts.get('format')!r}); "
                              "delete it, or train without resume")
    opt_tensors, _ = load_checkpoint(folder, name="optimizer.safetensors")
    opt.load_state_dict(unflatten_optimizer(opt_tensors, ts["optimizer"]))
    rng, _ = load_checkpoint(folder, name="rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in rng]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    return ts


def smooth(values: list[float], window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_loss(losses: list[float], path: Path, title: str = "EDM training loss") -> Path:
    """The loss curve (per step and a running mean) as a PNG."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    ax.plot(steps, smooth(losses, max(1, len(losses) // 20)), lw=1.8, label="running mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from .runs import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_sample_grid(truth: torch.Tensor, img: torch.Tensor, nrm: torch.Tensor, path: Path) -> Path:
    """Three rows per sample of ``(B, V, 3, H, W)`` tensors: the true views, the generated ones, their normals."""
    rows = []
    for b in range(truth.shape[0]):
        rows += [truth[b], img[b], nrm[b]]
    return save_grid(rows, path)


def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> Path:
    """Rows of images (each (N,3,H,W) in [0,1]) as one PNG with white gaps."""
    from PIL import Image

    n = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(row.shape[0]):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[y:y + H, x:x + W] = _to_uint8(row[c])
    from .runs import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="png")
    return Path(path)


class GridMaker:
    """Periodic sample grids of held-out identities, with the same inputs and seeds at every checkpoint.

    Per identity three rows over ``P`` views spread around the head (column 0 = the frontal input view):
    the true renders, the generated images, the generated normal maps. The sampler is ``sampling.sample``
    (Euler on the Karras schedule) with classifier-free guidance at ``profile.cfg_scale``.

    ``split="train"``: the first training identities of ``data`` instead, at the dataset's own views and cameras,
    exactly as training showed them: ``measure`` then says whether the model reproduces what it trained on (the
    memorisation half of the overfit check; ``checks.teacher_forced`` asks for new cameras at pitch 0).
    """

    def __init__(self, data: TrainData, codec, n_identities: int = GRID_IDENTITIES, steps: int | None = None,
                 split: str = "heldout"):
        if split not in ("heldout", "train"):
            raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
        ds, P = (data.heldout if split == "heldout" else data.train), data.P
        rows = (range(min(n_identities, len(ds))) if split == "heldout"
                else [ds.ids.index(n) for n in data.train_ids[:n_identities]])
        self.profile, self.codec, self.steps = data.profile, codec, steps or data.profile.sample_steps
        self.truth, self.truth_normal, self.alpha, cond, rays, emb = [], [], [], [], [], []
        for i in rows:
            c2w, K, yaw, pitch = data.camera(ds, i)
            idx = spread_views(yaw, frontal_view(yaw, pitch), P)
            v = ds.views(i, idx)
            self.truth.append(v["rgb"])
            self.truth_normal.append(v["normal_rgb"])
            self.alpha.append(v["alpha"])
            cond.append(data.latents(ds.ids[i], idx))
            rays.append(data.rays(ds, i, idx))
            emb.append(data.id_emb[ds.ids[i]])
        self.cond, self.rays, self.id_emb = torch.stack(cond), torch.stack(rays), torch.stack(emb)
        self.mask = torch.zeros(self.cond.shape[:2], dtype=torch.bool)
        self.mask[:, 0] = True                                               # the frontal view is given
        self._ceiling: dict | None = None                                    # measure's model-independent part

    @torch.no_grad()
    def generate(self, model: SpinModel, seed: int = 0, cfg_scale: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded images and normal maps (B, V, 3, H, W), view 0 the given one."""
        from . import sampling

        device = encoder_device(model)
        cond, mask, rays, emb = (t.to(device) for t in (self.cond, self.mask, self.rays, self.id_emb))
        scale = self.profile.cfg_scale if cfg_scale is None else cfg_scale
        denoise = sampling.cfg_denoiser(model, cond, mask, rays, emb, scale=scale)
        sigmas = sampling.profile_sigmas(self.profile, self.steps)
        x0 = sampling.sample(denoise, cond.shape, sigmas, sampling.generators(seed, cond.shape[0]),
                             solver="euler", cond=cond, mask=mask, device=device)
        return self._decode(x0)

    def _decode(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, V = x0.shape[:2]
        H, W = self.truth[0].shape[-2:]
        img = self.codec.decode(x0[:, :, :4].flatten(0, 1).to(self.codec.device)).cpu().view(B, V, 3, H, W)
        nrm = self.codec.decode(x0[:, :, 4:].flatten(0, 1).to(self.codec.device)).cpu().view(B, V, 3, H, W)
        return img, nrm

    @torch.no_grad()
    def measure(self, model: SpinModel, seed: int = 0, cfg_scale: float | None = None) -> dict:
        """SSIM and normal error of the generated views (all but the given one) against the true renders, and the
        same for the true latents decoded (the autoencoder's ceiling, model-independent: decoded once)."""
        from .metrics import normal_distance, ssim

        truth, tn, a = (torch.stack(x)[:, 1:].flatten(0, 1) for x in (self.truth, self.truth_normal, self.alpha))
        flat = lambda x: x[:, 1:].flatten(0, 1)
        if self._ceiling is None:
            ceil_img, ceil_nrm = self._decode(self.cond)
            self._ceiling = {"ceiling_ssim": ssim(flat(ceil_img), truth).mean().item(),
                             "ceiling_normal_err_deg": normal_distance(flat(ceil_nrm), tn, a).mean().item()}
        img, nrm = self.generate(model, seed, cfg_scale)
        return {"ssim": ssim(flat(img), truth).mean().item(),
                "normal_err_deg": normal_distance(flat(nrm), tn, a).mean().item(), **self._ceiling,
                "pictures": (torch.stack(self.truth), img, nrm)}

    @torch.no_grad()
    def __call__(self, model: SpinModel, path: Path, seed: int = 0) -> Path:
        img, nrm = self.generate(model, seed)
        return save_sample_grid(torch.stack(self.truth), img, nrm, path)


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a training run did; ``figures()`` gives the numbers notebook 05 records."""
    steps: int                         # optimizer steps the model has taken in all
    steps_this_call: int               # steps trained by this call (0 when it found a finished run)
    samples_per_s: float               # training samples per second over this call's steps (all processes)
    final_loss: float                  # mean loss over the last 10 % of the steps (at least 1, at most 50)
    checkpoint: str                    # the last training checkpoint folder
    out: str                           # the training folder (final EMA model at its top when finished)
    finished: bool                     # the run reached its step count (final model written)
    losses: list = field(default_factory=list)   # loss per step (mean over processes)
    grids: list = field(default_factory=list)    # [step, png path] of the sample grids
    loss_curve: str = ""
    seconds: float = 0.0               # wall time of this call's training steps
    processes: int = 1
    mixed_precision: str = "no"

    def figures(self) -> dict:
        return {"train_steps": self.steps, "samples_per_s": self.samples_per_s, "final_loss": self.final_loss,
                "checkpoint": self.checkpoint}


def final_loss_of(losses: list[float]) -> float:
    if not losses:
        return float("nan")
    k = min(50, max(1, len(losses) // 10))
    return float(np.mean(losses[-k:]))


def train(run: Run, steps: int | None = None, out: str | os.PathLike | None = None, resume: bool = True,
          progress: bool = True, stop_after: int | None = None, grids: bool = True, cond_views: int | None = None,
          use_identity: bool = True, image_only: bool = False, identities: list[str] | None = None,
          init_from: str | os.PathLike | None = None, face_weight: float = 0.0) -> TrainResult:
    """Train a ``SpinModel`` for ``steps`` optimizer steps (``profile.train_steps``) into ``out``.

    ``out`` defaults to ``run.model_dir("spin")``; it receives ``checkpoints/``, ``samples/step_*.png``,
    ``loss.png``, ``log.json`` and, when finished, the EMA weights as a ``SpinModel`` checkpoint
    (``model.safetensors`` + ``config.json`` + ``COMPLETE``). ``resume``: continue from the newest checkpoint in
    ``out`` (a finished run is returned as it is); ``False`` deletes ``out`` first and trains from scratch.
    ``stop_after``: stop after that many steps of this call as if the process were killed (tests).
    ``grids=False`` skips the sample grids. ``cond_views``, ``use_identity``, ``image_only``: the paper's ablations
    (``TrainData``), recorded in the saved config; a checkpoint made with other options is not resumed.
    ``face_weight``: the face of each target counts ``1 + face_weight`` times in the loss (``face_weights``).
    Runs under ``accelerate launch`` as well: each process draws its own batches, gradients are averaged.
    Sizes come from ``run.profile``: ``batch_size`` per process, ``grad_accum``, ``lr``, ``ema_decay``,
    ``checkpoint_every``, ``sample_every`` (0 = no grids), ``mixed_precision``.
    """
    from accelerate import Accelerator

    p = run.profile
    total = int(steps if steps is not None else p.train_steps)
    out = Path(out) if out is not None else run.model_dir("spin")
    accelerator = Accelerator(mixed_precision=mixed_precision(p, run.device), cpu=run.device.type == "cpu")
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    if main and not resume and out.exists():
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    if Run.is_complete(out):
        log = read_json(out / "log.json") if (out / "log.json").exists() else {}
        if log.get("steps") == total:                     # finished already: nothing to train
            return _result_from_log(log, out)
        accelerator.wait_for_everyone()
        if main:
            (out / "COMPLETE").unlink()                   # asked for more steps: continue from the checkpoint
    accelerator.wait_for_everyone()

    with accelerator.main_process_first():                # the main process builds missing artifacts first
        data = TrainData(run, progress=progress and main, cond_views=cond_views, use_identity=use_identity,
                         image_only=image_only, identities=identities, face_weight=face_weight)
    options = dict(data.options(), **data.fingerprints)    # checked on resume, recorded in every checkpoint
    torch.manual_seed(run.seed)                           # the initial weights depend on the seed only
    model = SpinModel.from_profile(p)
    if init_from is not None:
        start_model = SpinModel.load(init_from, p)        # same configuration, or CheckpointError
        model.load_state_dict(start_model.state_dict())
        options["init_from"] = module_fingerprint(start_model)
        del start_model
    model.config.update(options)                          # the recipe options travel with every checkpoint
    ema = EMA(model, p.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, betas=(0.9, 0.999), weight_decay=0.0)

    start, losses, grids_done = 0, [], []
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        ts = load_training_checkpoint(ckpts[-1], model, ema, opt, p, options)
        start, losses = int(ts["step"]), list(ts.get("losses", []))
        grids_done = [tuple(g) for g in ts.get("grids", [])]
        if ts.get("total_steps") not in (None, total) and main:
            print(f"resuming {ckpts[-1]} (planned {ts['total_steps']} steps) for {total} steps", file=sys.stderr)
    ema.state = {k: v.to(device) for k, v in ema.state.items()}
    model, opt = accelerator.prepare(model, opt)
    raw = accelerator.unwrap_model(model)
    grid_maker = None
    if main and grids and p.sample_every:
        from .latents import ensure_vae
        grid_maker = GridMaker(data, ensure_vae(run, progress=False).to(device))

    per_step = p.batch_size * p.grad_accum * world
    last_ckpt = str(ckpts[-1]) if ckpts else ""
    bar = tqdm(total=total, initial=start, desc="training", disable=not (progress and main), dynamic_ncols=True)
    t_train, n_done = 0.0, 0
    model.train()
    for step in range(start, total):
        if stop_after is not None and n_done >= stop_after:
            break
        t0 = time.perf_counter()
        stage = stage_of(step, total, p)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, p)
        loss_sum = torch.zeros((), device=device)
        for micro in range(p.grad_accum):
            batch = data.batch(step, micro, rank, stage)
            sync = contextlib.nullcontext() if micro == p.grad_accum - 1 else accelerator.no_sync(model)
            with sync:
                loss = training_loss(model, batch, device)
                accelerator.backward(loss / p.grad_accum)
            loss_sum += loss.detach() / p.grad_accum
        accelerator.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(raw, step)
        step_loss = float(accelerator.reduce(loss_sum, reduction="mean"))
        losses.append(step_loss)
        t_train += time.perf_counter() - t0
        n_done += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", stage=stage, samples_s=f"{n_done * per_step / t_train:.2f}")

        done = step + 1
        if grid_maker is not None and (done % p.sample_every == 0 or done == total):
            sampler_model = _ema_copy(raw, ema)
            path = grid_maker(sampler_model, out / "samples" / f"step_{done:07d}.png", seed=run.seed)
            grids_done.append((done, str(path)))
            del sampler_model
        if done % p.checkpoint_every == 0 or done == total:
            sums = accelerator.gather(weight_checksum(raw).to(device).view(1)).cpu()   # one per process
            if not torch.all(sums == sums[0]):
                raise RuntimeError(f"the {world} processes hold different weights at step {done} ({sums.tolist()}): "
                                   "gradients were not averaged; launch with accelerate launch or torchrun")
            if main:
                state = {"total_steps": total, "losses": losses, "grids": grids_done, "seed": run.seed,
                         "profile": p.name, "processes": world, "samples_per_step": per_step,
                         "weight_checksums": sums.tolist()}
                last_ckpt = str(save_training_checkpoint(out, done, raw, ema, opt, state))
                plot_loss(losses, out / "loss.png")
            accelerator.wait_for_everyone()
    bar.close()

    finished = len(losses) >= total
    sps = n_done * per_step / t_train if t_train > 0 else 0.0
    result = TrainResult(steps=len(losses), steps_this_call=n_done, samples_per_s=sps,
                         final_loss=final_loss_of(losses), checkpoint=last_ckpt, out=str(out), finished=finished,
                         losses=losses, grids=[list(g) for g in grids_done],
                         loss_curve=str(out / "loss.png") if losses else "", seconds=t_train, processes=world,
                         mixed_precision=accelerator.mixed_precision)
    if main and finished:
        plot_loss(losses, out / "loss.png")
        raw.save(out, {k: v.to("cpu") for k, v in ema.state.items()},
                 info={"weights": "ema", "step": len(losses), "profile": p.name, **options})
        log = asdict(result)
        write_json(out / "log.json", dict(log, steps=total))
        Run.mark_complete(out, {"step": len(losses), "final_loss": result.final_loss})
    accelerator.wait_for_everyone()
    return result


def weight_checksum(model: torch.nn.Module) -> torch.Tensor:
    """A float64 fingerprint of all parameters (equal on every process of a data-parallel run)."""
    with torch.no_grad():
        return sum(p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in model.parameters())


def _ema_copy(model: SpinModel, ema: EMA) -> SpinModel:
    m = copy.deepcopy(model)
    m.load_state_dict({k: v.to(dtype=m.state_dict()[k].dtype) for k, v in ema.state.items()})
    return m.eval()


def _result_from_log(log: dict, out: Path) -> TrainResult:
    fields = TrainResult.__dataclass_fields__
    r = TrainResult(**{k: v for k, v in log.items() if k in fields})
    r.steps_this_call, r.out = 0, str(out)
    return r


def export_model(out: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a finished training folder's model to ``dest`` without its training checkpoints.

    ``dest`` gets ``model.safetensors`` (EMA weights), ``config.json``, ``log.json``, ``loss.png``, ``samples/``
    and ``COMPLETE`` last: what a reference checkpoint (``reference/<profile>/spin``) holds.
    """
    out, dest = Path(out), Path(dest)
    if not Run.is_complete(out):
        raise CheckpointError(f"{out} holds no finished training run (no COMPLETE): train it to the end first")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "log.json", "loss.png"):
        if (out / name).exists():
            shutil.copy2(out / name, dest / name)
    if (out / "samples").is_dir():
        shutil.copytree(out / "samples", dest / "samples")
    log = read_json(dest / "log.json") if (dest / "log.json").exists() else {}
    log.update(out=str(dest), checkpoint="")
    write_json(dest / "log.json", log)
    Run.mark_complete(dest, read_json(out / "COMPLETE"))
    return dest


# ----------------------------------------------------------------------------------------------
# the model later notebooks use
# ----------------------------------------------------------------------------------------------
def ensure_model(run: Run, progress: bool = True) -> tuple[SpinModel, str]:
    """The run's multi-view model and where it came from: ``(model, "reference" | "trained")``.

    ``reference/<profile>/spin`` when the profile uses reference checkpoints and the checkout has one; else the
    run's trained model (``run.model_dir("spin")``, EMA weights), trained now (resuming any interrupted
    training) when missing. A reference model works only with the autoencoder and identity encoder it was
    trained with: a warning says so when the run's differ (their fingerprints are in the model's config).
    """
    model, source = find_model(run)
    if model is not None:
        return model, source
    train(run, progress=progress)
    return find_model(run)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="", help="test, cpu, gpu or paper (default: $SMR_PROFILE, else cpu)")
    ap.add_argument("--run-dir", default="", help="run folder with data, encoders, autoencoder, latents "
                                                  "(default: $SMR_RUN_DIR, else runs/<profile>)")
    ap.add_argument("--out", default="", help="training folder (default: <run-dir>/models/spin)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the profile's train_steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="samples per process per micro-batch")
    ap.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="steps between training checkpoints")
    ap.add_argument("--sample-every", type=int, default=None, help="steps between sample grids (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    ap.add_argument("--no-resume", action="store_true", help="delete --out and train from scratch")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps as if killed (for tests)")
    ap.add_argument("--cond-views", type=int, default=None, help="ablation: always this many conditioning views")
    ap.add_argument("--no-identity", action="store_true", help="ablation: never give the identity (empty prompt)")
    ap.add_argument("--image-only", action="store_true", help="ablation: no normal latents (image channels only)")
    ap.add_argument("--export", default="", help="when finished, copy the model (no training checkpoints) here, "
                                                 "e.g. reference/<profile>/spin")
    ap.add_argument("--device", default="", help="cpu or cuda (default: CUDA when present)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        args.device = args.device or "cpu"
    run = Run.open(args.profile, args.run_dir, notebook="05_edm_training", seed=args.seed, device=args.device)
    over = {k: v for k, v in dict(batch_size=args.batch_size, grad_accum=args.grad_accum,
                                  checkpoint_every=args.checkpoint_every, sample_every=args.sample_every).items()
            if v is not None}
    if over:
        run.profile = run.profile.replace(**over)
    result = train(run, steps=args.steps, out=args.out or None, resume=not args.no_resume,
                   progress=not args.quiet, stop_after=args.stop_after, cond_views=args.cond_views,
                   use_identity=not args.no_identity, image_only=args.image_only)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.export and result.finished:
            print("exported to", export_model(result.out, args.export))
        print(json.dumps({k: v for k, v in asdict(result).items() if k != "losses"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
