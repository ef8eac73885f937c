"""The evaluation protocol: held-out identities only, one frontal input, the true views at fixed angles.

Notebook 09; METHOD.md section 7. ``heldout_cases`` refuses any identity seen in training (``LeakageError``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics
from .cameras import intrinsics, orbit_c2w
from .runs import Run, read_json


class LeakageError(ValueError):
    """An identity asked for evaluation was seen by a trained part (train split or a training manifest)."""


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
    if dataset_root is None and run is not None:
        # a fresh run folder (notebook 09 alone): build the dataset, whose train split is what training will see
        from .dataset import ensure_dataset
        ensure_dataset(run)
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


def truth_method(case: EvalCase) -> dict:
    """The true views themselves: the ceiling of every figure (L2 0, SSIM 1), and of ``face_found`` the rate at
    which the detector finds the rendered faces at each angle (it misses profiles and the back of the head)."""
    return {"rgb": case.rgb, "normal": case.normal}


def protocol_info(run: Run, cases: list[EvalCase]) -> dict:
    """What was measured: identities, angles, input view, ground truth, LPIPS availability."""
    ok, why = metrics.lpips_available()
    return {"identities": [c.identity for c in cases], "n_identities": len(cases), "n_angles": cases[0].n_angles,
            "yaw": cases[0].yaw.tolist(), "input": "frontal render (yaw 0, pitch 0)",
            "truth": sorted({c.truth for c in cases}), "resolution": run.profile.resolution,
            "profile": run.profile.name, "lpips": ok, "lpips_reason": None if ok else why,
            "identity_similarity": "cosine of embeddings of the generated and the true view at each angle",
            "normal_error": "mean angle inside the true silhouette (alpha > 0.5)"}
