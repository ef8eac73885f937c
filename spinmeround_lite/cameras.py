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
FOCAL_NORM = 1.0 / (math.tan(math.radians(FOV_DEG) / 2) * math.sqrt(2))  # about 4.2647, in image sides
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


def world_to_camera_dirs(vectors: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """Rotate world vectors (..., 3) into camera axes (OpenCV) of ``c2w`` (4, 4)."""
    return vectors @ c2w[:3, :3]
