"""Runs after the notebooks (pytest collects this file after ``NN_*.ipynb``): every notebook executed in this
pytest session recorded the figures its issue names, in the shared run folder ``$SMR_RUN_DIR``."""

import json
import os
from pathlib import Path

import pytest

from spinmeround_lite.course import REQUIRED_FIGURES, missing_figures

RUN = Path(os.environ.get("SMR_RUN_DIR", ""))
NOTEBOOKS = sorted(p.stem for p in Path(__file__).parent.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_recorded_its_figures(notebook):
    fig = RUN / "figures" / f"{notebook}.json"
    if not fig.exists():
        pytest.skip(f"{notebook} was not executed in this pytest session")
    figures = json.loads(fig.read_text())
    assert notebook in REQUIRED_FIGURES, f"{notebook} has no entry in course.REQUIRED_FIGURES"
    assert not missing_figures(notebook, figures), f"{notebook} did not record {missing_figures(notebook, figures)}"
