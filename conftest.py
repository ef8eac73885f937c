"""pytest set-up shared by the unit tests, the notebooks and their worked solutions (nbmake).

Notebooks run under the ``test`` profile in one temporary run folder, in order, so each one reuses what the
earlier ones built (``pytest --nbmake notebooks solutions`` runs the solutions after the course, on its
artifacts). Nothing reaches a model hub. nbmake's kernels use IPC sockets like the course runner's
(``course.kernel_config``), so ipykernel has no unencrypted TCP to warn about; after a run with notebooks, the
figures each one recorded are printed, one line per notebook.
"""

import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SMR_PROFILE", "test")
os.environ.setdefault("SMR_RUN_DIR", tempfile.mkdtemp(prefix="smr-pytest-run-"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")

_STARTED = time.time()


def _use_ipc_kernels() -> None:
    try:
        import nbmake.nb_run as nb_run
    except ImportError:                 # nbmake is not installed: nothing starts kernels
        return
    from spinmeround_lite.course import kernel_config

    base = nb_run.NotebookClient

    class IPCNotebookClient(base):
        def __init__(self, nb, **kw):
            kw.setdefault("config", kernel_config())
            super().__init__(nb, **kw)

    nb_run.NotebookClient = IPCNotebookClient


_use_ipc_kernels()


def pytest_terminal_summary(terminalreporter):
    """The figures recorded by the notebooks this session executed (``$SMR_RUN_DIR/figures``)."""
    import json
    from pathlib import Path

    from spinmeround_lite.course import _short

    figs = Path(os.environ["SMR_RUN_DIR"]) / "figures"
    fresh = sorted(p for p in figs.glob("*.json") if p.stat().st_mtime >= _STARTED) if figs.is_dir() else []
    if not fresh:
        return
    terminalreporter.section("figures recorded by the notebooks", sep="-")
    for p in fresh:
        items = json.loads(p.read_text()).items()
        line = f"{p.stem:<24} " + " ".join(f"{k}={_short(v)}" for k, v in items)
        terminalreporter.write_line(line if len(line) <= 160 else line[:157] + "...")
