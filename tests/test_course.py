"""The course runner: order, summary.json, figures, stop at the first failure, and clean notebooks."""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from spinmeround_lite import course

ROOT = Path(__file__).resolve().parents[1]


def _nb(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    params = nbformat.v4.new_code_cell('profile = ""\nrun_dir = ""\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem} title"), params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)
    return path


def test_runner_summary_and_stop_at_first_failure(tmp_path):
    src = tmp_path / "nbs"
    src.mkdir()
    ok = _nb(src / "00_ok.ipynb", "from spinmeround_lite.runs import Run\n"
             "run = Run.open(profile, run_dir, notebook='00_ok', seed=seed)\n"
             "run.record(answer=42, profile_seen=run.profile.name)")
    bad = _nb(src / "01_bad.ipynb", "x = 1\nraise ValueError('broken on purpose')")
    never = _nb(src / "02_never.ipynb", "pass")
    out = tmp_path / "run"
    s = course.run_course("test", out, notebooks=[ok, bad, never], progress=False)
    assert s["status"] == "failed"
    nbs = s["notebooks"]
    assert nbs["00_ok"]["status"] == "ok" and nbs["00_ok"]["figures"] == {"answer": 42, "profile_seen": "test"}
    assert nbs["00_ok"]["seconds"] > 0
    assert nbs["01_bad"]["status"] == "failed" and "broken on purpose" in nbs["01_bad"]["error"]
    assert nbs["01_bad"]["failed_cell"] == 3  # in the executed notebook: papermill inserts its parameters cell
    assert "x = 1" in nbs["01_bad"]["failed_source"]
    assert nbs["02_never"]["status"] == "pending"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["notebooks"]["00_ok"]["figures"]["answer"] == 42
    assert (out / "notebooks" / "00_ok.ipynb").exists()


def test_runner_kernels_use_ipc_and_print_one_line_per_notebook(tmp_path, capfd):
    src = tmp_path / "nbs"
    src.mkdir()
    nb = _nb(src / "00_quiet.ipynb", "from spinmeround_lite.runs import Run\n"
             "Run.open(profile, run_dir, notebook='00_quiet', seed=seed).record(transport='ipc')")
    assert course.kernel_config().KernelManager.transport == "ipc"
    s = course.run_course("test", tmp_path / "run", notebooks=[nb])
    assert s["status"] == "ok"
    out, err = capfd.readouterr()
    assert "without encryption" not in out + err             # ipykernel warns only about TCP
    lines = [ln for ln in out.splitlines() if "00_quiet" in ln]
    assert len(lines) == 1 and "ok" in lines[0] and "transport=ipc" in lines[0]


def _parameter_names(nb) -> set[str]:
    """Names assigned in a notebook's ``parameters`` cell, each to a plain literal (papermill overrides them)."""
    import ast
    cell = next(c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    body = ast.parse(cell.source).body
    assert all(isinstance(n, ast.Assign) and _is_literal(n.value) for n in body), cell.source
    return {t.id for n in body for t in n.targets}


def _is_literal(node) -> bool:
    """A plain literal papermill can replace: a constant, or a dict/list of them (``overrides = {}``)."""
    import ast
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return isinstance(node, (ast.Constant, ast.Dict, ast.List))


def test_solutions_answer_every_notebook_and_run_like_the_course():
    nbs = {p.stem for p in course.list_notebooks(ROOT / "notebooks")}
    sols = {p.stem for p in course.list_notebooks(ROOT / "solutions")}
    assert sols and not sols - nbs, f"solutions without a notebook: {sorted(sols - nbs)}"
    assert not nbs - sols, f"notebooks without worked solutions: {sorted(nbs - sols)}"
    for p in sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{p.name} carries outputs"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, p.name
        text = "\n".join(c.source for c in nb.cells)
        assert f"notebooks/{p.name}" in nb.cells[0].source, f"{p.name} must open with the notebook it answers"
        assert f'notebook="solutions_{p.stem[:2]}"' in text, p.name
        for k in (1, 2, 3):
            assert f"## Exercise {k}" in text, f"{p.name} does not answer exercise {k}"
        assert text.count("assert ") >= 3, f"{p.name}: every answer checks itself with an assert"
        names = _parameter_names(nb)        # the course's three, and only what the answered notebook has
        of_notebook = _parameter_names(nbformat.read(ROOT / "notebooks" / p.name, as_version=4))
        assert {"profile", "run_dir", "seed", "overrides"} <= names <= of_notebook, \
            f"{p.name}: parameters {sorted(names)}"
        assert f'notebook="solutions_{p.stem[:2]}", seed=seed, overrides=overrides)' in text, \
            f"{p.name}: Run.open must get the overrides parameter"
        answers = text.split("## Exercise ")[1:]
        assert all("assert " in a for a in answers), f"{p.name}: an exercise without an assert"


def test_only_selects_and_rejects_unknown(tmp_path):
    paths = [tmp_path / "00_a.ipynb", tmp_path / "01_b.ipynb"]
    assert course.select(paths, ["01"]) == [paths[1]]
    with pytest.raises(SystemExit, match="matches no notebook"):
        course.select(paths, ["07"])


def test_list_names_every_notebook():
    out = subprocess.run([sys.executable, "-m", "spinmeround_lite.course", "list"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert p.stem in out


def test_committed_notebooks_have_no_outputs_and_one_parameters_cell():
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert nbs, "the course has no notebooks"
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)             # the schema of its own version (cell ids only from nbformat 4.5 on)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{p.name} carries outputs"
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{p.name} needs exactly one 'parameters' cell"
        # plain literals only, so papermill can override them
        tree = compile(params[0].source, p.name, "exec", flags=0x400)  # ast.PyCF_ONLY_AST
        import ast
        for node in tree.body:
            assert isinstance(node, ast.Assign) and _is_literal(node.value), \
                f"{p.name}: parameters cell must hold plain literals"
        assert {"profile", "run_dir", "seed", "overrides"} <= _parameter_names(nb), p.name
        text = "\n".join(c.source for c in nb.cells)
        assert f'notebook="{p.stem}", seed=seed, overrides=overrides)' in text, \
            f"{p.name}: Run.open must get the overrides parameter"
        assert "## Summary" in text and "## Exercises" in text, f"{p.name} lacks Summary/Exercises"
