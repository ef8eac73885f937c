import math

import pytest
import torch

from spinmeround_lite import cameras as C


def test_focal_matches_panohead():
    assert abs(C.FOCAL_NORM - 4.2627) < 1e-4      # 1 / (tan(18.837 deg / 2) sqrt 2)


def test_opencv_axes_frontal_camera():
    c2w = C.orbit_c2w(0.0, 0.0)
    # camera on +z looking at the origin: forward -z, right +x, down -y
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([0.0, 0.0, C.RADIUS]))
    torch.testing.assert_close(c2w[:3, 2], torch.tensor([0.0, 0.0, -1.0]))
    torch.testing.assert_close(c2w[:3, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(c2w[:3, 1], torch.tensor([0.0, -1.0, 0.0]))


def test_yaw_and_pitch_directions():
    eye = C.orbit_eye(90.0, 0.0)
    assert eye[0] > 2.6 and abs(eye[2]) < 1e-5
    assert C.orbit_eye(0.0, 30.0)[1] > 0  # positive pitch: above


@pytest.mark.floats
def test_w2c_inverts_c2w():
    # float32 rounding: at most 3e-7 (ATEN_CPU_CAPABILITY=default and native, one thread); tolerance 1e-5
    yaw, pitch = C.rig_angles(125)
    c2w = C.orbit_c2w(yaw, pitch)
    eye = C.w2c_from_c2w(c2w) @ c2w
    torch.testing.assert_close(eye, torch.eye(4).expand(125, 4, 4), atol=1e-5, rtol=0)


def test_rig_covers_360_and_pitch_band():
    yaw, pitch = C.rig_angles(125)
    assert yaw.shape == (125,) and yaw[0] == 0 and pitch[0] == 0
    assert yaw.min() >= -180 and yaw.max() < 180
    assert len(torch.unique(pitch)) == 5 and pitch.abs().max() <= C.PITCH_BAND_DEG + 1e-6
    gaps = torch.diff(torch.sort(yaw).values)
    assert gaps.max() < 3.0


@pytest.mark.floats
def test_center_ray_hits_look_at():
    # the largest miss 5.1e-7 on both kernel paths (float32 rounding at radius 2.7); tolerance 1e-5
    yaw, pitch = C.rig_angles(125)
    c2w = C.orbit_c2w(yaw, pitch)
    K = C.intrinsics(64)
    o, d = C.pixel_rays(c2w, K, 64, 64)
    # the image centre lies between the four central pixels: average their rays
    dc = torch.nn.functional.normalize(d[:, 31:33, 31:33].mean((1, 2)), dim=-1)
    oc = o[:, 32, 32]
    to_target = -oc
    t = (to_target * dc).sum(-1, keepdim=True)
    miss = (oc + t * dc).norm(dim=-1)
    assert miss.max() < 1e-5


@pytest.mark.floats
def test_projection_roundtrip_known_point():
    # 3.8e-6 px on both kernel paths; tolerance 1e-3 px
    c2w = C.orbit_c2w(30.0, 10.0)
    w2c = C.w2c_from_c2w(c2w)
    K = C.intrinsics(64)
    o, d = C.pixel_rays(c2w, K, 64, 64)
    p = o[17, 40] + 2.5 * d[17, 40]
    uv, z = C.project(p[None], w2c, K)
    torch.testing.assert_close(uv[0], torch.tensor([40.5, 17.5]), atol=1e-3, rtol=0)
    assert z[0] > 0
    half = math.atan(0.5 / C.FOCAL_NORM)
    assert abs(math.degrees(2 * half) - 13.4) < 0.1
