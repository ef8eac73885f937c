"""A few-step student of the multi-view model, with classifier-free guidance folded in (notebook 12).

The teacher (the trained ``SpinModel``) samples by integrating the probability-flow ODE with guidance,
``D_w = D_u + w (D_c - D_u)``: two network calls per step, 20 steps. The student has the same architecture,
inputs (latents, ray maps, mask, identity) and place in steps A, B, C, and samples in ``k`` steps (4 by default)
with *one* call each: the k Euler steps of its own schedule ``sigma_0 = sigma_max > sigma_1 > ... > sigma_k = 0``
(``student_sigmas``)::

    x_{j+1} = (sigma_{j+1} / sigma_j) x_j + (1 - sigma_{j+1} / sigma_j) S(x_j; sigma_j)

Training (one distillation step; Salimans and Ho 2022 distil two teacher steps into one and repeat; here one
segment of the student's schedule is distilled straight from a fine teacher integration, with the guidance
folded in as Meng et al. 2023 do):

1. a training sample as the trainer draws it (``train.TrainData``: 8 views, 1 or 3 of them clean conditioning
   views, the identity), a segment ``j`` of the schedule, and ``x_j = x0 + sigma_j eps`` on the target views;
2. the teacher integrates its *guided* ODE from ``x_j`` at ``sigma_j`` to ``sigma_{j+1}`` with ``substeps`` steps of
   DPM-Solver++(2M): ``x_{j+1}^T`` (no gradient);
3. the student's Euler step lands there exactly when ``S(x_j; sigma_j) = D*``::

       D* = (x_{j+1}^T - r x_j) / (1 - r),   r = sigma_{j+1} / sigma_j     (last segment: r = 0, D* = x_0^T)

   and the loss is ``mean over target views ||S(x_j; sigma_j) - D*||^2``.

Every fourth step is a step-A sample instead (one view, no conditioning view, no guidance, as step A samples), so
the student also takes step A's few steps. The student starts from the teacher's weights. Checkpoints (weights,
EMA, optimizer, losses) every ``checkpoint_every`` steps; a killed run resumes from the newest one.

    python -m spinmeround_lite.distill --profile cpu --out runs/distill --steps 3000 --export reference/cpu/student
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import sampling
from .artifacts import find_student, load_student, student_info  # noqa: F401 (the student's loaders, here too)
from .checkpoints import module_fingerprint
from .model import SpinModel
from .profiles import Profile, get_profile
from .runs import Run, read_json, write_json

STUDENT_STEPS = 4              # student steps of a spin (network calls per view: 4 against the teacher's 40)
STUDENT_SIGMA_HI = 5.0         # the student's second noise level (after sigma_max) ...
STUDENT_SIGMA_LO = 0.25        # ... and its last one before 0; the levels between are geometric
SUBSTEPS = 3                   # teacher DPM-Solver++(2M) steps per student segment (12 in all for 4 segments)
STEP_A_EVERY = 4               # every 4th distillation step is a step-A sample (1 view, no guidance)
STEP_A_BATCH = 4               # step-A samples per such step


# ----------------------------------------------------------------------------------------------
# the student's schedule and identity card
# ----------------------------------------------------------------------------------------------
def student_sigmas(steps: int = STUDENT_STEPS, sigma_max: float = 80.0, hi: float = STUDENT_SIGMA_HI,
                   lo: float = STUDENT_SIGMA_LO) -> torch.Tensor:
    """The student's noise levels (steps + 1,) float64: ``sigma_max``, then ``steps - 1`` levels geometric from
    ``hi`` down to ``lo``, then 0. (4 steps: 80, 5, 1.12, 0.25, 0.) The first step from pure noise lands near
    ``hi``, where the head's layout is decided; the rest share the detail evenly in ``ln sigma``."""
    if steps < 1:
        raise ValueError(f"a student needs at least one step, got {steps}")
    mid = torch.logspace(math.log10(hi), math.log10(lo), steps - 1, dtype=torch.float64) if steps > 1 else \
        torch.zeros(0, dtype=torch.float64)
    if steps == 2:
        mid = torch.tensor([math.sqrt(hi * lo)], dtype=torch.float64)
    return torch.cat([torch.tensor([sigma_max], dtype=torch.float64), mid, torch.zeros(1, dtype=torch.float64)])


def as_student(model: SpinModel, profile: Profile | str, steps: int = STUDENT_STEPS,
               sigmas: torch.Tensor | None = None, cfg_scale: float | None = None, **info) -> SpinModel:
    """Mark ``model`` as a student: its config gets ``student`` = steps, sigmas, folded guidance scale (+ ``info``)."""
    p = get_profile(profile)
    sig = student_sigmas(steps, p.sample_sigma_max) if sigmas is None else torch.as_tensor(sigmas)
    if len(sig) != steps + 1 or float(sig[-1]) != 0.0:
        raise ValueError(f"a {steps}-step student needs {steps + 1} noise levels ending at 0, got {sig.tolist()}")
    model.config["student"] = {"steps": int(steps), "sigmas": [float(s) for s in sig],
                               "cfg_scale": float(p.cfg_scale if cfg_scale is None else cfg_scale), **info}
    return model


# ----------------------------------------------------------------------------------------------
# one distillation step
# ----------------------------------------------------------------------------------------------
def _step_a_batch(data, step: int, seed: int, n: int) -> dict:
    """Step-A samples: one view each (a random view of a training head), no conditioning view, the identity."""
    from .train import step_generator

    g = step_generator(seed, step, 7)
    b = data.batch(step, micro=7, stage=1, batch_size=n, seed=seed)
    keep = torch.randint(data.P, (n,), generator=g)
    pick = lambda t: t[torch.arange(n), keep][:, None]
    return {"x0": pick(b["x0"]), "rays": pick(b["rays"]), "mask": torch.zeros(n, 1, dtype=torch.bool),
            "id_emb": b["id_emb"], "cfg": 1.0}


def _spin_batch(data, step: int, seed: int, batch_size: int, cfg: float) -> dict:
    """Steps B and C samples: ``P`` views, the first 1 or 3 (p = 1/2 each) clean conditioning views."""
    from .train import step_generator

    b = data.batch(step, stage=1, batch_size=batch_size, seed=seed)       # 1 conditioning view, random views
    g = step_generator(seed, step, 5)
    n_cond = torch.where(torch.rand(batch_size, generator=g) < 0.5, 1, 3)
    mask = torch.arange(b["x0"].shape[1])[None] < n_cond[:, None]
    return {"x0": b["x0"], "rays": b["rays"], "mask": mask, "id_emb": b["id_emb"], "cfg": cfg}


def distill_batch(data, step: int, seed: int, batch_size: int, cfg: float, schedule: torch.Tensor) -> dict:
    """Everything one step needs: the sample, the segment ``j`` and the noisy state ``x_j``."""
    from .train import step_generator

    b = (_step_a_batch(data, step, seed, STEP_A_BATCH) if step % STEP_A_EVERY == STEP_A_EVERY - 1
         else _spin_batch(data, step, seed, batch_size, cfg))
    g = step_generator(seed, step, 9)
    k = len(schedule) - 1
    j = int(torch.randint(k, (1,), generator=g))
    x0 = b["x0"]
    eps = torch.randn(x0.shape, generator=g)
    x = x0 + float(schedule[j]) * eps
    b.update(j=j, x=torch.where(b["mask"].view(*b["mask"].shape, 1, 1, 1), x0, x))
    return b


@torch.no_grad()
def teacher_target(teacher, b: dict, schedule: torch.Tensor, substeps: int = SUBSTEPS, device="cpu"
                   ) -> torch.Tensor:
    """``D*`` of the batch: the teacher's guided ODE from ``x_j`` over segment ``j`` (``substeps`` DPM-Solver++(2M)
    steps), turned into the denoised value that makes the student's one Euler step land on it."""
    j = b["j"]
    s_hi, s_lo = float(schedule[j]), float(schedule[j + 1])
    mask = b["mask"].to(device)
    cond = torch.where(mask.view(*mask.shape, 1, 1, 1), b["x0"].to(device), torch.zeros_like(b["x0"].to(device)))
    denoise = sampling.cfg_denoiser(teacher, cond, mask, b["rays"].to(device), b["id_emb"].to(device),
                                    scale=b["cfg"])
    x_j = b["x"].to(device)
    x_next = integrate(denoise, x_j, s_hi, s_lo, substeps, cond, mask)
    r = s_lo / s_hi
    return (x_next - r * x_j) / (1 - r)


class _Reached(Exception):
    pass


def integrate(denoise, x: torch.Tensor, s_hi: float, s_lo: float, substeps: int, cond=None, mask=None
              ) -> torch.Tensor:
    """DPM-Solver++(2M) from ``x`` at ``s_hi`` down to ``s_lo`` in ``substeps`` steps on a Karras schedule between
    them (``s_lo = 0``: down to ``sampling.SIGMA_MIN`` in ``substeps`` steps, then the last step to 0)."""
    if s_lo == 0:
        sig = sampling.karras_sigmas(substeps + 1, sampling.SIGMA_MIN, s_hi)
        return sampling.sample(denoise, x.shape, sig, solver="dpm2m", cond=cond, mask=mask, device=x.device,
                               x_init=x)
    sig = sampling.karras_sigmas(substeps + 1, s_lo, s_hi)                      # s_hi .. s_lo, then 0
    out = {}

    def stop(i, x_i, _d):
        if i == substeps - 1:                                                    # at s_lo: stop here
            out["x"] = x_i
            raise _Reached
    try:
        sampling.sample(denoise, x.shape, sig, solver="dpm2m", cond=cond, mask=mask, device=x.device, x_init=x,
                        callback=stop)
    except _Reached:
        pass
    return out["x"]


def distill_loss(student, b: dict, target: torch.Tensor, schedule: torch.Tensor, device="cpu") -> torch.Tensor:
    """Mean squared error of the student's denoised value at ``sigma_j`` against ``D*``, on the target views."""
    mask = b["mask"].to(device)
    x0 = b["x0"].to(device)
    cond = torch.where(mask.view(*mask.shape, 1, 1, 1), x0, torch.zeros_like(x0))
    B = x0.shape[0]
    sigma = torch.full((B,), float(schedule[b["j"]]), device=device)
    S = student.denoise(b["x"].to(device), sigma, cond, mask, b["rays"].to(device), b["id_emb"].to(device))
    err = ((S - target) ** 2).mean(dim=(2, 3, 4))                                  # (B, V)
    tgt = (~mask).float()
    return (err * tgt).sum() / tgt.sum()


# ----------------------------------------------------------------------------------------------
# sampling with a student (pictures during training)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def student_grid(student, grid, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's views of ``grid`` (a ``train.GridMaker``: held-out heads, frontal view given)."""
    device = next(student.parameters()).device
    info = student_info(student)
    cond, mask, rays, emb = (t.to(device) for t in (grid.cond, grid.mask, grid.rays, grid.id_emb))
    denoise = sampling.cfg_denoiser(student, cond, mask, rays, emb, scale=1.0)
    x0 = sampling.sample(denoise, cond.shape, torch.tensor(info["sigmas"], dtype=torch.float64),
                         sampling.generators(seed, cond.shape[0]), solver="euler", cond=cond, mask=mask,
                         device=device)
    return grid._decode(x0)


# ----------------------------------------------------------------------------------------------
# the distillation run
# ----------------------------------------------------------------------------------------------
def distill(run: Run, steps: int = 3000, out: str | os.PathLike | None = None, k: int = STUDENT_STEPS,
            batch_size: int | None = None, lr: float = 1e-4, ema_decay: float = 0.995, substeps: int = SUBSTEPS,
            checkpoint_every: int = 100, sample_every: int = 250, resume: bool = True, progress: bool = True,
            stop_after: int | None = None, teacher: SpinModel | None = None, warmup: int = 50) -> dict:
    """Distil the run's multi-view model into a ``k``-step student in ``out`` (default ``models/student``).

    The teacher is ``train.ensure_model(run)`` (``reference/<profile>/spin`` where the profile uses it) unless
    given; the student starts from its weights. ``steps`` optimizer steps of ``batch_size`` samples (default the
    profile's), AdamW at ``lr`` after a linear warm-up of ``warmup`` steps, EMA ``ema_decay``. Checkpoints every
    ``checkpoint_every`` steps under ``out/checkpoints`` (a run killed and started again continues from the newest
    one); grids of held-out heads (student beside the teacher's 20 Euler steps) every ``sample_every`` steps under
    ``out/samples``; ``out/log.jsonl`` one line per step. When all steps are done, ``out`` holds the student's EMA
    weights, ``config.json`` (with its ``student`` entry), ``loss.png`` and ``COMPLETE``.
    """
    import copy

    from .train import (
        EMA,
        GridMaker,
        TrainData,
        checkpoint_dirs,
        ensure_model,
        load_training_checkpoint,
        plot_loss,
        save_training_checkpoint,
    )

    p = run.profile
    out = Path(out) if out is not None else run.model_dir("student")
    if not resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    device = run.device
    if teacher is None:
        teacher, _ = ensure_model(run, progress=progress)
    teacher = teacher.to(device).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    data = TrainData(run, progress=progress)
    schedule = student_sigmas(k, p.sample_sigma_max)
    B = int(batch_size or p.batch_size)
    options = {"distill": {"teacher": module_fingerprint(teacher), "steps": k, "substeps": substeps,
                           "sigmas": [float(s) for s in schedule], "cfg_scale": p.cfg_scale, "batch_size": B,
                           "lr": lr}}
    student = copy.deepcopy(teacher).train()
    for q in student.parameters():
        q.requires_grad_(True)
    student.config.update(options)
    ema = EMA(student, ema_decay)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, losses = 0, []
    ckpts = checkpoint_dirs(out) if resume else []
    if ckpts:
        ts = load_training_checkpoint(ckpts[-1], student, ema, opt, p, options)
        start, losses = int(ts["step"]), list(ts.get("losses", []))
    grid = GridMaker(data, _codec(run), n_identities=2) if sample_every else None
    log_path = out / "log.jsonl"
    bar = tqdm(total=steps, initial=start, desc="distilling", disable=not progress, dynamic_ncols=True)
    t_run, n_done = 0.0, 0
    for step in range(start, steps):
        if stop_after is not None and n_done >= stop_after:
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        b = distill_batch(data, step, run.seed, B, p.cfg_scale, schedule)
        target = teacher_target(teacher, b, schedule, substeps, device)
        loss = distill_loss(student, b, target, schedule, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema.update(student, step)
        losses.append(loss.item())
        dt = time.perf_counter() - t0
        t_run += dt
        n_done += 1
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": step + 1, "loss": losses[-1], "segment": b["j"],
                                "kind": "A" if b["mask"].shape[1] == 1 else "BC", "seconds": round(dt, 3)}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", s_step=f"{t_run / n_done:.2f}")
        done = step + 1
        if grid is not None and (done % sample_every == 0 or done == steps):
            _save_grids(student, ema, teacher, grid, out / "samples" / f"step_{done:07d}.png", run.seed)
        if done % checkpoint_every == 0 or done == steps:
            state = {"total_steps": steps, "losses": losses, "seed": run.seed, "profile": p.name,
                     "seconds_this_call": t_run, "threads": torch.get_num_threads()}
            save_training_checkpoint(out, done, student, ema, opt, state)
            plot_loss(losses, out / "loss.png", title="distillation loss (student vs teacher segment)")
    bar.close()
    finished = len(losses) >= steps
    if finished:
        final = copy.deepcopy(student)
        final.load_state_dict({k_: v.to(final.state_dict()[k_].dtype) for k_, v in ema.state.items()})
        as_student(final, p, k, schedule, p.cfg_scale, teacher=options["distill"]["teacher"], substeps=substeps,
                   distill_steps=len(losses), method="segment distillation with guidance folded in")
        final.save(out, {k_: v.to("cpu") for k_, v in ema.state.items()},
                   info={"weights": "ema", "step": len(losses), "profile": p.name})
        write_json(out / "log.json", {"steps": len(losses), "losses": losses, "seconds_this_call": t_run})
        Run.mark_complete(out, {"step": len(losses)})
    return {"steps": len(losses), "steps_this_call": n_done, "seconds": t_run, "finished": finished,
            "out": str(out), "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else None}


def _codec(run: Run):
    from .latents import ensure_vae
    return ensure_vae(run, progress=False).to(run.device)


@torch.no_grad()
def _save_grids(student, ema, teacher, grid, path: Path, seed: int) -> Path:
    """Rows per held-out head: truth, teacher (20 Euler steps, guided), student EMA (k steps), student raw."""
    import copy

    from .train import save_grid

    s_ema = copy.deepcopy(student).eval()
    s_ema.load_state_dict({k: v.to(s_ema.state_dict()[k].dtype) for k, v in ema.state.items()})
    k = student.config["distill"]["steps"]
    as_student(s_ema, grid.profile, k, torch.tensor(student.config["distill"]["sigmas"]))
    t_img, _ = grid.generate(teacher, seed)
    e_img, _ = student_grid(s_ema, grid, seed)
    rows = []
    truth = torch.stack(grid.truth)
    for i in range(truth.shape[0]):
        rows += [truth[i], t_img[i], e_img[i]]
    return save_grid(rows, path)


def export_student(out: str | os.PathLike, dest: str | os.PathLike, profile: Profile | str,
                   note: str = "", command: str = "", run_dir: str | os.PathLike | None = None) -> Path:
    """Copy a distillation folder's student to ``dest`` in float16 (finished: its saved EMA weights; still running:
    its newest checkpoint's EMA), with ``config.json`` (its ``student`` entry), ``loss.png``, ``manifest.json`` and
    ``COMPLETE`` last."""
    import datetime as dt

    from .checkpoints import save_checkpoint
    from .runs import atomic_folder
    from .train import newest_weights

    out, dest = Path(out), Path(dest)
    p = get_profile(profile)
    complete = Run.is_complete(out)
    state, config, step = newest_weights(out)
    if not complete:
        d = config["distill"]
        config = dict(config, step=step, weights="ema")
        config["student"] = {"steps": d["steps"], "sigmas": d["sigmas"], "cfg_scale": d["cfg_scale"],
                             "teacher": d["teacher"], "substeps": d["substeps"], "distill_steps": step,
                             "method": "segment distillation with guidance folded in"}
    losses, ts = [], {}
    ts_files = sorted(out.glob("checkpoints/step_*/trainer_state.json"))
    if ts_files:
        ts = read_json(ts_files[-1])
        losses = ts.get("losses", [])
    d = config.get("distill", {})
    where = f"--run-dir {run_dir} " if run_dir else ""
    train_command = (f"OMP_NUM_THREADS=1 python -m spinmeround_lite.distill --profile {p.name} {where}--out {out} "
                     f"--steps {ts.get('total_steps', step)} --student-steps {d.get('steps')} "
                     f"--substeps {d.get('substeps')} --batch-size {d.get('batch_size')} --lr {d.get('lr')}")
    with atomic_folder(dest) as tmp:
        save_checkpoint(tmp, {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, config)
        if (out / "loss.png").exists():
            shutil.copy2(out / "loss.png", tmp / "loss.png")
        write_json(tmp / "manifest.json", {
            "profile": p.name, "distill_steps": step, "student": config["student"],
            "exported": dt.datetime.now().isoformat(timespec="seconds"),
            "final_loss_mean_last_100": sum(losses[-100:]) / max(1, len(losses[-100:])) if losses else None,
            "machine": "x86_64 CPU, 1 torch thread, no GPU" if not torch.cuda.is_available() else "CUDA GPU",
            "command": train_command, "resume": f"{train_command}  (the same command continues from the newest "
                                                "checkpoint in --out; add --export to copy the student when done)",
            "export_command": command, "seconds_last_call": ts.get("seconds_this_call"), "note": note})
        Run.mark_complete(tmp, {"step": step, "dtype": "float16"})
    return dest


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.distill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="", help="test, cpu, gpu or paper (default: $SMR_PROFILE, else cpu)")
    ap.add_argument("--run-dir", default="", help="run folder with data, encoders, autoencoder, latents "
                                                  "(default: runs/<profile>)")
    ap.add_argument("--out", default="", help="distillation folder (default: <run-dir>/models/student)")
    ap.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    ap.add_argument("--student-steps", type=int, default=STUDENT_STEPS, help="sampling steps of the student")
    ap.add_argument("--substeps", type=int, default=SUBSTEPS, help="teacher DPM-Solver++ steps per student step")
    ap.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the profile's)")
    ap.add_argument("--lr", type=float, default=1e-4, help="learning rate (AdamW)")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ap.add_argument("--sample-every", type=int, default=250, help="steps between sample grids (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of data order and noise")
    ap.add_argument("--no-resume", action="store_true", help="delete --out and start again")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps as if killed (for tests)")
    ap.add_argument("--export", default="", help="copy the student (float16) here, e.g. reference/cpu/student: "
                                                 "finished, or the newest checkpoint's EMA when --export-only")
    ap.add_argument("--export-only", action="store_true", help="only export what is distilled so far")
    ap.add_argument("--note", default="", help="a line for the export's manifest")
    ap.add_argument("--device", default="", help="cpu or cuda (default: CUDA when present)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    run = Run.open(args.profile, args.run_dir, notebook="12_fewer_steps", seed=args.seed, device=args.device)
    out = Path(args.out) if args.out else run.model_dir("student")
    command = "python -m spinmeround_lite.distill " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    if not args.export_only:
        res = distill(run, steps=args.steps, out=out, k=args.student_steps, batch_size=args.batch_size, lr=args.lr,
                      substeps=args.substeps, checkpoint_every=args.checkpoint_every,
                      sample_every=args.sample_every, resume=not args.no_resume, progress=not args.quiet,
                      stop_after=args.stop_after)
        print(json.dumps(res, indent=1))
    if args.export:
        print("exported to", export_student(out, args.export, run.profile, args.note, command, args.run_dir or None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
