# Two commands do everything on a fresh machine, set-up included:
#   make run    - the main job (the pipeline flow on SST-2) on its embedded defaults
#   make test   - the test suite (what .ci/run runs)
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/glue
TASK ?= sst2

.PHONY: setup run test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup
	bash scripts/setup
	touch $@

# A quick CPU run that shows the method on real data: the first 2000 training examples, half an
# epoch of fine-tuning, 5-epoch adapters on all its layers, 4 sweep trials, 2 at a time.
run: setup
	$(VENV)/bin/bertvision run --tasks $(TASK) --data-dir $(DATA_DIR) --max-train-examples 2000 \
		--finetune-epochs 0.5 --extract-shard-size 1000 --train-epochs 5 \
		--sweep-trials 4 --sweep-parallel 2 --sweep-space '{"epochs": 4}' --ensemble-top-k 2

test: setup
	bash scripts/test

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
