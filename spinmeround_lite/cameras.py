"""Cameras of the PanoHead rig, in the one convention this course uses everywhere.

Convention (stated once, tested in ``tests/test_cameras.py``):

* World: y up, the head centred near the origin and facing +z. Units: the rig radius is 2.7.
* Camera axes are OpenCV's (as gsplat expects): x right, y down, z forward (into the scene).
* ``c2w`` (4, 4) maps camera to world coordinates; its columns 0..2 are the camera axes in world
  coordinates and column 3 the camera centre. ``w2c`` is its inverse.
* ``K`` (3, 3) is in pixels for an image of ``W x H``; pixel ``(u, v)`` has its centre at ``(u + 0.5, v + 0.5)``.
* yaw: the camera's azimuth about +y, 0 = in front of the face (camera on +z), +90 = camera on +x.
  pitch: elevation, positive = camera above the head looking down. No roll.

The rig: radius 2.7, looking at ``LOOK_AT``. The 18.837 deg of PanoHead/EG3D is a *diagonal* field of view
(EG3D computes ``focal = 1 / (tan(fov / 2) * sqrt(2))``), which gives the normalised focal 4.26 (in units of
the image side): the horizontal field of view is about 13.4 deg, so at radius 2.7 the image spans about
+-0.32 world units around the look-at point.
"""

from __future__ import annotations

import math

import torch

RADIUS = 2.7
FOV_DEG = 18.837
FOCAL_NORM = 1.0 / (math.tan(math.radians(FOV_DEG) / 2) * math.sqrt(2))  # about 4.2627, in image sides
LOOK_AT = (0.0, 0.0, 0.0)
PITCH_BAND_DEG = 25.0
ANCHOR_YAWS = (45.0, -45.0, 90.0, -90.0, 135.0, -135.0, 180.0)


def intrinsics(width: int, height: int | None = None, focal_norm: float = FOCAL_NORM) -> torch.Tensor:
    """Pixel intrinsics ``K`` (3, 3) for a ``width x height`` image of the rig camera."""
    height = height or width
    f = focal_norm * width
    return torch.tensor([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float32)


def look_at(eye: torch.Tensor, target=LOOK_AT, up=(0.0, 1.0, 0.0)) -> torch.Tensor:
    """Camera-to-world (..., 4, 4) for cameras at ``eye`` (..., 3) looking at ``target``, OpenCV axes."""
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32).expand_as(eye)
    up = torch.as_tensor(up, dtype=torch.float32).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)         # forward
    x = torch.nn.functional.normalize(torch.cross(z, up, dim=-1), dim=-1)  # right
    y = torch.cross(z, x, dim=-1)                                     # down
    c2w = torch.zeros(*eye.shape[:-1], 4, 4)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_eye(yaw_deg, pitch_deg, radius: float = RADIUS, target=LOOK_AT) -> torch.Tensor:
    """Camera centres (..., 3) on the orbit for yaw and pitch in degrees."""
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float32))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float32))
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    d = torch.stack([torch.cos(pitch) * torch.sin(yaw), torch.sin(pitch), torch.cos(pitch) * torch.cos(yaw)], -1)
    return torch.as_tensor(target, dtype=torch.float32) + radius * d


def orbit_c2w(yaw_deg, pitch_deg=0.0, radius: float = RADIUS, target=LOOK_AT) -> torch.Tensor:
    """Camera-to-world (..., 4, 4) of rig cameras at the given yaw and pitch (degrees)."""
    return look_at(orbit_eye(yaw_deg, pitch_deg, radius, target), target)


def w2c_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """Invert rigid camera-to-world matrices (..., 4, 4) exactly (R^T, -R^T t)."""
    R, t = c2w[..., :3, :3], c2w[..., :3, 3:]
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = R.transpose(-1, -2)
    w2c[..., :3, 3:] = -R.transpose(-1, -2) @ t
    w2c[..., 3, 3] = 1.0
    return w2c


def rig_angles(n_views: int, pitch_band_deg: float = PITCH_BAND_DEG,
               rows: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Yaw and pitch (degrees) of ``n_views`` rig views: yaw evenly over 360 deg, pitch cycling ``rows`` levels.

    With 125 views this is 25 yaws per pitch level in 5 interleaved levels across -band..+band, as a
    360-degree PanoHead capture covers yaw and a band of pitch. View 0 is frontal (yaw 0).
    """
    i = torch.arange(n_views, dtype=torch.float32)
    yaw = (i * 360.0 / n_views + 180.0) % 360.0 - 180.0
    rows = max(1, min(rows, n_views))
    level = (i.long() * 2) % rows if rows > 1 else torch.zeros(n_views, dtype=torch.long)
    pitch = (level.float() / max(rows - 1, 1) * 2 - 1) * pitch_band_deg if rows > 1 else torch.zeros(n_views)
    pitch[0] = 0.0
    return yaw, pitch


def jittered_rig_angles(n_views: int, seed: int, pitch_band_deg: float = PITCH_BAND_DEG
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Yaw and pitch (degrees) of ``n_views`` cameras drawn for one identity: view 0 frontal (0, 0); view ``i`` at
    yaw ``360 i / n`` moved by up to half a step either way, pitch uniform in ``[-band, band]``.

    A fixed rig shows a model the same ``n`` cameras for every head, so it can learn ``n`` codes instead of a
    camera; drawing them per identity makes every training sample's cameras new (notebook 07's camera check).
    """
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    i = torch.arange(n_views, dtype=torch.float32)
    step = 360.0 / max(n_views, 1)
    yaw = i * step + (torch.rand(n_views, generator=g) - 0.5) * step
    pitch = (torch.rand(n_views, generator=g) * 2 - 1) * pitch_band_deg
    yaw[0], pitch[0] = 0.0, 0.0
    return (yaw + 180.0) % 360.0 - 180.0, pitch


def pixel_rays(c2w: torch.Tensor, K: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions through pixel centres.

    c2w (..., 4, 4), K (..., 3, 3) -> origins (..., H, W, 3), directions (..., H, W, 3).
    """
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                          torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    K = K.to(c2w.dtype)
    fx, fy = K[..., 0, 0, None, None], K[..., 1, 1, None, None]
    cx, cy = K[..., 0, 2, None, None], K[..., 1, 2, None, None]
    d_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like((u - cx) / fx)], -1)  # (..., H, W, 3)
    R = c2w[..., None, None, :3, :3]
    d = torch.nn.functional.normalize((R @ d_cam[..., None])[..., 0], dim=-1)
    o = c2w[..., None, None, :3, 3].expand_as(d)
    return o, d


def project(points: torch.Tensor, w2c: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Project world points (..., N, 3) to pixels (..., N, 2) and camera depths (..., N)."""
    cam = points @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = cam[..., 2]
    uv = cam @ K.transpose(-1, -2)
    return uv[..., :2] / uv[..., 2:3], z


# ----------------------------------------------------------------------------------------------
# the released SpinMeRound code's camera convention (a named option, used with the released weights)
# ----------------------------------------------------------------------------------------------
# The released model was trained with ray maps made by its own camera code, which differs from the course's
# OpenCV convention in six ways (notebook 02, "Two conventions side by side", shows both):
#
# 1. A view is named by three angles in degrees ``a = (a0, a1, a2)``; the world-to-camera rotation is
#    ``R = Rz(a2) Ry'(a1) Rx(a0)`` where ``Rx``, ``Rz`` are the usual right-handed rotations and ``Ry'`` is the
#    *transpose* of the usual rotation about y. The translation is always ``(0, 0, 2.7)``: the camera centre
#    ``-R^T t`` is fixed by the rotation alone.
# 2. Camera axes are OpenGL's (x right, y up, z backward), and the camera looks along its ``-z``, which points
#    *away* from the head: the released cameras sit on the far side of the head, looking outward.
# 3. The focal length is a normalised focal (``1 / (tan(fov / 2) sqrt 2)`` with the approximations
#    ``pi ~ 3.14159``, ``sqrt 2 ~ 1.414``: 4.2634) applied to integer pixel coordinates of the latent grid, so
#    the rays of a 64x64 grid fan out over about +-82 degrees instead of the lens's +-6.7.
# 4. No half-pixel offset: pixel ``(i, j)`` (column, row) looks along ``((i - W/2) / f, -(j - H/2) / f, -1)``.
# 5. Directions are not normalised (their z is -1 in camera axes); origins are not divided by the radius.
# 6. Channel order of the encoding: ``x``, then every ``sin(2^k x_j)`` (frequency-major), then every cosine,
#    computed as ``sin(y + pi / 2)`` (``raymaps.released_encode``).
#
# Which angle is which, in the course's words: ``a1`` turns the camera about the world y axis (the turntable;
# the released demo's "360" mode sweeps it), ``a0`` about the world x axis (up and down), ``a2`` about z.
# The rays of the released camera at ``(0, a1, 0)`` run exactly along those of the course's rig camera at
# yaw ``a1``, pitch 0 (``released_c2w`` gives that camera; tests/test_released.py checks it), with origins
# mirrored through the head centre. Pitch differs: the released ``a0`` turns about the *world* x axis after
# the yaw, so away from yaw 0 and 180 it tilts the camera sideways rather than lifting it along the orbit.
RELEASED_FOV_DEG = 18.837
RELEASED_RADIUS = 2.7
RELEASED_FOCAL = float(1 / (math.tan(RELEASED_FOV_DEG * 3.14159 / 360) * 1.414))   # 4.2634, as coded there


def released_angles(yaw_deg, pitch_deg=0.0, roll_deg=0.0) -> torch.Tensor:
    """The released code's angles ``(..., 3) = (a0, a1, a2)`` for a course yaw and pitch: ``(pitch, yaw, roll)``."""
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float32)
    pitch = torch.as_tensor(pitch_deg, dtype=torch.float32)
    roll = torch.as_tensor(roll_deg, dtype=torch.float32)
    yaw, pitch, roll = torch.broadcast_tensors(yaw, pitch, roll)
    return torch.stack([pitch, yaw, roll], -1)


def _released_rotation_one(a: torch.Tensor) -> torch.Tensor:
    """``Rz(a2) Ry'(a1) Rx(a0)`` (3, 3) for angles in radians (3,), in ``a.dtype``; two ``torch.mm`` as coded."""
    def rot(i: int, j: int, ang: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(3, 3, dtype=a.dtype)
        k = 3 - i - j
        m[k, k] = 1
        m[i, i], m[j, j] = torch.cos(ang), torch.cos(ang)
        m[i, j], m[j, i] = -torch.sin(ang), torch.sin(ang)
        return m
    rx = rot(1, 2, a[0])                 # the usual rotation about x
    ry = rot(0, 2, a[1])                 # [[c, 0, -s], [0, 1, 0], [s, 0, c]]: the transpose of the usual one
    rz = rot(0, 1, a[2])                 # the usual rotation about z
    return torch.mm(torch.mm(rz, ry), rx)


def released_w2c(angles_deg, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """World-to-camera (..., 4, 4) of the released convention: rotation ``Rz Ry' Rx``, translation ``(0, 0, 2.7)``.

    ``angles_deg`` (..., 3) = (a0, a1, a2) in degrees. Computed view by view with the same operations as the
    released code, so in float32 it matches that code to the last bit.
    """
    a = torch.as_tensor(angles_deg, dtype=dtype)
    flat = a.reshape(-1, 3)
    out = torch.zeros(len(flat), 4, 4, dtype=dtype)
    for n, ang in enumerate(flat):
        out[n, :3, :3] = _released_rotation_one(ang * math.pi / 180)
        out[n, :3, 3] = torch.tensor([0.0, 0.0, RELEASED_RADIUS], dtype=dtype)
        out[n, 3, 3] = 1
    return out.reshape(*a.shape[:-1], 4, 4)


def released_c2w(angles_deg, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The course's camera (OpenCV, looking *at* the head) that sees what the released camera ``angles_deg`` names.

    Same viewing direction and image axes as the released camera, on the near side of the head: rotation
    ``R^T diag(1, -1, -1)`` (OpenGL -> OpenCV axes), centre ``+R^T t`` (the released centre is ``-R^T t``).
    ``angles_deg`` (..., 3) -> c2w (..., 4, 4) in ``dtype`` (computed in float64). At ``(0, yaw, 0)`` this is
    ``orbit_c2w(yaw, 0)``.
    """
    w2c = released_w2c(angles_deg, torch.float64)
    Rt = w2c[..., :3, :3].transpose(-1, -2)
    c2w = torch.zeros_like(w2c)
    c2w[..., :3, :3] = Rt @ torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    c2w[..., :3, 3] = (Rt @ w2c[..., :3, 3:])[..., 0]
    c2w[..., 3, 3] = 1
    return c2w.to(dtype)


def released_w2c_from_c2w(c2w: torch.Tensor) -> torch.Tensor:
    """The released world-to-camera (..., 4, 4) whose rays run along those of a course camera ``c2w`` (..., 4, 4).

    Only the rotation of ``c2w`` matters (the released translation is always ``(0, 0, 2.7)``):
    ``R = (c2w_R diag(1, -1, -1))^T``. The inverse of ``released_c2w`` for rig cameras.
    """
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype))
    w2c = torch.zeros_like(c2w)
    w2c[..., :3, :3] = (c2w[..., :3, :3] @ flip).transpose(-1, -2)
    w2c[..., 2, 3] = RELEASED_RADIUS
    w2c[..., 3, 3] = 1
    return w2c
