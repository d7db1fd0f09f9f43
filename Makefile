# dsv3: `make run` trains the tiny model on the bundled corpus; `make test` runs the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint format install clean posttrain

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# install torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dsv3 train --preset tiny --out runs/tiny --overwrite

# SFT then GRPO on the add task, from scratch on the CPU (scripts/posttrain.sh; settings as env variables)
posttrain: $(STAMP)
	DSV3=$(VENV)/bin/dsv3 PY=$(PY) bash scripts/posttrain.sh

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) runs
