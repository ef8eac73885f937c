"""Image and geometry metrics of the paper's protocol (section 7 of METHOD.md).

Images are float tensors in [0, 1], ``(N, 3, H, W)`` (or ``(3, H, W)``); each metric returns one value per image.

* ``l2`` (the paper's L2: mean squared error on [0, 1]), ``psnr``, ``ssim`` (Gaussian window 11, sigma 1.5).
* ``lpips``: AlexNet LPIPS computed here from local safetensors weights (``weights/lpips/``); the course ships
  none, so ``lpips_available()`` says why it is missing and the evaluation reports the figure as null.
* ``identity_similarity``: cosine of two identity encoders' embeddings (conditioning / independent evaluation).
* ``normal_angle_error_deg``: mean angle between normal maps inside the silhouette; ``normal_distance``: the same
  between normal *images*, over the head pixels of either (the trainer's sample grids, notebook 07's checks).
* ``cosine``, ``roc_auc``: for embeddings (notebook 01).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F


def _batch(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.ndim == 3 else x


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image on [0, 1] images (the paper's "L2"). (N,C,H,W) x2 -> (N,)."""
    a, b = _batch(a).float(), _batch(b).float()
    return ((a - b) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for [0, 1] images. (N,C,H,W) x2 -> (N,)."""
    return -10.0 * torch.log10(l2(a, b) + eps)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian window, per image. (N,C,H,W) x2 -> (N,).

    The window shrinks to the image side for images smaller than 11 px.
    """
    a, b = _batch(a).float(), _batch(b).float()
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma, c, a.device, a.dtype)
    conv = lambda x: F.conv2d(x, w, groups=c)
    mu_a, mu_b = conv(a), conv(b)
    s_aa = conv(a * a) - mu_a ** 2
    s_bb = conv(b * b) - mu_b ** 2
    s_ab = conv(a * b) - mu_a * mu_b
    C1, C2 = k1 ** 2, k2 ** 2
    m = ((2 * mu_a * mu_b + C1) * (2 * s_ab + C2)) / ((mu_a ** 2 + mu_b ** 2 + C1) * (s_aa + s_bb + C2))
    return m.flatten(1).mean(1)


def normal_angle_error_deg(n_pred: torch.Tensor, n_true: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean angle in degrees between normal maps (N,3,H,W) (unit or not), over ``mask`` (N,1,H,W) pixels. -> (N,)."""
    n_pred, n_true = _batch(n_pred).float(), _batch(n_true).float()
    cos = (F.normalize(n_pred, dim=1) * F.normalize(n_true, dim=1)).sum(1, keepdim=True).clamp(-1, 1)
    ang = torch.rad2deg(torch.acos(cos))
    if mask is None:
        return ang.flatten(1).mean(1)
    mask = _batch(mask).float()
    return (ang * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


def normal_rgb_to_vec(normal_rgb: torch.Tensor) -> torch.Tensor:
    """Decode a normal image in [0, 1] to unit vectors: n = normalize(2 * rgb - 1). (..., 3, H, W)."""
    return F.normalize(normal_rgb * 2 - 1, dim=-3)


def normal_distance(pred_rgb: torch.Tensor, true_rgb: torch.Tensor, true_alpha: torch.Tensor) -> torch.Tensor:
    """Mean normal-map angle error (degrees) between normal *images* (N,3,H,W) over the head pixels of either.

    The generated head's pixels are those whose decoded normal image is not background white; a background pixel
    decodes to the vector (1,1,1)/sqrt(3), so a head drawn where the truth has none (or the reverse) costs its
    angle. -> (N,).
    """
    pv = normal_rgb_to_vec(pred_rgb)
    tv = normal_rgb_to_vec(true_rgb)
    gen_mask = (pred_rgb.min(dim=1, keepdim=True).values < 0.9).float()
    mask = torch.maximum(gen_mask, (true_alpha > 0.5).float())
    return normal_angle_error_deg(pv, tv, mask)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of embeddings (N,D) x2 -> (N,)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (probability a positive outscores a negative, ties count half)."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    order = torch.argsort(torch.cat([pos, neg]))
    ranks = torch.empty_like(order, dtype=torch.double)
    allv = torch.cat([pos, neg])[order]
    ranks[order] = torch.arange(1, len(order) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inv, counts = torch.unique(allv, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inv, ranks[order])
    ranks[order] = (sums / counts)[inv]
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# ----------------------------------------------------------------------------------------------
# identity similarity
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def identity_similarity(encoder, a: torch.Tensor, b: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Cosine of identity embeddings of image pairs: cos(E(a_i), E(b_i)). (N,3,H,W) x2 -> (N,).

    ``encoder`` is anything with ``embed(images (B,3,H,W) in [0,1]) -> (B,D)`` (``identity.IdentityEncoder``):
    the conditioning encoder stands in for the paper's ArcFace, the independent evaluation encoder for VGGFace.
    """
    a, b = _batch(a).float(), _batch(b).float()
    if a.shape != b.shape:
        raise ValueError(f"identity_similarity needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    out = []
    for i in range(0, len(a), batch):
        ea = encoder.embed(a[i:i + batch]).float()
        eb = encoder.embed(b[i:i + batch]).float()
        out.append(cosine(ea, eb).cpu())
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------
# LPIPS (Zhang et al. 2018), AlexNet variant, from local safetensors weights
# ----------------------------------------------------------------------------------------------
LPIPS_ENV = "SMR_LPIPS_WEIGHTS"          # a .safetensors file or a folder of them; default <checkout>/weights/lpips
LPIPS_CHANNELS = (64, 192, 384, 256, 256)  # channels of the five AlexNet taps (relu1 .. relu5)
# AlexNet ``features`` convolutions: (index in torchvision's Sequential, in, out, kernel, stride, padding)
_ALEX = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1), (8, 384, 256, 3, 1, 1),
         (10, 256, 256, 3, 1, 1))
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)   # LPIPS input scaling of images in [-1, 1]
_LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_MIN_SIDE = 31                       # smaller images vanish in AlexNet's second max-pool


def lpips_weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where LPIPS weights are looked for: ``path``, else ``$SMR_LPIPS_WEIGHTS``, else ``<checkout>/weights/lpips``."""
    if path:
        return Path(path)
    env = os.environ.get(LPIPS_ENV)
    if env:
        return Path(env)
    from .runs import find_repo_root
    root = find_repo_root(Path(__file__).parent) or find_repo_root() or Path.cwd()
    return root / "weights" / "lpips"


def _lpips_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.glob("*.safetensors")) if path.is_dir() else []


def _lpips_state(path: Path) -> dict[str, torch.Tensor]:
    """Read and rename LPIPS weights to ``features.N.{weight,bias}`` and ``lins.K`` (1,C,1,1).

    Accepted key layouts: torchvision AlexNet (``features.N.weight``), the ``lpips`` package module
    (``net.sliceS.N.weight``, ``lins.K.model.1.weight``) and its linear-layer file (``linK.model.1.weight``),
    converted to safetensors (this course never unpickles ``.pth`` files).
    """
    from safetensors.torch import load_file
    files = _lpips_files(path)
    if not files:
        raise FileNotFoundError(f"no LPIPS weights at {path}")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            raw.update(load_file(str(f)))
        except Exception as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); convert the weights again") from None
    state = {}
    for k, v in raw.items():
        m = re.search(r"(?:^|\.)(?:features|slice\d)\.(\d+)\.(weight|bias)$", k)
        if m:
            state[f"features.{m.group(1)}.{m.group(2)}"] = v.float()
            continue
        m = re.search(r"(?:^|\.)lins?\.?(\d)\.(?:model\.\d\.)?weight$", k)
        if m:
            state[f"lins.{m.group(1)}"] = v.float().reshape(1, -1, 1, 1)
    missing = [f"features.{i}.{p}" for i, *_ in _ALEX for p in ("weight", "bias") if f"features.{i}.{p}" not in state]
    missing += [f"lins.{k}" for k in range(5) if f"lins.{k}" not in state]
    if missing:
        raise ValueError(f"LPIPS weights at {path} lack {', '.join(missing)}: the folder needs AlexNet's "
                         f"`features` convolutions and the five LPIPS linear layers (lin0..lin4)")
    for i, cin, cout, k, _, _ in _ALEX:
        if tuple(state[f"features.{i}.weight"].shape) != (cout, cin, k, k):
            raise ValueError(f"LPIPS weights at {path}: features.{i}.weight has shape "
                             f"{tuple(state[f'features.{i}.weight'].shape)}, AlexNet needs {(cout, cin, k, k)}")
    for j, c in enumerate(LPIPS_CHANNELS):
        if state[f"lins.{j}"].shape[1] != c:
            raise ValueError(f"LPIPS weights at {path}: lin{j} has {state[f'lins.{j}'].shape[1]} inputs, needs {c}")
    return state


def lpips_available(path: str | os.PathLike | None = None) -> tuple[bool, str]:
    """``(True, where)`` when LPIPS weights load from ``path`` (``lpips_weights_path``), else ``(False, reason)``."""
    p = lpips_weights_path(path)
    if not _lpips_files(p):
        return False, (f"no LPIPS weights at {p}: LPIPS needs pretrained AlexNet + LPIPS linear-layer weights, which "
                       f"this offline course does not ship; put them there as .safetensors (or set ${LPIPS_ENV})")
    try:
        _lpips_state(p)
    except (ValueError, FileNotFoundError) as e:
        return False, str(e)
    return True, str(p)


class LPIPS(torch.nn.Module):
    """Learned perceptual distance d(a, b) = sum_l mean_hw || w_l * (f_l(a) - f_l(b)) ||^2 with unit-normalised
    AlexNet features f_l (relu1..relu5) and learned channel weights w_l. Images (N,3,H,W) in [0,1] -> (N,).
    """

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for i, *_ in _ALEX:
            self.register_buffer(f"w{i}", state[f"features.{i}.weight"])
            self.register_buffer(f"b{i}", state[f"features.{i}.bias"])
        for j in range(5):
            self.register_buffer(f"lin{j}", state[f"lins.{j}"])
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "LPIPS":
        ok, why = lpips_available(path)
        if not ok:
            raise FileNotFoundError(why)
        return cls(_lpips_state(lpips_weights_path(path)))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five AlexNet taps of images in [0, 1] (N,3,H,W) -> list of (N,C_l,h_l,w_l)."""
        x = ((x * 2 - 1) - self.shift) / self.scale
        taps = []
        for n, (i, _, _, _, stride, pad) in enumerate(_ALEX):
            if n in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, getattr(self, f"w{i}"), getattr(self, f"b{i}"), stride=stride, padding=pad))
            taps.append(x)
        return taps

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = _batch(a).float(), _batch(b).float()
        if a.shape != b.shape:
            raise ValueError(f"lpips needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        if min(a.shape[-2:]) < LPIPS_MIN_SIDE:
            raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} px, got {tuple(a.shape[-2:])}")
        a, b = a.to(self.shift.device), b.to(self.shift.device)
        d = 0.0
        for j, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + F.conv2d((fa - fb) ** 2, getattr(self, f"lin{j}")).mean((1, 2, 3))
        return d.cpu()


_LPIPS_CACHE: dict[str, LPIPS] = {}


def lpips(a: torch.Tensor, b: torch.Tensor, path: str | os.PathLike | None = None) -> torch.Tensor:
    """LPIPS distance per image pair (N,3,H,W) x2 in [0,1] -> (N,). Raises ``FileNotFoundError`` (with the reason)
    when the weights are not available: check ``lpips_available()`` first and report the figure as null."""
    key = str(lpips_weights_path(path))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = LPIPS.load(path)
    return _LPIPS_CACHE[key](a, b)
