"""3D Gaussian Splatting of a spin (notebook 08): does one set of Gaussians explain all its views?

The paper checks that its 48 generated views agree on one head by fitting 3D Gaussians to them (METHOD.md
section 6). The parts, one module each, every name importable from here:

1. ``splat_render``: the renderer contract :func:`rasterize` (gsplat's shapes) and its two backends, gsplat's
   CUDA kernels and a pure-PyTorch renderer that follows the same steps, for the CPU and for reading.
2. ``splat_views`` (a spin's views on disk), ``splat_fit`` (initialisation, Adam, densification and pruning:
   :func:`fit_gaussians`) and ``splat_scene`` (the result, :class:`GaussianScene`: ``render``, ``save_ply``).
3. This module: :func:`consistency_score`: fit on every other view, PSNR on the views held out. A spin whose
   views disagree cannot be explained by one set of Gaussians, and its held-out PSNR drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .cameras import look_at, orbit_eye
from .metrics import psnr
from .runs import write_gif
from .splat_fit import FitConfig, bounding_sphere, carve_points, fit_gaussians, init_gaussians  # noqa: F401
from .splat_render import (  # noqa: F401 (the renderer contract and its backends, importable from here)
    ALPHA_MAX,
    ALPHA_MIN,
    EPS2D,
    NEAR_PLANE,
    bin_tiles,
    covariance_3d,
    footprint_radii,
    gsplat_available,
    pick_backend,
    project_gaussians,
    quat_to_rotmat,
    rasterize,
    rasterize_gsplat,
    rasterize_torch,
)
from .splat_scene import SH_C0, GaussianScene  # noqa: F401
from .splat_views import VIEWS_FILE, load_views, resize_views, select_views  # noqa: F401


# ================================================================================================
# consistency and the turntable
# ================================================================================================
@dataclass
class ConsistencyResult:
    """Fit on ``train_idx`` views, PSNR on all: ``psnr`` (V,) per view; means over train and held-out views."""

    scene: GaussianScene
    psnr: torch.Tensor
    train_idx: torch.Tensor
    heldout_idx: torch.Tensor
    renders: torch.Tensor          # (V, 3, H, W) the fitted Gaussians seen from every view
    fit_seconds: float
    backend: str

    @property
    def psnr_train(self) -> float:
        return float(self.psnr[self.train_idx].mean())

    @property
    def psnr_heldout(self) -> float:
        return float(self.psnr[self.heldout_idx].mean())


def consistency_score(views: dict, iters: int = 600, n_init: int = 4000, res: int | None = None,
                      stride: int = 2, backend: str = "auto", device=None, seed: int = 0, progress: bool = True,
                      **fit_kw) -> ConsistencyResult:
    """Consistency of a set of views: fit Gaussians on every ``stride``-th view, PSNR on the rest.

    ``views``: the dict of :func:`load_views` / ``HeadDataset.views`` (``rgb`` (V, 3, H, W), ``c2w``, ``K``,
    optional ``alpha``, ``normal``); ``res`` resizes them first. Held-out PSNR is the score: views that agree
    with the others are predicted well by Gaussians fitted without them.
    """
    if res:
        views = resize_views(views, res)
    V = views["rgb"].shape[0]
    idx = torch.arange(V)
    train, held = idx[idx % stride == 0], idx[idx % stride != 0]
    if len(held) == 0:
        raise ValueError(f"consistency_score needs at least {stride} views, got {V}")
    tv = select_views(views, train)
    al = tv.get("alpha")
    nrm = tv.get("normal")
    scene = fit_gaussians(tv["rgb"].permute(0, 2, 3, 1), tv["c2w"], tv["K"],
                          alphas=al[:, 0] if al is not None else None,
                          normals=nrm.permute(0, 2, 3, 1) if nrm is not None else None,
                          iters=iters, n_init=n_init, backend=backend, device=device, seed=seed,
                          progress=progress, **fit_kw)
    H, W = views["rgb"].shape[-2:]
    img, _ = scene.render_c2w(views["c2w"], views["K"], W, H, backend=backend)
    renders = img.permute(0, 3, 1, 2).clamp(0, 1).cpu()
    p = psnr(renders, views["rgb"])
    return ConsistencyResult(scene, p, train, held, renders, scene.info["fit_seconds"], scene.info["backend"])


def turntable_cameras(n_frames: int, radius: float, K: torch.Tensor, pitch: float = 0.0, yaw_offset: float = 0.0,
                      centre=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c2w (F, 4, 4), K (F, 3, 3), yaw (F,) of an orbit at ``radius`` around ``centre``, yaw 0..360."""
    yaw = torch.arange(n_frames, dtype=torch.float32) * 360.0 / n_frames + yaw_offset
    yaw = (yaw + 180) % 360 - 180
    centre_t = torch.as_tensor(centre, dtype=torch.float32)
    eye = orbit_eye(yaw, torch.full_like(yaw, pitch), radius, tuple(centre_t.tolist()))
    c2w = look_at(eye, tuple(centre_t.tolist()))
    K = K if K.ndim == 2 else K[0]
    return c2w, K.expand(n_frames, 3, 3).clone(), yaw


def save_gif(frames: torch.Tensor, path: str | Path, fps: int = 12) -> Path:
    """Write frames (F, H, W, 3) in [0, 1] as a looping GIF at ``fps``, atomically (``runs.write_gif``)."""
    return write_gif(frames, path, duration_ms=1000 / fps)
