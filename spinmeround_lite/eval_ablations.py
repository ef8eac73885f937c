"""The ablation models: trained here with the ablation's budget and trainer options, or taken from the reference.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoints import CheckpointError
from .runs import Run, read_json

# Ablations of the paper and the trainer options that make each one (``train.train(run, **options)``).
ABLATIONS = {
    "no_input_image": {"cond_views": 0},
    "no_identity": {"use_identity": False},
    "no_normals": {"image_only": True},
}


class AblationUnavailable(RuntimeError):
    """An ablation cannot be trained here (the trainer lacks an option) and has no reference checkpoint."""


def trainer_options_missing(options: dict) -> list[str]:
    """Which keyword options ``train.train`` does not accept (the ablations need them)."""
    import inspect

    from .train import train
    sig = inspect.signature(train)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return []
    return [k for k in options if k not in sig.parameters]


def ablation_steps(run: Run) -> int:
    return int(run.profile.ablation_steps)


def ensure_ablation(run: Run, name: str, progress: bool = True) -> tuple[object, str]:
    """The model of ablation ``name`` (``ABLATIONS``, or ``"full_same_budget"``) and where it came from.

    ``reference/<profile>/ablation_<name>`` when the profile uses reference checkpoints and the checkout has
    one (source ``"reference"``); else ``models/ablation_<name>`` of the run, trained now when missing with
    ``profile.ablation_steps`` steps and the ablation's trainer options (source ``"trained"``).
    ``AblationUnavailable`` says why when the trainer cannot make it.
    """
    from .model import SpinModel

    options = {} if name == "full_same_budget" else ABLATIONS[name]
    folder_name = f"ablation_{name}"
    ref = run.reference_dir(folder_name)
    if ref is not None:
        model = SpinModel.load(ref, run.profile, run.device)
        check_ablation_config(model, options, ref, name)
        return model, "reference"
    folder = run.model_dir(folder_name)
    steps = ablation_steps(run)
    if not Run.is_complete(folder) or _logged_steps(folder) != steps:
        missing = trainer_options_missing(options)
        if missing:
            raise AblationUnavailable(
                f"train.train() has no option {', '.join(repr(m) for m in missing)} (needed for '{name}': "
                f"{options}) and reference/{run.profile.name}/{folder_name} is absent")
        from .train import train
        train(run, steps=steps, out=folder, progress=progress, grids=False, **options)
    model = SpinModel.load(folder, run.profile, run.device)
    check_ablation_config(model, options, folder, name)
    return model, "trained"


def check_ablation_config(model, options: dict, folder, name: str) -> None:
    """The checkpoint's config must record the ablation's trainer options (a plain model is no ablation)."""
    wrong = {k: model.config.get(k, "<not recorded>") for k, v in options.items() if model.config.get(k) != v}
    if wrong:
        raise CheckpointError(f"{folder} is not the '{name}' ablation: its config has {wrong}, the ablation needs "
                              f"{options}; delete it to train it again")


def _logged_steps(folder: Path) -> int | None:
    p = Path(folder) / "log.json"
    try:
        return int(read_json(p).get("steps")) if p.exists() else None
    except (ValueError, TypeError):
        return None


def trained_steps(model) -> int | None:
    """Optimizer steps behind a ``SpinModel`` checkpoint (its config's ``step``), None if it does not say."""
    step = getattr(model, "config", {}).get("step")
    return int(step) if step is not None else None


def describe_source(source: str, model=None) -> str:
    """``"trained, 12 steps"``, ``"reference, 150 steps"``: where a model came from and its training budget."""
    steps = trained_steps(model) if model is not None else None
    return source if steps is None else f"{source}, {steps} steps"
