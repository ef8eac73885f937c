"""A spin's views as splatting reads them: the on-disk format, resizing, choosing views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

VIEWS_FILE = "views.npz"


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
