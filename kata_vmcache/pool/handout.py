"""Handing VMs out: callers waiting for one, and the three steps of a hand-off.

A hand-off is three steps, so that a server can undo it when its reply cannot be written
(server.py GetBaseVM is the one caller, and the tests drive the same path):

1. `reserve_nowait()` (never suspends; None when no VM can be had at once) or `reserve()`
   (waits for one) takes a ready VM out of the pool and checks it is alive; it is still
   `ready` and still the cache's;
2. the server writes its reply (the VM's hand-off record, handoff.py), then `give_now()`
   releases the VM (its record says handed_off) just before the call's OK status goes out;
3. `delivered()` counts it and starts the refill.

A VM whose reply was not written goes back with `take_back_later()` (takeback.py); one
taken but never given goes back with `put_back()`.

Owns: the waiters (futures of callers waiting while the pool is empty, served in order),
`offer()` (a VM that becomes available goes to the first waiter, else into the pool), and
the hand-off checks.

Invariants:
- only VMs in state `ready` whose QEMU is running are handed out, each once;
- a VM taken out of the pool is handed off, put back, or stopped: never dropped;
- a waiter that gives up (cancelled) loses no VM: one given to it just then is passed on;
- `reserve_nowait()` never suspends: a hand-off from a full cache is it, `give_now()` and
  the reply, with no await between the check and the reply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time

from ..errors import CacheClosed, VmcacheError
from ..vm.owned import VM, VMState
from .state import Pool
from .supervise import Supervisor, problem_now

log = logging.getLogger(__name__)


class HandOut:
    def __init__(self, pool: Pool, supervisor: Supervisor) -> None:
        self.pool = pool
        self.supervisor = supervisor
        self.waiters: collections.deque[asyncio.Future[VM]] = collections.deque()

    @property
    def waiting_clients(self) -> int:
        return sum(1 for f in self.waiters if not f.done())

    def offer(self, vm: VM, *, front: bool = False) -> None:
        """A VM that can be handed out: to the first waiter, else into the pool (unless
        a reload made it outdated, or the pool is full)."""
        pool = self.pool
        if pool.retire_if_outdated(vm):
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(vm)
                return
        if len(pool.ready) >= pool.target:
            # vm_cache_number was lowered, or a VM whose hand-off was undone came back
            # while its replacement was booting.
            pool.retire(vm, "the cache is full")
            return
        if front:
            pool.ready.appendleft(vm)
        else:
            pool.ready.append(vm)

    def fail_waiters(self) -> None:
        """The cache is closing: every waiting caller gets CacheClosed at once."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CacheClosed("the VM cache is shutting down"))

    async def take(self) -> VM:
        """Reserve a ready VM for the caller, waiting for one if the pool is empty.

        The VM is out of the pool but still `ready` and owned by the cache: the caller
        finishes with `give_now()` or returns it with `put_back()`.
        """
        pool = self.pool
        if pool.closed:
            raise CacheClosed("the VM cache is shutting down")
        while pool.ready:
            vm = pool.ready.popleft()
            if vm.state is VMState.READY and vm.process.running:
                # No refill yet: launching QEMU now would delay the caller's reply. It
                # starts when the hand-off is delivered (or the VM comes back).
                return vm
        waiter: asyncio.Future[VM] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.promote_booting()  # a caller waits for one of them: no longer background work
        pool.stats.waited += 1
        pool.notify()  # watchers show callers waiting
        try:
            vm = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.offer(waiter.result())  # given to us just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise
        if vm.state is not VMState.READY or not vm.process.running:
            return await self.take()  # died between being offered and our turn
        return vm

    def promote_booting(self) -> None:
        """Normal CPU priority for every VM booting now (priority.py)."""
        for vm in self.pool.booting:
            vm.promote()

    def put_back(self, vm: VM) -> None:
        """Return a reserved VM: to the pool, or, when the cache is closing or the VM is no
        longer fit, to a stop (a VM out of the pool must never be left running unowned)."""
        pool = self.pool
        if vm.state is VMState.READY and vm.process.running and not pool.closed:
            if not pool.retire_if_outdated(vm):
                self.offer(vm, front=True)
        elif vm.state is VMState.READY:
            pool.background(pool.stop(vm))
        pool.changed()

    def reserve_nowait(self) -> VM | None:
        """The hand-off's fast path: a ready VM, alive right now (`problem_now()`: its
        exit, or a SIGSTOP, is seen even before the loop runs our callbacks), or None when
        the pool is empty or its first VM is being checked (then `reserve()` waits).
        Never suspends: a hand-off from a full cache is this, `give_now()`, and the reply.
        QEMU's answering QMP is the supervisor's to check, every SUPERVISE_INTERVAL."""
        pool = self.pool
        if pool.closed:
            raise CacheClosed("the VM cache is shutting down")
        ready = pool.ready
        while ready:
            vm = ready[0]
            if vm.process.probing is not None:
                return None
            ready.popleft()
            if vm.state is not VMState.READY or not vm.process.running:
                continue
            problem = problem_now(vm)
            if problem is not None:
                self.supervisor.discard(vm, f"failed its hand-off check ({problem})")
                continue
            return vm
        return None

    async def reserve(self) -> VM:
        """Take a ready VM, waiting for one if need be, and check it is alive (and, if the
        supervisor was asking it just then, that it answered paused). It stays the cache's:
        the caller goes on with `give_now()` or returns it with `put_back()`."""
        while True:
            vm = self.reserve_nowait()
            if vm is not None:
                return vm
            vm = await self.take()
            try:
                problem = await self._probed(vm)
            except asyncio.CancelledError:
                self.put_back(vm)
                raise
            if problem is None:
                problem = problem_now(vm)
            if problem is not None:
                self.supervisor.discard(vm, f"failed its hand-off check ({problem})")
                continue
            return vm

    async def _probed(self, vm: VM) -> str | None:
        """Wait for a supervisor's probe of `vm` in flight (its connection holds QEMU's
        one QMP slot, which the receiver needs) and say what it found."""
        probe = vm.process.probing
        if probe is None:
            return None
        try:
            status = await asyncio.shield(probe)
        except VmcacheError as exc:
            return str(exc)
        return None if status == "paused" else f"is not paused (status {status})"

    @staticmethod
    def give_now(vm: VM) -> None:
        """Release a reserved VM that holds no QMP session (every pooled VM): no await, so
        nothing can come between the check and the reply. State handed_off on disk before
        the reply goes: a daemon killed right after must not take the VM back. Its QEMU and
        proxy run at normal priority from here on, the sandbox starts on them: settled in the
        pool, a VM is promoted already (filling.py), and this check costs nothing."""
        vm.promote()
        vm.release_idle()
        vm.transition(VMState.HANDED_OFF)

    def delivered(self, vm: VM, *, asked: float | None = None) -> None:
        """The hand-off reply was written: the VM is the caller's for good. `asked` is when
        the request arrived (time.monotonic()), for the hand-off latency record."""
        pool = self.pool
        pool.release(vm)  # the client's memory now, not the cache's
        vm.close_replaced_record()  # the record give_now()'s rename replaced
        pool.stats.handed_out += 1
        log.info("VM %s handed out (QEMU pid %s)", vm.id, vm.pid)
        if asked is not None:
            pool.activity.vm_handed_out(vm, time.monotonic() - asked)
        pool.changed()  # the refill, now that the reply is out

    def refill(self) -> None:
        """Boot the replacement of a reserved VM now, not once its hand-off is delivered
        (the server calls this when a reply is slow to be written)."""
        self.pool.wake.set()
