"""Fitting 3D Gaussians to views: initialisation from the silhouettes, Adam, densification and pruning (notebook 08).

:func:`fit_gaussians`: Gaussians initialised from the views (points carved by the silhouettes in a shell of the
head's bounding sphere, or random in the sphere), Adam on ``0.8 L1 + 0.2 (1 - SSIM)`` (plus an L1 on the
silhouette when alphas are given), clone/split by view-space gradient and prune by opacity on a short schedule.
The result is a :class:`GaussianScene`: ``render``, ``save_ply`` (the standard 3DGS layout).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import trange

from .cameras import w2c_from_c2w
from .metrics import psnr, ssim
from .splat_render import pick_backend, quat_to_rotmat, rasterize
from .splat_scene import GaussianScene


# ================================================================================================
# initialisation from the views
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
# fitting
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
