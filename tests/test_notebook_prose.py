"""The notebooks' prose states constants of the method, never a figure typed from an earlier run.

A learner reads a markdown cell and then the output under it; a number typed into the prose from some earlier run
contradicts the run beside it as soon as anything changes. So every measured figure lives in an output (a printed
line, or a markdown cell the notebook writes with ``IPython.display.Markdown`` from its recorded figures) or in a
committed result the sentence names (``results/cpu/evaluation.json``), and the prose of ``notebooks/`` and
``solutions/`` holds only:

* decimal numbers (a leading + ignored) that are constants of the method: the paper's, the released code's, a
  profile's (read from ``profiles.PROFILES``), or a toy's own parameters, each listed below with what it is;
* percentages and "N of M" counts likewise listed (a count such as "11 of 16 heads" is a measurement).

Fenced code blocks (command lines) are not prose and are skipped. A new constant in the prose goes into the
allow-list below with the reason; a measured figure goes into an output instead.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spinmeround_lite.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + \
    sorted((ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))

# Decimal numbers the prose may state, and what each one is.
ALLOWED_DECIMALS: dict[str, str] = {
    # cameras (PanoHead's rig, the released code's conventions)
    "2.7": "PanoHead's camera radius",
    "18.837": "PanoHead's field of view (degrees, diagonal)",
    "13.4": "that field of view across the image (degrees)",
    "4.2627": "the course's focal length over the image side",
    "4.2634": "the released code's focal length (its pi and sqrt 2 rounded)",
    "3.14159": "the released code's pi",
    "1.414": "the released code's sqrt 2",
    "3.5": "a camera radius of an exercise; the released guidance scale",
    "21.6": "2^3 times the radius 2.7 (solution 02)",
    # yaws of the protocol and the spin (360 / 16, 360 / 32, 360 / 48 and their multiples)
    "22.5": "360 / 16 degrees", "11.25": "360 / 32 degrees", "7.5": "360 / 48 degrees", "-7.5": "360 / 48 degrees",
    "37.5": "5 x 7.5 degrees",
    "1.83": "88 / 48 views",
    # autoencoder and EDM
    "0.18215": "SD1.5's latent scaling factor",
    "0.5": "EDM's sigma_data in its paper; a probability of one half; a pixel's centre offset",
    "-1.2": "EDM's P_mean", "1.2": "EDM's P_std; the Gaussian-mixture toy's known channel",
    "0.97": "0.5 ln 7, the log-SNR shift on ln sigma for the paper's 7 generated views",
    "0.15": "the classifier-free guidance dropout probability",
    "0.999": "an EMA decay", "0.9999": "an EMA decay (paper profile)",
    "1.5": "the Gaussian toy's mean; SSIM's window sigma; Stable Diffusion 1.5",
    # the channel-inpainting toy of notebook 06 (its own parameters and what follows from them)
    "0.9": "the toy's correlation", "-0.3": "the toy's marginal mean of b",
    "0.33": "the toy's conditional mean of b", "0.44": "the toy's conditional std of b",
    "6.1": "the released guidance step 2 x 1e5 / (8 x 64 x 64)",
    # Gaussian splatting (3DGS) constants
    "0.3": "3DGS's low-pass filter (pixels^2)", "0.99": "3DGS's alpha cap",
    "0.2821": "the zeroth spherical-harmonic constant", "0.8": "3DGS's L1 weight", "0.2": "3DGS's SSIM weight",
    "0.0": "eps2d = 0.0, an exercise's setting",
    # face tools
    "0.6": "dlib's same-person descriptor distance", "-0.5": "the weak-detection score shown in notebook 10",
    # guidance algebra (solution 11)
    "2.5": "s - 1 at the released guidance scale 3.5",
}

ALLOWED_PERCENT: dict[str, str] = {
    "5 %": "the learning rate's floor at the end of a decay",
    "15 %": "the classifier-free guidance dropout",
    "60%": "the size of a copy in solution 10's group photo",
}

ALLOWED_COUNTS: dict[str, str] = {
    "76 of 77": "prompt positions after the id token (solution 01)",
    "4 of 20": "a checkpoint every 4 of 20 steps (solution 05)",
}

DECIMAL = re.compile(r"(?<![\w.])[-+\u2212]?\d+\.\d+(?![\w.]*\w)")
PERCENT = re.compile(r"(?<![\w.])\d+(?:\.\d+)? ?%")
COUNT = re.compile(r"\b\d+ (?:of|out of) (?:the )?\d+\b")
FENCE = re.compile(r"```.*?```", re.S)


def profile_constants() -> set[str]:
    """Every float field of every profile, as the prose would write it (``0.002``, ``80``, ``0.0006``)."""
    out = set()
    for p in PROFILES.values():
        for v in p.to_dict().values():
            if isinstance(v, float):
                out |= {f"{v:g}", repr(v), f"{v:.1f}"}
    return out


def prose_numbers(text: str) -> list[str]:
    """The measured-looking numbers of one markdown cell that are not allowed constants."""
    text = FENCE.sub("", text)
    allowed = set(ALLOWED_DECIMALS) | profile_constants()
    bad = []
    for m in DECIMAL.finditer(text):
        num = m.group(0).replace("\u2212", "-").lstrip("+")           # +22.5 is 22.5
        if num not in allowed:
            bad.append(num)
    bad += [m.group(0) for m in PERCENT.finditer(text) if m.group(0) not in ALLOWED_PERCENT]
    bad += [m.group(0) for m in COUNT.finditer(text) if m.group(0) not in ALLOWED_COUNTS]
    return bad


def offending_cells(path: Path) -> list[tuple[int, list[str]]]:
    """``[(cell index, [numbers])]`` for the markdown cells of ``path`` that state figures not in the allow-lists."""
    nb = json.loads(Path(path).read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            bad = prose_numbers(src)
            if bad:
                out.append((i, bad))
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_prose_states_no_figure_of_a_run(path):
    bad = offending_cells(path)
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    assert not bad, (f"{where}: markdown cells state figures that are not constants of the method "
                     f"(cell index, numbers): {bad}. Print the figure in an output (or write the markdown from "
                     "run.record'ed figures), or name the committed result it comes from; a true constant goes "
                     "into the allow-list of tests/test_notebook_prose.py with its reason.")


def test_the_course_has_notebooks_and_solutions_to_check():
    assert len([p for p in NOTEBOOKS if p.parent.name == "notebooks"]) == 13
    assert len([p for p in NOTEBOOKS if p.parent.name == "solutions"]) == 13


def _stand_in(tmp_path: Path, markdown: str) -> Path:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A stand-in lesson\nThe Karras schedule starts at sigma 0.002."),
                nbformat.v4.new_code_cell("print('teacher_forced_ssim 0.784')"),
                nbformat.v4.new_markdown_cell(markdown)]
    path = tmp_path / "99_stand_in.ipynb"
    nbformat.write(nb, str(path))
    return path


@pytest.mark.parametrize("typed, expected", [
    ("The reference trained 2000 steps more: SSIM 0.77, normals 14.0 degrees.", ["0.77", "14.0"]),
    ("The autoencoder's ceiling (0.94 and 5 degrees at `cpu`).", ["0.94"]),
    ("Its round trips keep a face the detector finds in 11 of 16 heads.", ["11 of 16"]),
    ("With another head's view given only 36 % of the views moved towards it.", ["36 %"]),
    ("Replacement leaves `b` near a mean of \u22120.09.", ["-0.09"]),
])
def test_a_run_figure_typed_into_prose_fails(tmp_path, typed, expected):
    """A stand-in notebook whose prose types a run's figure is caught, and only that figure: its constant (0.002,
    a profile's sigma_min) and its printed output pass."""
    path = _stand_in(tmp_path, typed)
    assert offending_cells(path) == [(2, expected)]
    with pytest.raises(AssertionError, match="not constants of the method"):
        test_prose_states_no_figure_of_a_run(path)


def test_constants_and_command_lines_pass(tmp_path):
    text = ("EDM's `sigma_data` is 0.5 in its paper; the course uses 1. Noise levels `ln s ~ N(-1.2, 1.2^2)`, "
            "dropout 15 %, the rig's radius 2.7, `cfg_scale` 3.0 (a profile's).\n"
            "```\npython tools/train_reference.py --steps 12000 --lr 0.00123\n```")
    assert offending_cells(_stand_in(tmp_path, text)) == []
