"""A pool that sizes itself: `[vmcache] autoscale`, within `[min_ready, max_ready]` and the
memory budget.

Kata's `vm_cache_number` is a fixed guess. Here the cache sets its own target from what it
sees: how often GetBaseVM arrives, how long a VM takes to become ready, and whether callers
had to wait. Two pieces:

- `Policy`: pure logic with an injected clock. It is told of demand (`arrived()`,
  `waited()`) and asked for a `Decision` (target and a reason a person can read) given the
  measured time to make a VM ready and how many VMs the memory budget holds. Unit tests
  drive it with a simulated clock.
- `Autoscaler`: the small async driver. It watches the pool (hand-outs and waits are counted
  by the pool itself, in `CacheStats`), feeds the policy, and applies a changed target with
  `VMCache.resize()`, logging the reason. With `autoscale = false` it only reports the fixed
  target, `vm_cache_number`, exactly as before.

The policy, in order of precedence (the first rules win over the later):

1. the memory budget: never more VMs than `memory_budget_mib` holds;
2. the bounds: `min_ready <= target <= max_ready`;
3. demand, the largest of:
   - steady demand: the arrival rate over the last RATE_WINDOW seconds (requests outside
     bursts) times the time to make a VM ready, plus a Poisson margin (two standard
     deviations) and one VM, so that a steady stream of requests finds a VM ready while
     the ones it took are being replaced;
   - the peak: the most requests that arrived within one ready time, over the last
     `shrink_after` seconds (a burst is covered for that long after it happened);
   - after callers waited: the target they found plus the most callers waiting at once,
     held for `shrink_after` seconds ("grow at once when callers wait"; one more per
     caller would ratchet the pool up to max_ready whenever boots are slower than
     arrivals, where no target helps);
   - an expected burst (BURST_MIN requests or more within BURST_GAP): when bursts recur
     at a regular interval (two bursts so far, the latest interval within a quarter of
     the one before, if any), the pool is grown to the burst's size just in time for the
     next one (the time to boot that many VMs at `boot_parallelism`, plus one ready time)
     instead of holding them ready all the way between bursts. A burst that does not
     come when expected, or callers waiting outside a planned burst, end the plan.

Growth is applied at once. A lower target stops refilling at once, but the VMs ready or
booting are kept until the higher target has not been needed for `shrink_after` seconds
(the starting target, vm_cache_number, too): a surplus ready VM is stopped only after that
idle period, and never while callers wait.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from .config import AutoscaleSettings
from .factory.cache import VMCache

log = logging.getLogger(__name__)

#: Until a boot has been measured: the time to make a VM ready (TCG boots the demo guest in
#: about 2 s; a real guest under KVM in about 1 s), erring on the long side.
DEFAULT_READY_SECONDS = 3.0
#: The arrival rate is measured over this many seconds (at most shrink_after).
RATE_WINDOW = 20.0
#: Requests within this many seconds of each other belong to one burst.
BURST_GAP = 1.0
#: A burst: at least this many requests within BURST_GAP.
BURST_MIN = 4
#: Bursts recur "regularly" when the latest interval is within this share of the one
#: before; a predicted burst later than this share of its interval is not coming.
PERIOD_TOLERANCE = 0.25
#: The driver looks at the pool at least this often (shrinking is due on time, not only on
#: a change of the pool).
TICK = 1.0


@dataclass(frozen=True)
class Decision:
    target: int
    #: In words, with the numbers (logs, status, the TUI).
    reason: str
    #: Which rule decided, one of REASON_KINDS (a metric label: no numbers in it).
    kind: str = "fixed"


#: Every `Decision.kind` (metrics export each, 1 for the current one).
REASON_KINDS = ("fixed", "idle", "steady", "peak", "waited", "burst_expected", "held",
                "min_ready", "max_ready", "memory_budget")


@dataclass
class _Burst:
    start: float
    size: int
    last: float


class Policy:
    """The target for the pool, from demand. Pure: `clock` is the only source of time."""

    def __init__(self, settings: AutoscaleSettings, *, initial: int, parallelism: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.parallelism = max(1, parallelism)
        self.clock = clock
        self._arrivals: collections.deque[float] = collections.deque()
        self._bursts: collections.deque[_Burst] = collections.deque(maxlen=4)
        #: (target, until): the floor set by callers that waited.
        self._raised = (0, 0.0)
        #: Waits told by waited() since the last decision; the target when the current
        #: episode of callers waiting began (None: nobody waits).
        self._waits = 0
        self._episode: int | None = None
        self._ready = DEFAULT_READY_SECONDS
        #: The demand-driven target and when it was last needed at that level.
        self._held = (max(settings.min_ready, min(initial, settings.max_ready)), clock())
        self.current = self._held[0]
        self._initial = True

    def configure(self, settings: AutoscaleSettings, *, parallelism: int) -> None:
        """New bounds or idle period (a reload): the demand seen so far is kept."""
        self.settings = settings
        self.parallelism = max(1, parallelism)

    # demand

    def arrived(self, count: int = 1) -> None:
        """`count` GetBaseVM requests were served (or are waiting) now."""
        now = self.clock()
        for _ in range(count):
            self._arrivals.append(now)
        burst = self._bursts[-1] if self._bursts else None
        if burst is not None and now - burst.last <= BURST_GAP:
            burst.size += count
            burst.last = now
            return
        # A burst: BURST_MIN requests or more within BURST_GAP (a steady stream, even a
        # fast one, rarely has that many so close together).
        close = [t for t in self._arrivals if now - t <= BURST_GAP]
        if len(close) >= BURST_MIN and (burst is None or close[0] > burst.last):
            self._bursts.append(_Burst(close[0], len(close), now))

    def waited(self, count: int = 1) -> None:
        """`count` callers found no ready VM (they may be served before the next decision:
        they count as waiting then all the same)."""
        self._waits += count

    def _callers_waited(self, now: float, waiting: int) -> None:
        """Callers waiting: the target was too small by that many. An episode of waiting
        raises the floor to the target it began with plus the most callers waiting at
        once, not by one more per caller: with boots slower than arrivals no target
        helps, and the pool must not ratchet up to max_ready for nothing."""
        waiting = max(waiting, self._waits)
        self._waits = 0
        if not waiting:
            self._episode = None
            return
        if self._episode is None:
            self._episode = self.current
            if self._period() is not None and not self._in_lead(now):
                # Callers waited outside a planned burst: the plan is wrong (bursts that
                # looked regular were not), so forget it and hold demand again.
                self._bursts.clear()
        floor = self._episode + waiting
        if now >= self._raised[1] or floor > self._raised[0]:
            self._raised = (max(floor, self._raised[0] if now < self._raised[1] else 0),
                            now + self.settings.shrink_after)
        else:
            self._raised = (self._raised[0], now + self.settings.shrink_after)

    # the decision

    def decide(self, *, ready_seconds: float | None, budget_vms: int | None,
               ready_now: int = 0, waiting: int = 0) -> Decision:
        """The target now. `ready_seconds`: the measured time to make a VM ready (None:
        not measured yet); `budget_vms`: how many VMs the memory budget holds (None: no
        limit); `ready_now`: VMs ready or booting for the pool (kept until idle as long as
        shrink_after: a lower target stops refilling, not these);
        `waiting`: callers waiting for a VM now (no shrinking while there are any)."""
        now = self.clock()
        s = self.settings
        ready = ready_seconds if ready_seconds and ready_seconds > 0 else DEFAULT_READY_SECONDS
        self._ready = ready
        horizon = s.shrink_after
        while self._arrivals and now - self._arrivals[0] > horizon:
            self._arrivals.popleft()
        self._callers_waited(now, waiting)
        period = self._period()
        arrivals = list(self._arrivals)
        if period is not None:
            # Regular bursts are planned for: they do not hold VMs ready in between.
            arrivals = [t for t in arrivals if not self._in_burst(t)]
        candidates: list[tuple[int, str, str]] = []
        # Steady demand: the rate over the last RATE_WINDOW seconds (or the time seen so
        # far, at least 10 s, so that the first requests do not look like a flood), times
        # the ready time, plus margin. Bursts are not a rate: the peak below covers them.
        recent = [t for t in arrivals if now - t <= RATE_WINDOW and not self._in_burst(t)]
        if recent:
            span = max(10.0, min(RATE_WINDOW, now - recent[0]))
            expected = len(recent) / span * ready
            steady = math.ceil(expected + 2 * math.sqrt(expected)) + 1
            candidates.append((steady, "steady", f"{len(recent) / span * 60:.1f} requests/min x "
                                       f"{ready:.1f} s to make a VM ready, plus margin"))
        if arrivals:
            peak = _peak(arrivals, ready)
            candidates.append((peak, "peak", f"{peak} requests within {ready:.1f} s in the last "
                                     f"{horizon:.0f} s"))
        if now < self._raised[1] and period is None:
            candidates.append((self._raised[0], "waited", "callers waited for a VM"))
        if period is not None:
            expected_at, size = period
            lead = math.ceil(size / self.parallelism) * ready + ready
            if expected_at - lead <= now:
                candidates.append((size, "burst_expected", f"a burst of {size} expected in "
                                         f"{max(0.0, expected_at - now):.0f} s (every "
                                         f"{self._interval():.0f} s)"))
        demand, kind, why = max(candidates, default=(0, "idle", "no recent requests"),
                                key=lambda c: c[0])
        bounded = max(s.min_ready, min(s.max_ready, demand))
        if bounded != demand:
            kind = "min_ready" if bounded > demand else "max_ready"
            why = (f"{why}; min_ready = {s.min_ready}" if bounded > demand
                   else f"{why}; max_ready = {s.max_ready}")
        # Shrink slowly. Demand itself is held: arrivals count for shrink_after seconds,
        # callers that waited too. A level is held for shrink_after seconds from when it
        # was first needed (the starting target too); between planned bursts the pool is not
        # refilled beyond steady demand, but a ready VM is still kept for that idle time.
        held, since = self._held
        held = min(held, s.max_ready)  # a reload may have lowered the bound
        if waiting and bounded < held:
            # A caller still waits (boots are slow): the level is still needed.
            self._held = (held, now)
            why, kind, bounded = f"keeping {held}: {waiting} waiting for a VM", "held", held
        elif bounded > held or now - since >= horizon:
            self._initial = False
            if bounded < held and period is None:
                why = f"{why} (no demand for {held} for {now - since:.0f} s)"
            self._held = (bounded, now if bounded != held else since)
        elif bounded < held:
            # Not refilled above demand, but not stopped before the idle period either
            # (vm_cache_number, the starting target, is kept for that long as it is).
            keep = held if self._initial else max(bounded, min(held, ready_now))
            self._held = (keep, since)
            if keep > bounded:
                why = (f"keeping {keep}: needed {now - since:.0f} s ago, stopped once idle "
                       f"{horizon:.0f} s")
            bounded = keep
            kind = "held" if keep > demand else kind
        target = bounded
        if budget_vms is not None and budget_vms < target:
            target = max(0, budget_vms)
            why = f"{why}; memory_budget_mib holds {target}"
            kind = "memory_budget"
        self.current = target
        return Decision(target, why, kind)

    # bursts that recur

    def _interval(self) -> float:
        b = self._bursts
        return b[-1].start - b[-2].start if len(b) >= 2 else 0.0

    def _period(self) -> tuple[float, int] | None:
        """(when the next burst is expected, its size) if bursts recur regularly."""
        b = list(self._bursts)
        if len(b) < 2:
            return None
        interval = b[-1].start - b[-2].start
        if interval <= 0:
            return None
        if len(b) >= 3:
            before = b[-2].start - b[-3].start
            if abs(interval - before) > PERIOD_TOLERANCE * max(interval, before):
                return None
        expected = b[-1].start + interval
        if self.clock() > expected + PERIOD_TOLERANCE * interval:
            return None  # it did not come: plan for nothing, hold what demand says
        return expected, max(x.size for x in b[-3:])

    def _in_lead(self, now: float) -> bool:
        """Within a planned burst's lead time (or the burst itself)."""
        period = self._period()
        if period is None:
            return False
        expected_at, size = period
        lead = math.ceil(size / self.parallelism) * self._ready + self._ready
        return now >= expected_at - lead or bool(self._bursts
                                                 and now - self._bursts[-1].last <= BURST_GAP)

    def _in_burst(self, t: float) -> bool:
        return any(x.start <= t <= x.last for x in self._bursts)


def _peak(times: list[float], window: float) -> int:
    """The most of `times` (sorted) within any interval of length `window`."""
    best, first = 0, 0
    for i, t in enumerate(times):
        while t - times[first] > window:
            first += 1
        best = max(best, i - first + 1)
    return best


class Autoscaler:
    """Applies the policy to a pool; with autoscale off, only says the target is fixed.

    Demand is read from the pool's own counters (CacheStats.handed_out and .waited), so the
    pool needs no knowledge of this module: one step per change of the pool (a caller that
    starts waiting is one), and one at least every TICK seconds."""

    def __init__(self, cache: VMCache, settings: AutoscaleSettings, *, fixed: int,
                 parallelism: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.settings = settings
        #: vm_cache_number: the fixed target, and autoscaling's starting one.
        self.fixed = fixed
        self.policy = Policy(settings, initial=fixed, parallelism=parallelism, clock=clock)
        self._seen_handed_out = cache.stats.handed_out
        self._seen_waited = cache.stats.waited
        #: Callers counted when they started waiting, not yet served.
        self._pending_waits = 0
        self.reason = ""
        self.kind = "fixed"
        #: Changes of target made by autoscaling.
        self.changes = 0
        self._kick = asyncio.Event()
        self._explain_fixed()

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def configure(self, settings: AutoscaleSettings, *, fixed: int, parallelism: int) -> None:
        """A reload: the new settings apply at once (autoscale off: vm_cache_number)."""
        self.settings, self.fixed = settings, fixed
        self.policy.configure(settings, parallelism=parallelism)
        if not settings.enabled and self.cache.wanted != fixed:
            self.cache.resize(fixed)
        self.step()
        self._kick.set()

    def _explain_fixed(self) -> None:
        target = self.cache.target
        if target >= self.fixed:
            self.reason, self.kind = f"fixed: vm_cache_number = {self.fixed}", "fixed"
        else:
            self.reason = (f"fixed: vm_cache_number = {self.fixed}; memory_budget_mib holds "
                           f"{target}")
            self.kind = "memory_budget"

    def _ready_seconds(self) -> float | None:
        """The measured time to make a VM ready: the median of the latest boots (under
        the same contention as the next ones: they ran while others booted too)."""
        times = list(self.cache.stats.boot_times)[-16:]
        return statistics.median(times) if times else None

    def _budget_vms(self) -> int | None:
        memory, budget = self.cache.vm_memory_mib, self.cache.memory_budget_mib
        if budget is None or memory <= 0:
            return None
        return budget // memory

    def step(self) -> Decision | None:
        """Feed what happened since the last step to the policy; apply a changed target."""
        stats = self.cache.stats
        arrived = stats.handed_out - self._seen_handed_out
        waited = stats.waited - self._seen_waited
        self._seen_handed_out, self._seen_waited = stats.handed_out, stats.waited
        # A caller that waits is counted when it starts waiting (that is when the pool
        # must grow), not again when it is served.
        fresh = max(0, arrived - self._pending_waits)
        self._pending_waits = max(0, self._pending_waits - arrived) + waited
        if fresh + waited:
            self.policy.arrived(fresh + waited)
        if waited:
            self.policy.waited(waited)
        if not self.settings.enabled:
            self._explain_fixed()
            return None
        decision = self.policy.decide(ready_seconds=self._ready_seconds(),
                                      budget_vms=self._budget_vms(),
                                      ready_now=self.cache.ready_count
                                      + self.cache.booting_count,
                                      waiting=self.cache.waiting_clients)
        if decision.target != self.cache.wanted:
            log.info("pool target %d -> %d: %s", self.cache.wanted, decision.target,
                     decision.reason)
            self.changes += 1
            self.cache.resize(decision.target)
        self.reason, self.kind = decision.reason, decision.kind
        return decision

    async def run(self) -> None:
        """Step on every change of the pool and at least every TICK seconds (shrinking is
        due on time, not only on a change)."""
        while True:
            changed = self.cache.change_event()
            self._kick.clear()
            self.step()
            # Off, nothing is due on time: no tick (a full, quiet cache stays near 0% CPU);
            # a reload that turns it on kicks the loop.
            waits = {asyncio.ensure_future(changed.wait()),
                     asyncio.ensure_future(self._kick.wait())}
            try:
                await asyncio.wait(waits, timeout=TICK if self.enabled else None,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
