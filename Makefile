# The two set-up commands of the README:
#   make run    install everything, then run the main job on the embedded default (SmolLM2 + wiki-en)
#   make test   install everything, then lint, type-check and run the whole test suite
#               (unit + integration)
PYTHON ?= python3
RUN_DIR ?= runs/default

.PHONY: install run test lint typecheck bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

run: install
	$(PYTHON) -m saeguard run --out $(RUN_DIR)

test: install
	$(PYTHON) -m ruff check saeguard tests benchmarks
	$(PYTHON) -m mypy saeguard
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check saeguard tests benchmarks
	$(PYTHON) -m ruff format --check saeguard tests benchmarks

typecheck:
	$(PYTHON) -m mypy saeguard

bench:
	$(PYTHON) benchmarks/harvest_throughput.py
