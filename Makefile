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

.PHONY: course solutions test test-portability test-browser screenshots lint lab clean-notebooks bench device-check help

help:
	@echo "make course [PROFILE=test|cpu|gpu|paper]  run every notebook, write runs/<profile>/summary.json"
	@echo "make course OVERRIDES=\"batch_size=8\"     the same with profile fields changed (run folder records them)"
	@echo "make solutions [PROFILE=...]               run the worked solutions in the same run folder"
	@echo "make test                                  two lanes at once: unit tests + float-path guard | every notebook and solution at the test profile + the browser tests"
	@echo "make test-portability                      the float tests on one thread, on scalar kernels and on default threads"
	@echo "make test-browser                          the course in JupyterLab in headless Chromium (tests/browser)"
	@echo "make screenshots                           the README's JupyterLab pictures (docs/images/lab_*.png, cpu profile)"
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

# Two lanes at once, one core each, each on its own temporary run folder (tools/run_tests.py; it prints where the
# time went): the unit tests and then the portability guard (the `floats` tests on torch's scalar kernels);
# every notebook and then every worked solution at the test profile (nbmake; the solutions reuse the notebooks'
# artifacts), then the course in JupyterLab in a browser on that run folder (as a learner opens it after running
# the notebooks). One thread per process unless OMP_NUM_THREADS says otherwise.
test: $(STAMP)
	$(PY) tools/run_tests.py

# The portability guard in full: the tests marked `floats` (they compare floats against a measured bound, or train)
# on one thread, on torch's scalar kernels (ATEN_CPU_CAPABILITY=default: another float path on the same CPU, as
# another machine's kernels would be), the two at once, one core each, and then on the machine's default thread
# count. A test that passes on one path and fails on another is fragile: its bound was read off one machine.
# (`make test` runs the unit tests on one thread and the guard on the scalar kernels.)
test-portability: $(STAMP)
	@d=$$(mktemp -d); \
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m floats --durations=5 --ignore=tests/browser tests \
	    > $$d/one-thread.log 2>&1 & a=$$!; \
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m floats \
	    --durations=5 --ignore=tests/browser tests > $$d/scalar-kernels.log 2>&1 & b=$$!; \
	ra=0; wait $$a || ra=$$?; rb=0; wait $$b || rb=$$?; \
	for f in one-thread scalar-kernels; do echo "portability guard, $$f: $$(tail -n 1 $$d/$$f.log)"; done; \
	if [ $$ra -ne 0 ]; then cat $$d/one-thread.log; fi; \
	if [ $$rb -ne 0 ]; then cat $$d/scalar-kernels.log; fi; \
	rm -rf $$d; [ $$ra -eq 0 ] && [ $$rb -eq 0 ]
	@echo "portability guard, default threads ($$($(PY) -c 'import torch; print(torch.get_num_threads())')):"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider -m floats --ignore=tests/browser tests

# JupyterLab (the course's .venv) in headless Chromium (Debian's `chromium`; skipped without it, a failure with
# CI=true): the file browser, notebooks 00, 07 and 08 run from the Run menu, the viewer, the rig, the GIF, the
# equations; a fresh temporary run folder unless SMR_RUN_DIR names one. Screenshots under pytest's temporary folder.
test-browser: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider tests/browser

# The README's pictures of the course in JupyterLab (docs/images/lab_*.png), at the cpu profile in runs/cpu
# (what `make course` built is reused; what is missing is built first).
screenshots: $(STAMP)
	SMR_PROFILE=cpu SMR_RUN_DIR=$(CURDIR)/runs/cpu SMR_DOC_IMAGES=$(CURDIR)/docs/images HF_HUB_OFFLINE=1 \
	    $(PY) -m pytest -q -p no:cacheprovider tests/browser/test_course_in_lab.py

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
