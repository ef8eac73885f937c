"""Compare the recorded figures of two course runs, notebook by notebook.

    python tools/compare_summaries.py runs/cpu/summary.json results/cpu/summary.json

For each notebook both runs have, every number recorded in its ``figures`` (nested lists and dicts included) is
compared; timings (keys with ``second``, ``_per_s``, ``_ms``, ``speedup``, ``build_s``) and file paths are left out,
since they differ between machines and folders by nature. Prints the count of figures compared, the largest relative
difference and the figures that differ by more than ``--tol``. Exit status 1 when any does: after a change that
should not move any figure (a refactor), the run and the committed summary must agree.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

TIMING = ("second", "_per_s", "_ms", "speedup", "build_s")


def _is_timing(key: str) -> bool:
    return any(t in key for t in TIMING)


def _walk(a, b, path: list[str], out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) & set(b)):
            if not _is_timing(k):
                _walk(a[k], b[k], path + [k], out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((math.inf, ".".join(path), f"{len(a)} items", f"{len(b)} items"))
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, path + [str(i)], out)
    elif isinstance(a, bool) or isinstance(b, bool):
        out.append((0.0 if a == b else math.inf, ".".join(path), a, b))
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if (isinstance(a, float) and math.isnan(a)) and (isinstance(b, float) and math.isnan(b)):
            d = 0.0
        else:
            d = abs(a - b) / max(abs(b), 1e-12) if a != b else 0.0
        out.append((d, ".".join(path), a, b))
    elif a != b and not ("/" in str(a) and "/" in str(b)):            # text that is not a path
        out.append((math.inf, ".".join(path), a, b))


def compare(run: dict, committed: dict) -> dict[str, list]:
    """``{notebook: [(relative difference, figure path, run value, committed value), ...]}``."""
    a, b = run.get("notebooks", {}), committed.get("notebooks", {})
    res = {}
    for nb in sorted(set(a) & set(b)):
        out: list = []
        _walk(a[nb].get("figures", {}), b[nb].get("figures", {}), [], out)
        res[nb] = out
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="summary.json of the run to check")
    ap.add_argument("committed", help="summary.json to compare with (e.g. results/cpu/summary.json)")
    ap.add_argument("--tol", type=float, default=0.0, help="relative difference allowed (default 0: identical)")
    a = ap.parse_args(argv)
    with open(a.run) as f1, open(a.committed) as f2:
        run, committed = json.load(f1), json.load(f2)
    res = compare(run, committed)
    bad = 0
    for nb, out in res.items():
        worst = max((d for d, *_ in out), default=0.0)
        over = [o for o in out if o[0] > a.tol]
        bad += len(over)
        print(f"{nb:24s} {len(out):5d} figures, largest relative difference {worst:.2e}"
              + (f", {len(over)} over {a.tol:g}" if over else ""))
        for d, path, x, y in sorted(over, key=lambda o: -o[0])[:5]:
            print(f"    {path}: {x!r} vs {y!r}")
    only = sorted(set(run.get("notebooks", {})) ^ set(committed.get("notebooks", {})))
    if only:
        print("in one summary only:", ", ".join(only))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
