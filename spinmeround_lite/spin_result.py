"""A spin's result: its views, normal maps and cameras, saved to a folder (PNGs, ``views.npz``, a turntable GIF)
and loaded back.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .runs import atomic_path, write_gif, write_json


def _u8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3)."""
    return (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class SpinResult:
    """A generated spin. ``views`` (N, 3, H, W) RGB in [0, 1]; ``normals`` (N, 3, H, W) normal maps as images,
    ``(n + 1) / 2`` with white background (``normal_vectors()`` gives unit vectors); ``yaw``, ``pitch`` (N,)
    degrees; ``c2w`` (N, 4, 4) OpenCV camera-to-world; ``K`` (3, 3) pixel intrinsics. View 0 is the input."""
    views: torch.Tensor
    normals: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor
    c2w: torch.Tensor
    K: torch.Tensor
    input: torch.Tensor | None = None           # the framed input image (3, H, W)
    latents: torch.Tensor | None = None         # (N, 8, h, w) [image | normal] latents
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.views)

    def __repr__(self) -> str:
        return (f"SpinResult({len(self)} views of {self.views.shape[-1]}x{self.views.shape[-2]}, yaw "
                f"{float(self.yaw[0]):+.1f}..{float(self.yaw[-1]):+.1f} deg, {self.seconds:.1f} s)")

    def normal_vectors(self) -> torch.Tensor:
        """Unit camera-space normals (N, 3, H, W) decoded from the normal images."""
        return F.normalize(self.normals * 2 - 1, dim=1)

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``views.npz`` arrays: rgb, normal uint8 (N, H, W, 3); c2w (N, 4, 4), K (3, 3), yaw, pitch (N,)."""
        return {"rgb": _u8(self.views), "normal": _u8(self.normals),
                "c2w": self.c2w.float().cpu().numpy(), "K": self.K.float().cpu().numpy(),
                "yaw": self.yaw.float().cpu().numpy(), "pitch": self.pitch.float().cpu().numpy()}

    def frames(self, min_size: int = 128) -> list[np.ndarray]:
        """Turntable frames: RGB and normals side by side, uint8 (H', 2 W', 3), upscaled to ``min_size``."""
        a = self.arrays()
        both = np.concatenate([a["rgb"], a["normal"]], axis=2)           # (N, H, 2W, 3)
        k = max(1, math.ceil(min_size / both.shape[1]))
        return list(both.repeat(k, axis=1).repeat(k, axis=2))

    def save(self, folder: str | os.PathLike, gif: bool = True) -> Path:
        """Write ``rgb/NNN.png``, ``normal/NNN.png``, ``views.npz``, ``turntable.gif`` and ``spin.json``."""
        from PIL import Image

        folder = Path(folder)
        a = self.arrays()
        for key in ("rgb", "normal"):
            for i, im in enumerate(a[key]):
                with atomic_path(folder / key / f"{i:03d}.png") as tmp:
                    Image.fromarray(im).save(tmp, format="png")
        with atomic_path(folder / "views.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **a)
        if gif:
            frames = self.frames()
            write_gif(frames, folder / "turntable.gif", duration_ms=max(20, int(4000 / len(frames))))
        write_json(folder / "spin.json", {"views": len(self), "yaw": self.yaw, "pitch": self.pitch,
                                          "seconds": self.seconds, **self.info})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "SpinResult":
        """Read a saved spin back from its ``views.npz``."""
        path = Path(folder) / "views.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: generate the spin first (spin(...).save or ensure_spin)")
        with np.load(path) as z:
            a = {k: z[k] for k in z.files}
        img = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        info = {}
        if (Path(folder) / "spin.json").exists():
            info = json.loads((Path(folder) / "spin.json").read_text())
        return cls(img(a["rgb"]), img(a["normal"]), torch.from_numpy(a["yaw"]), torch.from_numpy(a["pitch"]),
                   torch.from_numpy(a["c2w"]), torch.from_numpy(a["K"]), seconds=float(info.get("seconds", 0.0)),
                   info=info)
