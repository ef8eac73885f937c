"""Profile overrides: names and types checked, the run folder's record, the refusals, papermill and the runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spinmeround_lite import course
from spinmeround_lite.profiles import (
    OverrideError,
    apply_overrides,
    check_overrides,
    get_profile,
    override_fields,
    parse_overrides,
)
from spinmeround_lite.runs import RUN_RECORD, Run, RunFolderMismatch, read_run_record

ROOT = Path(__file__).resolve().parents[1]


def test_apply_overrides_changes_only_the_named_fields():
    base = get_profile("test")
    p = apply_overrides("test", {"batch_size": 3, "lr": 1, "unet_channels": [8, 16], "use_reference": True})
    assert (p.batch_size, p.lr, p.unet_channels, p.use_reference) == (3, 1.0, (8, 16), True)
    assert isinstance(p.lr, float) and isinstance(p.unet_channels, tuple)
    assert p.replace(batch_size=base.batch_size, lr=base.lr, unet_channels=base.unet_channels,
                     use_reference=base.use_reference) == base
    assert apply_overrides("test", {}) == base and apply_overrides("test", None) == base


def test_unknown_field_names_the_valid_fields():
    with pytest.raises(OverrideError) as e:
        apply_overrides("cpu", {"batchsize": 8})
    msg = str(e.value)
    assert "'batchsize'" in msg and "did you mean 'batch_size'" in msg
    for name in ("batch_size", "train_steps", "sample_steps", "eval_identities"):
        assert f"{name} (" in msg                           # every field, with its type
    assert "name (" not in msg.replace("unet_pretrained", "").replace("vae_pretrained", "")
    with pytest.raises(OverrideError, match="unknown profile field"):
        check_overrides({"name": "gpu"})                   # the profile is chosen by name, not overridden


@pytest.mark.parametrize("bad", [{"batch_size": 2.5}, {"batch_size": "8"}, {"batch_size": True},
                                 {"lr": "fast"}, {"use_reference": 1}, {"unet_channels": 64},
                                 {"unet_channels": [64.0, 128]}, {"vae_pretrained": 3}, {"extra": []}])
def test_wrong_types_are_refused_naming_the_type(bad):
    (key, value), = bad.items()
    with pytest.raises(OverrideError, match=f"{key} takes a"):
        check_overrides(bad)


def test_overrides_must_be_a_dict_or_its_json():
    with pytest.raises(OverrideError, match="must be a dict"):
        check_overrides([("batch_size", 8)])
    assert check_overrides('{"batch_size": 8, "unet_channels": [8, 16]}') == {"batch_size": 8,
                                                                             "unet_channels": (8, 16)}
    assert check_overrides("") == {}
    with pytest.raises(OverrideError, match="not a JSON object"):
        check_overrides("{batch_size: 8}")


def test_command_line_values_are_read_by_the_field_type():
    got = parse_overrides(["batch_size=8", "lr=1e-4", "use_reference=false", "unet_channels=32,64",
                           "vae_pretrained=weights/x", 'extra={"model": "released"}', "vae_channels=[8, 16]"])
    assert got == {"batch_size": 8, "lr": 1e-4, "use_reference": False, "unet_channels": (32, 64),
                   "vae_pretrained": "weights/x", "extra": {"model": "released"}, "vae_channels": (8, 16)}
    with pytest.raises(OverrideError, match=r"batch_size takes a int \(e.g. batch_size=8\)"):
        parse_overrides(["batch_size=eight"])
    with pytest.raises(OverrideError, match="write field=value"):
        parse_overrides(["batch_size"])
    with pytest.raises(OverrideError, match="The fields are:"):
        parse_overrides(["no_such_field=1"])
    assert set(override_fields()) == {f for f in get_profile("test").to_dict() if f != "name"}


def test_run_folder_records_overrides_and_refuses_other_values(tmp_path):
    root = tmp_path / "run"
    run = Run.open("test", str(root), seed=0, device="cpu", overrides={"train_steps": 5})
    assert run.profile.train_steps == 5 and run.overrides == {"train_steps": 5}
    assert json.loads((root / RUN_RECORD).read_text()) == {"profile": "test", "overrides": {"train_steps": 5}}
    assert "overrides={\"train_steps\": 5}" in repr(run)
    # the same values continue it; None (package code, command lines) takes what the folder records
    assert Run.open("test", str(root), device="cpu", overrides={"train_steps": 5}).profile.train_steps == 5
    assert Run.open("test", str(root), device="cpu").profile.train_steps == 5
    # the profile's own value written as an override is the same run
    same = Run.open("test", str(root), device="cpu", overrides={"train_steps": 5, "batch_size": 1})
    assert same.profile.batch_size == 1
    with pytest.raises(RunFolderMismatch) as e:
        Run.open("test", str(root), device="cpu", overrides={})
    msg = str(e.value)
    assert "train_steps: 5 in the run folder, 12 asked here" in msg
    assert 'overrides = {"train_steps": 5}' in msg and "another run folder" in msg
    with pytest.raises(RunFolderMismatch, match="sample_steps: 4 in the run folder, 2 asked here"):
        Run.open("test", str(root), device="cpu", overrides={"train_steps": 5, "sample_steps": 2})
    with pytest.raises(RunFolderMismatch, match="built at profile 'test'.*asks for profile 'cpu'"):
        Run.open("cpu", str(root), device="cpu", overrides={"train_steps": 5})
    assert read_run_record(root) == {"profile": "test", "overrides": {"train_steps": 5}}   # unchanged


def test_runner_refuses_a_mixed_run_folder_before_any_notebook(tmp_path):
    root = tmp_path / "run"
    Run.open("test", str(root), device="cpu", overrides={"batch_size": 2})
    with pytest.raises(SystemExit, match="batch_size: 2 in the run folder, 1 asked here"):
        course.run_course("test", root, notebooks=[], progress=False)
    assert not (root / "summary.json").exists()
    with pytest.raises(SystemExit, match="unknown profile field"):
        course.run_course("test", tmp_path / "other", notebooks=[], progress=False, overrides={"bach": 1})


def test_course_command_line_rejects_an_unknown_field(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spinmeround_lite.course", "run", "--profile", "test",
                        "--out", str(tmp_path / "run"), "--only", "02", "--set", "train_step=3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "unknown profile field in overrides: 'train_step' (did you mean 'train_steps'?)" in r.stderr
    assert "train_steps (int)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_runner_passes_overrides_to_every_notebook(tmp_path):
    import nbformat
    src = tmp_path / "nbs"
    src.mkdir()
    nbs = []
    for name in ("00_a", "01_b"):
        nb = nbformat.v4.new_notebook()
        nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
        params = nbformat.v4.new_code_cell('profile = ""\nrun_dir = ""\nseed = 0\noverrides = {}')
        params.metadata["tags"] = ["parameters"]
        nb.cells = [nbformat.v4.new_markdown_cell(f"# {name}"), params, nbformat.v4.new_code_cell(
            "from spinmeround_lite.runs import Run\n"
            f"run = Run.open(profile, run_dir, notebook='{name}', seed=seed, overrides=overrides)\n"
            "run.record(steps=run.profile.train_steps, channels=list(run.profile.unet_channels))")]
        nbformat.write(nb, src / f"{name}.ipynb")
        nbs.append(src / f"{name}.ipynb")
    s = course.run_course("test", tmp_path / "run", notebooks=nbs, progress=False,
                          overrides={"train_steps": 7, "unet_channels": (8, 16)})
    assert s["status"] == "ok", s
    assert s["overrides"] == {"train_steps": 7, "unet_channels": [8, 16]}
    for name in ("00_a", "01_b"):
        assert s["notebooks"][name]["figures"] == {"steps": 7, "channels": [8, 16]}


def test_papermill_overrides_reach_a_course_notebook(tmp_path):
    """The papermill command line on notebook 02 (no data needed): ``-p overrides`` changes the rig's view count; its
    recorded ``views`` figure follows, the run folder records it, and a second run without it is refused."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", SMR_PROFILE="test", SMR_RUN_DIR=str(run_dir), MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_ray_maps.ipynb"),
           str(tmp_path / "02.ipynb"), "-p", "profile", "test", "-p", "run_dir", str(run_dir),
           "--cwd", str(ROOT / "notebooks"), "--no-progress-bar"]
    r = subprocess.run(cmd + ["-p", "overrides", '{"views_per_identity": 12}'], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    figs = json.loads((run_dir / "figures" / "02_ray_maps.json").read_text())
    assert figs["views"] == 12                               # the test profile has 16
    assert read_run_record(run_dir) == {"profile": "test", "overrides": {"views_per_identity": 12}}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0
    assert "views_per_identity: 12 in the run folder, 16 asked here" in r.stdout + r.stderr


def test_dry_run_keeps_sizes_cuts_counts_and_says_it_everywhere(tmp_path):
    import nbformat

    from spinmeround_lite.profiles import dry_run_overrides, not_exercised
    gpu = get_profile("gpu")
    dry = apply_overrides("gpu", dry_run_overrides("gpu"))
    for size in ("resolution", "latent_res", "unet_channels", "unet_layers_per_block", "views_per_sample",
                 "vae_channels", "text_hidden", "splat_res"):
        assert getattr(dry, size) == getattr(gpu, size), size
    assert dry.views_per_sample <= dry.views_per_identity == 25 < gpu.views_per_identity    # a count, cut
    assert dry.mixed_precision == "bf16" and dry.dry_run
    assert (dry.train_steps, dry.sample_steps, dry.eval_identities) == (2, 2, 1)
    assert dry.identities < gpu.identities and dry.heldout_identities >= dry.check_heads
    assert dry.check_heads >= 2                       # notebook 07's identity swap gives head b+1's view to head b
    colab = apply_overrides("colab", dry_run_overrides("colab"))
    assert colab.mixed_precision == "fp16" and any("fp16" in n for n in not_exercised("colab"))
    assert any("gsplat" in n for n in not_exercised("gpu"))

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    params = nbformat.v4.new_code_cell('profile = ""\nrun_dir = ""\nseed = 0\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# dry"), params, nbformat.v4.new_code_cell(
        "from spinmeround_lite.runs import Run\n"
        "run = Run.open(profile, run_dir, notebook='00_dry', seed=seed, overrides=overrides)\n"
        "run.record(steps=run.profile.train_steps, res=run.profile.resolution)"),
        nbformat.v4.new_code_cell("quality = 0.1\nassert quality > 0.8, f'quality {quality}'\nrun.record(after=1)")]
    nbformat.write(nb, tmp_path / "00_dry.ipynb")
    s = course.run_course("gpu", tmp_path / "run", notebooks=[tmp_path / "00_dry.ipynb"], progress=False,
                          dry_run=True, overrides={"sample_steps": 3})
    assert s["status"] == "ok", s
    # a false check is printed and recorded, and the notebook goes on
    assert s["notebooks"]["00_dry"]["figures"] == {"steps": 2, "res": 128, "after": 1,
                                                   "dry_run_false_checks": ["quality > 0.8  (quality 0.1)"]}
    assert "NOT results" in s["dry_run"]["banner"] and s["dry_run"]["not_exercised"] == not_exercised("gpu")
    assert s["overrides"]["sample_steps"] == 3                      # an explicit override wins over the cut
    executed = nbformat.read(tmp_path / "run" / "notebooks" / "00_dry.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "DRY RUN: gpu sizes" in text and "NOT results" in text
    assert "DRY RUN: check false at cut counts (not stopping): assert quality > 0.8" in text
