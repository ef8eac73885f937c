"""tools/device_check.py at the test profile on the CPU: every step runs and writes every field; what needs a CUDA
GPU says so instead of a number."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_CPU = "not measured on CPU"


def test_device_check_writes_every_field(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine the check runs the gpu profile (minutes): run it by hand")
    out = tmp_path / "dc"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "device_check.py"), "--out", str(out),
                        "--identities", "6", "--quiet"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((out / "device_check.json").read_text())
    assert d["profile"] == "test" and d["overrides"]["identities"] == 6
    v = d["versions"]
    assert v["torch"] == torch.__version__ and v["python"]
    for k in ("cuda", "cudnn", "driver", "compute_capability", "memory_gib"):
        assert v[k] == NOT_ON_CPU, k
    t = d["training"]
    assert t["steps"] == 4 and t["samples_per_s_with_first_step"] > 0 and t["final_loss"] > 0
    st = t["steady"]
    assert st["samples_per_s"] > 0 and st["flops_per_step"] > 1e6 and st["achieved_tflops"] > 0
    assert st["mixed_precision"] == "no" and len(st["step_seconds_all"]) == 5
    for k in ("peak_memory_gib", "bf16_peak_tflops", "fraction_of_bf16_peak", "matmul_peak_tflops",
              "fraction_of_matmul_peak"):
        assert t[k] == NOT_ON_CPU, k
    s = d["spin"]
    assert s["views"] == 48 and s["seconds"] > 0 and s["network_calls"] > 0
    assert s["view_evaluations"] >= s["network_calls"]
    g = d["splat"]
    assert g["fit_backend"] == "torch" and g["gaussians"] > 0 and g["torch_render_seconds"] > 0
    # fitted to true renders: well above a flat grey guess (about 10 dB on these heads) even in 60 steps
    assert g["psnr_fitted_views"] > 15 and g["psnr_heldout_views"] > 12, g
    for k in ("gsplat_render_seconds", "max_abs_diff_image", "max_abs_diff_alpha", "gsplat_speedup"):
        assert g[k] == NOT_ON_CPU, k
    for k in ("data", "identity_encoder", "autoencoder", "latent_cache", "training_burst", "training_steady",
              "spin", "splat"):
        assert d["stage_seconds"][k] > 0, k
    assert d["total_seconds"] >= sum(d["stage_seconds"].values()) * 0.99
    md = (out / "device_check.md").read_text()
    assert "48-view spin" in md and NOT_ON_CPU in md


def test_bf16_peak_names_the_source():
    sys.path.insert(0, str(ROOT / "tools"))
    import device_check as dc
    assert dc.bf16_peak("NVIDIA H200")[0] == 989.0
    assert dc.bf16_peak("NVIDIA H100 PCIe")[0] == 756.0
    assert dc.bf16_peak("Tesla T4") == (None, "T4 has no bf16 tensor cores")
    assert dc.bf16_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert dc.bf16_peak("Some Future GPU")[0] is None
