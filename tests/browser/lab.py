"""JupyterLab in a real browser: the server, headless Chromium, and the checks the browser tests make.

A learner studies the course in JupyterLab (``make lab``). These helpers serve copies of the course's notebooks
from the course's own environment (the ``test`` profile and a temporary run folder, through ``SMR_PROFILE`` and
``SMR_RUN_DIR``, which every notebook's ``Run.open`` reads when its parameters are empty), open them in Debian's
Chromium driven by playwright, run them from the Run menu, and look at what JupyterLab shows: error outputs, the
spin viewer's yaw slider, the plotly camera rig, the splatting turntable GIF and the equations.

Each check raises ``AssertionError`` with what it saw, and saves a screenshot of each state it looked at.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "apt-get install -y chromium (as root, Debian)"
# Flags that keep headless Chromium quiet and offline (no component updates, no sync, no QUIC probes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader"]                 # software WebGL for plotly's 3D scene
VIEWPORT = {"width": 1280, "height": 800}                      # a laptop screen

# JupyterLab user settings for the tests: every cell in the page (no windowed notebook: a check sees every output)
# and no autosave (the served notebooks are copies, but nothing should be written behind the tests' back).
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
}


def chromium_path() -> str | None:
    """Debian's Chromium (or the browser ``SMR_CHROMIUM`` names), ``None`` when it is not installed."""
    named = os.environ.get("SMR_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_chromium() -> str:
    """Chromium's path and playwright, or a skip naming what to install; with ``CI=true`` a failure instead."""
    import pytest

    path, msg = chromium_path(), None
    if path is None:
        msg = f"Chromium is not installed: {INSTALL_HINT}"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            msg = "playwright is not installed: pip install -e '.[test]'"
    if msg is None:
        return path
    if in_ci():
        pytest.fail(msg + " (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# the server
# ----------------------------------------------------------------------------------------------
class LabServer:
    """``jupyter lab`` on a free loopback port with a random token, serving ``root``.

    ``env`` adds to the environment of the server and its kernels. Jupyter's configuration, runtime, settings and
    workspace folders are fresh ones under ``home``, so a user's own settings never change what the tests see.
    ``stop()`` shuts the kernels down, then ends the server by its own process handle.
    """

    def __init__(self, root: Path, home: Path, env: dict[str, str] | None = None, timeout: float = 90.0):
        self.root, self.home = Path(root), Path(home)
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        settings = self.home / "settings"
        for name, value in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(value))
        full_env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}      # kernels draw inline
        full_env.update({
            "JUPYTER_CONFIG_DIR": str(self.home / "config"), "JUPYTER_RUNTIME_DIR": str(self.home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(self.home / "workspaces"),
            "IPYTHONDIR": str(self.home / "ipython"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        full_env.update(env or {})
        self.log_path = self.home / "jupyterlab.log"
        self._log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
               f"--ServerApp.root_dir={self.root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.news_url=", "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False"]
        if os.geteuid() == 0:                                  # CI runs as root
            cmd.append("--allow-root")
        # its own session: if the server will not stop, its kernels are ended with it, and nothing else
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.root, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, method: str = "GET") -> bytes:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()

    def _wait_ready(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def shutdown_kernels(self) -> int:
        """Shut down every kernel the server runs (a test's notebook may still be running when it fails)."""
        ids = [k["id"] for k in json.loads(self.api("/api/kernels"))]
        for kid in ids:
            try:
                self.api(f"/api/kernels/{kid}", method="DELETE")
            except urllib.error.HTTPError:
                pass
        return len(ids)

    def page_url(self, path: str = "") -> str:
        """JupyterLab on ``path``, with a fresh workspace (``reset``: the tabs of an earlier test stay closed)."""
        return f"{self.url}/lab{('/tree/' + path) if path else ''}?reset&token={self.token}"

    def stop(self) -> None:
        """Shut the kernels down through the server, then stop the server process (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        try:                                   # kernels left behind in the server's own session, if any
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


# ----------------------------------------------------------------------------------------------
# pages and notebooks
# ----------------------------------------------------------------------------------------------
def shot(target, folder: Path, name: str) -> Path:
    """Screenshot of a page or an element into ``folder/name.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    target.screenshot(path=str(path))
    return path


def pixels(element) -> np.ndarray:
    """The element as the browser draws it: (H, W, 3) uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB"))


def wait_for_app(page, timeout_s: float = 60.0) -> None:
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=timeout_s * 1000)
    page.wait_for_selector(".jp-DirListing-content", timeout=timeout_s * 1000)


def listing(page, folder: str, timeout_s: float = 30.0) -> list[str]:
    """Open ``folder`` in the file browser by double-clicking it, as a learner does, and return the names shown."""
    page.locator(".jp-BreadCrumbs-home").click()
    item = page.locator(".jp-DirListing-item", has_text=folder).first
    item.wait_for(timeout=timeout_s * 1000)
    item.dblclick()
    page.wait_for_function(
        "f => document.querySelector('.jp-BreadCrumbs') && document.querySelector('.jp-BreadCrumbs').innerText"
        ".includes(f)", arg=folder, timeout=timeout_s * 1000)
    page.wait_for_timeout(500)
    return page.locator(".jp-DirListing-item .jp-DirListing-itemText").all_inner_texts()


def open_notebook(page, server: LabServer, path: str, timeout_s: float = 90.0) -> None:
    """Open ``path`` (relative to the served folder) and wait until its kernel is ready."""
    page.goto(server.page_url(path))
    wait_for_app(page)
    page.wait_for_function(
        """p => { const w = window.jupyterapp.shell.currentWidget;
                  return w && w.context && w.context.path === p && w.content && w.content.widgets.length > 0
                         && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
                         && w.sessionContext.session.kernel.connectionStatus === 'connected'
                         && w.sessionContext.session.kernel.status === 'idle'; }""",
        arg=path, timeout=timeout_s * 1000)


STATE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget, cells = w.content.widgets, out = [];
  for (let i = 0; i < cells.length; i++) {
    const c = cells[i];
    if (c.model.type !== 'code') continue;
    const errors = [];
    for (let j = 0; j < c.model.outputs.length; j++) {
      const o = c.model.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
    }
    out.push({index: i, count: c.model.executionCount, prompt: c.promptNode ? c.promptNode.textContent : '',
              errors: errors});
  }
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {cells: out, kernel: k ? k.status : 'none'};
}"""


def cell(page, index: int):
    """The cell ``index`` of the open notebook (every cell is in the page: windowing is off)."""
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def notebook_state(page) -> dict:
    """Every code cell of the open notebook: index, execution count, prompt text and error outputs."""
    return page.evaluate(STATE_JS)


def run_all(page, timeout_s: float = 900.0) -> dict:
    """Run the open notebook top to bottom from the Run menu; wait until nothing runs; return ``notebook_state``."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    t0, quiet_since = time.time(), None
    while time.time() - t0 < timeout_s:
        st = notebook_state(page)
        busy = st["kernel"] not in ("idle",) or any("*" in c["prompt"] for c in st["cells"])
        started = any(c["count"] is not None for c in st["cells"]) or any(c["errors"] for c in st["cells"])
        if started and not busy:
            quiet_since = quiet_since or time.time()
            if time.time() - quiet_since > 1.5:              # idle for a moment: the queue is empty
                st["seconds"] = time.time() - t0
                return st
        else:
            quiet_since = None
        time.sleep(0.5)
    raise AssertionError(f"the notebook was still running after {timeout_s:.0f} s: {notebook_state(page)}")


def shutdown_kernel(page) -> None:
    page.evaluate("async () => { const w = window.jupyterapp.shell.currentWidget;"
                  " if (w && w.sessionContext) await w.sessionContext.shutdown(); }")


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------
def assert_ran_cleanly(state: dict) -> None:
    """Every code cell ran (it has an execution count) and none shows an error output."""
    errors = [f"cell {c['index']}: {e}" for c in state["cells"] for e in c["errors"]]
    assert not errors, "error output in the notebook: " + "; ".join(errors)
    not_run = [c["index"] for c in state["cells"] if c["count"] is None]
    assert not not_run, f"cells that did not run: {not_run}"


def check_viewer(page, folder: Path, scope=None, presses: int = 2, timeout_s: float = 20.0) -> dict:
    """The spin viewer: its slider and picture render and fit on one screen; the arrow keys turn the head.

    The picture is compared as the browser draws it, before and after ``presses`` ArrowRight presses on the
    slider's handle; the readout alone could move while the picture stays. Screenshots: ``viewer_before``,
    ``viewer_after``. ``scope``: where to look (a cell's locator; the whole page by default).
    """
    box = (scope or page).locator(".widget-vbox", has=page.locator(".widget-slider")).filter(
        has=page.locator(".widget-image")).last
    box.wait_for(state="visible", timeout=timeout_s * 1000)
    box.scroll_into_view_if_needed()
    image, handle = box.locator(".widget-image"), box.locator(".noUi-handle").first
    readout = box.locator(".widget-readout").first
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=image.element_handle(),
                           timeout=timeout_s * 1000)
    bb, ib = box.bounding_box(), image.bounding_box()
    shot(box, folder, "viewer_before")
    assert bb["height"] <= VIEWPORT["height"], \
        f"the viewer is {bb['height']:.0f} px high: slider and picture do not fit on a {VIEWPORT['height']} px screen"
    page.set_viewport_size({"width": 2 * VIEWPORT["width"], "height": VIEWPORT["height"]})    # a wider window
    page.wait_for_timeout(500)
    wide = image.bounding_box()
    page.set_viewport_size(VIEWPORT)
    page.wait_for_timeout(500)
    box.scroll_into_view_if_needed()
    assert abs(wide["width"] - ib["width"]) < 2 and abs(wide["height"] - ib["height"]) < 2, \
        (f"the picture follows the page width ({ib['width']:.0f} x {ib['height']:.0f} px in a {VIEWPORT['width']} px "
         f"window, {wide['width']:.0f} x {wide['height']:.0f} px in a {2 * VIEWPORT['width']} px one): on a wide "
         "screen slider and picture no longer fit")
    before, read_before = pixels(image), readout.inner_text()
    handle.focus()
    for _ in range(presses):
        page.keyboard.press("ArrowRight")
    t0, changed = time.time(), 0.0
    while time.time() - t0 < timeout_s:
        after = pixels(image)
        if after.shape == before.shape:
            changed = float((np.abs(after.astype(int) - before.astype(int)).max(-1) > 16).mean())
            if changed > 0.01:
                break
        page.wait_for_timeout(250)
    read_after = readout.inner_text()
    shot(box, folder, "viewer_after")
    assert read_after != read_before, f"the slider's readout did not move ({read_before!r})"
    assert changed > 0.01, (f"the picture did not change when the slider moved from {read_before} to {read_after} "
                            f"({100 * changed:.2f} % of its pixels changed)")
    return {"readout": (read_before, read_after), "changed": changed, "box": bb, "image": ib, "wide": wide}


PLOTLY_TRACES_JS = """el => (el._fullData || []).map(t => ({
  name: t.name, type: t.type, visible: t.visible, n: t.x ? t.x.length : 0}))"""


def check_rig(page, folder: Path, cameras: int, scope=None, timeout_s: float = 30.0) -> list[dict]:
    """The plotly camera rig: a 3D scene drawn (WebGL canvas with something on it) with a ``cameras`` trace of
    ``cameras`` points. Screenshot: ``rig``."""
    plot = (scope or page).locator(".js-plotly-plot").first
    plot.wait_for(state="visible", timeout=timeout_s * 1000)
    plot.scroll_into_view_if_needed()
    page.wait_for_function("el => el._fullData && el._fullLayout && el.querySelector('.gl-container canvas')",
                           arg=plot.element_handle(), timeout=timeout_s * 1000)
    page.wait_for_timeout(1000)                                 # the first WebGL frame
    shot(plot, folder, "rig")
    traces = plot.evaluate(PLOTLY_TRACES_JS)
    assert any(t["type"] == "scatter3d" for t in traces), f"no 3D scatter in the rig figure: {traces}"
    cams = [t for t in traces if t["name"] == "cameras" and t["type"] == "scatter3d"]
    assert cams and cams[0]["n"] == cameras, f"the rig shows {cams[0]['n'] if cams else 'no'} cameras, " \
                                             f"expected {cameras}: {traces}"
    canvas = pixels(plot.locator(".gl-container canvas").first)
    assert canvas.std() > 2.0, "the 3D scene's canvas is blank (WebGL drew nothing)"
    return traces


def check_gif(page, folder: Path, timeout_s: float = 20.0) -> dict:
    """An animated GIF output renders (decoded, non-empty) and moves: two looks a moment apart differ.
    Screenshot: ``gif``."""
    img = page.locator(".jp-OutputArea-output img[src^='data:image/gif']").first
    img.wait_for(state="visible", timeout=timeout_s * 1000)
    img.scroll_into_view_if_needed()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                           timeout=timeout_s * 1000)
    size = img.evaluate("el => [el.naturalWidth, el.naturalHeight]")
    first, moved = pixels(img), 0.0
    t0 = time.time()
    while time.time() - t0 < 5.0 and moved <= 0.005:
        page.wait_for_timeout(200)
        now = pixels(img)
        if now.shape == first.shape:
            moved = float((np.abs(now.astype(int) - first.astype(int)).max(-1) > 16).mean())
    shot(img, folder, "gif")
    assert moved > 0.005, "the turntable GIF shows but does not move"
    return {"size": size, "moved": moved}


def check_equations(page, folder: Path, at_least: int = 1, timeout_s: float = 30.0) -> int:
    """The notebook's TeX is typeset by MathJax (``mjx-container`` elements, none left as raw ``$...$``).
    Screenshot: ``equations`` (the first markdown cell with a displayed equation)."""
    page.wait_for_function("n => document.querySelectorAll('.jp-RenderedMarkdown mjx-container').length >= n",
                           arg=at_least, timeout=timeout_s * 1000)
    n = page.locator(".jp-RenderedMarkdown mjx-container").count()
    raw = page.evaluate("""() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown')).map(el => {
        const c = el.cloneNode(true); c.querySelectorAll('mjx-container, code, pre').forEach(m => m.remove());
        return c.innerText; }).filter(t => /\\$[^$\\s][^$]*\\$/.test(t))""")
    display = page.locator(".jp-RenderedMarkdown", has=page.locator("mjx-container[display='true']")).first
    if display.count():
        display.scroll_into_view_if_needed()
        shot(display, folder, "equations")
    assert not raw, f"TeX left untypeset: {raw[:2]}"
    return n
