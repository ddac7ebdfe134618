# kata-vmcache: `make run` and `make test` work on a fresh Debian machine; `make setup` is
# the idempotent set-up both share (system packages, virtualenv, demo guest).

PYTHON ?= python3
VENV   ?= .venv
DEMO   ?= .demo
BIN    := $(VENV)/bin
CONFIG := $(DEMO)/configuration.toml

.PHONY: setup system venv demo run test test-unit lint proto bench clean

setup: system venv demo

system:
	@scripts/setup-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# The demo guest builder is itself idempotent: it rebuilds only when its inputs change.
demo: venv
	@$(BIN)/kata-vmcache demo-guest $(DEMO) >/dev/null

run: setup
	$(BIN)/kata-vmcache --config $(CONFIG) init

test: setup
	$(BIN)/python -m pytest

test-unit: venv
	$(BIN)/python -m pytest tests/unit

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# The benchmark: a real daemon on the demo guest; writes bench/results/latest.{json,md} and
# latency.png. Never fails because of a number. BENCH_ARGS="--samples 200" for more.
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache .mypy_cache *.egg-info
