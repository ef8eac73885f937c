"""A fitted set of 3D Gaussians: rendered through the renderer contract, saved as a ``.ply`` in the 3DGS layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import w2c_from_c2w
from .runs import atomic_path
from .splat_render import rasterize

SH_C0 = 0.28209479177387814  # zeroth spherical-harmonic basis: rgb = 0.5 + SH_C0 * f_dc in a 3DGS .ply


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
