# The two set-up commands of the README:
#   make run    install everything, then run the main job on the embedded default (SmolLM2 + wiki-en)
#   make test   install everything, then lint, type-check and run the whole test suite
#               (unit + integration)
PYTHON ?= python3
RUN_DIR ?= runs/default

.PHONY: install run robustify test lint typecheck bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

run: install
	$(PYTHON) -m saeguard run --out $(RUN_DIR)

# After `make run`: LoRA robustification against 20% typos, guided by that run's SAE and monitor.
robustify: install
	$(PYTHON) -m saeguard robustify --model smollm2-135m --sae $(RUN_DIR)/sae \
		--monitor $(RUN_DIR)/monitor --shift typos:0.2 --out runs/robustify

test: install
	bash scripts/install_browser.sh
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
