"""3D Gaussian Splatting of a spin: one renderer contract, two backends, fitting, ``.ply`` (notebook 08).

The paper checks that its 48 generated views agree on one head by fitting 3D Gaussians to them (METHOD.md
section 6). This module does that in three parts.

1. **The renderer contract** :func:`rasterize`, with the shapes gsplat's ``rasterization`` documents::

       means     (N, 3)          centres in world coordinates
       quats     (N, 4)          rotations as quaternions (w, x, y, z); normalised inside
       scales    (N, 3)          standard deviations along the Gaussian's own axes (actual values, not logs)
       opacities (N,)            in [0, 1]
       colors    (N, D) or (C, N, D)
       viewmats  (C, 4, 4)       world-to-camera matrices, OpenCV axes (``cameras.py``)
       Ks        (C, 3, 3)       intrinsics in pixels; pixel (u, v) has its centre at (u + 0.5, v + 0.5)
       -> image (C, H, W, D), alpha (C, H, W, 1)

   Two backends: gsplat's CUDA ``rasterization`` (imported lazily; ``pip install -e .[gpu]``) and a pure-PyTorch
   renderer for the CPU and for reading. The PyTorch one follows the same steps as gsplat's kernels:

   * covariance ``Sigma = R S S^T R^T`` from the quaternion (R) and the scales (S = diag(scales));
   * to camera ``Sigma_c = W Sigma W^T`` (W the rotation of the view matrix), and to the image with the
     Jacobian of the perspective projection at the centre (EWA splatting)
     ``J = [[fx/z, 0, -fx x/z^2], [0, fy/z, -fy y/z^2]]``, ``Sigma' = J Sigma_c J^T + 0.3 I`` (the 0.3 px^2
     low-pass keeps every footprint at least about a pixel wide);
   * per pixel ``alpha_i = min(0.99, o_i exp(-0.5 d^T Sigma'^-1 d))`` with ``d`` the offset from the projected
     centre; contributions below 1/255 are skipped;
   * front-to-back compositing in depth order ``C = sum_i c_i alpha_i T_i``, ``T_i = prod_{j<i} (1 - alpha_j)``;
     ``alpha = 1 - T`` with T the transmittance behind the last Gaussian. (gsplat also stops a pixel once T
     would fall below 1e-4; that changes a pixel by less than 1e-4, so the PyTorch renderer does not.)

   Memory stays bounded: Gaussians are binned into square pixel tiles through their opacity-aware bounding box
   (outside it every alpha is below 1/255, so binning changes nothing in the image), tiles are processed in
   groups and long per-tile lists in chunks, each holding at most ``max_elements`` (Gaussian, pixel) pairs.
   It is differentiable end to end with autograd.

2. **Fitting** :func:`fit_gaussians`: Gaussians initialised from the views (points carved by the silhouettes in
   a shell of the head's bounding sphere, or random in the sphere), Adam on ``0.8 L1 + 0.2 (1 - SSIM)`` (plus an
   L1 on the silhouette when alphas are given), clone/split by view-space gradient and prune by opacity on a
   short schedule. The result is a :class:`GaussianScene`: ``render``, ``save_ply`` (the standard 3DGS layout).

3. **Consistency** :func:`consistency_score`: fit on every other view, PSNR on the views held out. A spin whose
   views disagree cannot be explained by one set of Gaussians, and its held-out PSNR drops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import trange

from .cameras import look_at, orbit_eye, w2c_from_c2w
from .metrics import psnr, ssim
from .runs import atomic_path, write_gif

ALPHA_MAX = 0.99        # clamp of one Gaussian's alpha (3DGS); gsplat's kernel clamps at 0.999
ALPHA_MIN = 1.0 / 255   # contributions below this are skipped
EPS2D = 0.3             # low-pass dilation of every 2D covariance, px^2 (gsplat's eps2d)
NEAR_PLANE = 0.01       # Gaussians nearer than this (camera z) are not drawn
SH_C0 = 0.28209479177387814  # zeroth spherical-harmonic basis: rgb = 0.5 + SH_C0 * f_dc in a 3DGS .ply
VIEWS_FILE = "views.npz"


# ================================================================================================
# 1. geometry of one Gaussian
# ================================================================================================
def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) of quaternions (..., 4) in (w, x, y, z) order (normalised first)."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1)
    return R.reshape(*quats.shape[:-1], 3, 3)


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """World covariances ``Sigma = R S S^T R^T`` (N, 3, 3) from quats (N, 4) and scales (N, 3)."""
    M = quat_to_rotmat(quats) * scales[..., None, :]  # R S
    return M @ M.transpose(-1, -2)


def project_gaussians(means: torch.Tensor, covars: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor,
                      width: int, height: int, eps2d: float = EPS2D, near_plane: float = NEAR_PLANE) -> dict:
    """Project 3D Gaussians to the image plane (EWA splatting, pinhole camera).

    means (N, 3), covars (N, 3, 3) world; viewmats (C, 4, 4) world-to-camera; Ks (C, 3, 3) ->
    dict of ``means2d`` (C, N, 2) pixels, ``cov2d`` (C, N, 2, 2) with the ``eps2d`` dilation, ``conics``
    (C, N, 3) the upper triangle (a, b, c) of ``cov2d^-1``, ``depths`` (C, N) camera z, ``J`` (C, N, 2, 3),
    ``valid`` (C, N) bool (in front of the near plane, positive determinant).

    As in gsplat, the Jacobian is evaluated with ``x/z`` and ``y/z`` clamped to 1.3 times the half field of
    view, so Gaussians far outside the image do not blow up.
    """
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    mc = torch.einsum("cij,nj->cni", R, means) + t[:, None, :]          # (C, N, 3) camera coordinates
    cov_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)              # W Sigma W^T
    x, y, z = mc.unbind(-1)
    valid = z > near_plane
    z = torch.where(valid, z, torch.ones_like(z))                        # safe divisor (masked out below)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * (0.5 * width / fx), cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * (0.5 * height / fy), cy / fy + 0.3 * (0.5 * height / fy)
    tx = z * torch.minimum(torch.maximum(x / z, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y / z, -lim_y_neg), lim_y_pos)
    O = torch.zeros_like(z)
    J = torch.stack([fx / z, O, -fx * tx / z ** 2, O, fy / z, -fy * ty / z ** 2], -1).reshape(*z.shape, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], -1)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = a * c - b * b
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], -1)
    return dict(means2d=means2d, cov2d=cov2d, conics=conics, depths=mc[..., 2], J=J, valid=valid)


def footprint_radii(cov2d: torch.Tensor, opacities: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Half-sides (C, N, 2) in pixels of the box outside which every alpha is below 1/255 (0: not drawn).

    ``o exp(-r^2/2) >= 1/255`` needs Mahalanobis distance ``r <= sqrt(2 ln(255 o))``; the box of that ellipse
    has half-sides ``r sqrt(Sigma'_xx)``, ``r sqrt(Sigma'_yy)`` (capped at 3.33 sigma, as gsplat does).
    """
    with torch.no_grad():
        o = opacities.expand_as(valid) if opacities.ndim == 1 else opacities
        extend = torch.sqrt(2 * torch.log((o / ALPHA_MIN).clamp_min(1.0))).clamp(max=3.33)
        rx = torch.ceil(extend * cov2d[..., 0, 0].clamp_min(0).sqrt())
        ry = torch.ceil(extend * cov2d[..., 1, 1].clamp_min(0).sqrt())
        keep = valid & (o >= ALPHA_MIN)
        return torch.stack([rx, ry], -1) * keep[..., None]


# ================================================================================================
# 2. the PyTorch rasterizer
# ================================================================================================
def bin_tiles(means2d: torch.Tensor, radii: torch.Tensor, depths: torch.Tensor, width: int, height: int,
              tile: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Bin projected Gaussians into ``tile x tile`` pixel tiles, each tile's list sorted front to back.

    means2d (C, N, 2), radii (C, N, 2) box half-sides (0: not drawn), depths (C, N) ->
    table (C*TH*TW, Kmax) of flat ids ``c * N + n`` (padded with ``C * N``), counts (C*TH*TW,), and the number
    of (Gaussian, tile) pairs. Tiles are numbered camera-major, then row-major (TH rows of TW tiles).
    """
    C, N = depths.shape
    TW, TH = math.ceil(width / tile), math.ceil(height / tile)
    m = means2d.detach()
    r = radii.to(m.dtype)
    visible = (r > 0).all(-1)
    x0 = torch.floor((m[..., 0] - r[..., 0]) / tile).clamp(0, TW).long()
    x1 = (torch.floor((m[..., 0] + r[..., 0]) / tile) + 1).clamp(0, TW).long()
    y0 = torch.floor((m[..., 1] - r[..., 1]) / tile).clamp(0, TH).long()
    y1 = (torch.floor((m[..., 1] + r[..., 1]) / tile) + 1).clamp(0, TH).long()
    w = (x1 - x0).clamp_min(0)
    cnt = (w * (y1 - y0).clamp_min(0) * visible).flatten()                 # tiles touched per (camera, Gaussian)
    n_tiles = C * TH * TW
    M = int(cnt.sum())
    if M == 0:
        return torch.full((n_tiles, 0), C * N, dtype=torch.long, device=m.device), \
            torch.zeros(n_tiles, dtype=torch.long, device=m.device), 0
    gid = torch.repeat_interleave(torch.arange(C * N, device=m.device), cnt)  # flat (camera, Gaussian) ids
    local = torch.arange(M, device=m.device) - (torch.cumsum(cnt, 0) - cnt)[gid]
    wg = w.flatten()[gid]
    tx = x0.flatten()[gid] + local % wg
    ty = y0.flatten()[gid] + local // wg
    tile_id = (gid // N) * (TH * TW) + ty * TW + tx
    order = torch.argsort(depths.detach().flatten()[gid], stable=True)   # front to back ...
    order = order[torch.argsort(tile_id[order], stable=True)]            # ... within each tile
    tile_id, gid = tile_id[order], gid[order]
    counts = torch.bincount(tile_id, minlength=n_tiles)
    pos = torch.arange(M, device=m.device) - (torch.cumsum(counts, 0) - counts)[tile_id]
    table = torch.full((n_tiles, int(counts.max())), C * N, dtype=torch.long, device=m.device)
    table[tile_id, pos] = gid
    return table, counts, M


def _composite(pix, mu, con, op, col, T, alpha_max):
    """Front-to-back compositing of one chunk of depth-sorted Gaussians over B tiles of P pixels.

    pix (B, P, 2) pixel centres; mu (B, K, 2) projected centres; con (B, K, 3) conics (a, b, c); op (B, K);
    col (B, K, D); T (B, P) transmittance in front of the chunk -> colour (B, P, D), T behind the chunk (B, P).
    """
    dx = pix[:, None, :, 0] - mu[..., 0, None]                          # (B, K, P)
    dy = pix[:, None, :, 1] - mu[..., 1, None]
    # 0.5 d^T Sigma'^-1 d with Sigma'^-1 = [[a, b], [b, c]]
    power = dx * (0.5 * con[..., 0, None] * dx + con[..., 1, None] * dy) + 0.5 * con[..., 2, None] * dy * dy
    alpha = (op[..., None] * torch.exp(-power)).clamp(max=alpha_max)
    alpha = alpha * (alpha >= ALPHA_MIN)                                 # skip contributions below 1/255
    one_minus = 1 - alpha
    T_after = T[:, None, :] * torch.cumprod(one_minus, dim=1)            # T_i (1 - alpha_i)
    weight = T_after * (alpha / one_minus)                               # alpha_i T_i
    return torch.einsum("bkp,bkd->bpd", weight, col), T_after[:, -1]


def rasterize_torch(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background=None,
                    tile_size: int = 4, max_elements: int = 1 << 22, alpha_max: float = ALPHA_MAX,
                    eps2d: float = EPS2D, near_plane: float = NEAR_PLANE, return_info: bool = False):
    """Pure-PyTorch backend of :func:`rasterize` (same arguments; see the module docstring).

    ``tile_size`` pixels per tile side; ``max_elements`` bounds the (Gaussian, pixel) pairs held at once
    (about 40 bytes each with autograd), e.g. 2**22 -> under 200 MB per chunk.
    """
    C, N = viewmats.shape[0], means.shape[0]
    dtype, device = means.dtype, means.device
    covars = covariance_3d(quats, scales)
    proj = project_gaussians(means, covars, viewmats, Ks, width, height, eps2d, near_plane)
    radii = footprint_radii(proj["cov2d"], opacities, proj["valid"])
    D = colors.shape[-1]
    col = colors.expand(C, N, D) if colors.ndim == 3 else colors[None].expand(C, N, D)
    op = opacities[None].expand(C, N)
    pad = lambda x: torch.cat([x.reshape(C * N, *x.shape[2:]), torch.zeros_like(x.reshape(C * N, *x.shape[2:])[:1])])
    m2d_f, con_f, op_f, col_f = pad(proj["means2d"]), pad(proj["conics"]), pad(op), pad(col)  # row C*N: padding

    table, counts, n_isects = bin_tiles(proj["means2d"], radii, proj["depths"], width, height, tile_size)
    TW, TH, P = math.ceil(width / tile_size), math.ceil(height / tile_size), tile_size * tile_size
    n_tiles = table.shape[0]
    iy, ix = torch.meshgrid(torch.arange(tile_size, device=device), torch.arange(tile_size, device=device),
                            indexing="ij")
    local = torch.stack([ix.flatten(), iy.flatten()], -1).to(dtype) + 0.5      # (P, 2) pixel centres in a tile
    tiles = torch.arange(n_tiles, device=device) % (TH * TW)
    origin = torch.stack([tiles % TW, tiles // TW], -1).to(dtype) * tile_size  # (n_tiles, 2)

    # tiles in groups of similar length (padding under 1/3), each group at most max_elements pairs
    order = torch.argsort(counts, descending=True)
    cnt_sorted = counts[order].tolist()
    outs_c, outs_T, done = [], [], 0
    while done < n_tiles:
        K = cnt_sorted[done]
        if K == 0:                                                           # the rest are empty tiles
            rest = n_tiles - done
            outs_c.append(torch.zeros(rest, P, D, dtype=dtype, device=device) + 0 * col_f.sum())
            outs_T.append(torch.ones(rest, P, dtype=dtype, device=device))
            break
        B = 1
        while done + B < n_tiles and cnt_sorted[done + B] * 3 >= 2 * K and (B + 1) * K * P <= max_elements:
            B += 1
        group = order[done:done + B]
        pix = origin[group][:, None, :] + local[None]                        # (B, P, 2)
        T = torch.ones(B, P, dtype=dtype, device=device)
        acc = 0
        k_chunk = max(1, max_elements // (B * P))                          # long lists: chunks, T carried
        for k0 in range(0, K, k_chunk):
            ids = table[group, k0:min(K, k0 + k_chunk)]
            c, T = _composite(pix, m2d_f[ids], con_f[ids], op_f[ids], col_f[ids], T, alpha_max)
            acc = acc + c
        outs_c.append(acc)
        outs_T.append(T)
        done += B
    inv = torch.argsort(order)
    tile_c, tile_T = torch.cat(outs_c)[inv], torch.cat(outs_T)[inv]
    unfold = lambda x: x.reshape(C, TH, TW, tile_size, tile_size, -1).permute(0, 1, 3, 2, 4, 5).reshape(
        C, TH * tile_size, TW * tile_size, -1)[:, :height, :width]
    image, T = unfold(tile_c), unfold(tile_T)
    if background is not None:
        image = image + T * _background(background, C, D, dtype, device)[:, None, None, :]
    alpha = 1 - T
    if return_info:
        return image, alpha, dict(means2d=proj["means2d"], radii=radii.int(), depths=proj["depths"],
                                  conics=proj["conics"], n_isects=n_isects, backend="torch")
    return image, alpha


def _background(background, C, D, dtype, device):
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.ndim == 0:
        bg = bg.expand(D)
    return bg.expand(C, D) if bg.ndim == 1 else bg


# ================================================================================================
# 3. the contract and the gsplat backend
# ================================================================================================
def gsplat_available() -> bool:
    """True when gsplat imports (it needs CUDA to run)."""
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


def pick_backend(backend: str = "auto", device: torch.device | str | None = None) -> str:
    """``"gsplat"`` on CUDA when gsplat imports, else ``"torch"``; an explicit choice is checked."""
    device = torch.device(device) if device is not None else None
    if backend == "auto":
        cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return "gsplat" if cuda and gsplat_available() else "torch"
    if backend == "gsplat":
        if not gsplat_available():
            raise RuntimeError("backend='gsplat' needs the gsplat package and a CUDA GPU: "
                               "pip install -e '.[gpu]' on a CUDA machine, or use backend='torch'")
        return backend
    if backend != "torch":
        raise ValueError(f"unknown backend {backend!r}: choose 'auto', 'torch' or 'gsplat'")
    return backend


def rasterize_gsplat(means, quats, scales, opacities, colors, viewmats, Ks, width, height, background=None,
                     return_info: bool = False, **kw):
    """gsplat backend of :func:`rasterize` (CUDA float32 tensors)."""
    from gsplat import rasterization  # lazy: gsplat needs CUDA and is an optional extra
    C, D = viewmats.shape[0], colors.shape[-1]
    bg = None if background is None else _background(background, C, D, means.dtype, means.device).contiguous()
    image, alpha, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                       near_plane=NEAR_PLANE, eps2d=EPS2D, packed=False, backgrounds=bg, **kw)
    if return_info:
        radii = meta["radii"]
        radii = radii if radii.ndim == 3 else radii[..., None].expand(*radii.shape, 2)
        return image, alpha, dict(means2d=meta["means2d"], radii=radii, depths=meta.get("depths"),
                                  conics=meta.get("conics"), n_isects=None, backend="gsplat")
    return image, alpha


def rasterize(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
              colors: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
              backend: str = "auto", background=None, return_info: bool = False, **kw):
    """Render 3D Gaussians into ``C`` cameras. The one contract of this course (gsplat's shapes)::

        means (N, 3), quats (N, 4) wxyz, scales (N, 3) actual std devs, opacities (N,), colors (N, D) or
        (C, N, D), viewmats (C, 4, 4) world-to-camera, Ks (C, 3, 3), width, height
        -> image (C, H, W, D), alpha (C, H, W, 1)   [+ info dict when return_info]

    ``background`` (D,) or (C, D) is composited behind (``image + (1 - alpha) * background``); None leaves
    black. ``backend``: ``"auto"`` (gsplat on CUDA when importable, else torch), ``"torch"``, ``"gsplat"``.
    ``info`` holds ``means2d`` (C, N, 2) (call ``retain_grad()`` on it for view-space gradients) and ``radii``
    (C, N, 2). Extra keywords go to the backend (torch: ``tile_size``, ``max_elements``, ``alpha_max``).
    """
    N = means.shape[0]
    for name, x, shape in [("means", means, (N, 3)), ("quats", quats, (N, 4)), ("scales", scales, (N, 3)),
                           ("opacities", opacities, (N,))]:
        if tuple(x.shape) != shape:
            raise ValueError(f"rasterize: {name} must have shape {shape}, got {tuple(x.shape)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(f"rasterize: viewmats must be (C, 4, 4) and Ks (C, 3, 3), got {tuple(viewmats.shape)} "
                         f"and {tuple(Ks.shape)}")
    if colors.shape[-2] != N:
        raise ValueError(f"rasterize: colors must be (N, D) or (C, N, D) with N={N}, got {tuple(colors.shape)}")
    backend = pick_backend(backend, means.device)
    fn = rasterize_gsplat if backend == "gsplat" else rasterize_torch
    return fn(means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height),
              background=background, return_info=return_info, **kw)


# ================================================================================================
# 4. views: the spin's on-disk format, resizing
# ================================================================================================
def load_views(folder: str | Path) -> dict:
    """Read ``folder/views.npz`` (the spin's views) into the dataset's view dict.

    File: ``rgb`` uint8 (N, H, W, 3) on white; ``normal`` uint8 (N, H, W, 3) = round((n + 1) / 2 * 255);
    ``alpha`` uint8 (N, H, W) optional; ``c2w`` (N, 4, 4); ``K`` (3, 3) or (N, 3, 3) pixels; ``yaw``, ``pitch``
    (N,) degrees. Returns ``rgb`` (N, 3, H, W) in [0, 1], ``normal`` (N, 3, H, W) unit camera-space vectors
    (or None), ``normal_rgb``, ``alpha`` (N, 1, H, W) or None, ``c2w`` (N, 4, 4), ``K`` (N, 3, 3), ``yaw``,
    ``pitch`` (N,).
    """
    folder = Path(folder)
    path = folder / VIEWS_FILE if folder.suffix != ".npz" else folder
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 07 (spin.ensure_spin(run)) to generate the views, "
                                f"or point load_views at a folder that holds {VIEWS_FILE}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({e}); delete it and generate the views again") from None
    missing = [k for k in ("rgb", "c2w", "K") if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it needs rgb (N,H,W,3) uint8, c2w (N,4,4), K (3,3), "
                         f"and optionally normal, alpha, yaw, pitch")
    rgb = data["rgb"]
    if rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"{path}: rgb must be (N, H, W, 3), got {rgb.shape}")
    n, h, w = rgb.shape[:3]
    c2w = torch.as_tensor(data["c2w"], dtype=torch.float32)
    K = torch.as_tensor(data["K"], dtype=torch.float32)
    if c2w.shape != (n, 4, 4):
        raise ValueError(f"{path}: c2w must be ({n}, 4, 4) for {n} views, got {tuple(c2w.shape)}")
    if K.shape == (3, 3):
        K = K.expand(n, 3, 3).clone()
    if K.shape != (n, 3, 3):
        raise ValueError(f"{path}: K must be (3, 3) or ({n}, 3, 3), got {tuple(K.shape)}")
    to_img = lambda a: torch.as_tensor(a).permute(0, 3, 1, 2).float() / 255.0
    out = dict(rgb=to_img(rgb), c2w=c2w, K=K, alpha=None, normal=None, normal_rgb=None)
    if "alpha" in data:
        a = data["alpha"]
        a = a[..., 0] if a.ndim == 4 else a
        if a.shape != (n, h, w):
            raise ValueError(f"{path}: alpha must be ({n}, {h}, {w}), got {a.shape}")
        out["alpha"] = torch.as_tensor(a).float()[:, None] / 255.0
    if "normal" in data:
        if data["normal"].shape != rgb.shape:
            raise ValueError(f"{path}: normal must have rgb's shape {rgb.shape}, got {data['normal'].shape}")
        out["normal_rgb"] = to_img(data["normal"])
        out["normal"] = F.normalize(out["normal_rgb"] * 2 - 1, dim=1)
    for k in ("yaw", "pitch"):
        out[k] = torch.as_tensor(data[k], dtype=torch.float32) if k in data else torch.full((n,), float("nan"))
    return out


def resize_views(views: dict, res: int) -> dict:
    """Views at ``res x res`` pixels (area filter); ``K`` scaled to match, normals renormalised."""
    h, w = views["rgb"].shape[-2:]
    if (h, w) == (res, res):
        return dict(views)
    out = dict(views)
    rs = lambda x: F.interpolate(x, size=(res, res), mode="area") if x is not None else None
    out["rgb"], out["alpha"] = rs(views["rgb"]), rs(views.get("alpha"))
    if views.get("normal") is not None:
        out["normal"] = F.normalize(rs(views["normal"]), dim=1)
        out["normal_rgb"] = rs(views["normal_rgb"]) if views.get("normal_rgb") is not None else None
    K = views["K"].clone()
    K[..., 0, :] *= res / w
    K[..., 1, :] *= res / h
    out["K"] = K
    return out


def select_views(views: dict, idx) -> dict:
    """The views at indices ``idx`` (every tensor with a leading view axis is indexed)."""
    n = views["rgb"].shape[0]
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v)
            for k, v in views.items()}


# ================================================================================================
# 5. the scene and its .ply
# ================================================================================================
@dataclass
class GaussianScene:
    """A fitted set of N Gaussians (activated values): means (N, 3), quats (N, 4) wxyz unit, scales (N, 3),
    opacities (N,), colors (N, 3) RGB in [0, 1], normals (N, 3) or None; ``info`` holds how it was fitted."""

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    normals: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.means.shape[0]

    def __repr__(self) -> str:
        return f"GaussianScene({len(self)} Gaussians, device={self.means.device})"

    def to(self, device) -> "GaussianScene":
        mv = lambda x: None if x is None else x.to(device)
        return GaussianScene(mv(self.means), mv(self.quats), mv(self.scales), mv(self.opacities), mv(self.colors),
                             mv(self.normals), dict(self.info))

    @torch.no_grad()
    def render(self, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
               background=(1.0, 1.0, 1.0), backend: str = "auto", batch: int = 8, **kw):
        """Render into cameras (no gradients): viewmats (C, 4, 4), Ks (C, 3, 3) or (3, 3) ->
        image (C, H, W, 3), alpha (C, H, W, 1), ``batch`` cameras at a time."""
        dev = self.means.device
        viewmats = viewmats.to(dev, self.means.dtype)
        Ks = Ks.to(dev, self.means.dtype)
        Ks = Ks.expand(viewmats.shape[0], 3, 3) if Ks.ndim == 2 else Ks
        imgs, alphas = [], []
        for i in range(0, viewmats.shape[0], batch):
            im, al = rasterize(self.means, self.quats, self.scales, self.opacities, self.colors,
                               viewmats[i:i + batch], Ks[i:i + batch], width, height, backend=backend,
                               background=background, **kw)
            imgs.append(im)
            alphas.append(al)
        return torch.cat(imgs), torch.cat(alphas)

    def render_c2w(self, c2w: torch.Tensor, K: torch.Tensor, width: int, height: int, **kw):
        """Like :meth:`render` with camera-to-world matrices (C, 4, 4)."""
        return self.render(w2c_from_c2w(c2w.float()), K, width, height, **kw)

    def save_ply(self, path: str | Path) -> Path:
        """Write the standard 3DGS ``.ply`` (binary little endian), atomically.

        Per vertex: x, y, z, nx, ny, nz, f_dc_0..2 (``(rgb - 0.5) / SH_C0``), opacity (logit), scale_0..2 (log),
        rot_0..3 (w, x, y, z). Viewers (SuperSplat, the 3DGS SIBR viewer, gsplat's) open it as is.
        """
        path = Path(path)
        n = len(self)
        eps = 1e-6
        cols = {
            "x": self.means[:, 0], "y": self.means[:, 1], "z": self.means[:, 2],
        }
        nrm = self.normals if self.normals is not None else torch.zeros_like(self.means)
        cols.update(nx=nrm[:, 0], ny=nrm[:, 1], nz=nrm[:, 2])
        f_dc = (self.colors - 0.5) / SH_C0
        cols.update({f"f_dc_{i}": f_dc[:, i] for i in range(3)})
        cols["opacity"] = torch.logit(self.opacities.clamp(eps, 1 - eps))
        cols.update({f"scale_{i}": torch.log(self.scales[:, i].clamp_min(1e-12)) for i in range(3)})
        q = F.normalize(self.quats, dim=-1)
        cols.update({f"rot_{i}": q[:, i] for i in range(4)})
        arr = np.empty(n, dtype=[(k, "<f4") for k in cols])
        for k, v in cols.items():
            arr[k] = v.detach().float().cpu().numpy()
        header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {n}\n" + \
            "".join(f"property float {k}\n" for k in cols) + "end_header\n"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(header.encode("ascii"))
                f.write(arr.tobytes())
        return path

    @classmethod
    def load_ply(cls, path: str | Path) -> "GaussianScene":
        """Read a 3DGS ``.ply`` written by :meth:`save_ply` (or any 3DGS trainer; higher SH bands are ignored)."""
        path = Path(path)
        raw = path.read_bytes()
        end = raw.find(b"end_header\n")
        if not raw.startswith(b"ply") or end < 0:
            raise ValueError(f"{path} is not a .ply file")
        header = raw[:end].decode("ascii").splitlines()
        if "format binary_little_endian 1.0" not in header:
            raise ValueError(f"{path}: only binary little-endian .ply files are read")
        n = next(int(h.split()[2]) for h in header if h.startswith("element vertex"))
        props = [h.split()[2] for h in header if h.startswith("property float")]
        arr = np.frombuffer(raw[end + len(b"end_header\n"):], dtype=[(p, "<f4") for p in props], count=n)
        g = lambda *ks: torch.from_numpy(np.stack([arr[k] for k in ks], -1).copy())
        return cls(means=g("x", "y", "z"), quats=F.normalize(g("rot_0", "rot_1", "rot_2", "rot_3"), dim=-1),
                   scales=g("scale_0", "scale_1", "scale_2").exp(), opacities=torch.sigmoid(g("opacity")[:, 0]),
                   colors=(0.5 + SH_C0 * g("f_dc_0", "f_dc_1", "f_dc_2")).clamp(0, 1),
                   normals=g("nx", "ny", "nz") if "nx" in props else None)


# ================================================================================================
# 6. initialisation from the views
# ================================================================================================
def bounding_sphere(c2w: torch.Tensor, K: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, float]:
    """Centre (3,) and radius of the sphere the cameras frame: the point nearest all optical axes, and the
    half-extent of the smallest view at that distance times sqrt(2) (the image's corners)."""
    o, d = c2w[:, :3, 3], F.normalize(c2w[:, :3, 2], dim=-1)
    A = torch.eye(3) - d[:, :, None] * d[:, None, :]                     # projectors orthogonal to each axis
    centre = torch.linalg.lstsq(A.sum(0), (A @ o[:, :, None]).sum(0)).solution[:, 0]
    dist = (o - centre).norm(dim=-1)
    half = torch.minimum(0.5 * width / K[:, 0, 0], 0.5 * height / K[:, 1, 1])
    return centre, float((dist * half).min() * math.sqrt(2))


def _project_points(p, w2c, K):
    """World points (M, 3) into V views -> pixel coords (V, M, 2), depth (V, M)."""
    pc = torch.einsum("vij,mj->vmi", w2c[:, :3, :3], p) + w2c[:, None, :3, 3]
    z = pc[..., 2].clamp_min(1e-6)
    uv = torch.stack([K[:, None, 0, 0] * pc[..., 0] / z + K[:, None, 0, 2],
                      K[:, None, 1, 1] * pc[..., 1] / z + K[:, None, 1, 2]], -1)
    return uv, pc[..., 2]


def _lookup(maps, uv):
    """Nearest-pixel values of maps (V, H, W, Ch) at uv (V, M, 2) -> (V, M, Ch), and an inside mask (V, M)."""
    V, H, W, _ = maps.shape
    u, v = torch.floor(uv[..., 0]).long(), torch.floor(uv[..., 1]).long()
    inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
    u, v = u.clamp(0, W - 1), v.clamp(0, H - 1)
    vals = maps[torch.arange(V)[:, None], v, u]
    return vals, inside


def carve_points(masks: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, n: int, centre: torch.Tensor,
                 radius: float, shell: float = 0.12, agree: float = 0.9, generator=None,
                 max_rounds: int = 60) -> torch.Tensor:
    """Points (n, 3) inside the visual hull of the silhouettes, near its surface.

    masks (V, H, W) bool. A point is in the hull when it falls on the silhouette in at least ``agree`` of the
    views that see it; it is near the surface when a step of ``shell * radius`` outwards (away from the centre)
    leaves the hull. Falls back to hull points anywhere, then to the sphere, when too few are found.
    """
    w2c = w2c_from_c2w(c2w)
    m = masks.float()[..., None]

    def in_hull(p):
        vals, inside = _lookup(m, _project_points(p, w2c, K)[0])
        seen = inside.float().sum(0).clamp_min(1)
        return (vals[..., 0] * inside).sum(0) / seen >= agree

    surf, hull = [], []
    found = 0
    for _ in range(max_rounds):
        p = _sample_ball(8 * n, centre, radius, generator)
        keep = in_hull(p)
        p = p[keep]
        out = p + shell * radius * F.normalize(p - centre, dim=-1)
        s = ~in_hull(out) if len(p) else keep[:0]
        surf.append(p[s])
        hull.append(p[~s])
        found += int(s.sum())
        if found >= n:
            break
    pts = torch.cat(surf)
    if len(pts) < n:
        pts = torch.cat([pts, torch.cat(hull)])
    if len(pts) < n:
        pts = torch.cat([pts, _sample_ball(n - len(pts), centre, radius, generator)])
    return pts[torch.randperm(len(pts), generator=generator)[:n]]


def _sample_ball(n, centre, radius, generator=None):
    d = F.normalize(torch.randn(n, 3, generator=generator), dim=-1)
    r = radius * torch.rand(n, 1, generator=generator) ** (1 / 3)
    return centre + d * r


def _knn_scale(p: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Mean distance (N,) of each point to its k nearest neighbours."""
    out = []
    for i in range(0, len(p), chunk):
        d = torch.cdist(p[i:i + chunk], p)
        out.append(d.topk(k + 1, largest=False).values[:, 1:].mean(-1))
    return torch.cat(out)


def _quat_from_z_to(n: torch.Tensor) -> torch.Tensor:
    """Quaternions (N, 4) of rotations taking +z to the unit vectors n (N, 3)."""
    z = torch.tensor([0.0, 0.0, 1.0]).expand_as(n)
    q = torch.cat([1 + (n * z).sum(-1, keepdim=True), torch.cross(z, n, dim=-1)], -1)
    flip = q[:, 0] < 1e-6                                                # n = -z: rotate pi about x
    q[flip] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    return F.normalize(q, dim=-1)


def init_gaussians(images, c2w, K, n: int, init: str = "auto", alphas=None, normals=None, generator=None,
                   opacity: float = 0.3) -> tuple[GaussianScene, torch.Tensor, float]:
    """Initial Gaussians from the views -> (scene, sphere centre (3,), sphere radius).

    images (V, H, W, 3) in [0, 1]; c2w (V, 4, 4); K (V, 3, 3); alphas (V, H, W) or None (then the silhouette is
    where the image is not white); normals (V, H, W, 3) camera-space unit or None.
    ``init``: ``"carve"`` (points near the visual hull's surface, coloured from the view facing them, flattened
    along the normal map when given), ``"random"`` (uniform in the sphere, grey), ``"auto"`` = carve.
    """
    V, H, W, _ = images.shape
    centre, radius = bounding_sphere(c2w, K, W, H)
    if init == "auto":
        init = "carve"
    if init not in ("carve", "random"):
        raise ValueError(f"unknown init {init!r}: choose 'auto', 'carve' or 'random'")
    masks = alphas > 0.5 if alphas is not None else images.min(-1).values < 0.97
    masks = F.max_pool2d(masks.float()[:, None], 3, 1, 1)[:, 0] > 0       # a pixel of slack at the silhouette
    if init == "carve":
        pts = carve_points(masks, c2w, K, n, centre, radius, generator=generator)
        # colour (and normal) from the view whose camera faces the point most directly
        cam_dir = F.normalize(c2w[:, :3, 3] - centre, dim=-1)
        best = (F.normalize(pts - centre, dim=-1) @ cam_dir.T).argmax(-1)     # (n,)
        uv, _ = _project_points(pts, w2c_from_c2w(c2w), K)
        uv_best = uv[best, torch.arange(n)]
        u = uv_best[:, 0].floor().long().clamp(0, W - 1)
        v = uv_best[:, 1].floor().long().clamp(0, H - 1)
        colors = images[best, v, u].clamp(0.02, 0.98)
        nrm = None
        if normals is not None:
            nrm = F.normalize((c2w[best, :3, :3] @ normals[best, v, u][:, :, None])[:, :, 0], dim=-1)
    else:
        pts = _sample_ball(n, centre, radius, generator)
        colors = torch.full((n, 3), 0.5)
        nrm = None
    s = _knn_scale(pts).clamp(1e-4 * radius, 0.2 * radius)
    scales = s[:, None].repeat(1, 3)
    if nrm is not None:
        quats = _quat_from_z_to(nrm)
        scales[:, 2] *= 0.3                                               # thin along the normal: a surfel
    else:
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1
    scene = GaussianScene(pts, quats, scales, torch.full((n,), opacity), colors, nrm)
    return scene, centre, radius


# ================================================================================================
# 7. fitting
# ================================================================================================
@dataclass
class FitConfig:
    """Settings of :func:`fit_gaussians` beyond the step count (defaults tuned for 32-128 px views and a few hundred
    steps)."""

    init_opacity: float = 0.3     # opacity of the initial Gaussians
    batch_views: int = 1          # views rendered per step
    ssim_weight: float = 0.2      # loss = (1 - w) L1 + w (1 - SSIM)
    alpha_weight: float = 0.1     # weight of the L1 on the silhouette (when alphas are given)
    lr_means: float = 0.01        # x sphere radius, decayed exponentially to 1% at the end
    lr_scales: float = 0.01       # on log scales
    lr_quats: float = 0.002
    lr_opacity: float = 0.05      # on opacity logits
    lr_colors: float = 0.02       # on colour logits
    densify_from: float = 0.1     # fraction of iters where densification starts ...
    densify_until: float = 0.6    # ... and stops
    densify_every: int = 50       # steps between refinements (fewer in short fits: at least 3 refinements)
    grad_threshold: float = 2e-4  # mean view-space gradient (NDC units, as 3DGS) above which a Gaussian grows
    split_scale: float = 0.05     # Gaussians larger than this x radius are split, smaller ones cloned
    prune_opacity: float = 0.01   # Gaussians fainter than this are removed
    max_gaussians: int = 0        # cap (0: 2 x the initial count)
    cpu_threads: int = 1          # intra-op threads while fitting on the CPU (0: leave torch's setting). Each step's
                                  # tensors are small, so one thread is about as fast as two on an idle machine and
                                  # several times faster on a busy one, where thread-pool barriers wait on the others


def _adam_reindex(opt: torch.optim.Optimizer, params: dict, src: torch.Tensor, fresh: torch.Tensor, new: dict):
    """Replace every parameter p by new[name] (built from p[src]); Adam moments follow src, zero where fresh."""
    for group in opt.param_groups:
        name = group["name"]
        old = group["params"][0]
        p = torch.nn.Parameter(new[name].detach())
        state = opt.state.pop(old, {})
        if state:
            for k in ("exp_avg", "exp_avg_sq"):
                s = state[k][src].clone()
                s[fresh] = 0
                state[k] = s
            opt.state[p] = state
        group["params"] = [p]
        params[name] = p


def fit_gaussians(images: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, alphas: torch.Tensor | None = None,
                  normals: torch.Tensor | None = None, iters: int = 600, init: str = "auto",
                  n_init: int = 4000, background=(1.0, 1.0, 1.0), backend: str = "auto",
                  device: str | torch.device | None = None, seed: int = 0, config: FitConfig | None = None,
                  progress: bool = True, callback: Callable[[int, dict], None] | None = None,
                  init_scene: GaussianScene | None = None, **render_kw) -> GaussianScene:
    """Fit 3D Gaussians to posed views.

    images (V, H, W, 3) in [0, 1] (or uint8) on ``background``; c2w (V, 4, 4); K (3, 3) or (V, 3, 3);
    alphas (V, H, W) or (V, H, W, 1) in [0, 1], optional; normals (V, H, W, 3) camera-space unit vectors,
    optional (orients the initial Gaussians). Returns a :class:`GaussianScene` whose ``info`` holds
    ``history`` (loss, PSNR, count per step), ``fit_seconds``, ``backend``, ``sphere``.
    ``init_scene`` starts from given Gaussians instead of ``init``.
    """
    cfg = config or FitConfig()
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"fit_gaussians: images must be (V, H, W, 3), got {tuple(images.shape)}; "
                         f"permute (V, 3, H, W) views with .permute(0, 2, 3, 1)")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    V, H, W, _ = images.shape
    c2w = c2w.float()
    K = (K.expand(V, 3, 3) if K.ndim == 2 else K).float()
    if c2w.shape != (V, 4, 4) or K.shape != (V, 3, 3):
        raise ValueError(f"fit_gaussians: c2w must be ({V}, 4, 4) and K (3, 3) or ({V}, 3, 3)")
    if alphas is not None:
        alphas = alphas.float()
        alphas = alphas[..., 0] if alphas.ndim == 4 else alphas
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = pick_backend(backend, device)
    gen = torch.Generator().manual_seed(seed)

    t0 = time.perf_counter()
    scene0, centre, radius = init_gaussians(images, c2w, K, n_init, init, alphas, normals, generator=gen,
                                            opacity=cfg.init_opacity)
    if init_scene is not None:
        scene0 = init_scene
    cap = cfg.max_gaussians or 2 * len(scene0)
    eps = 1e-6
    params = {
        "means": scene0.means.clone(),
        "scales": scene0.scales.clamp_min(1e-8).log(),
        "quats": F.normalize(scene0.quats, dim=-1).clone(),
        "opacities": torch.logit(scene0.opacities.clamp(eps, 1 - eps)),
        "colors": torch.logit(scene0.colors.clamp(0.01, 0.99)),
    }
    params = {k: torch.nn.Parameter(v.to(device)) for k, v in params.items()}
    lrs = dict(means=cfg.lr_means * radius, scales=cfg.lr_scales, quats=cfg.lr_quats, opacities=cfg.lr_opacity,
               colors=cfg.lr_colors)
    opt = torch.optim.Adam([{"params": [params[k]], "lr": lrs[k], "name": k} for k in params], eps=1e-15)
    decay = 0.01 ** (1 / max(iters, 1))

    images_d, w2c_d, K_d = images.to(device), w2c_from_c2w(c2w).to(device), K.to(device)
    alphas_d = alphas.to(device) if alphas is not None else None
    bg = torch.as_tensor(background, dtype=torch.float32, device=device)
    grad_acc = torch.zeros(len(scene0), device=device)
    grad_cnt = torch.zeros(len(scene0), device=device)
    history = dict(step=[], loss=[], psnr=[], gaussians=[])
    d_from, d_until = int(cfg.densify_from * iters), int(cfg.densify_until * iters)
    every = max(1, min(cfg.densify_every, (d_until - d_from) // 3))     # at least 3 refinements in short fits
    perm = torch.randperm(V, generator=gen)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        bar = trange(iters, desc=f"fitting Gaussians ({backend})", disable=not progress, leave=False)
        for step in bar:
            k = (step * cfg.batch_views) % V
            idx = perm[k:k + cfg.batch_views]
            if k + cfg.batch_views >= V:
                perm = torch.randperm(V, generator=gen)
            img, al, info = rasterize(params["means"], params["quats"], params["scales"].exp(),
                                      torch.sigmoid(params["opacities"]), torch.sigmoid(params["colors"]),
                                      w2c_d[idx], K_d[idx], W, H, backend=backend, background=bg, return_info=True,
                                      **render_kw)
            info["means2d"].retain_grad()
            gt = images_d[idx]
            l1 = (img - gt).abs().mean()
            d_ssim = 1 - ssim(img.permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2)).mean()
            loss = (1 - cfg.ssim_weight) * l1 + cfg.ssim_weight * d_ssim
            if alphas_d is not None:
                loss = loss + cfg.alpha_weight * (al[..., 0] - alphas_d[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                params["quats"].data = F.normalize(params["quats"].data, dim=-1)
                for g in opt.param_groups:
                    if g["name"] == "means":
                        g["lr"] *= decay
                # view-space gradient statistics for densification (NDC units, as 3DGS)
                g2 = info["means2d"].grad
                if g2 is not None and d_from <= step < d_until:
                    g2 = g2 * torch.tensor([W / 2, H / 2], device=device) * len(idx)
                    vis = (info["radii"] > 0).all(-1)
                    grad_acc += (g2.norm(dim=-1) * vis).sum(0)
                    grad_cnt += vis.sum(0)
                if d_from < step <= d_until and step % every == 0:
                    grad_acc, grad_cnt = _densify_and_prune(params, opt, grad_acc, grad_cnt, cfg, radius, cap, gen)
                elif step == iters - 1 or (step > d_until and step % every == 0):
                    grad_acc, grad_cnt = _prune(params, opt, cfg, radius)
            if step % 10 == 0 or step == iters - 1:
                p = float(psnr(img.detach().permute(0, 3, 1, 2), gt.permute(0, 3, 1, 2)).mean())
                history["step"].append(step)
                history["loss"].append(loss.item())
                history["psnr"].append(p)
                history["gaussians"].append(params["means"].shape[0])
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.1f}", n=params["means"].shape[0])
                if callback is not None:
                    callback(step, dict(loss=loss.item(), psnr=p, gaussians=params["means"].shape[0]))
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        scene = GaussianScene(params["means"].detach().clone(), F.normalize(params["quats"].detach(), dim=-1),
                              params["scales"].detach().exp(), torch.sigmoid(params["opacities"].detach()),
                              torch.sigmoid(params["colors"].detach()), None,
                              dict(history=history, fit_seconds=seconds, backend=backend, iters=iters,
                                   sphere=(centre.tolist(), radius), n_init=len(scene0), views=V,
                                   resolution=(H, W)))
    return scene


def _densify_and_prune(params, opt, grad_acc, grad_cnt, cfg, radius, cap, gen):
    """Clone small / split large Gaussians whose mean view-space gradient is high; drop faint ones."""
    N = params["means"].shape[0]
    dev = params["means"].device
    avg = grad_acc / grad_cnt.clamp_min(1)
    grow = avg > cfg.grad_threshold
    room = max(0, cap - N)
    if int(grow.sum()) > room:                                           # keep the strongest within the cap
        top = avg.topk(room).indices if room > 0 else torch.zeros(0, dtype=torch.long, device=dev)
        grow = torch.zeros_like(grow)
        grow[top] = True
    scales = params["scales"].exp()
    big = scales.max(-1).values > cfg.split_scale * radius
    split, clone = grow & big, grow & ~big
    opac = torch.sigmoid(params["opacities"])
    keep = (opac > cfg.prune_opacity) & ~split                           # split parents are replaced by 2 children
    keep &= scales.max(-1).values < 0.5 * radius
    # new set = kept originals + clones (copies) + 2 children per split Gaussian
    i_keep, i_clone, i_split = keep.nonzero()[:, 0], clone.nonzero()[:, 0], split.nonzero()[:, 0]
    src = torch.cat([i_keep, i_clone, i_split, i_split])
    fresh = torch.cat([torch.zeros(len(i_keep), dtype=torch.bool, device=dev),
                       torch.ones(len(src) - len(i_keep), dtype=torch.bool, device=dev)])
    new = {k: v.detach()[src].clone() for k, v in params.items()}
    if len(i_split):
        ns = len(i_split)
        R = quat_to_rotmat(params["quats"].detach()[i_split])
        s = scales.detach()[i_split]
        off = torch.randn(2 * ns, 3, generator=gen).to(dev) * s.repeat(2, 1)
        off = (R.repeat(2, 1, 1) @ off[:, :, None])[:, :, 0]
        a = len(i_keep) + len(i_clone)
        new["means"][a:] = params["means"].detach()[i_split].repeat(2, 1) + off
        new["scales"][a:] = (s / 1.6).log().repeat(2, 1)
    _adam_reindex(opt, params, src, fresh, new)
    n = params["means"].shape[0]
    return torch.zeros(n, device=dev), torch.zeros(n, device=dev)


def _prune(params, opt, cfg, radius):
    dev = params["means"].device
    keep = (torch.sigmoid(params["opacities"]) > cfg.prune_opacity)
    keep &= params["scales"].exp().max(-1).values < 0.5 * radius
    src = keep.nonzero()[:, 0]
    if len(src) < params["means"].shape[0]:
        new = {k: v.detach()[src].clone() for k, v in params.items()}
        _adam_reindex(opt, params, src, torch.zeros(len(src), dtype=torch.bool, device=dev), new)
    n = params["means"].shape[0]
    return torch.zeros(n, device=dev), torch.zeros(n, device=dev)


# ================================================================================================
# 8. consistency and the turntable
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
