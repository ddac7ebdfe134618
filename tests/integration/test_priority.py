"""Background boots never compete with running sandboxes, on real QEMU and a real daemon:
a VM booted ahead of demand runs every QEMU thread, and its session's group, at idle
priority (nice 19) while it boots, every thread and the group are back at normal priority
once it is paused in the cache (and so when a client takes it), and `boot_priority =
"normal"` (live on reload) boots at normal priority."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from kata_vmcache.vm import priority

from .harness import Daemon, wait_for

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(not priority.can_lower(),
                                 reason="needs CAP_SYS_NICE to leave nice 19")]


def thread_policies(pid: int) -> set[str]:
    """The level of each of its threads and of its session's group (when the kernel has
    autogroups)."""
    names = {priority.IDLE_NICE: "idle", priority.normal_nice(): "normal"}
    levels = {names.get(os.getpriority(os.PRIO_PROCESS, int(tid)), "other")
              for tid in os.listdir(f"/proc/{pid}/task")}
    group = priority.group_nice(pid)
    if group is not None:
        levels.add({priority.IDLE_NICE: "idle", 0: "normal"}.get(group, "other"))
    return levels


def booting_pid(daemon: Daemon) -> int:
    def find() -> int | None:
        return next((r["pid"] for r in daemon.records("booting") if r.get("pid")), None)
    pid: int = wait_for(find, 60, "a booting VM with its QEMU launched")
    return pid


def test_boots_idle_cached_and_taken_vms_normal(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1)
    pid = booting_pid(daemon)
    # QEMU's vCPU, RCU and worker threads were all born at the level of its launch.
    assert len(os.listdir(f"/proc/{pid}/task")) > 1
    assert thread_policies(pid) == {"idle"}
    ready, = daemon.wait_ready(1)
    assert ready["pid"] == pid
    # Paused in the cache it needs no CPU: every thread is back at normal priority.
    assert thread_policies(pid) == {"normal"}
    taken = daemon.get()
    assert taken["hypervisor"]["Pid"] == pid
    assert thread_policies(pid) == {"normal"}
    # The refill is background work again.
    assert thread_policies(booting_pid(daemon)) == {"idle"}


def test_boot_priority_normal_and_its_reload(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1, boot_priority="normal")
    assert thread_policies(booting_pid(daemon)) == {"normal"}
    daemon.wait_ready(1)
    result = daemon.cli("check-config")
    assert "vmcache.boot_priority" in result.stdout
    # Back to idle on a reload: the next boot (the refill of a taken VM) is idle.
    daemon.config.write_text(daemon.config.read_text().replace(
        'boot_priority = "normal"', 'boot_priority = "idle"'))
    reload = daemon.cli("reload")
    assert reload.returncode == 0, reload.stderr
    daemon.get()
    assert thread_policies(booting_pid(daemon)) == {"idle"}
