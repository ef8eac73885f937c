"""Checkpoints: safetensors weights plus a JSON config, written atomically, checked on load.

Never unpickle a file a user hands over: weights are safetensors only, settings are JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .runs import atomic_path, read_json, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or from another configuration."""


def save_checkpoint(folder: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict,
                    name: str = WEIGHTS) -> Path:
    """Write ``state_dict`` to ``folder/name`` (safetensors) and ``config`` to ``folder/config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(folder / CONFIG, config)
    return folder / name


def load_checkpoint(folder: str | os.PathLike, expected: dict | None = None, name: str = WEIGHTS,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``(state_dict, config)`` from ``folder``; if ``expected`` is given, every key of it must match."""
    folder = Path(folder)
    wpath, cpath = folder / name, folder / CONFIG
    if not wpath.exists():
        raise CheckpointError(f"no checkpoint at {wpath}: train it first (run the notebook that makes it) "
                              f"or point to a folder that holds {name} and {CONFIG}")
    config = read_json(cpath) if cpath.exists() else {}
    if expected:
        check_config(config, expected, where=folder)
    try:
        state = load_file(str(wpath), device=str(device))
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{wpath} is not a readable safetensors file ({e}); delete it and train again") from None
    return state, config


def check_config(found: dict, expected: dict, where: str | os.PathLike = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming every setting where ``found`` differs from ``expected``."""
    diffs = []
    for k, v in expected.items():
        fv = found.get(k, "<absent>")
        if _norm(fv) != _norm(v):
            diffs.append(f"{k}: checkpoint has {fv!r}, this run needs {v!r}")
    if diffs:
        raise CheckpointError(f"{where} comes from another configuration:\n  " + "\n  ".join(diffs) +
                              "\nDelete that folder (or rerun the course with --fresh) to train a matching one.")


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def module_fingerprint(module) -> str:
    """A short hash of a module's weights (which identity encoder a model was trained with)."""
    import hashlib

    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(f"{t.double().sum().item():.10g}".encode())
    return h.hexdigest()[:16]
