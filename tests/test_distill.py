"""The few-step student: its schedule, the teacher's integration it learns from, training with resume, export and
loading, and that it samples in exactly its own step count (notebook 12)."""

import copy
import math
import os

import pytest
import torch

from spinmeround_lite import distill as D
from spinmeround_lite import sampling
from spinmeround_lite.checkpoints import CheckpointError
from spinmeround_lite.model import SpinModel
from spinmeround_lite.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def test_student_schedule():
    s = D.student_sigmas(4, 80.0)
    assert s.tolist()[0] == 80.0 and s[-1] == 0 and len(s) == 5
    assert s[1].item() == pytest.approx(D.STUDENT_SIGMA_HI) and s[3].item() == pytest.approx(D.STUDENT_SIGMA_LO)
    assert torch.all(s[1:] < s[:-1])
    assert len(D.student_sigmas(1)) == 2 and len(D.student_sigmas(2)) == 3
    with pytest.raises(ValueError):
        D.student_sigmas(0)


def test_integrate_follows_the_exact_ode_between_two_levels():
    """On a Gaussian latent the ODE's solution is known: x(s) = mu + (x(s0) - mu) sqrt(s^2 + S^2) / sqrt(s0^2 + S^2)."""
    mu, sd = 1.5, 0.5

    def den(x, sigma):
        s2 = sigma.view(-1, 1).to(x) ** 2
        return (sd * sd * x + s2 * mu) / (sd * sd + s2)
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5.0
    for s_hi, s_lo in [(5.0, 1.0), (80.0, 5.0), (0.5, 0.0)]:
        got = D.integrate(den, x * s_hi / 5.0, s_hi, s_lo, 24)
        exact = mu + (x * s_hi / 5.0 - mu) * math.sqrt(s_lo ** 2 + sd ** 2) / math.sqrt(s_hi ** 2 + sd ** 2)
        assert (got - exact).abs().max() < 2e-3 * max(1.0, s_lo), (s_hi, s_lo, (got - exact).abs().max())


@pytest.fixture(scope="module")
def run():
    return Run("test", os.environ["SMR_RUN_DIR"], device="cpu")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return SpinModel.from_profile("test", pretrained=False).eval()


def test_target_puts_the_students_euler_step_on_the_teachers_path(run, teacher):
    from spinmeround_lite.train import TrainData

    data = TrainData(run, progress=False)
    sched = D.student_sigmas(3, 80.0)
    for step in range(8):                                   # covers step-A samples and several segments
        b = D.distill_batch(data, step, 0, 2, 3.0, sched)
        tgt = D.teacher_target(teacher, b, sched, substeps=2)
        j = b["j"]
        r = float(sched[j + 1] / sched[j])
        landed = r * b["x"] + (1 - r) * tgt                 # the student's Euler step with S = D*
        mask = b["mask"].view(*b["mask"].shape, 1, 1, 1)
        cond = torch.where(mask, b["x0"], torch.zeros_like(b["x0"]))
        den = sampling.cfg_denoiser(teacher, cond, b["mask"], b["rays"], b["id_emb"], scale=b["cfg"])
        path = D.integrate(den, b["x"], float(sched[j]), float(sched[j + 1]), 2, cond, b["mask"])
        assert torch.allclose(landed, path, atol=1e-4, rtol=1e-4)
        assert (b["mask"].shape[1] == 1) == (step % D.STEP_A_EVERY == D.STEP_A_EVERY - 1)


def test_distill_resumes_exports_and_loads(run, teacher, tmp_path):
    out = tmp_path / "student"
    first = D.distill(run, steps=4, out=out, k=2, substeps=1, checkpoint_every=2, sample_every=0, progress=False,
                      stop_after=2, teacher=teacher)
    assert not first["finished"] and first["steps"] == 2
    early = D.export_student(out, tmp_path / "early", "test")             # a running distillation: newest checkpoint
    assert D.student_info(D.load_student(early, "test"))["distill_steps"] == 2
    again = D.distill(run, steps=4, out=out, k=2, substeps=1, checkpoint_every=2, sample_every=0, progress=False,
                      teacher=teacher)
    assert again["finished"] and again["steps"] == 4 and again["steps_this_call"] == 2
    whole = D.distill(run, steps=4, out=tmp_path / "whole", k=2, substeps=1, checkpoint_every=2, sample_every=0,
                      progress=False, teacher=teacher)
    a, b = D.load_student(out, "test"), D.load_student(tmp_path / "whole", "test")
    assert whole["finished"]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):   # killed + resumed == uninterrupted
        assert torch.equal(va, vb), k
    info = D.student_info(a)
    assert info["steps"] == 2 and len(info["sigmas"]) == 3 and info["cfg_scale"] == run.profile.cfg_scale
    moved = any(not torch.equal(va, vt) for va, vt in zip(a.state_dict().values(), teacher.state_dict().values()))
    assert moved                                            # the student left the teacher's weights
    ref = D.export_student(out, tmp_path / "ref" / "student", "test", command="python -m ...")
    half = D.load_student(ref, "test")
    assert D.student_info(half)["steps"] == 2 and Run.is_complete(ref)
    assert (ref / "manifest.json").exists()


def test_a_teacher_is_not_a_student(tmp_path, teacher):
    teacher.save(tmp_path / "t")
    Run.mark_complete(tmp_path / "t", {})
    with pytest.raises(CheckpointError, match="no distilled student"):
        D.load_student(tmp_path / "t", "test")
    with pytest.raises(FileNotFoundError, match="no finished student"):
        D.load_student(tmp_path / "nothing", "test")
    with pytest.raises(CheckpointError):
        D.student_info(copy.deepcopy(teacher))
