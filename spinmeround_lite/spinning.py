"""From one image to a consistent 360-degree spin: SpinMeRound's three-step sampling (METHOD.md section 5).

Notebooks 06 (step A) and 07 (steps B and C, the public entry point). For an input image at yaw ``y0``:

* **Step A, normals** (``infer_normals``): one view of 8 latent channels; the 4 image channels are known (the
  encoded input), the 4 normal channels are generated. Every step pulls the predicted clean image channels
  towards the known latent (reconstruction guidance, ``sampling.ReconstructionGuidance``; plain replacement,
  ``sampling.Replacement``, for comparison).
* **Step B, anchors** (``anchors``): the input view (image + normal latents) conditions 7 target views at
  ``y0 + (+-45, +-90, +-135, 180)`` degrees (``cameras.ANCHOR_YAWS``): 1 + 7 = 8 views in one call.
* **Step C, intermediates** (``intermediates``): every other requested yaw is generated conditioned on a
  *triplet*: the input and the two anchors that bracket it (next to the input, where the input is one bracket,
  the anchors at +-45), M = 3 views, 5 targets per round (``profile.spin_per_round``). 48 views = 8 rounds of 5
  (every 7.5 degrees), 88 views = 16 rounds; any count works, rounds may then hold fewer.

Classifier-free guidance (``profile.cfg_scale``) runs in steps B and C; step A uses none, as released. All views
lie on the rig orbit at ``pitch`` (0 by default). The output order is the turntable order: view ``i`` is at yaw
``y0 + 360 i / N`` (wrapped to [-180, 180)), view 0 is the input itself.

Users call ``spin``::

    from spinmeround_lite import spin                # the function (this module is spinmeround_lite.spinning)
    result = spin("face.png", n_views=48)            # SpinResult: views, normals (N,3,H,W), yaw, pitch, c2w, K
    result.save("out/")                              # PNGs, views.npz, turntable.gif

    python -m spinmeround_lite.spin face.jpg --views 48 --out out/ [--profile cpu] [--no-align] [--steps 20]
                                    [--sampler euler|heun|dpm2m|student] [--face-backend auto|dlib|insightface]

Around the steps, one module each (their names importable from here too): ``photo`` reads and frames the input,
``spin_samplers`` plans the sampler (notebook 12), ``spin_result`` holds the result and its files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from . import cameras, sampling
from .artifacts import find_model, find_student
from .faces import FaceError, align_with_keypoints, choose_backend, face_template, frame_photo  # noqa: F401
from .photo import (  # noqa: F401 (the input of a spin, importable from here)
    DETECTOR,
    ENV_WEIGHTS,
    MAX_PHOTO_SIDE,
    MIN_SIDE,
    AlignmentError,
    ImageError,
    align_photo,
    as_displayed,
    load_image,
    looks_like_render,
    prepare_input,
    resize_square,
    weights_root,
)
from .profiles import Profile, get_profile
from .raymaps import profile_raymap
from .runs import Run
from .spin_result import SpinResult
from .spin_samplers import (  # noqa: F401
    SAMPLERS,
    SamplerError,
    SamplerPlan,
    plan_sampler,
    sampler_sigmas,
    student_step_a_sigmas,
)

IMAGE_CHANNELS = slice(0, 4)         # latent channels of the image
NORMAL_CHANNELS = slice(4, 8)        # latent channels of the normal map


# ----------------------------------------------------------------------------------------------
# the trained parts and cameras
# ----------------------------------------------------------------------------------------------
@dataclass
class SpinParts:
    """What sampling needs: the multi-view model, the autoencoder, the identity encoder, and their profile."""
    model: object                     # model.SpinModel (or anything with its ``denoise``)
    codec: object                     # latents.LatentCodec: encode (N,3,H,W) -> (N,4,h,w), decode back
    encoder: object                   # identity encoder: embed (B,3,H,W) -> (B,512)
    profile: Profile
    source: str = "injected"          # where the model came from ("reference", "trained", "injected")
    student: object | None = None     # the distilled few-step model (``distill``), when there is one
    student_source: str = ""          # where it came from (a folder), "" when there is none

    @classmethod
    def from_run(cls, run: Run, progress: bool = True) -> "SpinParts":
        """The run's trained parts (each built when missing: ``train.ensure_model`` and friends)."""
        from .identity import ensure_encoder
        from .latents import ensure_vae

        if run.profile.name == "paper" or run.profile.extra.get("model") == "released":
            from .released import load_parts  # `paper` runs the released weights
            model, codec, encoder, profile = load_parts(device=run.device)
            return cls(model, codec, encoder, profile, "released")
        model, source = find_model(run)
        if model is None:                              # none on disk yet: the trainer makes it (notebook 05)
            from .train import ensure_model
            model, source = ensure_model(run, progress=progress)
        student, student_source = find_student(run)
        return cls(model.eval(), ensure_vae(run, progress=progress), ensure_encoder(run, "cond", progress=progress),
                   run.profile, source, student, student_source)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except (AttributeError, StopIteration):
            return torch.device("cpu")


def wrap_yaw(yaw):
    """Degrees wrapped to [-180, 180)."""
    return (torch.as_tensor(yaw, dtype=torch.float64) + 180.0) % 360.0 - 180.0


def view_rays(profile: Profile, yaws, pitch: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rig cameras at ``yaws`` (..., V) degrees: c2w (..., V, 4, 4), K (3, 3), ray maps (..., V, 144, h, w)."""
    if profile.extra.get("camera_convention") == "released":          # the released weights' cameras and rays
        from .released import view_cameras
        return view_cameras(profile, yaws, pitch)
    yaws = torch.as_tensor(yaws, dtype=torch.float32)
    c2w = cameras.orbit_c2w(yaws, torch.full_like(yaws, float(pitch)))
    K = cameras.intrinsics(profile.resolution)
    rays = profile_raymap(profile, c2w, K)
    return c2w, K, rays


def _gens(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]




@torch.no_grad()
def generate_views(model, profile: Profile, target_yaws, cond: torch.Tensor | None = None, cond_yaws=None,
                   id_emb: torch.Tensor | None = None, steps: int | None = None, cfg_scale: float | None = None,
                   seeds: Sequence[int] = (0,), pitch: float = 0.0, solver: str = "euler",
                   progress: bool = False, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Sample target views given conditioning views: the one call behind steps B and C and unconditional sampling.

    target_yaws (B, T) degrees; cond (B, M, 8, h, w) clean latents at cond_yaws (B, M) (M = 0: none);
    id_emb (B, 512) or None (no identity); one seed per sample. ``solver``: ``sampling.SOLVERS``; ``sigmas``
    (N + 1,) overrides the profile's Karras schedule of ``steps`` steps. Returns target latents (B, T, 8, h, w).
    """
    device = next(model.parameters()).device
    target_yaws = torch.as_tensor(target_yaws, dtype=torch.float32)
    target_yaws = target_yaws[None] if target_yaws.ndim == 1 else target_yaws
    B, T = target_yaws.shape
    h = profile.latent_res
    if cond is None or cond.shape[1] == 0:
        cond_yaws = torch.zeros(B, 0)
        cond = torch.zeros(B, 0, 8, h, h)
    cond_yaws = torch.as_tensor(cond_yaws, dtype=torch.float32).reshape(B, -1)
    M = cond_yaws.shape[1]
    _, _, rays = view_rays(profile, torch.cat([cond_yaws, target_yaws], 1), pitch)      # (B, V, 144, h, w)
    cond_full = torch.cat([cond.float().cpu(), torch.zeros(B, T, 8, h, h)], 1).to(device)
    mask = (torch.arange(M + T) < M).expand(B, -1).to(device)
    if id_emb is not None:
        id_emb = id_emb.to(device).float()
    scale = profile.cfg_scale if cfg_scale is None else cfg_scale
    denoise = sampling.cfg_denoiser(model, cond_full, mask, rays.to(device), id_emb, scale=scale)
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} samples: give one per sample")
    sig = sampling.profile_sigmas(profile, steps) if sigmas is None else sigmas
    x = sampling.sample(denoise, cond_full.shape, sig, _gens(seeds), solver=solver,
                        cond=cond_full, mask=mask, device=device, progress=progress)
    return x[:, M:]


# ----------------------------------------------------------------------------------------------
# step A: normals by channel-wise inpainting
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def infer_normals(model, profile: Profile, z_img: torch.Tensor, id_emb: torch.Tensor | None, yaw=0.0,
                  pitch: float = 0.0, steps: int | None = None, seed: int = 0, method: str = "guidance",
                  step: float | None = None, cfg_scale: float = 1.0, solver: str = "euler",
                  c2w: torch.Tensor | None = None, progress: bool = False,
                  sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Generate the normal latents of known images: z_img (B, 4, h, w) -> latents (B, 8, h, w) = [z_img | normal].

    One view per sample, no conditioning view. ``method``: ``"guidance"`` (reconstruction guidance on
    ``x0_hat``, step ``eta = step``, default ``sampling.stable_inpaint_step`` of the schedule: the released 6.1
    where stable) or ``"replace"`` (plain replacement of the image channels of the state). The camera: rig yaw
    (B,) or a number and ``pitch``, or ``c2w`` (B, 4, 4). ``cfg_scale`` 1 = no guidance (as released).
    ``sigmas`` (N + 1,) overrides the schedule. Sample b uses seed ``seed + b``.
    """
    if method not in ("guidance", "replace"):
        raise ValueError(f"method must be 'guidance' or 'replace', got {method!r}")
    device = next(model.parameters()).device
    B, C, h, w = z_img.shape
    if C != 4:
        raise ValueError(f"z_img must be image latents (B, 4, h, w), got {tuple(z_img.shape)}")
    if c2w is None:
        yaw = torch.as_tensor(yaw, dtype=torch.float32).reshape(-1).expand(B)
        _, _, rays = view_rays(profile, yaw[:, None], pitch)                    # (B, 1, 144, h, w)
    else:
        c2w = torch.as_tensor(c2w, dtype=torch.float32).reshape(-1, 4, 4).expand(B, 4, 4)
        K = cameras.intrinsics(profile.resolution)
        rays = profile_raymap(profile, c2w[:, None], K)                         # in the profile's convention
    z_img = z_img.to(device).float()
    shape = (B, 1, 8, h, w)
    known = torch.cat([z_img, torch.zeros_like(z_img)], 1)[:, None]             # (B, 1, 8, h, w)
    M = torch.zeros(1, 1, 8, 1, 1, device=device)
    M[:, :, IMAGE_CHANNELS] = 1.0                                              # known: the 4 image channels
    if sigmas is not None:
        pass
    elif profile.extra.get("normals_schedule") == "ddpm":            # the released step A: SD's DDPM schedule
        from .released import ddpm_sigmas
        sigmas = ddpm_sigmas(steps or profile.sample_steps)
    else:
        sigmas = sampling.profile_sigmas(profile, steps)
    if method == "guidance":
        eta = sampling.stable_inpaint_step(sigmas) if step is None else step
        guide = sampling.ReconstructionGuidance(known, M, weight=None, step=eta)
    else:
        guide = sampling.Replacement(known, M, generator=sampling.generators(seed + 7777, B))
    cond = torch.zeros(shape, device=device)
    mask = torch.zeros(B, 1, dtype=torch.bool, device=device)
    if id_emb is not None:
        id_emb = id_emb.to(device).float()
    denoise = sampling.cfg_denoiser(model, cond, mask, rays.to(device), id_emb, scale=cfg_scale)
    x = sampling.sample(denoise, shape, sigmas, sampling.generators(seed, B), solver=solver, guidance=guide,
                        device=device, progress=progress)
    return torch.cat([z_img, x[:, 0, NORMAL_CHANNELS]], 1)                      # the image part is the input


# ----------------------------------------------------------------------------------------------
# step B: anchors; step C: intermediates
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def anchors(model, profile: Profile, z_input: torch.Tensor, id_emb: torch.Tensor | None, input_yaw: float = 0.0,
            steps: int | None = None, cfg_scale: float | None = None, seed: int = 0, pitch: float = 0.0,
            solver: str = "euler", progress: bool = False, sigmas: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step B: 7 anchor views from the input view. z_input (B, 8, h, w) [image | normal] latents at ``input_yaw``.

    Returns anchor latents (B, 7, 8, h, w) and their yaws (7,) = input_yaw + ``cameras.ANCHOR_YAWS`` (wrapped).
    Sample b uses seed ``seed + b``.
    """
    B = z_input.shape[0]
    yaws = wrap_yaw(input_yaw + torch.tensor(cameras.ANCHOR_YAWS, dtype=torch.float64)).float()
    lat = generate_views(model, profile, yaws.expand(B, -1), cond=z_input[:, None],
                         cond_yaws=torch.full((B, 1), float(input_yaw)), id_emb=id_emb, steps=steps,
                         cfg_scale=cfg_scale, seeds=[seed + b for b in range(B)], pitch=pitch, solver=solver,
                         progress=progress, sigmas=sigmas)
    return lat, yaws


def triplet_anchors(rel_yaw: float) -> tuple[float, float]:
    """The two anchors (relative yaws) that condition a target at ``rel_yaw`` (degrees from the input) in step C.

    The anchors that bracket it on the ring (0 = input, +-45, +-90, +-135, 180); between the input and +-45,
    where the input itself is a bracket, the two anchors next to the input, +-45.
    """
    r = float(wrap_yaw(rel_yaw))
    if -45.0 < r < 45.0:
        return (45.0, -45.0)
    ring = sorted(set(float(a) for a in wrap_yaw(torch.tensor(cameras.ANCHOR_YAWS)).tolist()))   # -180 .. 135
    lo = max((a for a in ring if a <= r), default=ring[-1])
    hi = min((a for a in ring if a > r), default=ring[0])
    return (lo, hi)


def plan_rounds(rel_yaws: Sequence[float], per_round: int = 5) -> list[tuple[tuple[float, float], list[int]]]:
    """Group step C's targets (relative yaws) into rounds: [((anchor a, anchor b), [target indices]), ...].

    Targets sharing a triplet go together, in yaw order, at most ``per_round`` to a round.
    """
    groups: dict[tuple[float, float], list[int]] = {}
    for i, r in enumerate(rel_yaws):
        groups.setdefault(triplet_anchors(r), []).append(i)
    rounds = []
    for key, idx in groups.items():
        idx = sorted(idx, key=lambda i: float(wrap_yaw(rel_yaws[i])))
        rounds += [(key, idx[k:k + per_round]) for k in range(0, len(idx), per_round)]
    return rounds


@torch.no_grad()
def intermediates(model, profile: Profile, z_input: torch.Tensor, z_anchors: torch.Tensor, target_yaws,
                  id_emb: torch.Tensor | None, input_yaw: float = 0.0, steps: int | None = None,
                  cfg_scale: float | None = None, seed: int = 0, per_round: int | None = None,
                  batch_rounds: int = 8, pitch: float = 0.0, solver: str = "euler",
                  progress: bool = False, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Step C: views at ``target_yaws`` (T,) conditioned on triplets (input + two anchors), per round.

    z_input (8, h, w), z_anchors (7, 8, h, w) in ``cameras.ANCHOR_YAWS`` order relative to ``input_yaw``;
    id_emb (1, 512) or None. Round r uses seed ``seed + r`` whatever the batching (``batch_rounds`` rounds of
    equal size per model call). Returns latents (T, 8, h, w) in the order of ``target_yaws``.
    """
    target_yaws = torch.as_tensor(target_yaws, dtype=torch.float64).reshape(-1)
    rel = wrap_yaw(target_yaws - input_yaw).tolist()
    rounds = plan_rounds(rel, per_round or profile.spin_per_round)
    anchor_rel = [float(a) for a in wrap_yaw(torch.tensor(cameras.ANCHOR_YAWS)).tolist()]
    h = z_input.shape[-1]
    out = torch.zeros(len(rel), 8, h, h)
    # rounds of equal size can share one batched call
    by_size: dict[int, list[int]] = {}
    for r, (_, idx) in enumerate(rounds):
        by_size.setdefault(len(idx), []).append(r)
    calls = [(size, rs[k:k + batch_rounds]) for size, rs in by_size.items() for k in range(0, len(rs), batch_rounds)]
    for size, rs in tqdm(calls, desc="step C rounds", disable=not progress, leave=False):
        cond, cond_yaws, tgt = [], [], []
        for r in rs:
            (a, b), idx = rounds[r]
            ka, kb = anchor_rel.index(float(wrap_yaw(a))), anchor_rel.index(float(wrap_yaw(b)))
            cond.append(torch.stack([z_input.cpu(), z_anchors[ka].cpu(), z_anchors[kb].cpu()]))
            cond_yaws.append([input_yaw, input_yaw + a, input_yaw + b])
            tgt.append([float(target_yaws[i]) for i in idx])
        emb = None if id_emb is None else id_emb.reshape(1, -1).expand(len(rs), -1)
        lat = generate_views(model, profile, torch.tensor(tgt), cond=torch.stack(cond),
                             cond_yaws=torch.tensor(cond_yaws), id_emb=emb, steps=steps, cfg_scale=cfg_scale,
                             seeds=[seed + r for r in rs], pitch=pitch, solver=solver, sigmas=sigmas)
        for j, r in enumerate(rs):
            for k, i in enumerate(rounds[r][1]):
                out[i] = lat[j, k].cpu()
    return out


# ----------------------------------------------------------------------------------------------
# turntable yaws, decoding
# ----------------------------------------------------------------------------------------------
def spin_yaws(n_views: int, input_yaw: float = 0.0) -> torch.Tensor:
    """The turntable yaws (N,): ``input_yaw + 360 i / N`` wrapped to [-180, 180)."""
    if int(n_views) < 1:
        raise ValueError(f"n_views must be at least 1, got {n_views}")
    return wrap_yaw(input_yaw + 360.0 * torch.arange(int(n_views), dtype=torch.float64) / int(n_views)).float()


def decode_latents(codec, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (N, 8, h, w) -> RGB (N, 3, H, W) and normal images (N, 3, H, W), on the CPU."""
    dev = codec.device
    rgb = codec.decode(z[:, IMAGE_CHANNELS].to(dev)).float().cpu()
    nrm = codec.decode(z[:, NORMAL_CHANNELS].to(dev)).float().cpu()
    return rgb, nrm


# ----------------------------------------------------------------------------------------------
# the entry point
# ----------------------------------------------------------------------------------------------
def _resolve_parts(run, profile: Profile, parts, model, codec, encoder, device, progress) -> SpinParts:
    """The parts a spin samples with: ``parts``; else the injected ``model``, ``codec``, ``encoder``; else the
    run's (a run of ``profile`` opened here when none is given), with any injected part in place of its own."""
    if parts is not None:
        return parts
    if model is not None and codec is not None and encoder is not None:
        return SpinParts(model, codec, encoder, run.profile if run is not None else profile)
    if run is None:
        run = Run.open(profile.name, "", notebook="spin", device=device or "")
    base = SpinParts.from_run(run, progress=progress)
    return SpinParts(model or base.model, codec or base.codec, encoder or base.encoder, run.profile,
                     "injected" if model is not None else base.source, base.student, base.student_source)


@torch.no_grad()
def spin(image_or_path, n_views: int = 48, run: Run | None = None, profile: str | None = None,
         steps: int | None = None, cfg_scale: float | None = None, seed: int = 0, align: bool = True,
         device: str | None = None, *, parts: SpinParts | None = None, model=None, codec=None, encoder=None,
         yaws: Sequence[float] | None = None, input_yaw: float = 0.0, pitch: float = 0.0,
         normals_method: str = "guidance", per_round: int | None = None, weights_dir: str | None = None,
         face_backend: str = "auto", on_input=None, progress: bool = True, sampler: str = "euler") -> SpinResult:
    """One image in, ``n_views`` consistent views with normal maps and cameras out (steps A, B, C).

    image_or_path: a path, PIL image, array or tensor (``load_image``). n_views: views around the head in
    turntable order from the input (or ``yaws``: explicit yaws in degrees, output in that order).
    run / profile: where the trained parts come from (``SpinParts.from_run``; default ``$SMR_PROFILE`` or cpu, in
    ``runs/<profile>``); or inject them: ``parts=SpinParts(...)`` or ``model=``, ``codec=``, ``encoder=``.
    steps, cfg_scale: sampler steps and guidance (default: the profile's). seed: the same seed gives the same spin.
    align: frame photos by their face keypoints (module doc); False uses the image as a square head crop.
    face_backend: ``auto``, ``dlib`` or ``insightface`` (which detector aligns photos). on_input: called with
    ``(image (3, R, R), info)`` once the input is framed, before any model loads (the CLI prints the backend).
    sampler: ``euler`` (the course's default), ``heun``, ``dpm2m`` (DPM-Solver++(2M)) or ``student`` (the distilled
    few-step model, in the steps it was trained for); ``plan_sampler`` says what each means and refuses what does
    not fit. ``info["network"]`` holds the network calls and view evaluations of steps A, B, C and in total,
    counted around the network's forward (``sampling.NetworkCounter``).
    """
    if sampler not in SAMPLERS:                     # before any image is read or model loaded
        raise SamplerError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    t0 = time.perf_counter()
    if run is not None and device:
        run.device = torch.device(device)
    if parts is not None:
        P = parts.profile
    elif run is not None:
        P = run.profile
    else:
        P = get_profile(profile or os.environ.get("SMR_PROFILE") or "cpu")
    if P.name == "paper" and parts is None and model is None:
        from .released import require_files  # name every missing file of the released model
        require_files(weights_dir)
    # read and frame the input first: a bad image fails before any model is loaded or trained
    face = {}
    img, framing = prepare_input(image_or_path, P.resolution, align=align, weights_dir=weights_dir,
                                 face_backend=face_backend, details=face)
    if on_input is not None:
        on_input(img, {"framing": framing, **face})
    if sampler == "student" and parts is None and model is None:    # a missing student stops before any training
        if run is None:
            run = Run.open(P.name, "", notebook="spin", device=device or "")
        if find_student(run)[0] is None:
            plan_sampler(SpinParts(None, None, None, run.profile), "student")      # raises SamplerError
    parts = _resolve_parts(run, P, parts, model, codec, encoder, device, progress)
    P = parts.profile
    plan = plan_sampler(parts, sampler, steps, cfg_scale)
    m, sig, solver = plan.model, plan.sigmas, plan.solver
    dev = parts.device

    yaw = spin_yaws(n_views, input_yaw) if yaws is None else wrap_yaw(torch.as_tensor(yaws)).float().reshape(-1)
    if len(yaw) == 0:
        raise ValueError("no views requested")
    id_emb = parts.encoder.embed(img[None].to(dev)).float()                         # (1, 512)
    z_img = parts.codec.encode(img[None].to(parts.codec.device)).float()           # (1, 4, h, w)
    bar = tqdm(total=3, desc="spin", disable=not progress, leave=False)
    counter = sampling.NetworkCounter(m)          # hooked only inside the three steps below

    # step A: the input's normals
    bar.set_postfix_str("A: normals")
    with counter, counter.phase("A"):
        z_in = infer_normals(m, P, z_img, id_emb, yaw=input_yaw, pitch=pitch, steps=plan.steps, seed=seed,
                             method=normals_method, solver=solver, sigmas=plan.sigmas_a)[0].cpu()  # (8, h, w)
    bar.update()
    # step B: 7 anchors
    bar.set_postfix_str("B: anchors")
    with counter, counter.phase("B"):
        z_anc, anc_yaw = anchors(m, P, z_in[None], id_emb, input_yaw, cfg_scale=plan.cfg_scale, seed=seed + 1,
                                 pitch=pitch, solver=solver, sigmas=sig)
    z_anc = z_anc[0].cpu()                                                         # (7, 8, h, w)
    bar.update()
    # step C: every other requested yaw from triplets
    bar.set_postfix_str("C: intermediates")
    known = [wrap_yaw(input_yaw)] + list(anc_yaw.double())
    known_lat = torch.cat([z_in[None], z_anc])
    source = []                                                   # per view: index into known_lat, or -1
    for y in yaw.double():
        d = torch.stack([wrap_yaw(y - k).abs() for k in known])
        source.append(int(d.argmin()) if float(d.min()) < 1e-3 else -1)
    todo = [i for i, s in enumerate(source) if s < 0]
    lat = torch.zeros(len(yaw), 8, *z_in.shape[-2:])
    for i, s in enumerate(source):
        if s >= 0:
            lat[i] = known_lat[s]
    with counter, counter.phase("C"):
        if todo:
            lat[todo] = intermediates(m, P, z_in, z_anc, yaw[todo], id_emb, input_yaw, cfg_scale=plan.cfg_scale,
                                      seed=seed + 100, per_round=per_round, pitch=pitch, progress=progress,
                                      solver=solver, sigmas=sig)
    bar.update()
    bar.close()

    views, normals = decode_latents(parts.codec, lat)
    for i, s in enumerate(source):
        if s == 0:
            views[i] = img                                       # the input view is the input
    c2w, K, _ = view_rays(P, yaw, pitch)
    info = {"framing": framing, "input_yaw": float(input_yaw), "seed": seed, "profile": P.name,
            "sampler": plan.name, "solver": solver, "steps": plan.steps,
            "cfg_scale": P.cfg_scale if plan.cfg_scale is None else plan.cfg_scale,
            "guidance": "folded into the student" if sampler == "student" else "classifier-free in steps B and C",
            "sigmas": [round(float(x), 6) for x in sig],
            "model_source": parts.source if sampler != "student" else parts.student_source,
            "normals_method": normals_method, "network": counter.report(),
            "generated": {"anchors": 7, "intermediates": len(todo)}, **face}
    return SpinResult(views, normals, yaw, torch.full_like(yaw, float(pitch)), c2w, K, input=img, latents=lat,
                      seconds=time.perf_counter() - t0, info=info)


# ----------------------------------------------------------------------------------------------
# extras: new identities and identity interpolation
# ----------------------------------------------------------------------------------------------
def ring_yaws(input_yaw: float = 0.0) -> torch.Tensor:
    """The input yaw and the 7 anchor yaws (8,): the views of one unconditional sample."""
    return wrap_yaw(input_yaw + torch.tensor((0.0,) + cameras.ANCHOR_YAWS, dtype=torch.float64)).float()


@torch.no_grad()
def unconditional(parts: SpinParts, n_samples: int = 2, yaws=None, steps: int | None = None, seed: int = 0,
                  pitch: float = 0.0) -> dict[str, torch.Tensor]:
    """New identities: no input view and the empty identity. Returns rgb, normal (n, V, 3, H, W) and yaw (V,)."""
    yaws = ring_yaws() if yaws is None else torch.as_tensor(yaws, dtype=torch.float32)
    lat = generate_views(parts.model, parts.profile, yaws.expand(n_samples, -1), id_emb=None, steps=steps,
                         cfg_scale=1.0, seeds=[seed + b for b in range(n_samples)], pitch=pitch)
    n, V = lat.shape[:2]
    rgb, nrm = decode_latents(parts.codec, lat.flatten(0, 1))
    return {"rgb": rgb.view(n, V, *rgb.shape[1:]), "normal": nrm.view(n, V, *nrm.shape[1:]), "yaw": yaws}


@torch.no_grad()
def interpolate_identities(parts: SpinParts, emb_a: torch.Tensor, emb_b: torch.Tensor, n: int = 5, yaws=None,
                           steps: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                           pitch: float = 0.0) -> dict[str, torch.Tensor]:
    """Views of identities on the great circle between two embeddings (512,) (``sampling.slerp``).

    No input view; every point uses the same seed, so only the identity changes along the row.
    Returns rgb, normal (n, V, 3, H, W), t (n,), yaw (V,).
    """
    yaws = torch.tensor([0.0, 45.0, 90.0]) if yaws is None else torch.as_tensor(yaws, dtype=torch.float32)
    t = torch.linspace(0, 1, n)
    emb = torch.stack([sampling.slerp(emb_a.reshape(-1).float().cpu(), emb_b.reshape(-1).float().cpu(), float(s))
                       for s in t])
    lat = generate_views(parts.model, parts.profile, yaws.expand(n, -1), id_emb=emb, steps=steps,
                         cfg_scale=cfg_scale, seeds=[seed] * n, pitch=pitch)
    rgb, nrm = decode_latents(parts.codec, lat.flatten(0, 1))
    V = len(yaws)
    return {"rgb": rgb.view(n, V, *rgb.shape[1:]), "normal": nrm.view(n, V, *nrm.shape[1:]), "t": t, "yaw": yaws}


# ----------------------------------------------------------------------------------------------
# the run's spin (read by notebook 08)
# ----------------------------------------------------------------------------------------------
def heldout_input(run: Run) -> dict:
    """The frontal view of the first held-out identity: image (3, H, W), identity name, view index, params."""
    from .dataset import HeadDataset, ensure_dataset

    ds = HeadDataset(ensure_dataset(run), split="heldout")
    if len(ds) == 0:
        raise RuntimeError(f"{ds.root} has no held-out identities; the spin artifact needs one")
    v = ds.nearest_view(0, 0.0, 0.0)
    views = ds.views(0, [v])
    return {"image": views["rgb"][0], "identity": ds.ids[0], "view": v, "params": ds.params(0),
            "yaw": float(views["yaw"][0]), "pitch": float(views["pitch"][0])}


def ensure_spin(run: Run, parts: SpinParts | None = None, progress: bool = True) -> Path:
    """``run.root/spin``: the ``profile.spin_views``-view spin of a held-out identity's frontal view.

    Holds ``views.npz`` (rgb, normal uint8 (N, H, W, 3); c2w (N, 4, 4); K (3, 3); yaw, pitch (N,)), the PNGs, the
    turntable GIF and ``spin.json`` (identity, seconds, model source). Reused when complete.
    """
    folder = run.root / "spin"

    def build(f: Path) -> None:
        nonlocal parts
        parts = parts or SpinParts.from_run(run, progress=progress)
        inp = heldout_input(run)
        res = spin(inp["image"], n_views=run.profile.spin_views, parts=parts, seed=run.seed, align=False,
                   input_yaw=inp["yaw"], progress=progress)
        res.info.update(identity=inp["identity"], input_view=inp["view"])
        res.save(f)

    return run.ensure(folder, build)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _print_framing(name: str):
    def report(img: torch.Tensor, info: dict) -> None:
        if info.get("face_backend"):
            n = info["faces_found"]
            many = f"; {n} faces found, the largest is used" if n > 1 else "; 1 face found"
            print(f"{name}: aligned by the {info['face_backend']} face backend [{info['face_backend_reason']}]{many}; "
                  "background replaced by white", flush=True)
        else:
            print(f"{name}: framing {info['framing']!r} (no face alignment)", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m spinmeround_lite.spin",
        description="One face image in, a 360-degree spin out: views, normal maps, cameras (views.npz), PNGs and a "
                    "turntable GIF.")
    ap.add_argument("input", help="image file (PNG, JPEG, ...): a rig-framed render, or a photo to align")
    ap.add_argument("--views", type=int, default=48, help="number of views around the head (default 48)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--profile", default="", help="test, cpu, gpu or paper (default: $SMR_PROFILE, else cpu)")
    ap.add_argument("--run-dir", default="", help="run folder with the trained parts (default: runs/<profile>)")
    ap.add_argument("--no-align", action="store_true",
                    help="use the image as a square, centred head crop (no face detection)")
    ap.add_argument("--face-backend", default="auto", choices=("auto", "dlib", "insightface"),
                    help="face detector that aligns photos: auto (insightface when its files are in --weights, "
                         "else the shipped dlib), dlib or insightface")
    ap.add_argument("--sampler", default="euler", choices=SAMPLERS,
                    help="euler (default, the profile's steps), heun, dpm2m (DPM-Solver++(2M), second order with one "
                         "call a step) or student (the distilled few-step model, in the steps it was trained for; "
                         "guidance folded in)")
    ap.add_argument("--steps", type=int, default=None,
                    help="sampler steps (default: the profile's; the student's own count for --sampler student)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same spin)")
    ap.add_argument("--yaw", type=float, default=0.0, help="yaw of the input view in degrees (default 0)")
    ap.add_argument("--weights", default="", help="folder of external model files (insightface/antelopev2/...)")
    ap.add_argument("--device", default="", help="cpu or cuda (default: CUDA when present)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    try:
        run = Run.open(args.profile, args.run_dir, notebook="spin", seed=args.seed, device=args.device)
        res = spin(args.input, n_views=args.views, run=run, steps=args.steps, cfg_scale=args.cfg_scale,
                   seed=args.seed, align=not args.no_align, input_yaw=args.yaw, weights_dir=args.weights or None,
                   face_backend=args.face_backend, on_input=_print_framing(args.input), progress=not args.quiet,
                   sampler=args.sampler)
    except (FileNotFoundError, ImageError, AlignmentError, SamplerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = res.save(args.out)
    print(json.dumps({"out": str(out), "views": len(res), "seconds": round(res.seconds, 2), **res.info}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
