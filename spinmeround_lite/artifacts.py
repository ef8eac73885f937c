"""A run's trained models on disk: the multi-view model and the distilled student, the run's own or the committed
reference; loading them needs no training code (the trainer's ``train.ensure_model`` trains what is missing).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoints import CheckpointError, module_fingerprint
from .model import SpinModel
from .profiles import Profile
from .runs import Run, read_json


def find_model(run: Run) -> tuple[SpinModel | None, str]:
    """The run's multi-view model and where it came from, when one is on disk: ``(model, "reference" | "trained")``.

    ``reference/<profile>/spin`` when the profile uses reference checkpoints and the checkout has one; else the
    run's trained model (``run.model_dir("spin")``, EMA weights) when complete; else ``(None, "")``. A reference
    model works only with the autoencoder and identity encoder it was trained with: a warning says so when the
    run's differ (their fingerprints are in the model's config).
    """
    ref = run.reference_dir("spin")
    if ref is not None:
        model = SpinModel.load(ref, run.profile, run.device)
        warn_foreign_parts(run, model)
        return model, "reference"
    folder = run.model_dir("spin")
    if not Run.is_complete(folder):
        return None, ""
    return SpinModel.load(folder, run.profile, run.device), "trained"


def warn_foreign_parts(run: Run, model: SpinModel) -> None:
    """Warn when a loaded model was trained with another autoencoder or identity encoder than the run has."""
    import warnings

    found = {}
    if Run.is_complete(run.root / "latents") and (run.root / "latents" / "index.json").exists():
        found["vae_fingerprint"] = read_json(run.root / "latents" / "index.json").get("vae_fingerprint")
    if Run.is_complete(run.model_dir("id_cond")):
        from .identity import ensure_encoder
        found["id_cond_fingerprint"] = module_fingerprint(ensure_encoder(run, "cond", progress=False))
    diff = [k for k, v in found.items() if model.config.get(k) not in (None, v)]
    if diff:
        warnings.warn(f"the model was trained with another {' and '.join(k.split('_fingerprint')[0] for k in diff)} "
                      f"than this run's ({', '.join(diff)} differ): its samples will be wrong. Use the reference "
                      "parts too (reference/<profile>/vae, id_cond) or train the model in this run (notebook 05).")


def student_info(model) -> dict:
    """The ``student`` entry of a student's config: steps, sigmas (steps + 1), cfg_scale (folded in), ..."""
    info = getattr(model, "config", {}).get("student")
    if not info:
        raise CheckpointError("this model is no distilled student (its config has no 'student' entry): load one "
                              "saved by spinmeround_lite.distill, e.g. reference/<profile>/student")
    return info


def load_student(folder: str | os.PathLike, profile: Profile | str, device: str | torch.device = "cpu") -> SpinModel:
    """A saved student (``SpinModel.load`` + its ``student`` entry); a teacher's folder -> ``CheckpointError``."""
    folder = Path(folder)
    if not Run.is_complete(folder):
        raise FileNotFoundError(f"{folder} holds no finished student (no COMPLETE marker): export one with "
                                "python -m spinmeround_lite.distill --export, or train it (notebook 12)")
    model = SpinModel.load(folder, profile, device)
    info = read_json(folder / "config.json").get("student")
    if not info:
        raise CheckpointError(f"{folder} holds a multi-view model but no distilled student (its config.json has no "
                              "'student' entry); point to a folder that spinmeround_lite.distill exported")
    model.config["student"] = info
    return model


def find_student(run: Run) -> tuple[SpinModel | None, str]:
    """The run's student and where it came from: ``reference/<profile>/student`` when the profile uses reference
    checkpoints and the checkout has one, else the run's ``models/student`` when complete, else ``(None, "")``."""
    for folder in (run.reference_dir("student"), run.model_dir("student")):
        if folder is not None and Run.is_complete(folder):
            return load_student(folder, run.profile, run.device), str(folder)
    return None, ""
