# One command each: `make sweep` runs the main job, `make test` the tests.
# Both bootstrap .venv from pyproject.toml when it is missing or older.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kmclust-installed

.PHONY: sweep test test-fast lint bench stage report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

sweep: $(STAMP)
	$(PY) jobs/sweep.py --scheduler local --resume

test: lint
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

stage: $(STAMP)
	$(PY) data/stage.py mnist-subset

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) jobs/bench.py iteration --k 10,20,256

report: $(STAMP)
	$(PY) jobs/report.py results/mnist-subset.zarr

clean:
	rm -rf $(VENV) results data/*.zarr
