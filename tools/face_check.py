"""Are there faces near the input? dlib's face detector on the views a model generates at +-22.5 and +-45 degrees.

    python tools/face_check.py --model reference/cpu/spin --run-dir runs/eval20 --identities 16

The held-out heads' frontal renders go in and the views at 0, +22.5, +45, -22.5 and -45 degrees come out exactly as
``python -m spinmeround_lite.evaluate`` samples them (``evaluate.generate_case``: steps A, B and C of ``spin``, case
``k`` seeded ``1000 k``); the detector runs on them and on the true renders at the same angles. A quick check of one
checkpoint against another (a few minutes for 16 heads on one thread), without the whole evaluation. Prints JSON:
the detection rate per angle for the model and the truth, and the median dlib descriptor distance between the
generated and the true view where both hold a face (below 0.6: the same person for dlib). ``--grid`` writes the
first four heads' truth and generated rows as a PNG.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite import evaluate as E  # noqa: E402
from spinmeround_lite import faces  # noqa: E402
from spinmeround_lite.dataset import HeadDataset, ensure_dataset  # noqa: E402
from spinmeround_lite.model import SpinModel  # noqa: E402
from spinmeround_lite.runs import Run  # noqa: E402
from spinmeround_lite.spinning import SpinParts  # noqa: E402

YAWS = (0.0, 22.5, 45.0, -22.5, -45.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved multi-view model folder")
    ap.add_argument("--run-dir", required=True, help="a run folder (dataset, autoencoder, encoders)")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--identities", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the profile's)")
    ap.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the profile's)")
    ap.add_argument("--grid", default=None, help="PNG of the first four heads: truth above, generated below")
    a = ap.parse_args()
    if not faces.dlib_available():
        raise SystemExit(E.FACE_DETECTOR_MISSING)
    run = Run.open(a.profile, a.run_dir, notebook="face_check", seed=0)
    root = ensure_dataset(run)
    ds = HeadDataset(root, split="heldout")
    yaws = torch.tensor(YAWS)
    n = min(a.identities, len(ds))
    cases = [E._case(ds, i, ds.ids[i], yaws, root, run.device, run.profile.render_chunk) for i in range(n)]
    parts = SpinParts.from_run(run, progress=False)
    parts.model = SpinModel.load(a.model, run.profile).eval()
    det = faces.FaceDescriptor()
    found_t, found_m, dist, rows = [], [], [], []
    t0 = time.time()
    for k, c in enumerate(cases):
        out = E.generate_case(parts, c, seed=1000 * k, steps=a.steps, cfg_scale=a.cfg)
        et, em = det.embed(c.rgb[1:]), det.embed(out["rgb"][1:])
        found_t.append(det.detected(et))
        found_m.append(det.detected(em))
        dist.append(det.distance_between(em, et))
        rows.append((c.rgb, out["rgb"]))
    ft, fm, d = torch.stack(found_t).float(), torch.stack(found_m).float(), torch.stack(dist)
    ok = ~d.isnan()
    res = {"model": a.model, "identities": n, "yaw": list(YAWS[1:]), "truth_found": ft.mean(0).tolist(),
           "model_found": fm.mean(0).tolist(), "median_distance": float(d[ok].median()) if ok.any() else None,
           "steps": a.steps, "cfg": a.cfg, "seconds": round(time.time() - t0, 1)}
    print(json.dumps(res))
    if a.grid:
        from spinmeround_lite.train import save_grid
        save_grid([torch.cat([t for t, _ in rows[:4]]), torch.cat([g for _, g in rows[:4]])], Path(a.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
