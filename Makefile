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

run: setup
	$(VENV)/bin/bertvision run --task $(TASK) --data-dir $(DATA_DIR)

test: setup
	bash scripts/test

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
