# vmtide developer entry points. Everything runs from a virtualenv in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv proto check-proto lint typecheck test test-fast test-vm vm-image demo clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[broker,dev]'
	touch $@

venv: $(STAMP)

# Regenerate the Python stubs from proto/ (committed, so a guest needs no protoc).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto \
	    --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	    proto/vmtide/v1/broker.proto

# Fails when the committed stubs differ from what proto/ generates.
check-proto: $(STAMP)
	$(PY) tools/check_proto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: check-proto lint typecheck
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x

# The real-VM guest image (kernel and initramfs, cached in .cache/vm) and its tests.
vm-image: $(STAMP)
	$(PY) tests/vm/build_image.py

test-vm: $(STAMP)
	$(VENV)/bin/pytest -q -m vm

# The main job: a simulated guest (fake sysfs) whose CPUs and memory follow a
# load pattern, with the agent and the broker talking gRPC.
demo: $(STAMP)
	$(PY) -m vmtide.demo

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
