"""Reload planning: which edits retire VMs, which only rebuild the factory, which need a
restart; the record `kata-vmcache reload` reads back. Pure logic on real files; the daemon
side is proven on real QEMU in tests/integration/test_systemd.py."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from kata_vmcache import config as cfg
from kata_vmcache.errors import VmcacheError
from kata_vmcache.service.reload import KATA_CONFIG, Outcome, classified, plan, request_reload

BASE = """
[hypervisor.qemu]
path = "{qemu}"
kernel = "{kernel}"
initrd = "{initrd}"
default_memory = 256

[agent.kata]
enable_debug = false

[factory]
vm_cache_number = 2
vm_cache_endpoint = "/run/kata-test/cache.sock"

[vmcache]
accelerator = "tcg"
state_dir = "/run/kata-test/state"
ready_timeout = 30.0
"""


@pytest.fixture
def base(tmp_path: Path) -> str:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd").write_bytes(b"i")
    return BASE.format(qemu=qemu, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd")


def load(text: str) -> cfg.Config:
    return cfg.parse(text)[0]


@pytest.mark.parametrize(("old", "new", "keys", "new_vms", "new_factory", "restart"), [
    ("vm_cache_number = 2", "vm_cache_number = 5",
     {"factory.vm_cache_number"}, False, False, False),
    ("default_memory = 256", "default_memory = 512",
     {"hypervisor.qemu.memory_mib", KATA_CONFIG}, True, True, False),
    ('accelerator = "tcg"', 'accelerator = "kvm"',
     {"vmcache.accelerator"}, True, True, False),
    # Kata's agent settings are part of the Config reply kata-runtime compares.
    ("enable_debug = false", "enable_debug = true", {KATA_CONFIG}, True, True, False),
    ("ready_timeout = 30.0", "ready_timeout = 90.0",
     {"vmcache.ready_timeout"}, False, True, False),
    ('state_dir = "/run/kata-test/state"', 'state_dir = "/run/elsewhere"',
     {"vmcache.state_dir"}, False, False, True),
    ('vm_cache_endpoint = "/run/kata-test/cache.sock"',
     'vm_cache_endpoint = "/run/kata-test/other.sock"',
     {"factory.vm_cache_endpoint"}, False, False, True),
    ("[vmcache]", "[vmcache]\nboot_parallelism = 4",
     {"vmcache.boot_parallelism"}, False, False, False),
    ("[vmcache]", '[vmcache]\nsocket_mode = "0660"', {"vmcache.socket_mode"}, False, False, False),
    ("[vmcache]", "[vmcache]\nautoscale = true\nmax_ready = 8",
     {"vmcache.autoscale", "vmcache.max_ready"}, False, False, False),
    ("[agent.kata]", "[runtime]\nenable_debug = true\n[agent.kata]", set(), False, False, False),
])
def test_plan(base: str, old: str, new: str, keys: set[str], new_vms: bool,
              new_factory: bool, restart: bool) -> None:
    assert old in base
    p = plan(load(base), load(base.replace(old, new)))
    assert p.keys == keys
    assert p.new_vms is new_vms
    assert p.new_factory is new_factory
    assert bool(p.needs_restart) is restart


def test_changes_read_as_old_and_new_values(base: str) -> None:
    p = plan(load(base), load(base.replace("vm_cache_number = 2", "vm_cache_number = 3")))
    assert [str(c) for c in p.changes] == ["factory.vm_cache_number 2 -> 3"]


def test_every_setting_has_a_reload_rule(base: str) -> None:
    """A key added to config.py without deciding what a reload does with it would be
    treated as needing a restart; this makes the decision explicit."""
    keys = [key for key, _ in cfg.describe(load(base))]
    assert [k for k in keys if not classified(k)] == []
    assert not classified("vmcache.some_future_key")


def test_outcome_round_trip(tmp_path: Path) -> None:
    assert Outcome.read(tmp_path) is None
    Outcome(123, 4, "refused", "factory.vm_cache_number: must be >= 0").write(tmp_path)
    assert Outcome.read(tmp_path) == Outcome(123, 4, "refused",
                                             "factory.vm_cache_number: must be >= 0")
    (tmp_path / "reload.json").write_text('{"pid": 1, "generation": 1, "result": "maybe"}')
    assert Outcome.read(tmp_path) is None


def test_request_reload_refuses_a_server_with_another_state_dir(tmp_path: Path) -> None:
    with pytest.raises(VmcacheError, match=r"keeps no reload record in .*changing it needs a "
                                           r"restart"):
        asyncio.run(request_reload(os.getpid(), tmp_path, timeout=1))
    Outcome(1, 0, "started", "").write(tmp_path)  # another daemon's record
    with pytest.raises(VmcacheError, match="keeps no reload record"):
        asyncio.run(request_reload(os.getpid(), tmp_path, timeout=1))
