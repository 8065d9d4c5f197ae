# vmtide developer entry points. Everything runs from a virtualenv in .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv host-deps proto check-proto lint typecheck test test-fast test-vm vm-image demo \
	demo-simulated bench bench-quick packages clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[broker,dev]'
	touch $@

venv: $(STAMP)

# Regenerate the Python stubs from proto/ (committed, so a guest needs no protoc).
proto: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iproto \
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

test: host-deps check-proto lint typecheck
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -x

# The real-VM guest image (kernel and initramfs, cached in .cache/vm) and its tests.
vm-image: $(STAMP)
	$(PY) tests/vm/build_image.py

test-vm: $(STAMP)
	$(VENV)/bin/pytest -q -m vm

# Debian packages the demo and the tests need on the host (installed when missing, as root).
host-deps:
	tools/host-deps.sh

# The main job: a real Linux guest under QEMU with the agent inside and the
# broker here over QMP; its CPUs and memory follow a load pattern, live.
demo: host-deps $(STAMP)
	PYTHONPATH=tests $(PY) -m vm.demo

# The same story on a simulated guest (fake sysfs): no QEMU, 1 minute.
demo-simulated: $(STAMP)
	$(PY) -m vmtide.demo

# The .debs and .rpms for VM images and hosts, in dist/ (docs/packaging.md).
packages: host-deps $(STAMP)
	$(PY) packaging/build.py --rpm

# Benchmarks (bench/): each writes its report, with the command and machine,
# under docs/bench/ (about an hour in all; the real-VM ones under TCG).
bench: host-deps $(STAMP)
	$(PY) -m bench.policy_quality
	$(PY) -m bench.broker_scale
	$(PY) -m bench.footprint
	PYTHONPATH=tests $(PY) -m bench.vm_throughput
	PYTHONPATH=tests $(PY) -m bench.vm_reaction

# Each benchmark on a tiny input (CI runs these through tests/test_bench_*.py).
bench-quick: host-deps $(STAMP)
	$(PY) -m bench.policy_quality --quick
	$(PY) -m bench.broker_scale --quick --out .cache/bench
	$(PY) -m bench.footprint --quick --out .cache/bench
	PYTHONPATH=tests $(PY) -m bench.vm_throughput --quick --out .cache/bench
	PYTHONPATH=tests $(PY) -m bench.vm_reaction --quick --out .cache/bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
