"""Profiles: one set of numbers per size of run. The same code and notebooks run at every size.

``test``  all notebooks in a few minutes on 2 CPU cores (tiny, checks that everything runs).
``cpu``   the whole course in about 20 minutes on 2 CPU cores; after training it starts from the
          course's reference checkpoints (``reference/cpu``) where they are present.
``gpu``   one CUDA GPU in about an hour, good quality.
``paper`` the paper's sizes (512 px images, 64x64 latents, SD1.5-shaped UNet); needs external weights and data.

A profile is data, not a code path: add a field here, read it in the module that needs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    # --- data (notebook 00) -------------------------------------------------------------
    resolution: int                     # rendered image side in pixels
    identities: int                     # procedural identities in all
    heldout_identities: int             # of those, kept out of every training (evaluation only)
    views_per_identity: int             # rig views per identity (125 in the paper)
    extra_train_identities: int = 0     # more training heads beyond ``identities`` (reference models train on more)
    extra_heldout_identities: int = 0   # evaluation-only heads from a reserved seed range (``id5xxxxx``), held out
    render_chunk: int = 65536           # rays per sphere-tracing chunk (memory bound)
    camera_jitter: bool = True          # cameras drawn per identity around the rig (False: the same rig for all)
    # --- identity encoders and context (notebook 01) -------------------------------------
    id_input_res: int = 64              # face crop side fed to the learned encoders
    id_width: int = 32                  # base width of the conditioning encoder CNN
    id_eval_width: int = 48             # base width of the independent evaluation encoder
    id_train_steps: int = 300           # steps of ArcFace-loss training per encoder
    id_batch: int = 64
    text_hidden: int = 128              # CLIP text hidden size (768 for CLIP ViT-L / Arc2Face)
    text_layers: int = 2
    text_heads: int = 4
    # --- ray maps (notebook 02) ----------------------------------------------------------
    ray_origin_freqs: int = 15
    ray_dir_freqs: int = 8
    ray_origin_min_freq_log2: int = 0   # origin ladder 2^m .. 2^(m+14); 0 = NeRF's (the released model's)
    ray_dir_min_freq_log2: int = 0      # direction ladder 2^m .. 2^(m+7)
    # --- autoencoder (notebook 03) -------------------------------------------------------
    vae_channels: tuple = (32, 64, 64)  # AutoencoderKL block_out_channels (down factor 2**(len-1))
    vae_latent_channels: int = 4
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 2e-3                # peak learning rate (warm-up, then cosine to 5 %)
    vae_decoder_steps: int = 0          # then the decoder alone, encoder frozen (latents.finetune_decoder)
    vae_decoder_lr: float = 1e-3
    vae_pretrained: str = ""            # local folder of a diffusers AutoencoderKL (SD1.5 VAE at `paper`)
    # --- multi-view UNet (notebook 04) ---------------------------------------------------
    unet_channels: tuple = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 32             # channels per attention head (heads = channels // this)
    unet_heads: int = 0                 # fixed head count at every level instead (SD1.5: 8); 0 = use unet_head_dim
    unet_attn_levels: tuple = ()        # levels with attention blocks; () = all (SD1.5: all but the coarsest)
    unet_3d_levels: int = -1            # the k coarsest levels get 3D attention; -1 = the paper rule (<= 32x32)
    unet_pretrained: str = ""           # local folder of a 2D UNet2DConditionModel (Arc2Face at `paper`)
    # --- EDM training (notebook 05) ------------------------------------------------------
    views_per_sample: int = 8           # P = conditioning + target views per training sample
    train_steps: int = 300
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 2e-4
    ema_decay: float = 0.999
    lr_decay_steps: int = 0             # cosine decay of the learning rate to 5 % over the run's last steps (0: none)
    stage1_fraction: float = 0.5        # fraction of steps in stage 1 (one conditioning view)
    checkpoint_every: int = 100
    sample_every: int = 100
    mixed_precision: str = "auto"       # "auto": bf16 on CUDA devices that support it, else no
    use_reference: bool = False         # notebooks after training start from reference/<profile> if present
    # --- sampling (notebooks 06, 07) -----------------------------------------------------
    sample_steps: int = 25              # Euler steps of the Karras schedule (released: 50)
    cfg_scale: float = 3.0              # classifier-free guidance scale (paper 3, demo 3.5)
    spin_views: int = 48                # views of a full spin (notebook 07, `spin/` artifact)
    sample_sigma_min: float = 0.002     # Karras schedule range; the released sampler uses 0.002 .. 700,
    sample_sigma_max: float = 80.0      # EDM 80 (about what the training noise distribution reaches)
    spin_per_round: int = 5             # step C: target views per round (with 3 conditioning views: 8)
    dpm_rho: float = 7.0                # DPM-Solver++(2M)'s Karras schedule (notebook 12 measures the choice)
    dpm_sigma_min: float = 0.002
    check_heads: int = 6                # held-out heads of notebook 07's checks (teacher forcing, sweep, swap)
    # --- splatting (notebook 08) ---------------------------------------------------------
    splat_iters: int = 600
    splat_init_gaussians: int = 4000
    splat_res: int = 64
    # --- evaluation (notebook 09) --------------------------------------------------------
    eval_identities: int = 8
    eval_angles: int = 16
    ablation_steps: int = 300
    extra: dict = field(default_factory=dict)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_res(self) -> int:
        return self.resolution // self.latent_factor

    def replace(self, **kw) -> "Profile":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PROFILES: dict[str, Profile] = {
    "test": Profile(
        name="test", resolution=32, identities=10, heldout_identities=3, views_per_identity=16,
        ray_origin_min_freq_log2=-11, ray_dir_min_freq_log2=-2,
        id_input_res=16, id_width=8, id_eval_width=12, id_train_steps=40, id_batch=32,
        text_hidden=32, text_layers=1, text_heads=2,
        vae_channels=(16, 32, 32), vae_steps=30, vae_batch=8, vae_decoder_steps=10,
        unet_channels=(16, 32), unet_head_dim=8,
        views_per_sample=4, train_steps=12, batch_size=1, checkpoint_every=6, sample_every=6,
        sample_steps=4, spin_views=16, check_heads=2,
        splat_iters=60, splat_init_gaussians=500, splat_res=32,
        eval_identities=2, eval_angles=4, ablation_steps=6,
    ),
    "cpu": Profile(
        name="cpu", resolution=64, identities=64, heldout_identities=8, views_per_identity=40,
        extra_heldout_identities=8,                                               # 16 held-out heads in all
        ray_origin_min_freq_log2=-11, ray_dir_min_freq_log2=-1,
        id_input_res=32, id_width=16, id_eval_width=24, id_train_steps=400, id_batch=64,
        text_hidden=64, text_layers=2, text_heads=2,
        vae_channels=(32, 64, 64), vae_steps=3500, vae_batch=16, vae_lr=1e-3,   # reference/cpu/vae's recipe
        unet_channels=(64, 128, 128), unet_head_dim=32,
        views_per_sample=8, train_steps=300, batch_size=2, lr=6e-4, checkpoint_every=100, sample_every=100,
        use_reference=True,
        sample_steps=20, spin_views=48,
        dpm_rho=10.0, dpm_sigma_min=0.05,     # measured: tools/schedule_sweep.py, results/cpu/dpm_schedule.json
        splat_iters=600, splat_init_gaussians=4000, splat_res=64,
        eval_identities=4, eval_angles=16, ablation_steps=40,
    ),
    "gpu": Profile(
        name="gpu", resolution=128, identities=600, heldout_identities=40, views_per_identity=125,
        render_chunk=1 << 20,
        ray_origin_min_freq_log2=-11, ray_dir_min_freq_log2=0,
        id_input_res=64, id_width=32, id_eval_width=48, id_train_steps=3000, id_batch=256,
        text_hidden=256, text_layers=4, text_heads=4,
        vae_channels=(64, 128, 128), vae_steps=4000, vae_batch=64, vae_decoder_steps=2000,
        unet_channels=(128, 256, 256), unet_layers_per_block=2, unet_head_dim=32,
        views_per_sample=8, train_steps=12000, batch_size=16, checkpoint_every=2000, sample_every=2000,
        lr=2e-4, ema_decay=0.9995,
        sample_steps=25, spin_views=48,
        splat_iters=2000, splat_init_gaussians=20000, splat_res=128,
        eval_identities=40, eval_angles=16, ablation_steps=4000,
    ),
    "paper": Profile(
        name="paper", resolution=512, identities=7000, heldout_identities=222, views_per_identity=125,
        render_chunk=1 << 21,
        id_input_res=112, id_width=64, id_eval_width=64, id_train_steps=50000, id_batch=512,
        text_hidden=768, text_layers=12, text_heads=12,
        vae_channels=(128, 256, 512, 512), vae_steps=0, vae_batch=32,
        vae_pretrained="weights/sd15-vae",
        unet_channels=(320, 640, 1280, 1280), unet_layers_per_block=2, unet_heads=8, unet_attn_levels=(0, 1, 2),
        unet_pretrained="weights/arc2face/unet",
        views_per_sample=8, train_steps=1_600_000, batch_size=4, grad_accum=1, lr=1e-5,
        ema_decay=0.9999, checkpoint_every=10000, sample_every=10000,
        sample_steps=50, cfg_scale=3.0, spin_views=48, sample_sigma_max=700.0,
        splat_iters=7000, splat_init_gaussians=100000, splat_res=512,
        eval_identities=222, eval_angles=16, ablation_steps=100000,
    ),
}


def get_profile(name: str | Profile) -> Profile:
    """Return the profile called ``name`` (``test``, ``cpu``, ``gpu`` or ``paper``)."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None
