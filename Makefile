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

.PHONY: demo test test-plain-kernels test-fast lint figures bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[notebooks,dev]"
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

test: $(STAMP)
	$(VENV)/bin/ruff check pfl tests benchmarks notebooks
	tmp=$$(mktemp -d) && PFL_FIGURES_DIR=$$tmp $(VENV)/bin/pytest -n 2 --dist loadfile \
		tests pfl notebooks $(NBVAL) && rm -rf $$tmp
	$(MAKE) --no-print-directory test-plain-kernels

# The stored notebook outputs again, under the plain kernels: both must pass.
test-plain-kernels: $(STAMP)
	tmp=$$(mktemp -d) && $(PLAIN_KERNELS) PFL_FIGURES_DIR=$$tmp $(VENV)/bin/pytest -n 2 \
		--dist loadfile notebooks $(NBVAL) && rm -rf $$tmp

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

figures: $(STAMP)
	$(PY) -m pfl figures

clean:
	rm -rf $(VENV) runs
