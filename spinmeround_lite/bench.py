"""Benchmarks of the course's hot paths, side by side in one run, printed as a table.

    python -m spinmeround_lite.bench [--profile cpu|gpu] [--out results/<device>/] [--paper]

Rows: the device's measured matmul peak; training samples/s and model FLOPs utilisation (MFU) against that peak;
a 48-view spin's wall time, network calls and view evaluations (the profile's Euler spin and the fast one, in the same
process); fused vs naive 3D attention (time, peak memory) across view
counts; the PyTorch splatting renderer vs gsplat; procedural render views/s. On a CUDA machine ``--paper`` also
builds the paper's model (SD1.5-shaped UNet, 8 views, 64x64 latents, 153 input channels) with random weights,
finds the largest batch that fits, and turns a training step's time into GPU-days for the paper's 1.6M iterations.
Rows that need what this machine lacks say ``absent`` and why.

Every model here has random weights: speed does not depend on what was learned, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch

from .profiles import get_profile
from .runs import write_json

PAPER_ITERATIONS = 1_600_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA devices that support it, else float32 (the training dtype the profile's "auto" picks)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """Measured dense matmul throughput (FLOP/s): the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 5
    t = _median_time(lambda: [a @ b for _ in range(reps)], device, repeats=3)
    return {"flops_per_s": 2 * n ** 3 * reps / t, "n": n, "dtype": str(dtype).replace("torch.", "")}


def random_batch(profile, batch: int, device: torch.device, n_cond: int = 1) -> dict:
    """A training batch of the right shapes (random latents and rays; one conditioning view per sample)."""
    V, h = profile.views_per_sample, profile.latent_res
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, V, dtype=torch.bool)
    mask[:, :n_cond] = True
    return {"x0": torch.randn(batch, V, 8, h, h, generator=g), "noise": torch.randn(batch, V, 8, h, h, generator=g),
            "sigma": torch.exp(torch.randn(batch, generator=g) - 0.2), "mask": mask,
            "drop": torch.zeros(batch, dtype=torch.bool), "rays": torch.randn(batch, V, 144, h, h, generator=g),
            "id_emb": torch.nn.functional.normalize(torch.randn(batch, 512, generator=g), dim=-1)}


def train_step_flops(model, batch: dict, device: torch.device) -> float:
    """FLOPs of one forward + backward, counted by ``torch.utils.flop_counter`` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .train import training_loss

    counter = FlopCounterMode(display=False)
    with counter:
        training_loss(model, batch, device).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def training_speed(profile, device: torch.device, batch: int | None = None, steps: int = 3,
                   peak: float | None = None) -> dict:
    """Samples/s of full training steps (forward, backward, AdamW) and their MFU against ``peak``."""
    from .model import SpinModel
    from .train import training_loss

    batch = batch or profile.batch_size
    model = SpinModel.from_profile(profile, pretrained=False).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = random_batch(profile, batch, device)
    dtype = compute_dtype(device)
    flops = train_step_flops(model, data, device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = training_loss(model, data, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = _median_time(step, device, repeats=steps)
    out = {"batch": batch, "views": profile.views_per_sample, "latent_res": profile.latent_res,
           "step_seconds": t, "samples_per_s": batch / t, "flops_per_step": flops,
           "params": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", "")}
    if peak:
        out["mfu"] = flops / t / peak
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out


class _RandomCodec:
    """A stand-in autoencoder of the right shapes (speed only): average-pool down, nearest up."""

    def __init__(self, profile, device):
        self.f, self.device = profile.latent_factor, device

    def encode(self, img):
        z = torch.nn.functional.avg_pool2d(img, self.f)
        return torch.cat([z, z[:, :1]], 1)

    def decode(self, z):
        return torch.nn.functional.interpolate(z[:, :3].clamp(0, 1), scale_factor=self.f)


class _RandomEncoder:
    def embed(self, img):
        return torch.nn.functional.normalize(img.flatten(1)[:, :512].float(), dim=-1)


def spin_speed(profile, device: torch.device, n_views: int = 48, sampler: str = "euler",
               steps: int | None = None) -> dict:
    """Wall time, network calls and view evaluations of a ``n_views`` spin (random weights).

    ``sampler``/``steps`` as ``spin`` takes them (default: Euler with the profile's steps and CFG); ``student``
    times the same network as a student of ``steps`` steps (default 4) with guidance folded in (its weights do not
    change the time). The counts come from ``spin``'s own ``sampling.NetworkCounter`` (per step A, B, C and in
    total); ``seconds_network`` is the time spent inside the network's forward, the rest (``seconds_other``) is the
    autoencoder, identity encoder, ray maps and the sampler's own arithmetic.
    """
    from .model import SpinModel
    from .spinning import SpinParts, spin

    model = SpinModel.from_profile(profile, pretrained=False).to(device).eval()
    student = None
    if sampler == "student":
        from .distill import as_student
        student = as_student(SpinModel.from_profile(profile, pretrained=False).to(device).eval(), profile,
                             steps or 4)
        steps = None
    parts = SpinParts(model, _RandomCodec(profile, device), _RandomEncoder(), profile, "random", student,
                      "random" if student is not None else "")
    net = (student or model).unet
    spent = {"t": 0.0}

    def pre(*_):
        _sync(device)
        spent["t0"] = time.perf_counter()

    def post(*_):
        _sync(device)
        spent["t"] += time.perf_counter() - spent["t0"]

    img = torch.ones(3, profile.resolution, profile.resolution)
    dtype = compute_dtype(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        spin(img, n_views=n_views, parts=parts, align=False, progress=False, sampler=sampler, steps=steps)  # warm-up
        handles = [net.register_forward_pre_hook(pre), net.register_forward_hook(post)]
        _sync(device)
        t0 = time.perf_counter()
        res = spin(img, n_views=n_views, parts=parts, align=False, progress=False, sampler=sampler, steps=steps)
        _sync(device)
        seconds = time.perf_counter() - t0
        for h in handles:
            h.remove()
    net_counts = res.info["network"]
    return {"views": n_views, "sampler": res.info["sampler"], "steps": res.info["steps"], "seconds": seconds,
            "seconds_network": spent["t"], "seconds_other": seconds - spent["t"],
            "network_calls": net_counts["total"]["calls"],
            "view_evaluations": net_counts["total"]["view_evaluations"],
            "per_step": {k: v for k, v in net_counts.items() if k != "total"}}


def spin_rows(profile, device: torch.device, n_views: int = 48,
              fast: tuple[str, int] = ("student", 4)) -> dict:
    """The 20-step (profile's) Euler spin and the recommended fast spin, in the same process, and their ratios."""
    slow = spin_speed(profile, device, n_views)
    quick = spin_speed(profile, device, n_views, sampler=fast[0], steps=fast[1])
    return {"euler": slow, "fast": quick, "speedup": slow["seconds"] / quick["seconds"],
            "view_evaluation_ratio": quick["view_evaluations"] / slow["view_evaluations"]}


def attention_rows(device: torch.device, views=(1, 2, 4, 8), latent_res: int = 32, heads: int = 4,
                   head_dim: int = 32) -> list[dict]:
    """Fused ``scaled_dot_product_attention`` vs naive softmax(QK^T)V over V x latent_res^2 tokens."""
    from .mvunet import benchmark_attention

    dtype = compute_dtype(device)
    rows = []
    for v in views:
        tokens = v * latent_res * latent_res
        f = benchmark_attention(tokens, heads, head_dim, device=device, dtype=dtype, naive=False)
        n = benchmark_attention(tokens, heads, head_dim, device=device, dtype=dtype, naive=True)
        rows.append({"views": v, "tokens": tokens, "fused_s": f["seconds"], "naive_s": n["seconds"],
                     "speedup": n["seconds"] / f["seconds"], "fused_bytes": f["peak_bytes"],
                     "naive_bytes": n["peak_bytes"], "memory_ratio": n["peak_bytes"] / max(f["peak_bytes"], 1),
                     "memory_method": f["memory_method"]})
    return rows


def splat_rows(device: torch.device, n: int = 20000, res: int = 128) -> dict:
    """The PyTorch splatting renderer vs gsplat on one scene of ``n`` Gaussians."""
    from . import cameras, splat

    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, 3, generator=g) * 0.12
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.01 + 0.003
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    cols = torch.rand(n, 3, generator=g)
    viewmats = cameras.w2c_from_c2w(cameras.orbit_c2w(torch.tensor([0.0]), torch.tensor([0.0])))
    Ks = cameras.intrinsics(res)[None]
    args = [t.to(device) for t in (means, quats, scales, opac, cols, viewmats, Ks)]
    out = {"gaussians": n, "res": res}
    t = _median_time(lambda: splat.rasterize(*args, res, res, backend="torch"), device, repeats=2)
    out["torch_s"] = t
    if device.type == "cuda" and splat.gsplat_available():
        out["gsplat_s"] = _median_time(lambda: splat.rasterize(*args, res, res, backend="gsplat"), device)
        out["speedup"] = out["torch_s"] / out["gsplat_s"]
    else:
        out["gsplat_s"] = None
        out["gsplat_absent"] = "needs CUDA and the gsplat package" if device.type != "cuda" else "gsplat not installed"
    return out


def render_row(device: torch.device, res: int = 64, views: int = 16) -> dict:
    from . import heads, render

    params = heads.sample_identity(0)
    return {"res": res, "views_per_s": render.benchmark(params, resolution=res, views=views, device=device)}


def paper_cost(device: torch.device, n_views: int = 48, max_batch: int = 64) -> dict:
    """The paper's model with random weights: largest batch that fits, step time, memory, and the 1.6M-step cost."""
    if device.type != "cuda":
        return {"absent": "needs a CUDA GPU (the SD1.5-shaped UNet at 64x64 latents x 8 views)"}
    profile = get_profile("paper").replace(unet_pretrained="", vae_pretrained="")
    best = None
    b = 1
    while b <= max_batch:
        try:
            r = training_speed(profile, device, batch=b, steps=2)
            best = r
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best is None:
        return {"absent": "not even batch 1 fits"}
    # the paper's batch is unknown in iterations; report per-sample throughput and the cost at that batch
    step_s = best["step_seconds"]
    gpu_days_1gpu = PAPER_ITERATIONS * step_s / 86400
    s = spin_speed(profile, device, n_views=n_views)
    return {"batch": best["batch"], "step_seconds": step_s, "samples_per_s": best["samples_per_s"],
            "peak_memory_gib": best.get("peak_memory_gib"), "mfu": best.get("mfu"), "params": best["params"],
            "gpu_days_1.6M_steps_at_this_batch": gpu_days_1gpu,
            "note": "with accelerate launch on G GPUs (data parallel, per-GPU batch as measured) the wall time "
                    "divides by about G while GPU-days stay the same",
            "spin48_seconds": s["seconds"], "spin48_view_evaluations": s["view_evaluations"]}


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
def run_bench(profile_name: str | None = None, device: str | None = None, paper: bool = False,
              rows: tuple[str, ...] = ("peak", "train", "spin", "attention", "splat", "render")) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    profile = get_profile(profile_name or ("gpu" if dev.type == "cuda" else "cpu"))
    res: dict = {"device": device_name(dev), "profile": profile.name, "torch": torch.__version__}
    if "peak" in rows:
        res["matmul_peak"] = matmul_peak(dev, compute_dtype(dev))
    if "train" in rows:
        res["training"] = training_speed(profile, dev, peak=res.get("matmul_peak", {}).get("flops_per_s"))
    if "spin" in rows:
        res["spin"] = spin_rows(profile, dev, n_views=48)
    if "attention" in rows:
        res["attention"] = attention_rows(dev)
    if "splat" in rows:
        res["splat"] = splat_rows(dev)
    if "render" in rows:
        res["render"] = render_row(dev)
    res["paper"] = paper_cost(dev) if paper else {"absent": "run with --paper on a CUDA GPU"}
    return res


def format_table(r: dict) -> str:
    def f(x, nd=3):
        if x is None:
            return "absent"
        if isinstance(x, float):
            if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
                return f"{x:.3g}"
            return f"{x:.{nd}f}"
        return str(x)

    lines = [f"benchmark: {r['device']}, profile {r['profile']}, torch {r['torch']}", "",
             "| measure | value |", "| --- | --- |"]
    if "matmul_peak" in r:
        m = r["matmul_peak"]
        lines.append(f"| matmul peak ({m['dtype']}, n={m['n']}) | {m['flops_per_s'] / 1e12:.2f} TFLOP/s |")
    if "training" in r:
        t = r["training"]
        lines.append(f"| training samples/s (batch {t['batch']} x {t['views']} views, {t['latent_res']}^2 latents, "
                     f"{t['dtype']}) | {f(t['samples_per_s'])} |")
        lines.append(f"| training step | {f(t['step_seconds'])} s, {t['flops_per_step'] / 1e9:.1f} GFLOP |")
        if "mfu" in t:
            lines.append(f"| training MFU vs measured peak | {100 * t['mfu']:.1f} % |")
    if "spin" in r:
        sp = r["spin"]
        for s in (sp["euler"], sp["fast"]):
            per = ", ".join(f"{k} {v['calls']}/{v['view_evaluations']}" for k, v in s["per_step"].items())
            lines.append(f"| {s['views']}-view spin, {s['sampler']} {s['steps']} steps | {f(s['seconds'])} s "
                         f"(network {f(s['seconds_network'])} s, rest {f(s['seconds_other'])} s), "
                         f"{s['network_calls']} network calls, {s['view_evaluations']} view evaluations "
                         f"(calls/views per step: {per}) |")
        lines.append(f"| fast spin against the {sp['euler']['steps']}-step spin | {sp['speedup']:.1f}x faster, "
                     f"{100 * sp['view_evaluation_ratio']:.1f} % of the view evaluations |")
    for a in r.get("attention", []):
        lines.append(f"| attention {a['views']} views x {a['tokens'] // a['views']} tokens: fused / naive | "
                     f"{f(a['fused_s'] * 1e3)} ms / {f(a['naive_s'] * 1e3)} ms ({a['speedup']:.1f}x), memory "
                     f"{a['fused_bytes'] / 2 ** 20:.1f} / {a['naive_bytes'] / 2 ** 20:.1f} MiB "
                     f"({a['memory_ratio']:.0f}x, {a['memory_method'].split(' ')[0]}) |")
    if "splat" in r:
        s = r["splat"]
        g = f"{f(s['gsplat_s'] * 1e3)} ms" if s.get("gsplat_s") else f"absent ({s.get('gsplat_absent')})"
        lines.append(f"| splatting {s['gaussians']} Gaussians at {s['res']} px: torch / gsplat | "
                     f"{f(s['torch_s'] * 1e3)} ms / {g} |")
    if "render" in r:
        lines.append(f"| procedural render at {r['render']['res']} px | {f(r['render']['views_per_s'], 1)} views/s |")
    p = r.get("paper", {})
    if "absent" in p:
        lines.append(f"| paper model (SD1.5-shaped, 8 x 64^2) | absent: {p['absent']} |")
    else:
        lines.append(f"| paper model: largest batch, step, memory | {p['batch']}, {f(p['step_seconds'])} s, "
                     f"{f(p['peak_memory_gib'], 1)} GiB, MFU {100 * (p['mfu'] or math.nan):.1f} % |")
        lines.append(f"| paper: 1.6M steps at that batch | {p['gpu_days_1.6M_steps_at_this_batch']:.1f} GPU-days |")
        lines.append(f"| paper: 48-view spin | {f(p['spin48_seconds'])} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="model sizes to time (default: gpu on CUDA, else cpu)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--paper", action="store_true", help="also time the paper-scale model (CUDA only)")
    ap.add_argument("--out", default=None, help="folder for bench.json and bench.md")
    ap.add_argument("--rows", nargs="+", default=["peak", "train", "spin", "attention", "splat", "render"],
                    help="which rows to measure")
    args = ap.parse_args(argv)
    r = run_bench(args.profile, args.device, args.paper, tuple(args.rows))
    table = format_table(r)
    print(table)
    if args.out:
        out = Path(args.out)
        write_json(out / "bench.json", r)
        (out / "bench.md").write_text(table + "\n")
        print(f"\nwritten: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
