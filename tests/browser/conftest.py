"""Fixtures of the browser tests: one JupyterLab server and one headless Chromium for the session.

Without Chromium the tests skip with one line naming the install command; with ``CI=true`` that is a failure.
The server serves copies of ``notebooks/`` and ``solutions/`` (and the stand-in notebooks of
``test_lab_checks.py``), so nothing a browser does can write into the checkout. Its kernels get the profile and run
folder of the test run (``SMR_PROFILE``, ``SMR_RUN_DIR``; the top-level ``conftest.py`` makes them ``test`` and a
fresh temporary folder unless the caller set them: ``make test`` passes the run folder its notebooks just used).
With ``SMR_DOC_IMAGES=<folder>`` the tests also write the README's cropped screenshots there (``make screenshots``).
"""

from __future__ import annotations

import inspect
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lab  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def chromium() -> str:
    return lab.require_chromium()


@pytest.fixture(scope="session")
def profile() -> str:
    return os.environ.get("SMR_PROFILE", "test")


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """The folder JupyterLab serves: copies of the course's notebooks and solutions, and a folder of stand-ins."""
    root = tmp_path_factory.mktemp("course")
    for sub in ("notebooks", "solutions"):
        (root / sub).mkdir()
        for nb in sorted((REPO / sub).glob("*.ipynb")):
            shutil.copy2(nb, root / sub / nb.name)
    (root / "standins").mkdir()
    return root


@pytest.fixture(scope="session")
def server(chromium, served, profile, tmp_path_factory):
    run_dir = os.environ.get("SMR_RUN_DIR") or str(tmp_path_factory.mktemp(f"run-{profile}"))
    srv = lab.LabServer(served, tmp_path_factory.mktemp("jupyter"),
                        env={"SMR_PROFILE": profile, "SMR_RUN_DIR": str(Path(run_dir).resolve())})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def browser_context(chromium, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    context = None
    try:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=lab.CHROMIUM_ARGS, viewport=lab.VIEWPORT)
        yield context
    finally:
        if context is not None:
            context.close()
        pw.stop()


@pytest.fixture
def page(browser_context, server, request, out_dir):
    """A fresh tab; on failure its last state is saved as ``failure.png`` beside the test's screenshots."""
    pg = browser_context.new_page()
    pg.set_default_timeout(60_000)
    try:
        yield pg
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        if failed:
            try:
                pg.screenshot(path=str(out_dir / "failure.png"), full_page=False)
            except Exception:
                pass
        pg.close()
        server.shutdown_kernels()                  # whatever the outcome, no notebook keeps running


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """Where a test's screenshots go (pytest's temporary folder of the test)."""
    d = tmp_path / "screenshots"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def doc_images() -> Path | None:
    d = os.environ.get("SMR_DOC_IMAGES")
    return Path(d) if d else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.skipped and isinstance(rep.longrepr, tuple) and lab.INSTALL_HINT in str(rep.longrepr[2]):
        line = inspect.getsourcelines(lab.require_chromium)[1]
        rep.longrepr = (str(Path(lab.__file__)), line, rep.longrepr[2])     # one line for all: "SKIPPED [n] ..."


def pytest_terminal_summary(terminalreporter, config):
    factory = getattr(config, "_tmp_path_factory", None)
    base = factory.getbasetemp() if factory is not None and factory._basetemp is not None else None
    if base is not None and any(base.glob("*/screenshots/*.png")):
        terminalreporter.write_line(f"browser screenshots: {base}/<test>/screenshots/")
