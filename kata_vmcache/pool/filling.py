"""Filling the pool: boots, their parallelism, backoff while they fail, memory admission.

Owns `Filler.run()`, the pool's one background task: it keeps `ready + booting == target`,
with at most `parallelism` boots in flight (a semaphore whose size a reload can change),
and backs off exponentially while boots fail (Kata's own cache gives up on the first error;
a daemon that runs for months must not). While boots fail, one attempt runs at a time. The
supervisor task (supervise.py) runs in the same TaskGroup, so cancelling `run()` ends both.

Memory admission: a boot commits the configured memory of the factory's VMs from the
moment it starts (a token in `Pool.committed`), then its VM's own size once it is ready;
no boot starts while the VMs still committed leave no room for one more (pool.py).

Owns also what a boot's end does: a VM that booted is settled (no QMP session, its
handed-off record written ahead), counted, watched for exit (supervise.py) and offered
(handout.py); a failure is counted by class and sets the backoff.

Invariants:
- `boot_tasks + len(ready) <= target` when a boot is queued, and `len(booting) +
  len(ready) < target` when it takes a slot (a target lowered meanwhile cancels it);
  never more than `parallelism` boots hold a slot;
- a boot that fails has already stopped its VM and removed its files (the factory's
  contract); a boot cancelled while settling stops its VM;
- the backoff's delay is BACKOFF_START * 2**(failures - 1), at most BACKOFF_CAP; a success,
  a new factory or `retry_now()` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .. import fds
from ..errors import VmcacheError
from ..vm.owned import VM, VMState
from ..vm.priority import Level
from .activity import failure_class
from .handout import HandOut
from .state import Pool
from .supervise import Supervisor

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_CAP = 60.0


class Filler:
    def __init__(self, pool: Pool, handout: HandOut, supervisor: Supervisor, *,
                 parallelism: int, boot_priority: Level = "idle") -> None:
        self.pool = pool
        self.handout = handout
        self.supervisor = supervisor
        self.parallelism = parallelism
        #: [vmcache] boot_priority: the CPU priority of boots made ahead of demand.
        self.boot_priority: Level = boot_priority
        #: No boot starts before this time.monotonic() (the backoff).
        self.not_before = 0.0
        self._retry = asyncio.Event()
        # The boot slots of run(), so that their number can change (set_parallelism).
        self._slots: asyncio.Semaphore | None = None

    @property
    def next_retry_seconds(self) -> float:
        """Seconds until the next boot attempt while backing off after failures, else 0."""
        if not self.pool.stats.consecutive_failures:
            return 0.0
        return max(0.0, self.not_before - time.monotonic())

    async def run(self) -> None:
        pool = self.pool
        sem = self._slots = asyncio.Semaphore(self.parallelism)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.supervisor.run(), name="vm-supervisor")
            while not pool.closed:
                while (pool.boot_tasks + len(pool.ready) < pool.target and not pool.closed
                       # While boots fail, one attempt at a time: N QEMUs failing together
                       # say nothing one does not, and each costs a launch.
                       and not (pool.stats.consecutive_failures and pool.boot_tasks)
                       and pool.room_for_one()):
                    pool.boot_tasks += 1
                    token = object()  # the boot's memory, committed from now on
                    pool.committed[token] = pool.vm_memory_mib
                    tasks.create_task(self._boot_one(sem, token))
                pool.wake.clear()
                await pool.wake.wait()

    async def _boot_one(self, sem: asyncio.Semaphore, token: object) -> None:
        pool = self.pool
        try:
            async with sem:
                while (delay := self.not_before - time.monotonic()) > 0:
                    self._retry.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry.wait(), delay)  # retry_now()
                if pool.closed:
                    return
                if len(pool.ready) + len(pool.booting) >= pool.target:
                    # The target was lowered while this boot waited for a slot (a burst
                    # planned for has been met, the pool shrinks): not wanted any more.
                    return
                factory = pool.factory
                vm = factory.create()
                # Ahead of demand, a boot yields the CPU to running sandboxes; one a
                # caller already waits for does not (priority.py).
                vm.priority = "normal" if self.handout.waiting_clients else self.boot_priority
                pool.booting.add(vm)
                pool.notify()
                try:
                    await factory.boot(vm)
                    await self._settle(vm)
                except Exception as exc:
                    if fds.caused_by_exhaustion(exc):
                        # Neither the VM's fault nor a bug, and the descriptor watch logs
                        # the episode once (fds.py): no line per failed boot.
                        self.boot_failed("out of file descriptors", quiet=True)
                    elif isinstance(exc, VmcacheError):
                        self.boot_failed(str(exc))
                    elif isinstance(exc, OSError):
                        # The host refused a file the VM needs (a full disk, a broken
                        # directory): the boot has already stopped QEMU, removed its files.
                        where = f" ({exc.filename})" if exc.filename else ""
                        self.boot_failed(f"cannot write the VM's files: "
                                         f"{exc.strerror or exc}{where}")
                    else:  # a bug must not take the pool down
                        log.exception("unexpected error booting VM %s", vm.id)
                        self.boot_failed(f"internal error: {exc!r}")
                    return
                finally:
                    pool.booting.discard(vm)
            # The VM holds the memory now (its own size: a reload may have changed it).
            pool.committed[vm] = vm.spec.memory_mib
            self._boot_succeeded(vm)
        finally:
            pool.release(token)
            pool.boot_tasks -= 1
            pool.changed()

    async def _settle(self, vm: VM) -> None:
        """Put a VM that just booted into the shape of the pool: no QMP session (a hand-off
        then has none to close, and the receiver finds QEMU's one QMP slot free), normal
        CPU priority, and its handed-off record written ahead. Cancelled meanwhile
        (shut-down), it is stopped: it is in no set the cache's close() would find it in."""
        try:
            await vm.process.idle()
            # Paused, it needs no CPU: back at normal priority now, so that the hand-off has
            # nothing to do for it (priority.py).
            vm.promote()
            await asyncio.to_thread(vm.prepare_handed_off_record)
        except BaseException:
            await self.pool.stop(vm)
            raise

    def boot_failed(self, reason: str, *, quiet: bool = False) -> None:
        stats = self.pool.stats
        stats.boot_failures += 1
        stats.failure_classes[failure_class(reason)] += 1
        stats.consecutive_failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** (stats.consecutive_failures - 1))
        self.not_before = time.monotonic() + delay
        # Once per change of reason: a host with a broken kernel must not fill the journal.
        if reason != stats.last_error and not quiet:
            log.error("VM boot failed: %s (retrying with backoff, next in %.0f s)", reason, delay)
        else:
            log.debug("VM boot failed again: %s (next in %.0f s)", reason, delay)
        stats.last_error = reason
        self.pool.activity.boot_failed(reason, delay)

    def _boot_succeeded(self, vm: VM) -> None:
        pool, stats = self.pool, self.pool.stats
        if stats.consecutive_failures:
            log.info("VM boots work again after %d failures", stats.consecutive_failures)
        self.reset_backoff()
        stats.booted += 1
        if vm.boot_seconds is not None:
            stats.boot_times.append(vm.boot_seconds)
        if pool.closed:
            pool.background(pool.stop(vm))
            return
        vm.on_exit(self.supervisor.died)  # which replaces one dead already at once
        if vm.state is not VMState.READY:
            # Its QEMU or virtiofsd exited while it was being settled: never offered.
            log.warning("VM %s died before it reached the pool (%s); replacing it", vm.id,
                        vm.reason)
            return
        log.info("VM %s ready in %.2f s (QEMU pid %s)", vm.id, vm.boot_seconds or 0, vm.pid)
        pool.activity.vm_ready(vm)
        self.handout.offer(vm)

    def reset_backoff(self) -> None:
        """Boot at once: boots work again, or the settings they failed with are gone."""
        self.pool.stats.consecutive_failures = 0
        self.not_before = 0.0
        self.pool.stats.last_error = ""

    def retry_now(self) -> None:
        """End the backoff: the next boot starts at once (what made boots fail is over)."""
        self.not_before = 0.0
        self._retry.set()
        self.pool.wake.set()

    def set_boot_priority(self, level: Level) -> None:
        """The priority of the next boots; "normal" also promotes the boots in flight."""
        self.boot_priority = level
        if level == "normal":
            self.handout.promote_booting()

    def set_parallelism(self, parallelism: int) -> None:
        """Change how many VMs boot at once; boots in flight finish as they are."""
        change, self.parallelism = parallelism - self.parallelism, parallelism
        slots = self._slots
        if slots is None or change == 0:
            return  # run() has not started: it makes its slots from self.parallelism
        for _ in range(change):
            slots.release()
        if change < 0:
            # Withhold slots as boots finish; they are never given back, so the free slots
            # plus those in use settle at the new number.
            self.pool.background(_withhold(slots, -change))


async def _withhold(slots: asyncio.Semaphore, count: int) -> None:
    for _ in range(count):
        await slots.acquire()
