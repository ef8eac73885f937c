"""The overfit check of issue 12: can the profile's model learn a handful of heads by heart?

    OMP_NUM_THREADS=1 python tools/overfit_check.py --profile cpu --heads 4 --steps 4000 --every 500 \
        --run-dir runs/ref4-cpu --extra-identities 336 --out runs/overfit4

A model that cannot fit 2-4 heads has a bug in its inputs, targets, masks, preconditioning or sampler, and no
budget fixes it. The script trains the profile's model from scratch on the first ``--heads`` training heads of a
run folder (the course's own trainer, ``train(identities=...)``), and every ``--every`` steps measures the teacher-
forced check (``checks.teacher_forced``: the true frontal view given, the 7 other views of a 45-degree spread
generated) on those same heads, with the profile's guidance scale and without guidance (cfg 1). Figures go to
``<out>/overfit.json`` (one row per evaluation) and a picture per evaluation to ``<out>/overfit_<step>.png``.

Two checks, because they answer two questions. The rig check renders the heads at the check's own cameras (a
45-degree spread at pitch 0), which the training set never holds exactly: its views have per-identity random yaws
and pitches of up to 25 degrees, so it asks for *new* cameras of known heads. The seen-views check
(``train.GridMaker(split="train")``, ``seen_views_*`` in the rows) gives the model the dataset's own frontal
view and asks for the dataset's own other views with their own cameras, exactly as training showed them: that is
memorisation, and what a bug in inputs, targets, masks, preconditioning or sampler would break.
``--model DIR`` measures a saved model instead (no training) into ``<out>/overfit_model.json``, e.g. a reference
checkpoint on its training heads.
The run folder must hold the dataset, the autoencoder and the conditioning encoder (``tools/train_reference.py``
builds them); it is only read.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite.profiles import get_profile  # noqa: E402
from spinmeround_lite.runs import Run  # noqa: E402


def measure(model, codec, profile, heads, seen=None, seed: int = 0) -> dict:
    """The rig check (``checks.teacher_forced``: new cameras at pitch 0) with the profile's guidance and without;
    with ``seen`` (a ``train.GridMaker`` of the training heads) also the seen-views check: the dataset's own views
    and cameras of those heads, exactly as training showed them."""
    from spinmeround_lite import checks

    out = {}
    for name, cfg in (("cfg", profile.cfg_scale), ("cfg1", 1.0)):
        tf = checks.teacher_forced(model, codec, profile.replace(cfg_scale=cfg), heads, mean_of=heads, seed=seed)
        out[name] = tf["figures"]
        out[name + "_pictures"] = tf
        if seen is not None:
            r = seen.measure(model, seed=seed, cfg_scale=cfg)
            out[name]["seen_views_ssim"] = r["ssim"]
            out[name]["seen_views_normal_err_deg"] = r["normal_err_deg"]
            out[name]["seen_views_ceiling_ssim"] = r["ceiling_ssim"]
            out[name]["seen_views_ceiling_normal_err_deg"] = r["ceiling_normal_err_deg"]
            if name == "cfg":
                out["seen_pictures"] = r["pictures"]
    return out


def picture(heads, res: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tf = res["cfg_pictures"]
    N, P = heads.truth["rgb"].shape[:2]
    fig, axes = plt.subplots(3 * N, P, figsize=(1.2 * P, 3.6 * N), squeeze=False)
    for b in range(N):
        for j in range(P):
            for r, im in enumerate((heads.truth["rgb"][b, j], tf["rgb"][b, j], tf["normal"][b, j])):
                ax = axes[3 * b + r, j]
                ax.imshow(im.permute(1, 2, 0).clamp(0, 1))
                ax.axis("off")
    plt.suptitle(title, fontsize=9)
    plt.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    plt.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)


def plot_curve(rows: list[dict], path: Path) -> None:
    """Teacher-forced SSIM and normal error against the step, with the mean head and the autoencoder's ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["step"] >= 0]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(steps, [r["cfg"]["teacher_forced_ssim"] for r in rows], "o-",
           label=f"new cameras, pitch 0 (cfg {rows[0]['cfg_scale']:g})")
    a.plot(steps, [r["cfg1"]["teacher_forced_ssim"] for r in rows], "s--", label="new cameras (cfg 1)")
    ceiling = rows[-1]["cfg"].get("teacher_forced_ceiling_ssim")
    if ceiling is not None:
        a.axhline(ceiling, color="k", lw=1, label="autoencoder ceiling")
    a.axhline(rows[-1]["cfg"]["teacher_forced_mean_head_ssim"], color="grey", ls=":", label="mean of these heads")
    seen = [r for r in rows if "seen_views_ssim" in r["cfg"]]
    if seen:
        a.plot([r["step"] for r in seen], [r["cfg"]["seen_views_ssim"] for r in seen], "^-", color="tab:green",
               label="seen views (their own cameras)")
        a.axhline(seen[-1]["cfg"]["seen_views_ceiling_ssim"], color="tab:green", lw=1, ls="--",
                  label="seen views' ceiling")
    a.set_xlabel("training step")
    a.set_ylabel("teacher-forced SSIM")
    b.plot(steps, [r["cfg"]["teacher_forced_normal_err_deg"] for r in rows], "o-", label="model")
    b.axhline(rows[-1]["cfg"]["teacher_forced_mean_head_normal_err_deg"], color="grey", ls=":", label="mean head")
    ceiling = rows[-1]["cfg"].get("teacher_forced_ceiling_normal_err_deg")
    if ceiling is not None:
        b.axhline(ceiling, color="k", lw=1, label="autoencoder ceiling")
    b.set_xlabel("training step")
    b.set_ylabel("normal error (deg)")
    for ax in (a, b):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"overfit check: {len(rows[-1]['identities'])} training heads, the cpu-size model", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--run-dir", help="a run folder with dataset, autoencoder and encoder (not needed with --plot)")
    ap.add_argument("--extra-identities", type=int, default=0, help="as the run folder was built with")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--out", default="runs/overfit")
    ap.add_argument("--model", default=None, help="measure this saved SpinModel folder instead of training")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="cosine learning-rate decay over the last N steps (profile.lr_decay_steps); a longer rerun "
                         "of a finished constant-rate run resumes it and decays over its new last N steps")
    ap.add_argument("--plot", action="store_true", help="only draw <out>/overfit_curve.png from <out>/overfit.json")
    args = ap.parse_args()
    if args.plot:
        plot_curve(json.loads((Path(args.out) / "overfit.json").read_text()), Path(args.out) / "overfit_curve.png")
        return 0
    if not args.run_dir:
        ap.error("--run-dir is required (a run folder with dataset, autoencoder and encoder)")

    from spinmeround_lite import checks
    from spinmeround_lite.checkpoints import load_checkpoint
    from spinmeround_lite.dataset import HeadDataset, ensure_dataset
    from spinmeround_lite.identity import ensure_encoder
    from spinmeround_lite.latents import ensure_vae
    from spinmeround_lite.model import SpinModel
    from spinmeround_lite.spinning import spin_yaws
    from spinmeround_lite.train import GridMaker, TrainData, checkpoint_dirs, save_sample_grid, train

    base = get_profile(args.profile)
    over = {"lr": args.lr} if args.lr else {}
    if args.decay_steps is not None:
        over["lr_decay_steps"] = args.decay_steps
    profile = base.replace(use_reference=False, train_steps=args.steps, extra_train_identities=args.extra_identities,
                           checkpoint_every=args.every, sample_every=0, **over)
    run = Run(profile, args.run_dir, notebook="overfit", seed=0)
    root = ensure_dataset(run)
    ds = HeadDataset(root, "train")
    ids = list(ds.ids[:args.heads])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codec = ensure_vae(run, progress=False)
    enc = ensure_encoder(run, "cond", progress=False)
    yaws = spin_yaws(profile.views_per_sample)
    heads = checks.make_heads([ds.params(i) for i in range(args.heads)], enc, yaws, profile.resolution)
    seen = GridMaker(TrainData(run, progress=False, identities=ids), codec, n_identities=len(ids), split="train")
    log = out / ("overfit_model.json" if args.model else "overfit.json")
    rows = json.loads(log.read_text()) if log.exists() and not args.model else []   # a longer rerun appends

    def record(model, step, seconds):
        model.eval()
        res = measure(model, codec, profile, heads, seen)
        row = {"step": step, "train_seconds": seconds, "identities": ids,
               "cfg_scale": profile.cfg_scale, **{k: res[k] for k in ("cfg", "cfg1")}}
        rows.append(row)
        f = res["cfg"]
        print(f"step {step}: teacher-forced SSIM {f['teacher_forced_ssim']:.3f} (cfg 1: "
              f"{res['cfg1']['teacher_forced_ssim']:.3f}), mean head {f['teacher_forced_mean_head_ssim']:.3f}, "
              f"normal err {f['teacher_forced_normal_err_deg']:.1f} deg, pose {f['pose_accuracy']:.2f}, "
              f"identity {f['identity_accuracy']:.2f}; seen views SSIM {f['seen_views_ssim']:.3f} (cfg 1: "
              f"{res['cfg1']['seen_views_ssim']:.3f}, ceiling {f['seen_views_ceiling_ssim']:.3f})", flush=True)
        tmp = log.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(log)
        plot_curve(rows, out / "overfit_curve.png")
        name = f"overfit_{step:06d}" if step >= 0 else "overfit_model"
        picture(heads, res, out / f"{name}.png",
                f"overfit on {len(ids)} training heads, step {step}, rig cameras: true / generated / normals")
        save_sample_grid(*res["seen_pictures"], out / f"{name}_seen.png")   # the heads at their own training views

    if args.model:
        model = SpinModel.load(args.model, profile)
        record(model, -1, 0.0)
        return 0
    t0, done = time.time(), 0
    while done < args.steps:
        r = train(run, steps=args.steps, out=out / "model", stop_after=args.every, grids=False, identities=ids,
                  progress=False)
        done = r.steps
        ck = checkpoint_dirs(out / "model")
        model = SpinModel.from_profile(profile)
        state, _ = load_checkpoint(ck[-1], name="ema.safetensors")
        model.load_state_dict(state)
        record(model, done, time.time() - t0)
        if r.steps_this_call == 0:
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
