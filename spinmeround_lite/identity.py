"""Identity encoders: a face image in, a 512-d unit vector out, close for the same person.

METHOD.md section 1 (and section 8 for the swap). One interface, two backends::

    enc.embed(images (B, 3, H, W) in [0, 1]) -> (B, 512), L2-normalised

* ``learned`` (``LearnedEncoder``, the offline default): a small CNN trained on the procedural heads with the
  additive angular margin loss of ArcFace (Deng et al. 2019) over the training identities, on near-frontal
  views (|yaw| <= 30 deg) with the jitter a face crop has (small shifts, scales, rotations, colour, mirror).
  ``ensure_encoder(run, "cond")`` trains the one the model is conditioned on; ``ensure_encoder(run, "eval")``
  an independent one (another seed and width) that only judges results, as VGGFace does in the paper.
* ``insightface`` (``InsightFaceEncoder``): the real ArcFace network through onnxruntime, for photos. Faces are
  found by an SCRFD detector ONNX (5 keypoints), aligned by the similarity transform (Umeyama) of those
  keypoints onto the 112x112 ArcFace template, and embedded. Model files come from a local folder
  (``weights/arc2face/arcface.onnx``, ``weights/insightface/antelopev2/``); nothing is downloaded.

ArcFace loss, with ``W`` (C, 512) unit class centres, unit embeddings ``e``, ``cos theta_j = W_j . e``::

    L = -log( exp(s cos(theta_y + m)) / (exp(s cos(theta_y + m)) + sum_{j != y} exp(s cos theta_j)) )

``s`` = 32 (scale), ``m`` = 0.5 (additive angular margin, radians).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import metrics
from .checkpoints import load_checkpoint, save_checkpoint
from .runs import Run, find_repo_root, read_json, write_json

EMBED_DIM = 512
ROLES = {"cond": "id_cond", "eval": "id_eval"}
ROLE_SEEDS = {"cond": 1, "eval": 2}     # fixed, so every notebook finds the same encoders in the run folder
FRONTAL_YAW = 30.0                      # near-frontal: |yaw| <= this many degrees


class IdentityEncoder:
    """The interface: ``embed(images (B, 3, H, W) in [0, 1]) -> (B, 512)`` unit vectors."""

    dim = EMBED_DIM
    backend = "?"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of two image batches (B, 3, H, W) x2 -> (B,)."""
        return metrics.cosine(self.embed(a), self.embed(b))


# ----------------------------------------------------------------------------------------------
# the learned backend
# ----------------------------------------------------------------------------------------------
@dataclass
class EncoderConfig:
    """Everything that defines a learned encoder; stored as its checkpoint's ``config.json``."""

    backend: str = "learned"
    role: str = "cond"
    width: int = 16             # channels of the first stage (doubling twice, then constant)
    input_res: int = 64         # images are resized to input_res x input_res
    embed_dim: int = EMBED_DIM
    seed: int = 1
    steps: int = 400            # optimiser steps
    batch: int = 64
    lr: float = 3e-3            # AdamW peak learning rate (one-cycle: warm-up then cosine)
    scale: float = 32.0         # ArcFace s
    margin: float = 0.5         # ArcFace m (radians)
    max_yaw: float = FRONTAL_YAW
    classes: int = 0            # training identities (rows of W)


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LearnedEncoder(nn.Module, IdentityEncoder):
    """Small CNN: stem, stride-2 stages down to 4x4, then ArcFace's BN-flatten-Linear-BN embedding head.

    forward(x (B, 3, r, r) normalised to [-1, 1]) -> (B, 512) raw features;
    embed(images (B, 3, H, W) in [0, 1]) -> (B, 512) unit vectors (eval mode, resized to ``input_res``).
    """

    backend = "learned"

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        r, w = config.input_res, config.width
        if r < 8 or r & (r - 1):
            raise ValueError(f"input_res must be a power of two >= 8, got {r}")
        n_down = int(math.log2(r // 4))
        layers, c = [conv_bn(3, w)], w
        for i in range(n_down):
            c_out = w * 2 ** min(i, 2)
            layers += [conv_bn(c, c_out, stride=2), conv_bn(c_out, c_out)]
            c = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.Flatten(), nn.Dropout(0.1),
                                  nn.Linear(c * 16, config.embed_dim, bias=False), nn.BatchNorm1d(config.embed_dim))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W) -> (B, 3, r, r) in [-1, 1] (antialiased resize)."""
        return preprocess(images, self.config.input_res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"embed expects images (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [F.normalize(self(self.preprocess(images[i:i + batch].to(dev).float())), dim=-1)
               for i in range(0, len(images), batch)]
        self.train(was_training)
        return torch.cat(out).to(images.device)


def preprocess(images: torch.Tensor, res: int) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> (B, 3, res, res) in [-1, 1]."""
    if images.shape[-1] != res or images.shape[-2] != res:
        images = F.interpolate(images, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return images * 2 - 1


# ----------------------------------------------------------------------------------------------
# ArcFace loss and crop jitter
# ----------------------------------------------------------------------------------------------
def arcface_logits(emb: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, s: float = 32.0, m: float = 0.5
                   ) -> torch.Tensor:
    """Logits of the additive angular margin loss. emb (B, D), W (C, D), labels (B,) -> (B, C).

    ``s cos theta_j`` for every class, ``s cos(theta_y + m)`` for the true one (``theta + m`` capped at pi so
    the target logit keeps falling as the angle grows).
    """
    cos = F.normalize(emb, dim=-1) @ F.normalize(W, dim=-1).T                        # (B, C)
    theta_y = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-6, 1 - 1e-6))  # (B, 1)
    target = torch.cos((theta_y + m).clamp(max=math.pi))
    return s * cos.scatter(1, labels[:, None], target)


def arcface_loss(emb: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, s: float = 32.0, m: float = 0.5
                 ) -> torch.Tensor:
    """ArcFace loss (module docstring): cross-entropy of ``arcface_logits``."""
    return F.cross_entropy(arcface_logits(emb, W, labels, s, m), labels)


def crop_jitter(x: torch.Tensor, generator: torch.Generator | None = None, shift: float = 0.06,
                scale: float = 0.08, rot_deg: float = 6.0, color: float = 0.08, flip: bool = True) -> torch.Tensor:
    """The variation of a face crop, on [0, 1] images on white (B, 3, H, W) -> (B, 3, H, W).

    Random similarity transform (shift up to ``shift`` of the image, scale ``1 +- scale``, rotation
    ``+- rot_deg``), optional mirror, brightness/contrast ``1 +- color`` and per-channel gain ``1 +- color/2``.
    Pixels that come from outside the image are white, like the renders' background.
    """
    B, dev = x.shape[0], x.device
    u = lambda *shape: torch.rand(*shape, generator=generator, device="cpu").to(dev) * 2 - 1
    a = torch.deg2rad(u(B) * rot_deg)
    k = 1 + u(B) * scale
    sx = torch.where(torch.rand(B, generator=generator).to(dev) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) / k * sx, -torch.sin(a) / k
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) / k * sx, torch.cos(a) / k
    theta[:, :, 2] = u(B, 2) * shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    bright = 1 + u(B, 1, 1, 1) * color
    contrast = 1 + u(B, 1, 1, 1) * color
    gain = 1 + u(B, 3, 1, 1) * color / 2
    mean = y.mean((1, 2, 3), keepdim=True)
    y = ((y - mean) * contrast + mean) * bright * gain
    return y.clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def view_images(ds, max_yaw: float | None = FRONTAL_YAW, identities=None) -> dict[str, torch.Tensor]:
    """Views of ``ds`` (a ``HeadDataset``) with |yaw| <= ``max_yaw`` (None: all views).

    Returns ``rgb`` (N, 3, H, W), ``label`` (N,) index of the identity in ``ds``, ``yaw``, ``pitch`` (N,).
    """
    rgb, label, yaw, pitch = [], [], [], []
    for i in (range(len(ds)) if identities is None else identities):
        v = ds.views(i, list(range(ds.views_per_identity)))
        keep = torch.ones_like(v["yaw"], dtype=torch.bool) if max_yaw is None else v["yaw"].abs() <= max_yaw + 1e-3
        rgb.append(v["rgb"][keep])
        label.append(torch.full((int(keep.sum()),), i, dtype=torch.long))
        yaw.append(v["yaw"][keep])
        pitch.append(v["pitch"][keep])
    if not rgb:
        raise ValueError("the dataset split has no identities")
    return {"rgb": torch.cat(rgb).float(), "label": torch.cat(label), "yaw": torch.cat(yaw).float(),
            "pitch": torch.cat(pitch).float()}


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def train_encoder(images: torch.Tensor, labels: torch.Tensor, config: EncoderConfig,
                  device: str | torch.device = "cpu", progress: bool = True) -> tuple[LearnedEncoder, dict]:
    """Train a ``LearnedEncoder`` with the ArcFace loss on ``images`` (N, 3, H, W) in [0, 1], ``labels`` (N,).

    Returns the encoder (eval mode) and a log ``{"loss": [...], "acc": [...], "seconds": s}`` (per step; ``acc`` is
    the share of the batch whose nearest class centre is its own, margin not applied).
    """
    device = torch.device(device)
    classes = int(labels.max()) + 1
    config.classes = classes
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    enc = LearnedEncoder(config).to(device)
    W = nn.Parameter(F.normalize(torch.randn(classes, config.embed_dim, generator=g), dim=-1).to(device))
    x_all = preprocess(images.float(), config.input_res).add(1).div(2).to(device)   # resized once, [0, 1]
    y_all = labels.to(device)
    opt = torch.optim.AdamW([*enc.parameters(), W], lr=config.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(config.steps, 1),
                                                pct_start=0.15)
    log = {"loss": [], "acc": []}
    t0 = time.perf_counter()
    enc.train()
    bar = tqdm(range(config.steps), desc=f"ArcFace encoder ({config.role}, width {config.width})",
               disable=not progress)
    for _ in bar:
        idx = torch.randint(len(x_all), (min(config.batch, len(x_all)),), generator=g).to(device)
        x = crop_jitter(x_all[idx], generator=g) * 2 - 1
        emb = enc(x)
        logits = arcface_logits(emb, W, y_all[idx], config.scale, config.margin)
        loss = F.cross_entropy(logits, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = (F.normalize(emb, dim=-1) @ F.normalize(W, dim=-1).T).argmax(1).eq(y_all[idx]).float().mean()
        log["loss"].append(loss.item())
        log["acc"].append(acc.item())
        bar.set_postfix(loss=f"{log['loss'][-1]:.3f}", acc=f"{log['acc'][-1]:.2f}")
    log["seconds"] = time.perf_counter() - t0
    enc.eval()
    return enc, log


def encoder_config(profile, role: str) -> EncoderConfig:
    """The learned encoder of ``role`` ("cond" or "eval") for a profile."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return EncoderConfig(role=role, width=profile.id_width if role == "cond" else profile.id_eval_width,
                         input_res=profile.id_input_res, seed=ROLE_SEEDS[role], steps=profile.id_train_steps,
                         batch=profile.id_batch)


def save_encoder(enc: LearnedEncoder, folder: str | os.PathLike, log: dict | None = None) -> Path:
    folder = Path(folder)
    save_checkpoint(folder, enc.state_dict(), asdict(enc.config))
    if log is not None:
        write_json(folder / "train_log.json", log)
    return folder


def load_encoder(folder: str | os.PathLike, expected: dict | None = None,
                 device: str | torch.device = "cpu") -> LearnedEncoder:
    """A learned encoder saved by ``save_encoder`` (``CheckpointError`` if missing or of another configuration)."""
    state, cfg = load_checkpoint(folder, expected=expected)
    known = {k: v for k, v in cfg.items() if k in EncoderConfig.__dataclass_fields__}
    enc = LearnedEncoder(EncoderConfig(**known))
    enc.load_state_dict(state)
    return enc.to(device).eval()


def weights_root() -> Path:
    """Folder of external model files: ``$SMR_WEIGHTS``, else ``<checkout>/weights``."""
    if os.environ.get("SMR_WEIGHTS"):
        return Path(os.environ["SMR_WEIGHTS"])
    root = find_repo_root(Path(__file__).parent) or find_repo_root()
    return (root / "weights") if root else Path("weights")


def ensure_encoder(run: Run, role: str = "cond", progress: bool = True) -> IdentityEncoder:
    """The ``role`` encoder of this run: trained into ``run.model_dir("id_cond" | "id_eval")`` if incomplete.

    Trains on the training split's near-frontal views (``dataset.ensure_dataset(run)`` builds the data first).
    A profile whose ``extra`` says ``{"id_backend": "insightface"}`` gets the real ArcFace as its conditioning
    encoder instead (model files under ``weights_root()``); the evaluation encoder is always a learned one.
    """
    from .dataset import HeadDataset, ensure_dataset

    if role == "cond" and run.profile.extra.get("id_backend", "learned") == "insightface":
        return InsightFaceEncoder.from_folder(weights_root())
    cfg = encoder_config(run.profile, role)
    folder = run.model_dir(ROLES[role])

    # the reference multi-view model was trained with the reference conditioning encoder's embeddings
    ref = run.reference_dir(ROLES[role]) if role == "cond" else None

    def build(folder: Path) -> None:
        if ref is not None:
            Run.copy_files(ref, folder)
            return
        ds = HeadDataset(ensure_dataset(run), split="train")
        data = view_images(ds, cfg.max_yaw)
        enc, log = train_encoder(data["rgb"], data["label"], cfg, device=run.device, progress=progress)
        save_encoder(enc, folder, log)

    run.ensure(folder, build)
    expected = {k: v for k, v in asdict(cfg).items() if k != "classes"}
    return load_encoder(folder, expected=expected, device=run.device)


def training_log(run: Run, role: str = "cond") -> dict:
    """The loss/accuracy log saved beside a trained encoder."""
    return read_json(run.model_dir(ROLES[role]) / "train_log.json")


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------
def pair_scores(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of all unordered pairs (i < j) of embeddings (N, D) and whether each pair is one identity."""
    emb = F.normalize(emb.float(), dim=-1)
    i, j = torch.triu_indices(len(emb), len(emb), offset=1)
    return (emb[i] * emb[j]).sum(-1), labels[i] == labels[j]


def verification(emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Face verification over all pairs: mean cosine of same / different identity pairs and ROC AUC."""
    cos, same = pair_scores(emb, labels)
    return {"same_id_cos": float(cos[same].mean()), "diff_id_cos": float(cos[~same].mean()),
            "verification_auc": metrics.roc_auc(cos, same), "pairs_same": int(same.sum()),
            "pairs_diff": int((~same).sum())}


# ----------------------------------------------------------------------------------------------
# the insightface backend: 5-keypoint alignment and ArcFace ONNX
# ----------------------------------------------------------------------------------------------
# The 112x112 ArcFace template: left eye, right eye, nose tip, left and right mouth corner (pixel coordinates,
# pixel centres at whole numbers, as cv2 and insightface use).
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)
ALIGNED_RES = 112

INSIGHTFACE_HELP = """\
The insightface identity backend needs model files in a local folder (nothing is downloaded):
  {root}/arc2face/arcface.onnx                  ArcFace recognition network used by Arc2Face (preferred), or
  {root}/insightface/antelopev2/glintr100.onnx  insightface's antelopev2 recognition network
  {root}/insightface/antelopev2/scrfd_10g_bnkps.onnx  SCRFD face detector with 5 keypoints (to align photos;
                                                without it pass keypoints, or images already aligned to 112x112)
Get them from the Arc2Face and insightface releases and put them there, or use the `learned` backend."""


def umeyama(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transform (Umeyama 1991) taking points ``src`` (N, 2) onto ``dst`` (N, 2).

    Returns ``M`` (2, 3) with ``dst ~= src @ M[:, :2].T + M[:, 2]`` (rotation, uniform scale, translation; no
    reflection).
    """
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)                                  # (2, 2)
    U, S, Vh = torch.linalg.svd(cov)
    d = torch.ones(2, dtype=torch.float64)
    if torch.det(U) * torch.det(Vh) < 0:
        d[-1] = -1
    R = U @ torch.diag(d) @ Vh
    var_s = (a ** 2).sum(1).mean()
    c = (S * d).sum() / var_s
    t = mu_d - c * R @ mu_s
    return torch.cat([c * R, t[:, None]], 1)


def warp_affine(image: torch.Tensor, M: torch.Tensor, size: int = ALIGNED_RES) -> torch.Tensor:
    """Resample ``image`` (3, H, W) so that output pixel ``q`` shows input point ``p`` with ``q = M p``.

    M (2, 3) maps input pixel coordinates to output pixel coordinates (centres at whole numbers, cv2's
    ``warpAffine`` convention); outside the image is black. Returns (3, size, size).
    """
    H, W = image.shape[-2:]
    A, t = M[:, :2].double(), M[:, 2].double()
    Ainv = torch.linalg.inv(A)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    q = torch.stack([xs, ys], -1) - t                          # (size, size, 2)
    p = q @ Ainv.T                                             # input pixel coordinates
    grid = torch.stack([2 * p[..., 0] / (W - 1) - 1, 2 * p[..., 1] / (H - 1) - 1], -1).float()
    return F.grid_sample(image[None].float(), grid[None].to(image.device), mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def align_face(image: torch.Tensor, keypoints: torch.Tensor, size: int = ALIGNED_RES) -> torch.Tensor:
    """The ArcFace crop (3, 112, 112) of ``image`` (3, H, W) from its 5 keypoints (5, 2) in pixels."""
    M = umeyama(torch.as_tensor(keypoints, dtype=torch.float64), ARCFACE_TEMPLATE * size / ALIGNED_RES)
    return warp_affine(image, M, size)


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the insightface backend needs onnxruntime: pip install onnxruntime "
                          "(or `pip install -e .[faces]`)") from None
    return onnxruntime


def _session(path: Path):
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:
        raise RuntimeError(f"{path} is not a loadable ONNX model ({e}); replace it with the original file") from None


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float = 0.4) -> torch.Tensor:
    """Indices of the boxes (N, 4) (x1, y1, x2, y2) kept by greedy non-maximum suppression, best first."""
    order, keep = scores.argsort(descending=True), []
    area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
    while len(order):
        i = order[0]
        keep.append(int(i))
        lt = torch.maximum(boxes[i, :2], boxes[order[1:], :2])
        rb = torch.minimum(boxes[i, 2:], boxes[order[1:], 2:])
        inter = (rb - lt).clamp_min(0).prod(-1)
        order = order[1:][inter / (area[i] + area[order[1:]] - inter + 1e-9) <= iou]
    return torch.tensor(keep, dtype=torch.long)


class SCRFDDetector:
    """SCRFD face detector (insightface's ``scrfd_*_bnkps.onnx``): boxes and 5 keypoints.

    The network sees the image resized (aspect kept) into its input size (640x640 when dynamic), padded at the
    bottom right, normalised as ``(255 x - 127.5) / 128``. Its nine outputs are, for strides 8, 16, 32: scores
    (N, 1), box distances (N, 4) and keypoint offsets (N, 10), in units of the stride, for 2 anchors at each
    cell centre ``(col, row) * stride``.
    """

    strides = (8, 16, 32)
    anchors = 2

    def __init__(self, path: str | os.PathLike, det_size: int = 640, threshold: float = 0.5):
        self.session = _session(Path(path))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        h, w = inp.shape[2:4]
        self.size = (h, w) if isinstance(h, int) and isinstance(w, int) else (det_size, det_size)
        self.threshold = threshold
        if len(self.session.get_outputs()) != 9:
            raise RuntimeError(f"{path} has {len(self.session.get_outputs())} outputs; the alignment needs an SCRFD "
                               "detector with 5 keypoints (9 outputs), e.g. antelopev2's scrfd_10g_bnkps.onnx")

    def detect(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """image (3, H, W) in [0, 1] -> boxes (F, 4), scores (F,), keypoints (F, 5, 2) in image pixels, best first."""
        H, W = image.shape[-2:]
        dh, dw = self.size
        scale = min(dh / H, dw / W)
        nh, nw = int(round(H * scale)), int(round(W * scale))
        x = F.interpolate(image[None].float().cpu(), size=(nh, nw), mode="bilinear", antialias=True,
                          align_corners=False)
        blob = torch.zeros(1, 3, dh, dw)
        blob[..., :nh, :nw] = (x * 255 - 127.5) / 128
        outs = self.session.run(None, {self.input_name: blob.numpy()})
        boxes, scores, kps = [], [], []
        for k, s in enumerate(self.strides):
            sc = torch.from_numpy(outs[k]).reshape(-1)
            bb = torch.from_numpy(outs[k + 3]).reshape(-1, 4) * s
            kp = torch.from_numpy(outs[k + 6]).reshape(-1, 10) * s
            fh, fw = dh // s, dw // s
            rows, cols = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
            centres = (torch.stack([cols, rows], -1).reshape(-1, 1, 2) * s).expand(-1, self.anchors, 2).reshape(-1, 2)
            centres = centres.float()
            keep = sc >= self.threshold
            c = centres[keep]
            boxes.append(torch.cat([c - bb[keep, :2], c + bb[keep, 2:]], 1))
            kps.append(c[:, None] + kp[keep].reshape(-1, 5, 2))
            scores.append(sc[keep])
        boxes, scores, kps = torch.cat(boxes) / scale, torch.cat(scores), torch.cat(kps) / scale
        keep = nms(boxes, scores) if len(scores) else torch.zeros(0, dtype=torch.long)
        return boxes[keep], scores[keep], kps[keep]

    def keypoints(self, image: torch.Tensor) -> torch.Tensor | None:
        """The 5 keypoints (5, 2) of the largest face in ``image`` (3, H, W), or None when there is none."""
        boxes, _, kps = self.detect(image)
        if len(boxes) == 0:
            return None
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return kps[area.argmax()]


def _input_normalisation(path: Path) -> tuple[float, float]:
    """insightface's rule for ArcFace ONNX files: if the graph starts with Sub and Mul nodes it normalises the
    pixels itself (mean 0, std 1), otherwise it expects ``(x - 127.5) / 127.5`` on 0..255 RGB."""
    try:
        import onnx
        graph = onnx.load(str(path), load_external_data=False).graph
        ops = [n.op_type for n in graph.node[:8]]
        if "Sub" in ops and "Mul" in ops:
            return 0.0, 1.0
    except Exception:
        pass
    return 127.5, 127.5


class InsightFaceEncoder(IdentityEncoder):
    """ArcFace through onnxruntime: detect 5 keypoints (SCRFD), align to 112x112, embed, L2-normalise.

    ``embed(images, keypoints=None)``: keypoints (B, 5, 2) in pixels when known; else the detector finds them;
    without a detector the images must already be aligned ArcFace crops (they are resized to 112x112).
    """

    backend = "insightface"

    def __init__(self, recognition: str | os.PathLike, detector: str | os.PathLike | None = None):
        recognition = Path(recognition)
        if not recognition.exists():
            raise FileNotFoundError(f"{recognition} is missing.\n" + INSIGHTFACE_HELP.format(root="weights"))
        self.session = _session(recognition)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        if list(inp.shape[2:]) != [ALIGNED_RES, ALIGNED_RES] or inp.shape[1] != 3:
            raise RuntimeError(f"{recognition} takes input {inp.shape}; an ArcFace network takes (N, 3, 112, 112)")
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.mean, self.std = _input_normalisation(recognition)
        self.detector = SCRFDDetector(detector) if detector is not None else None
        self.files = {"recognition": str(recognition), "detector": str(detector) if detector else None}

    @classmethod
    def from_folder(cls, root: str | os.PathLike = "weights") -> "InsightFaceEncoder":
        """Find the model files under ``root`` (layout in ``INSIGHTFACE_HELP``); a clear error if absent."""
        root = Path(root)
        rec = next((p for p in (root / "arc2face" / "arcface.onnx",
                                root / "insightface" / "antelopev2" / "glintr100.onnx") if p.exists()), None)
        if rec is None:
            raise FileNotFoundError(f"no ArcFace recognition model under {root}.\n"
                                    + INSIGHTFACE_HELP.format(root=root))
        det = root / "insightface" / "antelopev2" / "scrfd_10g_bnkps.onnx"
        return cls(rec, det if det.exists() else None)

    def align(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        """ArcFace crops (B, 3, 112, 112) of images (B, 3, H, W) in [0, 1]."""
        crops = []
        for b in range(len(images)):
            kp = keypoints[b] if keypoints is not None else None
            if kp is None and self.detector is not None:
                kp = self.detector.keypoints(images[b])
                if kp is None:
                    raise ValueError(f"no face found in image {b}; crop it closer or pass its keypoints")
            if kp is None:
                crops.append(preprocess(images[b:b + 1], ALIGNED_RES)[0].add(1).div(2))
            else:
                crops.append(align_face(images[b].cpu(), kp))
        return torch.stack(crops)

    def embed(self, images: torch.Tensor, keypoints: torch.Tensor | None = None) -> torch.Tensor:
        crops = self.align(images, keypoints)
        x = ((crops * 255 - self.mean) / self.std).float().numpy()
        if self.fixed_batch:
            feats = [self.session.run(None, {self.input_name: x[i:i + self.fixed_batch]})[0]
                     for i in range(0, len(x), self.fixed_batch)]
            out = torch.from_numpy(np.concatenate(feats))
        else:
            out = torch.from_numpy(self.session.run(None, {self.input_name: x})[0])
        return F.normalize(out.float().reshape(len(x), -1), dim=-1).to(images.device)
