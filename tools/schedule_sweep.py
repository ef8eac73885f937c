"""Which Karras schedule suits DPM-Solver++(2M) on the trained model: the integration error of step B (7 anchors
from the input view, guided) against the ODE's solution, for several rho and sigma_min at few steps.

    python tools/schedule_sweep.py --profile cpu --heads 3 --out results/cpu/dpm_schedule.json

The ODE's solution is Heun with ``--ref-steps`` steps on the profile's schedule (its difference from half as many is
printed and recorded).
The error is the RMS difference of the anchors' latents (8 channels, 7 views) from it, mean over heads.
"""

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite import sampling  # noqa: E402
from spinmeround_lite import spinning as S  # noqa: E402
from spinmeround_lite.evaluate import heldout_cases  # noqa: E402
from spinmeround_lite.runs import Run, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8])
    ap.add_argument("--rhos", type=float, nargs="+", default=[3.0, 5.0, 7.0, 10.0])
    ap.add_argument("--sigma-mins", type=float, nargs="+", default=[0.002, 0.02, 0.1])
    ap.add_argument("--ref-steps", type=int, default=64, help="Heun steps of the reference integration")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    run = Run.open(a.profile, a.run_dir, notebook="12_schedule_sweep")
    P = run.profile
    parts = S.SpinParts.from_run(run, progress=False)
    cases = heldout_cases(run, a.heads, 2, progress=False)
    inputs = []
    for k, c in enumerate(cases):
        img = c.input_rgb.float()[None]
        emb = parts.encoder.embed(img).float()
        z_img = parts.codec.encode(img).float()
        z_in = S.infer_normals(parts.model, P, z_img, emb, seed=k)[0]
        inputs.append((z_in, emb, 1000 * k + 1))

    def anchors(solver, sig):
        return [S.anchors(parts.model, P, z[None], e, 0.0, seed=sd, solver=solver, sigmas=sig)[0]
                for z, e, sd in inputs]

    t0 = time.time()
    exact = anchors("heun", S.sampling.profile_sigmas(P, a.ref_steps))
    check = anchors("heun", S.sampling.profile_sigmas(P, a.ref_steps // 2))
    rms = lambda xs: float(torch.stack([(x - e).pow(2).mean().sqrt() for x, e in zip(xs, exact)]).mean())
    out = {"reference": f"heun {a.ref_steps} steps, profile schedule", "reference_error_vs_half": rms(check),
           "rows": []}
    print(f"reference heun {a.ref_steps} vs {a.ref_steps // 2} steps: {out['reference_error_vs_half']:.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    for n in a.steps:
        e = rms(anchors("euler", S.sampling.profile_sigmas(P, n)))
        out["rows"].append({"solver": "euler", "steps": n, "rho": 7.0, "sigma_min": P.sample_sigma_min, "rms": e})
        print(f"euler {n} rho 7 smin {P.sample_sigma_min}: {e:.4f}", flush=True)
        for rho, smin in itertools.product(a.rhos, a.sigma_mins):
            sig = sampling.karras_sigmas(n, smin, P.sample_sigma_max, rho)
            e = rms(anchors("dpm2m", sig))
            out["rows"].append({"solver": "dpm2m", "steps": n, "rho": rho, "sigma_min": smin, "rms": e})
            print(f"dpm2m {n} rho {rho} smin {smin}: {e:.4f}", flush=True)
    e20 = rms(anchors("euler", S.sampling.profile_sigmas(P, P.sample_steps)))
    out["euler_profile_steps"] = {"steps": P.sample_steps, "rms": e20}
    print(f"euler {P.sample_steps} (the profile's spin): {e20:.4f}")
    out["command"] = "python tools/schedule_sweep.py " + " ".join(sys.argv[1:])
    out["seconds"] = time.time() - t0
    if a.out:
        write_json(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
