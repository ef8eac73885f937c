"""Training data: the run's latents, cameras and identity embeddings, drawn into the batches of each step.

Notebook 05; the recipe (stages, conditioning views, background, guidance dropout, noise) is in ``train.py``'s
docstring and METHOD.md section 4. Every random choice of a step comes from ``step_generator``.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from . import edm
from .checkpoints import module_fingerprint
from .latents import BG_SETS
from .profiles import Profile
from .raymaps import profile_raymap
from .runs import Run

P_UNCOND = 0.15          # classifier-free guidance dropout (paper)
P_BACKGROUND = 0.5       # random background colour instead of white (paper)
STAGE2_CONDS = (0, 1, 3)  # conditioning views in stage 2, each with p = 1/3 (paper)


def n_targets_for_shift(profile: Profile) -> int:
    """N of the log-SNR shift: the target views of a one-conditioning-view sample, ``P - 1`` (paper: 7)."""
    return max(profile.views_per_sample - 1, 1)


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """The one CPU generator of (seed, step, micro-batch, process): all randomness of that batch."""
    state = np.random.SeedSequence([int(seed), int(step), int(micro), int(rank)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def frontal_view(yaw: torch.Tensor, pitch: torch.Tensor) -> int:
    """Index of the view closest to the frontal one (yaw 0, pitch 0)."""
    yaw = (torch.as_tensor(yaw, dtype=torch.float32) + 180) % 360 - 180
    return int(torch.argmin(yaw**2 + torch.as_tensor(pitch, dtype=torch.float32) ** 2))


def face_weights(c2w: torch.Tensor, K: torch.Tensor, resolution: int, latent_res: int, strength: float
                 ) -> torch.Tensor:
    """Loss weights (V, 1, h, w) that make the face of each view count ``1 + strength`` times: 1 everywhere, plus
    ``strength`` on ``faces.face_region`` of each view (its projected face box) at latent resolution.
    The face is a small part of each image and of a random rig (the eyes are 2-3 pixels at 64 px, the back half
    of the views has no face), so with the paper's uniform loss it earns a few per cent of the gradient.
    """
    from .faces import face_region

    w = torch.ones(c2w.shape[0], 1, latent_res, latent_res)
    if strength <= 0:
        return w
    return w + strength * face_region(c2w, K, resolution, latent_res)[:, None].float()


def spread_views(yaw: torch.Tensor, start: int, n: int) -> list[int]:
    """``n`` views: ``start`` and the ``n - 1`` views whose yaw is nearest ``yaw[start] + k 360 / n``."""
    yaw = torch.as_tensor(yaw, dtype=torch.float32)
    out = [start]
    for k in range(1, n):
        want = float(yaw[start]) + k * 360.0 / n
        d = ((yaw - want + 180) % 360 - 180).abs()
        d[out] = float("inf")
        out.append(int(torch.argmin(d)))
    return out


class TrainData:
    """Everything a training step reads: latents, cameras and identity embeddings of every identity.

    ``batch(step, micro, rank, stage, batch_size)`` -> dict with
    ``x0`` (B,P,8,h,w) clean latents [image 4 | normal 4]; ``mask`` (B,P) bool, True = conditioning view;
    ``rays`` (B,P,144,h,w); ``id_emb`` (B,512); ``drop`` (B,) bool (CFG dropout: empty prompt and zero
    conditioning latents); ``drop_id`` (B,) bool (empty prompt: ``drop``, or always without identity);
    ``bg`` (B,) bool (random background); ``sigma`` (B,); ``noise`` (B,P,8,h,w); ``channels`` (latent channels
    the loss counts: 8, or 4 for ``image_only``); ``identity`` list of names; ``views`` (B,P) indices.

    Recipe options, the paper's ablations (recorded in the model's config): ``cond_views`` a fixed number of
    conditioning views instead of the two stages (0 = "without input image"); ``use_identity=False`` always the
    empty prompt ("without identity embedding"); ``image_only=True`` normal latents zeroed and left out of the
    loss ("without normal generation"). The course's own option: ``face_weight > 0`` adds ``weight`` (B,P,1,h,w)
    to the batch, the face of each target counting ``1 + face_weight`` times in the loss (``face_weights``);
    0 is the paper's uniform loss.
    """

    def __init__(self, run: Run, progress: bool = True, cond_views: int | None = None, use_identity: bool = True,
                 image_only: bool = False, identities: list[str] | None = None, face_weight: float = 0.0):
        from .dataset import HeadDataset, ensure_dataset
        from .identity import ensure_encoder
        from .latents import ensure_latent_cache

        self.run, self.profile = run, run.profile
        self.cond_views, self.use_identity, self.image_only = cond_views, bool(use_identity), bool(image_only)
        self.face_weight = float(face_weight)
        if not (self.face_weight >= 0):
            raise ValueError(f"face_weight must be >= 0 (0 = the paper's uniform loss), got {face_weight}")
        self._face_w: dict[str, torch.Tensor] = {}       # identity -> (V, 1, h, w), computed once
        root = ensure_dataset(run)
        self.train = HeadDataset(root, split="train", cache=False)      # training reads the latent cache;
        self.train_ids = list(self.train.ids) if identities is None else [str(i) for i in identities]
        unknown = sorted(set(self.train_ids) - set(self.train.ids))
        if unknown:
            raise ValueError(f"identities {unknown[:5]} are not training identities of {root}")
        self.heldout = HeadDataset(root, split="heldout", cache=False)  # renders only once, for cameras
        self.cache = ensure_latent_cache(run, progress=progress)
        self.resolution = self.train.resolution
        self.latent_res = self.cache.latent_res
        self.P = min(self.profile.views_per_sample, self.train.views_per_identity)
        self.cameras = {}                                  # identity -> (c2w (V,4,4), K (V,3,3), yaw, pitch)
        encoder = ensure_encoder(run, "cond")
        self.id_emb = self._embed_identities(encoder, progress)
        # the latent space and identity space this model learns in: a model only works with these two
        self.fingerprints = {"vae_fingerprint": self.cache.index.get("vae_fingerprint", ""),
                             "id_cond_fingerprint": module_fingerprint(encoder)}

    def camera(self, ds, i: int):
        """(c2w (V,4,4), K (V,3,3), yaw (V,), pitch (V,)) of identity ``i`` of ``ds``, read once."""
        name = ds.ids[i]
        if name not in self.cameras:
            a = ds.arrays(i)
            c2w = torch.as_tensor(a["c2w"], dtype=torch.float32)
            K = torch.as_tensor(a["K"], dtype=torch.float32)
            K = K.expand(len(c2w), 3, 3) if K.ndim == 2 else K
            self.cameras[name] = (c2w, K.contiguous(), torch.as_tensor(a["yaw"], dtype=torch.float32),
                                  torch.as_tensor(a["pitch"], dtype=torch.float32))
        return self.cameras[name]

    @torch.no_grad()
    def _embed_identities(self, encoder, progress: bool) -> dict[str, torch.Tensor]:
        """Identity embedding (512,) of every identity: the frozen ``cond`` encoder on its frontal view."""
        names, images = [], []
        todo = [(ds, i) for ds in (self.train, self.heldout) for i in range(len(ds))]
        for ds, i in tqdm(todo, desc="frontal views", disable=not progress, leave=False):
            _, _, yaw, pitch = self.camera(ds, i)
            names.append(ds.ids[i])
            images.append(ds.views(i, [frontal_view(yaw, pitch)])["rgb"][0])
        emb = encoder.embed(torch.stack(images)).float().cpu()                 # (N, 512) unit vectors
        return dict(zip(names, emb))

    def rays(self, ds, i: int, idx) -> torch.Tensor:
        """Ray maps (P,144,h,w) of views ``idx`` of identity ``i``."""
        c2w, K, _, _ = self.camera(ds, i)
        idx = torch.as_tensor(idx, dtype=torch.long)
        return profile_raymap(self.profile, c2w[idx], K[idx])

    def face_weight_maps(self, ds, i: int, idx) -> torch.Tensor:
        """Loss weights (P,1,h,w) of views ``idx`` of identity ``i`` (``face_weights``, ``face_weight``)."""
        name = ds.ids[i]
        if name not in self._face_w:
            c2w, K, _, _ = self.camera(ds, i)
            self._face_w[name] = face_weights(c2w, K, self.resolution, self.latent_res, self.face_weight)
        return self._face_w[name][torch.as_tensor(idx, dtype=torch.long)]

    def latents(self, name: str, idx, background: bool = False, bg_set: int = 0) -> torch.Tensor:
        """Clean latents (P,8,h,w) = [image | normal] of views ``idx``; ``background``: every view on the identity's
        background colour ``bg_set`` (one colour for the whole sample)."""
        z = self.cache.get(name, list(idx), bg_set=bg_set)
        return torch.cat([z["rgb_bg"] if background else z["rgb"], z["normal"]], dim=1)

    def batch(self, step: int, micro: int = 0, rank: int = 0, stage: int = 2, batch_size: int | None = None,
              seed: int | None = None) -> dict:
        B = batch_size or self.profile.batch_size
        g = step_generator(self.run.seed if seed is None else seed, step, micro, rank)
        P, ds = self.P, self.train
        x0, mask, rays, emb, drop, bg, names, views, weight = [], [], [], [], [], [], [], [], []
        for _ in range(B):
            i = ds.ids.index(self.train_ids[int(torch.randint(len(self.train_ids), (1,), generator=g))])
            idx = torch.randperm(ds.views_per_identity, generator=g)[:P].tolist()
            if self.face_weight > 0:
                weight.append(self.face_weight_maps(ds, i, idx))
            if self.cond_views is not None:
                n_cond = int(self.cond_views)
            elif stage == 1:
                n_cond = 1
            else:
                n_cond = STAGE2_CONDS[int(torch.randint(len(STAGE2_CONDS), (1,), generator=g))]
            n_cond = min(n_cond, P - 1)
            use_bg = bool(torch.rand((), generator=g) < P_BACKGROUND)
            bg_set = int(torch.randint(BG_SETS, (1,), generator=g))
            dropped = bool(torch.rand((), generator=g) < P_UNCOND)
            name = ds.ids[i]
            x0.append(self.latents(name, idx, use_bg, bg_set))
            mask.append(torch.arange(P) < n_cond)            # the first n_cond of the random views condition
            rays.append(self.rays(ds, i, idx))
            emb.append(self.id_emb[name])
            drop.append(dropped)
            bg.append(use_bg)
            names.append(name)
            views.append(idx)
        x0 = torch.stack(x0)
        sigma = edm.sample_training_sigma(B, n_targets=n_targets_for_shift(self.profile), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if self.image_only:
            x0[:, :, 4:] = 0.0
        drop = torch.tensor(drop)
        out = dict(x0=x0, mask=torch.stack(mask), rays=torch.stack(rays), id_emb=torch.stack(emb),
                   drop=drop, drop_id=drop | (not self.use_identity), bg=torch.tensor(bg), sigma=sigma,
                   noise=noise, channels=4 if self.image_only else 8, identity=names, views=torch.tensor(views),
                   stage=stage)
        if weight:
            out["weight"] = torch.stack(weight)
        return out

    def options(self) -> dict:
        """The recipe options, as recorded in the model's config."""
        opts = {"cond_views": self.cond_views, "use_identity": self.use_identity, "image_only": self.image_only}
        if self.face_weight > 0:
            opts["face_weight"] = self.face_weight             # absent = 0, the paper's loss (older checkpoints)
        if len(self.train_ids) != len(self.train.ids):
            opts["train_identities"] = self.train_ids          # a run on some heads only (the overfit check)
        return opts


def encoder_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
