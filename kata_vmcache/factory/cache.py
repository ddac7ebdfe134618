"""Keep `vm_cache_number` VMs booted, paused and ready (Kata's `cache` factory, and more).

`run()` is the pool's only background task: it keeps `ready + booting == target`, boots with
at most `parallelism` VMs in flight, and backs off exponentially while boots fail (Kata's own
cache gives up on the first error; a daemon that runs for months must not). `hand_off()`
gives a ready VM to exactly one caller, waiting for the next one when the pool is empty.

Invariants:
- a VM is in at most one of `_ready`, a waiter's future, or a caller's hands;
- only VMs in state `ready` whose QEMU is running are handed out, each once;
- a VM that dies in the pool leaves it at once (pidfd exit watch) and is replaced;
- `close()` stops every VM the cache still owns, never a handed-off one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..errors import CacheClosed, VmcacheError
from ..vm import VM, VMState
from . import Factory
from .direct import remove_vm_dir

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_CAP = 60.0


@dataclass
class CacheStats:
    handed_out: int = 0
    booted: int = 0
    boot_failures: int = 0
    died_in_pool: int = 0
    last_error: str = ""
    #: Seconds of the latest boots, newest last (for status tooling).
    boot_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=64))


# ---------------------------------------------------------------------------------------------
# Activity: a small, bounded record of what the pool did, for dashboards (the Monitor service,
# `kata-vmcache tui`, `status --json`). It never grows with uptime: a daemon runs for months.


@dataclass(frozen=True)
class CacheEvent:
    #: Increasing within one daemon process, so a watcher can tell which events are new.
    seq: int
    #: Unix time.
    time: float
    #: "ready", "handed_out", "died" or "boot_failed".
    kind: str
    text: str
    vm_id: str = ""


class CacheActivity:
    """The latest events and hand-off latencies (seconds from GetBaseVM's arrival at the
    cache, including any wait for a VM, to the VM being released to the caller)."""

    def __init__(self, *, events: int = 100, latencies: int = 64) -> None:
        self.events: collections.deque[CacheEvent] = collections.deque(maxlen=events)
        self.handoff_seconds: collections.deque[float] = collections.deque(maxlen=latencies)
        self._seq = 0

    def record(self, kind: str, text: str, vm_id: str = "") -> None:
        self._seq += 1
        self.events.append(CacheEvent(self._seq, time.time(), kind, text, vm_id))

    def vm_ready(self, vm: VM) -> None:
        self.record("ready", f"VM {vm.id} ready in {vm.boot_seconds or 0:.2f} s "
                             f"(QEMU pid {vm.pid})", vm.id)

    def vm_handed_out(self, vm: VM, seconds: float) -> None:
        self.handoff_seconds.append(seconds)
        self.record("handed_out", f"VM {vm.id} handed out in {seconds * 1000:.0f} ms "
                                  f"(QEMU pid {vm.pid})", vm.id)

    def vm_died(self, vm: VM) -> None:
        self.record("died", f"VM {vm.id} died in the pool: {vm.reason or 'QEMU exited'} "
                            f"(QEMU pid {vm.pid})", vm.id)

    def boot_failed(self, reason: str, retry_in: float) -> None:
        self.record("boot_failed", f"boot failed: {reason} (next try in {retry_in:.0f} s)")


# ---------------------------------------------------------------------------------------------


class VMCache:
    def __init__(self, factory: Factory, target: int, *, parallelism: int,
                 stop_timeout: float = 3.0) -> None:
        self.factory = factory
        self.target = target
        self.parallelism = parallelism
        self.stop_timeout = stop_timeout
        self.stats = CacheStats()
        self.activity = CacheActivity()
        self._ready: collections.deque[VM] = collections.deque()
        self._booting: set[VM] = set()
        self._boot_tasks = 0
        self._waiters: collections.deque[asyncio.Future[VM]] = collections.deque()
        self._wake = asyncio.Event()
        self._change = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self._closed = False
        self._failures = 0
        self._not_before = 0.0

    # views

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    @property
    def booting_count(self) -> int:
        return self._boot_tasks

    @property
    def waiting_clients(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def owned(self) -> list[VM]:
        """Every VM the cache owns whose QEMU runs: ready ones first, then booting ones."""
        booting = [vm for vm in self._booting if vm.pid is not None and vm.process.running]
        return [*self._ready, *sorted(booting, key=lambda vm: vm.created)]

    def change_event(self) -> asyncio.Event:
        """The event the next change of the pool sets. Take it *before* reading the pool's
        state, then await it: a change in between is not missed (unlike `wait_changed()`,
        whose event is only picked when the coroutine first runs)."""
        return self._change

    @property
    def next_retry_seconds(self) -> float:
        """Seconds until the next boot attempt while backing off after failures, else 0."""
        return max(0.0, self._not_before - time.monotonic()) if self._failures else 0.0

    async def wait_changed(self) -> None:
        """Return at the next change of the pool (for watchers and tests)."""
        await self._change.wait()

    def _notify(self) -> None:
        # Swap-and-set: every waiter of the old event wakes once; later waiters get the new.
        event, self._change = self._change, asyncio.Event()
        event.set()

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: the loop holds tasks weakly, and a stop must not be collected.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # the pool's background task

    async def run(self) -> None:
        sem = asyncio.Semaphore(self.parallelism)
        async with asyncio.TaskGroup() as tasks:
            while not self._closed:
                while self._boot_tasks + len(self._ready) < self.target and not self._closed:
                    self._boot_tasks += 1
                    tasks.create_task(self._boot_one(sem))
                self._wake.clear()
                await self._wake.wait()

    async def _boot_one(self, sem: asyncio.Semaphore) -> None:
        try:
            async with sem:
                delay = self._not_before - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._closed:
                    return
                vm = self.factory.create()
                self._booting.add(vm)
                self._notify()
                try:
                    await self.factory.boot(vm)
                except VmcacheError as exc:
                    self._boot_failed(str(exc))
                    return
                except Exception as exc:  # a bug must not take the pool down
                    log.exception("unexpected error booting VM %s", vm.id)
                    self._boot_failed(f"internal error: {exc!r}")
                    return
                finally:
                    self._booting.discard(vm)
            self._boot_succeeded(vm)
        finally:
            self._boot_tasks -= 1
            self._wake.set()
            self._notify()

    def _boot_failed(self, reason: str) -> None:
        self.stats.boot_failures += 1
        self._failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** (self._failures - 1))
        self._not_before = time.monotonic() + delay
        # Once per change of reason: a host with a broken kernel must not fill the journal.
        if reason != self.stats.last_error:
            log.error("VM boot failed: %s (retrying with backoff, next in %.0f s)", reason, delay)
        else:
            log.debug("VM boot failed again: %s (next in %.0f s)", reason, delay)
        self.stats.last_error = reason
        self.activity.boot_failed(reason, delay)

    def _boot_succeeded(self, vm: VM) -> None:
        if self._failures:
            log.info("VM boots work again after %d failures", self._failures)
        self._failures = 0
        self._not_before = 0.0
        self.stats.last_error = ""
        self.stats.booted += 1
        if vm.boot_seconds is not None:
            self.stats.boot_times.append(vm.boot_seconds)
        if self._closed:
            self._background(self._stop(vm))
            return
        vm.on_exit(self._died)
        log.info("VM %s ready in %.2f s (QEMU pid %s)", vm.id, vm.boot_seconds or 0, vm.pid)
        self.activity.vm_ready(vm)
        self._offer(vm)

    def _offer(self, vm: VM, *, front: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(vm)
                return
        if front:
            self._ready.appendleft(vm)
        else:
            self._ready.append(vm)

    def _died(self, vm: VM) -> None:
        with contextlib.suppress(ValueError):
            self._ready.remove(vm)
            self.stats.died_in_pool += 1
            log.warning("cached VM %s died (%s); replacing it", vm.id, vm.reason)
            self.activity.vm_died(vm)
        remove_vm_dir(vm)
        self._wake.set()
        self._notify()

    # hand-off

    async def take(self) -> VM:
        """Reserve a ready VM for the caller, waiting for one if the pool is empty.

        The VM is out of the pool but still `ready` and owned by the cache: the caller
        finishes with `hand_off()` or returns it with `put_back()`.
        """
        if self._closed:
            raise CacheClosed("the VM cache is shutting down")
        while self._ready:
            vm = self._ready.popleft()
            if vm.state is VMState.READY and vm.process.running:
                self._wake.set()
                return vm
        waiter: asyncio.Future[VM] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._notify()  # watchers show callers waiting
        try:
            vm = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._offer(waiter.result())  # given to us just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        self._wake.set()
        if vm.state is not VMState.READY or not vm.process.running:
            return await self.take()  # died between being offered and our turn
        return vm

    def put_back(self, vm: VM) -> None:
        if vm.state is VMState.READY and vm.process.running and not self._closed:
            self._offer(vm, front=True)
        self._notify()

    async def hand_off(self) -> VM:
        """Take a ready VM, check it is alive and paused, release it to the caller."""
        asked = time.monotonic()
        while True:
            vm = await self.take()
            try:
                status = await vm.process.execute("query-status", timeout=1.0)
            except VmcacheError as exc:
                log.warning("VM %s failed its hand-off check (%s); dropping it", vm.id, exc)
                await self._stop(vm)
                continue
            except asyncio.CancelledError:
                self.put_back(vm)
                raise
            if not isinstance(status, dict) or status.get("status") != "paused":
                log.warning("VM %s is not paused (%s); dropping it", vm.id, status)
                await self._stop(vm)
                continue
            break
        # From here the VM is the caller's: nothing below may be interrupted half-way.
        await asyncio.shield(vm.process.release())
        vm.transition(VMState.HANDED_OFF)
        self.stats.handed_out += 1
        log.info("VM %s handed out (QEMU pid %s)", vm.id, vm.pid)
        self.activity.vm_handed_out(vm, time.monotonic() - asked)
        self._notify()
        return vm

    # shutdown

    async def _stop(self, vm: VM) -> None:
        await vm.process.stop(self.stop_timeout)
        if vm.state is VMState.READY:
            vm.transition(VMState.DEAD, "stopped by the daemon")
        remove_vm_dir(vm)

    async def close(self) -> None:
        """Stop handing out and stop every VM we own. Booting VMs are stopped by
        cancelling `run()` (their factory cleans up)."""
        self._closed = True
        self._wake.set()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CacheClosed("the VM cache is shutting down"))
        vms = list(self._ready)
        self._ready.clear()
        if vms:
            await asyncio.gather(*(self._stop(vm) for vm in vms), return_exceptions=True)
        self._notify()

    def resize(self, target: int) -> None:
        """Grow or shrink the pool; surplus ready VMs are stopped."""
        self.target = target
        surplus = len(self._ready) - target
        for _ in range(max(0, surplus)):
            self._background(self._stop(self._ready.pop()))
        self._wake.set()
