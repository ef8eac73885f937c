"""EDM (Karras et al. 2022) as SpinMeRound trains it: preconditioning, noise levels, loss weight, loss.

Notebook 05 explains it; METHOD.md section 4 gives the equations. With ``s`` the noise level sigma and
``sd`` the data standard deviation sigma_data, the denoiser is

    D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))

    c_skip  = sd^2 / (s^2 + sd^2)
    c_out   = +- s sd / sqrt(s^2 + sd^2)        (+ for EDM's F-prediction, - for v-prediction)
    c_in    = 1 / sqrt(s^2 + sd^2)
    c_noise = ln(s) / 4

Training draws ``ln s ~ N(P_mean, P_std^2)`` and weighs the squared error by
``lambda(s) = (s^2 + sd^2) / (s sd)^2 = 1 / c_out^2``, so every noise level contributes a loss of the same
scale (the loss is exactly the squared error of F against its target). SpinMeRound shifts the log-SNR
(SNR = sd^2 / s^2) by ``-log(N)`` for N generated views (CAT3D, after "simple diffusion"): many views of one
object carry redundant signal, so each needs more noise to be hidden equally well. On sigma this is
``s -> s sqrt(N)``, i.e. ``P_mean -> P_mean + 0.5 ln N`` (+0.97 for the paper's N = 7).

Prediction. The released model uses v-prediction with ``sd = 1``. With ``sd = 1`` the only difference from
EDM's F-prediction is the sign of ``c_out`` (the v target is ``-1`` times the F target), so trained from scratch
both give the same model up to the sign of the last layer. This course uses **v-prediction**, so its
preconditioning is the released model's and a network ported from it (or from an SD2-style v-model) plugs in
unchanged. Both are implemented (``prediction="v"`` or ``"F"``) and tested.

Shapes: ``sigma`` is ``(B,)``; latents are ``(B, V, C, h, w)``; the coefficients broadcast as ``(B, 1, 1, 1, 1)``.
"""

from __future__ import annotations

import math

import torch

PREDICTIONS = ("v", "F")

P_MEAN = -1.2       # EDM's mean of ln sigma for training
P_STD = 1.2         # EDM's standard deviation of ln sigma
SIGMA_DATA = 1.0    # latents are scaled to unit variance (latents.py), so sd = 1 as in the released model


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA, prediction: str = "v"):
    """Preconditioning ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` (any shape, > 0)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    s, sd = torch.as_tensor(sigma, dtype=torch.float32), float(sigma_data)
    sign = -1.0 if prediction == "v" else 1.0
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = sign * s * sd / (s**2 + sd**2).sqrt()
    c_in = 1.0 / (s**2 + sd**2).sqrt()
    c_noise = s.log() / 4
    return c_skip, c_out, c_in, c_noise


def precondition(x: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA,
                 prediction: str = "v") -> torch.Tensor:
    """``D = c_skip x + c_out F`` for noisy ``x`` and network output ``F`` (B, ...), ``sigma`` (B,)."""
    c_skip, c_out, _, _ = edm_coefficients(sigma, sigma_data, prediction)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return c_skip.view(shape) * x + c_out.view(shape) * F.float()


def log_snr_shift(n_targets) -> torch.Tensor:
    """The shift of ln sigma for ``n_targets`` generated views: ``0.5 ln N`` (log-SNR moves by ``-ln N``)."""
    return 0.5 * torch.log(torch.as_tensor(n_targets, dtype=torch.float32).clamp_min(1.0))


def sample_training_sigma(n: int, P_mean: float = P_MEAN, P_std: float = P_STD, n_targets=7, shift: bool = True,
                          generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Draw ``n`` training noise levels ``(n,)``: ``ln s = P_mean + P_std * eps (+ 0.5 ln N)``, ``eps ~ N(0, 1)``.

    ``n_targets`` (an int or an ``(n,)`` tensor) is N, the number of generated views of each sample.
    """
    eps = torch.randn(n, generator=generator, device=generator.device if generator is not None else device)
    ln_sigma = P_mean + P_std * eps
    if shift:
        ln_sigma = ln_sigma + log_snr_shift(n_targets).to(eps.device)
    return ln_sigma.exp().to(device)


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """EDM's loss weight ``lambda(s) = (s^2 + sd^2) / (s sd)^2`` (= 1 / c_out^2)."""
    s = torch.as_tensor(sigma, dtype=torch.float32)
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def edm_loss(D: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, target_mask: torch.Tensor,
             sigma_data: float = SIGMA_DATA, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted denoising loss on target views only.

    D, x0: (B, V, C, h, w) denoised and clean latents; sigma: (B,); target_mask: (B, V) bool, True = view to
    generate. Returns ``sum_b sum_{v target} lambda(s_b) ||D - x0||^2 / (number of target elements)``: the mean
    over every target latent element of the batch (samples with more targets weigh more, as each view counts once).
    ``weight`` (B, V, 1 or C, h, w), optional: a per-element weight of the squared error (``face_weights``: the
    face region of a view counts more); None = 1 everywhere, the paper's loss.
    """
    if D.shape != x0.shape or D.ndim != 5:
        raise ValueError(f"D and x0 must both be (B, V, C, h, w); got {tuple(D.shape)} and {tuple(x0.shape)}")
    B, V = D.shape[:2]
    if target_mask.shape != (B, V):
        raise ValueError(f"target_mask must be (B, V) = {(B, V)}, got {tuple(target_mask.shape)}")
    m = target_mask.to(torch.float32)
    if m.sum() == 0:
        raise ValueError("edm_loss: no target view in the batch (every view is a conditioning view)")
    w = loss_weight(sigma, sigma_data).to(D.device)                    # (B,)
    err = (D.float() - x0.float()) ** 2
    if weight is not None:
        err = err * weight.to(err.device, torch.float32)
    per_view = err.mean(dim=(2, 3, 4))                                # (B, V)
    return (w[:, None] * per_view * m).sum() / m.sum()


def predicted_ln_sigma_mean(P_mean: float = P_MEAN, n_targets: int = 7, shift: bool = True) -> float:
    """The mean of ln sigma that ``sample_training_sigma`` should show: ``P_mean (+ 0.5 ln N)``."""
    return P_mean + (0.5 * math.log(max(n_targets, 1)) if shift else 0.0)
