"""Keep `vm_cache_number` VMs booted, paused and ready (Kata's `cache` factory, and more).

`VMCache` is the pool as the rest of the daemon sees it: a facade over parts that each own
one concern (each module's docstring says what it owns and its invariants):

| module        | owns                                                                    |
|---------------|-------------------------------------------------------------------------|
| pool.py       | the shared state: ready/booting VMs, memory committed, events, stops    |
| filling.py    | `run()`: boots, their parallelism, backoff, memory admission             |
| handout.py    | waiters and the hand-off steps: reserve, give_now, delivered, put_back   |
| takeback.py   | undoing a hand-off whose reply was not written                          |
| supervise.py  | the supervisor task, exits, discarding a VM that fails a check          |
| activity.py   | counters, failure classes, histograms, recent events                    |
| cache.py      | this facade; shut-down (`refuse_new`, `close`) and reload (`resize`,    |
|               | `set_memory_budget`, `replace_factory`, `set_parallelism`,              |
|               | `set_boot_priority`)                                                    |

Memory admission: the pool commits at most `memory_budget_mib` of guest memory, counting
the configured memory of every VM from the moment its boot starts until its QEMU has exited
or it is handed off (ready VMs, booting ones, one whose hand-off is being written, ones being
stopped). `target` is vm_cache_number (`wanted`) or as many VMs as the budget holds, if
fewer; and no boot starts while the VMs still committed leave no room for one more (after
a reload that changed the VM's size, while the old VMs are being stopped).

Hand-off (handout.py): `reserve_nowait()`/`reserve()`, the server writes its reply,
`give_now()`, `delivered()`; or `take_back_later()` when the reply was not written.

Invariants (the parts keep them together):
- a VM is in at most one of the pool, a waiter's future, or a caller's hands;
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

from ..factory import Factory
from ..vm.owned import VM
from ..vm.priority import Level
from .activity import CacheActivity, CacheStats
from .filling import Filler
from .handout import HandOut
from .state import Pool
from .supervise import Supervisor
from .takeback import take_back


class VMCache:
    def __init__(self, factory: Factory, target: int, *, parallelism: int,
                 stop_timeout: float = 3.0, memory_budget_mib: int | None = None,
                 boot_priority: Level = "idle") -> None:
        self.pool = Pool(factory, target, stop_timeout=stop_timeout,
                         memory_budget_mib=memory_budget_mib)
        self.supervisor = Supervisor(self.pool)
        self.handout = HandOut(self.pool, self.supervisor)
        self.filler = Filler(self.pool, self.handout, self.supervisor,
                             parallelism=parallelism, boot_priority=boot_priority)

    # settings (a reload changes them)

    @property
    def factory(self) -> Factory:
        return self.pool.factory

    @factory.setter
    def factory(self, factory: Factory) -> None:
        """Boot from `factory` from now on, keeping the VMs (a reload that changed how VMs
        boot, not what they are); `replace_factory()` retires them."""
        self.pool.factory = factory

    @property
    def wanted(self) -> int:
        """vm_cache_number: the VMs wanted ready (`target` is what the budget allows)."""
        return self.pool.wanted

    @property
    def memory_budget_mib(self) -> int | None:
        return self.pool.memory_budget_mib

    @memory_budget_mib.setter
    def memory_budget_mib(self, mib: int | None) -> None:
        self.pool.memory_budget_mib = mib

    @property
    def stop_timeout(self) -> float:
        return self.pool.stop_timeout

    @stop_timeout.setter
    def stop_timeout(self, seconds: float) -> None:
        self.pool.stop_timeout = seconds

    @property
    def parallelism(self) -> int:
        return self.filler.parallelism

    # views

    @property
    def stats(self) -> CacheStats:
        return self.pool.stats

    @property
    def activity(self) -> CacheActivity:
        return self.pool.activity

    @property
    def target(self) -> int:
        """VMs kept ready: vm_cache_number, or as many as memory_budget_mib holds if fewer."""
        return self.pool.target

    @property
    def vm_memory_mib(self) -> int:
        """The configured memory of the VMs the factory boots now."""
        return self.pool.vm_memory_mib

    @property
    def committed_mib(self) -> int:
        """Guest memory committed now: every VM the cache has booting or owns."""
        return self.pool.committed_mib

    @property
    def ready_count(self) -> int:
        return len(self.pool.ready)

    @property
    def booting_count(self) -> int:
        return self.pool.boot_tasks

    @property
    def waiting_clients(self) -> int:
        return self.handout.waiting_clients

    @property
    def next_retry_seconds(self) -> float:
        """Seconds until the next boot attempt while backing off after failures, else 0."""
        return self.filler.next_retry_seconds

    def owned(self) -> list[VM]:
        """Every VM the cache owns whose QEMU runs: ready ones first, then booting ones."""
        return self.pool.owned()

    def change_event(self) -> asyncio.Event:
        """The event the next change of the pool sets. Take it *before* reading the pool's
        state, then await it: a change in between is not missed (unlike `wait_changed()`,
        whose event is only picked when the coroutine first runs)."""
        return self.pool.change_event()

    async def wait_changed(self) -> None:
        """Return at the next change of the pool (for watchers and tests)."""
        await self.pool.change_event().wait()

    # filling (filling.py)

    async def run(self) -> None:
        """The pool's background task: boots, and the supervisor. Ends by cancellation."""
        await self.filler.run()

    def retry_now(self) -> None:
        """End the backoff: the next boot starts at once (what made boots fail is over)."""
        self.filler.retry_now()

    def refill(self) -> None:
        """Boot the replacement of a reserved VM now, not once its hand-off is delivered
        (the server calls this when a reply is slow to be written)."""
        self.handout.refill()

    # hand-off (handout.py, takeback.py)

    def reserve_nowait(self) -> VM | None:
        """A ready VM, checked alive, without suspending; None when none can be had now."""
        return self.handout.reserve_nowait()

    async def reserve(self) -> VM:
        """A ready VM, checked alive, waiting for one if need be."""
        return await self.handout.reserve()

    async def take(self) -> VM:
        """A ready VM out of the pool, unchecked, waiting for one if need be."""
        return await self.handout.take()

    def put_back(self, vm: VM) -> None:
        """Return a reserved VM (to the pool, or to a stop)."""
        self.handout.put_back(vm)

    def give_now(self, vm: VM) -> None:
        """Release a reserved VM: its record says handed_off (just before the reply's OK)."""
        self.handout.give_now(vm)

    def delivered(self, vm: VM, *, asked: float | None = None) -> None:
        """The hand-off reply was written: count it, record its latency, refill."""
        self.handout.delivered(vm, asked=asked)

    def take_back_later(self, vm: VM, why: str) -> None:
        """The reply handing `vm` out was not written (the caller cancelled, or its client
        went away): return the VM to the pool, or stop it if it cannot be had back."""
        self.pool.background(take_back(self.pool, self.handout, vm, why))

    # shutdown

    def refuse_new(self) -> None:
        """Stop handing out: waiting and later callers get CacheClosed at once, so a daemon
        that is shutting down answers them instead of letting them run into their deadline.
        Hand-offs already past `reserve()` finish."""
        self.pool.closed = True
        self.pool.wake.set()
        self.handout.fail_waiters()

    async def close(self) -> None:
        """Stop handing out and stop every VM we own. Booting VMs are stopped by
        cancelling `run()` (their factory cleans up)."""
        self.refuse_new()
        pool = self.pool
        vms = list(pool.ready)
        pool.ready.clear()
        if vms:
            await asyncio.gather(*(pool.stop(vm) for vm in vms), return_exceptions=True)
        # Stops, kills and take-backs started in the background must end before we do: a
        # daemon exiting under them would leave their QEMU running.
        await pool.wait_background()
        pool.notify()

    # reload (and the autoscaler: resize)

    @property
    def keep(self) -> int:
        """Ready VMs are stopped only above this many (at least `wanted`)."""
        return self.pool.keep

    def resize(self, target: int, *, keep: int | None = None) -> None:
        """Grow or shrink the pool to `target` (vm_cache_number; fewer if the memory budget
        says so). Ready VMs above `keep` (default and at least `target`; fewer if the budget
        says so) are stopped: a target lowered with a higher `keep` stops refilling at
        once, and boots queued beyond it do not start, but the ready VMs stay."""
        pool = self.pool
        pool.wanted = target
        pool.keep = max(target, keep if keep is not None else target)
        surplus = len(pool.ready) - pool.kept
        for _ in range(max(0, surplus)):
            pool.background(pool.stop(pool.ready.pop()))
        pool.changed()

    def set_memory_budget(self, mib: int | None) -> None:
        """A new memory budget: the pool grows or shrinks to what it holds."""
        self.pool.memory_budget_mib = mib
        self.resize(self.pool.wanted, keep=self.pool.keep)

    def replace_factory(self, factory: Factory) -> int:
        """Boot from `factory` from now on, and retire what the old one built: ready VMs
        are stopped at once (and replaced), VMs still booting are stopped when they finish.
        VMs already handed off are not ours and are not touched. Returns the number of
        ready VMs retired."""
        pool = self.pool
        pool.factory = factory
        # The old settings' failures say nothing about the new ones: boot again at once.
        self.filler.reset_backoff()
        pool.outdated.update(pool.booting)
        retired = list(pool.ready)
        pool.ready.clear()
        for vm in retired:
            pool.background(pool.stop(vm))
        pool.changed()
        return len(retired)

    def set_parallelism(self, parallelism: int) -> None:
        """Change how many VMs boot at once; boots in flight finish as they are."""
        self.filler.set_parallelism(parallelism)

    @property
    def boot_priority(self) -> Level:
        return self.filler.boot_priority

    def set_boot_priority(self, level: Level) -> None:
        """The CPU priority of boots ahead of demand ("normal" promotes those in flight)."""
        self.filler.set_boot_priority(level)
