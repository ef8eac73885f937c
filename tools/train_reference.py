"""Train the course's reference checkpoints for a profile and export them to ``reference/<profile>/``.

    python tools/train_reference.py --profile cpu --steps 4000            # long; safe to stop and run again
    python tools/train_reference.py --profile cpu --steps 4000 --export   # copy what is trained so far
    python tools/train_reference.py --profile cpu --steps 1000 --ablation no_identity   # an ablation reference

The same functions the notebooks teach build everything in a run folder of its own (``runs/reference-<profile>``,
which never reads reference checkpoints itself): the dataset (notebook 00), the conditioning identity encoder
(01), the autoencoder (03) and the multi-view model with the profile's trainer (05), for ``--steps`` steps.
Training resumes from its last checkpoint, so a killed run loses at most ``checkpoint_every`` steps.
The export holds ``spin/`` (EMA weights), ``vae/``, ``id_cond/`` and ``manifest.json`` (profile, commit, data
seed, steps, machine, figures, data, recipe, samples seen, and one ``campaign`` entry per export). Weights are stored
in float16 (they load into float32). The sampling, splatting and evaluation notebooks of that profile start from them.

``--ablation NAME`` (``no_input_image``, ``no_identity``, ``no_normals`` or ``full_same_budget``) trains that variant
in the same run folder, on the same data, for ``--steps`` steps, and exports it to ``reference/<profile>/ablation_NAME``
(notebook 09 then loads it instead of training); the manifest's ``ablations`` entry records its budget.
"""

import argparse
import datetime as dt
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite.evaluate import ABLATIONS  # noqa: E402
from spinmeround_lite.profiles import get_profile  # noqa: E402
from spinmeround_lite.runs import Run, atomic_folder, read_json, write_json  # noqa: E402


def export_model_dir(src: Path, tgt: Path) -> int:
    """Copy a training folder's EMA weights to ``tgt`` in float16 (finished: its saved model; still training: its
    newest checkpoint's EMA), with ``config.json``, ``loss.png`` and ``log.json``; ``COMPLETE`` last. -> steps."""
    from spinmeround_lite.checkpoints import save_checkpoint
    from spinmeround_lite.train import newest_weights

    try:
        state, config, steps = newest_weights(Path(src))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    config = dict(config, step=steps)
    with atomic_folder(tgt) as tmp:
        save_checkpoint(tmp, {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, config)
        for extra in ("loss.png", "log.json") if Run.is_complete(src) else ("loss.png",):   # a running log is stale
            if (src / extra).exists():
                shutil.copy2(src / extra, tmp / extra)
        Run.mark_complete(tmp, {"step": steps, "dtype": "float16"})
    return steps


def export(run: Run, dest: Path, seconds: float | None, model_name: str = "spin") -> int:
    """``vae/``, ``id_cond/``, ``spin/`` (float16, from the run's ``model_name`` folder) and ``manifest.json`` into
    ``dest``; -> the model's steps."""
    spin_dir = run.model_dir(model_name)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "id_cond"):
        src = run.model_dir(name)
        if not Run.is_complete(src):
            raise SystemExit(f"{src} is not complete; run without --export first")
        with atomic_folder(dest / name) as tmp:                 # an interrupted export keeps the old copy
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    steps_done = export_model_dir(spin_dir, dest / "spin")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    figs = {}
    log = spin_dir / "log.json"
    if log.exists():
        lg = read_json(log)
        figs = {k: lg.get(k) for k in ("final_loss", "samples_per_s", "steps") if k in lg}
    old = read_json(dest / "manifest.json") if (dest / "manifest.json").exists() else {}
    write_json(dest / "manifest.json", {
        **{k: old[k] for k in ("campaign", "ablations") if k in old},
        "profile": run.profile.name, "commit": commit, "data_seed": run.seed, "train_steps": steps_done,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, no GPU"
                   if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "trained_on": "CPU: a long background run of the course's own trainer (no GPU was available)"
                      if not torch.cuda.is_available() else "CUDA GPU",
        "train_seconds": seconds, "figures": figs,
        "parts": {"vae": "autoencoder", "id_cond": "conditioning encoder", **old.get("parts", {}),
                  "spin": "multi-view model, EMA weights, stored in float16 (loads into float32)"},
    })
    print(f"exported to {dest}")
    return steps_done


def finetune_decoder_and_export(run: Run, dest: Path, steps: int, note: str | None,
                                face_region: str = "frontal") -> int:
    """Train the run's autoencoder decoder on (``latents.finetune_run_decoder``) and export ``vae/`` into ``dest``,
    with a campaign entry in its manifest."""
    from spinmeround_lite.latents import ensure_vae, finetune_run_decoder

    ensure_vae(run)
    rec = finetune_run_decoder(run, steps, face_region=face_region)
    tgt = dest / "vae"
    with atomic_folder(tgt) as tmp:
        shutil.copytree(run.model_dir("vae"), tmp, dirs_exist_ok=True)
    man = read_json(dest / "manifest.json") if (dest / "manifest.json").exists() else {}
    entry = {"exported": dt.datetime.now().isoformat(timespec="seconds"),
             "steps": steps, "seconds_this_call": rec["seconds"], "threads": torch.get_num_threads(),
             "heldout_before": rec["heldout_before"], "heldout_after": rec["heldout_after"], "face_region": face_region}
    if note:
        entry["note"] = note
    man.setdefault("vae_decoder_campaign", []).append(entry)       # apart from the models' "campaign"
    write_json(dest / "manifest.json", man)
    b, a = rec["heldout_before"], rec["heldout_after"]
    print(f"decoder trained on {steps} steps in {rec['seconds'] / 60:.1f} min: held-out RGB {b['psnr_rgb']:.2f} -> "
          f"{a['psnr_rgb']:.2f} dB, face {b['face_psnr_rgb']:.2f} -> {a['face_psnr_rgb']:.2f} dB, normals "
          f"{b['normal_angle_err_deg']:.2f} -> {a['normal_angle_err_deg']:.2f} deg; exported to {tgt}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=4000, help="training steps of the multi-view model")
    ap.add_argument("--run-dir", default=None, help="default: runs/reference-<profile>")
    ap.add_argument("--out", default=None, help="default: reference/<profile>")
    ap.add_argument("--export", action="store_true", help="only export what is trained so far")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-identities", type=int, default=0,
                    help="training heads beyond the profile's (named after them; the held-out heads stay the course's)")
    ap.add_argument("--batch-size", type=int, default=None, help="samples per step (default: the profile's)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the profile's)")
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="cosine learning-rate decay over the last N steps (default: the profile's lr_decay_steps)")
    ap.add_argument("--init-from", default=None,
                    help="a saved multi-view model folder to start from (a fine-tuning stage of the campaign, e.g. "
                         "onto a retrained autoencoder); trains into --model-name")
    ap.add_argument("--face-weight", type=float, default=0.0,
                    help="the face of each target counts 1 + this times in the loss (train.face_weights; 0 = the "
                         "paper's uniform loss); recorded in the model's config")
    ap.add_argument("--model-name", default="spin",
                    help="the run's model folder to train and export as spin/ (a fine-tuning stage: its own name)")
    ap.add_argument("--decoder-steps", type=int, default=None,
                    help="only train the run's autoencoder decoder on for this many steps (encoder frozen, so the "
                         "latent cache and every model stay valid) and export vae/")
    ap.add_argument("--decoder-face-region", default="frontal", choices=["frontal", "projected"],
                    help="with --decoder-steps: which pixels the face weight covers (latents.ImagePool."
                         "batch_with_face_weights): the frontal face box of near-frontal views, or each view's own "
                         "projected face box")
    ap.add_argument("--note", default=None, help="a line for this export's campaign entry")
    ap.add_argument("--ablation", default=None,
                    choices=[*ABLATIONS, "full_same_budget"],
                    help="train and export this ablation (same run folder and data) instead of the full model")
    args = ap.parse_args()
    base = get_profile(args.profile)
    over = {k: v for k, v in dict(batch_size=args.batch_size, lr=args.lr, lr_decay_steps=args.decay_steps).items()
            if v is not None}
    profile = base.replace(use_reference=False, train_steps=args.steps, extra_train_identities=args.extra_identities,
                           checkpoint_every=max(50, min(250, args.steps // 10)),
                           sample_every=max(100, args.steps // 8), **over)
    run = Run(profile, args.run_dir or ROOT / "runs" / f"reference-{base.name}", notebook="reference",
              seed=args.seed)
    dest = Path(args.out) if args.out else ROOT / "reference" / base.name
    if args.decoder_steps:
        return finetune_decoder_and_export(run, dest, args.decoder_steps, args.note, args.decoder_face_region)
    if not args.export:
        from spinmeround_lite.dataset import ensure_dataset
        from spinmeround_lite.identity import ensure_encoder
        from spinmeround_lite.latents import ensure_vae
        from spinmeround_lite.train import train

        ensure_dataset(run)
        ensure_encoder(run, "cond")
        ensure_vae(run)
        t0 = dt.datetime.now()
        if args.ablation:
            options = {} if args.ablation == "full_same_budget" else ABLATIONS[args.ablation]
            train(run, steps=args.steps, out=run.model_dir(f"ablation_{args.ablation}"), grids=False,
                  init_from=args.init_from, face_weight=args.face_weight, **options)
        else:
            train(run, steps=args.steps, out=run.model_dir(args.model_name), init_from=args.init_from,
                  face_weight=args.face_weight)
        seconds = (dt.datetime.now() - t0).total_seconds()
    else:
        seconds = None
    if args.ablation:
        return export_ablation(run, dest, args.ablation, seconds)
    done = export(run, dest, seconds, args.model_name)
    man = read_json(dest / "manifest.json")
    man["data"] = data_entry(run, args.extra_identities)
    man["recipe"] = {k: getattr(run.profile, k) for k in ("batch_size", "lr", "views_per_sample", "ema_decay",
                                                            "stage1_fraction", "lr_decay_steps", "vae_steps",
                                                            "vae_lr")}
    campaign = man.setdefault("campaign", [])
    entry = {"exported": man["created"], "steps": done, "seconds_this_call": seconds,
             "threads": torch.get_num_threads(), "model_folder": args.model_name}
    if args.init_from:
        entry["init_from"] = str(args.init_from)
    if args.face_weight:
        entry["face_weight"] = args.face_weight
    if args.note:
        entry["note"] = args.note
    campaign.append(entry)
    # the steps of every stage (a stage exported twice is one run, further on: its last export counts)
    last = {}
    for c in campaign:
        last[c.get("model_folder", "spin")] = c["steps"]
    man["train_steps_all_stages"] = sum(last.values())
    man["samples_seen"] = man["train_steps_all_stages"] * run.profile.batch_size * run.profile.grad_accum
    write_json(dest / "manifest.json", man)
    return 0


def data_entry(run: Run, extra_identities: int) -> dict:
    """Which data a reference model saw: the run's train split; held out: the profile's held-out heads (those of
    the run's data and the evaluation-only heads, which no training set reaches)."""
    from spinmeround_lite.dataset import heldout_names, read_meta
    meta = read_meta(run.data_dir)
    heldout = heldout_names(run.profile)
    leaked = set(meta["splits"]["train"]) & set(heldout)
    if leaked:
        raise SystemExit(f"held-out heads {sorted(leaked)[:5]} are in the training split of {run.data_dir}")
    return {"identities_train": len(meta["splits"]["train"]), "identities_heldout": len(heldout), "heldout": heldout,
            "views_per_identity": meta["views_per_identity"],
            "resolution": meta["resolution"], "per_identity_cameras": meta["camera"].get("per_identity_cameras"),
            "extra_train_identities": extra_identities, "seed": run.seed}


def export_ablation(run: Run, dest: Path, name: str, seconds: float | None) -> int:
    """``reference/<profile>/ablation_<name>`` (float16) and its budget in the reference manifest."""
    steps = export_model_dir(run.model_dir(f"ablation_{name}"), dest / f"ablation_{name}")
    man_path = dest / "manifest.json"
    man = read_json(man_path) if man_path.exists() else {}
    man.setdefault("ablations", {})[name] = {
        "steps": steps, "samples_seen": steps * run.profile.batch_size * run.profile.grad_accum,
        "seconds": seconds, "threads": torch.get_num_threads(),
        "recipe": {k: getattr(run.profile, k) for k in ("batch_size", "lr", "lr_decay_steps", "views_per_sample",
                                                         "ema_decay", "stage1_fraction")},
        "data": "the full reference's run folder and training heads",
        "created": dt.datetime.now().isoformat(timespec="seconds")}
    write_json(man_path, man)
    print(f"exported ablation {name} ({steps} steps) to {dest / f'ablation_{name}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
