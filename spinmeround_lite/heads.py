"""Procedural heads: an identity is a parameter vector drawn from a seed, its shape a signed distance function.

The course cannot download PanoHead's synthetic identities, so it makes its own (METHOD.md section 8). A head is
a few simple signed distance functions (SDFs) blended with smooth minima:

* skull (ellipsoid), brow ridge, jaw and chin, cheeks, neck (capped cylinder),
* nose (a round cone from the bridge to the tip, plus two wings), ears (flattened ellipsoids with a bowl),
* eyes (eyeballs in sockets, upper lids), lips (two ellipsoids),
* hair in one of several styles (bald, buzz, short, bob, long, bun, ponytail, curly), which covers the back of
  the head too; optionally a beard and glasses.

World frame (``cameras.py``): y up, the head centred at the origin and facing +z; chin to crown about 0.5 world
units, width about 0.35, so the head fits the rig's image (about +-0.32 units) from every yaw.

All functions take points ``(N, 3)`` (any device, float32) and return ``(N,)`` distances or ``(N, 3)`` colours;
they are plain vectorised torch, so they run on CPU and CUDA alike.

    params = sample_identity(seed)          # HeadParams
    sdf = head_sdf(points, params)          # (N,)
    rgb = head_albedo(points, params)       # (N, 3) in [0, 1]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

HAIR_STYLES = ("bald", "buzz", "short", "bob", "long", "bun", "ponytail", "curly")
BEARD_STYLES = ("none", "stubble", "moustache", "full")


# ----------------------------------------------------------------------------------------------
# identity parameters
# ----------------------------------------------------------------------------------------------
@dataclass
class HeadParams:
    """One identity. World units (the head is about 0.5 tall); colours are linear RGB in [0, 1].

    ``to_vector()`` gives the ``(D,)`` float32 vector stored in the dataset (``params``); ``from_vector`` inverts it.
    Categorical choices (hair style, beard, glasses) are stored as whole numbers in the vector.
    """

    scale: float = 1.0            # overall size of the head
    # skull and face shape
    skull_w: float = 0.155        # half-width of the skull ellipsoid (x)
    skull_h: float = 0.185        # half-height (y)
    skull_d: float = 0.198        # half-depth (z)
    skull_y: float = 0.06         # height of the skull centre
    brow: float = 0.03            # brow ridge prominence
    jaw_w: float = 0.118          # half-width of the jaw
    jaw_h: float = 0.14           # half-height of the jaw
    jaw_fwd: float = 0.115        # how far the jaw reaches forward (z)
    chin_r: float = 0.042         # chin radius
    chin_y: float = -0.215        # chin height (the bottom of the face)
    cheek_r: float = 0.048        # cheekbone size
    # nose, ears, eyes, lips
    nose_len: float = 0.075       # bridge to tip, vertical
    nose_w: float = 0.022         # radius at the tip
    nose_proj: float = 0.045      # how far the tip sticks out of the face
    ear_size: float = 0.058       # half-height of the ear
    ear_out: float = 0.25         # protrusion angle of the ears (radians)
    eye_dx: float = 0.062         # half the distance between the eyes
    eye_y: float = 0.0            # eye height
    eye_r: float = 0.022          # eyeball radius
    iris_r: float = 0.35
    iris_g: float = 0.22
    iris_b: float = 0.12
    brow_thick: float = 0.009     # eyebrow thickness (painted)
    lip_w: float = 0.045          # half-width of the mouth
    lip_h: float = 0.012          # lip thickness
    lip_r: float = 0.72
    lip_g: float = 0.38
    lip_b: float = 0.36
    mouth_y: float = -0.12
    # skin and hair
    skin_r: float = 0.86
    skin_g: float = 0.66
    skin_b: float = 0.54
    hair_r: float = 0.2
    hair_g: float = 0.13
    hair_b: float = 0.08
    hair_style: float = 2.0       # index into HAIR_STYLES
    hair_volume: float = 0.02     # thickness of the hair above the skull
    hair_length: float = 0.2      # how far long hair falls below the crown centre
    hairline: float = 0.12        # height of the hairline on the forehead
    # extras
    beard: float = 0.0            # index into BEARD_STYLES
    glasses: float = 0.0          # 0 none, 1 round, 2 rectangular
    glasses_r: float = 0.1
    glasses_g: float = 0.1
    glasses_b: float = 0.1
    neck_r: float = 0.062         # neck radius

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def dim(cls) -> int:
        return len(dataclasses.fields(cls))

    def to_vector(self) -> torch.Tensor:
        """The identity as a float32 vector ``(D,)``, fields in declaration order."""
        return torch.tensor([float(getattr(self, n)) for n in self.names()], dtype=torch.float32)

    @classmethod
    def from_vector(cls, v) -> "HeadParams":
        """Inverse of ``to_vector``: ``v`` is a ``(D,)`` tensor, array or list."""
        v = [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]
        if len(v) != cls.dim():
            raise ValueError(f"a HeadParams vector has {cls.dim()} numbers, got {len(v)}")
        return cls(**dict(zip(cls.names(), v)))

    # readable views of the categorical fields
    @property
    def hair_style_name(self) -> str:
        return HAIR_STYLES[int(round(self.hair_style))]

    @property
    def beard_name(self) -> str:
        return BEARD_STYLES[int(round(self.beard))]

    def describe(self) -> str:
        g = ("no glasses", "round glasses", "rectangular glasses")[int(round(self.glasses))]
        return f"{self.hair_style_name} hair, beard: {self.beard_name}, {g}, scale {self.scale:.2f}"


# palettes to draw colours from (linear-ish RGB)
_SKIN = np.array([[0.97, 0.82, 0.72], [0.93, 0.74, 0.62], [0.85, 0.64, 0.50], [0.74, 0.53, 0.38],
                  [0.60, 0.41, 0.28], [0.45, 0.30, 0.20], [0.32, 0.21, 0.15]])
_HAIR = np.array([[0.05, 0.04, 0.04], [0.16, 0.10, 0.06], [0.32, 0.20, 0.11], [0.55, 0.38, 0.20],
                  [0.85, 0.70, 0.42], [0.62, 0.26, 0.10], [0.75, 0.74, 0.72], [0.93, 0.92, 0.88]])
_HAIR_P = np.array([0.28, 0.22, 0.16, 0.1, 0.1, 0.06, 0.05, 0.03])
_DYED = np.array([[0.25, 0.35, 0.80], [0.80, 0.30, 0.55], [0.35, 0.65, 0.45], [0.55, 0.30, 0.75]])
_IRIS = np.array([[0.30, 0.17, 0.08], [0.45, 0.30, 0.15], [0.35, 0.45, 0.25], [0.25, 0.45, 0.70],
                  [0.45, 0.50, 0.55], [0.12, 0.08, 0.05]])
_GLASSES = np.array([[0.06, 0.06, 0.06], [0.55, 0.35, 0.15], [0.75, 0.65, 0.35], [0.6, 0.1, 0.1],
                     [0.15, 0.25, 0.6]])


def sample_identity(seed: int) -> HeadParams:
    """Draw one identity from ``seed`` (same seed, same identity, on any machine).

    A hidden "build" number ``m`` in [0, 1] correlates jaw width, brow ridge, beard and hair length, so that the
    combinations stay plausible; everything else is drawn independently.
    """
    rng = np.random.default_rng(int(seed) + 7919)
    u = rng.uniform
    m = u()                                                   # build: 0 narrow and fine, 1 broad and strong
    lerp = lambda a, b, t: a + (b - a) * t

    skin = _pick_blend(rng, _SKIN) * u(0.96, 1.04, 3)
    if u() < 0.06:
        hair = _DYED[rng.integers(len(_DYED))] * u(0.85, 1.1, 3)
    else:
        i = rng.choice(len(_HAIR), p=_HAIR_P)
        hair = _HAIR[i] * u(0.85, 1.15, 3)
    iris = _IRIS[rng.integers(len(_IRIS))] * u(0.85, 1.15, 3)
    lips = np.clip(skin * np.array([0.9, 0.62, 0.62]) * u(0.85, 1.05) + np.array([0.05, 0.0, 0.02]), 0, 1)

    long_p = lerp(0.45, 0.1, m)                               # long styles likelier for small m
    styles = np.array([0.08 + 0.1 * m, 0.06 + 0.08 * m, 0.18 + 0.1 * m, 0.14, 0.6 * long_p, 0.5 * long_p,
                       0.4 * long_p, 0.1])
    style = int(rng.choice(len(HAIR_STYLES), p=styles / styles.sum()))
    beard = 0
    if m > 0.45 and u() < 0.55:
        beard = int(rng.choice([1, 2, 3], p=[0.35, 0.25, 0.4]))
    glasses = int(rng.choice([0, 1, 2], p=[0.72, 0.13, 0.15]))
    gl = _GLASSES[rng.integers(len(_GLASSES))]

    params = HeadParams(
        scale=u(0.92, 1.04),
        skull_w=u(0.142, 0.165), skull_h=u(0.172, 0.198), skull_d=u(0.183, 0.212), skull_y=u(0.045, 0.075),
        brow=lerp(0.015, 0.04, m) + u(-0.005, 0.005),
        jaw_w=lerp(0.098, 0.132, m) + u(-0.008, 0.008), jaw_h=u(0.125, 0.155), jaw_fwd=u(0.10, 0.13),
        chin_r=lerp(0.034, 0.05, m) + u(-0.004, 0.004), chin_y=u(-0.235, -0.2), cheek_r=u(0.04, 0.056),
        nose_len=u(0.06, 0.09), nose_w=u(0.016, 0.028), nose_proj=u(0.032, 0.058),
        ear_size=u(0.048, 0.066), ear_out=u(0.1, 0.5),
        eye_dx=u(0.055, 0.068), eye_y=u(-0.015, 0.015), eye_r=u(0.019, 0.025),
        iris_r=iris[0], iris_g=iris[1], iris_b=iris[2],
        brow_thick=u(0.006, 0.013),
        lip_w=u(0.036, 0.054), lip_h=u(0.008, 0.016), lip_r=lips[0], lip_g=lips[1], lip_b=lips[2],
        mouth_y=u(-0.135, -0.11),
        skin_r=skin[0], skin_g=skin[1], skin_b=skin[2],
        hair_r=hair[0], hair_g=hair[1], hair_b=hair[2],
        hair_style=float(style), hair_volume=u(0.012, 0.03), hair_length=u(0.18, 0.36), hairline=u(0.09, 0.15),
        beard=float(beard), glasses=float(glasses), glasses_r=gl[0], glasses_g=gl[1], glasses_b=gl[2],
        neck_r=lerp(0.062, 0.078, m) + u(-0.004, 0.004),
    )
    return HeadParams.from_vector(params.to_vector())       # float32 values: the stored vector renders the same


def _pick_blend(rng: np.random.Generator, palette: np.ndarray) -> np.ndarray:
    """A colour between two neighbouring entries of a palette ordered light to dark."""
    t = rng.uniform(0, len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    return palette[i] + (palette[i + 1] - palette[i]) * (t - i)


# ----------------------------------------------------------------------------------------------
# SDF building blocks (points split into x, y, z columns; every constant is a Python float)
# ----------------------------------------------------------------------------------------------
def smin(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Polynomial smooth minimum (a blend of radius ``k``); ``k = 0`` is the plain minimum."""
    if k <= 0:
        return torch.minimum(a, b)
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return torch.lerp(b, a, h) - k * h * (1.0 - h)


def smax(a: torch.Tensor, b: torch.Tensor, k: float) -> torch.Tensor:
    """Smooth maximum (smooth intersection; ``smax(a, -b)`` is a smooth subtraction)."""
    return -smin(-a, -b, k)


def sd_sphere(x, y, z, c, r):
    return torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) - r


def sd_ellipsoid(x, y, z, c, r):
    """Approximate distance to an axis-aligned ellipsoid with centre ``c`` and radii ``r`` (a lower bound near it)."""
    qx, qy, qz = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = torch.sqrt(qx * qx + qy * qy + qz * qz)
    k1 = torch.sqrt((qx / r[0]) ** 2 + (qy / r[1]) ** 2 + (qz / r[2]) ** 2)
    return k0 * (k0 - 1.0) / k1.clamp_min(1e-6)


def sd_round_cone(x, y, z, a, b, r1, r2):
    """Distance to a capsule from ``a`` (radius ``r1``) to ``b`` (radius ``r2``), radius linear along it."""
    bax, bay, baz = b[0] - a[0], b[1] - a[1], b[2] - a[2]
    L2 = bax * bax + bay * bay + baz * baz
    px, py, pz = x - a[0], y - a[1], z - a[2]
    h = ((px * bax + py * bay + pz * baz) / L2).clamp(0.0, 1.0)
    d = torch.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2 + (pz - baz * h) ** 2)
    return d - (r1 + (r2 - r1) * h)


def sd_capped_cylinder_y(x, y, z, c, r, y0, y1):
    """Vertical cylinder through ``(c[0], ., c[1])`` of radius ``r`` between heights ``y0 < y1``."""
    dr = torch.sqrt((x - c[0]) ** 2 + (z - c[1]) ** 2) - r
    dy = torch.maximum(y0 - y, y - y1)
    outside = torch.sqrt(dr.clamp_min(0) ** 2 + dy.clamp_min(0) ** 2)
    return outside + torch.maximum(dr, dy).clamp_max(0)


def sd_ring_z(x, y, z, c, R, r, aspect=1.0):
    """A ring (torus) in the plane ``z = c[2]`` around ``(c[0], c[1])``: big radius ``R``, tube ``r``.

    ``aspect > 1`` stretches it along x (rectangular-ish glasses).
    """
    q = torch.sqrt(((x - c[0]) / aspect) ** 2 + (y - c[1]) ** 2) - R
    return torch.sqrt(q * q + (z - c[2]) ** 2) - r


def _rot_y(x, z, angle):
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * z, -s * x + c * z


# ----------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------
class Head:
    """The SDF and colours of one identity. ``Head(params).sdf(points)``, ``.albedo(points)``, ``.parts(points)``.

    Parts are placed on the face surface: ``surface_z(x, y)`` (the front of the skull and jaw ellipsoids) tells
    where the eyes, nose, lips, chin and glasses sit, so that they follow the face shape of each identity.
    """

    bound_radius = 0.5      # every visible part lies inside this sphere around the origin (the renderer's bound)
    lift = 0.025            # the head frame sits this much above the world origin (centres chin-to-crown)
    BOUND_Y, BOUND_Z, BOUND_R = (-0.7, 0.07), -0.05, 0.29   # capsule around every part (head frame; tested)

    def __init__(self, params: HeadParams):
        p = self.p = params
        self.style = HAIR_STYLES[int(round(params.hair_style))]
        self.beard = BEARD_STYLES[int(round(params.beard))]
        self.glasses = int(round(params.glasses))
        # the blends and curls make the SDF slightly steeper than a true distance: sphere tracing steps shorter
        self.step_scale = 0.75 if self.style == "curly" else 0.9
        self.skull_c = (0.0, p.skull_y, -0.035)
        self.skull_r = (p.skull_w, p.skull_h, p.skull_d)
        self.jaw_c = (0.0, p.chin_y + p.jaw_h * 0.85, 0.015)
        self.jaw_r = (p.jaw_w, p.jaw_h, p.jaw_fwd)
        self.eye_c = (p.eye_dx, p.eye_y, self.surface_z(p.eye_dx, p.eye_y) - 0.5 * p.eye_r)
        self.nose_top = (0.0, p.eye_y + 0.008, self.surface_z(0.0, p.eye_y) + 0.002)
        ty = p.eye_y - p.nose_len
        self.nose_tip = (0.0, ty, self.surface_z(0.0, ty) + p.nose_proj - p.nose_w)
        self.lips_z = self.surface_z(0.0, p.mouth_y) - 0.006
        self.chin_c = (0.0, p.chin_y + p.chin_r, self.surface_z(0.0, p.chin_y + p.chin_r * 1.3) - p.chin_r + 0.01)
        self.brow_c = (0.0, p.eye_y + 0.042, self.surface_z(0.0, p.eye_y + 0.042) - 0.04 + p.brow * 0.35)
        cy = p.eye_y - 0.045
        self.cheek_c = (p.eye_dx + 0.01, cy, self.surface_z(p.eye_dx + 0.01, cy) - p.cheek_r + 0.008)
        self.glasses_z = max(self.eye_c[2] + p.eye_r + 0.014, self.nose_top[2] + 0.016)

    def surface_z(self, x: float, y: float) -> float:
        """Depth (z) of the front of the skull and jaw ellipsoids at height ``y`` and side offset ``x``."""
        best = -1.0
        for c, r in ((self.skull_c, self.skull_r), (self.jaw_c, self.jaw_r)):
            q = 1.0 - ((x - c[0]) / r[0]) ** 2 - ((y - c[1]) / r[1]) ** 2
            if q > 0:
                best = max(best, c[2] + r[2] * math.sqrt(q))
        return best

    # -- geometry in the head's own (unscaled) frame ----------------------------------------------
    def _geometry(self, pts: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signed distances of every part group at ``pts`` (N, 3) in head units. -> dict of (N,)."""
        p = self.p
        x, y, z = pts.unbind(-1)
        ax = x.abs()                                           # left/right symmetric parts use |x|
        out = {}

        # skull with a brow ridge; jaw and chin; cheeks
        skull = sd_ellipsoid(x, y, z, self.skull_c, self.skull_r)
        brow = sd_ellipsoid(x, y, z, self.brow_c, (p.skull_w * 0.62, 0.026, 0.04))
        out["skull"] = smin(skull, brow, 0.025)
        jaw = sd_ellipsoid(x, y, z, self.jaw_c, self.jaw_r)
        chin = sd_sphere(x, y, z, self.chin_c, p.chin_r)
        cheeks = sd_sphere(ax, y, z, self.cheek_c, p.cheek_r)
        out["jaw"] = smin(smin(jaw, chin, 0.04), cheeks, 0.04)
        out["neck"] = sd_capped_cylinder_y(x, y, z, (0.0, -0.045), p.neck_r, -0.6, p.chin_y + 0.1)

        # nose: bridge to tip, plus wings
        tip = self.nose_tip
        nose = sd_round_cone(x, y, z, self.nose_top, tip, 0.009, p.nose_w)
        wings = sd_sphere(ax, y, z, (p.nose_w * 0.95, tip[1] - 0.004, tip[2] - p.nose_w * 0.9), p.nose_w * 0.8)
        out["nose"] = smin(nose, wings, 0.01)

        # ears: flattened ellipsoids turned outwards, with a bowl
        ex, ez = _rot_y(ax - (p.skull_w - 0.008), z + 0.03, -p.ear_out)
        ear = sd_ellipsoid(ex, y, ez, (0.012, p.eye_y - 0.02, 0.0), (0.014, p.ear_size, p.ear_size * 0.6))
        bowl = sd_ellipsoid(ex, y, ez, (0.026, p.eye_y - 0.025, 0.004), (0.01, p.ear_size * 0.7, p.ear_size * 0.4))
        out["ears"] = smax(ear, -bowl, 0.006)

        # eyes: eyeballs (their sockets are cut from the face in `_compose`), upper lids
        eye_c = self.eye_c
        out["eyes"] = sd_sphere(ax, y, z, eye_c, p.eye_r)
        lid = sd_sphere(ax, y, z, eye_c, p.eye_r * 1.1)
        out["lids"] = smax(lid, -(y - (eye_c[1] + p.eye_r * 0.35)) - 0.1 * (z - eye_c[2]), 0.003)

        # lips
        lz = self.lips_z
        upper = sd_ellipsoid(x, y, z, (0.0, p.mouth_y + p.lip_h * 0.7, lz), (p.lip_w, p.lip_h, 0.018))
        lower = sd_ellipsoid(x, y, z, (0.0, p.mouth_y - p.lip_h * 0.8, lz - 0.003), (p.lip_w * 0.85, p.lip_h, 0.018))
        out["lips"] = smin(upper, lower, 0.004)

        out["hair"] = self._hair(x, y, z, skull)
        if self.beard in ("moustache", "full"):
            out["beard"] = self._beard(x, y, z)
        if self.glasses:
            out["glasses"] = self._glasses(x, y, z)
        return out

    def _hair(self, x, y, z, skull):
        p = self.p
        style = self.style
        if style == "bald":
            return torch.full_like(x, 1.0)
        v = {"buzz": 0.004, "curly": p.hair_volume + 0.03}.get(style, p.hair_volume)
        shell = skull - v
        if style == "curly":                                   # curls: bumps on a big volume
            shell = shell - 0.008 * torch.sin(40 * x) * torch.sin(40 * y) * torch.sin(40 * z)
        # the hairline: a plane tilted from the forehead (front, high) to the nape (back, low)
        front = p.hairline + p.skull_y - 0.06
        cut = ((y - front) - 0.9 * (z - (p.skull_d - 0.06))) / 1.345  # > 0 above the hairline (unit slope)
        hair = smax(shell, -cut, 0.02)
        c, r = self.skull_c, self.skull_r
        if style in ("bob", "long"):                           # a curtain: the skull outline pulled down
            yb = c[1] - (0.13 if style == "bob" else p.hair_length)
            yc = torch.maximum(y, torch.full_like(y, c[1]))
            taper = 1.0 - 0.12 * ((c[1] - y) / max(c[1] - yb, 1e-3)).clamp(0.0, 1.0)   # narrower towards the ends
            curtain = sd_ellipsoid(x / taper, yc, z, (0.0, c[1], c[2] - 0.01), (r[0] + v + 0.012, r[1], r[2] + v))
            curtain = smax(curtain, yb - y, 0.04)               # ends, rounded, at yb
            curtain = smax(curtain, z - (0.0 if style == "long" else 0.04), 0.03)  # behind the face
            hair = smin(hair, curtain, 0.02)
        elif style == "bun":
            bun = sd_sphere(x, y, z, (0.0, c[1] + r[1] * 0.55, c[2] - r[2] * 0.85), 0.052)
            hair = smin(hair, bun, 0.015)
        elif style == "ponytail":
            a = (0.0, c[1] + 0.03, c[2] - r[2] - 0.005)
            b = (0.0, c[1] - p.hair_length, c[2] - r[2] - 0.02)
            hair = smin(hair, sd_round_cone(x, y, z, a, b, 0.035, 0.022), 0.03)
        return hair

    def _beard(self, x, y, z):
        p = self.p
        if self.beard == "moustache":
            return sd_ellipsoid(x, y, z, (0.0, p.mouth_y + p.lip_h * 2.3, self.lips_z + 0.004),
                                (p.lip_w * 1.05, 0.009, 0.016))
        (cx, cy, cz), (rx, ry, rz) = self.jaw_c, self.jaw_r
        jaw = sd_ellipsoid(x, y, z, (cx, cy, cz), (rx + 0.012, ry + 0.014, rz + 0.018))
        chin = sd_sphere(x, y, z, self.chin_c, p.chin_r + 0.016)
        jaw = smin(jaw, chin, 0.03)
        jaw = smax(jaw, y - (p.mouth_y + p.lip_h * 3.2), 0.01)  # below the moustache line
        jaw = smax(jaw, -(z + 0.02), 0.02)                      # on the front and sides of the jaw
        mouth = sd_ellipsoid(x, y, z, (0.0, p.mouth_y, self.lips_z + 0.02), (p.lip_w * 1.1, p.lip_h * 2.2, 0.05))
        return smax(jaw, -mouth, 0.006)

    def _glasses(self, x, y, z):
        p = self.p
        ax = x.abs()
        zc = self.glasses_z
        R = p.eye_r * 1.3
        aspect = 1.0 if self.glasses == 1 else 1.3
        gx = p.eye_dx + 0.002
        rims = sd_ring_z(ax, y, z, (gx, p.eye_y - 0.004, zc), R, 0.0035, aspect)
        bridge = sd_round_cone(x, y, z, (-(gx - R * aspect), p.eye_y + 0.004, zc),
                               (gx - R * aspect, p.eye_y + 0.004, zc), 0.003, 0.003)
        hinge = gx + R * aspect
        arms = sd_round_cone(ax, y, z, (hinge, p.eye_y, zc), (p.skull_w + 0.004, p.eye_y, -0.01), 0.003, 0.003)
        return torch.minimum(torch.minimum(rims, bridge), arms)

    def _compose(self, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Blend the part groups into material regions: skin, lips, eyes, hair, beard, glasses. -> dict of (N,)."""
        skin = smin(g["skull"], g["jaw"], 0.06)
        skin = smin(skin, g["neck"], 0.05)
        skin = smin(skin, g["nose"], 0.015)
        skin = smin(skin, g["ears"], 0.015)
        sockets = g["eyes"] - 0.006
        skin = smax(skin, -sockets, 0.012)                       # eye sockets
        skin = smin(skin, g["lids"], 0.004)
        lips = g["lips"]
        skin_l = smin(skin, lips, 0.01)
        out = {"skin": skin, "lips": lips, "skin_l": skin_l, "eyes": g["eyes"], "hair": g["hair"]}
        if "beard" in g:
            out["beard"] = g["beard"]
        if "glasses" in g:
            out["glasses"] = g["glasses"]
        return out

    # -- public -----------------------------------------------------------------------------------
    def to_head(self, points: torch.Tensor) -> torch.Tensor:
        """World points (N, 3) to the head's own frame: undo the scale, and lift so the head sits centred."""
        q = points / self.p.scale
        return q + q.new_tensor([0.0, self.lift, 0.0])

    def parts(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Signed distances of the separate parts (skull, jaw, neck, nose, ears, eyes, lids, lips, hair, ...)."""
        s = self.p.scale
        return {k: v * s for k, v in self._geometry(self.to_head(points)).items()}

    def bound_sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Distance to a vertical capsule that contains the whole head (a lower bound of ``sdf``). (N,3) -> (N,)."""
        q = self.to_head(points)
        x, y, z = q.unbind(-1)
        yc = y.clamp(self.BOUND_Y[0], self.BOUND_Y[1])
        d = torch.sqrt(x * x + (y - yc) ** 2 + (z - self.BOUND_Z) ** 2) - self.BOUND_R
        return d * self.p.scale

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance of the whole head at world points ``(N, 3)`` -> ``(N,)`` (negative inside)."""
        s = self.p.scale
        m = self._compose(self._geometry(self.to_head(points)))
        d = torch.minimum(torch.minimum(m["skin_l"], m["eyes"]), m["hair"])
        for k in ("beard", "glasses"):
            if k in m:
                d = torch.minimum(d, m[k])
        return d * s

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """Base colour at (near-)surface world points ``(N, 3)`` -> ``(N, 3)`` in [0, 1].

        Each material region owns the points where its distance is smallest (soft weights over a few
        thousandths of a unit, so the seams are smooth); details are painted on top (eyebrows, iris and pupil,
        the line between the lips, hair streaks).
        """
        p = self.p
        q = self.to_head(points)
        x, y, z = q.unbind(-1)
        ax = x.abs()
        m = self._compose(self._geometry(q))
        dev, dt = points.device, points.dtype
        col = lambda *c: torch.tensor(c, device=dev, dtype=dt)
        skin_c = col(p.skin_r, p.skin_g, p.skin_b)
        hair_c = col(p.hair_r, p.hair_g, p.hair_b)

        # skin, with eyebrows and a touch of colour on the cheeks
        skin = skin_c.expand(len(q), 3).clone()
        brow_c = hair_c * 0.8 if self.style != "bald" else skin_c * 0.45
        bd = sd_ellipsoid(ax, y - 0.09 * (ax - p.eye_dx), z, (p.eye_dx + 0.004, p.eye_y + p.eye_r + 0.016, 0.0),
                          (0.03, p.brow_thick, 1.0))
        w_brow = torch.sigmoid(-bd / 0.002)[:, None]
        cheek = sd_sphere(ax, y, z, (p.eye_dx + 0.012, p.eye_y - 0.055, p.jaw_fwd), 0.035)
        skin = skin * (1 - 0.12 * torch.sigmoid(-cheek / 0.01)[:, None] * col(0.0, 0.6, 0.6))
        skin = torch.lerp(skin, brow_c.expand_as(skin), w_brow)
        if self.beard == "stubble":                            # stubble: a painted shadow on the jaw
            st = (y < p.mouth_y + p.lip_h * 3.0) & (z > -0.03) & (y > p.chin_y - 0.05)
            skin = torch.where(st[:, None], torch.lerp(skin, hair_c.expand_as(skin), 0.45), skin)
        # lips, with a dark line where they meet
        lips = col(p.lip_r, p.lip_g, p.lip_b).expand(len(q), 3)
        lips = lips * (1 - 0.55 * torch.exp(-((y - p.mouth_y) / 0.003) ** 2))[:, None]
        # eyes: white, iris, pupil by the angle from the eye's forward axis
        ec = self.eye_c
        dx, dy, dz = ax - ec[0], y - ec[1], z - ec[2]
        cosang = dz / torch.sqrt(dx * dx + dy * dy + dz * dz).clamp_min(1e-6)
        iris_c = col(p.iris_r, p.iris_g, p.iris_b)
        eyes = torch.where((cosang > 0.72)[:, None], iris_c, col(0.9, 0.88, 0.85))
        eyes = torch.where((cosang > 0.93)[:, None], col(0.03, 0.03, 0.03), eyes)
        # hair with streaks
        ang = torch.atan2(x, z)
        streak = 0.85 + 0.15 * torch.sin(40 * ang + 25 * y) * torch.sin(13 * ang)
        hair = hair_c * streak[:, None]

        names, cols = ["skin", "lips", "eyes", "hair"], [skin, lips, eyes, hair]
        if "beard" in m:
            names.append("beard")
            cols.append(hair_c * (0.9 + 0.1 * torch.sin(90 * x + 70 * y))[:, None])
        if "glasses" in m:
            names.append("glasses")
            cols.append(col(p.glasses_r, p.glasses_g, p.glasses_b).expand(len(q), 3))
        d = torch.stack([m[n] for n in names], -1)               # (N, M)
        w = torch.softmax(-(d - d.min(-1, keepdim=True).values) / 0.0015, dim=-1)
        rgb = (w[..., None] * torch.stack(cols, 1)).sum(1)
        return rgb.clamp(0.0, 1.0)


def head_sdf(points: torch.Tensor, params: HeadParams) -> torch.Tensor:
    """Signed distance of the head ``params`` at world points ``(N, 3)`` -> ``(N,)``."""
    return Head(params).sdf(points)


def head_albedo(points: torch.Tensor, params: HeadParams) -> torch.Tensor:
    """Base colour of the head ``params`` at world surface points ``(N, 3)`` -> ``(N, 3)``."""
    return Head(params).albedo(points)


def head_parts(points: torch.Tensor, params: HeadParams) -> dict[str, torch.Tensor]:
    """Signed distances of each part of the head at world points ``(N, 3)`` -> dict of ``(N,)``."""
    return Head(params).parts(points)
