"""The notebooks' set-up cell outside a checkout (what Colab does): it clones the course from ``course_repo``,
installs it without touching the preinstalled torch, torchvision and numpy, and picks a profile.

The environment: a fresh virtual environment that sees this checkout's installed packages (a ``.pth`` line to
``.venv``'s site-packages, so pip finds every dependency installed and needs no network) and whose own
site-packages holds a torch distribution record of another version than the pinned one (``2.9.1+cu126``, as a
Colab image carries), listed before the real one, so it is the torch pip and ``importlib.metadata`` see. Had the
set-up asked pip for the pinned torch, pip would replace that record (or fail offline)."""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB_TORCH = "2.9.1+cu126"


def setup_cell(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "course_repo" in c.source
             and "parameters" not in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: one set-up cell reads course_repo"
    return cells[0]


def test_every_notebook_has_the_same_setup_cell_and_a_course_repo_parameter():
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    first = setup_cell(nbs[0])
    for p in nbs:
        assert setup_cell(p) == first, f"{p.name}: its set-up cell differs from {nbs[0].name}'s"
        params = next(c for c in nbformat.read(p, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        assert 'course_repo = ""' in params.source, p.name


@pytest.fixture(scope="module")
def course_source(tmp_path_factory):
    """The course to clone: a git repository holding this working tree's files (committed or not)."""
    src = tmp_path_factory.mktemp("colab") / "course"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    git = ["git", "-c", "user.name=course", "-c", "user.email=course@localhost"]
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(git + ["add", "-A"], cwd=src, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "course"], cwd=src, check=True)
    return src


@pytest.fixture
def colab_like_env(tmp_path, course_source):
    """(python, site-packages, clone source) of the environment described in the module's doc, fresh per test."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "checkout_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    info = site / f"torch-{COLAB_TORCH}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {COLAB_TORCH}\n")
    (info / "INSTALLER").write_text("colab-image\n")
    (info / "RECORD").write_text("")
    return py, site, course_source


def _run_cell(py, work: Path, course_repo: str, profile: str = "") -> subprocess.CompletedProcess:
    code = (f"course_repo = {course_repo!r}\nprofile = {profile!r}\n" + setup_cell(ROOT / "notebooks" /
            "00_procedural_heads.ipynb") + textwrap.dedent("""
            import importlib.metadata, json, spinmeround_lite, numpy
            print("RESULT " + json.dumps({"torch": importlib.metadata.version("torch"), "numpy": numpy.__version__,
                                          "package": spinmeround_lite.__file__, "profile": profile}))
            """))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMR_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_FIND_LINKS="", OMP_NUM_THREADS="1")
    return subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True, env=env, timeout=600)


def test_setup_outside_the_checkout_clones_installs_and_keeps_torch(colab_like_env, tmp_path):
    py, site, src = colab_like_env
    before = sorted(p.name for p in site.iterdir())
    numpy_before = subprocess.run([str(py), "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                                  text=True, check=True).stdout.strip()
    r = _run_cell(py, tmp_path / "content", str(src))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    clone = (tmp_path / "content" / "spinmeround-lite").resolve()
    assert (clone / "pyproject.toml").exists() and (clone / ".git").is_dir()          # cloned from course_repo
    assert Path(res["package"]).resolve().is_relative_to(clone)                         # imported from the clone
    assert res["torch"] == COLAB_TORCH and res["numpy"] == numpy_before                 # preinstalled kept
    after = sorted(p.name for p in site.iterdir())
    assert [n for n in after if n.lower().startswith(("torch", "numpy"))] == \
        [n for n in before if n.lower().startswith(("torch", "numpy"))]                 # nothing replaced or added
    assert any("spinmeround_lite" in n for n in after)                                  # the editable install
    assert res["profile"] == "cpu" and "profile left empty: 'cpu' for this machine (no CUDA GPU)" in r.stdout
    # a second run finds the clone and keeps a given profile
    r2 = _run_cell(py, tmp_path / "content", str(src), profile="test")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(next(ln for ln in r2.stdout.splitlines() if ln.startswith("RESULT "))[7:])["profile"] == "test"


def test_setup_outside_the_checkout_without_course_repo_says_what_to_set(colab_like_env, tmp_path):
    py, _, _ = colab_like_env
    r = _run_cell(py, tmp_path / "elsewhere", "")
    assert r.returncode != 0
    assert "set course_repo in the parameters cell" in r.stderr and "On Colab" in r.stderr
    assert not (tmp_path / "elsewhere" / "spinmeround-lite").exists()


def test_profile_for_device():
    from spinmeround_lite.profiles import PROFILES, profile_for_device
    assert profile_for_device("Tesla T4", 14.7, False)[0] == "colab"
    assert profile_for_device("NVIDIA L4", 22.0, True)[0] == "gpu"
    assert profile_for_device("NVIDIA A100-SXM4-40GB", 39.4, True)[0] == "gpu"
    assert profile_for_device("NVIDIA GeForce RTX 3060", 12.0, True)[0] == "colab"
    assert profile_for_device(None, None, None)[0] == "cpu"
    assert PROFILES["colab"].mixed_precision == "fp16"
