"""The committed reference checkpoints load with the profile they were made for, and say where they came from."""

import json
from pathlib import Path

import pytest
import torch

from spinmeround_lite.runs import Run

REF = Path(__file__).resolve().parents[1] / "reference" / "cpu"


@pytest.mark.skipif(not (REF / "manifest.json").exists(), reason="no reference checkpoints in this checkout")
def test_cpu_reference_loads_and_has_a_manifest(tmp_path):
    m = json.loads((REF / "manifest.json").read_text())
    for key in ("profile", "commit", "data_seed", "train_steps", "machine", "figures", "trained_on"):
        assert key in m, f"manifest.json lacks {key}"
    assert m["profile"] == "cpu" and m["train_steps"] > 0
    # which data it saw: the course's held-out heads stay held out (the reference may train on more heads)
    from spinmeround_lite.dataset import heldout_names
    from spinmeround_lite.profiles import get_profile
    P = get_profile("cpu")
    course_heldout = set(heldout_names(P))                  # 8 of the first 64 + 8 evaluation-only heads
    assert len(course_heldout) == 16
    assert set(m["data"]["heldout"]) == course_heldout and m["data"]["identities_train"] >= P.identities - 8
    size = sum(p.stat().st_size for p in REF.rglob("*") if p.is_file())
    # the course's models in float16 (about 77 MiB: the multi-view model and four ablation models of 14 MiB each)
    assert size < 100 * 2 ** 20, f"reference/cpu is {size / 2 ** 20:.0f} MiB: too large to commit"

    from spinmeround_lite.latents import ensure_vae
    from spinmeround_lite.train import ensure_model

    run = Run("cpu", tmp_path / "run", device="cpu")
    model, source = ensure_model(run, progress=False)
    assert source == "reference"
    codec = ensure_vae(run, progress=False)             # copied from reference/cpu/vae, never trained here
    assert Run.is_complete(run.model_dir("vae"))
    x = torch.rand(1, 3, 64, 64)
    assert codec.encode(x).shape == (1, 4, 16, 16)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000


def test_reference_export_stores_half_precision_that_loads(tmp_path):
    """tools/train_reference.py's export: float16 on disk, the step in its config, loads into the float32 model."""
    import importlib.util

    from spinmeround_lite.model import SpinModel

    spec = importlib.util.spec_from_file_location("train_reference", Path(__file__).parents[1] / "tools" /
                                                  "train_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    torch.manual_seed(0)
    model = SpinModel.from_profile("test")
    src = tmp_path / "trained"
    model.save(src, info={"step": 12, "weights": "ema"})
    Run.mark_complete(src, {"step": 12})
    assert tool.export_model_dir(src, tmp_path / "ref") == 12
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype in (torch.float16, torch.int64) for k in f.keys())
    loaded = SpinModel.load(tmp_path / "ref", "test")
    assert loaded.config["step"] == 12 and Run.is_complete(tmp_path / "ref")
    for k, v in model.state_dict().items():       # float16 rounds to 2^-11 = 4.9e-4 relative: bound by analysis
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=2e-3, rtol=2e-3)


def test_reference_export_copies_the_parts_and_replaces_an_old_export(tmp_path):
    """tools/train_reference.py's export: vae/, id_cond/, spin/ and the manifest; a second export replaces the
    parts (built beside, then swapped in), and an unfinished part stops it before anything is written."""
    import importlib.util

    from spinmeround_lite.model import SpinModel

    spec = importlib.util.spec_from_file_location("train_reference", Path(__file__).parents[1] / "tools" /
                                                  "train_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run = Run("test", tmp_path / "run", seed=0, device="cpu")
    for name in ("vae", "id_cond"):
        d = run.model_dir(name)
        d.mkdir(parents=True)
        (d / "weights.bin").write_text(f"{name} 1")
        Run.mark_complete(d, {})
    SpinModel.from_profile("test").save(run.model_dir("spin"), info={"step": 7, "weights": "ema"})
    Run.mark_complete(run.model_dir("spin"), {"step": 7})
    dest = tmp_path / "ref"
    assert tool.export(run, dest, 1.0) == 7
    assert (dest / "vae" / "weights.bin").read_text() == "vae 1" and Run.is_complete(dest / "id_cond")
    assert json.loads((dest / "manifest.json").read_text())["train_steps"] == 7
    (run.model_dir("vae") / "weights.bin").write_text("vae 2")
    tool.export(run, dest, 1.0)
    assert (dest / "vae" / "weights.bin").read_text() == "vae 2"
    assert sorted(p.name for p in dest.iterdir()) == ["id_cond", "manifest.json", "spin", "vae"]   # no .tmp/.old
    (run.model_dir("id_cond") / "COMPLETE").unlink()
    with pytest.raises(SystemExit, match="not complete"):
        tool.export(run, dest, 1.0)
    assert (dest / "id_cond" / "weights.bin").read_text() == "id_cond 1"


@pytest.mark.skipif(not (REF / "manifest.json").exists(), reason="no reference checkpoints in this checkout")
def test_cpu_ablation_references_are_the_ablations_at_one_budget():
    """Each committed ablation is the variant it is named after (its trainer options in its config), trained the
    steps the manifest states, and all of them (with the full model at that budget) the same number of steps."""
    from spinmeround_lite.evaluate import ABLATIONS, check_ablation_config
    from spinmeround_lite.model import SpinModel

    m = json.loads((REF / "manifest.json").read_text())
    folders = sorted(p.name for p in REF.glob("ablation_*"))
    assert sorted(f"ablation_{n}" for n in m.get("ablations", {})) == folders
    steps = set()
    for name, entry in m.get("ablations", {}).items():
        model = SpinModel.load(REF / f"ablation_{name}", "cpu")
        check_ablation_config(model, {} if name == "full_same_budget" else ABLATIONS[name], REF, name)
        assert model.config["step"] == entry["steps"]
        steps.add(entry["steps"])
    assert len(steps) <= 1, f"ablations trained with different budgets: {steps}"
    if folders:
        assert "ablation_full_same_budget" in folders or steps == {m["train_steps"]}


@pytest.mark.skipif(not (REF / "manifest.json").exists(), reason="no reference checkpoints in this checkout")
def test_cpu_reference_models_learned_in_the_committed_latent_space():
    """Every committed diffusion model records the latent space it was trained in; it must be the one the committed
    autoencoder gives (a retrained encoder or scale would make their samples wrong; a decoder trained on may not)."""
    from spinmeround_lite.latents import LatentCodec, load_vae, vae_fingerprint

    fp = vae_fingerprint(LatentCodec(load_vae(REF / "vae")))
    models = [p for p in sorted(REF.iterdir()) if (p / "config.json").exists() and p.name not in ("vae", "id_cond")]
    assert any(p.name == "spin" for p in models)
    for p in models:
        assert json.loads((p / "config.json").read_text()).get("vae_fingerprint") == fp, p.name


@pytest.mark.skipif(not (REF / "manifest.json").exists(), reason="no reference checkpoints in this checkout")
def test_cpu_student_loads_samples_in_its_steps_and_refuses_others(tmp_path):
    """reference/cpu/student (notebook 12): the distilled few-step model of the reference, float16 on disk, found
    by a cpu run, samples step B in exactly its steps with one network call each, and refuses any other count."""
    from safetensors import safe_open

    from spinmeround_lite import sampling
    from spinmeround_lite import spinning as S
    from spinmeround_lite.distill import find_student, student_info

    folder = REF / "student"
    assert Run.is_complete(folder), "reference/cpu/student is missing: export it (python -m spinmeround_lite.distill)"
    man = json.loads((folder / "manifest.json").read_text())
    assert man["profile"] == "cpu" and man["distill_steps"] > 0 and "spinmeround_lite.distill" in man["command"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in list(f.keys())[:20])
    run = Run("cpu", tmp_path / "run", device="cpu")
    student, source = find_student(run)
    assert student is not None and source.endswith("student")
    info = student_info(student)
    k = info["steps"]
    assert 1 <= k <= 4 and len(info["sigmas"]) == k + 1 and info["sigmas"][-1] == 0
    parts = S.SpinParts(None, None, None, run.profile, "reference", student, source)
    plan = S.plan_sampler(parts, "student")
    assert plan.steps == k and plan.cfg_scale == 1.0 and plan.model is student
    for wrong in (k + 1, 20):
        with pytest.raises(S.SamplerError, match=f"exactly {k} steps"):
            S.plan_sampler(parts, "student", steps=wrong)
    h = run.profile.latent_res
    z_in = torch.randn(1, 8, h, h, generator=torch.Generator().manual_seed(0))
    with sampling.NetworkCounter(student) as counter:
        lat, _ = S.anchors(student, run.profile, z_in, torch.nn.functional.normalize(torch.randn(1, 512), dim=-1),
                           cfg_scale=plan.cfg_scale, solver=plan.solver, sigmas=plan.sigmas)
    assert lat.shape == (1, 7, 8, h, h) and torch.isfinite(lat).all()
    assert counter.totals() == {"calls": k, "view_evaluations": 8 * k}
