"""Kata's view of the daemon on real QEMU: the VM it boots is the VM its Config reply
describes (per Kata generation), and Status lists what Kata's own server lists.

The QEMU is read from /proc/<pid>/cmdline of the running VM, the reply from the socket.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from kata_vmcache.client.rpc import CacheClient
from kata_vmcache.procs import cmdline

from .harness import Daemon, wait_for
from .observe import owned_vms, status_pids

pytestmark = pytest.mark.qemu


def config_reply(d: Daemon) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        async with CacheClient(d.endpoint) as client:
            data, _ = await client.config()
            return data
    return asyncio.run(fetch())


@pytest.mark.parametrize("version", ["1.x", "3.x"])
def test_the_running_qemu_is_what_config_says(make_daemon: Callable[..., Daemon],
                                              version: str) -> None:
    d = make_daemon(cache_number=1, kata_version=version)
    (record,) = d.wait_ready(1)
    argv = cmdline(record["pid"])
    h = config_reply(d)["HypervisorConfig"]
    memory = argv[argv.index("-m") + 1]
    smp = argv[argv.index("-smp") + 1]
    max_cpus = re.search(r"maxcpus=(\d+)", smp)
    assert max_cpus is not None, smp
    vcpus = h["NumVCPUs"] if version == "1.x" else math.ceil(h["NumVCPUsF"])
    assert argv[0] == h["HypervisorPath"]
    assert int(re.split(r"[M,]", memory)[0]) == h["MemorySize"] == 256
    assert int(smp.split(",")[0]) == vcpus == 1
    assert int(max_cpus[1]) == h["DefaultMaxVCPUs"]
    assert ("NumVCPUs" in h) == (version == "1.x")


def test_status_lists_ready_vms_only(make_daemon: Callable[..., Daemon]) -> None:
    # One boot at a time, three to do: most of the time one VM boots while others wait.
    d = make_daemon(cache_number=3, boot_parallelism=1)
    wait_for(lambda: any(state == "booting" and pid for pid, state in owned_vms(d.endpoint)),
             30, "a VM booting")
    seen_booting = False
    while len(d.records("ready")) < 3:
        # Status first, then the snapshot: states only move forward (booting -> ready), so
        # a VM still booting in the later snapshot was booting when Status answered.
        listed = set(status_pids(d.endpoint))
        after = owned_vms(d.endpoint)
        booting = {pid for pid, state in after if state == "booting" and pid}
        assert listed.isdisjoint(booting), (listed, after)
        assert listed <= {pid for pid, state in after if state == "ready"}, (listed, after)
        seen_booting |= bool(booting)
        time.sleep(0.05)  # a polling interval: boots take seconds, no need to spin
    assert seen_booting
    ready = d.wait_ready(3)
    assert set(status_pids(d.endpoint)) == {r["pid"] for r in ready}
    # The CLI's Kata lines are the same list; --json carries every VM with its state.
    lines = d.cli("status").stdout.splitlines()
    assert len([line for line in lines if line.startswith("VM pid = ")]) == 3
