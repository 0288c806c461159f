# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,export,dev
# Paddle's bundled MKL runs matmul ~3x slower on AMD CPUs unless told to use the AVX2 code path.
export MKL_DEBUG_CPU_TYPE ?= 5

.PHONY: env test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

env: $(VENV)/.installed

test: env
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check aoanet export runtime scripts tests

demo: env
	$(PY) scripts/demo.py

bench: env
	$(PY) scripts/bench_cider.py
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_infer.py

clean:
	rm -rf artifacts/demo artifacts/tmp
