"""The samplers on toy latents whose exact denoiser is known (notebook 06 builds the same toys).

For a Gaussian latent ``x0 ~ N(mu, s^2)`` the ideal denoiser is ``D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``
and the probability-flow ODE has the closed-form solution ``x0 = mu + (x_T - mu) s / sqrt(s^2 + sigma_max^2)``.
"""

import math

import pytest
import torch

from spinmeround_lite import sampling
from spinmeround_lite.sampling import (
    ReconstructionGuidance,
    Replacement,
    generators,
    karras_sigmas,
    sample,
    stable_inpaint_step,
)

MU, S = 1.5, 0.5
SIGMA_MAX = 80.0


def gaussian_D(mu=MU, s=S):
    def D(x, sigma):
        s2 = sigma.view(-1, *([1] * (x.ndim - 1))).to(x) ** 2
        return (s * s * x + s2 * mu) / (s * s + s2)
    return D


def mixture_D(pi, mu, s):
    """Exact denoiser of a 1-D Gaussian mixture: posterior-weighted per-component denoisers."""
    pi, mu, s = (torch.tensor(v, dtype=torch.float64) for v in (pi, mu, s))

    def D(x, sigma):
        xs = x.double()[..., None]                                   # (..., K)
        sig2 = sigma.double().view(-1, *([1] * x.ndim)) ** 2          # (B, 1, ..., 1)
        var = s ** 2 + sig2
        logw = torch.log(pi) - 0.5 * torch.log(var) - 0.5 * (xs - mu) ** 2 / var
        w = torch.softmax(logw, dim=-1)
        return (w * (s ** 2 * xs + sig2 * mu) / var).sum(-1).to(x.dtype)
    return D


def test_karras_schedule():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.shape == (11,) and s[0] == pytest.approx(80.0) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert torch.all(s[1:] < s[:-1])
    # rho spaces sigma^(1/rho) evenly
    r = s[:-1] ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9), atol=1e-9)
    with pytest.raises(ValueError):
        karras_sigmas(0)


@pytest.mark.floats
@pytest.mark.parametrize("solver,steps", [("euler", 200), ("heun", 32)])
def test_gaussian_mean_and_variance(solver, steps):
    """128 000 draws. The mean: the noise starts at N(0, sigma_max^2), not N(MU, S^2 + sigma_max^2), so the exact ODE
    ends at MU - MU S / sqrt(S^2 + sigma_max^2) = MU - 0.0094 (analytic), with a standard error S / sqrt(N) = 0.0014:
    the bound 0.02 is that bias plus 7.5 standard errors. The std: the solvers' discretisation bias (Euler 200 steps
    -1.3 %, Heun 32 steps +1.7 %) plus a standard error 1 / sqrt(2 N) = 0.002: the bound 0.03 is 6 standard errors
    past the larger bias. Measured over seeds 0-7 (32 000 draws each), ATEN_CPU_CAPABILITY=default and native, one
    thread: |mean - MU| 0.0101 +- 0.0034 (max 0.016); |std / S - 1| Euler 0.014 +- 0.002, Heun 0.016 +- 0.002 (max
    0.0195); identical on both paths. A too coarse integration fails: Euler 20 steps |std / S - 1| = 0.139 +- 0.002,
    Heun 6 steps 0.71 +- 0.004."""
    x = sample(gaussian_D(), (16000, 8), karras_sigmas(steps, sigma_max=SIGMA_MAX),
               generator=torch.Generator().manual_seed(0), solver=solver)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / S - 1) < 0.03


@pytest.mark.floats
def test_mixture_distribution():
    """40 000 draws (Heun, 32 steps). Standard errors (analytic) and the bounds in them, past the measured bias:
    overall mean 1.67 / sqrt(N) = 0.008 (bound 0.06: the prior-mismatch bias -0.009 plus 6 of them); mode weight
    sqrt(0.21 / N) = 0.0023 (bound 0.02: 8.7); mode means 0.3 / sqrt(12 000) = 0.0027 and 0.5 / sqrt(28 000) =
    0.003 (bound 0.05: over 14); mode stds 1 / sqrt(2 n) = 0.0065 and 0.004 (bound 0.07: 8 past the 0.015 bias).
    Measured over seeds 0-5, ATEN_CPU_CAPABILITY=default and native, one thread (signed): mean -0.009 +- 0.010,
    var ratio - 1 0.014 +- 0.005, weight 0.0026 +- 0.0024, mode means -0.010 +- 0.004 and 0.004 +- 0.0014, mode stds
    0.015 +- 0.008 and 0.011 +- 0.007 (every value within half its bound). A too coarse integration (Euler, 8 steps,
    10 000 draws, seeds 0-7) fails: weight off by 0.070 +- 0.004, mode means by 0.29 and 0.32, var ratio by 0.36."""
    pi, mu, s = (0.3, 0.7), (-2.0, 1.5), (0.3, 0.5)
    x = sample(mixture_D(pi, mu, s), (40000, 1), karras_sigmas(32, sigma_max=SIGMA_MAX),
               generator=torch.Generator().manual_seed(1), solver="heun")
    mean = sum(p * m for p, m in zip(pi, mu))
    var = sum(p * (sd ** 2 + m ** 2) for p, m, sd in zip(pi, mu, s)) - mean ** 2
    assert abs(x.mean().item() - mean) < 0.06
    assert abs(x.var().item() / var - 1) < 0.05
    left, right = x[x < -0.75], x[x >= -0.75]                       # split between the modes
    assert abs(len(left) / len(x) - pi[0]) < 0.02                     # the mode weights survive
    for part, m, sd in ((left, mu[0], s[0]), (right, mu[1], s[1])):  # and each mode's place and width
        assert abs(part.mean().item() - m) < 0.05
        assert abs(part.std().item() / sd - 1) < 0.07


def _ode_error(solver, steps, xT):
    """Largest deviation from the exact ODE solution, same starting noise."""
    sig = karras_sigmas(steps, sigma_max=SIGMA_MAX)
    gen = torch.Generator().manual_seed(3)
    x = sample(gaussian_D(), xT.shape, sig, generator=gen, solver=solver, dtype=torch.float64)
    x_T = torch.randn(xT.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_MAX
    exact = MU + (x_T - MU) * S / math.sqrt(S ** 2 + SIGMA_MAX ** 2)
    return (x - exact).abs().max().item()



def _steps_needed(solver, xT, tol):
    """Smallest step count with error below ``tol`` (bisection; the error falls monotonically past 8 steps)."""
    lo, hi = 8, 2048
    assert _ode_error(solver, hi, xT) < tol
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _ode_error(solver, mid, xT) < tol else (mid + 1, hi)
    return lo


@pytest.mark.floats
def test_heun_needs_fewer_steps_than_euler():
    """The ODE is linear in its starting noise, so in float64 the errors scale with the largest |x_T| of the 256
    draws and their ratio at 64 steps is a constant of the solvers: 12.04 for every seed (bound 5). Steps needed
    for an error below 0.02, over noise seeds 0-5, ATEN_CPU_CAPABILITY=default and native: Euler 222 +- 25 (187 to
    265), Heun 35.7 +- 2 (33 to 39); (Euler / 2) / (2 Heun - 1) = 1.58 +- 0.09, at least 1.44 (bound 1). A Heun
    step that fell back to Euler would need as many steps and fail every line."""
    xT = torch.zeros(256, 1)
    tol = 0.02                              # largest error over samples that start as far out as 3 sigma_max
    need = {solver: _steps_needed(solver, xT, tol) for solver in ("euler", "heun")}
    # Heun's error falls as 1/N^2, Euler's as 1/N: fewer steps and fewer network evaluations for the same error
    assert need["heun"] < need["euler"], need
    assert 2 * need["heun"] - 1 < need["euler"] / 2, need
    assert _ode_error("heun", 64, xT) < _ode_error("euler", 64, xT) / 5


@pytest.mark.floats
@pytest.mark.parametrize("solver,churn", [("euler", 0.0), ("heun", 0.0), ("euler", 5.0)])
def test_conditioning_latents_come_out_unchanged(solver, churn):
    """The generated views' mean: 256 draws of N(1.5, 0.5^2), standard error 0.03; the bound 0.5 only says they
    were denoised at all (noise left at sigma_max would be off by about 5). Measured over seeds 0-7 (noise and
    conditioning), ATEN_CPU_CAPABILITY=default and native: |mean - MU| Euler 0.009 +- 0.005, Heun 0.026 +- 0.016,
    Euler with churn 0.011 +- 0.009 (max 0.046)."""
    B, V, C = 3, 4, 8
    cond = torch.randn(B, V, C, 2, 2, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(B, V, dtype=torch.bool)
    mask[:, 0] = True
    mask[1, 2] = True
    seen = []

    def D(x, sigma):
        seen.append(torch.equal(x[mask], cond[mask]))           # the model sees them clean at every step
        return gaussian_D()(x, sigma)

    x = sample(D, (B, V, C, 2, 2), karras_sigmas(6, sigma_max=SIGMA_MAX), generator=generators(0, B),
               solver=solver, cond=cond, mask=mask, s_churn=churn)
    assert torch.equal(x[mask], cond[mask])
    assert all(seen)
    assert not torch.allclose(x[~mask], cond[~mask])              # the other views were generated
    assert abs(x[~mask].mean().item() - MU) < 0.5


@pytest.mark.parametrize("churn", [0.0, 3.0])
def test_same_seed_same_sample_regardless_of_batch(churn):
    sig = karras_sigmas(8, sigma_max=SIGMA_MAX)
    D = gaussian_D()
    full = sample(D, (4, 3, 5), sig, generator=generators(10, 4), s_churn=churn)
    first = sample(D, (2, 3, 5), sig, generator=generators(10, 2), s_churn=churn)
    last = sample(D, (1, 3, 5), sig, generator=generators(13, 1), s_churn=churn)
    assert torch.equal(full[:2], first)
    assert torch.equal(full[3:], last)
    other = sample(D, (1, 3, 5), sig, generator=generators(99, 1), s_churn=churn)
    assert not torch.allclose(other, last)


def _corr_gaussian():
    """Two channels a, b with correlation 0.9: inpaint b given a = 1.2."""
    mu = torch.tensor([0.5, -0.3])
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]])

    def D(x, sigma):
        A = cov @ torch.linalg.inv(cov + (sigma ** 2).view(-1, 1, 1) * torch.eye(2))
        return mu + (A @ (x - mu)[..., None])[..., 0]
    cond_mean = -0.3 + 0.9 * (1.2 - 0.5)
    cond_std = math.sqrt(1 - 0.81)
    return D, cond_mean, cond_std


@pytest.mark.floats
def test_reconstruction_guidance_follows_the_known_channel():
    """Measured over seeds 0-7, ATEN_CPU_CAPABILITY=default and native, one thread (identical on both paths):
    known channel |mean - 1.2| 1.7e-6 +- 1e-7 and std 4.4e-6 (bounds 0.02 and 0.05); b: |mean - cond_mean|
    0.067 +- 0.009 (max 0.080) and |std / cond_std - 1| 0.091 +- 0.015 (max 0.11). Reconstruction guidance is an
    approximation of the posterior: b's bias (-0.07, std +10 %) stays with more draws (16 000) and more steps (200:
    -0.06, +13 %), so the bounds sit between it and the unguided sampler, which fails: a 0.70 +- 0.014 off, b's mean
    0.63 +- 0.016 off, its std 1.18 +- 0.025 off. Replacement leaves b 0.26 +- 0.004 further from cond_mean than
    guidance does (0.32 +- 0.013 against 0.067)."""
    D, cond_mean, cond_std = _corr_gaussian()
    B = 4000
    z = torch.full((B, 2), 1.2)
    M = torch.tensor([1.0, 0.0])
    sig = karras_sigmas(50, sigma_max=SIGMA_MAX)
    # the released form: weight on the mean's gradient; here n = 2 B elements, so weight = eta * n / 2
    eta = stable_inpaint_step(sig)
    assert 4 < eta < sampling.RELEASED_STEP
    g = ReconstructionGuidance(z, M, weight=eta * z.numel() / 2)
    x = sample(D, (B, 2), sig, generator=torch.Generator().manual_seed(0), guidance=g)
    assert abs(x[:, 0].mean().item() - 1.2) < 0.02 and x[:, 0].std().item() < 0.05   # known channel reached
    assert abs(x[:, 1].mean().item() - cond_mean) < 0.2                              # b follows a
    assert abs(x[:, 1].std().item() / cond_std - 1) < 0.25
    # plain replacement also pins a, but b stays nearer its marginal (mean -0.3, std 1)
    r = sample(D, (B, 2), sig, generator=torch.Generator().manual_seed(0),
               guidance=Replacement(z, M, generator=torch.Generator().manual_seed(1)))
    assert abs(r[:, 0].mean().item() - 1.2) < 0.02
    assert abs(r[:, 1].mean().item() - cond_mean) > abs(x[:, 1].mean().item() - cond_mean)


@pytest.mark.floats
def test_released_step_diverges_with_few_steps_and_the_cap_does_not():
    """wild / tame error ratio over seeds 0-7, ATEN_CPU_CAPABILITY=default and native: 184 +- 4 (179 to 191);
    bound 10."""
    D, _, _ = _corr_gaussian()
    z = torch.full((500, 2), 1.2)
    M = torch.tensor([1.0, 0.0])
    sig = karras_sigmas(4, sigma_max=SIGMA_MAX)
    wild = sample(D, (500, 2), sig, generator=torch.Generator().manual_seed(0),
                  guidance=ReconstructionGuidance(z, M, weight=None, step=sampling.RELEASED_STEP))
    tame = sample(D, (500, 2), sig, generator=torch.Generator().manual_seed(0),
                  guidance=ReconstructionGuidance(z, M, weight=None, step=stable_inpaint_step(sig)))
    assert (wild[:, 0] - 1.2).abs().mean() > 10 * (tame[:, 0] - 1.2).abs().mean()


def test_cfg_denoiser_combines_branches():
    calls = []

    class Toy:
        def denoise(self, x, sigma, cond, mask, rays, id_emb):
            calls.append((id_emb is None, float(cond.abs().sum())))
            out = x * 0 + (1.0 if id_emb is not None else 0.0) + cond.mean()
            return torch.where(mask[..., None, None, None], cond, out)

    cond = torch.ones(1, 2, 8, 2, 2)
    mask = torch.tensor([[True, False]])
    fn = sampling.cfg_denoiser(Toy(), cond, mask, torch.zeros(1, 2, 144, 2, 2), torch.ones(1, 512), scale=3.0)
    d = fn(torch.zeros(1, 2, 8, 2, 2), torch.ones(1))
    # D_c = 1 (identity) + 1 (mean of cond), D_u = 0 + 0 (no identity, zeroed conditioning): 0 + 3 * (2 - 0)
    assert torch.allclose(d[0, 1], torch.full((8, 2, 2), 6.0))
    assert torch.equal(d[0, 0], cond[0, 0])
    assert calls == [(False, cond.abs().sum().item()), (True, 0.0)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        sample(gaussian_D(), (2, 1), karras_sigmas(3), solver="rk4")
    with pytest.raises(ValueError, match="one per sample"):
        sample(gaussian_D(), (2, 1), karras_sigmas(3), generator=generators(0, 3))
    with pytest.raises(ValueError, match="end at 0"):
        sample(gaussian_D(), (2, 1), torch.tensor([3.0, 1.0]))



# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------------
MIX = ((0.3, 0.7), (-2.0, 1.5), (0.3, 0.5))          # weights, means, standard deviations of notebook 06's mixture


def _mixture_solve(solver, steps, n=512, seed=11):
    """The probability-flow ODE of the mixture from the same ``n`` starting points (seed), in float64."""
    return sample(mixture_D(*MIX), (n, 1), karras_sigmas(steps, sigma_max=SIGMA_MAX),
                  generator=torch.Generator().manual_seed(seed), solver=solver, dtype=torch.float64)


@pytest.fixture(scope="module")
def mixture_exact():
    """The ODE's solution from those starting points: Heun with 4096 steps (RMS difference from 2048 steps 2e-6,
    far under the errors measured below)."""
    exact = _mixture_solve("heun", 4096)
    assert (exact - _mixture_solve("heun", 2048)).pow(2).mean().sqrt().item() < 1e-5
    return exact


def _error(x, ref):
    """Median absolute deviation from the ODE's solution: the typical sample's error. (A few starting points lie
    where the flow splits between the two modes; a coarse solver sends those to the other mode, an error of
    about 3.5 that would swamp a mean and hide the order.)"""
    return (x - ref).abs().median().item()


def test_dpm2m_is_second_order_on_the_mixture(mixture_exact):
    err = {n: _error(_mixture_solve("dpm2m", n), mixture_exact) for n in (8, 16, 32)}
    euler = {n: _error(_mixture_solve("euler", n), mixture_exact) for n in (8, 32)}
    slope = math.log(err[8] / err[32]) / math.log(4)
    euler_slope = math.log(euler[8] / euler[32]) / math.log(4)
    # measured over seeds 11-14 (512 starting points each, float64): dpm2m slope 8 -> 32 steps 2.54-2.56 (16 -> 64:
    # 2.36-2.37), euler 1.05-1.11; a solver that lost its second-order term falls to about 1
    assert slope >= 1.7, (err, slope)
    assert euler_slope < 1.3, (euler, euler_slope)
    assert err[16] < err[8] and err[32] < err[16]
    assert err[32] < euler[32] / 3                               # same network calls: 0.011 against 0.049


def test_dpm2m_first_step_is_euler_and_cond_views_stay():
    sig = karras_sigmas(2, sigma_max=SIGMA_MAX)       # two steps: the first has no history, the last goes to 0
    kw = dict(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample(gaussian_D(), (16, 2), sig, solver="dpm2m", **kw)
    kw["generator"].manual_seed(0)
    b = sample(gaussian_D(), (16, 2), sig, solver="euler", **kw)
    assert torch.allclose(a, b, atol=1e-12, rtol=0)                # both steps are Euler's (rounded differently)
    three = karras_sigmas(3, sigma_max=SIGMA_MAX)                  # from the second step on they differ
    a = sample(gaussian_D(), (16, 2), three, generator=torch.Generator().manual_seed(0), solver="dpm2m")
    b = sample(gaussian_D(), (16, 2), three, generator=torch.Generator().manual_seed(0), solver="euler")
    assert (a - b).abs().max() > 1e-3
    cond = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, False, False], [False, True, False]])
    x = sample(gaussian_D(), (2, 3, 4), karras_sigmas(6, sigma_max=SIGMA_MAX), generator=generators(0, 2),
               solver="dpm2m", cond=cond, mask=mask)
    assert torch.equal(x[mask], cond[mask]) and not torch.allclose(x[~mask], cond[~mask])
    with pytest.raises(ValueError, match="deterministic"):
        sample(gaussian_D(), (2, 3), sig, solver="dpm2m", s_churn=1.0)


@pytest.mark.parametrize("steps", [3, 8, 20])
def test_dpm2m_matches_diffusers_edm_dpmsolver(steps):
    """diffusers' ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++, order 2, midpoint, final sigma 0) on the same
    Karras sigmas and the same denoiser takes the same steps."""
    diffusers = pytest.importorskip("diffusers")
    sd = 0.5                                                        # the scheduler's own sigma_data: any value
    sch = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=0.002, sigma_max=SIGMA_MAX, sigma_data=sd, sigma_schedule="karras", rho=7.0,
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", prediction_type="epsilon",
        final_sigmas_type="zero")
    sch.set_timesteps(steps)
    ours = karras_sigmas(steps, sigma_max=SIGMA_MAX)
    assert torch.allclose(sch.sigmas.double(), ours, rtol=1e-5, atol=1e-7)
    D = mixture_D(*MIX)
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(4)) * SIGMA_MAX
    x = x_T.clone()
    for i, t in enumerate(sch.timesteps):
        s = sch.sigmas[i].float()
        d = D(x, s.expand(len(x)))
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        x = sch.step((d - c_skip * x) / c_out, t, x).prev_sample    # the model output that preconditions to d
    mine = sample(D, x_T.shape, ours, generator=torch.Generator().manual_seed(4), solver="dpm2m")
    # float32 on both sides: the largest difference over 3 seeds is below 2e-5 of the spread of the data
    assert torch.allclose(mine, x, atol=1e-4, rtol=1e-4), (mine - x).abs().max()
