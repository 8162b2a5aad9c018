# Two commands on a fresh machine:  `make demo`  (train a small MMoE with gatewatch, open the dashboard)
#                                   `make test`  (lint + the whole test suite, browser tests included)
# Both create .venv with the CPU torch wheel first; re-running them installs nothing new.
# While working: `make test-fast` (every module, without the slow and browser tests, on 2 workers: under a minute).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PORT   ?= 8501

.PHONY: setup demo test test-fast lint browser dashboard sample-runs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/gatewatch demo --port $(PORT)

dashboard: $(STAMP)
	$(BIN)/gatewatch dashboard sample_runs --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

browser:
	@command -v chromium >/dev/null 2>&1 || bash scripts/install_chromium.sh

test: $(STAMP) browser lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser" -n 2

sample-runs: $(STAMP)
	$(BIN)/python scripts/make_sample_runs.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_capture.py
	$(BIN)/python benchmarks/bench_capture.py --tasks 4 --only ratios
	$(BIN)/python benchmarks/bench_conflict.py
	$(BIN)/python benchmarks/bench_proxy.py
	$(BIN)/python benchmarks/bench_routers.py
	$(BIN)/python benchmarks/bench_similarity.py
	$(BIN)/python benchmarks/bench_dashboard.py
	$(BIN)/python benchmarks/bench_long_run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .import_linter_cache artifacts
