"""The renderer contract of 3D Gaussian Splatting, :func:`rasterize`, and its two backends (notebook 08).

The shapes are those gsplat's ``rasterization`` documents::

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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ALPHA_MAX = 0.99        # clamp of one Gaussian's alpha (3DGS); gsplat's kernel clamps at 0.999
ALPHA_MIN = 1.0 / 255   # contributions below this are skipped
EPS2D = 0.3             # low-pass dilation of every 2D covariance, px^2 (gsplat's eps2d)
NEAR_PLANE = 0.01       # Gaussians nearer than this (camera z) are not drawn


# ================================================================================================
# geometry of one Gaussian
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
# the PyTorch rasterizer
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
# the contract and the gsplat backend
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
