"""Training state on disk: EMA weights, training checkpoints (written atomically, resumed exactly) and the export of
a finished run's model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .model import SpinModel, model_config
from .profiles import Profile
from .runs import Run, read_json, write_json

KEEP_CHECKPOINTS = 2     # training checkpoints kept on disk (the newest ones)
CHECKPOINT_FORMAT = "spinmeround-lite/train-checkpoint-v1"


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
