# Every install step of the project lives here. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED ?= ../shared
# The real SmolLM2-135M checkpoint for parity tests, built offline from ../shared when it exists.
SMOLLM2_DIR ?= $(HOME)/.cache/pdpo-models/smollm2-135m-instruct

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

demo: setup sysdeps-demo
	$(PY) -m pdpo_jax.train --config configs/demo.yaml

smollm2:
	@if [ -x $(SHARED)/models/build_smollm2.sh ] || [ -f $(SHARED)/models/build_smollm2.sh ]; then \
	  bash $(SHARED)/models/build_smollm2.sh $(SMOLLM2_DIR) >/dev/null || echo "warning: SmolLM2 build failed; its tests will skip"; \
	else echo "no $(SHARED)/models: SmolLM2 tests will skip"; fi

test: setup sysdeps-test smollm2
	PDPO_SMOLLM2_DIR=$(SMOLLM2_DIR) PDPO_SHARED=$(SHARED) $(PY) -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
