# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if it is missing and installs the project into it (once per pyproject change).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= workdirs/digits

.PHONY: demo test install clean-demo

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

# Trains a tiny DiG on the bundled digits (resuming if $(DEMO_DIR) holds a run), writes a grid
# with one row per digit, and reports how often a classifier reads the requested digit.
demo: $(INSTALLED)
	$(PY) train.py --config configs/digits.py --workdir $(DEMO_DIR)
	$(PY) sample.py --workdir $(DEMO_DIR) --classes all --num_per_class 10 \
	  --out $(DEMO_DIR)/demo_grid.png --npz $(DEMO_DIR)/demo_samples.npz
	$(PY) -m dig_jax.evaluate.digits --npz $(DEMO_DIR)/demo_samples.npz \
	  --json $(DEMO_DIR)/demo_accuracy.json
	@echo "Sample grid (one row per digit 0-9): $(abspath $(DEMO_DIR))/demo_grid.png"

test: $(INSTALLED)
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean-demo:
	rm -rf $(DEMO_DIR)
