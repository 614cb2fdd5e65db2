# Set-up and entry points. Every target creates .venv on first use: torch and its matching torchvision are
# installed first, pinned in requirements/torch.txt (read by the Dockerfile too; a newer torch pulls GBs of CUDA
# wheels). TORCH_INDEX_URL picks the index they come from (e.g. .../whl/cpu); empty = pip's default.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.distar-installed
TORCH_REQUIREMENTS := requirements/torch.txt
TORCH_INDEX_URL ?=
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast demo demo-2d clean

$(STAMP): pyproject.toml $(TORCH_REQUIREMENTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<26"
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) -r $(TORCH_REQUIREMENTS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The whole suite (CI runs exactly this through .ci/run).
test: $(STAMP)
	timeout 3000 $(PY) -m pytest -q

# Math and unit tests only: no Ray, seconds.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not ray and not slow"

# The main job: DI* on the digits world on a local Ray cluster (2 DDP workers, the proxy rewards as Ray Serve
# deployments), tracked in ./mlflow.db and registered as models:/distar-digits@champion; prints the table.
# A second run resumes (and re-reports) the finished one; `make clean` starts over.
demo: $(STAMP)
	timeout 3000 $(PY) -m jobs.train --config digits_ray

# The 2-D world: DI*, DI++ and reward-only side by side in under a minute.
demo-2d: $(STAMP)
	$(PY) -m jobs.compare_gaussian2d --alpha 0.3

clean:
	rm -rf runs mlruns mlflow.db mlartifacts .pytest_cache
