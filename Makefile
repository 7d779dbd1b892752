# One command each: `make demo` (set up + main job), `make test` (set up + the whole test suite, what CI runs) and
# `make test-fast` (the developer's loop: everything not marked slow).
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

# Tests run in JOBS pytest-xdist workers (one per core of CI's 2-core machine; JOBS=0: one process, no xdist).
JOBS ?= 2

# Everything, as CI runs it: budget 6 minutes on 2 cores. The 25 slowest tests are listed, then pytest's summary
# line (N passed) at the end. worksteal: an idle worker takes queued tests from a busy one (the longest take 20-50 s).
test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) --dist worksteal --durations=25

# The inner loop, the one to run after every change: budget 90 seconds. Skips the tests marked slow (fresh
# interpreters, torchrun and other multi-process groups, Lightning / Hugging Face fits, the real SIGKILL test);
# resume stays covered in process (tests/test_train.py: killed between checkpoints, resumed, compared bit for bit).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -n $(JOBS) --dist worksteal

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
