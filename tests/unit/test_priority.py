"""CPU priority of what the daemon launches (priority.py), on real processes and the real
scheduler: a child forked under `launching("idle")` and every thread it makes run at nice
19, and so does its session's autogroup; `promote()` brings each of them back, and the pool
decides who boots at which level (fakes for the VMs: the decision is logic; test_priority in
integration proves it on QEMU)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache.pool.cache import VMCache
from kata_vmcache.vm import priority
from kata_vmcache.vm.owned import VM

from .fakes import FakeFactory, pool_running, until

needs_nice = pytest.mark.skipif(not priority.can_lower(),
                                reason="needs CAP_SYS_NICE to leave nice 19")
needs_autogroup = pytest.mark.skipif(not Path("/proc/self/autogroup").exists(),
                                     reason="a kernel without autogroup scheduling")

# A child that starts three threads, says so, and waits to be told to exit.
THREADS = """
import sys, threading
stop = threading.Event()
for _ in range(3):
    threading.Thread(target=stop.wait, daemon=True).start()
print("up", flush=True)
sys.stdin.readline()
"""


def nices(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    children: list[subprocess.Popen[str]] = []

    def start(level: priority.Level, session: bool = True) -> subprocess.Popen[str]:
        child = priority.spawn([sys.executable, "-c", THREADS], level, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               start_new_session=session)
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == "up\n"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


@needs_nice
def test_a_child_launched_idle_and_all_its_threads_are_idle(spawn: Spawn) -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    child = spawn("idle")
    assert len(os.listdir(f"/proc/{child.pid}/task")) == 4
    assert nices(child.pid) == {priority.IDLE_NICE}
    # Never SCHED_IDLE: its threads would not preempt on wakeup (see priority.py).
    assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER
    # The launching thread is back to what it was.
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


@needs_nice
@needs_autogroup
def test_the_session_of_a_child_launched_idle_is_an_idle_group(spawn: Spawn) -> None:
    child = spawn("idle")
    assert priority.group_nice(child.pid) == priority.IDLE_NICE
    priority.promote(child.pid)
    assert priority.group_nice(child.pid) == 0


@needs_nice
@needs_autogroup
def test_a_group_the_daemon_shares_is_never_changed(spawn: Spawn) -> None:
    ours = priority.group_nice(os.getpid())
    child = spawn("idle", session=False)
    # The child's threads are idle, but its group is ours: left as it was.
    assert nices(child.pid) == {priority.IDLE_NICE}
    assert priority.group_nice(child.pid) == ours == priority.group_nice(os.getpid())
    assert priority.promote(child.pid) == 4
    assert priority.group_nice(os.getpid()) == ours


@needs_nice
@needs_autogroup
def test_a_group_that_cannot_be_changed_costs_the_priority_not_the_launch(
        spawn: Spawn, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real_open = open

    def read_only_proc(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/autogroup") and "w" in mode:
            raise PermissionError(13, "Permission denied")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_proc)
    priority._group_refused.cache_clear()
    first, second = spawn("idle"), spawn("idle")
    monkeypatch.undo()
    assert nices(first.pid) == nices(second.pid) == {priority.IDLE_NICE}
    assert priority.group_nice(first.pid) == 0
    assert [r.message for r in caplog.records].count(
        "cannot set the CPU priority of a VM's session group (/proc/PID/autogroup: "
        "Permission denied); its threads' nice still applies") == 1


@needs_nice
def test_normal_launches_change_nothing(spawn: Spawn) -> None:
    child = spawn("normal")
    assert nices(child.pid) == {priority.normal_nice()}
    assert priority.group_nice(child.pid) in (None, 0)
    assert priority.promote(child.pid) == 0


@needs_nice
def test_promote_brings_every_thread_back(spawn: Spawn) -> None:
    child = spawn("idle")
    assert priority.promote(child.pid, None) == 4
    assert nices(child.pid) == {priority.normal_nice()}


@needs_nice
def test_promote_of_a_process_that_is_gone_is_nothing(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert priority.promote(child.pid) == 0


# The pool's decisions (fake VMs: FakeProcess records the level it was launched at).


@contextlib.asynccontextmanager
async def held_boot(tmp_path: Path, **cache_args: Any) -> AsyncIterator[tuple[VMCache,
                                                                         asyncio.Event, VM]]:
    """A pool of one whose first boot is held (the factory's gate, yielded) until the test
    opens it."""
    factory = FakeFactory(tmp_path)
    gate = factory.gate = asyncio.Event()
    async with pool_running(VMCache(factory, 1, parallelism=1, **cache_args)) as cache:
        await until(cache, lambda: cache.pool.booting)
        booting, = cache.pool.booting
        yield cache, gate, booting


def level(vm: VM) -> priority.Level:
    """Its priority now (read through a call: mypy would keep an assert's narrowing of
    `vm.priority` across the awaits that change it)."""
    return vm.priority


@pytest.mark.asyncio
async def test_boots_ahead_of_demand_are_idle_and_paused_vms_normal(tmp_path: Path) -> None:
    async with held_boot(tmp_path) as (cache, gate, booting):
        assert level(booting) == "idle"
        gate.set()
        await until(cache, lambda: cache.ready_count == 1)
        # Paused in the pool it needs no CPU: promoted already, the hand-off does nothing.
        assert level(booting) == "normal"
        vm = cache.reserve_nowait()
        assert vm is booting
        cache.give_now(vm)
        assert level(vm) == "normal"
        cache.delivered(vm)


@pytest.mark.asyncio
async def test_boot_priority_normal(tmp_path: Path) -> None:
    async with held_boot(tmp_path, boot_priority="normal") as (_, _, booting):
        assert level(booting) == "normal"


@pytest.mark.asyncio
async def test_a_waiting_caller_promotes_the_boots_it_waits_for(tmp_path: Path) -> None:
    async with held_boot(tmp_path) as (cache, gate, booting):
        assert level(booting) == "idle"
        waiting = asyncio.ensure_future(cache.reserve())
        await until(cache, lambda: cache.waiting_clients == 1)
        assert level(booting) == "normal"
        gate.set()
        vm = await asyncio.wait_for(waiting, 10)
        assert vm is booting
        cache.put_back(vm)


@pytest.mark.asyncio
async def test_reload_to_normal_promotes_the_boots_in_flight(tmp_path: Path) -> None:
    async with held_boot(tmp_path) as (cache, _, booting):
        assert level(booting) == "idle"
        cache.set_boot_priority("normal")
        assert level(booting) == "normal"
        assert cache.boot_priority == "normal"
