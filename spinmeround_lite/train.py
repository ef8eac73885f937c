"""The training loop: the multi-view model trained with EDM, on one CPU, one GPU or many (Hugging Face ``accelerate``).

Notebook 05; METHOD.md section 4. Its parts: ``train_data`` (batches), ``train_checkpoints`` (EMA, checkpoints,
resume, export), ``train_grids`` (loss curve, sample grids); their names are importable from here as well.

One training sample is ``P = profile.views_per_sample`` views of one identity (8 in the paper), drawn at random
from its rig views:

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
from .checkpoints import module_fingerprint  # noqa: F401 (solutions/09 reads train.module_fingerprint)
from .model import SpinModel
from .profiles import Profile
from .runs import Run, read_json, write_json
from .train_checkpoints import (  # noqa: F401 (the trainer's parts stay importable from train)
    CHECKPOINT_FORMAT,
    EMA,
    KEEP_CHECKPOINTS,
    checkpoint_dirs,
    export_model,
    flatten_optimizer,
    load_training_checkpoint,
    newest_weights,
    save_training_checkpoint,
    unflatten_optimizer,
)
from .train_data import (  # noqa: F401
    P_BACKGROUND,
    P_UNCOND,
    STAGE2_CONDS,
    TrainData,
    encoder_device,
    face_weights,
    frontal_view,
    n_targets_for_shift,
    spread_views,
    step_generator,
)
from .train_grids import GRID_IDENTITIES, GridMaker, plot_loss, save_grid, save_sample_grid, smooth  # noqa: F401

GRAD_CLIP = 1.0          # gradient norm clipping


# ----------------------------------------------------------------------------------------------
# settings read from the profile, and the loss of one batch
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
    that out only in part); letting it fall at the end is what sharpens the fine detail (measured by the overfit
    check, ``tools/overfit_check.py``).
    """
    rate = profile.lr * min(1.0, (step + 1) / warmup_steps(total_steps))
    decay = min(int(profile.lr_decay_steps), total_steps)
    start = total_steps - decay
    if decay > 0 and step >= start:
        t = (step - start + 1) / decay
        rate *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))
    return rate


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
