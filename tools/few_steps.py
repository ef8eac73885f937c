"""Samplers against the 20-step Euler spin on held-out heads: counted network work, time, L2, SSIM, identity,
normals, with 95 % paired bootstrap intervals (notebook 12's table; ``results/<profile>/few_steps.json``).

    python tools/few_steps.py --profile cpu --identities 16 --configs euler:8 dpm2m:4 dpm2m:8 student \
        --out results/cpu/few_steps.json

Each config is ``sampler[:steps]`` (``euler``, ``heun``, ``dpm2m``, ``student``); the reference is the profile's
Euler spin. Same heads, angles and seeds for every row (``evaluate.evaluate_samplers``).
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spinmeround_lite.evaluate import evaluate_samplers  # noqa: E402
from spinmeround_lite.runs import Run, write_json  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--run-dir", default="")
    ap.add_argument("--identities", type=int, default=16, help="held-out heads (16 = the committed protocol)")
    ap.add_argument("--angles", type=int, default=None, help="angles per head (default: the profile's, 16)")
    ap.add_argument("--configs", nargs="+", default=["euler:8", "dpm2m:4", "dpm2m:8", "student"])
    ap.add_argument("--out", default="", help="write the JSON here (e.g. results/cpu/few_steps.json)")
    ap.add_argument("--extend", action="store_true",
                    help="keep the rows already in --out (same heads, angles, seed) and measure only the new configs")
    ap.add_argument("--previous", default="", help="with --extend: read the earlier result from here instead of --out")
    ap.add_argument("--no-reference", action="store_true",
                    help="measure only --configs (no reference row); --merge compares them later")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="merge these result files (same heads and seed) into --out, against --reference")
    ap.add_argument("--reference", default="euler20", help="with --merge: the row the others are compared with")
    ap.add_argument("--note", default="", help="a line stored with the result")
    ap.add_argument("--teacher-as-student", type=int, default=0, metavar="K",
                    help="measure the teacher's own weights sampled like a K-step student (the student's schedule, "
                         "one call a step, no guidance): the baseline of distillation, row student_step0")
    a = ap.parse_args()
    run = Run.open(a.profile, a.run_dir, notebook="12_fewer_steps_cli")
    configs = [(c.split(":")[0], int(c.split(":")[1]) if ":" in c else None) for c in a.configs]
    t0 = time.time()
    if a.merge:
        from spinmeround_lite.evaluate import merge_sampler_results
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        res = merge_sampler_results(parts, a.reference)
        res["commands"] = sum((p.get("commands", []) for p in parts), []) + [
            "python tools/few_steps.py " + " ".join(sys.argv[1:])]
        res["seconds"] = sum(p.get("seconds", 0.0) for p in parts)
        _report(res, a.out, a.note)
        return 0
    prev_path = Path(a.previous or a.out) if a.extend else None
    previous = json.loads(prev_path.read_text()) if prev_path is not None and prev_path.exists() else None
    parts = None
    if a.teacher_as_student:
        import copy

        from spinmeround_lite import distill
        from spinmeround_lite.spinning import SpinParts
        base = SpinParts.from_run(run, progress=False)
        parts = SpinParts(base.model, base.codec, base.encoder, run.profile, base.source,
                          distill.as_student(copy.deepcopy(base.model), run.profile, a.teacher_as_student),
                          "the teacher's weights as a student (not distilled)")
        configs = [("student", None)]
    res = evaluate_samplers(run, configs, a.identities, a.angles, previous=previous, parts=parts,
                            reference=None if a.no_reference else ("euler", None))
    if a.teacher_as_student:
        res["rows"]["student_step0"] = res["rows"].pop("student")
        res["tables"]["student_step0"] = res["tables"].pop("student")
    res["commands"] = (previous or {}).get("commands", []) + ["python tools/few_steps.py " + " ".join(sys.argv[1:])]
    res["seconds"] = (previous or {}).get("seconds", 0.0) + time.time() - t0
    _report(res, a.out, a.note)
    return 0


def _report(res: dict, out: str, note: str = "") -> None:
    if note:
        res["notes"] = res.get("notes", []) + [note]
    for name, r in res["rows"].items():
        d = r.get("minus_reference") or {}
        def fmt(m):
            return "" if not d.get(m) else f" {m} {d[m]['mean']:+.4f} [{d[m]['ci95'][0]:+.4f}, {d[m]['ci95'][1]:+.4f}]"
        print(f"{name:12s} calls {r.get('network_calls')} views {r.get('view_evaluations')} "
              f"s {r.get('seconds', 0):.1f} l2 {r.get('l2')} ssim {r.get('ssim')}{fmt('ssim')}{fmt('l2')}"
              f"{r.get('unavailable', '')}")
    if out:
        write_json(out, res)
        print("written", out)
    else:
        print(json.dumps(res["rows"], indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
