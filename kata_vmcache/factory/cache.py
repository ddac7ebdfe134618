"""Keep `vm_cache_number` VMs booted, paused and ready (Kata's `cache` factory, and more).

`run()` is the pool's only background task: it keeps `ready + booting == target`, boots with
at most `parallelism` VMs in flight, and backs off exponentially while boots fail (Kata's own
cache gives up on the first error; a daemon that runs for months must not). While boots
fail, one attempt runs at a time. Beside it, one supervisor task asks every ready VM's QEMU
for its status every `SUPERVISE_INTERVAL`; a VM that does not answer within
`SUPERVISE_TIMEOUT`, or is not paused, leaves the pool at once and is killed.

Memory admission: the pool commits at most `memory_budget_mib` of guest memory, counting
the configured memory of every VM from the moment its boot starts until its QEMU has exited
or it is handed off (ready VMs, booting ones, one whose hand-off is being written, ones being
stopped). `target` is vm_cache_number (`wanted`) or as many VMs as the budget holds, if
fewer; and no boot starts while the VMs still committed leave no room for one more (after
a reload that changed the VM's size, while the old VMs are being stopped).

Hand-off is three steps, so that a server can undo it when its reply cannot be written:
`reserve()` takes a ready VM and checks it (still the cache's), the server writes its reply,
`give_now()` releases the VM (record says handed_off) just before the call's OK status goes
out, and `delivered()` counts it; a VM whose reply was not written goes back with
`take_back_later()`. `hand_off()` does the three in one call.

Invariants:
- a VM is in at most one of `_ready`, a waiter's future, or a caller's hands;
- only VMs in state `ready` whose QEMU is running are handed out, each once;
- a VM that dies in the pool leaves it at once (pidfd exit watch) and is replaced;
- a VM that stops answering QMP leaves it within SUPERVISE_INTERVAL + SUPERVISE_TIMEOUT;
- a VM taken out of the pool is handed off, put back, or stopped: never dropped;
- `close()` stops every VM the cache still owns, never a handed-off one, and waits for the
  stops it started in the background;
- the memory committed never exceeds `memory_budget_mib`.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .. import fds
from ..errors import CacheClosed, VmcacheError, VMDead
from ..vm import VM, VMState
from . import Factory

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_CAP = 60.0
#: Ready VMs are asked for their status this often, and must answer within the timeout:
#: a hung QEMU is out of the pool within 1.5 s (the issue asks for 2 s).
SUPERVISE_INTERVAL = 0.5
SUPERVISE_TIMEOUT = 1.0
#: Taking back a VM whose hand-off reply was not written: it must answer QMP, paused.
TAKE_BACK_CHECK_TIMEOUT = 1.0


@dataclass
class CacheStats:
    handed_out: int = 0
    booted: int = 0
    boot_failures: int = 0
    died_in_pool: int = 0
    #: Ready VMs killed for failing a health check (no QMP answer in time, not paused).
    discarded: int = 0
    #: Why the latest boot failed; "" once a boot succeeds again.
    last_error: str = ""
    #: Boot failures since the last successful boot (or reload of the VM settings): the
    #: backoff's exponent.
    consecutive_failures: int = 0
    #: Seconds of the latest boots, newest last (for status tooling).
    boot_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=64))
    #: Boot failures by `failure_class()` of their reason (Prometheus's label).
    failure_classes: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Hand-offs whose reply was not written: VMs back in the pool, and VMs that could not
    #: be had back and were stopped.
    taken_back: int = 0
    take_back_stopped: int = 0


#: Every class `failure_class()` returns (metrics start each at 0, so a rate() has a series).
FAILURE_CLASSES = ("not_ready", "qemu_exited", "launch", "host", "template", "internal",
                   "other")


def failure_class(reason: str) -> str:
    """A boot failure's reason as one of a few classes, for a metric label (the reason
    itself has VM ids and paths in it: one series per failure). Messages are errors.py's
    LaunchError/GuestNotReady and `_boot_one`'s."""
    for needle, kind in (("not ready after", "not_ready"), ("readiness probe", "not_ready"),
                         ("QEMU exited", "qemu_exited"), ("cannot run", "launch"),
                         ("no QMP", "launch"), ("cannot write", "host"),
                         ("file descriptors", "host"), ("template", "template"),
                         ("internal error", "internal")):
        if needle in reason:
            return kind
    return "other"


class Histogram:
    """Cumulative counts of durations in fixed buckets, since start: what a Prometheus
    histogram needs, kept by the pool itself so that a scrape only reads it (a few
    increments per observation; the bounded deques above lose what a scrape missed)."""

    #: Upper bounds in seconds: hand-offs take milliseconds, TCG boots up to a minute.
    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
              10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds


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
        #: Every hand-off's and every boot's duration since start (metrics.py).
        self.handoff_histogram = Histogram()
        self.boot_histogram = Histogram()
        self._seq = 0

    def record(self, kind: str, text: str, vm_id: str = "") -> None:
        self._seq += 1
        self.events.append(CacheEvent(self._seq, time.time(), kind, text, vm_id))

    def vm_ready(self, vm: VM) -> None:
        if vm.boot_seconds is not None:
            self.boot_histogram.observe(vm.boot_seconds)
        self.record("ready", f"VM {vm.id} ready in {vm.boot_seconds or 0:.2f} s "
                             f"(QEMU pid {vm.pid})", vm.id)

    def vm_handed_out(self, vm: VM, seconds: float) -> None:
        self.handoff_seconds.append(seconds)
        self.handoff_histogram.observe(seconds)
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
                 stop_timeout: float = 3.0, memory_budget_mib: int | None = None) -> None:
        self.factory = factory
        #: vm_cache_number: the VMs wanted ready (`target` is what the budget allows of it).
        self.wanted = target
        #: The most guest memory the pool commits (None: no limit).
        self.memory_budget_mib = memory_budget_mib
        #: MiB committed per VM, or per boot that has no VM yet (keyed by a token).
        self._committed: dict[object, int] = {}
        self.parallelism = parallelism
        self.stop_timeout = stop_timeout
        self.stats = CacheStats()
        #: Called with each VM as it becomes ready (the server makes its reply then).
        self.prepare: Callable[[VM], object] | None = None
        self.activity = CacheActivity()
        self._ready: collections.deque[VM] = collections.deque()
        self._booting: set[VM] = set()
        self._boot_tasks = 0
        self._waiters: collections.deque[asyncio.Future[VM]] = collections.deque()
        self._wake = asyncio.Event()
        self._change = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()
        self._closed = False
        self._not_before = 0.0
        self._retry = asyncio.Event()
        # Live reload (replace_factory, set_parallelism): VMs still booting from a replaced
        # factory, and the boot slots of run() so their number can change.
        self._outdated: set[VM] = set()
        self._boot_slots: asyncio.Semaphore | None = None

    # views

    @property
    def target(self) -> int:
        """VMs kept ready: vm_cache_number, or as many as memory_budget_mib holds if fewer."""
        memory = self.vm_memory_mib
        if self.memory_budget_mib is None or memory <= 0:
            return self.wanted
        return min(self.wanted, self.memory_budget_mib // memory)

    @property
    def vm_memory_mib(self) -> int:
        """The configured memory of the VMs the factory boots now (0: unknown)."""
        return int(getattr(getattr(self.factory, "spec", None), "memory_mib", 0))

    @property
    def committed_mib(self) -> int:
        """Guest memory committed now: every VM the cache has booting or owns."""
        return sum(self._committed.values())

    def _room_for_one(self) -> bool:
        return (self.memory_budget_mib is None
                or self.committed_mib + self.vm_memory_mib <= self.memory_budget_mib)

    def _release(self, key: object) -> None:
        """`key` (a VM, or a boot's token) commits no memory any more: maybe room to boot."""
        if self._committed.pop(key, None) is not None:
            self._wake.set()

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
        if not self.stats.consecutive_failures:
            return 0.0
        return max(0.0, self._not_before - time.monotonic())

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
        task.add_done_callback(_log_failure)

    # the pool's background task

    async def run(self) -> None:
        sem = self._boot_slots = asyncio.Semaphore(self.parallelism)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._supervise(), name="vm-supervisor")
            while not self._closed:
                while (self._boot_tasks + len(self._ready) < self.target and not self._closed
                       # While boots fail, one attempt at a time: N QEMUs failing together
                       # say nothing one does not, and each costs a launch.
                       and not (self.stats.consecutive_failures and self._boot_tasks)
                       and self._room_for_one()):
                    self._boot_tasks += 1
                    token = object()  # the boot's memory, committed from now on
                    self._committed[token] = self.vm_memory_mib
                    tasks.create_task(self._boot_one(sem, token))
                self._wake.clear()
                await self._wake.wait()

    async def _boot_one(self, sem: asyncio.Semaphore, token: object) -> None:
        try:
            async with sem:
                while (delay := self._not_before - time.monotonic()) > 0:
                    self._retry.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry.wait(), delay)  # retry_now()
                if self._closed:
                    return
                vm = self.factory.create()
                self._booting.add(vm)
                self._notify()
                try:
                    await self.factory.boot(vm)
                    await self._settle(vm)
                except Exception as exc:
                    if fds.caused_by_exhaustion(exc):
                        # Neither the VM's fault nor a bug, and the descriptor watch logs
                        # the episode once (fds.py): no line per failed boot.
                        self._boot_failed("out of file descriptors", quiet=True)
                    elif isinstance(exc, VmcacheError):
                        self._boot_failed(str(exc))
                    elif isinstance(exc, OSError):
                        # The host refused a file the VM needs (a full disk, a broken
                        # directory): the boot has already stopped QEMU, removed its files.
                        where = f" ({exc.filename})" if exc.filename else ""
                        self._boot_failed(f"cannot write the VM's files: "
                                          f"{exc.strerror or exc}{where}")
                    else:  # a bug must not take the pool down
                        log.exception("unexpected error booting VM %s", vm.id)
                        self._boot_failed(f"internal error: {exc!r}")
                    return
                finally:
                    self._booting.discard(vm)
            # The VM holds the memory now (its own size: a reload may have changed it).
            self._committed[vm] = vm.spec.memory_mib
            self._boot_succeeded(vm)
        finally:
            self._release(token)
            self._boot_tasks -= 1
            self._wake.set()
            self._notify()

    async def _settle(self, vm: VM) -> None:
        """Put a VM that just booted into the shape of the pool: no QMP session (a hand-off
        then has none to close, and the receiver finds QEMU's one QMP slot free), and its
        handed-off record written ahead. Cancelled meanwhile (shut-down), it is stopped:
        it is in no set the cache's close() would find it in."""
        try:
            await vm.process.idle()
            await asyncio.to_thread(vm.prepare_handed_off_record)
        except BaseException:
            await self._stop(vm)
            raise

    def _boot_failed(self, reason: str, *, quiet: bool = False) -> None:
        self.stats.boot_failures += 1
        self.stats.failure_classes[failure_class(reason)] += 1
        self.stats.consecutive_failures += 1
        delay = min(BACKOFF_CAP, BACKOFF_START * 2 ** (self.stats.consecutive_failures - 1))
        self._not_before = time.monotonic() + delay
        # Once per change of reason: a host with a broken kernel must not fill the journal.
        if reason != self.stats.last_error and not quiet:
            log.error("VM boot failed: %s (retrying with backoff, next in %.0f s)", reason, delay)
        else:
            log.debug("VM boot failed again: %s (next in %.0f s)", reason, delay)
        self.stats.last_error = reason
        self.activity.boot_failed(reason, delay)

    def _boot_succeeded(self, vm: VM) -> None:
        if self.stats.consecutive_failures:
            log.info("VM boots work again after %d failures", self.stats.consecutive_failures)
        self.stats.consecutive_failures = 0
        self._not_before = 0.0
        self.stats.last_error = ""
        self.stats.booted += 1
        if vm.boot_seconds is not None:
            self.stats.boot_times.append(vm.boot_seconds)
        if self._closed:
            self._background(self._stop(vm))
            return
        vm.on_exit(self._died)
        if self.prepare is not None:
            self.prepare(vm)
        log.info("VM %s ready in %.2f s (QEMU pid %s)", vm.id, vm.boot_seconds or 0, vm.pid)
        self.activity.vm_ready(vm)
        self._offer(vm)

    def retry_now(self) -> None:
        """End the backoff: the next boot starts at once (what made boots fail is over)."""
        self._not_before = 0.0
        self._retry.set()
        self._wake.set()

    def _offer(self, vm: VM, *, front: bool = False) -> None:
        if self._retire_if_outdated(vm):
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(vm)
                return
        if len(self._ready) >= self.target:
            # vm_cache_number was lowered, or a VM whose hand-off was undone came back
            # while its replacement was booting.
            self._retire(vm, "the cache is full")
            return
        if front:
            self._ready.appendleft(vm)
        else:
            self._ready.append(vm)

    def _died(self, vm: VM) -> None:
        self._release(vm)
        with contextlib.suppress(ValueError):
            self._ready.remove(vm)
            self.stats.died_in_pool += 1
            log.warning("cached VM %s died (%s); replacing it", vm.id, vm.reason)
            self.activity.vm_died(vm)
        self._background(self._kill(vm))  # its proxy, its directories
        self._wake.set()
        self._notify()

    # hand-off

    async def take(self) -> VM:
        """Reserve a ready VM for the caller, waiting for one if the pool is empty.

        The VM is out of the pool but still `ready` and owned by the cache: the caller
        finishes with `give_now()` or returns it with `put_back()`.
        """
        if self._closed:
            raise CacheClosed("the VM cache is shutting down")
        while self._ready:
            vm = self._ready.popleft()
            if vm.state is VMState.READY and vm.process.running:
                # No refill yet: launching QEMU now would delay the caller's reply. It
                # starts when the hand-off is delivered (or the VM comes back).
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
        if vm.state is not VMState.READY or not vm.process.running:
            return await self.take()  # died between being offered and our turn
        return vm

    def put_back(self, vm: VM) -> None:
        """Return a reserved VM: to the pool, or, when the cache is closing or the VM is no
        longer fit, to a stop (a VM out of the pool must never be left running unowned)."""
        if vm.state is VMState.READY and vm.process.running and not self._closed:
            if not self._retire_if_outdated(vm):
                self._offer(vm, front=True)
        elif vm.state is VMState.READY:
            self._background(self._stop(vm))
        self._wake.set()
        self._notify()

    def reserve_nowait(self) -> VM | None:
        """The hand-off's fast path: a ready VM, alive right now (`problem_now()`: its
        exit, or a SIGSTOP, is seen even before the loop runs our callbacks), or None when
        the pool is empty or its first VM is being checked (then `reserve()` waits).
        Never suspends: a hand-off from a full cache is this, `give_now()`, and the reply.
        QEMU's answering QMP is the supervisor's to check, every SUPERVISE_INTERVAL."""
        if self._closed:
            raise CacheClosed("the VM cache is shutting down")
        while self._ready:
            vm = self._ready[0]
            if vm.process.probing is not None:
                return None
            self._ready.popleft()
            if vm.state is not VMState.READY or not vm.process.running:
                continue
            problem = _problem_now(vm)
            if problem is not None:
                self._discard(vm, f"failed its hand-off check ({problem})")
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
                problem = _problem_now(vm)
            if problem is not None:
                self._discard(vm, f"failed its hand-off check ({problem})")
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

    def give_now(self, vm: VM) -> None:
        """Release a reserved VM that holds no QMP session (every pooled VM): no await, so
        nothing can come between the check and the reply. State handed_off on disk before
        the reply goes: a daemon killed right after must not take the VM back."""
        vm.release_idle()
        vm.transition(VMState.HANDED_OFF)

    def delivered(self, vm: VM, *, asked: float | None = None) -> None:
        """The hand-off reply was written: the VM is the caller's for good. `asked` is when
        the request arrived (time.monotonic()), for the hand-off latency record."""
        self._release(vm)  # the client's memory now, not the cache's
        vm.close_replaced_record()  # the record give_now()'s rename replaced
        self.stats.handed_out += 1
        log.info("VM %s handed out (QEMU pid %s)", vm.id, vm.pid)
        if asked is not None:
            self.activity.vm_handed_out(vm, time.monotonic() - asked)
        self._wake.set()  # the refill, now that the reply is out
        self._notify()

    def refill(self) -> None:
        """Boot the replacement of a reserved VM now, not once its hand-off is delivered
        (the server calls this when a reply is slow to be written)."""
        self._wake.set()

    async def hand_off(self) -> VM:
        """Reserve, check and give a VM in one call (for callers with no reply to write)."""
        asked = time.monotonic()
        vm = await self.reserve()
        self.give_now(vm)
        self.delivered(vm, asked=asked)
        return vm

    # undoing a hand-off whose reply was not written

    def take_back_later(self, vm: VM, why: str) -> None:
        """The reply handing `vm` out was not written (the caller cancelled, or its client
        went away): return the VM to the pool, or stop it if it cannot be had back."""
        self._background(self._take_back(vm, why))

    async def _take_back(self, vm: VM, why: str) -> None:
        if vm.state is VMState.READY and not vm.process.released:
            # Reserved, never given: still ours in every way.
            log.warning("VM %s back in the pool: %s", vm.id, why)
            self.stats.taken_back += 1
            self.put_back(vm)
            return
        try:
            vm.require(VMState.HANDED_OFF)
            await vm.reclaim()
            status = await vm.process.execute("query-status", timeout=TAKE_BACK_CHECK_TIMEOUT)
            if not isinstance(status, dict) or status.get("status") != "paused":
                raise VMDead(f"it is not paused any more (status {status})")
        except VmcacheError as exc:
            # Nobody received it, so nobody else may have it: stopping is the only way not
            # to leak it.
            log.warning("VM %s: %s; it cannot be taken back (%s), stopping it", vm.id, why, exc)
            self.stats.take_back_stopped += 1
            await self._kill(vm)
            return
        vm.take_back(why)
        await vm.process.idle()  # back in the pool: no session held, like every pooled VM
        await asyncio.to_thread(vm.prepare_handed_off_record)
        log.warning("VM %s back in the pool: %s", vm.id, why)
        self.stats.taken_back += 1
        self.put_back(vm)

    # supervision

    async def _supervise(self) -> None:
        """One task for the whole pool: every SUPERVISE_INTERVAL, every ready VM must answer
        `query-status` within SUPERVISE_TIMEOUT, paused. Exits are seen at once by the pidfd
        watch; this catches the QEMU that is alive but stuck (stopped, deadlocked, swapped
        to death), which no exit watch can see."""
        while not self._closed:
            await asyncio.sleep(SUPERVISE_INTERVAL)
            vms = list(self._ready)
            if vms:
                await asyncio.gather(*(self._check(vm) for vm in vms))

    async def _check(self, vm: VM) -> None:
        try:
            status = await vm.process.probe_status(SUPERVISE_TIMEOUT)
            problem = None if status == "paused" else f"is not paused (status {status})"
        except VmcacheError as exc:
            problem = str(exc)
        except Exception as exc:  # a surprise from the QMP library must not end supervision
            problem = f"QMP failed: {exc!r}"
        if problem is not None and fds.exhausted():
            return  # the check could not run for want of a descriptor: no verdict
        # A VM taken meanwhile is its hand-off's to check; one that exited is already gone.
        if problem is not None and vm in self._ready:
            self._ready.remove(vm)
            self._discard(vm, problem)

    def _discard(self, vm: VM, problem: str) -> None:
        """Drop a VM that failed a health check: out of the pool now, a replacement boots
        at once, and the VM is killed (SIGKILL: a QEMU that does not answer QMP would not
        answer `quit` either)."""
        log.warning("cached VM %s (QEMU pid %s) %s; killing it and booting a replacement",
                    vm.id, vm.pid, problem)
        self.stats.discarded += 1
        if vm.state is VMState.READY:
            vm.transition(VMState.DEAD, problem)
        self._background(self._kill(vm))
        self._wake.set()
        self._notify()

    async def _kill(self, vm: VM) -> None:
        try:
            await vm.kill()
        finally:
            self._release(vm)
        vm.remove_dirs()
        self._notify()

    # shutdown

    def refuse_new(self) -> None:
        """Stop handing out: waiting and later callers get CacheClosed at once, so a daemon
        that is shutting down answers them instead of letting them run into their deadline.
        Hand-offs already past `reserve()` finish."""
        self._closed = True
        self._wake.set()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(CacheClosed("the VM cache is shutting down"))

    async def _stop(self, vm: VM) -> None:
        try:
            await vm.stop(self.stop_timeout)
        finally:
            self._release(vm)
        if vm.state is VMState.READY:
            vm.transition(VMState.DEAD, "stopped by the daemon")
        vm.remove_dirs()

    async def close(self) -> None:
        """Stop handing out and stop every VM we own. Booting VMs are stopped by
        cancelling `run()` (their factory cleans up)."""
        self.refuse_new()
        vms = list(self._ready)
        self._ready.clear()
        if vms:
            await asyncio.gather(*(self._stop(vm) for vm in vms), return_exceptions=True)
        # Stops, kills and take-backs started in the background must end before we do: a
        # daemon exiting under them would leave their QEMU running. asyncio.wait, unlike
        # gather, does not cancel them if this wait is cancelled.
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        self._notify()

    def resize(self, target: int) -> None:
        """Grow or shrink the pool to `target` (vm_cache_number; fewer if the memory budget
        says so); surplus ready VMs are stopped."""
        self.wanted = target
        surplus = len(self._ready) - self.target
        for _ in range(max(0, surplus)):
            self._background(self._stop(self._ready.pop()))
        self._wake.set()
        self._notify()

    def set_memory_budget(self, mib: int | None) -> None:
        """A new memory budget: the pool grows or shrinks to what it holds."""
        self.memory_budget_mib = mib
        self.resize(self.wanted)

    # live reload

    def replace_factory(self, factory: Factory) -> int:
        """Boot from `factory` from now on, and retire what the old one built: ready VMs
        are stopped at once (and replaced), VMs still booting are stopped when they finish.
        VMs already handed off are not ours and are not touched. Returns the number of
        ready VMs retired."""
        self.factory = factory
        # The old settings' failures say nothing about the new ones: boot again at once.
        self.stats.consecutive_failures = 0
        self._not_before = 0.0
        self.stats.last_error = ""
        self._outdated.update(self._booting)
        retired = list(self._ready)
        self._ready.clear()
        for vm in retired:
            self._background(self._stop(vm))
        self._wake.set()
        self._notify()
        return len(retired)

    def set_parallelism(self, parallelism: int) -> None:
        """Change how many VMs boot at once; boots in flight finish as they are."""
        change, self.parallelism = parallelism - self.parallelism, parallelism
        slots = self._boot_slots
        if slots is None or change == 0:
            return  # run() has not started: it makes its slots from self.parallelism
        for _ in range(change):
            slots.release()
        if change < 0:
            # Withhold slots as boots finish; they are never given back, so the free slots
            # plus those in use settle at the new number.
            self._background(_withhold(slots, -change))

    def _retire_if_outdated(self, vm: VM) -> bool:
        """Stop `vm` instead of offering it when a reload changed the VM settings after
        it started booting (or it was taken before, and is being put back)."""
        spec = getattr(self.factory, "spec", None)
        if vm in self._outdated or (spec is not None and vm.spec != spec):
            self._outdated.discard(vm)
            self._retire(vm, "built from settings that a reload replaced")
            return True
        return False

    def _retire(self, vm: VM, why: str) -> None:
        log.info("stopping VM %s: %s", vm.id, why)
        self._background(self._stop(vm))
        self._wake.set()
        self._notify()


def _problem_now(vm: VM) -> str | None:
    """`problem_now()` of the VM (its QEMU, its proxy), unless that check could not run
    for want of a file descriptor (it reads /proc): then a waitid, which needs none, says
    whether QEMU (our child, not reaped while we hold its pidfd) has exited or been
    stopped."""
    problem = vm.problem_now()
    if problem is None or vm.pid is None or not fds.exhausted():
        return problem
    try:
        info = os.waitid(os.P_PID, vm.pid,
                         os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return problem
    return problem if info is not None else None


async def _withhold(slots: asyncio.Semaphore, count: int) -> None:
    for _ in range(count):
        await slots.acquire()


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background VM task failed: %r", exc, exc_info=exc)
