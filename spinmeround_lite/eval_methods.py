"""The methods scored: the baselines, the true views through the autoencoder, and the model (steps A-C at the
evaluation angles) with its variants (2D attention, the ablations' inputs).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .eval_protocol import EvalCase, _case, _identity_params, render_truth
from .eval_scoring import Method
from .runs import Run


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
                 sampler: str = "euler", work: list | None = None, reuse: dict | None = None) -> Method:
    """A ``Method`` that samples with the model of ``parts``; case ``k`` uses seed ``seed + 1000 k``.
    ``sampler``, ``steps``: as ``spin`` takes them. ``work`` (a list) receives each case's network counts and
    seconds. ``reuse`` maps ``(k, identity)`` to a ``generate_case`` output already made with the same arguments
    (notebook 09 shows its first case before scoring them all): returned instead of sampling it again."""
    counter = {"k": 0}

    def method(case: EvalCase) -> dict:
        k = counter["k"]
        done = (reuse or {}).get((k, case.identity))
        out = done if done is not None else generate_case(parts, case, variant, seed + 1000 * k, steps,
                                                          sampler=sampler)
        counter["k"] += 1
        if work is not None:
            work.append({"network": out["network"], "seconds": out["seconds"]})
        return out
    return method


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
