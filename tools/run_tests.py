"""`make test`'s runner: two independent lanes at once, one CPU core each, and where the time went.

    lane units      the unit tests (tests/, one thread)  ->  the portability guard: the tests marked `floats` again
                    on torch's scalar kernels (ATEN_CPU_CAPABILITY=default), another float path of the same CPU
    lane notebooks  every notebook, then every worked solution, at the test profile (nbmake)  ->  the browser tests
                    (JupyterLab in headless Chromium) on the run folder the notebooks just filled

The lanes share nothing (each has its own temporary run folder), so on a 2-core machine they take about the time of
the longer one instead of the sum. Every process runs with ``OMP_NUM_THREADS=1`` unless the caller set it: tiny
models run about as fast on one thread, and two lanes of two threads each on two cores spend their time waiting for
each other. A lane stops at its first failed stage (the next one needs it); the other lane finishes. Output lines
carry their lane's name; the last lines are a table of stage times and results.

    python tools/run_tests.py                      # what `make test` runs
    python tools/run_tests.py --lanes notebooks    # one lane
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def lanes(units_dir: str, run_dir: str) -> dict[str, list[tuple[str, list[str], dict]]]:
    """{lane: [(stage, command, extra environment), ...]}: the stages of each lane, in order."""
    return {
        "units": [
            ("unit tests", PYTEST + ["--ignore=tests/browser", "tests"], {"SMR_RUN_DIR": units_dir}),
            ("portability guard (scalar kernels)",
             PYTEST + ["-m", "floats", "--durations=5", "--ignore=tests/browser", "tests"],
             {"SMR_RUN_DIR": units_dir, "ATEN_CPU_CAPABILITY": "default"}),
        ],
        "notebooks": [
            ("notebooks and solutions", PYTEST + ["--nbmake", "--nbmake-timeout=1200", "notebooks", "solutions"],
             {"SMR_RUN_DIR": run_dir}),
            ("browser tests", PYTEST + ["tests/browser"], {"SMR_RUN_DIR": run_dir}),
        ],
    }


class Lane(threading.Thread):
    """Runs one lane's stages in order, prefixing every output line with the lane's name."""

    def __init__(self, name: str, stages: list, env: dict, lock: threading.Lock):
        super().__init__(daemon=True)
        self.name_, self.stages, self.env, self.lock = name, stages, env, lock
        self.results: list[tuple[str, float, int | None, str]] = []      # (stage, seconds, return code, last line)
        self.proc: subprocess.Popen | None = None

    def say(self, line: str) -> None:
        with self.lock:
            print(f"[{self.name_}] {line}", flush=True)

    def run(self) -> None:
        for stage, cmd, extra in self.stages:
            self.say(f"--- {stage}: {' '.join(k + '=' + v for k, v in extra.items() if k != 'SMR_RUN_DIR')} "
                     f"{' '.join(cmd[1:])}".replace("  ", " "))
            t0, last = time.perf_counter(), ""
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **extra}, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
            for line in self.proc.stdout:
                line = line.rstrip("\n")
                if line.strip():
                    last = line.strip()
                self.say(line)
            rc = self.proc.wait()
            self.results.append((stage, time.perf_counter() - t0, rc, last))
            if rc != 0:
                self.say(f"--- {stage} failed (exit {rc}); the rest of this lane is skipped")
                for later, _, _ in self.stages[len(self.results):]:
                    self.results.append((later, 0.0, None, "skipped: an earlier stage of its lane failed"))
                return

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", nargs="+", choices=["units", "notebooks"], default=["units", "notebooks"])
    args = ap.parse_args(argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(env.get("TMPDIR") or tempfile.gettempdir())
    units_dir = tempfile.mkdtemp(prefix="smr-units-", dir=tmp)
    run_dir = tempfile.mkdtemp(prefix="smr-test-run-", dir=tmp)
    lock = threading.Lock()
    todo = {k: v for k, v in lanes(units_dir, run_dir).items() if k in args.lanes}
    print(f"make test: lanes {', '.join(todo)} at once, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
          + (f", ATEN_CPU_CAPABILITY={env['ATEN_CPU_CAPABILITY']}" if env.get("ATEN_CPU_CAPABILITY") else ""),
          flush=True)
    t0 = time.perf_counter()
    workers = [Lane(name, stages, env, lock) for name, stages in todo.items()]
    try:
        for w in workers:
            w.start()
        for w in workers:
            while w.is_alive():
                w.join(0.5)
    except KeyboardInterrupt:
        for w in workers:
            w.stop()
        print("interrupted: stopped every lane", file=sys.stderr)
        return 130
    finally:
        for d in (units_dir, run_dir):
            shutil.rmtree(d, ignore_errors=True)
    wall = time.perf_counter() - t0
    print(f"\n{'lane':<10} {'stage':<36} {'minutes':>7}  result")
    ok = True
    for w in workers:
        for stage, seconds, rc, last in w.results:
            ok &= rc == 0
            print(f"{w.name_:<10} {stage:<36} {seconds / 60:7.1f}  {'ok' if rc == 0 else 'FAILED'}: {last[:90]}")
    print(f"{'':<10} {'both lanes, wall time':<36} {wall / 60:7.1f}  {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
