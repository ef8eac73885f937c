"""The model checks of notebook 07: they must tell a model that uses its cameras and input from one that does not.

Two stand-in models with a codec that is plain pooling (so decoded images are the rendered truth, blurred):
an *oracle* that reads the yaw from the target's ray map and returns that view's true latents, and a
*camera-blind* model that returns the given view's latents everywhere. The checks must score the first near 1
and the second at chance. The end-to-end test trains a tiny model on two heads and asks it to follow a yaw sweep.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spinmeround_lite import checks, metrics
from spinmeround_lite.heads import sample_identity
from spinmeround_lite.profiles import get_profile
from spinmeround_lite.raymaps import decode_rays
from spinmeround_lite.spinning import spin_yaws

P = get_profile("test").replace(cfg_scale=1.0)   # no guidance: the stand-ins ignore the identity
RES = P.resolution

pytestmark = pytest.mark.floats        # rerun under other float paths by `make test` (portability guard)


class PoolCodec:
    """Images <-> 'latents' by average pooling (3 channels + 1 zero): decode(encode(x)) is x blurred."""
    channels, device = 4, torch.device("cpu")

    def encode(self, img):
        z = F.avg_pool2d(img.reshape(-1, 3, RES, RES), RES // P.latent_res) * 2 - 1
        z = torch.cat([z, torch.zeros_like(z[:, :1])], 1)
        return z.reshape(*img.shape[:-3], 4, P.latent_res, P.latent_res)

    def decode(self, z):
        x = F.interpolate(z.reshape(-1, 4, P.latent_res, P.latent_res)[:, :3], scale_factor=RES // P.latent_res)
        return ((x + 1) / 2).reshape(*z.shape[:-3], 3, RES, RES)


def ray_yaw(rays: torch.Tensor) -> torch.Tensor:
    """Yaw (degrees) of the camera of each ray map (..., 144, h, w), from its decoded origin."""
    o, _ = decode_rays(rays, origin_freqs=P.ray_origin_freqs)
    c = o[..., 0, 0, :]
    return torch.rad2deg(torch.atan2(c[..., 0], c[..., 2]))


class StandIn(torch.nn.Module):
    """``denoise`` returns, per target view, the latents ``table(yaw)`` (oracle) or the given view's (blind)."""

    def __init__(self, heads: checks.Heads, codec, blind: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.codec, self.blind, self.params = codec, blind, heads.params

    def denoise(self, x, sigma, cond, mask, rays, id_emb=None, **kw):
        out = cond.clone()
        if self.blind:
            return torch.where(mask[:, :, None, None, None], cond, cond[:, :1].expand_as(cond))
        yaws = ray_yaw(rays)                                                # (B, V)
        for b in range(x.shape[0]):
            truth = checks.render_at(self.params[b % len(self.params)], yaws[b], RES)
            z = self.codec.encode(torch.cat([truth["rgb"], truth["normal_rgb"]]))
            out[b] = torch.cat([z[: len(yaws[b])], z[len(yaws[b]):]], 1)
        return torch.where(mask[:, :, None, None, None], cond, out)


@pytest.fixture(scope="module")
def heads():
    enc = type("E", (), {"embed": staticmethod(lambda img: F.normalize(torch.ones(len(img), 512), dim=-1))})()
    return checks.make_heads([sample_identity(s).to_vector() for s in (3, 4)], enc, spin_yaws(4), RES)


@pytest.mark.parametrize("blind", [False, True])
def test_camera_sweep_tells_oracle_from_blind(heads, blind):
    codec = PoolCodec()
    model = StandIn(heads, codec, blind)
    sweep = [-135.0, -90.0, -45.0, 45.0, 90.0, 135.0, 180.0]
    r = checks.camera_sweep(model, codec, P, heads, sweep, steps=2)
    acc = r["figures"]["sweep_accuracy"]
    assert r["rgb"].shape == (len(sweep), 3, RES, RES)
    if blind:
        assert acc <= 2 / len(sweep), acc            # at most one or two lucky yaws
    else:
        assert acc >= 6 / len(sweep), acc


def test_pose_and_identity_accuracy_of_a_blind_model_sit_near_chance(heads):
    codec = PoolCodec()
    r = checks.teacher_forced(StandIn(heads, codec, blind=True), codec, P, heads, mean_of=heads, steps=2)
    f = r["figures"]
    assert f["pose_chance"] == 0.25 and f["identity_chance"] == 0.5
    assert f["pose_accuracy"] <= 1 / 3                   # the frontal view everywhere: right only by accident
    assert f["identity_accuracy"] >= 0.5                 # it copies the given head, so identity is kept
    for k in ("teacher_forced_ssim", "teacher_forced_mean_head_ssim", "teacher_forced_normal_err_deg"):
        assert math.isfinite(f[k])


def test_oracle_is_right_about_pose(heads):
    codec = PoolCodec()
    f = checks.teacher_forced(StandIn(heads, codec, blind=False), codec, P, heads, steps=2)["figures"]
    assert f["pose_accuracy"] == 1.0
    assert f["teacher_forced_normal_err_deg"] < 30       # the pooling codec blurs 4x4 blocks
    # the oracle draws the true latents: it reaches the autoencoder's ceiling and no further
    assert f["teacher_forced_ceiling_ssim"] < 0.99
    assert abs(f["teacher_forced_ssim"] - f["teacher_forced_ceiling_ssim"]) < 0.02
    assert abs(f["teacher_forced_normal_err_deg"] - f["teacher_forced_ceiling_normal_err_deg"]) < 2


def test_input_use_tells_a_model_that_reads_its_input_from_one_that_does_not(heads):
    codec = PoolCodec()
    # the oracle draws every view from the head's parameters: it never reads the given view
    ignores = checks.input_use(StandIn(heads, codec, blind=False), codec, P, heads)
    f = ignores["figures"]
    assert f["input_gain_db"] == pytest.approx(0.0, abs=1e-6)
    # the camera-blind stand-in pastes the given view onto every target: all input, about the copy
    copies = checks.input_use(StandIn(heads, codec, blind=True), codec, P, heads)
    f = copies["figures"]
    assert f["input_gain_db"] > 3.0
    assert f["input_use_given_db"] < f["input_use_copy_db"]              # the copy, through the blurring codec:
    from spinmeround_lite.faces import face_box
    top, bottom, left, right = face_box(RES)
    pasted = codec.decode(codec.encode(heads_frontal(heads)))
    pasted = pasted.expand_as(copies["truth"])[..., top:bottom, left:right].flatten(0, 1)
    want = metrics.psnr(pasted, copies["truth"][..., top:bottom, left:right].flatten(0, 1)).mean().item()
    assert f["input_use_given_db"] == pytest.approx(want, abs=1e-3)
    assert copies["given"].shape == (len(heads.params), len(checks.INPUT_USE_OFFSETS), 3, RES, RES)


def heads_frontal(heads):
    """The heads' true frontal views (N, 1, 3, H, W)."""
    return heads.truth["rgb"][:, :1]


def test_spread_yaws_and_jittered_cameras():
    assert spin_yaws(4).tolist() == [0.0, 90.0, -180.0, -90.0]
    from spinmeround_lite.cameras import jittered_rig_angles
    y1, p1 = jittered_rig_angles(40, seed=7)
    y2, _ = jittered_rig_angles(40, seed=8)
    assert y1[0] == 0 and p1[0] == 0 and not torch.equal(y1, y2)
    step = np.diff(((y1 + 360) % 360).numpy())
    assert (step > 0).all() and (step < 18).all()            # still spread around the head, in order


# ----------------------------------------------------------------------------------------------
# end to end: a tiny model trained briefly on two heads must follow its cameras
# ----------------------------------------------------------------------------------------------
# the rank score's bounds (``pose_scores``, chance 1/2): measured distributions in the test's docstring below
RANK_UNTRAINED_MAX = 0.6     # an untrained model
RANK_TRAINED_MIN = 0.67      # 900 steps on two heads; the same weights given the wrong cameras stay below it


def denoised_pose_scores(model, data, name: str, sigma: float = 5.0, seed: int = 0, cameras: str = "true"):
    """For each of 8 views spread around one training head: view 0 given, the view's ray map, its latents under
    noise ``sigma`` (high: its own content barely shows) -> one denoiser call, and the predicted normal latent's
    squared distance to each of the 8 true ones. Returns ``(hit, rank)``: the share of targets whose own view is
    the nearest (chance 1/8), and the share of (target, other view) pairs where the target's own view is nearer
    than the other (chance 1/2; finer than ``hit``: 49 pairs per head and seed instead of 7 targets).

    ``cameras`` makes broken stand-ins of the same model: ``"given"`` passes the given view's ray map for every
    target (camera-blind), ``"mirrored"`` the ray map of the view on the other side (yaw with the wrong sign).
    """
    from spinmeround_lite.train import frontal_view, spread_views

    ds = data.train
    i = ds.ids.index(name)
    _, _, yaw, pitch = data.camera(ds, i)
    idx = spread_views(yaw, frontal_view(yaw, pitch), 8)
    x0 = data.latents(name, idx)                                         # (8, 8, h, w)
    rays = data.rays(ds, i, idx)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0[1].shape, generator=g)
    hits, ranks = 0, []
    with torch.no_grad():
        for v in range(1, 8):
            ray_of = {"true": v, "given": 0, "mirrored": (8 - v) % 8}[cameras]
            x = torch.stack([x0[0], x0[v] + sigma * noise])[None]       # given view + target v, same noise each time
            cond = torch.stack([x0[0], torch.zeros_like(x0[0])])[None]
            mask = torch.tensor([[True, False]])
            D = model.denoise(x, torch.tensor([sigma]), cond, mask, rays[[0, ray_of]][None],
                              data.id_emb[name][None])[0, 1]
            d = ((x0[:, 4:] - D[4:]) ** 2).flatten(1).mean(1)
            hits += int(d.argmin()) == v
            ranks.append(float((d[v] < torch.cat([d[:v], d[v + 1:]])).float().mean()))
    return hits / 7, float(np.mean(ranks))


def pose_scores(model, data, heads, seeds=range(8), cameras: str = "true") -> tuple[float, float]:
    """``denoised_pose_scores`` averaged over heads and noise seeds: (hit, rank)."""
    r = np.array([denoised_pose_scores(model, data, h, seed=s, cameras=cameras) for h in heads for s in seeds])
    return float(r[:, 0].mean()), float(r[:, 1].mean())


@pytest.mark.usefixtures("one_thread")
def test_a_briefly_trained_model_follows_its_cameras(tmp_path):
    """900 steps on two heads at the test size: the denoised normals must follow the target's ray map.

    Rank score (2 heads x 8 noise seeds, 784 pairs), measured with this code (the test's ``pose_scores``) for run
    seeds 0-4 (one thread, AVX2 kernels): trained 0.865, 0.856, 0.926, 0.889, 0.777 (mean 0.863, spread 0.054);
    untrained 0.477-0.545; the trained weights given the frontal view's ray map for every target (camera-blind)
    0.47-0.56, the opposite view's (yaw with the wrong sign) 0.26-0.38. Seed 0 on torch's scalar kernels
    (ATEN_CPU_CAPABILITY=default): 0.884 trained, 0.545 untrained, 0.506 camera-blind, 0.256 mirrored. The
    nearest-view hit rate of the same runs (the former score, in steps of 1/56) was 0.32-0.56 against 0.04-0.16
    untrained, and moved from 0.38 to 0.47 between the two kernel paths of one seed: its bound near 0.44 failed on
    another CPU. The threshold 0.67 sits midway between the highest broken score and the lowest trained one,
    3.6 spreads below this test's own seed (0.865).
    """
    from spinmeround_lite.model import SpinModel
    from spinmeround_lite.runs import Run
    from spinmeround_lite.train import TrainData, train

    # a run folder of its own, built from the seed alone: the data, encoders and autoencoder (and so the score)
    # do not depend on what other tests built first
    run = Run.open("test", str(tmp_path / "run"), seed=0, device="cpu")
    data = TrainData(run, progress=False)
    heads = data.train.ids[:2]
    _, untrained = pose_scores(SpinModel.from_profile(run.profile).eval(), data, heads)
    run.profile = run.profile.replace(checkpoint_every=1000, lr=1e-3)
    train(run, steps=900, out=tmp_path / "m", grids=False, identities=heads, progress=False)
    model = SpinModel.load(tmp_path / "m", run.profile).eval()
    hit, rank = pose_scores(model, data, heads)
    _, blind = pose_scores(model, data, heads, cameras="given")
    _, mirrored = pose_scores(model, data, heads, cameras="mirrored")
    print(f"denoised pose: rank {rank:.3f} (hit {hit:.3f}); untrained {untrained:.3f}, camera-blind {blind:.3f}, "
          f"mirrored {mirrored:.3f}")
    assert untrained <= RANK_UNTRAINED_MAX, untrained
    assert rank >= RANK_TRAINED_MIN, (rank, hit)
    assert blind < RANK_TRAINED_MIN and mirrored < RANK_TRAINED_MIN, (blind, mirrored)
