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

.PHONY: demo test test-fast lint figures bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[notebooks,dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pfl demo

test: $(STAMP)
	$(VENV)/bin/ruff check pfl tests benchmarks notebooks
	$(VENV)/bin/pytest -n 2 --dist loadfile tests pfl notebooks --nbval --nbval-current-env \
		--nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 900

test-fast: $(STAMP)
	$(VENV)/bin/pytest -m "not slow"

figures: $(STAMP)
	$(PY) -m pfl figures

clean:
	rm -rf $(VENV) runs
