# Two commands do everything (README): `make demo` and `make test`. Each creates the virtual
# environment first if it is missing.
PYTHON ?= python3.11
# One BLAS/OpenMP thread per process: the models here are small, so extra threads mostly spin,
# and a fixed thread count keeps stored notebook outputs bit-stable. `make test` runs two
# pytest workers instead (one notebook stays on one worker).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-plain-kernels test-plain-kernels-all test-fast lint figures bench clean trust lab nb-metadata check-lab

# Byte-code is compiled after the install, on every core (pip compiles file by file): the
# environment may set PYTHONDONTWRITEBYTECODE, and then every process (each notebook kernel)
# would compile what it imports. Like pip, a file that does not compile is left to import time.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -e ".[notebooks,dev]"
	$(PY) -m compileall -q -j 0 $(VENV)/lib pfl >/dev/null || true
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pfl demo

# Notebooks under nbval write their figures into a temporary folder, never into figures/.
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg \
	--nbval-cell-timeout 900
# "Another CPU" on this machine: the plainest kernels of ATen, MKL, oneDNN, numpy and OpenBLAS
# instead of the machine's best (AVX2 / AVX-512): summation orders and rounding differ as on other CPUs.
PLAIN_KERNELS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4" OPENBLAS_CORETYPE=Nehalem

# Files run in the order named (xdist would otherwise sort them by their number of tests). 05 goes
# first and caches the auxiliary features while the other worker runs 08, which needs none; 07,
# 04 and 06 then read them instead of encoding them again; the many small files come last, so
# that the two workers end together.
NOTEBOOKS := $(wildcard notebooks/[0-9]*_*.ipynb)
HEAVY_NOTEBOOKS := $(addprefix notebooks/,05_training.ipynb 08_ablations.ipynb \
	07_peer_methods.ipynb 04_gaussian_vs_flow.ipynb 06_evaluation.ipynb)
NOTEBOOK_ORDER := $(HEAVY_NOTEBOOKS) $(filter-out $(HEAVY_NOTEBOOKS),$(NOTEBOOKS)) notebooks/solutions
TEST_ORDER := $(NOTEBOOK_ORDER) tests pfl
test: $(STAMP)
	$(VENV)/bin/ruff check pfl tests benchmarks notebooks
	tmp=$$(mktemp -d) && PFL_FIGURES_DIR=$$tmp $(VENV)/bin/pytest -n 2 --dist loadfile \
		--no-loadscope-reorder $(TEST_ORDER) $(NBVAL) && rm -rf $$tmp
	$(MAKE) --no-print-directory test-plain-kernels

# The same stored outputs again under the plainest kernels ("another CPU", README "Same numbers
# on any CPU"): both passes must agree. CI's 20-minute budget holds the two notebooks that
# train cheaply (03b trains Bayes-PFL on a subset, 03 fits flows);
# `make test-plain-kernels-all` runs every notebook and the solutions, 00b and 04-08 too: ~16
# more minutes on 2 cores (README).
PLAIN_NOTEBOOKS := notebooks/03b_bayesian_view.ipynb notebooks/03_planar_flows.ipynb
test-plain-kernels: $(STAMP)
	tmp=$$(mktemp -d) && $(PLAIN_KERNELS) PFL_FIGURES_DIR=$$tmp $(VENV)/bin/pytest \
		-n 2 --dist loadfile --no-loadscope-reorder $(PLAIN_NOTEBOOKS) $(NBVAL) \
		&& rm -rf $$tmp

test-plain-kernels-all: $(STAMP)
	$(MAKE) --no-print-directory test-plain-kernels PLAIN_NOTEBOOKS="$(NOTEBOOK_ORDER)"

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

figures: $(STAMP)
	$(PY) -m pfl figures

# JupyterLab draws stored widget views (notebook 08's explorer) only in trusted notebooks.
# Trust is kept per user and per notebook content, so it is redone when a notebook changes.
TRUSTED := $(VENV)/.trusted

$(TRUSTED): $(STAMP) $(NOTEBOOKS)
	$(VENV)/bin/jupyter trust $(NOTEBOOKS)
	touch $(TRUSTED)

trust: $(TRUSTED)

lab: $(TRUSTED)
	$(VENV)/bin/jupyter lab --ServerApp.default_url=/lab/tree/notebooks

# After re-executing notebooks by any other means than `pfl figures --save`: store the
# kernelspec and language_info the installed kernel writes on open (else the tab opens unsaved).
nb-metadata: $(STAMP)
	$(PY) -c "from pfl.viz.figures import normalize_notebooks; normalize_notebooks()"

# Open notebooks in JupyterLab in headless Chromium (tests/lab/check_lab.py). Installs
# Chromium and its driver with apt-get if no browser/driver is found (root, else sudo).
LAB_NOTEBOOKS ?= 01 03 08
# Extra options, e.g. CHECK_LAB_ARGS="--screenshot /tmp/explorer.png --keep".
CHECK_LAB_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

check-lab: $(STAMP)
	@$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --quiet -e ".[notebooks,dev]"
	@$(PY) tests/lab/check_lab.py --find-browser >/dev/null 2>&1 || { \
		echo "check-lab: installing chromium and chromium-driver with apt-get"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	$(PY) tests/lab/check_lab.py --only $(LAB_NOTEBOOKS) $(CHECK_LAB_ARGS)

clean:
	rm -rf $(VENV) runs
