"""The colab profile's measured GPU memory (results/colab/memory.json) against the T4's 13 GB budget, that the
measure is of the profile as it is now, and the saved-tensor meter itself."""

import json
from pathlib import Path

import torch

from spinmeround_lite import memory
from spinmeround_lite.model import SpinModel
from spinmeround_lite.profiles import get_profile

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "results" / "colab" / "memory.json"
BUDGET_GIB = 13.0


def test_colab_profile_fits_13_gb_as_measured():
    r = json.loads(RESULT.read_text())
    p = get_profile("colab")
    t = r["training_step"]
    # the file measures the profile as it is: rerun `python -m spinmeround_lite.memory --profile colab
    # --out results/colab` after changing its sizes
    assert (t["batch"], t["views"], t["latent_res"], t["resolution"], t["mixed_precision"]) == \
        (p.batch_size, p.views_per_sample, p.latent_res, p.resolution, p.mixed_precision)
    assert t["params"] == sum(q.numel() for q in SpinModel.from_profile(p, pretrained=False).parameters())
    assert r["spin_round"]["views_per_call"] == max(3 + p.spin_per_round, 8)
    assert t["total_gib"] < BUDGET_GIB, t["parts_gib"]
    assert r["spin_round"]["total_gib"] < BUDGET_GIB
    assert sum(t["parts_gib"].values()) == pytest_approx(t["total_gib"])
    b = t["measured_batches"]                    # activations linear in the batch: 2 samples about twice 1
    assert 1.6 < b["2"]["activation_bytes"] / b["1"]["activation_bytes"] < 2.05
    assert r["t4"]["estimate"]["0.25"]["total_hours"] > 0


def pytest_approx(x):
    import pytest
    return pytest.approx(x, rel=1e-9)


def test_saved_tensor_meter_counts_each_storage_once_and_leaves_out_parameters():
    w = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(16, 64)
    with memory.SavedTensorMeter(exclude=[w]) as m:
        h = x @ w                  # saves x (the parameter w is left out)
        y = (h * h).sum()          # saves h once, though it is both operands
    assert m.bytes == x.numel() * 4 + h.numel() * 4 and m.count == 2
    y.backward()


def test_activations_grow_linearly_with_the_batch():
    p = get_profile("test")
    model = SpinModel.from_profile(p, pretrained=False).train()
    a1, _ = memory.activation_bytes(model, p, 1, 32)
    a2, _ = memory.activation_bytes(model, p, 2, 32)
    a16, _ = memory.activation_bytes(model, p, 1, 16)
    assert a1 > 0 and 1.6 < a2 / a1 < 2.05
    assert a16 < a1                              # 16-bit autocast keeps smaller activations
