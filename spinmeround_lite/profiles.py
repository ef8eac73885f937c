"""Profiles: one set of numbers per size of run. The same code and notebooks run at every size.

``test``  all notebooks in a few minutes on 2 CPU cores (tiny, checks that everything runs).
``cpu``   the whole course in about 20 minutes on 2 CPU cores; after training it starts from the
          course's reference checkpoints (``reference/cpu``) where they are present.
``gpu``   one CUDA GPU in about an hour, good quality.
``colab`` a Colab T4 (15 GB, no bf16): the ``gpu`` model with fp16 autocast and a gradient scaler, fitted to 13 GB.
``paper`` the paper's sizes (512 px images, 64x64 latents, SD1.5-shaped UNet); needs external weights and data.

A profile is data, not a code path: add a field here, read it in the module that needs it.

Any field but ``name`` can be changed for one run without editing this file: ``overrides`` (a notebook's
parameter, ``{"batch_size": 8}``), ``python -m spinmeround_lite.course run --set batch_size=8`` or
``make course OVERRIDES="batch_size=8"``. ``apply_overrides`` checks each name and type and says which fields
exist when one does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
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
    dry_run: bool = False               # sizes of the profile, counts cut to the least (course run --dry-run):
                                        # every figure of such a run is not a result
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


# one CUDA GPU of data-centre size; the colab profile below is this one cut to a T4
_GPU = Profile(
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
)


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
        vae_channels=(32, 64, 64), vae_steps=3500, vae_batch=16, vae_lr=1e-3,   # reference/cpu/vae: batch, rate
        unet_channels=(64, 128, 128), unet_head_dim=32,
        views_per_sample=8, train_steps=150, batch_size=2, lr=6e-4, checkpoint_every=75, sample_every=75,
        use_reference=True,
        sample_steps=20, spin_views=48,
        dpm_rho=10.0, dpm_sigma_min=0.05,     # measured: tools/schedule_sweep.py, results/cpu/dpm_schedule.json
        splat_iters=600, splat_init_gaussians=4000, splat_res=64,
        eval_identities=4, eval_angles=16, ablation_steps=40,
    ),
    "gpu": _GPU,
    # a Colab T4 (15 GB, compute capability 7.5, no bf16): the gpu profile's model and images, fp16 autocast with a
    # gradient scaler, a batch and counts sized for 13 GB and a session of about two hours
    # (results/colab/memory.json, README "On Colab"); only what differs from gpu is written
    "colab": _GPU.replace(
        name="colab", identities=300, heldout_identities=20, render_chunk=1 << 18,
        id_train_steps=1500, vae_steps=2000, vae_batch=32, vae_decoder_steps=1000,
        train_steps=6000, batch_size=8, checkpoint_every=1000, sample_every=1000, mixed_precision="fp16",
        eval_identities=20, ablation_steps=1500,
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
    """Return the profile called ``name`` (``test``, ``cpu``, ``gpu``, ``colab`` or ``paper``)."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None


# ----------------------------------------------------------------------------------------------
# overrides: a profile's fields changed for one run
# ----------------------------------------------------------------------------------------------
class OverrideError(ValueError):
    """An override names no field of ``Profile``, or gives a field a value of the wrong type."""


def override_fields() -> dict[str, str]:
    """Every field an override may set, with its type's name (``int``, ``float``, ``bool``, ``str``, ``tuple``,
    ``dict``); ``name`` is not one of them (the profile is chosen by name, then changed)."""
    return {f.name: str(f.type) for f in dataclasses.fields(Profile) if f.name != "name"}


def _field_list() -> str:
    return ", ".join(f"{k} ({t})" for k, t in override_fields().items())


def _check_value(key: str, kind: str, value):
    """``value`` as field ``key`` of type ``kind`` holds it, or ``OverrideError``."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "tuple": isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value),
        "dict": isinstance(value, dict),
    }[kind]
    if not ok:
        what = "a list of integers" if kind == "tuple" else f"a {kind}"
        raise OverrideError(f"override {key}={value!r} ({type(value).__name__}): {key} takes {what}")
    if kind == "float":
        return float(value)
    if kind == "tuple":
        return tuple(value)
    return value


def check_overrides(overrides: dict | None) -> dict:
    """The overrides with their values in the field's own type (lists become tuples, ints floats where the field
    is a float); ``OverrideError`` naming the valid fields for an unknown one, or the type for a wrong value. A
    string is read as JSON (papermill's ``-p overrides '{"batch_size": 8}'``)."""
    if overrides is None:
        return {}
    if isinstance(overrides, str):          # papermill -p overrides '{"batch_size": 8}' passes the text
        try:
            overrides = json.loads(overrides) if overrides.strip() else {}
        except json.JSONDecodeError as e:
            raise OverrideError(f"overrides {overrides!r} is not a JSON object ({e}); write it as "
                                f"'{{\"batch_size\": 8}}'") from None
    if not isinstance(overrides, dict):
        raise OverrideError(f"overrides must be a dict of profile fields and values, e.g. {{\"batch_size\": 8}}; "
                            f"got {type(overrides).__name__} {overrides!r}")
    fields = override_fields()
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise OverrideError(f"unknown profile field{'s' if len(unknown) > 1 else ''} in overrides: "
                            f"{', '.join(hints)}. The fields are: {_field_list()}")
    return {k: _check_value(k, fields[k], v) for k, v in overrides.items()}


def apply_overrides(profile: "str | Profile", overrides: dict | None) -> Profile:
    """``profile`` (a name or a ``Profile``) with ``overrides`` applied, each name and type checked."""
    return get_profile(profile).replace(**check_overrides(overrides))


def parse_override(text: str) -> tuple[str, object]:
    """One ``field=value`` of the command line, the value read by the field's type: ``batch_size=8``,
    ``lr=1e-4``, ``use_reference=false``, ``unet_channels=64,128,128``, ``vae_pretrained=weights/sd15-vae``,
    ``extra={"model": "released"}`` (JSON)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise OverrideError(f"--set {text!r}: write field=value, e.g. --set batch_size=8")
    fields = override_fields()
    if key not in fields:
        check_overrides({key: None})                    # raises, naming the fields
    kind = fields[key]
    try:
        if kind == "int":
            return key, int(raw)
        if kind == "float":
            return key, float(raw)
        if kind == "bool":
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return key, low in ("true", "1", "yes")
        if kind == "tuple":
            if raw.startswith("["):
                return key, _check_value(key, kind, json.loads(raw))
            return key, tuple(int(v) for v in raw.strip("()").split(",") if v.strip())
        if kind == "dict":
            return key, _check_value(key, kind, json.loads(raw))
        return key, raw
    except (ValueError, json.JSONDecodeError):
        example = {"int": "8", "float": "0.0002", "bool": "true", "tuple": "64,128,128",
                   "dict": '{"key": "value"}'}[kind]
        raise OverrideError(f"--set {text!r}: {key} takes a {kind} (e.g. {key}={example})") from None


def parse_overrides(items: list[str] | None) -> dict:
    """``["batch_size=8", "train_steps=100"]`` (the command line's ``--set``) as a checked overrides dict."""
    return check_overrides(dict(parse_override(t) for t in (items or [])))


def profile_differences(a: Profile, b: Profile) -> list[str]:
    """``field: a-value != b-value`` for every field where two profiles differ (``name`` included)."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da[k]!r} != {db[k]!r}" for k in da if da[k] != db[k]]


# ----------------------------------------------------------------------------------------------
# picking a profile for the machine (the notebooks' set-up cell, when ``profile`` is left empty)
# ----------------------------------------------------------------------------------------------
LARGE_GPU_GIB = 20.0     # below this much GPU memory, or without bf16, a GPU gets ``colab`` instead of ``gpu``


def profile_for_device(name: str | None, memory_gib: float | None, bf16: bool | None) -> tuple[str, str]:
    """(profile, why) for a CUDA device (``name``, total memory, bf16 support), or ``cpu`` when ``name`` is None.

    A T4 (15 GB, no bf16) or any GPU under ``LARGE_GPU_GIB`` or without bf16 gets ``colab`` (fp16 with a gradient
    scaler, sized for 13 GB); a larger bf16 GPU gets ``gpu``."""
    if name is None:
        return "cpu", "no CUDA GPU"
    if not bf16 or (memory_gib or 0) < LARGE_GPU_GIB:
        why = "no bf16" if not bf16 else f"{memory_gib:.0f} GiB < {LARGE_GPU_GIB:.0f} GiB"
        return "colab", f"{name}, {memory_gib:.0f} GiB, {why}"
    return "gpu", f"{name}, {memory_gib:.0f} GiB, bf16"


def pick_profile(profile: str = "", verbose: bool = True) -> str:
    """``profile`` when given, else ``$SMR_PROFILE``, else the profile for this machine's GPU
    (``profile_for_device``); printed when picked here."""
    import os

    if profile or os.environ.get("SMR_PROFILE"):
        return profile or os.environ["SMR_PROFILE"]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        picked, why = profile_for_device(props.name, props.total_memory / 2 ** 30, torch.cuda.is_bf16_supported())
    else:
        picked, why = profile_for_device(None, None, None)
    if verbose:
        print(f"profile left empty: {picked!r} for this machine ({why})")
    return picked


# ----------------------------------------------------------------------------------------------
# the dry run: a profile's sizes, every count cut to the least that runs the code (course run --dry-run)
# ----------------------------------------------------------------------------------------------
DRY_RUN_BANNER = ("DRY RUN: {profile} sizes with every count cut to the least (a few identities, two training "
                  "steps, two sampler steps, one evaluation head); its figures are NOT results.")


def dry_run_overrides(profile: "str | Profile") -> dict:
    """Overrides that keep ``profile``'s sizes (image and latent resolution, model widths and depths, views per
    sample, its 16-bit autocast where the CPU has it) and cut every count: identities and their rig views (25: the
    same rig code, a fifth of the images to render, encode and evaluate), training and sampler steps, batch,
    evaluation heads and angles, splatting iterations."""
    p = get_profile(profile)
    o = {"dry_run": True, "identities": 6, "heldout_identities": 2, "extra_train_identities": 0,
         "views_per_identity": min(p.views_per_identity, 25),
         "extra_heldout_identities": 0, "id_train_steps": 2, "id_batch": min(p.id_batch, 32),
         "vae_steps": 2, "vae_batch": 2, "vae_decoder_steps": 2 if p.vae_decoder_steps else 0,
         "train_steps": 2, "batch_size": 1, "grad_accum": 1, "checkpoint_every": 1, "sample_every": 2,
         "stage1_fraction": 0.5, "use_reference": False, "sample_steps": 2, "spin_views": 16, "check_heads": 2,
         "splat_iters": 10, "splat_init_gaussians": min(p.splat_init_gaussians, 1000), "eval_identities": 1,
         "eval_angles": 4, "ablation_steps": 2}
    if p.mixed_precision in ("auto", "bf16"):
        o["mixed_precision"] = "bf16"          # what the profile uses on a bf16 GPU, through CPU autocast
    return o


def not_exercised(profile: "str | Profile") -> list[str]:
    """What a dry run of ``profile`` on the CPU does not run, each with the CPU path that ran instead."""
    p = get_profile(profile)
    out = ["gsplat's CUDA rasterizer: the course's PyTorch renderer (splat.rasterize backend='torch') ran",
           "CUDA kernels of attention (flash / memory-efficient scaled_dot_product_attention): the CPU kernel ran",
           "CUDA sphere tracing of the heads: the same renderer on the CPU",
           "memory at the profile's batch: batch 1 ran (python -m spinmeround_lite.memory estimates the full batch)",
           "several processes (accelerate launch): one CPU process"]
    if p.mixed_precision == "fp16":
        out.insert(1, "fp16 autocast with a gradient scaler (CUDA only): float32 ran")
    elif p.mixed_precision in ("auto", "bf16"):
        out.insert(1, "bf16 autocast on CUDA: bf16 autocast on the CPU ran (accelerate mixed_precision='bf16')")
    return out
