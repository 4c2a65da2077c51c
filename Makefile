# The two commands a user needs are `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := libiscsi-bin libiscsi-dev gcc python3-dev qemu-utils qemu-block-extra tgt prometheus
DATA_DIR ?= $(CURDIR)/var/data

.PHONY: run test venv apt-deps lint conformance-update openapi bench chaos clean

# The install compiles the hot modules with mypyc (setup.py, frontend/build.py): rebuilt when they
# change, so that the tests run the compiled build of this source, as CI does.
HOT_SOURCES := $(shell $(PYTHON) -c 'import runpy; print(*(m.replace(".", "/") + ".py" for m in runpy.run_path("frontend/build.py")["COMPILED_MODULES"]))')

$(VENV)/.installed: pyproject.toml setup.py frontend/build.py $(HOT_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

## make run: start `sparrow serve` with a demo volume on this machine and print how to attach
run: venv
	@mkdir -p $(DATA_DIR)
	$(VENV)/bin/sparrow serve --data-dir $(DATA_DIR) --demo-volume demo:1GiB --advertise 127.0.0.1

## make test: install what the tests need, then run every test (unit, integration, conformance) on
## the compiled build, and the tests of the compiled modules again on pure Python (SPARROW_PURE_PYTHON=1)
PURE_TESTS := tests/unit tests/integration/test_build.py::test_the_daemon_reports_the_build_it_runs \
	tests/integration/test_conformance.py \
	tests/integration/test_real_clients.py tests/integration/test_bad_input.py
test: apt-deps venv lint
	$(VENV)/bin/pytest -q
	SPARROW_PURE_PYTHON=1 $(VENV)/bin/pytest -q $(PURE_TESTS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

conformance-update: venv apt-deps
	SPARROW_UPDATE_CONFORMANCE=1 $(VENV)/bin/pytest -q tests/integration/test_conformance.py

## make openapi: rewrite sparrow/master/openapi.json from sparrow/master/openapi.py (after adding a route)
openapi: venv
	$(PY) -m sparrow.master.openapi --write

## build/gatewriter: the final gate's libiscsi writer (tests/integration/gate.py also builds it)
build/gatewriter: tests/tools/gatewriter.c
	@mkdir -p build
	gcc -O2 -Wall -Wextra -Werror -o $@ $< -liscsi

## make chaos: the final gate with many kill points (SPARROW_GATE_KILLS, default 25 here)
GATE_KILLS ?= 25
chaos: venv apt-deps build/gatewriter
	SPARROW_GATE_KILLS=$(GATE_KILLS) $(VENV)/bin/pytest -q -s tests/integration/test_gate.py

bench: venv apt-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
