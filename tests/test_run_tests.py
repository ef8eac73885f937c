"""tools/run_tests.py, `make test`'s runner: two lanes at once, a failed stage stops its own lane only, every
stage timed, the exit code red when anything failed, one thread per process unless the caller says otherwise."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tools_run_tests", ROOT / "tools" / "run_tests.py")
tl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tl)


def fake_lanes(marker: Path, fail_first_units: bool):
    py = [sys.executable, "-c"]
    write = ("import os, pathlib; "
             "pathlib.Path(os.environ['MARK'] + '.' + {!r}).write_text(os.environ['OMP_NUM_THREADS'])")

    def _lanes(units_dir, run_dir):
        return {
            "units": [("first", py + [("raise SystemExit(3)" if fail_first_units else write.format("u1"))], {}),
                      ("second", py + [write.format("u2")], {})],
            "notebooks": [("first", py + [write.format("n1")], {"MARK": str(marker)}),
                          ("second", py + [write.format("n2")], {"MARK": str(marker)})],
        }
    return _lanes


def test_both_lanes_run_every_stage_on_one_thread(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tl, "lanes", fake_lanes(tmp_path / "m", fail_first_units=False))
    monkeypatch.setenv("MARK", str(tmp_path / "m"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert tl.main([]) == 0
    for stage in ("u1", "u2", "n1", "n2"):
        assert (tmp_path / f"m.{stage}").read_text() == "1", stage
    out = capsys.readouterr().out
    assert "both lanes, wall time" in out and "FAILED" not in out


def test_a_failed_stage_stops_its_lane_only_and_the_run_is_red(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tl, "lanes", fake_lanes(tmp_path / "m", fail_first_units=True))
    monkeypatch.setenv("MARK", str(tmp_path / "m"))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")                      # the caller's setting wins
    assert tl.main([]) == 1
    assert not (tmp_path / "m.u2").exists()                        # after the failure, its lane stopped
    assert (tmp_path / "m.n2").read_text() == "2"                  # the other lane finished, on the caller's threads
    out = capsys.readouterr().out
    assert "first failed (exit 3)" in out and "skipped: an earlier stage of its lane failed" in out


def test_the_real_lanes_keep_their_run_folders_apart():
    lanes = tl.lanes("/u", "/r")
    assert set(lanes) == {"units", "notebooks"}
    assert {e["SMR_RUN_DIR"] for _, _, e in lanes["units"]} == {"/u"}
    assert {e["SMR_RUN_DIR"] for _, _, e in lanes["notebooks"]} == {"/r"}
    guard = lanes["units"][1]
    assert guard[2]["ATEN_CPU_CAPABILITY"] == "default" and "floats" in guard[1]
    assert "--nbmake" in lanes["notebooks"][0][1] and "tests/browser" in lanes["notebooks"][1][1]
    assert "--ignore=tests/browser" in lanes["units"][0][1]
