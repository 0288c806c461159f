# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= runtime,paddle,train,export,vision,serve,dev

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
	$(PY) scripts/bench_extract.py
	$(PY) scripts/bench_attention.py
	$(PY) scripts/bench_serve.py --batch-wait-ms 50

clean:
	rm -rf artifacts/demo artifacts/tmp
