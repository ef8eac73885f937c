"""Batched sphere tracing of signed distance functions: RGB on white, alpha, camera-space normals, depth.

Sphere tracing marches each ray ``x(t) = o + t d`` by the distance the SDF promises is empty,
``t <- t + f(x(t))``, until ``f`` is below a fraction of the pixel's footprint (a hit) or the ray leaves the
bounding sphere (a miss). The normal is the SDF gradient ``n = grad f / |grad f|`` (tetrahedral central differences,
4 evaluations). Rays are traced in chunks, and each step evaluates only the rays still marching.

Anti-aliasing costs nothing extra: a ray that passes the surface within half a pixel's footprint without hitting
it gets partial coverage ``alpha = clamp(0.5 - f_min / footprint, 0, 1)``, coloured at its closest point.

Shading is simple and tied to the camera (so every view of a head is lit alike): albedo times
(ambient x occlusion + Lambert from a key light above-left of the camera), plus a little Blinn specular and rim.

A scene is anything with ``sdf(points (N,3)) -> (N,)`` and ``albedo(points (N,3)) -> (N,3)`` (optional
``bound_radius``, ``step_scale``): a ``heads.Head``, or a ``Sphere`` below.

    out = render_views(sample_identity(3), c2w (V,4,4), K (3,3), 64, 64)
    out["rgb"] (V,H,W,3), out["alpha"] (V,H,W), out["normal"] (V,H,W,3), out["depth"] (V,H,W), out["points"] (V,H,W,3)
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from . import cameras
from .heads import Head, HeadParams

# key light and its half vector are fixed in camera axes (OpenCV: x right, y down, z forward)
LIGHT_CAM = F.normalize(torch.tensor([-0.45, -0.55, -1.0]), dim=0)   # towards the light: up-left, in front


class Sphere:
    """A coloured sphere: the simplest scene (tests, teaching). ``sdf(p) = |p - c| - r``."""

    def __init__(self, center=(0.0, 0.0, 0.0), radius: float = 0.2, color=(0.8, 0.5, 0.3)):
        self.center, self.radius, self.color = tuple(center), float(radius), tuple(color)
        self.bound_radius = math.sqrt(sum(c * c for c in self.center)) + self.radius + 0.01
        self.step_scale = 1.0

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        return (points - points.new_tensor(self.center)).norm(dim=-1) - self.radius

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return points.new_tensor(self.color).expand(len(points), 3)


def as_scene(obj):
    """A scene from a ``HeadParams``, a parameter vector ``(D,)``, or anything with ``sdf``/``albedo``."""
    if isinstance(obj, HeadParams):
        return Head(obj)
    if isinstance(obj, torch.Tensor) or hasattr(obj, "__array__"):
        return Head(HeadParams.from_vector(obj))
    if hasattr(obj, "sdf") and hasattr(obj, "albedo"):
        return obj
    raise TypeError(f"cannot render {type(obj).__name__}: pass HeadParams, a parameter vector, or a scene "
                    "with sdf() and albedo()")


# ----------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------
def ray_sphere(o: torch.Tensor, d: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit ``t`` (N,) of unit rays ``o, d`` (N,3) with the sphere of ``radius`` at the origin, and the
    mask (N,) of rays that meet it."""
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius * radius
    disc = b * b - c
    meet = disc > 0
    s = disc.clamp_min(0).sqrt()
    t0, t1 = (-b - s).clamp_min(0), -b + s
    return t0, t1, meet & (t1 > 0)


@torch.no_grad()
def sphere_trace(scene, o: torch.Tensor, d: torch.Tensor, footprint: torch.Tensor, max_steps: int = 64,
                 hit_frac: float = 0.2) -> dict[str, torch.Tensor]:
    """March rays ``o, d`` (N,3) through ``scene``. ``footprint`` (N,): a pixel's width per unit of ``t``.

    A scene may offer ``bound_sdf(points)``, the distance to a simple shape that contains it (never more than the
    true distance): rays farther than a small margin from that shape step by it without evaluating the full SDF.

    Returns ``t`` (N,) (hit distance, or the closest approach for a miss), ``hit`` (N,) bool, ``cover`` (N,) in
    [0, 1] (1 for hits, partial for near misses), ``steps`` (int, marching iterations).
    """
    n = len(o)
    t_near, t_far, meet = ray_sphere(o, d, getattr(scene, "bound_radius", 1.0))
    step_scale = getattr(scene, "step_scale", 1.0)
    bound = getattr(scene, "bound_sdf", None)                  # optional cheap lower bound of the SDF
    bound_margin = 0.02
    t = t_near.clone()
    best = torch.full((n,), math.inf, device=o.device)       # smallest f / (t * footprint) along the ray
    best_t = t_near.clone()
    hit = torch.zeros(n, dtype=torch.bool, device=o.device)
    idx = torch.nonzero(meet).squeeze(1)
    steps = 0
    for steps in range(1, max_steps + 1):
        if idx.numel() == 0:
            break
        ti = t[idx]
        x = o[idx] + ti[:, None] * d[idx]
        if bound is None:
            f = scene.sdf(x)
        else:                                                  # far from the bound: its distance is a safe step
            f = bound(x)
            near = torch.nonzero(f < bound_margin).squeeze(1)
            if near.numel():
                f[near] = scene.sdf(x[near])
        fp = ti * footprint[idx]
        ratio = f / fp
        closer = ratio < best[idx]
        best[idx] = torch.where(closer, ratio, best[idx])
        best_t[idx] = torch.where(closer, ti, best_t[idx])
        is_hit = f < hit_frac * fp
        t_next = ti + step_scale * f
        is_out = t_next > t_far[idx]
        hit[idx[is_hit]] = True
        t[idx] = torch.where(is_hit, ti, t_next)
        idx = idx[~(is_hit | is_out)]
    if idx.numel():                                            # out of steps: close enough counts as a hit
        hit[idx[best[idx] < 0.5]] = True
    t = torch.where(hit, t, best_t)
    cover = torch.where(hit, torch.ones_like(best), (0.5 - best).clamp(0.0, 1.0))
    cover = torch.where(meet, cover, torch.zeros_like(cover))
    return {"t": t, "hit": hit, "cover": cover, "steps": steps}


def sdf_normals(scene, points: torch.Tensor, h: float = 5e-4) -> torch.Tensor:
    """Unit normals ``(N,3)``: the SDF gradient by tetrahedral central differences (4 evaluations)."""
    k = points.new_tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]])     # (4, 3)
    f = scene.sdf((points[None] + h * k[:, None]).reshape(-1, 3)).reshape(4, -1)   # (4, N)
    g = (k[:, None, :] * f[..., None]).sum(0)
    return F.normalize(g, dim=-1)


def ambient_occlusion(scene, points: torch.Tensor, normals: torch.Tensor, steps=(0.015, 0.045)) -> torch.Tensor:
    """Cheap ambient occlusion in [0, 1] ``(N,)``: how far the SDF along the normal falls short of the step."""
    occ = torch.zeros(len(points), device=points.device)
    for i, h in enumerate(steps):
        occ = occ + (h - scene.sdf(points + h * normals)).clamp_min(0) / h * 0.5 ** i
    return (1.0 - 0.6 * occ).clamp(0.0, 1.0)


def shade(albedo: torch.Tensor, n_cam: torch.Tensor, d_cam: torch.Tensor, ao: torch.Tensor) -> torch.Tensor:
    """Colour ``(N,3)`` from albedo, camera-space normals and ray directions ``(N,3)`` and occlusion ``(N,)``."""
    light = LIGHT_CAM.to(n_cam.device)
    v = -d_cam
    ndl = (n_cam * light).sum(-1).clamp_min(0.0)
    ndv = (n_cam * v).sum(-1).clamp(0.0, 1.0)
    half = F.normalize(light + v, dim=-1)
    spec = (n_cam * half).sum(-1).clamp_min(0.0) ** 24
    rim = (1.0 - ndv) ** 3
    c = albedo * (0.38 * ao + 0.72 * ndl)[:, None] + (0.10 * spec + 0.12 * rim * ao)[:, None]
    return c.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# views
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run torch CPU ops with ``n`` threads inside the block (None: leave as is).

    Tracing is a long chain of small element-wise ops; on a CPU shared with other processes, extra threads spend
    more time waiting for each other than computing, so the renderer uses one CPU thread unless told otherwise.
    """
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def render_views(params, c2w: torch.Tensor, K: torch.Tensor, height: int, width: int, device=None,
                 chunk: int = 65536, max_steps: int = 64, ao: bool = True, hit_frac: float = 0.2,
                 threads: int | None = 1) -> dict[str, torch.Tensor]:
    """Render a scene (``HeadParams``, parameter vector, or scene object) from ``V`` cameras.

    c2w (V,4,4) or (4,4), K (3,3) or (V,3,3) in pixels. Returns tensors on ``device`` (default: ``c2w``'s):
    ``rgb`` (V,H,W,3) composited on white, ``alpha`` (V,H,W) in [0,1], ``normal`` (V,H,W,3) camera-space OpenCV
    unit normals (0 on background), ``depth`` (V,H,W) distance ``t`` along the unit ray (inf on background),
    ``points`` (V,H,W,3) world points hit (0 on background). ``chunk``: rays traced at once (memory);
    ``max_steps``: marching steps per ray; ``hit_frac``: a hit is ``f`` below this fraction of a pixel's width;
    ``threads``: CPU threads while rendering (see ``cpu_threads``; None keeps torch's setting).
    """
    device = torch.device(device) if device is not None else c2w.device
    with cpu_threads(threads if device.type == "cpu" else None):
        return _render_views(as_scene(params), c2w, K, height, width, device, chunk, max_steps, ao, hit_frac)


def _render_views(scene, c2w, K, height, width, device, chunk, max_steps, ao, hit_frac):
    c2w = c2w.to(device, torch.float32)
    if c2w.ndim == 2:
        c2w = c2w[None]
    V = c2w.shape[0]
    K = K.to(device, torch.float32)
    K = K.expand(V, 3, 3) if K.ndim == 2 else K
    o, d = cameras.pixel_rays(c2w, K, height, width)                      # (V,H,W,3)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    view = torch.arange(V, device=device).repeat_interleave(height * width)
    footprint = (1.0 / K[:, 0, 0])[view]                                # radians per pixel, about
    R = c2w[:, :3, :3]

    N = len(o)
    rgb = torch.ones(N, 3, device=device)
    alpha = torch.zeros(N, device=device)
    normal = torch.zeros(N, 3, device=device)
    depth = torch.full((N,), math.inf, device=device)
    points = torch.zeros(N, 3, device=device)
    for s in range(0, N, chunk):
        sl = slice(s, min(s + chunk, N))
        tr = sphere_trace(scene, o[sl], d[sl], footprint[sl], max_steps=max_steps, hit_frac=hit_frac)
        sel = torch.nonzero(tr["cover"] > 0).squeeze(1)
        if sel.numel() == 0:
            continue
        g = sel + s
        t = tr["t"][sel]
        x = o[g] + t[:, None] * d[g]
        n_w = sdf_normals(scene, x)
        Rg = R[view[g]]                                                 # (M,3,3)
        n_c = torch.einsum("mij,mi->mj", Rg, n_w)                        # R^T n
        d_c = torch.einsum("mij,mi->mj", Rg, d[g])
        occ = ambient_occlusion(scene, x, n_w) if ao else torch.ones(len(x), device=device)
        col = shade(scene.albedo(x), n_c, d_c, occ)
        a = tr["cover"][sel]
        rgb[g] = a[:, None] * col + (1 - a[:, None])
        alpha[g] = a
        normal[g] = n_c
        depth[g] = t
        points[g] = x
    shp = (V, height, width)
    return {"rgb": rgb.reshape(*shp, 3), "alpha": alpha.reshape(shp), "normal": normal.reshape(*shp, 3),
            "depth": depth.reshape(shp), "points": points.reshape(*shp, 3)}


def render_orbit(params, yaw_deg, pitch_deg=0.0, resolution: int = 64, device=None, **kw) -> dict[str, torch.Tensor]:
    """Render rig views at yaw/pitch in degrees (scalars or (V,)) at ``resolution`` px: ``render_views`` output."""
    c2w = cameras.orbit_c2w(torch.as_tensor(yaw_deg, dtype=torch.float32).reshape(-1),
                            torch.as_tensor(pitch_deg, dtype=torch.float32).reshape(-1))
    return render_views(params, c2w, cameras.intrinsics(resolution), resolution, resolution, device=device, **kw)


def normal_to_rgb(normal: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Normal image ``(n + 1) / 2`` composited on white by ``alpha``. normal (...,3), alpha (...) -> (...,3)."""
    a = alpha[..., None]
    return a * (normal + 1) / 2 + (1 - a)


def benchmark(params, resolution: int = 64, views: int = 16, device=None, repeats: int = 1) -> float:
    """Views per second of ``render_views`` at ``resolution`` (one warm-up render first)."""
    yaw, pitch = cameras.rig_angles(views)
    c2w = cameras.orbit_c2w(yaw, pitch)
    K = cameras.intrinsics(resolution)
    render_views(params, c2w[:2], K, resolution, resolution, device=device)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        render_views(params, c2w, K, resolution, resolution, device=device)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return views * repeats / (time.perf_counter() - t0)
