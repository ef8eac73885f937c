"""The released SpinMeRound model in the course, checked without its weights.

``tests/fixtures/released_tiny.safetensors`` holds numbers the released code itself computed
(``tools/make_released_fixture.py``): a tiny ``MultiViewUNetModel`` with random weights, its outputs on fixed
inputs, the ray maps of fixed cameras, and the full-size UNet's key shapes.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from spinmeround_lite import cameras, raymaps
from spinmeround_lite import released as R

FIXTURE = Path(__file__).parent / "fixtures" / "released_tiny.safetensors"

pytestmark = pytest.mark.floats        # rerun under other float paths by `make test` (portability guard)


class Opaque:
    """An object a weights-only load must refuse (Lightning checkpoints hold such hyper-parameters)."""


@pytest.fixture(scope="module")
def fx():
    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}
    scales = json.loads(meta["weight_scales"])
    weights = {k[len("weights."):]: v.float() * 2.0 ** -scales[k[len("weights."):]]
               for k, v in t.items() if k.startswith("weights.")}
    H, W = json.loads(meta["grid"])
    return {"t": t, "meta": meta, "cfg": json.loads(meta["tiny_config"]), "weights": weights, "H": H, "W": W,
            "B": int(meta["batch"]), "V": int(meta["views"])}


@pytest.fixture(scope="module")
def tiny_unet(fx, one_thread):
    state, report = R.convert_unet_state(fx["weights"], fx["cfg"], latent_res=fx["H"])
    model = R.build_unet(fx["cfg"], fx["H"])
    model.load_state_dict(state, strict=True)
    return model.eval(), report


def unet_input(fx):
    t, B, V, H, W = fx["t"], fx["B"], fx["V"], fx["H"], fx["W"]
    mask = t["mask"].view(-1, 1, 1, 1).expand(-1, 1, H, W)
    x = torch.cat([t["latents"], t["rays_f32"].repeat(B, 1, 1, 1), mask], dim=1)
    return x.view(B, V, 153, H, W), t["c_noise"].view(B, V)[:, 0], t["context"]


def test_fixture_is_small_and_from_the_released_code(fx):
    assert FIXTURE.stat().st_size < 800_000
    assert fx["meta"]["made_by"] == "tools/make_released_fixture.py"
    assert len(fx["meta"]["released_commit"]) == 40


def test_tiny_key_map_is_complete(fx, tiny_unet):
    _, report = tiny_unet
    assert report.ok, report.summary()
    assert report.mapped == len(fx["weights"]) == 284


def test_converted_unet_reproduces_the_released_outputs(fx, tiny_unet):
    """3D attention over the views of each sample (rows b * V + v), float32: max abs error <= 1e-4."""
    model, _ = tiny_unet
    x, c_noise, context = unet_input(fx)
    with torch.no_grad():
        out = model(x, c_noise, context).reshape(fx["B"] * fx["V"], 8, fx["H"], fx["W"])
    err = float((out - fx["t"]["out"]).abs().max())
    print(f"released tiny UNet, 3D attention: max abs error {err:.3g}")
    assert err <= 1e-4


def test_folding_views_is_what_the_released_model_does(fx, tiny_unet):
    """With every attention per view (the released num_video_frames=1) the outputs change, and match again."""
    model, _ = tiny_unet
    x, c_noise, context = unet_input(fx)
    model.set_attention(levels_3d=0)
    try:
        with torch.no_grad():
            out = model(x, c_noise, context).reshape(fx["B"] * fx["V"], 8, fx["H"], fx["W"])
    finally:
        model.set_attention(levels_3d=list(range(1, len(fx["cfg"]["channel_mult"]))))
    assert float((out - fx["t"]["out_per_view"]).abs().max()) <= 1e-4
    assert float((fx["t"]["out"] - fx["t"]["out_per_view"]).abs().max()) > 0.1      # the folding matters


def rounding_bound(angles: torch.Tensor, H: int, W: int, eps: float, k: float = 8.0) -> torch.Tensor:
    """What rounding alone can put between two runs of the released ray-map code at machine epsilon ``eps``:
    (N, 144, H, W), channel by channel.

    A coordinate x of a ray origin or direction comes out of the camera's inverse and a few products with an
    error of a few ``eps`` times the vector's size ``|x|`` (k = 8 of them allowed). The encoding multiplies by
    2^f exactly and takes ``sin(2^f x)`` and ``sin(2^f x + pi/2)``: an error dx becomes 2^f dx, and the sum with
    pi/2 rounds again by ``eps`` times the argument. At the top origin frequency (2^14 x 2.7 ~ 44000) this is a
    few thousandths in float32 and about 1e-11 in float64; at the lowest frequencies it is a few ``eps``.
    Measured: the float32 maps (the course's here, the released code's in the fixture) sit at 1.09 of the k = 1
    bound from the float64 maps (max abs 5.5e-3), so k = 8 leaves a margin of 7 for other CPUs' float paths.
    """
    w2c = cameras.released_w2c(angles.double(), torch.float64)
    bounds = []
    for m in w2c.reshape(-1, 4, 4):
        o, d = raymaps.released_rays(m, H, W)
        per = []
        for x, n in ((o, raymaps.ORIGIN_FREQS), (d, raymaps.DIR_FREQS)):
            size = x.abs().amax(-1, keepdim=True) + 1.0                           # (H, W, 1)
            scale = torch.tensor([2.0 ** f for f in range(n)], dtype=torch.float64).repeat_interleave(3)
            per += [size.expand(H, W, 3), (size * scale + 2.0).repeat(1, 1, 2)]
        bounds.append(k * eps * torch.cat(per, -1).permute(2, 0, 1))
    return torch.stack(bounds)


def test_released_raymaps_reproduced(fx):
    """Float64 against the released code's float64 run: equal up to float64 rounding (about 1e-11 at the top
    frequency). Float32 (the course's here, the released code's on the machine that made the fixture): each within
    float32 rounding of the float64 maps, channel by channel, as ``rounding_bound`` derives it; bitwise agreement
    in float32 across machines is not a property either code has (a float32 sine of an argument near 44000 is
    as exact as that argument's rounding, about 2.6e-3)."""
    a, H, W = fx["t"]["angles"], fx["H"], fx["W"]
    r64 = raymaps.released_raymap(a.double(), H, W, dtype=torch.float64)
    r32 = raymaps.released_raymap(a, H, W, dtype=torch.float32).double()
    b64 = rounding_bound(a, H, W, torch.finfo(torch.float64).eps)
    b32 = rounding_bound(a, H, W, torch.finfo(torch.float32).eps)
    e64 = (r64 - fx["t"]["rays_f64"]).abs()
    print(f"released ray maps: max abs error float64 {float(e64.max()):.3g} (bound {float(b64.max()):.3g}), "
          f"float32 {float((r32 - fx['t']['rays_f32']).abs().max()):.3g} (bound {float(b32.max()):.3g})")
    assert r64.shape == (3, 144, H, W)
    assert (e64 <= b64).all() and float(b64.max()) < 1e-9
    for name, r in (("course", r32), ("released", fx["t"]["rays_f32"].double())):
        err = (r - r64).abs()
        assert (err <= b32).all(), (name, float((err / b32).max()))
    # the bound is tight where the encoding is smooth: the lowest frequencies agree to about float32 resolution
    assert float(b32[:, :3 + 3 * 4].max()) < 5e-5
    # ... and not loose enough to pass a wrong map: one frequency too many, or the y axis flipped
    shifted = torch.cat([r64[:, :3], r64[:, 6:3 + 3 * 15], r64[:, 3:6], r64[:, 3 + 3 * 15:]], 1)
    assert not ((shifted - r64).abs() <= b32).all()
    flipped = raymaps.released_raymap(a.double() * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64), H, W,
                                      dtype=torch.float64)
    assert not ((flipped - r64).abs() <= b32).all()
    # the two precisions of the released code itself differ by the top frequencies' rounding, far above 1e-5
    assert float((fx["t"]["rays_f32"].double() - fx["t"]["rays_f64"]).abs().max()) > 1e-3


def test_released_raymaps_from_course_cameras(fx):
    """A course camera (OpenCV c2w) named by the released angles gives the released ray map (the named option)."""
    a, H, W = fx["t"]["angles"], fx["H"], fx["W"]
    c2w = cameras.released_c2w(a, torch.float64)
    w2c = cameras.released_w2c_from_c2w(c2w)
    rm = raymaps.released_raymap(w2c=w2c, height=H, width=W, dtype=torch.float64)
    assert float((rm - fx["t"]["rays_f64"]).abs().max()) <= 1e-5
    sq = raymaps.raymap_in("released", c2w, cameras.intrinsics(64), 64, H, dtype=torch.float64)
    assert sq.shape == (3, 144, H, H)
    with pytest.raises(ValueError, match="convention"):
        raymaps.raymap_in("opengl", c2w, cameras.intrinsics(64), 64, H)


def test_released_turntable_is_the_course_rig():
    """Released angles (0, yaw, 0) name the course's rig camera at that yaw (same axes, same centre)."""
    yaws = torch.tensor([0.0, 45.0, 90.0, -135.0, 180.0])
    c2w = cameras.released_c2w(cameras.released_angles(yaws, 0.0))
    torch.testing.assert_close(c2w, cameras.orbit_c2w(yaws, 0.0), atol=1e-6, rtol=0)
    # the released cameras themselves sit on the far side, looking outward
    w2c = cameras.released_w2c(cameras.released_angles(yaws, 0.0), torch.float64)
    centre = -(w2c[:, :3, :3].transpose(-1, -2) @ w2c[:, :3, 3:])[..., 0]
    torch.testing.assert_close(centre.float(), -cameras.orbit_eye(yaws, 0.0), atol=1e-5, rtol=0)


def test_released_encoding_order():
    x = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    e = raymaps.released_encode(x, 2)
    assert e.shape == (1, 15)
    torch.testing.assert_close(e[0, 3:6], torch.sin(x[0]))
    torch.testing.assert_close(e[0, 6:9], torch.sin(2 * x[0]))
    torch.testing.assert_close(e[0, 9:12], torch.cos(x[0]))
    torch.testing.assert_close(e[0, 12:15], torch.cos(2 * x[0]))


def test_full_size_key_map_on_meta(fx):
    """The released full-size shapes (from its configuration, on the meta device) convert with nothing left over."""
    shapes = json.loads(fx["meta"]["full_size_shapes"])
    assert json.loads(fx["meta"]["full_config"]) | {"image_size": None} == R.RELEASED_UNET | {"image_size": None}
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    out, report = R.convert_unet_state(state, R.RELEASED_UNET)
    assert report.ok, report.summary()
    assert report.mapped == len(shapes) == 686
    assert report.params == sum(math.prod(s) for s in shapes.values()) == 859_961_608
    assert tuple(out["unet.conv_in.weight"].shape) == (320, 153, 3, 3)
    assert tuple(out["unet.conv_out.weight"].shape) == (8, 320, 3, 3)


def test_key_map_reports_leftovers(fx):
    state = dict(fx["weights"])
    state["input_blocks.99.0.in_layers.0.weight"] = torch.zeros(32)
    del state["out.2.bias"]
    with pytest.raises(R.ReleasedCheckpointError, match="1 missing, 1 unexpected"):
        R.convert_unet_state(state, fx["cfg"], latent_res=fx["H"])


def test_convert_cli_roundtrip_and_refuses_pickles(fx, tiny_unet, tmp_path):
    from safetensors.torch import save_file
    src = tmp_path / "tiny.safetensors"
    save_file({R.UNET_PREFIX + k: v for k, v in fx["weights"].items()} | {"first_stage_model.x": torch.zeros(1)},
              str(src))
    info = R.convert(src, tmp_path / "out", cfg=fx["cfg"])
    assert info["keys_mapped"] == 284 and info["other_key_groups"] == {"first_stage_model": 1}
    model = R.load_unet(tmp_path / "out")
    model.unet.config  # built from the saved config
    x, c_noise, context = unet_input(fx)
    with torch.no_grad():
        out = model(x, c_noise, context).reshape(-1, 8, fx["H"], fx["W"])
    assert float((out - fx["t"]["out"]).abs().max()) <= 1e-4

    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": Opaque()}, str(bad))
    with pytest.raises(R.ReleasedCheckpointError, match="weights-only"):
        R.read_checkpoint(bad)
    ok = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {R.UNET_PREFIX + k: v for k, v in fx["weights"].items()}}, str(ok))
    assert R.main(["convert", str(ok), "--out", str(tmp_path / "out2")]) == 2     # full-size map: the tiny fails
    assert len(R.read_checkpoint(ok)) == 284


def test_released_denoiser_scaling_and_guidance(fx, tiny_unet):
    """v-prediction with EDM c_noise; the given view enters scaled by c_in; the unconditional branch uses the
    empty latent and zero condition channels for the given view."""
    model, _ = tiny_unet
    B, V, H, W = fx["B"], fx["V"], fx["H"], fx["W"]
    ctx_tokens = fx["t"]["context"]

    class Ctx:
        def __call__(self, id_emb, batch_size=1):
            return ctx_tokens[:1] * 0 if id_emb is None else ctx_tokens[: len(id_emb)]

    empty = torch.full((8, H, W), 0.25)
    rm = R.ReleasedSpinModel(model, Ctx(), empty)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, V, 8, H, W, generator=g)
    cond = torch.randn(B, V, 8, H, W, generator=g)
    mask = torch.zeros(B, V, dtype=torch.bool)
    mask[:, 0] = True
    rays = fx["t"]["rays_f32"].expand(B, -1, -1, -1, -1)
    sigma = torch.tensor([700.0, 0.5])
    with torch.no_grad():
        D = rm.denoise(x, sigma, cond, mask, rays, id_emb=torch.zeros(B, 512))
        s = sigma.view(B, 1, 1, 1, 1)
        state = torch.where(mask.view(B, V, 1, 1, 1), cond, x)
        m_ch = (~mask).float().view(B, V, 1, 1, 1).expand(B, V, 1, H, W)
        net = torch.cat([state / (s ** 2 + 1).sqrt(), rays, m_ch], 2)
        F = model(net, sigma.log() / 4, ctx_tokens)
        want = state / (s ** 2 + 1) - s / (s ** 2 + 1).sqrt() * F
        want = torch.where(mask.view(B, V, 1, 1, 1), cond, want)
        assert float((D - want).abs().max()) < 1e-5
        net_u, state_u = rm.network_input(x, 1 / (s ** 2 + 1).sqrt(), cond, mask, rays, unconditional=True)
    assert torch.equal(state_u[:, 0], empty.expand(B, 8, H, W))
    assert float(net_u[:, 0, 8:].abs().max()) == 0.0 and float(net_u[:, 1, 152].min()) == 1.0
    with pytest.raises(ValueError, match="drop_id"):
        rm.denoise(x, sigma, cond, mask, rays, drop_id=torch.zeros(B, dtype=torch.bool))


def test_ddpm_schedule_of_step_a():
    s = R.ddpm_sigmas(50)
    assert s.shape == (51,) and float(s[-1]) == 0.0
    assert bool((s[:-1][1:] < s[:-1][:-1]).all())
    assert 14.5 < float(s[0]) < 14.7 and 0.13 < float(s[-2]) < 0.14      # DDPM steps 999 .. 19


def test_missing_files_message_names_each_file(tmp_path):
    (tmp_path / "insightface" / "antelopev2").mkdir(parents=True)
    (tmp_path / "insightface" / "antelopev2" / "glintr100.onnx").write_bytes(b"")
    missing = R.missing_files(tmp_path)
    assert len(missing) == len(R.WEIGHT_FILES) - 1
    with pytest.raises(R.MissingWeightsError) as e:
        R.require_files(tmp_path)
    msg = str(e.value)
    for f in missing:
        assert str(tmp_path / f.path) in msg
    assert "glintr100" not in msg and "spinmeround_lite.released convert" in msg
    assert R.main(["check", "--weights", str(tmp_path)]) == 1


def test_released_profile():
    p = R.released_profile()
    assert p.name == "paper" and R.is_released(p) and R.camera_convention(p) == "released"
    assert (p.sample_steps, p.cfg_scale, p.sample_sigma_max, p.latent_res) == (50, 3.5, 700.0, 64)
    c2w, K, rays = R.view_cameras(p.replace(resolution=32, vae_channels=(8, 8, 8, 8)), torch.tensor([[0.0, 90.0]]))
    assert rays.shape == (1, 2, 144, 4, 4) and c2w.shape == (1, 2, 4, 4)


def test_spin_at_paper_without_weights_names_the_missing_files(tmp_path):
    import importlib
    spin_module = importlib.import_module("spinmeround_lite.spinning")
    with pytest.raises(R.MissingWeightsError, match="spinmeround/model.safetensors"):
        spin_module.spin(torch.rand(3, 64, 64), profile="paper", weights_dir=str(tmp_path), progress=False)
