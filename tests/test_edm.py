"""EDM preconditioning, noise distribution and loss (edm.py), and SpinModel.denoise (model.py)."""

import math

import pytest
import torch
from torch import nn

from spinmeround_lite import edm
from spinmeround_lite.checkpoints import CheckpointError
from spinmeround_lite.model import SpinModel
from spinmeround_lite.profiles import get_profile


class FixedOutputUNet(nn.Module):
    """Stands in for the UNet: returns a fixed tensor F whatever it is given, and records its inputs."""

    def __init__(self, F: torch.Tensor):
        super().__init__()
        self.F = F
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = {}

    def forward(self, x, c_noise, context):
        self.seen = {"x": x.clone(), "c_noise": c_noise.clone(), "context": context.clone()}
        return self.F + 0 * self.weight


class ConstantContext(nn.Module):
    def forward(self, id_emb, batch_size=1):
        B = batch_size if id_emb is None else id_emb.shape[0]
        v = 0.0 if id_emb is None else 1.0
        return torch.full((B, 77, 4), v)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _inputs(B=3, V=4, h=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, 8, h, h, generator=g)
    cond = torch.randn(B, V, 8, h, h, generator=g)
    rays = torch.randn(B, V, 144, h, h, generator=g)
    mask = torch.zeros(B, V, dtype=torch.bool)
    mask[0, 0] = mask[1, :3] = True                      # 1, 3 and 0 conditioning views
    return x, cond, rays, mask


@pytest.mark.parametrize("prediction", ["v", "F"])
def test_coefficients_match_the_equations(prediction):
    s = torch.tensor([0.002, 0.5, 1.0, 3.0, 80.0])
    sd = 0.7
    c_skip, c_out, c_in, c_noise = edm.edm_coefficients(s, sd, prediction)
    sign = -1 if prediction == "v" else 1
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, sign * s * sd / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(s**2 + sd**2))
    torch.testing.assert_close(c_noise, torch.log(s) / 4)
    # sigma = sigma_data = 1: the textbook numbers
    c = edm.edm_coefficients(torch.tensor(1.0), 1.0, prediction)
    torch.testing.assert_close(torch.stack(c), torch.tensor([0.5, sign / math.sqrt(2), 1 / math.sqrt(2), 0.0]))
    torch.testing.assert_close(edm.loss_weight(s, sd), 1 / c_out**2)
    with pytest.raises(ValueError):
        edm.edm_coefficients(s, sd, "eps")


@pytest.mark.floats
@pytest.mark.parametrize("prediction", ["v", "F"])
def test_denoiser_tends_to_x_as_sigma_goes_to_zero_for_any_output(prediction):
    """Bounds by analysis: |D - x| <= |c_out| max|F| + (1 - c_skip) max|x|, with max|F| about 3.5e3 over these 1536
    draws of 1e3 N(0, 1): about 3.5e-4 at sigma = 1e-7 (bound 1e-3: max|F| would need 10 standard deviations) and
    about 350 at sigma = 0.1 (bound 1)."""
    x, _, rays, mask = _inputs()
    F = 1e3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))   # any network output, even a wild one
    model = SpinModel(FixedOutputUNet(F), ConstantContext(), sigma_data=1.0, prediction=prediction)
    no_cond = torch.zeros_like(mask)
    errs = []
    for s in [1e-1, 1e-3, 1e-5, 1e-7]:
        with torch.no_grad():
            D = model.denoise(x, torch.full((3,), s), torch.zeros_like(x), no_cond, rays, None)
        errs.append(float((D - x).abs().max()))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 and errs[0] > 1.0           # |D - x| <= |c_out| |F| + (1 - c_skip) |x| -> 0


@pytest.mark.floats
@pytest.mark.parametrize("prediction", ["v", "F"])
def test_denoise_is_c_skip_x_plus_c_out_F_with_the_specified_network_input(prediction):
    x, cond, rays, mask = _inputs()
    F = torch.randn_like(x)
    unet = FixedOutputUNet(F)
    model = SpinModel(unet, ConstantContext(), sigma_data=1.0, prediction=prediction)
    sigma = torch.tensor([0.3, 2.0, 15.0])
    D = model.denoise(x, sigma, cond, mask, rays, torch.randn(3, 512))
    c_skip, c_out, c_in, c_noise = (c.view(3, 1, 1, 1, 1) for c in edm.edm_coefficients(sigma, 1.0, prediction))
    m = mask[..., None, None, None]
    # measured difference exactly 0 (seeds 0-5, ATEN_CPU_CAPABILITY=default and native): the same float32 operations
    torch.testing.assert_close(D, torch.where(m, cond, c_skip * x + c_out * F), rtol=0, atol=1e-6)
    net_in = unet.seen["x"]                               # (B, V, 153, h, w)
    assert net_in.shape == (3, 4, 153, 4, 4)
    torch.testing.assert_close(net_in[:, :, :8], torch.where(m, cond, c_in * x))   # clean cond, scaled targets
    torch.testing.assert_close(net_in[:, :, 8:152], rays)
    torch.testing.assert_close(net_in[:, :, 152], mask[..., None, None].float().expand(3, 4, 4, 4))
    torch.testing.assert_close(unet.seen["c_noise"], torch.log(sigma) / 4)
    assert unet.seen["context"].shape == (3, 77, 4) and unet.seen["context"].min() == 1.0
    model.denoise(x, sigma, cond, mask, rays, None)      # no identity: the empty prompt
    assert unet.seen["context"].shape == (3, 77, 4) and unet.seen["context"].abs().max() == 0.0
    drop = torch.tensor([True, False, True])
    model.denoise(x, sigma, cond, mask, rays, torch.randn(3, 512), drop_id=drop)
    assert unet.seen["context"][:, 0, 0].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.floats
def test_v_target_gives_the_clean_latent():
    """With F = v = (n - s x0) / sqrt(1 + s^2) (sd = 1), D(x0 + s n) is exactly x0: the sign convention holds.
    float32 rounding only: measured over draws 1-8, ATEN_CPU_CAPABILITY=default and native, one thread, at most
    4.8e-7 (2.7e-7 +- 0.8e-7); tolerance 1e-5. The wrong sign would be off by about 2 |x0|."""
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(2, 3, 8, 4, 4, generator=g), torch.randn(2, 3, 8, 4, 4, generator=g)
    s = torch.tensor([0.1, 7.0]).view(2, 1, 1, 1, 1)
    v = (n - s * x0) / torch.sqrt(1 + s**2)
    D = edm.precondition(x0 + s * n, v, s.flatten(), 1.0, "v")
    torch.testing.assert_close(D, x0, rtol=0, atol=1e-5)
    D = edm.precondition(x0 + s * n, -v, s.flatten(), 1.0, "F")        # EDM's F target is -v when sd = 1
    torch.testing.assert_close(D, x0, rtol=0, atol=1e-5)


def test_conditioning_views_come_back_unchanged_with_the_real_model():
    torch.manual_seed(0)
    model = SpinModel.from_profile("test").eval()
    h = get_profile("test").latent_res
    x, cond, rays, mask = _inputs(h=h)
    with torch.no_grad():
        D = model.denoise(x, torch.tensor([0.5, 1.0, 4.0]), cond, mask, rays, torch.randn(3, 512))
    assert D.shape == x.shape
    assert torch.equal(D[mask], cond[mask])
    assert not torch.allclose(D[~mask], cond[~mask])


@pytest.mark.floats
@pytest.mark.parametrize("N", [3, 7])
def test_shifted_sigma_has_the_predicted_mean_of_ln_sigma(N):
    """Bounds by analysis: 4 standard errors of the mean (0.0027) and 5.3 of the std (1.2 / sqrt(2 n) = 0.0019).
    Measured over generator seeds 0-7 (N = 7), ATEN_CPU_CAPABILITY=default and native: mean off by 1.0 +- 0.8
    standard errors (at most 2.2), std by 0.0016 +- 0.0013 (at most 0.0044). Without the shift the mean is off by
    0.5 ln N = 0.55 to 0.97, 200 to 360 standard errors."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    ln_s = edm.sample_training_sigma(n, n_targets=N, shift=True, generator=g).log()
    ln_s0 = edm.sample_training_sigma(n, n_targets=N, shift=False, generator=g).log()
    se = 1.2 / math.sqrt(n)                               # standard error of the mean: 0.0027
    assert abs(float(ln_s.mean()) - (-1.2 + 0.5 * math.log(N))) < 4 * se
    assert abs(float(ln_s0.mean()) - (-1.2)) < 4 * se
    assert abs(float(ln_s.std()) - 1.2) < 0.01
    assert edm.predicted_ln_sigma_mean(n_targets=7) == pytest.approx(-1.2 + 0.9730, abs=1e-4)


def test_loss_counts_target_views_only_and_is_the_F_space_error():
    x0, _, _, mask = _inputs()
    g = torch.Generator().manual_seed(3)
    D = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.5, 1.0, 3.0])
    loss = edm.edm_loss(D, x0, sigma, ~mask)
    D2 = D.clone()
    D2[mask] += 100.0                                     # change only the conditioning views
    assert edm.edm_loss(D2, x0, sigma, ~mask) == loss
    # weight * ||D - x0||^2 = ||F - F_target||^2 with D - x0 = c_out (F - F_target)
    _, c_out, _, _ = edm.edm_coefficients(sigma, 1.0, "v")
    dF = (D - x0) / c_out.view(3, 1, 1, 1, 1)
    per_view = (dF**2).mean(dim=(2, 3, 4))
    torch.testing.assert_close(loss, per_view[~mask].mean())
    with pytest.raises(ValueError, match="no target view"):
        edm.edm_loss(D, x0, sigma, torch.zeros_like(mask))


def test_loss_weight_of_ones_changes_nothing_and_a_weighted_region_counts_more():
    x0, _, _, mask = _inputs()
    g = torch.Generator().manual_seed(4)
    D = x0 + 0.1 * torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([0.5, 1.0, 3.0])
    B, V, _, h, w = x0.shape
    ones = torch.ones(B, V, 1, h, w)
    torch.testing.assert_close(edm.edm_loss(D, x0, sigma, ~mask, weight=ones), edm.edm_loss(D, x0, sigma, ~mask))
    region = ones.clone()
    region[..., : h // 2, :] = 5.0                        # the top half counts 5 times
    D_top, D_bottom = x0.clone(), x0.clone()
    D_top[..., : h // 2, :] += 0.1                        # the same error, in the weighted half or the other
    D_bottom[..., h // 2:, :] += 0.1
    assert edm.edm_loss(D_top, x0, sigma, ~mask) == pytest.approx(float(edm.edm_loss(D_bottom, x0, sigma, ~mask)))
    weighted_top = float(edm.edm_loss(D_top, x0, sigma, ~mask, weight=region))
    assert weighted_top == pytest.approx(5 * float(edm.edm_loss(D_bottom, x0, sigma, ~mask, weight=region)))


def test_checkpoint_round_trip_and_other_profile_is_refused(tmp_path):
    torch.manual_seed(0)
    model = SpinModel.from_profile("test")
    model.save(tmp_path / "m")
    back = SpinModel.load(tmp_path / "m", "test")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    other = get_profile("test").replace(unet_channels=(16, 16))
    with pytest.raises(CheckpointError, match="unet_channels"):
        SpinModel.load(tmp_path / "m", other)
