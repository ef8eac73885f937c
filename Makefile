# The two commands of the course: `make course` and `make test`. Both create .venv on first use.
PROFILE ?= cpu
# Profile fields changed for this run, e.g. OVERRIDES="batch_size=8 train_steps=100" (see profiles.py).
OVERRIDES ?=
SET     := $(if $(strip $(OVERRIDES)),--set $(OVERRIDES))
# DRY_RUN=1: the profile's sizes with every count cut, on this machine (runs/<profile>-dry-run; not results).
DRY_RUN ?=
SET     += $(if $(strip $(DRY_RUN)),--dry-run)
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: course solutions test lint lab clean-notebooks bench device-check help

help:
	@echo "make course [PROFILE=test|cpu|gpu|paper]  run every notebook, write runs/<profile>/summary.json"
	@echo "make course OVERRIDES=\"batch_size=8\"     the same with profile fields changed (run folder records them)"
	@echo "make solutions [PROFILE=...]               run the worked solutions in the same run folder"
	@echo "make test                                  unit tests + every notebook at the test profile"
	@echo "make lab                                   JupyterLab on the notebooks"

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel on a CPU machine, never a CUDA download pulled in by a range.
	$(PY) -m pip install -q -c requirements/constraints.txt "torch==$$(sed -n 's/^torch==//p' requirements/constraints.txt)"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[test,notebooks]"
	touch $(STAMP)

course: $(STAMP)
	$(PY) -m spinmeround_lite.course run --profile $(PROFILE) $(SET)

solutions: $(STAMP)
	$(PY) -m spinmeround_lite.course run --solutions --profile $(PROFILE) $(SET)

# Unit tests, then every notebook and then every worked solution at the test profile (nbmake) in one shared run
# folder (the solutions reuse the notebooks' artifacts), then the figures check.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=1200 notebooks solutions

lint: $(STAMP)
	.venv/bin/ruff check .

lab: $(STAMP)
	.venv/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) -m spinmeround_lite.bench

# On a CUDA GPU: the gpu profile measured in a few minutes, written to results/gpu/device_check.json.
device-check: $(STAMP)
	$(PY) tools/device_check.py --out results/gpu

clean-notebooks: $(STAMP)
	$(PY) tools/clean_notebooks.py notebooks/*.ipynb solutions/*.ipynb
