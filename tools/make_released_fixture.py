"""Make ``tests/fixtures/released_tiny.safetensors``: the released SpinMeRound architecture's own numbers.

Run once, in a scratch environment *outside* this project, against a checkout of the released code
(public repository spin-me-round/SpinMeRound; the fixture in this checkout was made from commit
8d9449237a122c0e20e3e917b6084dfc93f32c1f)::

    python tools/make_released_fixture.py --released /path/to/SpinMeRound \
        [--site /path/to/extra/site-packages] [--out tests/fixtures/released_tiny.safetensors]

It needs torch, einops, omegaconf, packaging and pillow (install them into the scratch environment, never
into the course's). Nothing of the course is imported: the script only drives the released code and stores
what it computes, as data:

* ``weights.<key>``: the state dict of a tiny ``MultiViewUNetModel`` (config in the metadata: 153 -> 8
  channels, 32 channels, 2 levels, attention at both, so level 0 has a 2D and level 1 a 3D spatial transformer,
  plus the 3D middle block) with random weights. To keep the file small every tensor is stored as int8 times a
  power of two (``weight_scales`` in the metadata: ``w = q * 2^-e``); the released model ran with exactly those
  float32 values.
* ``angles`` (3, 3) degrees and the released ``get_pose_map`` ray maps of those cameras on a 4 x 6 grid,
  ``rays_f32`` (computed in float32, as the released code runs) and ``rays_f64`` (the same code with float64 as
  torch's default dtype).
* the UNet inputs of B = 2 samples of V = 3 views (rows ``b * V + v``): ``latents`` (6, 8, 4, 6), the mask
  channel (view 0 given: 0, the others 1, the released convention), ``c_noise`` (6,) and ``context`` (6, 8, 16)
  (8 tokens to keep the file small; the real context has 77);
  the input is ``cat([latents, rays_f32 of each view, mask])``; ``context`` is stored once per sample (2, 8, 16)
  and repeated for each of its views.
* ``out`` (6, 8, 4, 6): ``model(x, timesteps=c_noise, context=context, num_video_frames=3)``, and
  ``out_per_view``: the same call with ``num_video_frames=1`` (every 3D attention then sees one view).
* ``full_size_shapes`` (metadata, JSON): key -> shape of the full-size released UNet (``configs/inference.yaml``),
  built on the ``meta`` device, so the course can check its key map on the real shapes without the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import types
from pathlib import Path

TINY = dict(image_size=32, in_channels=153, out_channels=8, model_channels=32, attention_resolutions=[2, 1],
            num_res_blocks=1, channel_mult=[1, 1], num_heads=2, use_spatial_transformer=True,
            use_linear_in_transformer=False, transformer_depth=1, context_dim=16, use_checkpoint=False,
            legacy=False)
FULL = dict(image_size=32, in_channels=153, out_channels=8, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
            use_linear_in_transformer=False, transformer_depth=1, context_dim=768, use_checkpoint=False,
            legacy=False)
ANGLES = [[0.0, 0.0, 0.0], [10.0, 135.0, 0.0], [-20.0, -60.0, 5.0]]
B, V, H, W = 2, 3, 4, 6
TOKENS = 8            # context tokens per sample (the real context has 77; the UNet takes any number)


def import_released(checkout: Path, site: list[str]):
    """The released UNet class and ``get_pose_map``, imported without xformers, CLIP, kornia or insightface."""
    sys.path[:0] = [*site, str(checkout)]
    sys.modules["xformers"] = types.ModuleType("xformers")          # its absence makes attention use PyTorch's
    for name, sub in (("spmr", "spmr"), ("spmr.modules", "spmr/modules")):
        pkg = types.ModuleType(name)                                  # bare packages: skip spmr/modules/__init__.py
        pkg.__path__ = [str(checkout / sub)]
        sys.modules[name] = pkg
    from spmr.data.dataset_camera_utils import get_pose_map
    from spmr.modules.diffusionmodules.openaimodel import MultiViewUNetModel
    return MultiViewUNetModel, get_pose_map


def quantised(t, generator, kind: str):
    """Random values like a trained layer's, rounded to ``q * 2^-e`` with int8 ``q``. Returns (values, q, e)."""
    import torch
    if kind == "scale":                                               # norm weights: around 1
        w = 1.0 + 0.1 * torch.randn(t.shape, generator=generator)
    elif kind == "bias":
        w = 0.05 * torch.randn(t.shape, generator=generator)
    else:                                                             # matrices and kernels: variance 1 / fan-in
        fan_in = t[0].numel()
        w = torch.randn(t.shape, generator=generator) / math.sqrt(fan_in)
    e = math.floor(math.log2(127.0 / float(w.abs().max())))
    q = torch.round(w * 2.0 ** e).clamp(-127, 127).to(torch.int8)
    return q.float() * 2.0 ** -e, q, e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", required=True, help="checkout of spin-me-round/SpinMeRound (holds spmr/)")
    ap.add_argument("--site", action="append", default=[], help="extra import path (einops, omegaconf)")
    ap.add_argument("--out", default="tests/fixtures/released_tiny.safetensors")
    ap.add_argument("--commit", default="", help="commit of the checkout (default: git rev-parse HEAD there)")
    args = ap.parse_args(argv)
    checkout = Path(args.released).resolve()
    if not (checkout / "spmr" / "modules" / "diffusionmodules" / "openaimodel.py").exists():
        raise SystemExit(f"{checkout} is not a checkout of the released code (no spmr/modules/diffusionmodules)")
    commit = args.commit or subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                                           text=True).stdout.strip() or "unknown"

    MultiViewUNetModel, get_pose_map = import_released(checkout, args.site)
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    model = MultiViewUNetModel(**TINY).eval()
    state, tensors, scales = {}, {}, {}
    for k, t in model.state_dict().items():
        kind = "scale" if (t.ndim == 1 and k.endswith("weight")) else "bias" if t.ndim == 1 else "matrix"
        state[k], tensors[f"weights.{k}"], scales[k] = quantised(t, g, kind)
    model.load_state_dict(state)

    # ray maps of three cameras, float32 (as the released code runs) and float64
    translation = torch.tensor([0.0, 0.0, 2.7])
    rays32 = torch.stack([get_pose_map(torch.tensor(a), translation, height=H, width=W)[0] for a in ANGLES])
    torch.set_default_dtype(torch.float64)
    translation64 = torch.tensor([0.0, 0.0, 2.7])                      # 2.7 in float64, not float32's 2.70000005
    rays64 = torch.stack([get_pose_map(torch.tensor(a), translation64, height=H, width=W)[0]
                          for a in ANGLES])
    torch.set_default_dtype(torch.float32)
    rays32 = rays32.permute(0, 3, 1, 2).contiguous()                  # (V, 144, H, W)
    rays64 = rays64.permute(0, 3, 1, 2).contiguous()
    assert rays32.dtype == torch.float32 and rays64.dtype == torch.float64

    # UNet inputs: B samples of V views, rows b * V + v
    latents = torch.randn(B * V, 8, H, W, generator=g)
    mask = torch.ones(B * V, 1, H, W)
    mask[0::V] = 0                                                    # view 0 of each sample is the given view
    x = torch.cat([latents, rays32.repeat(B, 1, 1, 1), mask], dim=1)
    sigma = torch.tensor([700.0, 0.5])
    c_noise = (0.25 * sigma.log()).repeat_interleave(V)
    context = torch.randn(B, TOKENS, TINY["context_dim"], generator=g).repeat_interleave(V, dim=0)
    with torch.no_grad():
        out = model(x, timesteps=c_noise, context=context, num_video_frames=V)
        out_per_view = model(x, timesteps=c_noise, context=context, num_video_frames=1)

    with torch.device("meta"):
        full = MultiViewUNetModel(**FULL)
    full_shapes = {k: list(v.shape) for k, v in full.state_dict().items()}

    tensors.update(angles=torch.tensor(ANGLES), rays_f32=rays32, rays_f64=rays64, latents=latents,
                   mask=mask[:, 0, 0, 0].contiguous(), c_noise=c_noise, context=context[::V], out=out,
                   out_per_view=out_per_view)
    meta = {"made_by": "tools/make_released_fixture.py", "released_commit": commit,
            "tiny_config": json.dumps(TINY), "full_config": json.dumps(FULL), "weight_scales": json.dumps(scales),
            "full_size_shapes": json.dumps(full_shapes, separators=(",", ":")), "batch": str(B), "views": str(V),
            "grid": json.dumps([H, W]), "sigma": json.dumps(sigma.tolist()), "torch": torch.__version__}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_path), metadata=meta)
    out_path.chmod(0o644)
    n_full = sum(math.prod(s) for s in full_shapes.values())
    print(json.dumps({"out": str(out_path), "bytes": out_path.stat().st_size, "tiny_keys": len(state),
                      "tiny_params": sum(t.numel() for t in state.values()), "full_keys": len(full_shapes),
                      "full_params": n_full, "out_std": float(out.std()),
                      "out_vs_per_view_max_diff": float((out - out_per_view).abs().max()),
                      "rays_f32_vs_f64_max_diff": float((rays32.double() - rays64).abs().max())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
