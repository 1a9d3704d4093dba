# Newcomer entry points:  `make demo`  (set up + run the main job)  and  `make test`  (set up + run the tests).
# Both create/refresh a virtual environment in .venv at the repository root.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# PyTorch is pinned here (not in the package metadata, which accepts a range): these wheels come from
# the machine's local wheel store; an unpinned torch would pull several GB.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: all venv install install-test demo test bench list det-smoke clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(BIN)/python

# Core install (+ demo extras). Re-runs when the package metadata changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[demo]'
	touch $@

# Test extras on top of the core install, plus the MMDetection stack so the detection tests run.
# mmcv has no wheel for this torch: scripts/install_mmcv.py (standard library only, shipped in the sdist)
# builds a CPU wheel once (about 25 min on 2 cores), caches it in ~/.cache/timm-layerattn (or
# $$TIMM_LAYERATTN_CACHE) and reinstalls it from there (under a minute).
# With mmcv in place the `mmdet` extra resolves without building anything.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml scripts/install_mmcv.py
	$(BIN)/python scripts/install_mmcv.py
	$(PIP) install -q -e '.[test,demo,mmdet]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Passive OpenMP waiting: on a busy machine, spinning threads slow CPU training down ~10x (measured).
demo: install
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/timm-layerattn demo

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

list: install
	$(BIN)/timm-layerattn list

# Smoke test of one detection config: 2 training iterations + COCO evaluation on generated data (CPU, offline).
# Another config: make det-smoke DET_CONFIG=mask-rcnn_r50-mrlab_fpn_1x_coco.py
DET_CONFIG ?= faster-rcnn_r50-kcla_fpn_1x_coco.py
det-smoke: install-test
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/timm-layerattn det-smoke $(DET_CONFIG)

bench: install
	$(BIN)/timm-layerattn bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
