"""Which model, solver, noise levels and guidance a spin samples with: ``plan_sampler`` (notebook 12)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sampling
from .artifacts import student_info
from .profiles import Profile

SAMPLERS = ("euler", "heun", "dpm2m", "student")


class SamplerError(ValueError):
    """A sampler that does not fit the model or the step count asked for; the message says what to do."""


@dataclass
class SamplerPlan:
    """How a spin samples: ``model`` (the multi-view model or its student), ``solver`` (``sampling.SOLVERS``),
    ``sigmas`` (N + 1,) ending at 0, ``cfg_scale`` for steps B and C (``None``: the profile's; the student's
    guidance is folded into its weights, so 1), ``steps`` N."""
    name: str
    model: object
    solver: str
    sigmas: torch.Tensor
    cfg_scale: float | None
    steps: int


def sampler_sigmas(profile: Profile, sampler: str, steps: int | None = None) -> torch.Tensor:
    """The noise levels of ``steps`` steps of ``sampler`` (euler, heun, dpm2m): the profile's Karras schedule
    (``profile.sample_sigma_min`` .. ``sample_sigma_max``, rho 7); ``dpm2m`` uses ``profile.dpm_rho`` and
    ``profile.dpm_sigma_min``, chosen by measurement (notebook 12, ``tools/few_steps.py``)."""
    n = int(steps or profile.sample_steps)
    if sampler == "dpm2m":
        return sampling.karras_sigmas(n, profile.dpm_sigma_min, profile.sample_sigma_max, profile.dpm_rho)
    return sampling.profile_sigmas(profile, n)


def plan_sampler(parts, sampler: str = "euler", steps: int | None = None,
                 cfg_scale: float | None = None) -> SamplerPlan:
    """Resolve ``sampler`` for ``parts``: the model, solver, schedule and guidance of a spin.

    ``euler``, ``heun``, ``dpm2m``: the multi-view model with that solver, ``steps`` (default: the profile's) and
    classifier-free guidance. ``student``: the distilled model of ``parts.student`` with the step count and noise
    levels it was trained for and no separate guidance (it is folded in). Errors (``SamplerError``) name what does
    not fit: an unknown sampler, a student that is missing, a step count the student was not trained for, a
    guidance scale other than the one folded into it.
    """
    if sampler not in SAMPLERS:
        raise SamplerError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if steps is not None and int(steps) < 1:
        raise SamplerError(f"steps must be at least 1, got {steps}")
    P = parts.profile
    if sampler != "student":
        n = int(steps or P.sample_steps)
        return SamplerPlan(sampler, parts.model, sampler, sampler_sigmas(P, sampler, n), cfg_scale, n)

    if parts.student is None:
        raise SamplerError(
            f"no distilled student for the {P.name} profile: it is looked for in reference/{P.name}/student and in "
            f"the run's models/student. Train one (python -m spinmeround_lite.distill --profile {P.name}, notebook "
            "12) or choose --sampler euler, heun or dpm2m.")
    info = student_info(parts.student)
    k = int(info["steps"])
    if steps is not None and int(steps) != k:
        raise SamplerError(f"the student was distilled to sample in exactly {k} steps, not {steps}: leave --steps "
                           f"out (or give --steps {k}), or use --sampler euler, heun or dpm2m for {steps} steps")
    folded = float(info["cfg_scale"])
    if cfg_scale is not None and abs(float(cfg_scale) - folded) > 1e-6:
        raise SamplerError(f"the student has classifier-free guidance {folded:g} folded into its weights; it cannot "
                           f"sample with scale {cfg_scale:g}. Leave --cfg-scale out, or use another sampler")
    return SamplerPlan("student", parts.student, "euler", torch.tensor(info["sigmas"], dtype=torch.float64), 1.0, k)
