"""One prepared check of a CUDA GPU: the course's `gpu` profile, measured in a few minutes, written to one file.

    python tools/device_check.py --out results/gpu          # on a CUDA GPU: the gpu profile (sized for < 8 min)
    python tools/device_check.py --out /tmp/dc --profile test   # anywhere: the same steps at test size (CPU)

Steps, each timed (``stage_seconds``), in a run folder ``<out>/run`` built afresh:

1. versions: torch, CUDA, cuDNN, the NVIDIA driver, gsplat, the device;
2. data: a few procedural identities at the profile's resolution and rig (``identities`` cut, see
   ``check_overrides``), a short identity encoder and autoencoder, the latent cache;
3. training burst: the course's trainer (``train.train``, accelerate, the profile's mixed precision) for
   ``burst_steps`` steps at the profile's model, batch and views; then the steady state of the same step timed
   alone: samples/s, FLOPs per step (``torch.utils.flop_counter``), achieved TFLOP/s, the fraction of the
   device's dense bf16 peak (vendor figure, ``BF16_PEAK_TFLOPS``) and of the measured matmul peak; peak memory;
4. one 48-view spin (steps A, B, C) with the burst's model: seconds, denoiser calls (network calls; with CFG
   each call evaluates the conditional and unconditional branch), view evaluations;
5. splatting: Gaussians fitted to a held-out identity's true views (PSNR on the fitted views and on the views
   left out), then the fitted Gaussians rendered by gsplat's CUDA rasterizer and by the course's PyTorch
   renderer from the same cameras: max abs difference and both timings.

Everything is written to ``<out>/device_check.json`` (and a short table to ``device_check.md``). A measure that
needs a CUDA GPU is the string ``"not measured on CPU"`` there, never a number made up. The burst's model has
trained for a few steps only: its spin's images are noise; only its timings and calls count.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spinmeround_lite import bench  # noqa: E402
from spinmeround_lite.profiles import get_profile  # noqa: E402
from spinmeround_lite.runs import Run, clean_figure, write_json  # noqa: E402

NOT_ON_CPU = "not measured on CPU"

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; matched against the device
# name, longest key first. A device missing here gets no fraction (None, with the reason); the measured matmul
# peak is a second denominator that needs no table.
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "GH200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0,
    "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "B200": 2250.0,
    "T4": None, "V100": None,                     # no bf16 tensor cores (T4: fp16 65, V100: fp16 125)
}


def bf16_peak(name: str) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, where it comes from) for a CUDA device name."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            v = BF16_PEAK_TFLOPS[key]
            return v, (f"vendor datasheet, {key}, dense" if v else f"{key} has no bf16 tensor cores")
    return None, f"no datasheet figure for {name!r} in tools/device_check.py BF16_PEAK_TFLOPS"


def check_overrides(profile_name: str, burst_steps: int, identities: int) -> dict:
    """The check's cuts of a profile: few identities, short encoder and autoencoder training, one burst."""
    p = get_profile(profile_name)
    return {"identities": min(p.identities, identities), "heldout_identities": min(p.heldout_identities, 2),
            "extra_train_identities": 0, "extra_heldout_identities": 0,
            "id_train_steps": min(p.id_train_steps, 30), "vae_steps": min(p.vae_steps, 30),
            "vae_decoder_steps": 0, "train_steps": burst_steps, "checkpoint_every": burst_steps,
            "sample_every": 0, "use_reference": False}


def versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "device": bench.device_name(device), "cuda_available": torch.cuda.is_available()}
    try:
        import gsplat
        out["gsplat"] = getattr(gsplat, "__version__", "installed")
    except Exception as e:                                   # absent, or its CUDA extension failed to load
        out["gsplat"] = f"absent ({type(e).__name__}: {e})"[:200]
    if device.type != "cuda":
        out.update(cuda=NOT_ON_CPU, cudnn=NOT_ON_CPU, driver=NOT_ON_CPU, compute_capability=NOT_ON_CPU,
                   memory_gib=NOT_ON_CPU)
        return out
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version()
    out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    out["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else \
            f"unknown (nvidia-smi exit {r.returncode})"
    except (OSError, subprocess.TimeoutExpired) as e:
        out["driver"] = f"unknown (nvidia-smi: {type(e).__name__})"
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steady_training(run: Run, device: torch.device, steps: int = 5, warmup: int = 2) -> dict:
    """The profile's training step (forward, backward, AdamW, its mixed precision) on real batches, timed alone."""
    from spinmeround_lite import train as T
    from spinmeround_lite.model import SpinModel

    p = run.profile
    data = T.TrainData(run, progress=False)
    model = SpinModel.from_profile(p).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr)
    mp = T.mixed_precision(p, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")
    batches = [data.batch(step, 0, 0, 2) for step in range(warmup + steps)]
    flops = bench.train_step_flops(model, batches[0], device)

    def step(b):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = T.training_loss(model, b, device)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    times = []
    for i, b in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        step(b)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    return {"batch": p.batch_size, "views": p.views_per_sample, "latent_res": p.latent_res,
            "mixed_precision": mp, "params": sum(q.numel() for q in model.parameters()),
            "step_seconds_median": t, "step_seconds_all": times, "samples_per_s": p.batch_size / t,
            "flops_per_step": flops, "achieved_tflops": flops / t / 1e12}


def fit_and_compare(run: Run, device: torch.device) -> dict:
    """Gaussians fitted to a held-out identity's views; then gsplat vs the PyTorch renderer on them."""
    from spinmeround_lite import splat
    from spinmeround_lite.dataset import HeadDataset, ensure_dataset

    p = run.profile
    ds = HeadDataset(ensure_dataset(run), split="heldout")
    n = min(p.views_per_identity, 48)
    idx = torch.linspace(0, p.views_per_identity - 1, n).round().long().unique().tolist()
    views = ds.views(0, idx)
    iters = min(p.splat_iters, 500)
    res = splat.consistency_score(views, iters=iters, n_init=p.splat_init_gaussians, res=p.splat_res,
                                  device=device, seed=run.seed, progress=False)
    out = {"identity": ds.ids[0], "views": len(idx), "res": p.splat_res, "iters": iters,
           "gaussians": len(res.scene), "psnr_fitted_views": res.psnr_train, "psnr_heldout_views": res.psnr_heldout,
           "fit_seconds": res.fit_seconds, "fit_backend": res.backend}
    scene = res.scene.to(device)
    sv = splat.resize_views(views, p.splat_res)
    from spinmeround_lite.cameras import w2c_from_c2w
    viewmats, Ks = w2c_from_c2w(sv["c2w"]).to(device), sv["K"].to(device)
    R = p.splat_res

    def render(backend):
        _sync(device)
        t0 = time.perf_counter()
        img, alpha = scene.render(viewmats, Ks, R, R, backend=backend)
        _sync(device)
        return img, alpha, time.perf_counter() - t0

    render("torch")                                                   # warm-up
    img_t, al_t, t_torch = render("torch")
    out.update(compare_cameras=int(viewmats.shape[0]), torch_render_seconds=t_torch)
    if device.type == "cuda" and splat.gsplat_available():
        render("gsplat")
        img_g, al_g, t_g = render("gsplat")
        out.update(gsplat_render_seconds=t_g, gsplat_speedup=t_torch / t_g,
                   max_abs_diff_image=float((img_g - img_t).abs().max()),
                   mean_abs_diff_image=float((img_g - img_t).abs().mean()),
                   max_abs_diff_alpha=float((al_g - al_t).abs().max()))
    else:
        why = NOT_ON_CPU if device.type != "cuda" else "gsplat not installed (pip install -e '.[gpu]')"
        out.update(gsplat_render_seconds=why, gsplat_speedup=why, max_abs_diff_image=why,
                   mean_abs_diff_image=why, max_abs_diff_alpha=why)
    return out


def device_check(out: str | os.PathLike, profile: str | None = None, device: str | None = None,
                 burst_steps: int | None = None, identities: int = 16, spin_views: int = 48,
                 progress: bool = True) -> dict:
    """Run every step; write ``<out>/device_check.json`` after each (an interrupted check keeps what it
    measured) and return the result."""
    from spinmeround_lite import train as T
    from spinmeround_lite.dataset import ensure_dataset
    from spinmeround_lite.identity import ensure_encoder
    from spinmeround_lite.latents import ensure_latent_cache, ensure_vae
    from spinmeround_lite.spinning import SpinParts, heldout_input, spin

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = profile or ("gpu" if dev.type == "cuda" else "test")
    burst = burst_steps or (40 if dev.type == "cuda" else 4)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    overrides = check_overrides(name, burst, identities)
    run = Run.open(name, str(run_dir), notebook="device_check", seed=0, device=str(dev), overrides=overrides)
    t_all = time.perf_counter()
    res: dict = {"profile": name, "overrides": overrides, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                 "command": "python tools/device_check.py " + " ".join(sys.argv[1:]) if __name__ == "__main__"
                 else f"device_check(profile={name!r})", "versions": versions(dev), "stage_seconds": {}}
    path = out / "device_check.json"

    def stage(key, fn):
        if progress:
            print(f"[device check] {key} ...", flush=True)
        t0 = time.perf_counter()
        value = fn()
        res["stage_seconds"][key] = time.perf_counter() - t0
        res["total_seconds"] = time.perf_counter() - t_all
        write_json(path, clean_figure(res))
        if progress:
            print(f"[device check] {key}: {res['stage_seconds'][key]:.1f} s", flush=True)
        return value

    P = run.profile
    stage("data", lambda: ensure_dataset(run))
    res["data"] = {"identities": P.identities, "views_per_identity": P.views_per_identity,
                   "resolution": P.resolution, "render_seconds": res["stage_seconds"]["data"]}
    stage("identity_encoder", lambda: ensure_encoder(run, "cond", progress=False))
    stage("autoencoder", lambda: ensure_vae(run, progress=False))
    stage("latent_cache", lambda: ensure_latent_cache(run, progress=False))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    tr = stage("training_burst", lambda: T.train(run, progress=progress, grids=False))
    burst_res = {"steps": tr.steps_this_call, "seconds": tr.seconds, "samples_per_s_with_first_step": tr.samples_per_s,
                 "final_loss": tr.final_loss, "mixed_precision": tr.mixed_precision,
                 "peak_memory_gib": (torch.cuda.max_memory_allocated(dev) / 2 ** 30) if dev.type == "cuda"
                 else NOT_ON_CPU}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    steady = stage("training_steady", lambda: steady_training(run, dev))
    burst_res["steady"] = steady
    if dev.type == "cuda":
        peak, src = bf16_peak(torch.cuda.get_device_name(dev))
        mm = bench.matmul_peak(dev, bench.compute_dtype(dev))
        burst_res.update(bf16_peak_tflops=peak, bf16_peak_source=src,
                         fraction_of_bf16_peak=(steady["achieved_tflops"] / peak) if peak else None,
                         matmul_peak_tflops=mm["flops_per_s"] / 1e12, matmul_peak_dtype=mm["dtype"],
                         fraction_of_matmul_peak=steady["achieved_tflops"] * 1e12 / mm["flops_per_s"])
    else:
        burst_res.update(bf16_peak_tflops=NOT_ON_CPU, bf16_peak_source=NOT_ON_CPU, fraction_of_bf16_peak=NOT_ON_CPU,
                         matmul_peak_tflops=NOT_ON_CPU, fraction_of_matmul_peak=NOT_ON_CPU)
    res["training"] = burst_res

    def do_spin():
        parts = SpinParts.from_run(run, progress=False)
        inp = heldout_input(run)
        _sync(dev)
        t0 = time.perf_counter()
        r = spin(inp["image"], n_views=spin_views, parts=parts, align=False, input_yaw=inp["yaw"], progress=False)
        _sync(dev)
        seconds = time.perf_counter() - t0
        work = r.info["network"]                                  # counted by spin itself (sampling.NetworkCounter)
        return {"views": int(r.views.shape[0]), "seconds": seconds, "network_calls": work["total"]["calls"],
                "view_evaluations": work["total"]["view_evaluations"],
                "per_step": {k: v for k, v in work.items() if k != "total"}, "sample_steps": P.sample_steps,
                "cfg_scale": P.cfg_scale, "note": "network calls counted on the UNet's forward; a guided step is "
                                                  "two calls"}
    res["spin"] = stage("spin", do_spin)
    res["splat"] = stage("splat", lambda: fit_and_compare(run, dev))
    res["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    res["total_seconds"] = time.perf_counter() - t_all
    write_json(path, clean_figure(res))
    (out / "device_check.md").write_text(format_table(res) + "\n")
    return res


def _f(x, unit=""):
    """A number to 3 digits with its unit; a string (``not measured on CPU``, a reason) as it is."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:.3g}{unit}"
    return str(x)


def format_table(r: dict) -> str:
    v, t, s, g = r["versions"], r["training"], r["spin"], r["splat"]
    st = t["steady"]
    rows = [
        ("device", f"{v['device']}; torch {v['torch']}, CUDA {v['cuda']}, driver {v['driver']}, gsplat {v['gsplat']}"),
        ("data", f"{r['data']['identities']} identities x {r['data']['views_per_identity']} views at "
                 f"{r['data']['resolution']} px in {_f(r['stage_seconds']['data'], ' s')}"),
        ("training (steady)", f"batch {st['batch']} x {st['views']} views, {st['latent_res']}^2 latents, "
                              f"{st['mixed_precision']}: {_f(st['samples_per_s'])} samples/s, "
                              f"{_f(st['achieved_tflops'], ' TFLOP/s')}"),
        ("fraction of bf16 peak", f"{_f(t['fraction_of_bf16_peak'])} (peak {_f(t['bf16_peak_tflops'], ' TFLOP/s')})"),
        ("fraction of measured matmul peak", _f(t["fraction_of_matmul_peak"])),
        ("peak memory (trainer)", _f(t["peak_memory_gib"], " GiB")),
        (f"{s['views']}-view spin", f"{_f(s['seconds'], ' s')}, {s['network_calls']} network calls"),
        ("splat fit", f"PSNR {_f(g['psnr_fitted_views'])} dB fitted views, {_f(g['psnr_heldout_views'])} dB "
                      f"held out ({g['fit_backend']}, {g['gaussians']} Gaussians)"),
        ("gsplat vs torch renderer", f"max abs diff {_f(g['max_abs_diff_image'])}; gsplat "
                                     f"{_f(g['gsplat_render_seconds'], ' s')}, "
                                     f"torch {_f(g['torch_render_seconds'], ' s')}"),
        ("total", _f(r["total_seconds"], " s")),
    ]
    return "\n".join([f"device check, profile {r['profile']}", "", "| measure | value |", "| --- | --- |"]
                     + [f"| {a} | {b} |" for a, b in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/device_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for device_check.json (results/gpu/ on a GPU)")
    ap.add_argument("--profile", default=None, help="gpu on CUDA (default there), test on a CPU (default there)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    ap.add_argument("--burst-steps", type=int, default=None, help="trainer steps of the burst (40 on CUDA, 4 on CPU)")
    ap.add_argument("--identities", type=int, default=16, help="procedural identities to build (default 16)")
    ap.add_argument("--spin-views", type=int, default=48, help="views of the spin (default 48)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    r = device_check(a.out, a.profile, a.device, a.burst_steps, a.identities, a.spin_views, progress=not a.quiet)
    print(format_table(r))
    print(f"\nwritten: {Path(a.out) / 'device_check.json'}")
    print(json.dumps({"total_seconds": round(r["total_seconds"], 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
