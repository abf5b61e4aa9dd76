# The README's two set-up commands: `make demo` and `make test`.
# torch is installed first, pinned: the CPU build lies on local disk here, and an unpinned
# torch would pull a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# Where pip finds torch: this machine's pip configuration already points at a local CPU build;
# elsewhere, e.g. `make demo TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) $(TORCH)
	$(PY) -m pip install --quiet -e ".[test,lora]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/unlearning-audit demo --json demo.json

# Two workers, a test module each at a time: the tests run torch on one thread, so a 2-core
# machine runs two modules at once (the calibration module beside all the others: modules go
# out in collection order, longest first, tests/conftest.py).
WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/bench_metrics.py --quick

clean:
	rm -rf audit-store demo.json .pytest_cache
