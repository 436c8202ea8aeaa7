# make demo: the whole flow on Fashion-MNIST.   make test: the test suite (what CI runs).
# Both create .venv, install the project with its dev extra and the Fashion-MNIST Debian package when
# missing (make test also Chromium and its driver, for the search page's browser test); re-running skips
# what is already installed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := $(or $(BARLOW_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install data browser bench gpu-wheels clean

demo: install data
	$(BIN)/barlow demo --out $(DEMO_DIR)

test: install data browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "barlow-embed needs Python >= 3.11; set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

data:
	@if [ -d $(FMNIST) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing; run: sudo apt-get install dataset-fashion-mnist"; exit 1; \
	fi

# Headless Chromium and its driver, for the search page's browser test (tests/test_index.py).
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing the Debian packages chromium and chromium-driver"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } || \
			echo "could not install Chromium; the browser test will skip"; \
	else \
		echo "no Chromium here; the browser test will skip (sudo apt-get install chromium chromium-driver)"; \
	fi

bench: install data
	$(BIN)/python bench/train_throughput.py

# What the GPU suite needs on a device machine, which reaches no registry, packed under .gpu/ (ignored) in
# pieces of at most 60 MiB, and the device calls that carry them (docs/gpu-suite.md).
GPU_PYTHON ?= 3.12
gpu-wheels: install data
	$(BIN)/python bench/gpu_wheels.py --python-version $(GPU_PYTHON)

clean:
	rm -rf runs .pytest_cache
