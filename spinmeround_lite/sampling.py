"""Samplers for the multi-view model: EDM Euler and Heun on a Karras schedule, with conditioning views,
classifier-free guidance and channel-wise inpainting (METHOD.md section 5; notebooks 06 and 07).

EDM (Karras et al. 2022) writes sampling as the probability-flow ODE with ``sigma(t) = t`` and no scaling::

    dx / dsigma = (x - D(x; sigma)) / sigma                                 (EDM eq. 4, sigma(t) = t, s(t) = 1)

and integrates it from ``sigma_0 = sigma_max`` down to ``sigma_N = 0`` on the Karras schedule::

    sigma_i = (sigma_max^(1/rho) + i / (N - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,   sigma_N = 0

Euler takes one step along ``d = (x - D) / sigma``; Heun (EDM Algorithm 1) corrects it with the slope at the
end of the step, one more evaluation of ``D`` per step but second-order accurate. DPM-Solver++(2M) (Lu et al.
2022, ``solver="dpm2m"``) is second-order with *one* evaluation per step: in ``lambda = -ln sigma`` the ODE's
exact solution is ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} int e^lambda D dlambda``, and the solver
takes ``D`` in that integral as a straight line through the last two denoised values::

    h_i = ln(sigma_i / sigma_{i+1}),   r_i = h_{i-1} / h_i
    D'_i = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1}                 (D'_0 = D_0: the first step is Euler)
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + (1 - sigma_{i+1} / sigma_i) D'_i,     x_N = D_{N-1} at sigma_N = 0

With ``D'_i = D_i`` this is exactly the Euler step, so the two differ only by the extrapolation of ``D``
(``diffusers.EDMDPMSolverMultistepScheduler`` with its defaults takes the same steps: ``tests/test_sampling.py``).

Everything the multi-view model adds lives around that loop, never inside a scheduler class:

* **conditioning views** (``cond`` (B, V, C, h, w), ``mask`` (B, V) bool): their clean latents are written back
  into the state after every update, and ``D`` returns them unchanged, so they never move;
* **classifier-free guidance** (``cfg_denoiser``): ``D = D_u + w (D_c - D_u)``, the unconditional ``D_u`` without
  identity and with zeroed conditioning latents, as the training dropout;
* **channel-wise inpainting** (``ReconstructionGuidance``, ``Replacement``): some channels of a view are known
  (the image latent of the input), the rest (its normal latent) are generated.

Randomness: one ``torch.Generator`` per sample (``generators(seed, n)``); noise is drawn per sample on the CPU
and moved to the device, so a sample depends only on its own seed, not on the batch it was drawn in, nor on
the device.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # D(x (B, ...), sigma (B,)) -> (B, ...)

SIGMA_MIN = 0.002     # released sampler and EDM
SIGMA_MAX = 700.0     # released sampler (EDM: 80); profiles with small training noise use less
RHO = 7.0
SOLVERS = ("euler", "heun", "dpm2m")


# ----------------------------------------------------------------------------------------------
# schedule and randomness
# ----------------------------------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """The Karras et al. noise levels of ``n`` steps: (n + 1,) float64, decreasing, ``sigma_n = 0``.

    ``sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for i < n.
    ``rho = 7`` spends most steps at low noise, where detail is decided.
    """
    if n < 1:
        raise ValueError(f"the sampler needs at least one step, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
    i = torch.arange(n, dtype=torch.float64, device=device)
    frac = i / max(n - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def profile_sigmas(profile, steps: int | None = None, device=None) -> torch.Tensor:
    """``karras_sigmas`` with a profile's step count and noise range (``sample_steps``, ``sample_sigma_*``)."""
    return karras_sigmas(steps or profile.sample_steps,
                         getattr(profile, "sample_sigma_min", SIGMA_MIN),
                         getattr(profile, "sample_sigma_max", SIGMA_MAX), device=device)


def generators(seed: int, n: int) -> list[torch.Generator]:
    """``n`` CPU generators seeded ``seed, seed + 1, ...``: one per sample."""
    return [torch.Generator().manual_seed(int(seed) + k) for k in range(n)]


def randn(shape: Sequence[int], generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise (B, ...) with one generator per sample.

    ``generator``: None (the global RNG), one ``torch.Generator`` (the whole batch from it), or a list of B
    generators (sample b from generator b: independent of batch size and device).
    """
    shape = tuple(shape)
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
        out = torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generator])
    elif generator is not None:
        out = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    else:
        out = torch.randn(shape, dtype=dtype)
    return out.to(device) if device is not None else out


# ----------------------------------------------------------------------------------------------
# conditioning views and inpainting
# ----------------------------------------------------------------------------------------------
def _expand_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View mask (B, V) (or any leading shape of ``like``) -> broadcastable to ``like`` (B, V, C, h, w)."""
    return mask.reshape(*mask.shape, *([1] * (like.ndim - mask.ndim))).to(like.device)


def write_back(x: torch.Tensor, cond: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Set the conditioning views of ``x`` (where ``mask``) to their clean latents ``cond``."""
    if cond is None or mask is None:
        return x
    return torch.where(_expand_mask(mask.bool(), x), cond.to(x.dtype), x)


class Guidance:
    """Channel-wise inpainting hooks of the sampler; the base class changes nothing.

    ``state(x, sigma)`` may change the state before ``D`` is evaluated; ``denoised(D, x, sigma)`` may change
    the prediction of the clean latent ``x0_hat = D(x; sigma)``.
    """

    def state(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x

    def denoised(self, D: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return D


class ReconstructionGuidance(Guidance):
    """Pull the known channels of ``x0_hat`` towards the known latent, as the released sampler does.

    ``x0_hat <- x0_hat - weight * grad_{x0_hat} mean(M * (x0_hat - z)^2)``

    with ``M`` (broadcastable to the state, 1 on the known channels, e.g. the 4 image channels of the 8) and
    ``z`` the known latent. The mean divides by the element count ``n`` of the state, so the step on a known
    channel is ``x0_hat <- x0_hat - (2 weight / n)(x0_hat - z)``: the released ``weight = 1e5`` meant a step of
    ``2e5 / (8 * 64 * 64) = 6.1`` for one 64x64 latent. ``step`` sets that factor ``eta = 2 weight / n``
    directly, independent of the latent size (``eta = 1`` puts ``x0_hat`` exactly on ``z``; ``eta > 2``
    overshoots and can diverge).
    """

    def __init__(self, known: torch.Tensor, channel_mask: torch.Tensor, weight: float | None = 1e5,
                 step: float | None = None):
        if (weight is None) == (step is None):
            raise ValueError("give either weight (released form) or step (eta = 2 weight / n), not both")
        self.known, self.channel_mask, self.weight, self.step = known, channel_mask, weight, step

    def denoised(self, D, x, sigma):
        known, M = self.known.to(D), self.channel_mask.to(D)
        with torch.enable_grad():
            x0 = D.detach().clone().requires_grad_(True)
            loss = (M * (x0 - known) ** 2).mean()                    # mean(M * (x0_hat - z)^2)
            (grad,) = torch.autograd.grad(loss, x0)
        weight = self.weight if self.step is None else self.step * D.numel() / 2
        return D - weight * grad                                      # one gradient step on x0_hat


RELEASED_WEIGHT = 1e5                      # gradient weight of the released normal sampler
RELEASED_NUMEL = 8 * 64 * 64               # one 8-channel 64x64 latent: the mean's divisor there
RELEASED_STEP = 2 * RELEASED_WEIGHT / RELEASED_NUMEL   # eta of the released sampler, about 6.1


def stable_inpaint_step(sigmas: torch.Tensor, target: float = RELEASED_STEP) -> float:
    """The released step ``eta`` (about 6.1), capped where it would blow up on this schedule.

    At low noise ``D(x) ~ x``, so a known channel's error ``e`` after one step of ratio ``r = sigma_{i+1} / sigma_i``
    is about ``((1 - eta)(1 - r) + r) e``; it stays bounded while ``eta < 1 + (1 + r) / (1 - r)``. Few steps mean
    small ``r`` (4 steps: the bound is about 2), so the released value diverges there (notebook 06 shows it);
    with 50 steps on 0.002 .. 80 the bound is about 5.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64)
    s = s[s > 0]
    if len(s) < 2:
        return min(target, 1.0)
    r = float((s[1:] / s[:-1]).min())
    return float(min(target, 1.0 + (1.0 + r) / (1.0 - r)))


class Replacement(Guidance):
    """Plain replacement: before every step, overwrite the known channels of the state by ``z + sigma * eps``.

    The known channels then follow a noisy copy of ``z``; the generated channels see it but are never told
    how they should agree with it (the weakness reconstruction guidance addresses).
    """

    def __init__(self, known: torch.Tensor, channel_mask: torch.Tensor, generator=None):
        self.known, self.channel_mask, self.generator = known, channel_mask, generator

    def state(self, x, sigma):
        M = self.channel_mask.to(x).expand_as(x) > 0
        noised = self.known.to(x) + sigma * randn(x.shape, self.generator, x.device, x.dtype)
        return torch.where(M, noised, x)


# ----------------------------------------------------------------------------------------------
# classifier-free guidance
# ----------------------------------------------------------------------------------------------
def cfg_denoiser(model, cond: torch.Tensor, mask: torch.Tensor, rays: torch.Tensor,
                 id_emb: torch.Tensor | None, scale: float = 1.0) -> DenoiseFn:
    """``D(x, sigma)`` of the multi-view model with classifier-free guidance.

    ``D = D_u + scale * (D_c - D_u)`` with
    ``D_c = model.denoise(x, sigma, cond, mask, rays, id_emb)`` and the unconditional ``D_u`` as the training
    dropout makes it: no identity (``id_emb = None``, the empty prompt) and conditioning latents set to zero.
    Shapes: cond (B, V, 8, h, w), mask (B, V) bool, rays (B, V, 144, h, w), id_emb (B, 512) or None.
    Conditioning views come back as their clean latents in either case.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(cond)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        d_c = model.denoise(x, sigma, cond, mask, rays, id_emb)
        if scale == 1.0:
            return d_c
        x_u = torch.where(_expand_mask(mask, x), zeros.to(x.dtype), x)
        d_u = model.denoise(x_u, sigma, zeros, mask, rays, None)
        d = d_u + scale * (d_c - d_u)
        return write_back(d, cond, mask)

    return denoise


# ----------------------------------------------------------------------------------------------
# counting the work: network calls and view evaluations
# ----------------------------------------------------------------------------------------------
class NetworkCounter:
    """Counts what the network really computes: calls of its forward and the views they carry.

    A forward pre-hook on the model's network (``model.unet``, the multi-view UNet that takes (B, V, C, h, w); a
    module without one is hooked itself) adds 1 call and ``B * V`` view evaluations per forward, whatever asked
    for it (a sampler, guidance, a test). Classifier-free guidance therefore counts twice per step, and
    conditioning views count as well: the network computes them too. ``phase(name)`` files the counts of a block
    under ``name`` (the steps A, B, C of a spin)::

        with NetworkCounter(model) as counter:
            with counter.phase("B"):
                ...                                       # counter.phases["B"] == {"calls": .., "view_evaluations": ..}
        counter.totals()                                  # {"calls": .., "view_evaluations": ..}
    """

    def __init__(self, model):
        net = getattr(model, "unet", None)
        self.module = net if isinstance(net, torch.nn.Module) else model
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(f"cannot count the calls of a {type(model).__name__}: it is no torch module and has "
                            "no .unet module")
        self.calls, self.view_evaluations = 0, 0
        self.phases: dict[str, dict[str, int]] = {}
        self._phase: str | None = None
        self._handle = None

    def _hook(self, module, args, kwargs=None):
        x = args[0] if args else next(iter((kwargs or {}).values()))
        views = int(x.shape[0]) * (int(x.shape[1]) if x.ndim == 5 else 1)
        self.calls += 1
        self.view_evaluations += views
        if self._phase is not None:
            p = self.phases.setdefault(self._phase, {"calls": 0, "view_evaluations": 0})
            p["calls"] += 1
            p["view_evaluations"] += views

    def __enter__(self) -> "NetworkCounter":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Count the calls inside the block under ``name`` (as well as in the totals)."""
        before, self._phase = self._phase, name
        self.phases.setdefault(name, {"calls": 0, "view_evaluations": 0})
        try:
            yield self
        finally:
            self._phase = before

    def totals(self) -> dict[str, int]:
        return {"calls": self.calls, "view_evaluations": self.view_evaluations}

    def report(self) -> dict:
        """``{"A": {...}, "B": {...}, ..., "total": {"calls", "view_evaluations"}}``."""
        return {**{k: dict(v) for k, v in self.phases.items()}, "total": self.totals()}


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(denoise_fn: DenoiseFn, shape: Sequence[int], sigmas: torch.Tensor, generator=None,
           solver: str = "euler", cond: torch.Tensor | None = None, mask: torch.Tensor | None = None,
           guidance: Guidance | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
           s_tmax: float = float("inf"), s_noise: float = 1.0, device=None, dtype=torch.float32,
           progress: bool = False, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           x_init: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE from pure noise to a clean latent ``x0`` of ``shape`` (B, ...).

    denoise_fn(x (B, ...), sigma (B,)) -> D (B, ...): the denoiser (e.g. ``cfg_denoiser(...)``).
    sigmas (N + 1,): noise levels ending at 0 (``karras_sigmas``). generator: see ``randn``.
    solver: ``"euler"`` (1 evaluation per step), ``"heun"`` (2, the last step 1) or ``"dpm2m"``
    (DPM-Solver++(2M): 1 evaluation per step, second order; deterministic, so no churn).
    cond (B, V, C, h, w), mask (B, V) bool: conditioning views, written back every step.
    guidance: channel-wise inpainting hooks (``ReconstructionGuidance``, ``Replacement``).
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (0 = the deterministic ODE, the default).
    callback(i, x, D) after every step (for pictures of the trajectory).
    x_init (B, ...): start from this state at ``sigmas[0]`` instead of noise (a piece of a trajectory, as the
    distillation's teacher integrates it: ``distill.py``).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver == "dpm2m" and s_churn > 0:
        raise ValueError("dpm2m is a deterministic multistep solver: use s_churn=0 (churn needs euler or heun)")
    sig = [float(s) for s in sigmas]
    if sig[-1] != 0.0 or any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError("sigmas must decrease strictly and end at 0 (use karras_sigmas)")
    if device is None:
        device = cond.device if cond is not None else "cpu"
    guidance = guidance or Guidance()
    n_steps = len(sig) - 1
    B = shape[0]

    def D(x: torch.Tensor, s: float) -> torch.Tensor:
        d = denoise_fn(x, torch.full((B,), s, device=device, dtype=dtype))
        d = guidance.denoised(d, x, s)
        return write_back(d, cond, mask)              # conditioning views: D is their clean latent

    # Main sampling loop: x_0 ~ N(0, sigma_0^2 I), conditioning views clean.
    if x_init is not None:
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, the sample {tuple(shape)}")
        x_next = write_back(x_init.to(device, dtype), cond, mask)
    else:
        x_next = write_back(randn(shape, generator, device, dtype) * sig[0], cond, mask)
    steps = tqdm(range(n_steps), desc=f"{solver} sampling", leave=False) if progress else range(n_steps)
    d_prev, h_prev = None, None                        # dpm2m: the previous denoised value and step in lambda
    for i in steps:
        s_cur, s_next = sig[i], sig[i + 1]
        x_cur = guidance.state(x_next, s_cur)

        # Increase noise temporarily (churn): sigma_hat = sigma_i (1 + gamma).
        gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= s_cur <= s_tmax else 0.0
        s_hat = s_cur * (1 + gamma)
        x_hat = x_cur
        if gamma > 0:
            eps = randn(shape, generator, device, dtype)
            x_hat = write_back(x_cur + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * eps, cond, mask)

        # Euler step: d_i = (x_hat - D(x_hat; sigma_hat)) / sigma_hat, x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d_i.
        denoised = D(x_hat, s_hat)
        d_cur = (x_hat - denoised) / s_hat
        x_next = x_hat + (s_next - s_hat) * d_cur

        # DPM-Solver++(2M): the same step with D extrapolated linearly in lambda = -ln sigma from D_{i-1} and D_i;
        # first order on the first step and on the last one (to sigma = 0, where h is infinite).
        if solver == "dpm2m":
            if s_next > 0:
                h = math.log(s_hat / s_next)
                d_eff = denoised
                if d_prev is not None:
                    r = h_prev / h
                    d_eff = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * d_prev
                x_next = (s_next / s_hat) * x_hat + (1 - s_next / s_hat) * d_eff
                d_prev, h_prev = denoised, h
            else:
                x_next = denoised

        # Apply 2nd order correction (Heun): average the slopes at both ends; none on the last step to sigma = 0.
        if solver == "heun" and s_next > 0:
            x_next = guidance.state(x_next, s_next)
            denoised = D(x_next, s_next)
            d_prime = (x_next - denoised) / s_next
            x_next = x_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)

        # Conditioning views: write their clean latents back.
        x_next = write_back(x_next, cond, mask)
        if callback is not None:
            callback(i, x_next, denoised)
    return x_next


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of embeddings (..., D) at ``t`` in [0, 1]; unit norm in, unit norm out."""
    a_n = torch.nn.functional.normalize(a, dim=-1)
    b_n = torch.nn.functional.normalize(b, dim=-1)
    cos = (a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    out = torch.where(so > 1e-6,
                      (torch.sin((1 - t) * omega) * a_n + torch.sin(t * omega) * b_n) / so.clamp_min(1e-12),
                      (1 - t) * a_n + t * b_n)
    return torch.nn.functional.normalize(out, dim=-1)
