"""The course runner: executes ``notebooks/NN_*.ipynb`` (or their worked solutions) in order with papermill.

    python -m spinmeround_lite.course list [--solutions]
    python -m spinmeround_lite.course run --profile cpu [--out DIR] [--only 00 03] [--fresh] [--solutions]
                                          [--set batch_size=8 train_steps=100] [--dry-run]

``--set field=value`` (any field of ``profiles.Profile`` but ``name``; repeatable) changes the profile for this
run: every notebook gets it as its ``overrides`` parameter, and the run folder records it in ``run.json``. A
run folder built with other values is refused (``--fresh`` or another ``--out`` starts anew).

``--solutions`` runs ``solutions/NN_*.ipynb`` (the exercises of notebook ``NN`` worked out, each answer checked
by an ``assert``) in the same run folder, so they reuse the course's artifacts; their entries go to the
``solutions`` part of ``summary.json`` and the executed notebooks to ``<run>/solutions/``.

The runner prints one line per notebook (status, seconds, the figures it recorded). Its kernels talk to it over
IPC (``KERNEL_CONFIG``), so ipykernel has no unencrypted TCP sockets to warn about.

Every artifact lands in the run folder (default ``runs/<profile>/``): executed notebooks, data, checkpoints,
images, and ``summary.json`` with each notebook's status, seconds and recorded figures. The runner stops at
the first failing notebook and names it and its failing cell. A rerun reuses complete artifacts unless
``--fresh``.
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

from .profiles import (
    DRY_RUN_BANNER,
    PROFILES,
    OverrideError,
    check_overrides,
    dry_run_overrides,
    not_exercised,
    parse_overrides,
)
from .runs import RunFolderMismatch, claim_run_folder, clean_figure, find_repo_root, read_json, write_json

# The figures each notebook must record (what the course promises to measure); the runner lists any missing.
REQUIRED_FIGURES: dict[str, tuple[str, ...]] = {
    "00_procedural_heads": ("identities", "views_per_identity", "resolution", "render_views_per_s", "mean_head_ssim"),
    "01_identity_tokens": ("same_id_cos", "diff_id_cos", "verification_auc", "context_shape"),
    "02_ray_maps": ("raymap_channels", "center_ray_max_err"),
    "03_latent_space": ("vae_psnr_rgb", "vae_normal_angle_err_deg", "vae_face_psnr_rgb", "latent_scale"),
    "04_3d_attention": ("unet_params", "in_channels", "out_channels", "attention_speedup_fused_vs_naive",
                        "attention_memory_ratio"),
    "05_edm_training": ("train_steps", "samples_per_s", "final_loss", "checkpoint"),
    "06_normal_inpainting": ("normal_angle_err_deg",),
    "07_anchor_sampling": ("views", "spin_seconds", "anchor_ssim", "anchor_psnr", "teacher_forced_ssim",
                           "teacher_forced_l2", "teacher_forced_normal_err_deg", "teacher_forced_mean_head_ssim",
                           "teacher_forced_mean_head_normal_err_deg", "pose_accuracy", "identity_accuracy",
                           "sweep_accuracy", "swap_follow", "input_gain_db"),
    "08_gaussian_splatting": ("splat_psnr_train", "splat_psnr_heldout_views", "gaussians", "fit_seconds", "backend"),
    "09_evaluation": ("l2", "ssim", "lpips", "id_sim_cond", "id_sim_eval", "normal_angle_err_deg"),
    "10_your_photo": ("photo_faces_found", "photo_align_backend", "photo_id_distance_by_yaw",
                      "procedural_face_detection_rate"),
    "11_the_real_model": ("weights_present", "missing_files", "released_model_ran", "released_keys_mapped"),
    "12_fewer_steps": ("view_evals_per_spin_euler20", "view_evals_per_spin_fast", "spin_seconds_euler20",
                       "spin_seconds_fast", "fast_minus_euler20_ssim", "fast_minus_euler20_l2"),
}


def missing_figures(notebook: str, figures: dict) -> list[str]:
    """Names of the required figures ``notebook`` did not record."""
    return [k for k in REQUIRED_FIGURES.get(notebook, ()) if k not in figures]


# Kernels started by the runner (and by nbmake, see the repository's conftest.py) use IPC sockets (files in
# Jupyter's runtime folder) instead of TCP on localhost: nothing to eavesdrop on, and ipykernel's warning that a
# kernel "is running over TCP without encryption" has no cause. Passed to nbclient as its traitlets config.
KERNEL_TRANSPORT = "ipc"


def kernel_config():
    """traitlets ``Config`` for ``nbclient.NotebookClient(config=...)``: one kernel on IPC transport.

    The socket files get an absolute, fresh prefix (``<tmp>/smr-kernel-<hex>-ipc-<n>``): the default is relative
    (``kernel-ipc``), and the kernel starts in the notebook's folder while its client stays in the caller's, so
    the two would look for the sockets in different places. Call it once per kernel.
    """
    import tempfile
    import uuid

    from traitlets.config import Config

    ip = os.path.join(tempfile.gettempdir(), f"smr-kernel-{uuid.uuid4().hex[:12]}-ipc")
    return Config({"KernelManager": {"transport": KERNEL_TRANSPORT, "ip": ip}})


def notebooks_dir(kind: str = "notebooks") -> Path:
    """The course's ``notebooks/`` folder, or ``solutions/`` (``kind="solutions"``)."""
    root = find_repo_root(Path(__file__).parent) or find_repo_root()
    if root is None:
        raise SystemExit(f"cannot find the course's {kind}/ folder: run this from inside the course checkout")
    return root / kind


def list_notebooks(folder: Path | None = None) -> list[Path]:
    folder = folder or notebooks_dir()
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def notebook_title(path: Path) -> str:
    """The first heading of the notebook's first markdown cell."""
    nb = json.loads(path.read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", "")).splitlines():
                if line.strip().startswith("#"):
                    return line.strip().lstrip("#").strip()
    return ""


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = [p for p in notebooks if any(p.stem == o or p.stem.startswith(o) for o in only)]
    if not chosen:
        names = ", ".join(p.stem for p in notebooks)
        raise SystemExit(f"--only {' '.join(only)} matches no notebook; the notebooks are: {names}")
    return chosen


def _commit() -> str:
    try:
        root = find_repo_root(Path(__file__).parent)
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        more = ", ..." if len(v) > 4 else ""
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in list(v.items())[:4]) + more + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v[:4]) + (", ..." if len(v) > 4 else "") + "]"
    return str(v)


def progress_line(i: int, n: int, name: str, entry: dict, width: int = 160) -> str:
    """One line per executed notebook: ``[ 3/12] 02_ray_maps  ok  4.1 s  raymap_channels=145 ...``."""
    figs = " ".join(f"{k}={_short(v)}" for k, v in entry.get("figures", {}).items())
    missing = entry.get("missing_figures")
    status = entry["status"] + (f" (missing figures: {', '.join(missing)})" if missing else "")
    line = f"[{i:>2}/{n}] {name:<24} {status:<6} {entry.get('seconds', 0):7.1f} s  {figs}"
    return line if len(line) <= width else line[: width - 3] + "..."


def run_course(profile: str, out: str | os.PathLike | None = None, only: list[str] | None = None,
               fresh: bool = False, seed: int = 0, timeout: int | None = None,
               notebooks: list[Path] | None = None, progress: bool = True, solutions: bool = False,
               overrides: dict | None = None, dry_run: bool = False) -> dict:
    """Run the notebooks (or, with ``solutions``, their worked solutions) at ``profile`` changed by
    ``overrides`` (profile fields and values, each notebook's ``overrides`` parameter); return the summary
    (also written to ``<out>/summary.json``; solutions under its ``"solutions"`` key)."""
    import papermill as pm

    if profile not in PROFILES:
        raise SystemExit(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    try:
        overrides = check_overrides(overrides)
        if dry_run:     # the profile's sizes, every count cut; explicit overrides win
            overrides = check_overrides({**dry_run_overrides(profile), **overrides})
    except OverrideError as e:
        raise SystemExit(str(e)) from None
    kind = "solutions" if solutions else "notebooks"
    all_nbs = notebooks if notebooks is not None else list_notebooks(notebooks_dir(kind))
    chosen = select(all_nbs, only)
    folder = f"{profile}-dry-run" if dry_run else profile
    root = Path(out) if out else (find_repo_root(Path(__file__).parent) or Path.cwd()) / "runs" / folder
    root = root.resolve()
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        claim_run_folder(root, profile, overrides)          # before any notebook: a mixed folder stops here
    except RunFolderMismatch as e:
        raise SystemExit(str(e)) from None
    summary_path = root / "summary.json"
    summary = read_json(summary_path) if summary_path.exists() and not fresh else {}
    summary.update({
        "profile": profile, "overrides": clean_figure(overrides), "run_dir": str(root), "commit": _commit(),
        "device": _device_name(),
        "python": platform.python_version(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
    })
    if overrides.get("dry_run"):
        summary["dry_run"] = {"banner": DRY_RUN_BANNER.format(profile=profile),
                              "not_exercised": not_exercised(profile)}
    summary.setdefault(kind, {})
    for p in chosen:   # this run's notebooks start pending, in order
        summary[kind][p.stem] = {"status": "pending"}
    write_json(summary_path, summary)

    env_backup = {k: os.environ.get(k) for k in ("SMR_PROFILE", "SMR_RUN_DIR")}
    os.environ["SMR_PROFILE"], os.environ["SMR_RUN_DIR"] = profile, str(root)
    failed = None
    if progress:
        more = f" with overrides {json.dumps(overrides)}" if overrides else ""
        print(f"course [{profile}]{more}: {len(chosen)} {kind} in {root}", flush=True)
        if overrides.get("dry_run"):
            print(DRY_RUN_BANNER.format(profile=profile), flush=True)
    try:
        for i, nb in enumerate(chosen, 1):
            out_nb = root / kind / nb.name
            out_nb.parent.mkdir(parents=True, exist_ok=True)
            fig_name = f"solutions_{nb.stem[:2]}" if solutions else nb.stem
            fig_path = root / "figures" / f"{fig_name}.json"
            if fig_path.exists():
                fig_path.unlink()           # figures of this execution only
            entry = {"status": "running"}
            t0 = time.perf_counter()
            try:
                pm.execute_notebook(
                    str(nb), str(out_nb), parameters={"profile": profile, "run_dir": str(root), "seed": seed,
                                           "overrides": clean_figure(overrides)},   # tuples as lists
                    cwd=str(nb.parent), kernel_name="python3", progress_bar=False, log_output=False,
                    execution_timeout=timeout, config=kernel_config(),
                )
                entry["status"] = "ok"
            except pm.PapermillExecutionError as e:
                # cell_index counts cells of the executed notebook (papermill adds one after `parameters`)
                src = (e.source or "").strip().splitlines()
                entry.update(status="failed", failed_cell=e.cell_index, failed_source=src[0][:200] if src else "",
                             error=f"{e.ename}: {e.evalue}")
                failed = (nb.stem, e.cell_index, f"{e.ename}: {e.evalue}")
            except Exception as e:  # kernel died, timeout, bad notebook
                entry.update(status="failed", failed_cell=None, error=f"{type(e).__name__}: {e}")
                failed = (nb.stem, None, f"{type(e).__name__}: {e}")
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["figures"] = read_json(fig_path) if fig_path.exists() else {}
            if entry["status"] == "ok" and not solutions:
                entry["missing_figures"] = missing_figures(nb.stem, entry["figures"])
            entry["executed"] = str(out_nb.relative_to(root))
            summary[kind][nb.stem] = entry
            summary["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
            write_json(summary_path, summary)
            if progress:
                print(progress_line(i, len(chosen), nb.stem, entry), flush=True)
            if failed:
                break
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    summary["status"] = "failed" if failed else "ok"
    write_json(summary_path, summary)
    if failed:
        name, cell, err = failed
        where = f"cell {cell}" if cell is not None else "before any cell finished"
        print(f"\nFAILED: {kind[:-1]} {name}, {where}: {err}\n"
              f"  executed notebook with the traceback: {root / kind / (name + '.ipynb')}", file=sys.stderr)
    else:
        print(f"\nall {len(chosen)} {kind} ok; summary: {summary_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spinmeround_lite.course", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lst = sub.add_parser("list", help="print the notebooks, one line each")
    lst.add_argument("--solutions", action="store_true", help="list the worked solutions instead")
    r = sub.add_parser("run", help="execute the notebooks in order with papermill")
    r.add_argument("--profile", default="cpu", choices=list(PROFILES), help="size of the run (default: cpu)")
    r.add_argument("--out", default=None, help="run folder (default: runs/<profile>/)")
    r.add_argument("--only", nargs="+", default=None, metavar="NN", help="run only these notebooks (number or name)")
    r.add_argument("--fresh", action="store_true", help="delete the run folder first; rebuild every artifact")
    r.add_argument("--seed", type=int, default=0, help="seed passed to every notebook")
    r.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds (default: none)")
    r.add_argument("--solutions", action="store_true",
                   help="run the worked solutions (solutions/NN_*.ipynb) instead of the notebooks, same run folder")
    r.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE", dest="overrides",
                   help="change profile fields for this run, e.g. --set batch_size=8 train_steps=100 "
                        "(any field of spinmeround_lite/profiles.py's Profile but name)")
    r.add_argument("--dry-run", action="store_true",
                   help="the profile's sizes with every count cut to the least, on this machine (default folder "
                        "runs/<profile>-dry-run); its figures are not results")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for p in list_notebooks(notebooks_dir("solutions" if args.solutions else "notebooks")):
            print(f"{p.stem:<28} {notebook_title(p)}")
        return 0
    try:
        overrides = parse_overrides(args.overrides)
    except OverrideError as e:
        ap.exit(2, f"{ap.prog} run: error: {e}\n")
    summary = run_course(args.profile, args.out, args.only, args.fresh, args.seed, args.timeout,
                         progress=not args.quiet, solutions=args.solutions, overrides=overrides,
                         dry_run=args.dry_run)
    return 0 if summary["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
