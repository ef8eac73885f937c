"""The run folder: where every notebook of one profile writes its artifacts and figures.

Layout of ``runs/<profile>/``::

    summary.json                 written by the course runner
    run.json                     the profile and the overrides the folder is built with (first opener writes it)
    figures/<notebook>.json      figures each notebook recorded (``run.record``)
    notebooks/<notebook>.ipynb   executed notebooks (course runner)
    data/                        procedural heads (notebook 00)
    models/<name>/               trained parts: ``model.safetensors`` + ``config.json`` + ``COMPLETE``
    images/                      pictures the notebooks save

An artifact is complete when its folder holds a ``COMPLETE`` marker, written last. Every file is written
to a temporary name and renamed, so an interrupted run never leaves a half-written file that looks whole.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .profiles import Profile, apply_overrides, check_overrides, profile_differences

ENV_PROFILE = "SMR_PROFILE"      # default profile of a notebook run with no parameters (JupyterLab, nbmake)
ENV_RUN_DIR = "SMR_RUN_DIR"      # default run folder likewise
DEFAULT_PROFILE = "cpu"
RUN_RECORD = "run.json"          # in the run folder: {"profile": name, "overrides": {...}}


class RunFolderMismatch(ValueError):
    """A run folder built with one profile (or overrides) was asked to continue with another."""


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield an empty folder ``<path>.tmp`` beside ``path``; only if the block succeeds, it takes ``path``'s place
    (an old ``path`` is moved aside, then removed)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_gif(frames, path: str | os.PathLike, duration_ms: int = 80) -> Path:
    """Write frames (F, H, W, 3), uint8 or float in [0, 1], as a looping GIF, atomically."""
    from PIL import Image

    if isinstance(frames, torch.Tensor) and frames.dtype != torch.uint8:
        frames = (frames.detach().clamp(0, 1) * 255).round().byte()
    if isinstance(frames, torch.Tensor):
        frames = frames.cpu().numpy()
    ims = [Image.fromarray(np.asarray(f)) for f in frames]
    with atomic_path(path) as tmp:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=int(duration_ms), loop=0)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rerun the step that writes it") from None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def clean_figure(value: Any) -> Any:
    """Make a figure JSON-friendly: tensors and arrays to lists, NaN/inf to None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist() if value.ndim else value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean_figure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_figure(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# devices and seeds
# ----------------------------------------------------------------------------------------------
def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else CPU (``prefer`` forces one, e.g. ``"cpu"``)."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The course checkout that contains ``start`` (a folder with ``pyproject.toml`` and ``notebooks/``)."""
    p = Path(start or os.getcwd()).resolve()
    for q in [p, *p.parents]:
        if (q / "pyproject.toml").exists() and (q / "notebooks").is_dir():
            return q
    return None


def default_run_dir(profile: str) -> Path:
    env = os.environ.get(ENV_RUN_DIR)
    if env:
        return Path(env)
    root = find_repo_root() or Path.cwd()
    return root / "runs" / profile


# ----------------------------------------------------------------------------------------------
# the run folder's record: which profile and overrides built it
# ----------------------------------------------------------------------------------------------
def read_run_record(root: str | os.PathLike) -> dict | None:
    """``run.json`` of the run folder ``root`` (``{"profile": ..., "overrides": {...}}``), or None."""
    p = Path(root) / RUN_RECORD
    if not p.exists():
        return None
    rec = read_json(p)
    return {"profile": rec.get("profile"), "overrides": dict(rec.get("overrides") or {})}


def _overrides_text(overrides: dict) -> str:
    return json.dumps(clean_figure(overrides), sort_keys=True)


def check_run_folder(root: str | os.PathLike, profile: str, overrides: dict | None) -> None:
    """Raise ``RunFolderMismatch`` when the run folder ``root`` records another profile, or overrides that give
    any field another value, than ``profile`` with ``overrides``; the message names each difference and what to
    do. A folder without ``run.json`` (new, or from before the record existed) passes."""
    rec = read_run_record(root)
    if rec is None:
        return
    root = Path(root)
    todo = ("To continue that run, ask for the same values; to start another, choose another run folder "
            "(run_dir, --out), or delete this one (course run --fresh).")
    if rec["profile"] != profile:
        raise RunFolderMismatch(f"the run folder {root} was built at profile {rec['profile']!r} "
                                f"(its {RUN_RECORD}); this asks for profile {profile!r}. {todo}")
    built = apply_overrides(rec["profile"], rec["overrides"])
    asked = apply_overrides(profile, overrides)
    diffs = profile_differences(built, asked)
    if diffs:
        lines = [d.replace(" != ", " in the run folder, ", 1) + " asked here" for d in diffs]
        raise RunFolderMismatch(
            f"the run folder {root} was built with other values of profile {profile!r} than asked here:\n  "
            + "\n  ".join(lines)
            + f"\nIt records overrides = {_overrides_text(rec['overrides'])} ({RUN_RECORD}); this run asks for "
            f"overrides = {_overrides_text(check_overrides(overrides))}. {todo}")


def claim_run_folder(root: str | os.PathLike, profile: str, overrides: dict | None) -> dict:
    """Check ``root`` against ``profile`` and ``overrides`` (``check_run_folder``) and, when it records nothing
    yet, record them in its ``run.json``. Returns the checked overrides."""
    overrides = check_overrides(overrides)
    check_run_folder(root, profile, overrides)
    if read_run_record(root) is None:
        write_json(Path(root) / RUN_RECORD, {"profile": profile, "overrides": clean_figure(overrides)})
    return overrides


class _SoftAsserts(ast.NodeTransformer):
    """``assert test, msg`` -> ``if not (test): _smr_dry_run_check_false("test", msg)`` (dry runs only)."""

    def visit_Assert(self, node: ast.Assert):
        call = ast.Call(func=ast.Name("_smr_dry_run_check_false", ast.Load()),
                        args=[ast.Constant(ast.unparse(node.test)[:300]), node.msg or ast.Constant(None)], keywords=[])
        new = ast.If(test=ast.UnaryOp(ast.Not(), node.test), body=[ast.Expr(call)], orelse=[])
        return ast.fix_missing_locations(ast.copy_location(new, node))


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
class Run:
    """One run folder of one profile, opened by a notebook or by package code.

    ``Run.open(profile="", run_dir="", notebook="00_procedural_heads")`` resolves empty parameters from the
    environment (``SMR_PROFILE``, ``SMR_RUN_DIR``) and then from defaults (``cpu``, ``<repo>/runs/<profile>``).
    ``overrides`` (``{"batch_size": 8}``) changes profile fields for this run folder; the folder records them in
    ``run.json`` and refuses to be continued with other values.
    """

    def __init__(self, profile: Profile | str, root: str | os.PathLike, notebook: str | None = None,
                 seed: int = 0, device: str | torch.device | None = None, overrides: dict | None = None):
        self.overrides = check_overrides(overrides)
        self.profile = apply_overrides(profile, self.overrides)
        self.root = Path(root).resolve()
        self.notebook = notebook
        self.seed = seed
        self.device = torch.device(device) if device else pick_device()
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, profile: str = "", run_dir: str = "", notebook: str | None = None, seed: int = 0,
             device: str = "", overrides: dict | None = None) -> "Run":
        """Open (or start) a run folder. ``overrides``: a dict (a notebook's parameter; ``{}`` is the profile as
        it is) must agree with what the folder records; None (package code, command lines) takes what the folder
        records."""
        profile = profile or os.environ.get(ENV_PROFILE) or DEFAULT_PROFILE
        root = Path(run_dir) if run_dir else default_run_dir(profile)
        if overrides is None:
            rec = read_run_record(root)
            overrides = rec["overrides"] if rec and rec["profile"] == profile else {}
        Path(root).mkdir(parents=True, exist_ok=True)
        overrides = claim_run_folder(root, profile, overrides)
        run = cls(profile, root, notebook=notebook, seed=seed, device=device or None, overrides=overrides)
        if run.profile.dry_run:
            from .profiles import DRY_RUN_BANNER
            print("=" * 100 + "\n" + DRY_RUN_BANNER.format(profile=profile) + "\n" + "=" * 100)
            run._soften_checks()
        seed_everything(seed)
        return run

    # dry runs ----------------------------------------------------------------------------------
    def _soften_checks(self) -> None:
        """In a notebook of a dry run, every later ``assert cond, msg`` still evaluates ``cond`` (an exception
        there still stops the notebook) but a false one is printed and recorded (figure ``dry_run_false_checks``)
        instead of stopping: at cut counts the quality thresholds cannot hold, the code paths must still run."""
        try:
            ip = get_ipython()                                  # noqa: F821 (defined inside IPython only)
        except NameError:
            return
        ip.user_ns["_smr_dry_run_check_false"] = self._dry_run_check_false
        if not any(isinstance(t, _SoftAsserts) for t in ip.ast_transformers):
            ip.ast_transformers.append(_SoftAsserts())

    def _dry_run_check_false(self, source: str, message=None) -> None:
        text = source + (f"  ({str(message)[:300]})" if message is not None else "")
        print(f"DRY RUN: check false at cut counts (not stopping): assert {text}")
        self.record(dry_run_false_checks=self.figures().get("dry_run_false_checks", []) + [text])

    def __repr__(self) -> str:
        more = f", overrides={_overrides_text(self.overrides)}" if self.overrides else ""
        return f"Run(profile={self.profile.name!r}{more}, root='{self.root}', device='{self.device}')"

    # paths -------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def image_path(self, name: str) -> Path:
        return self.path("images", name)

    # figures -----------------------------------------------------------------------------------
    def figures_path(self, notebook: str | None = None) -> Path:
        nb = notebook or self.notebook or "scratch"
        return self.root / "figures" / f"{nb}.json"

    def figures(self, notebook: str | None = None) -> dict:
        p = self.figures_path(notebook)
        return read_json(p) if p.exists() else {}

    def record(self, name: str | None = None, value: Any = None, **more: Any) -> dict:
        """Record figures of this notebook: ``run.record("psnr", 31.2)`` or ``run.record(psnr=31.2, ...)``.

        They land in ``figures/<notebook>.json`` at once (atomically), and the course runner copies them
        into ``summary.json``. Returns everything recorded so far by this notebook.
        """
        figs = self.figures()
        if name is not None:
            more = {name: value, **more}
        figs.update({k: clean_figure(v) for k, v in more.items()})
        write_json(self.figures_path(), figs)
        return figs

    # artifacts ---------------------------------------------------------------------------------
    @staticmethod
    def is_complete(folder: str | os.PathLike) -> bool:
        return (Path(folder) / "COMPLETE").exists()

    @staticmethod
    def mark_complete(folder: str | os.PathLike, info: dict | None = None) -> None:
        write_json(Path(folder) / "COMPLETE", info or {})

    def ensure(self, folder: str | os.PathLike, build: Callable[[Path], Any], fresh: bool = False) -> Path:
        """Build ``folder`` with ``build(folder)`` unless it is already complete; mark it complete after.

        A half-built folder (no ``COMPLETE``) is removed and built again.
        """
        folder = Path(folder)
        if fresh or not self.is_complete(folder):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            build(folder)
            self.mark_complete(folder)
        return folder

    # reference checkpoints ---------------------------------------------------------------------
    @staticmethod
    def copy_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        """Copy the files of artifact ``src`` (not its ``COMPLETE`` marker) into ``dst``."""
        for item in Path(src).iterdir():
            if item.is_file() and item.name != "COMPLETE":
                shutil.copy2(item, Path(dst) / item.name)

    def reference_dir(self, name: str) -> Path | None:
        """``reference/<profile>/<name>`` of the checkout when this profile uses reference checkpoints."""
        if not self.profile.use_reference:
            return None
        root = find_repo_root(Path(__file__).parent) or find_repo_root()
        if root is None:
            return None
        d = root / "reference" / self.profile.name / name
        return d if self.is_complete(d) else None
