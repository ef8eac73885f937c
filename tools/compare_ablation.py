"""Compare one ablation checkpoint with the full model of a committed evaluation, on the same held-out heads.

    python tools/compare_ablation.py --name no_normals --model runs/ref4-cpu/models/ablation_no_normals \
        --run-dir runs/eval16c --full results/cpu/evaluation.json --out results/cpu/ablation_no_normals_14000.json

The ablation is sampled as ``python -m spinmeround_lite.evaluate`` samples it (same heads, angles, seed, decoder);
the full model's per-head figures come from ``--full``, so the run folder must be the one that evaluation used
(same autoencoder and encoders). Prints and writes the paired bootstrap differences (full minus ablation).

When the reference trained longer than the ablation, ``--full-model`` names the full model at the ablation's budget
(for example the reference's earlier export); it is then sampled here on the same heads and seeds, and compared.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite import evaluate as E  # noqa: E402
from spinmeround_lite.model import SpinModel  # noqa: E402
from spinmeround_lite.runs import Run, write_json  # noqa: E402
from spinmeround_lite.spinning import SpinParts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, choices=sorted(E.ABLATIONS))
    ap.add_argument("--model", required=True, help="folder of the ablation's saved model")
    ap.add_argument("--run-dir", required=True, help="the run folder of the evaluation given with --full")
    ap.add_argument("--full", required=True, help="evaluation.json holding the full model's per-head figures")
    ap.add_argument("--full-model", help="compare with this saved full model instead (evaluated here on the same "
                    "heads and seeds): the full model at the ablation's budget, when the reference trained longer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", default="cpu")
    a = ap.parse_args()
    full_eval = json.loads(Path(a.full).read_text())
    proto = full_eval["protocol"]
    run = Run.open(a.profile, a.run_dir, notebook="compare_ablation", seed=0)
    cases = E.heldout_cases(run, identities=proto["identities"], n_angles=proto["n_angles"])
    parts = SpinParts.from_run(run)
    model = SpinModel.load(a.model, run.profile)
    E.check_ablation_config(model, E.ABLATIONS[a.name], a.model, a.name)
    encoders = E.evaluation_encoders(run, parts.encoder)
    ab = SpinParts(model.eval(), parts.codec, parts.encoder, parts.profile, str(a.model))
    res = E.strip_views(E.evaluate_method(cases, E.model_method(ab, E.ABLATION_VARIANTS[a.name], run.seed),
                                          encoders, a.name, E.describe_source("trained", model)))
    full, full_steps = full_eval["model"], None
    if a.full_model:
        fm = SpinModel.load(a.full_model, run.profile)
        full_steps = E.trained_steps(fm)
        fp = SpinParts(fm.eval(), parts.codec, parts.encoder, parts.profile, str(a.full_model))
        full = E.strip_views(E.evaluate_method(cases, E.model_method(fp, E.FULL, run.seed), encoders,
                                               "full model", E.describe_source("trained", fm)))
    diff = E.compare(full, res)
    write_json(a.out, {"ablation": a.name, "steps": E.trained_steps(model), "model": str(a.model),
                       "full": str(a.full_model or a.full), "full_steps": full_steps,
                       "identities": proto["identities"], "result": res,
                       "full_result": full if a.full_model else None, "full_minus_ablation": diff})
    for k in ("l2", "ssim", "id_sim_eval", "face_found"):
        if diff.get(k):
            lo, hi = diff[k]["ci95"]
            print(f"full minus {a.name} ({E.trained_steps(model)} steps), {k}: {diff[k]['mean']:+.4f} "
                  f"[{lo:+.4f}, {hi:+.4f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
