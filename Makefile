# One-command set-up: every target below creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint format docs bench notebooks clean

demo: $(STAMP)  ## train, convert and evaluate on the bundled real data (under 10 min on 2 cores)
	$(VENV)/bin/bnnconvert demo

test: $(STAMP)  ## lint, import contract, format check and the test suite (no GPU needed)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" --durations=15

test-quick: $(STAMP)  ## the same without the integration tests (subprocesses, DDP, notebooks, docs, demo)
	$(PY) -m pytest -q -m "not slow and not integration" --durations=15

lint: $(STAMP)  ## ruff and the import contract (pyproject.toml [tool.importlinter])
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(VENV)/bin/lint-imports

format: $(STAMP)
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

docs: $(STAMP)  ## build the documentation site (strict) into site/
	$(PY) -m mkdocs build --strict

notebooks: $(STAMP)  ## re-execute the example notebooks at full budget, outputs stored in place
	OMP_NUM_THREADS=1 $(PY) tools/run_notebooks.py

bench: $(STAMP)  ## speed and memory ratios: docs/benchmarks.md (core, then the posterior's section), benchmarks/predict_memory.md
	$(PY) benchmarks/bench_core.py --markdown docs/benchmarks.md --json benchmarks/results.json
	$(PY) benchmarks/bench_posterior.py --markdown docs/benchmarks.md --json benchmarks/posterior_results.json
	$(PY) benchmarks/bench_predict_memory.py --markdown benchmarks/predict_memory.md --json benchmarks/predict_memory.json

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this build lies on the machine's disk (other versions download GBs)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
