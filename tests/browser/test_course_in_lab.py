"""The course as a learner meets it: JupyterLab in headless Chromium (``make test-browser``).

The notebooks run from the browser's Run menu at the ``test`` profile in a temporary run folder, in course order
(00 builds the heads that 07 and 08 reuse; any notebook builds what it lacks). Each test saves a screenshot of each
state it checks under its own temporary folder (the path is printed at the end of the run).
"""

from __future__ import annotations

import os

import lab
import numpy as np
import pytest
from PIL import Image

from spinmeround_lite.profiles import get_profile

# Notebooks at the test profile take a minute or two each; the cpu profile (``make screenshots``) much longer.
TEST_PROFILE = os.environ.get("SMR_PROFILE", "test") == "test"
RUN_TIMEOUT = 900 if TEST_PROFILE else 3600
pytestmark = pytest.mark.timeout(RUN_TIMEOUT + 300)

NOTEBOOKS = ["00_procedural_heads", "01_identity_tokens", "02_ray_maps", "03_latent_space", "04_3d_attention",
             "05_edm_training", "06_normal_inpainting", "07_anchor_sampling", "08_gaussian_splatting",
             "09_evaluation", "10_your_photo", "11_the_real_model", "12_fewer_steps"]


def _keep(doc_images, out_dir, name, as_name, margin=6):
    """Copy a screenshot, cropped to what is drawn on it, into the README's images (``make screenshots``)."""
    if doc_images is None:
        return
    im = Image.open(out_dir / f"{name}.png").convert("RGB")
    ys, xs = np.nonzero((np.asarray(im) < 245).any(-1))                  # everything but the white page
    if len(xs):
        im = im.crop((max(0, xs.min() - margin), max(0, ys.min() - margin),
                      min(im.width, xs.max() + 1 + margin), min(im.height, ys.max() + 1 + margin)))
    doc_images.mkdir(parents=True, exist_ok=True)
    im.save(doc_images / as_name, optimize=True)


def test_file_browser_lists_the_course(page, server, out_dir):
    page.goto(server.page_url())
    lab.wait_for_app(page)
    top = page.locator(".jp-DirListing-item .jp-DirListing-itemText").all_inner_texts()
    assert {"notebooks", "solutions"} <= set(top), top
    shown = lab.listing(page, "notebooks")
    lab.shot(page, out_dir, "notebooks")
    assert [n for n in shown if n.endswith(".ipynb")] == [f"{n}.ipynb" for n in NOTEBOOKS], shown
    shown = lab.listing(page, "solutions")
    lab.shot(page, out_dir, "solutions")
    assert [n for n in shown if n.endswith(".ipynb")] == [f"{n}.ipynb" for n in NOTEBOOKS], shown


def test_camera_rig_notebook(page, server, profile, out_dir, doc_images):
    """Notebook 00 top to bottom from the browser; its plotly rig shows every camera of the profile's rig."""
    lab.open_notebook(page, server, "notebooks/00_procedural_heads.ipynb")
    state = lab.run_all(page, timeout_s=RUN_TIMEOUT)
    lab.shot(page, out_dir, "ran")
    lab.assert_ran_cleanly(state)
    lab.check_rig(page, out_dir, cameras=get_profile(profile).views_per_identity)
    _keep(doc_images, out_dir, "rig", "lab_camera_rig.png")
    lab.shutdown_kernel(page)


def test_spin_viewer_notebook(page, server, out_dir, doc_images):
    """Notebook 07 top to bottom from the browser; the viewer fits on a screen and its slider turns the head."""
    lab.open_notebook(page, server, "notebooks/07_anchor_sampling.ipynb")
    state = lab.run_all(page, timeout_s=RUN_TIMEOUT)
    lab.shot(page, out_dir, "ran")
    lab.assert_ran_cleanly(state)
    lab.check_viewer(page, out_dir)
    _keep(doc_images, out_dir, "viewer_after", "lab_spin_viewer.png")
    lab.shutdown_kernel(page)


def test_splatting_notebook(page, server, out_dir, doc_images):
    """Notebook 08: its equations are typeset on opening; run from the browser, its turntable GIF plays."""
    lab.open_notebook(page, server, "notebooks/08_gaussian_splatting.ipynb")
    assert lab.check_equations(page, out_dir, at_least=10) >= 10
    state = lab.run_all(page, timeout_s=RUN_TIMEOUT)
    lab.shot(page, out_dir, "ran")
    lab.assert_ran_cleanly(state)
    lab.check_gif(page, out_dir)
    _keep(doc_images, out_dir, "gif", "lab_turntable.png")
    lab.shutdown_kernel(page)
