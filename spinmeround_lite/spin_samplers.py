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
    guidance is folded into its weights, so 1), ``steps`` N; ``sigmas_a``: step A's noise levels (``None``: the
    profile's schedule of N steps, or the released DDPM one where the profile says so)."""
    name: str
    model: object
    solver: str
    sigmas: torch.Tensor
    cfg_scale: float | None
    steps: int
    sigmas_a: torch.Tensor | None = None


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
        sig = sampler_sigmas(P, sampler, n)
        return SamplerPlan(sampler, parts.model, sampler, sig, cfg_scale, n,
                           sigmas_a=None if sampler in ("euler", "heun") else sig)

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
    sig = torch.tensor(info["sigmas"], dtype=torch.float64)
    return SamplerPlan("student", parts.student, "euler", sig, 1.0, k, sigmas_a=student_step_a_sigmas(sig))


def student_step_a_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Step A's noise levels for a student of schedule ``sigmas`` (k + 1,): every other level and the last
    (80, 1.12, 0 of the 4-step 80, 5, 1.12, 0.25, 0), so step A costs ceil(k / 2) calls.

    Step A samples one view with its image known and no guidance (one call a step, where steps B and C evaluate 8
    views a call): the 20-step spin spends 20 of its view evaluations there, and the student's own 4 steps would
    put a fast spin just over a tenth of them. Measured on the 16 held-out heads at ``cpu`` (input view, 2 seeds):
    normal error 15.5 deg for the 20-step teacher, 16.1 for the student's 4 levels, 17.7 for these 2, 21.4 for
    80, 5, 0 and 25.4 for one call; the whole spin's figures with it: ``results/cpu/few_steps.json``.
    """
    k = len(sigmas) - 1
    return sigmas[list(range(0, k, 2)) + [k]]
