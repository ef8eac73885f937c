"""The public entry point: yaw order and count, the three steps' plan, inputs of every kind, saved files.

A tiny randomly initialised model of the ``test`` profile stands in for a trained one (injected as
``SpinParts``), so nothing here trains; the pictures are noise, the bookkeeping is what is checked.
"""

import importlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spinmeround_lite import cameras
from spinmeround_lite.profiles import get_profile
from spinmeround_lite.runs import Run
from spinmeround_lite.spinning import (
    AlignmentError,
    ImageError,
    SpinParts,
    SpinResult,
    align_with_keypoints,
    ensure_spin,
    face_template,
    intermediates,
    load_image,
    looks_like_render,
    plan_rounds,
    prepare_input,
    spin,
    spin_yaws,
    triplet_anchors,
)

spin_module = importlib.import_module("spinmeround_lite.spinning")
P = get_profile("test")
FAST = dict(steps=1, cfg_scale=2.0, progress=False)


@pytest.fixture(scope="module")
def parts():
    from spinmeround_lite.identity import LearnedEncoder, encoder_config
    from spinmeround_lite.latents import LatentCodec, build_vae
    from spinmeround_lite.model import SpinModel

    torch.manual_seed(0)
    model = SpinModel.from_profile(P, pretrained=False).eval()
    codec = LatentCodec(build_vae(P), resolution=P.resolution)
    encoder = LearnedEncoder(encoder_config(P, "cond")).eval()
    return SpinParts(model, codec, encoder, P)


def render_like(R=32, seed=0) -> torch.Tensor:
    """A white square image with a head-like blob that touches the bottom edge (as the neck does)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, R), torch.linspace(-1, 1, R), indexing="ij")
    head = ((x / 0.5) ** 2 + (y / 0.65) ** 2 < 1) | ((x.abs() < 0.2) & (y > 0.3))
    col = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.2
    return torch.where(head, col.expand(3, R, R), torch.ones(3, R, R))


def photo_like(H=48, W=40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, H, W, generator=g) * 0.5 + 0.2


# ----------------------------------------------------------------------------------------------
# the plan of steps B and C
# ----------------------------------------------------------------------------------------------
def test_triplets_bracket_their_targets():
    assert triplet_anchors(10.0) == (45.0, -45.0) and triplet_anchors(-30.0) == (45.0, -45.0)
    assert triplet_anchors(100.0) == (90.0, 135.0)
    assert triplet_anchors(170.0) == (135.0, -180.0) and triplet_anchors(-170.0) == (-180.0, -135.0)
    assert triplet_anchors(-60.0) == (-90.0, -45.0)


@pytest.mark.parametrize("n,rounds", [(48, 8), (88, 16)])
def test_plan_48_and_88_views_five_per_round(n, rounds):
    yaw = spin_yaws(n)
    known = {0.0, *[float(a) for a in cameras.ANCHOR_YAWS], -180.0}
    todo = [float(y) for y in yaw if float(y) not in known]
    assert len(todo) == n - 8                              # the input and the 7 anchors are not redone
    plan = plan_rounds(todo, 5)
    assert len(plan) == rounds and all(len(idx) == 5 for _, idx in plan)
    assert sorted(i for _, idx in plan for i in idx) == list(range(len(todo)))
    for (a, b), idx in plan:
        for i in idx:
            r = todo[i]
            if abs(r) < 45:
                assert (a, b) == (45.0, -45.0)
            else:                                          # the two anchors around the target
                lo, hi = a, (b if b > a else b + 360)
                assert lo < (r if r >= lo else r + 360) < hi


# ----------------------------------------------------------------------------------------------
# spin() end to end with an injected tiny model
# ----------------------------------------------------------------------------------------------
def test_spin_returns_views_in_yaw_order(parts):
    img = render_like()
    res = spin(img, n_views=12, parts=parts, **FAST)
    assert len(res) == 12
    assert res.views.shape == (12, 3, 32, 32) and res.normals.shape == (12, 3, 32, 32)
    assert torch.allclose(res.yaw, torch.tensor([0, 30, 60, 90, 120, 150, -180, -150, -120, -90, -60, -30.0]))
    assert torch.allclose(res.c2w, cameras.orbit_c2w(res.yaw, res.pitch), atol=1e-5)
    assert torch.allclose(res.K, cameras.intrinsics(32))
    assert torch.equal(res.views[0], prepare_input(img, 32)[0])               # view 0 is the input
    assert res.info["framing"] == "render" and res.info["generated"]["intermediates"] == 8
    assert 0 <= float(res.views.min()) and float(res.views.max()) <= 1

    # explicit yaws come back in the order asked; shared views (the anchor at 90) are identical
    res2 = spin(img, yaws=[90.0, -30.0, 0.0], parts=parts, **FAST)
    assert torch.allclose(res2.yaw, torch.tensor([90.0, -30.0, 0.0]))
    assert torch.equal(res2.latents[0], res.latents[3])
    assert torch.equal(res2.views[2], res.views[0])
    # same seed, same spin; another seed, another
    res3 = spin(img, yaws=[90.0], parts=parts, seed=1, **FAST)
    assert not torch.allclose(res3.latents[0], res.latents[3])


@pytest.mark.floats
def test_intermediates_do_not_depend_on_batching(parts):
    """Batched and one-by-one rounds differ by float32 rounding only: measured over model seeds 0-4 and input draws
    10-14, ATEN_CPU_CAPABILITY=default and native, one thread: max difference 2.4e-5 +- 0.8e-5 (at most 3.1e-5) on
    latents of size 1.4 +- 0.3. Tolerance 1e-3 (30 times that); rounds that depended on the batch (shared noise,
    another round's views) would differ by about 1."""
    z_in = torch.randn(8, P.latent_res, P.latent_res)
    z_anc = torch.randn(7, *z_in.shape)
    emb = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    yaws = spin_yaws(16)[[1, 3, 5, 9]]
    a = intermediates(parts.model, P, z_in, z_anc, yaws, emb, steps=1, cfg_scale=2.0, batch_rounds=8)
    b = intermediates(parts.model, P, z_in, z_anc, yaws, emb, steps=1, cfg_scale=2.0, batch_rounds=1)
    assert a.shape == (4, 8, P.latent_res, P.latent_res)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)   # batched convolutions round differently, slightly


def test_save_and_load(parts, tmp_path):
    res = spin(render_like(), n_views=8, parts=parts, **FAST)
    out = res.save(tmp_path / "spin")
    with np.load(out / "views.npz") as z:
        assert set(z.files) == {"rgb", "normal", "c2w", "K", "yaw", "pitch"}
        assert z["rgb"].dtype == np.uint8 and z["rgb"].shape == (8, 32, 32, 3)
        assert z["normal"].dtype == np.uint8 and z["normal"].shape == (8, 32, 32, 3)
        assert z["c2w"].shape == (8, 4, 4) and z["K"].shape == (3, 3) and z["yaw"].shape == (8,)
    assert len(list((out / "rgb").glob("*.png"))) == 8 and len(list((out / "normal").glob("*.png"))) == 8
    with Image.open(out / "turntable.gif") as gif:
        assert gif.n_frames == 8
    back = SpinResult.load(out)
    assert torch.allclose(back.views, res.views, atol=1 / 255 + 1e-6) and torch.equal(back.yaw, res.yaw)


def test_ensure_spin_builds_once(parts, tmp_path):
    from spinmeround_lite.dataset import write_external

    run = Run(P.replace(spin_views=8), tmp_path / "run")
    img = (render_like().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    V = 2
    arrays = {"rgb": np.stack([img] * V), "alpha": np.full((V, 32, 32), 255, np.uint8),
              "normal": np.full((V, 32, 32, 3), 128, np.uint8),
              "c2w": cameras.orbit_c2w(torch.tensor([0.0, 180.0])).numpy(), "K": cameras.intrinsics(32).numpy(),
              "yaw": np.array([0.0, 180.0], np.float32), "pitch": np.zeros(V, np.float32)}
    write_external(run.data_dir, {"h0": arrays, "h1": arrays}, heldout=["h1"])
    Run.mark_complete(run.data_dir)
    folder = ensure_spin(run, parts=parts, progress=False)
    stamp = (folder / "views.npz").stat().st_mtime_ns
    with np.load(folder / "views.npz") as z:
        assert z["rgb"].shape == (8, 32, 32, 3) and np.allclose(z["yaw"], spin_yaws(8).numpy())
    assert ensure_spin(run, parts=parts, progress=False) == folder
    assert (folder / "views.npz").stat().st_mtime_ns == stamp          # reused, not rebuilt


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_corrupt_file_is_named(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(good, format="png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.getvalue()[:60])                  # header survives, data truncated
    with pytest.raises(ImageError, match="broken.png"):
        load_image(bad)


def test_non_images_refused(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("not an image at all")
    with pytest.raises(ImageError, match="notes.png"):
        load_image(txt)
    with pytest.raises(ImageError, match="dict"):
        load_image({"rgb": 1})
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((4, 40, 40, 3), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((40, 40, 3), 200.0, np.float32))
    with pytest.raises(ImageError, match="smallest"):
        load_image(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ImageError, match="folder"):
        load_image(tmp_path)


def test_16bit_and_grayscale_are_converted(tmp_path):
    ramp16 = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    p16 = tmp_path / "gray16.png"
    Image.fromarray(ramp16).save(p16)
    x = load_image(p16)
    assert x.shape == (3, 40, 40) and torch.allclose(x[0], x[2])
    assert torch.allclose(x[0], torch.from_numpy(ramp16 / 65535.0).float(), atol=1e-4)
    assert torch.allclose(load_image(ramp16), x, atol=1e-6)            # the same as an array

    gray = tmp_path / "gray.png"
    Image.fromarray(np.full((30, 50), 51, np.uint8), mode="L").save(gray)
    g = load_image(gray)
    assert g.shape == (3, 30, 50) and torch.allclose(g, torch.full_like(g, 0.2))

    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255                                   # top half opaque red, bottom transparent
    r = load_image(Image.fromarray(rgba, mode="RGBA"))
    assert torch.allclose(r[:, 0, 0], torch.tensor([1.0, 0, 0])) and torch.allclose(r[:, -1, 0], torch.ones(3))
    t = load_image(torch.rand(3, 24, 24))                   # channel-first tensors
    assert t.shape == (3, 24, 24)


def test_renders_are_recognised_and_photos_need_alignment(tmp_path):
    assert looks_like_render(render_like())
    assert not looks_like_render(photo_like())
    assert not looks_like_render(torch.ones(3, 32, 40))     # not square
    with pytest.raises(AlignmentError) as e:                # the shipped dlib backend finds no face in noise
        prepare_input(photo_like(), 32, align=True, weights_dir=tmp_path)
    assert "no face found in the image" in str(e.value) and "--no-align" in str(e.value)
    with pytest.raises(AlignmentError) as e:                # insightface asked for, its detector file absent
        prepare_input(photo_like(), 32, align=True, weights_dir=tmp_path, face_backend="insightface")
    msg = str(e.value)
    assert "scrfd_10g_bnkps.onnx" in msg and "--no-align" in msg and str(tmp_path) in msg
    with pytest.warns(UserWarning, match="not square"):
        img, how = prepare_input(photo_like(), 32, align=False)
    assert how == "as given" and img.shape == (3, 32, 32)
    img, how = prepare_input(render_like(64), 32)
    assert how == "render" and img.shape == (3, 32, 32)


def test_spin_refuses_bad_input_before_loading_anything(tmp_path):
    with pytest.raises(FileNotFoundError):
        spin(tmp_path / "missing.jpg", profile="test", progress=False)     # no run, no model needed


@pytest.mark.floats
def test_alignment_crop_recovers_a_known_similarity():
    """Put a render into a larger 'photo' by a known similarity; its keypoints there must crop it back.
    Mean error of the inner crop, ATEN_CPU_CAPABILITY=default and native, one thread: 0.0140 on both paths; over
    four other similarities that keep the head inside the photo (and other colours) 0.010 to 0.015. Keypoints off
    by 6 photo pixels (2.4 crop pixels) give 0.073 to 0.12, above the bound 0.05."""
    R = 32
    src = render_like(R)
    tpl = face_template(R)                                   # (5, 2) keypoints of the render's face
    ang, s, t = 0.3, 2.5, torch.tensor([30.0, 12.0])
    A = s * torch.tensor([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]], dtype=torch.float64)
    M = torch.cat([A, t.double()[:, None]], 1)               # render pixel -> photo pixel
    from spinmeround_lite.identity import warp_affine
    photo = warp_affine(src - 1, M, 120) + 1                 # (3, 120, 120), white outside
    kp = tpl @ A.T + t.double()
    back = align_with_keypoints(photo, kp, R)
    assert back.shape == (3, R, R)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert (back[inner] - src[inner]).abs().mean() < 0.05
    assert (face_template(64) / face_template(32) - 2).abs().max() < 0.05   # the template scales with R


# ----------------------------------------------------------------------------------------------
# package and command line
# ----------------------------------------------------------------------------------------------
def test_package_import_is_light_and_spin_is_exported():
    code = ("import sys, spinmeround_lite as s; assert 'torch' not in sys.modules; "
            "f = s.spin; assert callable(f) and f.__name__ == 'spin'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_one_name_one_thing():
    """``spinmeround_lite.spin`` is the function, in any import order; its module is ``spinning``; no name the
    package exports is also one of its submodules; ``python -m spinmeround_lite.spin`` is the command line."""
    code = ("import types, pytest, spinmeround_lite as pkg\n"
            "import spinmeround_lite.spinning as S\n"
            "assert isinstance(S, types.ModuleType) and S.__name__ == 'spinmeround_lite.spinning'\n"
            "from spinmeround_lite import spin\n"
            "assert spin is S.spin and pkg.spin is S.spin and isinstance(spin, types.FunctionType)\n"
            "with pytest.raises(ImportError, match='spinmeround_lite.spinning'):\n"
            "    import spinmeround_lite.spin\n"
            "assert pkg.spin is S.spin\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    # the rule for every exported name: a file of the same name may only be a `python -m` entry that refuses import
    import spinmeround_lite
    stems = {p.stem for p in Path(spinmeround_lite.__file__).parent.glob("*.py")}
    for name in set(spinmeround_lite.__all__) & stems:
        with pytest.raises(ImportError, match="not a module"):
            importlib.import_module(f"spinmeround_lite.{name}")
        assert callable(getattr(spinmeround_lite, name))
    cli = subprocess.run([sys.executable, "-m", "spinmeround_lite.spin", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "--views" in cli.stdout, cli.stderr


def test_cli_reports_bad_input(tmp_path, capsys):
    rc = spin_module.main([str(tmp_path / "absent.png"), "--out", str(tmp_path / "o"), "--profile", "test",
                           "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert rc == 2
    assert "absent.png" in capsys.readouterr().err
    assert not (tmp_path / "run" / "models").exists()        # nothing was trained for a missing file


def test_close_up_shows_the_views_near_the_input_in_yaw_order():
    import matplotlib
    matplotlib.use("Agg")
    from spinmeround_lite import viewer
    from spinmeround_lite.spinning import SpinResult

    n = 16
    yaw = (torch.arange(n) * 360.0 / n + 30.0 + 180.0) % 360.0 - 180.0         # input at +30, wraps past 180
    res = SpinResult(torch.rand(n, 3, 8, 8), torch.rand(n, 3, 8, 8), yaw, torch.zeros(n),
                     torch.eye(4).expand(n, 4, 4), torch.eye(3))
    near = viewer.near_views(res, 50.0)
    assert near == [14, 15, 0, 1, 2]                                           # -45, -22.5, input, +22.5, +45
    fig = viewer.close_up(res, 50.0, found={0: True, 1: False})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["-45.0°", "-22.5°", "input", "+22.5°", "+45.0°"]
    assert [ax.get_xlabel() for ax in fig.axes][2:4] == ["face found", "no face found"]
    # across the +-180 seam: an input at +170 has neighbours at -167.5 (+22.5 from it) and +147.5 (-22.5)
    res.yaw = (torch.arange(n) * 360.0 / n + 170.0 + 180.0) % 360.0 - 180.0
    assert viewer.near_views(res, 50.0) == [14, 15, 0, 1, 2]
    assert [ax.get_title() for ax in viewer.close_up(res, 50.0).axes] == titles


@pytest.mark.parametrize("res_px", [8, 64, 512])
def test_spin_viewer_draws_a_fixed_size_whatever_the_resolution(res_px):
    """The picture is ``size`` px high and twice as wide (RGB | normals), never the output area's width; the
    slider is as wide as the picture; moving it shows another view (tests/browser checks the same in Chromium)."""
    from spinmeround_lite import viewer
    from spinmeround_lite.spinning import SpinResult

    n = 4
    res = SpinResult(torch.rand(n, 3, res_px, res_px), torch.rand(n, 3, res_px, res_px),
                     torch.tensor([0.0, 90.0, 180.0, -90.0]), torch.zeros(n), torch.eye(4).expand(n, 4, 4),
                     torch.eye(3))
    box = viewer.spin_viewer(res, size=200)
    slider, image, caption = box.children
    assert (image.layout.width, image.layout.height) == ("400px", "200px")
    assert slider.layout.width == "400px"
    shown = image.value
    slider.value = slider.options[0][1]                                         # yaw -90: view 3
    assert image.value != shown and "view 3 of 4" in caption.value


# ----------------------------------------------------------------------------------------------
# counted work and samplers (notebook 12)
# ----------------------------------------------------------------------------------------------
def _expected_c_calls(n_views):
    """Network calls of step C per sampler step without guidance: one per batch of equal-size rounds."""
    rel = [float(y) for y in spin_yaws(n_views)]
    known = {0.0, *[float(a) for a in cameras.ANCHOR_YAWS], -180.0}
    todo = [r for r in rel if all(abs(((r - k + 180) % 360) - 180) > 1e-3 for k in known)]
    rounds = plan_rounds(todo, P.spin_per_round)
    sizes = {}
    for _, idx in rounds:
        sizes[len(idx)] = sizes.get(len(idx), 0) + 1
    calls = sum(-(-n // 8) for n in sizes.values())
    views = sum(n * (3 + size) for size, n in sizes.items())
    return calls, views


def test_spin_counts_network_calls_per_step(parts):
    res = spin(render_like(), n_views=12, parts=parts, steps=2, cfg_scale=2.0, progress=False)
    net = res.info["network"]
    assert net["A"] == {"calls": 2, "view_evaluations": 2}                 # 1 view, no guidance, 2 steps
    assert net["B"] == {"calls": 4, "view_evaluations": 4 * 8}             # guided: 2 calls a step, 1 + 7 views
    c_calls, c_views = _expected_c_calls(12)
    assert net["C"] == {"calls": 2 * 2 * c_calls, "view_evaluations": 2 * 2 * c_views}
    assert net["total"]["calls"] == sum(net[k]["calls"] for k in "ABC")
    assert net["total"]["view_evaluations"] == sum(net[k]["view_evaluations"] for k in "ABC")
    assert res.info["sampler"] == "euler" and res.info["steps"] == 2
    h = spin(render_like(), n_views=12, parts=parts, steps=2, cfg_scale=2.0, progress=False, sampler="heun")
    assert h.info["network"]["B"]["calls"] == 2 * (2 + 1)                  # Heun: 2 evaluations, the last step 1
    d = spin(render_like(), n_views=12, parts=parts, steps=2, cfg_scale=2.0, progress=False, sampler="dpm2m")
    assert d.info["network"] == net                                        # dpm2m: Euler's calls
    assert not torch.equal(d.latents, res.latents)


@pytest.fixture(scope="module")
def student_parts(parts):
    import copy

    from spinmeround_lite.distill import as_student

    student = as_student(copy.deepcopy(parts.model), P, 2)
    return SpinParts(parts.model, parts.codec, parts.encoder, P, "injected", student, "injected student")


def test_student_samples_in_its_steps_with_one_call_each(student_parts):
    res = spin(render_like(), n_views=12, parts=student_parts, progress=False, sampler="student")
    net = res.info["network"]
    assert res.info["steps"] == 2 and res.info["sampler"] == "student"
    # step A takes every other level of the student's schedule and its last: 1 call for 2 steps
    assert net["A"] == {"calls": 1, "view_evaluations": 1}
    assert net["B"] == {"calls": 2, "view_evaluations": 2 * 8}                                 # guidance folded in
    assert net["C"]["calls"] == 2 * _expected_c_calls(12)[0]
    assert res.info["sigmas"][-1] == 0 and len(res.info["sigmas"]) == 3
    assert spin(render_like(), n_views=12, parts=student_parts, progress=False, sampler="student",
                steps=2).info["network"] == net


def test_a_runs_student_reaches_its_spin(student_parts, tmp_path, monkeypatch):
    """spin(run=..., sampler="student") samples with the run's student (the command line's path): the parts
    built from the run keep their student."""
    from spinmeround_lite import spinning as S
    from spinmeround_lite.runs import Run

    run = Run("test", tmp_path / "run", device="cpu")
    monkeypatch.setattr(S, "find_student", lambda r: (student_parts.student, "a student on disk"))
    monkeypatch.setattr(S.SpinParts, "from_run", classmethod(lambda cls, r, progress=True: student_parts))
    res = spin(render_like(), n_views=8, run=run, align=False, progress=False, sampler="student")
    assert res.info["sampler"] == "student" and res.info["model_source"] == "injected student"
    assert res.info["network"]["B"]["calls"] == 2


def test_step_a_of_a_student_takes_every_other_level_and_the_last():
    from spinmeround_lite.spinning import student_step_a_sigmas

    four = torch.tensor([80.0, 5.0, 1.118, 0.25, 0.0], dtype=torch.float64)
    assert student_step_a_sigmas(four).tolist() == [80.0, 1.118, 0.0]              # 2 calls where B and C take 4
    assert student_step_a_sigmas(four[[0, 1, 2, 4]]).tolist() == [80.0, 1.118, 0.0]
    assert student_step_a_sigmas(four[[0, 4]]).tolist() == [80.0, 0.0]


def test_sampler_mismatches_are_clear_errors(parts, student_parts, tmp_path):
    from spinmeround_lite.spinning import SamplerError

    with pytest.raises(SamplerError, match="exactly 2 steps"):
        spin(render_like(), n_views=8, parts=student_parts, progress=False, sampler="student", steps=20)
    with pytest.raises(SamplerError, match="folded"):
        spin(render_like(), n_views=8, parts=student_parts, progress=False, sampler="student", cfg_scale=5.0)
    with pytest.raises(SamplerError, match="no distilled student"):
        spin(render_like(), n_views=8, parts=parts, progress=False, sampler="student")
    with pytest.raises(SamplerError, match="unknown sampler"):                # before the image is even read
        spin(tmp_path / "missing.png", parts=parts, progress=False, sampler="ddim")


def test_cli_refuses_a_missing_student(tmp_path, capsys):
    from spinmeround_lite.spinning import main

    img = tmp_path / "head.png"
    Image.fromarray((render_like().permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(img)
    run = tmp_path / "run"
    rc = main([str(img), "--out", str(tmp_path / "o"), "--profile", "test", "--run-dir", str(run), "--quiet",
               "--sampler", "student"])
    assert rc == 2
    assert "no distilled student" in capsys.readouterr().err
