# One command each: `make demo` (set up + main job) and `make test` (set up + the whole test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssam-installed

.PHONY: setup demo test test-fast lint format docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssam compare --config recipes/demo.yaml --output runs/demo

# Everything, with pytest's summary line (N passed) at the end.
test: $(STAMP)
	$(PY) -m pytest

# The inner loop: skips the multi-process and kill/resume tests.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples scripts
	$(VENV)/bin/ruff format --check src tests examples scripts
	$(VENV)/bin/mypy src/ssam/optim src/ssam/train

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples scripts
	$(VENV)/bin/ruff format src tests examples scripts

# The API reference from the docstrings; --strict turns every warning into a failure.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

bench: $(STAMP)
	$(VENV)/bin/ssam bench --quick

clean:
	rm -rf $(VENV) runs build src/*.egg-info
