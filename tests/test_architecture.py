"""The package's imports, read from its source with ``ast`` (imports inside functions too): no import circle, and
every import goes down the layer order that ``docs/ARCHITECTURE.md`` declares; a spin loads no training code."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spinmeround_lite"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
TRAINING = ("train", "train_data", "train_checkpoints", "train_grids", "distill")


def package_imports(folder: Path, package: str = "spinmeround_lite") -> dict[str, dict[str, list[int]]]:
    """``{module: {imported module of the same package: [line, ...]}}`` for every ``.py`` file of ``folder``.

    Relative (``from . import x``, ``from .x import y``) and absolute (``import package.x``, ``from package.x
    import y``, ``from package import x``) imports count, wherever they stand: module level or inside a function.
    """
    modules = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, dict[str, list[int]]] = {}
    for path in sorted(folder.glob("*.py")):
        found: dict[str, list[int]] = {}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    base = node.module or ""
                elif node.level == 0 and (node.module or "").split(".")[0] == package:
                    base = node.module[len(package):].lstrip(".")
                else:
                    continue
                targets = [base.split(".")[0]] if base else [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names
                           if a.name.startswith(package + ".")]
            for t in targets:
                if t in modules and t != path.stem:
                    found.setdefault(t, []).append(node.lineno)
        graph[path.stem] = found
    return graph


def find_circle(graph: dict[str, dict]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None when the imports form no circle."""
    state: dict[str, int] = {}                 # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, {})):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def documented_layers(text: str) -> list[list[str]]:
    """The layer order of ``docs/ARCHITECTURE.md``: the backquoted ``a -> b/c -> d`` after "Data flows one way"."""
    m = re.search(r"Data flows one way[^`]*`([^`]+)`", text)
    if not m:
        raise AssertionError("docs/ARCHITECTURE.md declares no layer order (`a -> b/c -> ...` after "
                             "'Data flows one way')")
    return [[name.strip() for name in layer.split("/")] for layer in m.group(1).split("->")]


def layer_violations(graph: dict[str, dict[str, list[int]]], layers: list[list[str]],
                     exempt: tuple[str, ...] = ("__init__",)) -> list[str]:
    """Each import of a module in the same or a higher layer than the importer, as ``"a.py:12 imports b"``."""
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    bad = []
    for m, deps in sorted(graph.items()):
        if m in exempt:
            continue
        for d, lines in sorted(deps.items()):
            if d in exempt:
                continue
            if rank[d] >= rank[m]:
                where = "the same layer as" if rank[d] == rank[m] else "a higher layer than"
                bad += [f"{m}.py:{line} imports {d} ({where} {m})" for line in lines]
    return bad


# ------------------------------------------------------------------------------ the package
def test_the_documented_order_names_every_module_once():
    layers = documented_layers(DOC.read_text())
    names = [n for layer in layers for n in layer]
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert len(names) == len(set(names)), f"named twice: {sorted({n for n in names if names.count(n) > 1})}"
    assert set(names) == modules, (f"docs/ARCHITECTURE.md's order lacks {sorted(modules - set(names))} and names "
                                   f"modules that do not exist: {sorted(set(names) - modules)}")


def test_the_package_has_no_import_circle():
    circle = find_circle(package_imports(PACKAGE))
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_every_import_goes_down_the_documented_layers():
    bad = layer_violations(package_imports(PACKAGE), documented_layers(DOC.read_text()))
    assert not bad, "imports against the order of docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_a_spin_loads_no_training_code():
    """Importing the spin's modules (steps A-C, photo input, samplers, results, the model's loaders) loads neither
    the trainer nor the distiller; only a run without a model reaches the trainer, when ``SpinParts.from_run``
    has to train one."""
    code = ("import sys, spinmeround_lite.spinning, spinmeround_lite.checks, spinmeround_lite.viewer; "
            "from spinmeround_lite import spin; "
            "print(' '.join(sorted(m.split('.')[-1] for m in sys.modules if m.startswith('spinmeround_lite.'))))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert "spinning" in loaded and "artifacts" in loaded
    assert not loaded & set(TRAINING), f"a spin loaded training code: {sorted(loaded & set(TRAINING))}"


# ------------------------------------------------------------------------------ the checker itself
def _fake_package(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir()
    for name, body in files.items():
        (folder / f"{name}.py").write_text(body)
    return folder


def test_a_planted_circle_is_found_even_through_a_function_level_import(tmp_path):
    pkg = _fake_package(tmp_path / "fake", {
        "__init__": "",
        "low": "from . import mid\n",
        "mid": "import json\n\ndef later():\n    from .high import thing\n    return thing\n",
        "high": "from fake.low import something\nthing = 1\n",
        "apart": "import fake.mid\n",
    })
    graph = package_imports(pkg, package="fake")
    assert graph["mid"] == {"high": [4]} and graph["high"] == {"low": [1]} and graph["apart"] == {"mid": [1]}
    circle = find_circle(graph)
    assert circle == ["mid", "high", "low", "mid"]                 # found from `apart`, which only leads into it
    assert all(b in graph[a] for a, b in zip(circle, circle[1:]))
    del graph["high"]["low"]                                       # break it: no circle is left
    assert find_circle(graph) is None


def test_a_planted_upward_import_breaks_the_layer_order(tmp_path):
    pkg = _fake_package(tmp_path / "fake", {"low": "def f():\n    from .high import g\n",
                                            "high": "from . import low\n"})
    layers = documented_layers("Data flows one way: `low -> high`. A lower module never imports a higher one.")
    assert layers == [["low"], ["high"]]
    assert layer_violations(package_imports(pkg, package="fake"), layers) == [
        "low.py:2 imports high (a higher layer than low)"]
    side = documented_layers("Data flows one way: `low/high`.")
    assert layer_violations(package_imports(pkg, package="fake"), side) == [
        "high.py:1 imports low (the same layer as high)", "low.py:2 imports high (the same layer as low)"]


def test_a_document_without_an_order_is_an_error():
    with pytest.raises(AssertionError, match="declares no layer order"):
        documented_layers("# no order here")
