# Two commands do everything on a fresh machine, set-up included:
#   make run    - the main job (the pipeline flow on RTE) on its embedded defaults
#   make test   - the test suite (what .ci/run runs)
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/glue
TASK ?= rte

.PHONY: setup run test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup
	bash scripts/setup
	touch $@

# A quick CPU run: a fifth of an epoch of fine-tuning, 3-epoch adapters, 2 sweep trials.
run: setup
	$(VENV)/bin/bertvision run --tasks $(TASK) --data-dir $(DATA_DIR) \
		--finetune-epochs 0.2 --extract-shard-size 500 --train-epochs 3 \
		--sweep-trials 2 --sweep-space '{"epochs": 3}' --ensemble-top-k 2

test: setup
	bash scripts/test

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
