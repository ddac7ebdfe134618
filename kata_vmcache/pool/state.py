"""The pool's shared state: which VMs the cache owns, the memory they commit, and the
primitives every part of the cache uses to change them.

`VMCache` (cache.py) is a facade over parts that each own one concern and share this one
`Pool`: filling.py boots, handout.py hands out, takeback.py undoes a hand-off,
supervise.py checks and drops, cache.py shuts down and reloads.

Owns:
- membership: `ready` (paused, checked, in hand-out order), `booting` (VMs a boot holds),
  `boot_tasks` (boots in flight, with or without a VM yet), `outdated` (VMs booting from
  a factory a reload replaced), `closed`;
- memory admission: `committed` (MiB per VM, or per boot that has no VM yet, keyed by a
  token), `target` (vm_cache_number, or as many VMs as `memory_budget_mib` holds if
  fewer), `room_for_one()`;
- the pool's events: `wake` (the filler re-counts), `change_event()`/`notify()` (watchers);
- background work: `background()` keeps a reference to every stop/kill/take-back it starts,
  so `close()` can wait for them; `stop()`, `kill()`, `retire()`.

Invariants:
- a VM is in at most one of `ready`, a waiter's future, or a caller's hands;
- a VM commits memory from the moment its boot starts until its QEMU has exited or it is
  handed off; `committed_mib` never exceeds `memory_budget_mib`;
- every VM the pool stops or kills goes through `stop()`/`kill()`, which release its memory
  and remove its directories; none is left running unowned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from typing import Any

from ..factory import Factory
from ..vm.owned import VM, VMState
from .activity import CacheActivity, CacheStats

log = logging.getLogger(__name__)


class Pool:
    def __init__(self, factory: Factory, wanted: int, *, stop_timeout: float,
                 memory_budget_mib: int | None) -> None:
        self.factory = factory
        #: vm_cache_number: the VMs wanted ready (`target` is what the budget allows of it).
        self.wanted = wanted
        #: Ready VMs are stopped only above this many, at least `wanted` (VMCache.resize()
        #: sets both): the autoscaler lowers the target at once, stops ready VMs once idle.
        self.keep = wanted
        #: The most guest memory the pool commits (None: no limit).
        self.memory_budget_mib = memory_budget_mib
        self.stop_timeout = stop_timeout
        self.stats = CacheStats()
        self.activity = CacheActivity()
        #: MiB committed per VM, or per boot that has no VM yet (keyed by a token).
        self.committed: dict[object, int] = {}
        self.ready: collections.deque[VM] = collections.deque()
        self.booting: set[VM] = set()
        self.boot_tasks = 0
        #: VMs still booting from a factory a reload replaced: stopped when they finish.
        self.outdated: set[VM] = set()
        self.closed = False
        self.wake = asyncio.Event()
        self._change = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()

    # memory admission

    @property
    def vm_memory_mib(self) -> int:
        """The configured memory of the VMs the factory boots now."""
        return self.factory.spec.memory_mib

    def _within_budget(self, vms: int) -> int:
        """`vms`, or as many as memory_budget_mib holds if fewer."""
        memory = self.vm_memory_mib
        if self.memory_budget_mib is None or memory <= 0:
            return vms
        return min(vms, self.memory_budget_mib // memory)

    @property
    def target(self) -> int:
        """VMs kept ready: vm_cache_number, or as many as memory_budget_mib holds if fewer."""
        return self._within_budget(self.wanted)

    @property
    def kept(self) -> int:
        """Ready VMs not stopped: `keep`, or as many as memory_budget_mib holds if fewer."""
        return self._within_budget(self.keep)

    @property
    def committed_mib(self) -> int:
        """Guest memory committed now: every VM the cache has booting or owns."""
        return sum(self.committed.values())

    def room_for_one(self) -> bool:
        return (self.memory_budget_mib is None
                or self.committed_mib + self.vm_memory_mib <= self.memory_budget_mib)

    def release(self, key: object) -> None:
        """`key` (a VM, or a boot's token) commits no memory any more: maybe room to boot."""
        if self.committed.pop(key, None) is not None:
            self.wake.set()

    # views

    def owned(self) -> list[VM]:
        """Every VM the cache owns whose QEMU runs: ready ones first, then booting ones."""
        booting = [vm for vm in self.booting if vm.pid is not None and vm.process.running]
        return [*self.ready, *sorted(booting, key=lambda vm: vm.created)]

    # events

    def change_event(self) -> asyncio.Event:
        """The event the next change of the pool sets (see VMCache.change_event)."""
        return self._change

    def notify(self) -> None:
        # Swap-and-set: every waiter of the old event wakes once; later waiters get the new.
        event, self._change = self._change, asyncio.Event()
        event.set()

    def changed(self) -> None:
        """Something the filler counts changed: it looks again, and watchers are told."""
        self.wake.set()
        self.notify()

    # background work

    def background(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: the loop holds tasks weakly, and a stop must not be collected.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    async def wait_background(self) -> None:
        """Until every stop, kill and take-back started in the background has ended.
        asyncio.wait, unlike gather, does not cancel them if this wait is cancelled."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self, vm: VM) -> None:
        """QMP quit, bounded wait, SIGKILL; then its memory and directories go."""
        try:
            await vm.stop(self.stop_timeout)
        finally:
            self.release(vm)
        if vm.state is VMState.READY:
            vm.transition(VMState.DEAD, "stopped by the daemon")
        vm.remove_dirs()

    async def kill(self, vm: VM) -> None:
        """SIGKILL (a QEMU that failed a check would not answer `quit`), then the same."""
        try:
            await vm.kill()
        finally:
            self.release(vm)
        vm.remove_dirs()
        self.notify()

    def retire(self, vm: VM, why: str) -> None:
        """Stop a VM the pool will not offer, in the background."""
        log.info("stopping VM %s: %s", vm.id, why)
        self.background(self.stop(vm))
        self.changed()

    def retire_if_outdated(self, vm: VM) -> bool:
        """Stop `vm` instead of offering it when a reload changed the VM settings after
        it started booting (or it was taken before, and is being put back)."""
        if vm in self.outdated or vm.spec != self.factory.spec:
            self.outdated.discard(vm)
            self.retire(vm, "built from settings that a reload replaced")
            return True
        return False


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background VM task failed: %r", exc, exc_info=exc)
