"""Metrics of the evaluation protocol on inputs whose answer is known or computed independently here."""

import itertools
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spinmeround_lite import metrics


def _image(seed=0, n=2, h=24, w=20):
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 3, h + 4, w + 4, generator=g), 5, 1)
    return smooth.clamp(0, 1)


# ------------------------------------------------------------------------------ L2 / PSNR
def test_l2_identical_is_zero_and_offset_is_offset_squared():
    a = _image()
    assert torch.equal(metrics.l2(a, a), torch.zeros(2))
    b = a * 0.5 + 0.1                                          # stays in [0, 1]
    expected = ((a.numpy() - b.numpy()) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(metrics.l2(a, b).numpy(), expected, atol=1e-7)
    c = torch.full((1, 3, 8, 8), 0.3)
    assert metrics.l2(c, c + 0.1).item() == pytest.approx(0.01, abs=1e-7)
    assert metrics.psnr(c, c + 0.1).item() == pytest.approx(20.0, abs=1e-4)


# ------------------------------------------------------------------------------ SSIM
def _ssim_numpy(a, b, win=11, sigma=1.5, k1=0.01, k2=0.03):
    """Reference SSIM: explicit sliding windows (valid positions), Gaussian weights, mean over channels and pixels."""
    win = min(win, a.shape[-1], a.shape[-2])
    x = np.arange(win) - (win - 1) / 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    C1, C2 = k1 ** 2, k2 ** 2
    vals = []
    for ca, cb in zip(a, b):                                   # channels
        pa = np.lib.stride_tricks.sliding_window_view(ca, (win, win))
        pb = np.lib.stride_tricks.sliding_window_view(cb, (win, win))
        mu_a = (pa * w).sum((-1, -2))
        mu_b = (pb * w).sum((-1, -2))
        va = (pa ** 2 * w).sum((-1, -2)) - mu_a ** 2
        vb = (pb ** 2 * w).sum((-1, -2)) - mu_b ** 2
        cov = (pa * pb * w).sum((-1, -2)) - mu_a * mu_b
        s = (2 * mu_a * mu_b + C1) * (2 * cov + C2) / ((mu_a ** 2 + mu_b ** 2 + C1) * (va + vb + C2))
        vals.append(s)
    return float(np.mean(vals))


def test_ssim_identical_is_one():
    a = _image()
    assert torch.allclose(metrics.ssim(a, a), torch.ones(2), atol=1e-5)


@pytest.mark.floats
def test_ssim_of_shifted_image_matches_numpy_reference():
    """float32 SSIM against the float64 reference: measured over images 1-6 and noise 3-8, ATEN_CPU_CAPABILITY=
    default and native, one thread: differences 6e-6 +- 1e-6 (shifted, at most 8e-6) and 2e-6 +- 1e-6 (noisy, at
    most 4e-6); tolerance 1e-4. The shifted image's SSIM 0.22 +- 0.04 (at most 0.30; bound 0.99)."""
    a = _image(1, n=1, h=32, w=28)
    b = torch.roll(a, shifts=(2, -3), dims=(-2, -1))
    got = metrics.ssim(a, b).item()
    ref = _ssim_numpy(a[0].double().numpy(), b[0].double().numpy())
    assert got == pytest.approx(ref, abs=1e-4)
    assert got < 0.99                                          # a shift is not a match
    noisy = (a + 0.2 * torch.rand(a.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert metrics.ssim(a, noisy).item() == pytest.approx(_ssim_numpy(a[0].numpy(), noisy[0].numpy()), abs=1e-4)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


# ------------------------------------------------------------------------------ normals
def test_normal_angle_error_on_known_vectors():
    H = W = 4
    z = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, H, W)
    tilted = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, H, W)    # 45 deg, not unit
    side = torch.tensor([0.0, -1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, H, W)     # 90 deg
    back = -z                                                                     # 180 deg
    assert metrics.normal_angle_error_deg(z, z).item() == pytest.approx(0.0, abs=1e-2)
    assert metrics.normal_angle_error_deg(tilted, z).item() == pytest.approx(45.0, abs=1e-3)
    assert metrics.normal_angle_error_deg(side, z).item() == pytest.approx(90.0, abs=1e-3)
    assert metrics.normal_angle_error_deg(back, z).item() == pytest.approx(180.0, abs=1e-2)
    # half the pixels at 90 deg, the mask keeps only those
    mixed = z.clone()
    mixed[..., :2] = side[..., :2]
    mask = torch.zeros(1, 1, H, W)
    mask[..., :2] = 1
    assert metrics.normal_angle_error_deg(mixed, z).item() == pytest.approx(45.0, abs=1e-3)
    assert metrics.normal_angle_error_deg(mixed, z, mask).item() == pytest.approx(90.0, abs=1e-3)


def test_normal_rgb_round_trip():
    n = torch.nn.functional.normalize(torch.randn(2, 3, 5, 5), dim=1)
    assert torch.allclose(metrics.normal_rgb_to_vec((n + 1) / 2), n, atol=1e-6)


# ------------------------------------------------------------------------------ embeddings
def test_roc_auc_matches_brute_force_pair_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float()          # many ties
    labels = torch.rand(40, generator=g) > 0.6
    pos, neg = scores[labels].tolist(), scores[~labels].tolist()
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    brute = wins / (len(pos) * len(neg))
    assert metrics.roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert metrics.roc_auc(torch.tensor([2.0, 1.0]), torch.tensor([True, False])) == 1.0
    assert math.isnan(metrics.roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))


class _ProjectionEncoder:
    """A stand-in identity encoder: a fixed random projection of the pixels, unit norm."""

    def __init__(self, dim_in, seed=0):
        self.W = torch.randn(dim_in, 16, generator=torch.Generator().manual_seed(seed))

    def embed(self, images):
        return torch.nn.functional.normalize(images.flatten(1) @ self.W, dim=-1)


def test_identity_similarity_is_cosine_of_embeddings():
    a, b = _image(0, n=5, h=8, w=8), _image(1, n=5, h=8, w=8)
    enc = _ProjectionEncoder(3 * 8 * 8)
    assert torch.allclose(metrics.identity_similarity(enc, a, a), torch.ones(5), atol=1e-6)
    ea, eb = enc.embed(a), enc.embed(b)
    expected = (ea * eb).sum(1) / (ea.norm(dim=1) * eb.norm(dim=1))
    assert torch.allclose(metrics.identity_similarity(enc, a, b, batch=2), expected, atol=1e-6)


# ------------------------------------------------------------------------------ LPIPS
def _random_lpips_weights(path, layout="lpips"):
    """Random AlexNet + linear weights, saved as safetensors in the ``lpips`` package's key layout."""
    g = torch.Generator().manual_seed(0)
    state = {}
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    for i, cin, cout, k in [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]:
        w = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5
        b = torch.randn(cout, generator=g) * 0.01
        pre = f"net.slice{slices[i]}.{i}" if layout == "lpips" else f"features.{i}"
        state[f"{pre}.weight"], state[f"{pre}.bias"] = w, b
    for j, c in enumerate((64, 192, 384, 256, 256)):
        key = f"lins.{j}.model.1.weight" if layout == "lpips" else f"lin{j}.weight"
        state[key] = torch.rand(1, c, 1, 1, generator=g)
    save_file(state, str(path))
    return state


def _lpips_reference(state, a, b, layout="lpips"):
    """LPIPS written out again with torch.nn layers, from the saved state."""
    key = (lambda i, s: f"net.slice{ {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}[i] }.{i}") if layout == "lpips" else None
    convs = {}
    for i, (st, pad) in {0: (4, 2), 3: (1, 2), 6: (1, 1), 8: (1, 1), 10: (1, 1)}.items():
        w = state[f"{key(i, 0)}.weight"]
        conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], stride=st, padding=pad)
        conv.weight.data, conv.bias.data = w, state[f"{key(i, 0)}.bias"]
        convs[i] = conv
    net = [convs[0], torch.nn.ReLU(), "tap", torch.nn.MaxPool2d(3, 2), convs[3], torch.nn.ReLU(), "tap",
           torch.nn.MaxPool2d(3, 2), convs[6], torch.nn.ReLU(), "tap", convs[8], torch.nn.ReLU(), "tap",
           convs[10], torch.nn.ReLU(), "tap"]
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):
        x, out = (2 * x - 1 - shift) / scale, []
        for layer in net:
            if layer == "tap":
                out.append(x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + 1e-10))
            else:
                x = layer(x)
        return out

    with torch.no_grad():
        total = torch.zeros(a.shape[0])
        for j, (fa, fb) in enumerate(zip(taps(a), taps(b))):
            wl = state[f"lins.{j}.model.1.weight"].view(-1)
            total += torch.einsum("nchw,c->nhw", (fa - fb) ** 2, wl).mean((1, 2))
    return total


def test_lpips_unavailable_gives_a_reason(tmp_path):
    ok, why = metrics.lpips_available(tmp_path / "nowhere")
    assert not ok and "no LPIPS weights" in why
    save_file({"features.0.weight": torch.zeros(64, 3, 11, 11)}, str(tmp_path / "bad.safetensors"))
    ok, why = metrics.lpips_available(tmp_path)
    assert not ok and "lack" in why and "lins.0" in why
    with pytest.raises(FileNotFoundError, match="no LPIPS weights"):
        metrics.lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), path=tmp_path / "nowhere")


@pytest.mark.floats
def test_lpips_from_local_weights_matches_reference(tmp_path):
    state = _random_lpips_weights(tmp_path / "alex.safetensors")
    ok, where = metrics.lpips_available(tmp_path)
    assert ok, where
    a, b = _image(0, n=3, h=48, w=48), _image(1, n=3, h=48, w=48)
    d = metrics.lpips(a, b, path=tmp_path)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.allclose(metrics.lpips(a, a, path=tmp_path), torch.zeros(3), atol=1e-6)
    assert torch.allclose(d, metrics.lpips(b, a, path=tmp_path), atol=1e-6)          # symmetric
    # measured over image pairs 0-3, ATEN_CPU_CAPABILITY=default and native, one thread: relative difference at
    # most 2e-7 (float32 rounding); d(a, a) exactly 0
    assert torch.allclose(d, _lpips_reference(state, a, b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least"):
        metrics.lpips(a[..., :16, :16], b[..., :16, :16], path=tmp_path)


def test_lpips_accepts_torchvision_key_layout(tmp_path):
    _random_lpips_weights(tmp_path / "w.safetensors", layout="torchvision")
    assert metrics.lpips_available(tmp_path)[0]
    model = metrics.LPIPS.load(tmp_path)
    assert [t.shape[1] for t in model.features(torch.rand(1, 3, 64, 64))] == list(metrics.LPIPS_CHANNELS)
