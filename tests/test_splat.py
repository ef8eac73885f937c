"""Tests of the splatting module: footprint of one Gaussian, compositing, gradients, fitting, files, gsplat."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from spinmeround_lite import cameras as C
from spinmeround_lite import splat as S
from spinmeround_lite.metrics import psnr


def _camera(res, yaw=25.0, pitch=10.0, focal_scale=1.0, dtype=torch.float64):
    K = C.intrinsics(res).to(dtype)
    K[0, 0] *= focal_scale
    K[1, 1] *= focal_scale
    return C.w2c_from_c2w(C.orbit_c2w(yaw, pitch)).to(dtype), K


def _reference_projection(mean, quat, scale, w2c, K):
    """Independent EWA projection: scipy's rotation, the Jacobian written out, J W Sigma W^T J^T + 0.3 I."""
    w, x, y, z = quat.tolist()
    R = torch.tensor(Rotation.from_quat([x, y, z, w]).as_matrix(), dtype=torch.float64)   # scalar-last
    Sigma = R @ torch.diag(scale.double() ** 2) @ R.T
    Wr, t = w2c[:3, :3].double(), w2c[:3, 3].double()
    pc = Wr @ mean.double() + t
    fx, fy, cx, cy = K[0, 0].double(), K[1, 1].double(), K[0, 2].double(), K[1, 2].double()
    J = torch.tensor([[fx / pc[2], 0, -fx * pc[0] / pc[2] ** 2], [0, fy / pc[2], -fy * pc[1] / pc[2] ** 2]],
                     dtype=torch.float64)
    cov2d = J @ Wr @ Sigma @ Wr.T @ J.T + 0.3 * torch.eye(2, dtype=torch.float64)
    centre = torch.stack([fx * pc[0] / pc[2] + cx, fy * pc[1] / pc[2] + cy])
    return centre, cov2d, pc[2]


def _pixel_grid(h, w):
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    return u, v


@pytest.mark.floats
def test_single_gaussian_footprint_centre_covariance_and_opacity():
    """float64 throughout: the image against the formula to 1e-9; the moments against the analytic correction for
    the cut at alpha = 1/255 (a centre within 0.01 px, the covariance and the opacity within 1 %: what sampling a
    Gaussian on whole pixels leaves, not a measured figure)."""
    res, o = 64, 0.8
    w2c, K = _camera(res)
    mean = torch.tensor([0.03, -0.02, 0.05], dtype=torch.float64)
    quat = torch.nn.functional.normalize(torch.tensor([0.9, 0.2, -0.3, 0.25], dtype=torch.float64), dim=0)
    scale = torch.tensor([0.045, 0.015, 0.025], dtype=torch.float64)
    _, alpha = S.rasterize(mean[None], quat[None], scale[None], torch.tensor([o], dtype=torch.float64),
                           torch.ones(1, 3, dtype=torch.float64), w2c[None], K[None], res, res, backend="torch")
    a = alpha[0, ..., 0]
    centre, cov2d, _ = _reference_projection(mean, quat, scale, w2c, K)
    u, v = _pixel_grid(res, res)

    # the image is exactly o * exp(-0.5 d^T cov2d^-1 d), zero where below 1/255 (opacity recovered pointwise)
    d = torch.stack([u - centre[0], v - centre[1]], -1)
    maha = torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2d), d)
    expected = o * torch.exp(-0.5 * maha)
    expected = expected * (expected >= 1 / 255)
    torch.testing.assert_close(a, expected, atol=1e-9, rtol=1e-7)
    assert a.max() > 0.95 * o                           # the peak is the opacity (the centre is within a pixel)

    # image moments give back the centre and covariance, corrected for the cut at alpha = 1/255
    m = a.sum()
    c_img = torch.stack([(a * u).sum() / m, (a * v).sum() / m])
    du, dv = u - c_img[0], v - c_img[1]
    cov_img = torch.stack([torch.stack([(a * du * du).sum(), (a * du * dv).sum()]),
                           torch.stack([(a * du * dv).sum(), (a * dv * dv).sum()])]) / m
    r2 = 2 * math.log(255 * o)                          # squared Mahalanobis radius of the cut
    kept = 1 - math.exp(-r2 / 2)
    shrink = (1 - math.exp(-r2 / 2) * (1 + r2 / 2)) / kept
    torch.testing.assert_close(c_img, centre, atol=0.01, rtol=0)
    torch.testing.assert_close(cov_img, shrink * cov2d, atol=0, rtol=0.01)
    # the footprint's mass gives back the opacity: sum alpha = o * 2 pi sqrt(det cov2d) * kept
    o_img = m / (2 * math.pi * torch.linalg.det(cov2d).sqrt() * kept)
    assert abs(float(o_img) - o) < 0.01 * o
    ev = torch.linalg.eigvalsh(cov2d)                   # the footprint is a tilted, elongated ellipse,
    assert ev[1] > 2.5 * ev[0] and abs(cov2d[0, 1]) > 1.0   # so a wrong rotation or Jacobian would show


def _naive_render(means, quats, scales, opac, colors, w2c, K, res, bg):
    """Per pixel, every Gaussian, sorted by depth: the compositing equations in their plainest form."""
    u, v = _pixel_grid(res, res)
    items = []
    for i in range(len(means)):
        centre, cov2d, depth = _reference_projection(means[i], quats[i], scales[i], w2c, K)
        d = torch.stack([u - centre[0], v - centre[1]], -1)
        a = opac[i] * torch.exp(-0.5 * torch.einsum("hwi,ij,hwj->hw", d, torch.linalg.inv(cov2d), d))
        a = a.clamp(max=S.ALPHA_MAX)
        items.append((float(depth), a * (a >= 1 / 255), colors[i]))
    T = torch.ones(res, res, dtype=torch.float64)
    img = torch.zeros(res, res, 3, dtype=torch.float64)
    for _, a, c in sorted(items, key=lambda t: t[0]):
        img += (a * T)[..., None] * c
        T = T * (1 - a)
    return img + T[..., None] * bg, 1 - T


def _random_scene(n, spread=0.12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2 * spread
    quats = torch.randn(n, 4, generator=g)
    scales = torch.rand(n, 3, generator=g) * 0.03 + 0.01
    opac = torch.rand(n, generator=g) * 0.7 + 0.25
    colors = torch.rand(n, 3, generator=g)
    return [x.to(dtype) for x in (means, quats, scales, opac, colors)]


@pytest.mark.floats
def test_compositing_matches_naive_and_does_not_depend_on_tiling():
    res = 40
    w2c, K = _camera(res, yaw=-40.0, pitch=-5.0)
    scene = _random_scene(12)
    bg = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ref, ref_a = _naive_render(*scene, w2c, K, res, bg)
    for tile, budget in [(4, 1 << 22), (16, 1 << 22), (2, 64)]:     # the last: tiny budget -> chunked lists
        img, alpha = S.rasterize(*scene, w2c[None], K[None], res, res, backend="torch", background=bg,
                                 tile_size=tile, max_elements=budget)
        torch.testing.assert_close(img[0], ref, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(alpha[0, ..., 0], ref_a, atol=1e-9, rtol=1e-7)
    assert (ref_a > 0.5).sum() > 50                     # the scene covers the image, overlapping


def test_gradcheck_torch_renderer_float64():
    res = 8
    w2c, K = _camera(res, focal_scale=0.3)              # wide view so 8 x 8 pixels see every Gaussian
    w2c2, _ = _camera(res, yaw=-30.0, pitch=0.0)
    viewmats = torch.stack([w2c, w2c2])
    Ks = torch.stack([K, K])
    means, quats, scales, opac, colors = _random_scene(3, spread=0.1, seed=1)
    scales = scales * 3
    bg = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (means, quats, scales, opac, colors)]

    def f(m, q, s, o, c):
        img, alpha = S.rasterize(m, q, s, o, c, viewmats, Ks, res, res, backend="torch", background=bg,
                                 tile_size=4, max_elements=16)  # several tiles, lists in chunks
        return img, alpha

    img, alpha = f(*inputs)
    assert alpha.max() > 0.3 and alpha.min() < alpha.max()
    # fast mode checks random projections of the Jacobian (a few backward passes instead of one per pixel)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.floats
def test_fit_known_gaussians_reaches_30db_on_training_views():
    """Measured over fit seeds 0-5 with scenes 3-8 (150 steps), ATEN_CPU_CAPABILITY=default and native, one thread:
    PSNR over the 8 views 39.0 +- 1.4 dB (at least 37.3; bound 30), the worst view 37.2 +- 1.7 dB (at least 34.8;
    bound 28), the start 15.3 +- 0.5 dB (at most 15.9; bound 25). An unfitted start is 15 dB; half the steps (80)
    reach only 33.0 +- 2.4 dB (worst view 29.3)."""
    torch.manual_seed(0)
    res, V = 32, 8
    means, quats, scales, opac, colors = _random_scene(24, spread=0.15, dtype=torch.float32, seed=3)
    truth = S.GaussianScene(means, torch.nn.functional.normalize(quats, dim=-1), scales * 1.5,
                            opac * 0.3 + 0.7, colors)
    yaw, pitch = C.rig_angles(V)
    c2w = C.orbit_c2w(yaw, pitch)
    K = C.intrinsics(res)
    images, alphas = truth.render_c2w(c2w, K, res, res, backend="torch")
    fit = S.fit_gaussians(images, c2w, K, alphas=alphas, iters=150, n_init=200, backend="torch", device="cpu",
                          progress=False)
    renders, _ = fit.render_c2w(c2w, K, res, res, backend="torch")
    p = psnr(renders.permute(0, 3, 1, 2), images.permute(0, 3, 1, 2))
    assert p.mean() >= 30.0 and p.min() >= 28.0, p
    assert fit.info["history"]["psnr"][0] < 25          # it started far from the views


def test_ply_round_trip_and_layout(tmp_path):
    means, quats, scales, opac, colors = _random_scene(5, dtype=torch.float32)
    scene = S.GaussianScene(means, torch.nn.functional.normalize(quats, dim=-1), scales, opac, colors)
    path = scene.save_ply(tmp_path / "head.ply")
    raw = path.read_bytes()
    header = raw[:raw.index(b"end_header\n")].decode().splitlines()
    props = [h.split()[-1] for h in header if h.startswith("property")]
    assert props == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                     "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert len(raw) - raw.index(b"end_header\n") - len(b"end_header\n") == 5 * len(props) * 4
    back = S.GaussianScene.load_ply(path)
    for a, b in [(back.means, scene.means), (back.scales, scene.scales), (back.opacities, scene.opacities),
                 (back.colors, scene.colors), (back.quats, scene.quats)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    rec = np.frombuffer(raw[raw.index(b"end_header\n") + 11:], dtype=[(p, "<f4") for p in props])
    np.testing.assert_allclose(rec["opacity"], torch.logit(opac).numpy(), rtol=1e-5, atol=1e-5)   # stored as logit
    np.testing.assert_allclose(rec["scale_0"], scales[:, 0].log().numpy(), rtol=1e-5, atol=1e-5)  # stored as log
    assert not list(tmp_path.glob(".*.tmp"))            # written atomically


def test_load_views_reads_the_spin_format_and_names_problems(tmp_path):
    n, h = 3, 8
    rng = np.random.default_rng(0)
    c2w = C.orbit_c2w(torch.tensor([0.0, 90.0, 180.0])).numpy()
    K = C.intrinsics(h).numpy()
    np.savez(tmp_path / "views.npz", rgb=rng.integers(0, 256, (n, h, h, 3), dtype=np.uint8),
             normal=np.full((n, h, h, 3), 128, np.uint8), c2w=c2w, K=K, yaw=np.array([0.0, 90.0, 180.0]),
             pitch=np.zeros(n))
    v = S.load_views(tmp_path)
    assert v["rgb"].shape == (n, 3, h, h) and 0 <= v["rgb"].min() and v["rgb"].max() <= 1
    assert v["K"].shape == (n, 3, 3) and v["alpha"] is None
    torch.testing.assert_close(v["normal"].norm(dim=1), torch.ones(n, h, h))
    small = S.resize_views(v, 4)
    assert small["rgb"].shape == (n, 3, 4, 4) and float(small["K"][0, 0, 0]) == pytest.approx(K[0, 0] / 2)
    with pytest.raises(FileNotFoundError, match="notebook 07"):
        S.load_views(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "views.npz", rgb=np.zeros((n, h, h, 3), np.uint8), K=K)   # no c2w
    with pytest.raises(ValueError, match="c2w"):
        S.load_views(tmp_path / "bad")


def test_contract_checks_shapes_and_backend():
    means, quats, scales, opac, colors = _random_scene(4, dtype=torch.float32)
    w2c, K = _camera(16, dtype=torch.float32)
    with pytest.raises(ValueError, match="quats"):
        S.rasterize(means, quats[:, :3], scales, opac, colors, w2c[None], K[None], 16, 16)
    with pytest.raises(ValueError, match="backend"):
        S.rasterize(means, quats, scales, opac, colors, w2c[None], K[None], 16, 16, backend="vulkan")
    img, alpha = S.rasterize(means, quats, scales, opac, colors, w2c[None], K[None], 16, 12, backend="auto")
    assert img.shape == (1, 12, 16, 3) and alpha.shape == (1, 12, 16, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not S.gsplat_available(), reason="needs gsplat (pip install -e '.[gpu]')")
def test_torch_backend_matches_gsplat_on_gpu():
    """Same scene, both backends, 2 cameras at 64 px. Tolerance: 2e-2 per pixel at most (gsplat versions differ in
    where they cut footprints: 3 sigma boxes in older ones, opacity-aware boxes like ours in newer ones; gsplat
    also stops a pixel at T < 1e-4), and 1e-3 on average; opacities stay below 0.99 where the clamps differ."""
    dev = torch.device("cuda")
    means, quats, scales, opac, colors = [x.to(dev) for x in _random_scene(400, dtype=torch.float32, seed=7)]
    opac = opac.clamp(max=0.95)
    w1, K = _camera(64, dtype=torch.float32)
    w2, _ = _camera(64, yaw=-70.0, pitch=15.0, dtype=torch.float32)
    viewmats, Ks = torch.stack([w1, w2]).to(dev), torch.stack([K, K]).to(dev)
    bg = torch.ones(3, device=dev)
    out_t = S.rasterize(means, quats, scales, opac, colors, viewmats, Ks, 64, 64, backend="torch", background=bg)
    out_g = S.rasterize(means, quats, scales, opac, colors, viewmats, Ks, 64, 64, backend="gsplat", background=bg)
    for a, b in zip(out_t, out_g):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)
        assert (a - b).abs().mean() < 1e-3
    assert out_t[1].max() > 0.9                          # the scene is really there
