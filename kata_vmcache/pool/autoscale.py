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
   - after callers waited: the target they found (when their cluster of requests began:
     the steady estimate grows with its first requests) plus the most callers waiting at
     once, held for `shrink_after` seconds ("grow at once when callers wait"; one more per
     caller would ratchet the pool up to max_ready whenever boots are slower than
     arrivals, where no target helps);
   - an expected burst (BURST_MIN requests or more within BURST_GAP): when bursts recur
     at a regular interval (two bursts so far, the latest interval within a quarter of
     the one before, if any), the pool is not refilled between bursts beyond the rules
     above, and grows to the burst's size just in time for the next one: when the boots
     still needed (the VMs ready or booting count), `boot_parallelism` at a time and each
     as slow as the third quartile of the latest, plus half a ready time, would just
     end. Once that many are ready they are held without refilling, so that the burst
     starts no boot of its own. A burst that does not come when expected, or callers
     waiting outside a planned burst, end the plan.

Growth is applied at once. A lower target stops refilling at once (boots still queued for
a slot do not start), but ready VMs are kept (`Decision.keep`) until the higher level has
not been needed for `shrink_after` seconds (the starting target, vm_cache_number, too), and
under a plan as long as the next burst will take them: a surplus ready VM is stopped only
after that idle period, and never while callers wait.
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

from ..config import AutoscaleSettings
from .cache import VMCache

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
#: Growth for a planned burst ends this many ready times before it is due (boots under
#: load vary: the median boot is not the slowest). Each VM ready early is held idle for
#: that long: half a ready time is the compromise measured with bench/pool.py.
LEAD_MARGIN = 0.5
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
    #: Ready VMs are stopped only above this many (at least `target`): a lower target stops
    #: refilling at once, its ready VMs only once idle (None: `target`).
    keep: int | None = None


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
        #: VMs ready or booting at the last decision.
        self._have = 0
        #: The target when the latest cluster of arrivals began (see arrived()).
        self._found = self.current
        #: A slow boot among the latest (a planned burst's lead counts its boots at this).
        self._slow = DEFAULT_READY_SECONDS
        #: The planned burst (when it is due) whose growth has begun, and the one for which
        #: the pool has been full since.
        self._lead_for: float | None = None
        self._full_for: float | None = None

    def configure(self, settings: AutoscaleSettings, *, parallelism: int) -> None:
        """New bounds or idle period (a reload): the demand seen so far is kept."""
        self.settings = settings
        self.parallelism = max(1, parallelism)

    # demand

    def arrived(self, count: int = 1) -> None:
        """`count` GetBaseVM requests were served (or are waiting) now."""
        now = self.clock()
        if not self._arrivals or now - self._arrivals[-1] > BURST_GAP:
            # The target callers find: rules that grow with each arrival of a cluster
            # (steady demand) raise it before its later callers wait, too late to help them.
            self._found = self.current
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
            self._episode = min(self.current, self._found)
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
               ready_now: int = 0, booting: int = 0, waiting: int = 0,
               slow_seconds: float | None = None) -> Decision:
        """The target now. `ready_seconds`: the measured time to make a VM ready (None:
        not measured yet); `slow_seconds`: a slow one of the latest (default: the same);
        `budget_vms`: how many VMs the memory budget holds (None: no
        limit); `ready_now`, `booting`: the pool's VMs ready, and booting or queued to boot;
        `waiting`: callers waiting for a VM now (no shrinking while there are any)."""
        now = self.clock()
        s = self.settings
        ready = ready_seconds if ready_seconds and ready_seconds > 0 else DEFAULT_READY_SECONDS
        self._ready = ready
        self._slow = max(ready, slow_seconds or 0.0)
        self._have = ready_now + booting
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
        demand, kind, why = max(candidates, default=(0, "idle", "no recent requests"),
                                key=lambda c: c[0])
        bounded = max(s.min_ready, min(s.max_ready, demand))
        if bounded != demand:
            kind = "min_ready" if bounded > demand else "max_ready"
            why = (f"{why}; min_ready = {s.min_ready}" if bounded > demand
                   else f"{why}; max_ready = {s.max_ready}")
        if period is None:
            target, keep, why, kind = self._hold(now, bounded, demand, why, kind, waiting)
        else:
            target, keep, why, kind = self._plan(now, period, bounded, why, kind, ready_now)
        if waiting > target:
            # Callers waiting are served by boots as many at a time as there are callers.
            target = max(target, min(s.max_ready, waiting))
            keep = max(keep, target)
            why, kind = f"{why}; {waiting} waiting for a VM", "held"
        if budget_vms is not None and budget_vms < max(target, keep):
            target, keep = min(target, max(0, budget_vms)), max(0, budget_vms)
            why = f"{why}; memory_budget_mib holds {keep}"
            kind = "memory_budget"
        self.current = target
        return Decision(target, why, kind, keep=max(target, keep))

    def _hold(self, now: float, bounded: int, demand: int, why: str, kind: str,
              waiting: int) -> tuple[int, int, str, str]:
        """(target, keep, reason, kind) without a plan. A level is held for shrink_after
        seconds from when it was last needed (the starting target from the start): it is
        refilled for RATE_WINDOW of them, and its ready VMs are stopped only after all."""
        horizon = self.settings.shrink_after
        held, since = self._held
        held = min(held, self.settings.max_ready)  # a reload may have lowered the bound
        if waiting and bounded < held:
            # A caller still waits (boots are slow): the level is still needed.
            self._held = (held, now)
            return held, held, f"keeping {held}: {waiting} waiting for a VM", "held"
        if bounded > held or (bounded == held and kind == "steady"):
            # Needed now: its idle time starts again. (Steady demand remembers RATE_WINDOW
            # seconds; the peak and the waited floor hold their level for shrink_after by
            # themselves, and are not held twice as long.)
            self._initial = False
            self._held = (bounded, now)
            return bounded, bounded, why, kind
        if now - since >= horizon:
            self._initial = False
            if bounded < held:
                why = f"{why} (no demand for {held} for {now - since:.0f} s)"
            self._held = (bounded, now)
            return bounded, bounded, why, kind
        if bounded == held:
            return bounded, bounded, why, kind
        if self._initial:
            # vm_cache_number, the starting target, is kept as it is for the idle time.
            return held, held, (f"keeping {held}: vm_cache_number, until idle "
                                f"{horizon:.0f} s"), "held"
        if now - since < min(RATE_WINDOW, horizon):
            # A rate measured lower within its own window is noise as much as news: the
            # level is still refilled for that long.
            return held, held, (f"{why}; keeping {held} (needed {now - since:.0f} s ago) "
                                f"until idle {horizon:.0f} s"), "held"
        return bounded, held, (f"{why}; keeping up to {held} ready (needed "
                               f"{now - since:.0f} s ago) until idle {horizon:.0f} s"), "held"

    def _plan(self, now: float, period: tuple[float, int], bounded: int, why: str, kind: str,
              ready_now: int) -> tuple[int, int, str, str]:
        """(target, keep, reason, kind) when bursts recur. Between bursts the pool is not
        refilled above steady demand, and VMs still ready are kept for the next burst (they
        count against its lead). The pool grows to the burst's size when the boots still
        needed, `parallelism` at a time, would just end in time; once that many are ready
        they are held without refilling, so that the burst itself starts no boot."""
        expected_at, size = period
        size = min(size, self.settings.max_ready)
        # Held from now on if the plan ends (a burst that does not come): stopped once idle.
        self._held = (max(bounded, min(size, ready_now)), now)
        self._initial = False
        when = (f"a burst of {size} expected in {max(0.0, expected_at - now):.0f} s "
                f"(every {self._interval():.0f} s)")
        if not self._lead_began(now, expected_at, size):
            lead = self._lead(size)
            return bounded, max(bounded, size), (f"{why}; {when}: growing {lead:.0f} s "
                                                 f"before"), kind
        if ready_now >= size:
            self._full_for = expected_at
        if self._full_for == expected_at:
            return bounded, max(bounded, size), f"{when}: {size} ready", "burst_expected"
        return max(bounded, size), max(bounded, size), when, "burst_expected"

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

    def _lead(self, size: int) -> float:
        """How long before a burst of `size` to grow for it: the boots still needed (the
        VMs ready or booting count), `parallelism` at a time, each as slow as a slow one of
        the latest, plus LEAD_MARGIN ready times."""
        missing = max(0, size - self._have)
        return math.ceil(missing / self.parallelism) * self._slow + LEAD_MARGIN * self._ready

    def _lead_began(self, now: float, expected_at: float, size: int) -> bool:
        """Whether the growth for the burst expected at `expected_at` has begun. Once begun
        it goes on (the boots it started count against the lead, which would end it)."""
        if self._lead_for != expected_at and now >= expected_at - self._lead(size):
            self._lead_for = expected_at
        return self._lead_for == expected_at

    def _in_lead(self, now: float) -> bool:
        """Within a planned burst's lead time (or the burst itself)."""
        period = self._period()
        if period is None:
            return False
        return (self._lead_began(now, *period)
                or bool(self._bursts and now - self._bursts[-1].last <= BURST_GAP))

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
        if not settings.enabled and (self.cache.wanted, self.cache.keep) != (fixed, fixed):
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

    def _ready_seconds(self) -> tuple[float | None, float | None]:
        """The measured time to make a VM ready, the median of the latest boots (under the
        same contention as the next ones: they ran while others booted too), and a slow
        one: their third quartile."""
        times = list(self.cache.stats.boot_times)[-16:]
        if not times:
            return None, None
        slow = statistics.quantiles(times, n=4)[2] if len(times) >= 2 else times[0]
        return statistics.median(times), slow

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
        ready, slow = self._ready_seconds()
        decision = self.policy.decide(ready_seconds=ready, slow_seconds=slow,
                                      budget_vms=self._budget_vms(),
                                      ready_now=self.cache.ready_count,
                                      booting=self.cache.booting_count,
                                      waiting=self.cache.waiting_clients)
        if decision.target != self.cache.wanted:
            log.info("pool target %d -> %d: %s", self.cache.wanted, decision.target,
                     decision.reason)
            self.changes += 1
        if (decision.target, decision.keep) != (self.cache.wanted, self.cache.keep):
            self.cache.resize(decision.target, keep=decision.keep)
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
