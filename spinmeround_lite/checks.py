"""Is the model using its cameras and its input? Four checks every reader of a multi-view paper should run.

Notebook 07 teaches them; ``tests/test_checks.py`` keeps them from coming back. A multi-view diffusion model can
reach a low training loss while ignoring half of what it is given: it can draw the *average* head turned roughly
the right way, or the right head always from the front. Loss curves do not show it; these checks do.

1. **Teacher forcing** (``teacher_forced``). For each head, the true frontal view is given (clean latents,
   mask 1) and the other ``P - 1`` views of a spread around the head (yaw ``360 k / P``) are generated, exactly as
   the trainer's sample grids do. Against the true renders we measure SSIM, L2 and the normal-map angle error, and
   the same for the *mean training head* at those cameras (a model that ignores its input cannot beat it). Then two
   retrieval scores, each with its chance level:

   * ``pose_accuracy``: for each generated view, which of the *same head's* true views (the sample's yaws) is
     nearest by normal-map angle error; the fraction where that is the view at its own camera
     (chance ``1 / P``: a camera-blind model sits there);
   * ``identity_accuracy``: for each generated view, which of the heads' true views *at the same yaw* is nearest by
     RGB L2; the fraction where that is the head whose frontal view was given (chance ``1 / heads``).

2. **Camera sweep** (``camera_sweep``). One head, one seed, one noise, the same conditioning; only the yaw of one
   target view's ray map changes. The generated views must turn with it: ``sweep_accuracy`` is the fraction of yaws
   whose generated normal map is nearest to the true normal map at that yaw (among the sweep's yaws).

3. **Identity swap** (``identity_swap``). The same targets, noise and identity embedding, but the conditioning view
   of head ``b`` replaced by the frontal view of another head ``b'``. If the model reads its input view, the targets'
   colours and hair follow ``b'``: ``swap_follow`` is the fraction of generated views nearer (RGB L2) to ``b'``'s
   true view than to ``b``'s.

4. **Input use at the face** (``input_use``). Views 8 to 24 degrees from the given one, where the face is almost
   the given face moved a little: one denoiser call at pure noise (sigma 40, no guidance), the frontal view given
   or zeroed (the same noise, cameras and identity). Against the true renders, the PSNR inside the face box of the
   decoded prediction, and of the given face pasted as it is (a verbatim copy). A model that ignores its input
   scores the same either way (``input_gain_db`` 0); one that copies scores about the copy; one that also moves the
   face with the camera scores above it. A one-step prediction is a mean over every face that could be there: this
   measures *use* of the input, not the sharpness of the samples (notebook 07 shows both predictions).

Truth comes from rendering the heads' parameters at the exact cameras (``render.render_views``), so the checks do not
depend on which rig views a dataset happens to hold. Images are ``(N, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import metrics
from .metrics import normal_distance
from .spinning import decode_latents, generate_views


# ----------------------------------------------------------------------------------------------
# truth
# ----------------------------------------------------------------------------------------------
def render_at(params, yaws, resolution: int, chunk: int = 65536) -> dict:
    """True views of one head at ``yaws`` (A,) degrees, pitch 0 (``render.render_orbit``), channels first:
    rgb (A,3,H,W), alpha (A,1,H,W), normal (A,3,H,W) (unit, camera space, 0 on background), normal_rgb (A,3,H,W)."""
    from .render import normal_to_rgb, render_orbit

    out = render_orbit(params, torch.as_tensor(yaws, dtype=torch.float32).reshape(-1), 0.0, resolution, chunk=chunk)
    first = lambda x: x.float().movedim(-1, 1).contiguous()          # (A,H,W,C) -> (A,C,H,W)
    return {"rgb": first(out["rgb"]).clamp(0, 1), "alpha": out["alpha"].float()[:, None].contiguous(),
            "normal": F.normalize(first(out["normal"]), dim=1),
            "normal_rgb": first(normal_to_rgb(out["normal"], out["alpha"]))}


# ----------------------------------------------------------------------------------------------
# generation with the true frontal view given
# ----------------------------------------------------------------------------------------------
@dataclass
class Heads:
    """Heads to check: their parameters, identity embeddings and true views at ``yaws`` (pitch 0)."""
    params: list                # one parameter vector (D,) per head
    id_emb: torch.Tensor        # (N, 512)
    yaws: torch.Tensor          # (P,) degrees; yaws[0] = 0 is the given view
    truth: dict                 # rgb/alpha/normal/normal_rgb (N, P, ., H, W)


def make_heads(params: list, encoder, yaws: torch.Tensor, resolution: int, chunk: int = 65536) -> Heads:
    """Render every head at ``yaws`` (pitch 0) and embed its view 0 with the ``cond`` encoder."""
    yaws = torch.as_tensor(yaws, dtype=torch.float32)
    views = [render_at(p, yaws, resolution, chunk=chunk) for p in params]
    truth = {k: torch.stack([v[k] for v in views]) for k in ("rgb", "alpha", "normal", "normal_rgb")}
    with torch.no_grad():
        emb = encoder.embed(truth["rgb"][:, 0]).float().cpu()
    return Heads(list(params), emb, yaws, truth)


def frontal_latents(codec, rgb: torch.Tensor, normal_rgb: torch.Tensor) -> torch.Tensor:
    """Clean latents (B,8,h,w) = [image | normal] of frontal views given as images (B,3,H,W) each."""
    return torch.cat([codec.encode(rgb), codec.encode(normal_rgb)], dim=1).float().cpu()


@torch.no_grad()
def generate(model, codec, profile, cond_latents: torch.Tensor, id_emb: torch.Tensor | None, yaw_rows: torch.Tensor,
             seed: int = 0, steps: int | None = None, noise_seeds: list[int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``B`` samples with view 0 given: ``cond_latents`` (B,8,h,w) its clean latents (true image and normal
    latents, as in training), ``yaw_rows`` (B,P) the yaw of every view of each sample (``[:, 0]`` the given one).

    ``spinning.generate_views`` (Euler, the profile's schedule and guidance), one seed per sample, ``seed + b``
    (``noise_seeds`` overrides: equal seeds give equal noise). Returns the decoded rgb and normal images,
    each (B,P,3,H,W) in [0, 1], view 0 the given one.
    """
    B, P = yaw_rows.shape
    seeds = noise_seeds if noise_seeds is not None else [seed + b for b in range(B)]
    z = generate_views(model, profile, yaw_rows[:, 1:], cond=cond_latents[:, None], cond_yaws=yaw_rows[:, :1],
                       id_emb=id_emb, steps=steps, seeds=seeds)                              # (B, P-1, 8, h, w)
    z = torch.cat([cond_latents[:, None].to(z), z], 1).flatten(0, 1)
    rgb, nrm = decode_latents(codec, z)
    H = profile.resolution
    return rgb.view(B, P, 3, H, H).clamp(0, 1), nrm.view(B, P, 3, H, H).clamp(0, 1)


def mean_head(truth: dict) -> dict:
    """The mean of heads' true views (N,P,...) over the heads: rgb (P,3,H,W) and normal_rgb (P,3,H,W)."""
    a = truth["alpha"]
    n = (truth["normal"] * a).sum(0)
    n = torch.where(n.norm(dim=1, keepdim=True) > 1e-6, F.normalize(n, dim=1), torch.zeros_like(n))
    cover = a.mean(0)
    nrgb = torch.where(cover > 0.5, (n + 1) / 2, torch.ones_like(n))
    return {"rgb": truth["rgb"].mean(0), "normal_rgb": nrgb, "alpha": cover}


@torch.no_grad()
def teacher_forced(model, codec, profile, heads: Heads, mean_of: Heads | None = None, seed: int = 0,
                   steps: int | None = None) -> dict:
    """The teacher-forced check (module docstring, 1) on ``heads``; ``mean_of``: training heads for the mean head.

    Returns the figures (``teacher_forced_ssim``, ``_l2``, ``_normal_err_deg``, the mean head's, the autoencoder's
    ceiling (``teacher_forced_ceiling_ssim``, ``_normal_err_deg``: the truth encoded and decoded), ``pose_accuracy``,
    ``identity_accuracy`` with their chance levels) and the pictures' tensors (``rgb``, ``normal``: (N,P,3,H,W)).
    """
    N, P = heads.truth["rgb"].shape[:2]
    cond = frontal_latents(codec, heads.truth["rgb"][:, 0], heads.truth["normal_rgb"][:, 0])
    rows = heads.yaws[None].expand(N, P)
    rgb, nrm = generate(model, codec, profile, cond, heads.id_emb, rows, seed=seed, steps=steps)
    t = heads.truth
    tgt = slice(1, P)
    flat = lambda x: x[:, tgt].flatten(0, 1)
    ssim = metrics.ssim(flat(rgb), flat(t["rgb"]))
    l2 = metrics.l2(flat(rgb), flat(t["rgb"]))
    nerr = normal_distance(flat(nrm), flat(t["normal_rgb"]), flat(t["alpha"]))
    out = {"teacher_forced_ssim": ssim.mean().item(), "teacher_forced_l2": l2.mean().item(),
           "teacher_forced_normal_err_deg": nerr.mean().item()}
    # the ceiling: the true views through the autoencoder and back, the best any latent model can draw
    dev = codec.device
    round_trip = lambda x: codec.decode(codec.encode(x.to(dev))).float().cpu().clamp(0, 1)
    out["teacher_forced_ceiling_ssim"] = metrics.ssim(round_trip(flat(t["rgb"])), flat(t["rgb"])).mean().item()
    out["teacher_forced_ceiling_normal_err_deg"] = normal_distance(
        round_trip(flat(t["normal_rgb"])), flat(t["normal_rgb"]), flat(t["alpha"])).mean().item()
    if mean_of is not None:
        mh = mean_head(mean_of.truth)
        mh_rgb = mh["rgb"][None].expand(N, -1, -1, -1, -1)
        mh_n = mh["normal_rgb"][None].expand(N, -1, -1, -1, -1)
        out["teacher_forced_mean_head_ssim"] = metrics.ssim(flat(mh_rgb), flat(t["rgb"])).mean().item()
        out["teacher_forced_mean_head_l2"] = metrics.l2(flat(mh_rgb), flat(t["rgb"])).mean().item()
        out["teacher_forced_mean_head_normal_err_deg"] = normal_distance(
            flat(mh_n), flat(t["normal_rgb"]), flat(t["alpha"])).mean().item()
    # pose: generated (b, v) against the same head's true normals at every yaw of the sample
    pose_hits = []
    for b in range(N):
        for v in range(1, P):
            d = normal_distance(nrm[b, v][None].expand(P, -1, -1, -1), t["normal_rgb"][b], t["alpha"][b])
            pose_hits.append(int(d.argmin()) == v)
    # identity: generated (b, v) against every head's true RGB at yaw v
    id_hits = []
    for v in range(1, P):
        for b in range(N):
            d = metrics.l2(rgb[b, v][None].expand(N, -1, -1, -1), t["rgb"][:, v])
            id_hits.append(int(d.argmin()) == b)
    out.update(pose_accuracy=sum(pose_hits) / len(pose_hits), pose_chance=1.0 / P,
               identity_accuracy=sum(id_hits) / len(id_hits), identity_chance=1.0 / N,
               check_heads=N, check_views=P)
    return {"figures": out, "rgb": rgb, "normal": nrm}


@torch.no_grad()
def camera_sweep(model, codec, profile, heads: Heads, sweep_yaws, head: int = 0, seed: int = 0,
                 steps: int | None = None) -> dict:
    """The camera sweep (module docstring, 2): view 1 of one sample moves through ``sweep_yaws`` (S,); the given
    view, the other targets, the identity and the noise stay the same. Returns ``sweep_accuracy`` (and chance
    ``1 / S``), the generated and true rgb/normal images (S,3,H,W)."""
    sweep = torch.as_tensor(sweep_yaws, dtype=torch.float32).reshape(-1)
    S = len(sweep)
    rows = heads.yaws[None].repeat(S, 1)
    rows[:, 1] = sweep
    t = heads.truth
    cond = frontal_latents(codec, t["rgb"][head, :1], t["normal_rgb"][head, :1]).expand(S, -1, -1, -1)
    emb = heads.id_emb[head:head + 1].expand(S, -1)
    rgb, nrm = generate(model, codec, profile, cond, emb, rows, steps=steps, noise_seeds=[seed] * S)
    truth = render_at(heads.params[head], sweep, profile.resolution)
    hits = []
    for s in range(S):
        d = normal_distance(nrm[s, 1][None].expand(S, -1, -1, -1), truth["normal_rgb"], truth["alpha"])
        hits.append(int(d.argmin()) == s)
    return {"figures": {"sweep_accuracy": sum(hits) / S, "sweep_chance": 1.0 / S, "sweep_yaws": sweep.tolist()},
            "rgb": rgb[:, 1], "normal": nrm[:, 1], "true_rgb": truth["rgb"], "true_normal": truth["normal_rgb"]}


@torch.no_grad()
def identity_swap(model, codec, profile, heads: Heads, seed: int = 0, steps: int | None = None) -> dict:
    """The identity swap (module docstring, 3): sample ``b`` is given head ``b + 1``'s frontal view (cyclically)
    with head ``b``'s identity embedding and noise. Returns ``swap_follow`` (the fraction of generated target views
    nearer by RGB L2 to the swapped-in head's truth than to the original head's) and the generated rgb (N,P,3,H,W).
    """
    t = heads.truth
    N, P = t["rgb"].shape[:2]
    if N < 2:
        raise ValueError("identity_swap needs at least 2 heads")
    perm = torch.roll(torch.arange(N), -1)
    cond = frontal_latents(codec, t["rgb"][perm, 0], t["normal_rgb"][perm, 0])
    rows = heads.yaws[None].expand(N, P)
    rgb, _ = generate(model, codec, profile, cond, heads.id_emb, rows, seed=seed, steps=steps)
    follow = []
    for b in range(N):
        d_new = metrics.l2(rgb[b, 1:], t["rgb"][perm[b], 1:])
        d_old = metrics.l2(rgb[b, 1:], t["rgb"][b, 1:])
        follow += (d_new < d_old).tolist()
    return {"figures": {"swap_follow": sum(follow) / len(follow)}, "rgb": rgb, "given": t["rgb"][perm, 0]}


INPUT_USE_OFFSETS = (8.0, -8.0, 16.0, -16.0, 24.0, -24.0)


@torch.no_grad()
def input_use(model, codec, profile, heads: Heads, offsets=INPUT_USE_OFFSETS, sigma: float = 40.0,
              seed: int = 0) -> dict:
    """The input-use check (module docstring, 4) on ``heads``: targets at ``offsets`` degrees from the frontal view.

    Returns the figures ``input_use_given_db``, ``input_use_zeroed_db``, ``input_use_copy_db`` (face-box PSNR
    against the true renders, mean over heads and targets), ``input_gain_db`` (given minus zeroed),
    ``input_beyond_copy_db`` (given minus copy) and the decoded predictions ``given``, ``zeroed`` and ``truth``
    (N, T, 3, H, W) for the pictures.
    """
    from .faces import face_box
    from .spinning import view_rays

    offsets = torch.as_tensor(offsets, dtype=torch.float32).reshape(-1)
    yaws = torch.cat([torch.zeros(1), offsets])
    N, V, R = len(heads.params), len(yaws), profile.resolution
    truth = [render_at(p, yaws, R) for p in heads.params]
    rgb = torch.stack([t["rgb"] for t in truth])                                    # (N, V, 3, R, R)
    nrm = torch.stack([t["normal_rgb"] for t in truth])
    x0 = torch.stack([frontal_latents(codec, rgb[b], nrm[b]) for b in range(N)])    # (N, V, 8, h, w)
    _, _, rays = view_rays(profile, yaws)
    rays = rays[None].expand(N, *rays.shape).to(x0)
    mask = torch.zeros(N, V, dtype=torch.bool)
    mask[:, 0] = True
    g = torch.Generator().manual_seed(seed)
    x = torch.where(mask[:, :, None, None, None], x0, x0 + sigma * torch.randn(x0.shape, generator=g))
    s = torch.full((N,), float(sigma))
    dev = codec.device

    def decoded(cond):
        D = model.denoise(x.to(dev), s.to(dev), cond.to(dev), mask.to(dev), rays.to(dev),
                          heads.id_emb.to(dev)).float()
        img, _ = decode_latents(codec, D[:, 1:].flatten(0, 1))
        return img.float().cpu().clamp(0, 1).view(N, V - 1, 3, R, R)

    given, zeroed = decoded(x0), decoded(torch.zeros_like(x0))
    top, bottom, left, right = face_box(R)
    face = lambda im: im[..., top:bottom, left:right].flatten(0, 1)
    tgt = rgb[:, 1:]
    db = lambda im: metrics.psnr(face(im), face(tgt)).mean().item()
    g_db, z_db = db(given), db(zeroed)
    c_db = db(rgb[:, :1].expand(-1, V - 1, -1, -1, -1))
    figures = {"input_use_given_db": g_db, "input_use_zeroed_db": z_db, "input_use_copy_db": c_db,
               "input_gain_db": g_db - z_db, "input_beyond_copy_db": g_db - c_db, "input_use_sigma": float(sigma),
               "input_use_offsets": offsets.tolist()}
    return {"figures": figures, "given": given, "zeroed": zeroed, "truth": tgt}
