# Two entry points (see README): `make demo` and `make test`. Both set everything up
# first; set-up is idempotent and re-runs only when the package definition changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.salomi-installed
KERNEL_SRC := $(wildcard salomi/runtime/csrc/*.c salomi/runtime/csrc/*.h)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml $(wildcard setup.py) $(KERNEL_SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/salomi setup
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/salomi demo

test: setup
	$(BIN)/ruff check salomi tests bench
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info
