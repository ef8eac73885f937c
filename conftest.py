"""pytest set-up shared by the unit tests and the notebooks (nbmake).

Notebooks run under the ``test`` profile in one temporary run folder, in order, so each one reuses what the
earlier ones built. Nothing reaches a model hub.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SMR_PROFILE", "test")
os.environ.setdefault("SMR_RUN_DIR", tempfile.mkdtemp(prefix="smr-pytest-run-"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TQDM_MININTERVAL", "5")
