"""tools/compare_summaries.py: two runs' recorded figures, timings and paths left out."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_summaries",
                                              Path(__file__).parents[1] / "tools" / "compare_summaries.py")
cs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cs)


def _summary(loss, seconds, path, per_angle):
    return {"notebooks": {"05_edm_training": {"seconds": seconds, "figures": {
        "final_loss": loss, "train_seconds": seconds, "checkpoint": path, "samples_per_s": 1.0 / seconds,
        "per_angle": {"ssim": per_angle}, "source": "reference 24000 steps"}}}}


def test_equal_figures_pass_and_a_moved_figure_fails(tmp_path, capsys):
    a = _summary(0.25, 10.0, "/a/run/ckpt", [0.8, 0.7])
    b = _summary(0.25, 99.0, "/b/run/ckpt", [0.8, 0.7])                     # timings and paths differ only
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    assert cs.main([str(pa), str(pb)]) == 0
    out = cs.compare(a, b)["05_edm_training"]
    assert {p for _, p, *_ in out} == {"final_loss", "per_angle.ssim.0", "per_angle.ssim.1"}   # no timing, no path
    a["notebooks"]["05_edm_training"]["figures"]["per_angle"]["ssim"][1] = 0.7 + 1e-6   # one number moved
    pa.write_text(json.dumps(a))
    assert cs.main([str(pa), str(pb)]) == 1
    assert "per_angle.ssim.1" in capsys.readouterr().out
    assert cs.main([str(pa), str(pb), "--tol", "1e-5"]) == 0
    a["notebooks"]["05_edm_training"]["figures"]["source"] = "trained 300 steps"           # text that is not a path
    pa.write_text(json.dumps(a))
    assert cs.main([str(pa), str(pb), "--tol", "1e-5"]) == 1
