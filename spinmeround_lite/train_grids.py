"""Pictures of a training run: the loss curve and sample grids of held-out identities, the same inputs and seeds
at every checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import SpinModel
from .train_data import TrainData, encoder_device, frontal_view, spread_views

GRID_IDENTITIES = 2      # held-out identities in the periodic sample grids


def smooth(values: list[float], window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_loss(losses: list[float], path: Path, title: str = "EDM training loss") -> Path:
    """The loss curve (per step and a running mean) as a PNG.

    Drawn on a ``matplotlib.figure.Figure`` of its own, without pyplot: the caller's backend (a notebook's inline
    one) stays as it is, and nothing is left open."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    ax.plot(steps, smooth(losses, max(1, len(losses) // 20)), lw=1.8, label="running mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    from .runs import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_sample_grid(truth: torch.Tensor, img: torch.Tensor, nrm: torch.Tensor, path: Path) -> Path:
    """Three rows per sample of ``(B, V, 3, H, W)`` tensors: the true views, the generated ones, their normals."""
    rows = []
    for b in range(truth.shape[0]):
        rows += [truth[b], img[b], nrm[b]]
    return save_grid(rows, path)


def save_grid(rows: list[torch.Tensor], path: Path, pad: int = 2) -> Path:
    """Rows of images (each (N,3,H,W) in [0,1]) as one PNG with white gaps."""
    from PIL import Image

    n = max(r.shape[0] for r in rows)
    H, W = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (H + pad) + pad, n * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c in range(row.shape[0]):
            y, x = pad + r * (H + pad), pad + c * (W + pad)
            canvas[y:y + H, x:x + W] = _to_uint8(row[c])
    from .runs import atomic_path
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="png")
    return Path(path)


class GridMaker:
    """Periodic sample grids of held-out identities, with the same inputs and seeds at every checkpoint.

    Per identity three rows over ``P`` views spread around the head (column 0 = the frontal input view):
    the true renders, the generated images, the generated normal maps. The sampler is ``sampling.sample``
    (Euler on the Karras schedule) with classifier-free guidance at ``profile.cfg_scale``.

    ``split="train"``: the first training identities of ``data`` instead, at the dataset's own views and cameras,
    exactly as training showed them: ``measure`` then says whether the model reproduces what it trained on (the
    memorisation half of the overfit check; ``checks.teacher_forced`` asks for new cameras at pitch 0).
    """

    def __init__(self, data: TrainData, codec, n_identities: int = GRID_IDENTITIES, steps: int | None = None,
                 split: str = "heldout"):
        if split not in ("heldout", "train"):
            raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
        ds, P = (data.heldout if split == "heldout" else data.train), data.P
        rows = (range(min(n_identities, len(ds))) if split == "heldout"
                else [ds.ids.index(n) for n in data.train_ids[:n_identities]])
        self.profile, self.codec, self.steps = data.profile, codec, steps or data.profile.sample_steps
        self.truth, self.truth_normal, self.alpha, cond, rays, emb = [], [], [], [], [], []
        for i in rows:
            c2w, K, yaw, pitch = data.camera(ds, i)
            idx = spread_views(yaw, frontal_view(yaw, pitch), P)
            v = ds.views(i, idx)
            self.truth.append(v["rgb"])
            self.truth_normal.append(v["normal_rgb"])
            self.alpha.append(v["alpha"])
            cond.append(data.latents(ds.ids[i], idx))
            rays.append(data.rays(ds, i, idx))
            emb.append(data.id_emb[ds.ids[i]])
        self.cond, self.rays, self.id_emb = torch.stack(cond), torch.stack(rays), torch.stack(emb)
        self.mask = torch.zeros(self.cond.shape[:2], dtype=torch.bool)
        self.mask[:, 0] = True                                               # the frontal view is given
        self._ceiling: dict | None = None                                    # measure's model-independent part

    @torch.no_grad()
    def generate(self, model: SpinModel, seed: int = 0, cfg_scale: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded images and normal maps (B, V, 3, H, W), view 0 the given one."""
        from . import sampling

        device = encoder_device(model)
        cond, mask, rays, emb = (t.to(device) for t in (self.cond, self.mask, self.rays, self.id_emb))
        scale = self.profile.cfg_scale if cfg_scale is None else cfg_scale
        denoise = sampling.cfg_denoiser(model, cond, mask, rays, emb, scale=scale)
        sigmas = sampling.profile_sigmas(self.profile, self.steps)
        x0 = sampling.sample(denoise, cond.shape, sigmas, sampling.generators(seed, cond.shape[0]),
                             solver="euler", cond=cond, mask=mask, device=device)
        return self._decode(x0)

    def _decode(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, V = x0.shape[:2]
        H, W = self.truth[0].shape[-2:]
        img = self.codec.decode(x0[:, :, :4].flatten(0, 1).to(self.codec.device)).cpu().view(B, V, 3, H, W)
        nrm = self.codec.decode(x0[:, :, 4:].flatten(0, 1).to(self.codec.device)).cpu().view(B, V, 3, H, W)
        return img, nrm

    @torch.no_grad()
    def measure(self, model: SpinModel, seed: int = 0, cfg_scale: float | None = None) -> dict:
        """SSIM and normal error of the generated views (all but the given one) against the true renders, and the
        same for the true latents decoded (the autoencoder's ceiling, model-independent: decoded once)."""
        from .metrics import normal_distance, ssim

        truth, tn, a = (torch.stack(x)[:, 1:].flatten(0, 1) for x in (self.truth, self.truth_normal, self.alpha))
        flat = lambda x: x[:, 1:].flatten(0, 1)
        if self._ceiling is None:
            ceil_img, ceil_nrm = self._decode(self.cond)
            self._ceiling = {"ceiling_ssim": ssim(flat(ceil_img), truth).mean().item(),
                             "ceiling_normal_err_deg": normal_distance(flat(ceil_nrm), tn, a).mean().item()}
        img, nrm = self.generate(model, seed, cfg_scale)
        return {"ssim": ssim(flat(img), truth).mean().item(),
                "normal_err_deg": normal_distance(flat(nrm), tn, a).mean().item(), **self._ceiling,
                "pictures": (torch.stack(self.truth), img, nrm)}

    @torch.no_grad()
    def __call__(self, model: SpinModel, path: Path, seed: int = 0) -> Path:
        img, nrm = self.generate(model, seed)
        return save_sample_grid(torch.stack(self.truth), img, nrm, path)
