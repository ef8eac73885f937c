"""The browser checks fail when they should: a stand-in notebook, run from the browser like the course's, holds
a working viewer and rig next to broken ones (a slider connected to nothing, a picture stretched to the page
width, a rig with no cameras) and ends with a cell that raises. Each broken one must turn its check red, each
working one must pass it, so a check that cannot fail would show here.
"""

from __future__ import annotations

import re

import lab
import nbformat
import pytest

pytestmark = pytest.mark.timeout(300)

SETUP = '''\
import io
import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from PIL import Image


def png(level):
    """A 96 x 192 picture: a grey square on white, darker for a higher level."""
    a = np.full((96, 192, 3), 255, np.uint8)
    a[16:80, 16:80] = 200 - 60 * level
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="png")
    return buf.getvalue()


def viewer(connected=True, fixed=True):
    slider = widgets.SelectionSlider(options=[("-90", 0), ("0", 1), ("+90", 2)], value=1, description="yaw")
    size = widgets.Layout(width="192px", height="96px") if fixed else widgets.Layout()
    image = widgets.Image(value=png(1), format="png", layout=size)
    if connected:
        slider.observe(lambda change: setattr(image, "value", png(change["new"])), names="value")
    return widgets.VBox([slider, image])


def rig(n_cameras):
    t = np.linspace(0, 2 * np.pi, n_cameras, endpoint=False)
    fig = go.Figure()
    fig.add_scatter3d(x=np.cos(np.arange(200)) * 0.2, y=np.sin(np.arange(200)) * 0.2, z=np.linspace(-0.2, 0.2, 200),
                      mode="markers", marker=dict(size=2, color="gray"), name="head surface")
    fig.add_scatter3d(x=2.7 * np.cos(t), y=2.7 * np.sin(t), z=0 * t, mode="markers", marker=dict(size=4),
                      name="cameras")
    fig.update_layout(height=320, margin=dict(l=0, r=0, t=0, b=0))
    return fig
'''
CELLS = {                                   # name: (index in the notebook, source)
    "viewer_live": (1, "viewer(connected=True)"),
    "viewer_still": (2, "viewer(connected=False)"),
    "viewer_stretched": (3, "viewer(connected=True, fixed=False)"),
    "rig_with_cameras": (4, "rig(6).show()"),
    "rig_without_cameras": (5, "rig(0).show()"),
    "raises": (6, 'raise ValueError("a stand-in cell that fails")'),
}


@pytest.fixture(scope="module")
def standin(browser_context, server, served):
    """The stand-in notebook, opened and run top to bottom from the browser once for this module's tests."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP)] + [nbformat.v4.new_code_cell(src) for _, src in CELLS.values()]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, served / "standins" / "broken.ipynb")
    page = browser_context.new_page()
    page.set_default_timeout(60_000)
    try:
        lab.open_notebook(page, server, "standins/broken.ipynb")
        state = lab.run_all(page, timeout_s=180)
        yield page, state
    finally:
        page.close()
        server.shutdown_kernels()


def test_a_raising_cell_is_an_error(standin):
    _, state = standin
    with pytest.raises(AssertionError, match="cell 6: ValueError: a stand-in cell that fails"):
        lab.assert_ran_cleanly(state)
    assert all(c["count"] is not None for c in state["cells"][:-1])          # the cells before it all ran


def test_a_cell_left_unrun_is_an_error():
    state = {"cells": [{"index": 0, "count": 1, "prompt": "[1]:", "errors": []},
                       {"index": 1, "count": None, "prompt": "[ ]:", "errors": []}], "kernel": "idle"}
    with pytest.raises(AssertionError, match=r"did not run: \[1\]"):
        lab.assert_ran_cleanly(state)


def test_viewer_check_passes_a_working_viewer(standin, out_dir):
    page, _ = standin
    seen = lab.check_viewer(page, out_dir, scope=lab.cell(page, CELLS["viewer_live"][0]))
    assert seen["readout"] == ("0", "+90") and seen["changed"] > 0.1


def test_viewer_check_fails_a_slider_that_changes_nothing(standin, out_dir):
    page, _ = standin
    with pytest.raises(AssertionError, match="the picture did not change"):
        lab.check_viewer(page, out_dir, scope=lab.cell(page, CELLS["viewer_still"][0]), timeout_s=3)


def test_viewer_check_fails_a_picture_stretched_to_the_page(standin, out_dir):
    page, _ = standin
    with pytest.raises(AssertionError, match="follows the page width"):
        lab.check_viewer(page, out_dir, scope=lab.cell(page, CELLS["viewer_stretched"][0]))


def test_rig_check_passes_a_rig_with_its_cameras(standin, out_dir):
    page, _ = standin
    lab.check_rig(page, out_dir, cameras=6, scope=lab.cell(page, CELLS["rig_with_cameras"][0]))


def test_rig_check_fails_a_rig_without_cameras(standin, out_dir):
    page, _ = standin
    with pytest.raises(AssertionError, match="shows 0 cameras, expected 6"):
        lab.check_rig(page, out_dir, cameras=6, scope=lab.cell(page, CELLS["rig_without_cameras"][0]))


def test_without_chromium_a_skip_locally_a_failure_in_ci(monkeypatch):
    """No browser: a skip naming the install command; with CI=true the same is a failure."""
    monkeypatch.setenv("SMR_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"Chromium is not installed: {re.escape(lab.INSTALL_HINT)}"):
        lab.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Chromium is not installed: .*CI=true"):
        lab.require_chromium()
