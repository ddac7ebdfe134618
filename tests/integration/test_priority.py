"""Background boots never compete with running sandboxes, on real QEMU and a real daemon:
a VM booted ahead of demand runs every QEMU thread at SCHED_IDLE, the VM a client takes
has every thread back at normal priority by the time GetBaseVM answers, and
`boot_priority = "normal"` (live on reload) boots at normal priority."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from kata_vmcache import priority

from .harness import Daemon, wait_for

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not priority.can_lower(),
                                 reason="needs CAP_SYS_NICE to leave SCHED_IDLE")]


def thread_policies(pid: int) -> set[str]:
    names = {os.SCHED_IDLE: "idle", os.SCHED_OTHER: "normal"}
    return {names.get(os.sched_getscheduler(int(tid)), "other")
            for tid in os.listdir(f"/proc/{pid}/task")}


def test_cached_vms_idle_and_the_taken_one_normal(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1)
    ready, = daemon.wait_ready(1)
    # QEMU's vCPU, RCU and worker threads were all born at the level of its launch.
    assert len(os.listdir(f"/proc/{ready['pid']}/task")) > 1
    assert thread_policies(ready["pid"]) == {"idle"}
    taken = daemon.get()
    pid = taken["hypervisor"]["Pid"]
    assert pid == ready["pid"]
    assert thread_policies(pid) == {"normal"}
    # The refill is background work again.
    refill = wait_for(lambda: [r for r in daemon.records("ready") if r["pid"] != pid],
                      90, "the refill")
    assert thread_policies(refill[0]["pid"]) == {"idle"}


def test_boot_priority_normal_and_its_reload(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1, boot_priority="normal")
    ready, = daemon.wait_ready(1)
    assert thread_policies(ready["pid"]) == {"normal"}
    result = daemon.cli("check-config")
    assert "vmcache.boot_priority" in result.stdout
    # Back to idle on a reload: the next boot (the refill of a taken VM) is idle.
    daemon.config.write_text(daemon.config.read_text().replace(
        'boot_priority = "normal"', 'boot_priority = "idle"'))
    reload = daemon.cli("reload")
    assert reload.returncode == 0, reload.stderr
    taken = daemon.get()
    refill = wait_for(lambda: [r for r in daemon.records("ready")
                               if r["pid"] != taken["hypervisor"]["Pid"]], 90, "the refill")
    assert thread_policies(refill[0]["pid"]) == {"idle"}
