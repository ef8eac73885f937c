"""GPU memory of a profile, measured on the CPU, and a GPU's wall time for the course estimated from counted FLOPs.

    python -m spinmeround_lite.memory --profile colab --out results/colab      # memory.json + memory.md

**Memory of one training step** (what a GPU would hold at its peak, at the profile's exact sizes: model, views,
latent resolution, batch, mixed precision):

* parameters (fp32), gradients (fp32), AdamW's two moments (fp32), the EMA copy (fp32), and under fp16/bf16
  autocast the cached 16-bit copies of the weights (2 bytes each): counted from the parameter count;
* the activations the backward keeps: every tensor autograd saves during the forward, summed once per storage
  (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded, they are counted above). Measured on the
  CPU with a real forward at batch 1 and batch 2 under CPU autocast in 16 bits (bf16: same element size as the
  T4's fp16; CPU and CUDA autocast cast the same op families: convolutions, linear layers, matmuls) and
  extrapolated to the profile's batch (activations grow linearly with the batch; the two measures check it).
  The CPU's fused attention kernel (flash attention for CPU) keeps what a memory-efficient CUDA kernel keeps
  (outputs and log-sum-exp, not the score matrix);
* the batch's input tensors, and the CUDA context (a stated 0.5 GiB).

**Memory of one spin round** (inference: no gradients): parameters, and the activations of one denoiser call on
the round's views with classifier-free guidance (both branches in one batch). Without gradients a forward frees
each activation once the next layer has read it, so the tensors a training forward would save are an upper
bound; that upper bound is what is counted.

**Wall time on a GPU, on paper**: FLOPs of one training step and of one denoiser call counted by
``torch.utils.flop_counter`` (convolutions and matmuls), times the course's steps and calls, divided by the GPU's
16-bit tensor peak times a stated utilisation. It is an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from .profiles import Profile, get_profile
from .runs import write_json

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5          # CUDA context and cuBLAS/cuDNN workspaces on the device (stated, not measured)
T4 = {"name": "Tesla T4", "fp16_tensor_tflops": 65.0, "memory_gib": 15.0, "budget_gib": 13.0}


class SavedTensorMeter:
    """Sums the bytes of every tensor autograd saves inside the ``with`` block, once per storage, leaving out
    ``exclude`` (the parameters)."""

    def __init__(self, exclude=()):
        self.exclude = {self._key(t) for t in exclude}
        self.seen: set = set()
        self.bytes = 0
        self.count = 0

    @staticmethod
    def _key(t: torch.Tensor):
        s = t.untyped_storage()
        return (s.data_ptr(), s.nbytes())

    def _pack(self, t: torch.Tensor):
        k = self._key(t)
        if k not in self.seen and k not in self.exclude:
            self.seen.add(k)
            self.bytes += t.untyped_storage().nbytes()
            self.count += 1
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _random_inputs(profile, batch: int, n_cond: int = 1) -> dict:
    from .bench import random_batch
    return random_batch(profile, batch, torch.device("cpu"), n_cond=n_cond)


def _autocast(dtype_bits: int):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_bits == 16)


def mixed_bits(profile) -> int:
    """16 when the profile trains under fp16 or bf16 autocast on a GPU, else 32."""
    return 16 if profile.mixed_precision in ("fp16", "bf16", "auto") else 32


def activation_bytes(model, profile, batch: int, bits: int) -> tuple[int, int]:
    """(bytes, tensors) autograd saves in one training forward at ``batch``."""
    from .train import training_loss

    data = _random_inputs(profile, batch)
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    with meter, _autocast(bits):
        loss = training_loss(model, data, "cpu")
    del loss
    return meter.bytes, meter.count


def training_step_memory(p: Profile, batches=(1, 2)) -> dict:
    """Peak memory of one training step of profile ``p`` at its batch (see the module doc)."""
    from .model import SpinModel

    torch.manual_seed(0)
    model = SpinModel.from_profile(p, pretrained=False).train()
    n = sum(q.numel() for q in model.parameters())
    bits = mixed_bits(p)
    t0 = time.perf_counter()
    measured = {b: activation_bytes(model, p, b, bits) for b in batches}
    b1, b2 = batches[0], batches[-1]
    per_sample = (measured[b2][0] - measured[b1][0]) / (b2 - b1)
    fixed = measured[b1][0] - per_sample * b1
    act = fixed + per_sample * p.batch_size
    inputs = sum(t.numel() * t.element_size() for t in _random_inputs(p, p.batch_size).values())
    parts = {"parameters_fp32": 4 * n, "gradients_fp32": 4 * n, "adamw_moments_fp32": 8 * n, "ema_fp32": 4 * n,
             "autocast_weight_copies": 2 * n if bits == 16 else 0, "activations_saved": act,
             "batch_inputs": inputs, "cuda_context": CUDA_CONTEXT_GIB * GIB}
    total = sum(parts.values())
    return {"profile": p.name, "batch": p.batch_size, "views": p.views_per_sample, "latent_res": p.latent_res,
            "resolution": p.resolution, "params": n, "mixed_precision": p.mixed_precision, "activation_bits": bits,
            "measured_batches": {str(b): {"activation_bytes": v[0], "saved_tensors": v[1]}
                                 for b, v in measured.items()},
            "activation_bytes_per_sample": per_sample, "parts_gib": {k: v / GIB for k, v in parts.items()},
            "total_gib": total / GIB, "measure_seconds": time.perf_counter() - t0}


def spin_round_memory(p: Profile) -> dict:
    """Memory of one spin round: the round's views (3 given + ``spin_per_round`` targets; steps A and B use
    fewer), both CFG branches in one batch; activations bounded by one training forward's saved tensors."""
    from .model import SpinModel

    torch.manual_seed(0)
    model = SpinModel.from_profile(p, pretrained=False).eval()
    n = sum(q.numel() for q in model.parameters())
    views = max(3 + p.spin_per_round, 8)            # step B: 1 given + 7 anchors
    q = p.replace(views_per_sample=views)
    data = _random_inputs(q, 2, n_cond=3)           # conditional and unconditional branch
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    with meter, _autocast(mixed_bits(p)):
        D = model.denoise(data["x0"], data["sigma"], data["x0"], data["mask"], data["rays"], data["id_emb"])
    del D
    parts = {"parameters_fp32": 4 * n, "activations_upper_bound": meter.bytes,
             "batch_inputs": sum(t.numel() * t.element_size() for t in data.values()),
             "cuda_context": CUDA_CONTEXT_GIB * GIB}
    return {"profile": p.name, "views_per_call": views, "cfg_batch": 2, "parts_gib": {k: v / GIB for k, v in
            parts.items()}, "total_gib": sum(parts.values()) / GIB}


def flops_counts(p: Profile) -> dict:
    """FLOPs of one training step (forward + backward at the profile's batch) and of one spin denoiser call."""
    from torch.utils.flop_counter import FlopCounterMode

    from .bench import train_step_flops
    from .model import SpinModel

    model = SpinModel.from_profile(p, pretrained=False)
    step1 = train_step_flops(model, _random_inputs(p, 1), torch.device("cpu"))
    q = p.replace(views_per_sample=8)
    data = _random_inputs(q, 2, n_cond=3)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.denoise(data["x0"], data["sigma"], data["x0"], data["mask"], data["rays"], data["id_emb"])
    return {"train_step_flops": step1 * p.batch_size, "train_sample_flops": step1,
            "denoiser_call_flops_8_views_cfg": float(counter.get_total_flops())}


def spin_calls(profile) -> int:
    """Denoiser calls of one ``spin_views``-view spin: step A, step B and ceil(rest / per_round) rounds of C, each
    ``sample_steps`` calls (CFG in one batch per call)."""
    rounds = math.ceil(max(profile.spin_views - 8, 0) / profile.spin_per_round)
    return profile.sample_steps * (2 + rounds)


def gpu_time_estimate(p: Profile, flops: dict, peak_tflops: float, utilisation: float) -> dict:
    """The course's model work on a GPU, on paper: training (notebook 05), the ablations' training (notebook 09,
    three variants and the full model at ``ablation_steps``), and spins (notebook 07's spin, notebook 09's
    ``eval_identities`` inputs x (model + 3 ablations + the full model at the ablation budget), notebook 10's photo).
    Left out: data rendering, the encoders and the autoencoder, splatting, decoding; stated as such."""
    rate = peak_tflops * 1e12 * utilisation
    train = p.train_steps * flops["train_step_flops"]
    ablations = 4 * p.ablation_steps * flops["train_step_flops"]
    n_spins = 1 + p.eval_identities * 5 + 1
    spins = n_spins * spin_calls(p) * flops["denoiser_call_flops_8_views_cfg"]
    rows = {"training_hours": train / rate / 3600, "ablation_training_hours": ablations / rate / 3600,
            "spins_hours": spins / rate / 3600}
    return {"peak_tflops": peak_tflops, "utilisation": utilisation, "spins": n_spins,
            "denoiser_calls_per_spin": spin_calls(p), **rows, "total_hours": sum(rows.values()),
            "left_out": "data rendering, identity encoders, autoencoder, latent cache, splatting, decoding, checks"}


def report(profile_name: str) -> dict:
    """Everything ``python -m spinmeround_lite.memory --profile NAME`` reports; the profile is resolved here, once."""
    p = get_profile(profile_name)
    out = {"command": f"python -m spinmeround_lite.memory --profile {profile_name}", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "training_step": training_step_memory(p),
           "spin_round": spin_round_memory(p), "flops": flops_counts(p)}
    if p.name == "colab":
        out["t4"] = dict(T4, estimate={u: gpu_time_estimate(p, out["flops"], T4["fp16_tensor_tflops"], u)
                                       for u in (0.15, 0.25, 0.35)})
    return out


def format_report(r: dict) -> str:
    t, s = r["training_step"], r["spin_round"]
    lines = [f"memory of profile {t['profile']} (`{r['command']}`)", "", "| part | GiB |", "| --- | --- |"]
    lines += [f"| training step: {k} | {v:.3f} |" for k, v in t["parts_gib"].items()]
    lines.append(f"| **training step, total** (batch {t['batch']} x {t['views']} views, {t['latent_res']}^2 "
                 f"latents, {t['params'] / 1e6:.1f} M parameters) | **{t['total_gib']:.2f}** |")
    lines += [f"| spin round: {k} | {v:.3f} |" for k, v in s["parts_gib"].items()]
    lines.append(f"| **spin round, total** ({s['views_per_call']} views x 2 CFG branches) | **{s['total_gib']:.2f}** |")
    if "t4" in r:
        f = r["flops"]
        lines += ["", f"T4 wall time on paper: training step {f['train_step_flops'] / 1e12:.2f} TFLOP, denoiser call "
                      f"{f['denoiser_call_flops_8_views_cfg'] / 1e9:.0f} GFLOP; fp16 tensor peak "
                      f"{r['t4']['fp16_tensor_tflops']:.0f} TFLOP/s", "",
                  "| utilisation | training (h) | ablations (h) | spins (h) | total (h) |",
                  "| --- | --- | --- | --- | --- |"]
        for u, e in r["t4"]["estimate"].items():
            lines.append(f"| {float(u):.0%} | {e['training_hours']:.2f} | {e['ablation_training_hours']:.2f} | "
                         f"{e['spins_hours']:.2f} | {e['total_hours']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="colab")
    ap.add_argument("--out", default=None, help="folder for memory.json and memory.md")
    a = ap.parse_args(argv)
    r = report(a.profile)
    text = format_report(r)
    print(text)
    if a.out:
        write_json(Path(a.out) / "memory.json", r)
        (Path(a.out) / "memory.md").write_text(text + "\n")
        print(f"\nwritten: {Path(a.out) / 'memory.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
