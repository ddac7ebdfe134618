"""The autoscaling policy (kata_vmcache/pool/autoscale.py) on a simulated clock: no sleeping."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kata_vmcache.config import AutoscaleSettings
from kata_vmcache.pool.autoscale import Autoscaler, Decision, Policy

from .fakes import fake_pool, until
from .servicer_fakes import hand_off


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


READY = 2.0  # seconds to make a VM ready, as measured


def policy(clock: Clock, *, min_ready: int = 1, max_ready: int = 16,
           shrink_after: float = 30.0, initial: int = 2) -> Policy:
    return Policy(AutoscaleSettings(True, min_ready, max_ready, shrink_after),
                  initial=initial, parallelism=2, clock=clock)


def decide(p: Policy, *, budget: int | None = None, ready_now: int = 0, booting: int = 0,
           waiting: int = 0) -> Decision:
    return p.decide(ready_seconds=READY, budget_vms=budget, ready_now=ready_now,
                    booting=booting, waiting=waiting)


def kept(d: Decision) -> int:
    """`d.keep`, which the decisions compared with it set (None would mean `d.target`)."""
    assert d.keep is not None, d
    return d.keep


def two_bursts(clock: Clock) -> Policy:
    """A policy that has seen two bursts of 10, 45 s apart (the second just now): the next
    is planned for in 45 s."""
    p = policy(clock, shrink_after=60)
    p.arrived(10)
    decide(p)
    clock.advance(45)
    p.arrived(10)
    return p


def test_starts_at_vm_cache_number_within_bounds() -> None:
    clock = Clock()
    p = policy(clock, initial=4, shrink_after=30)
    assert decide(p).target == 4
    clock.advance(29)
    d = decide(p, ready_now=4)
    assert d.target == 4
    assert "keeping 4" in d.reason
    clock.advance(1)
    assert decide(p, ready_now=4).target == 1  # no demand at all: min_ready
    assert decide(policy(clock, initial=40, max_ready=8)).target == 8
    assert decide(policy(clock, initial=1, min_ready=3)).target == 3


def test_min_ready_zero_holds_nothing_without_demand_and_boots_for_a_caller() -> None:
    clock = Clock()
    p = policy(clock, min_ready=0, initial=2, shrink_after=30)
    clock.advance(30)
    d = decide(p, ready_now=2)
    assert (d.target, d.keep) == (0, 0), d  # idle: scaled to zero
    p.arrived()
    p.waited()
    assert decide(p, waiting=1).target >= 1  # a caller waits: a boot for it


def test_burst_grows_at_once_to_its_size() -> None:
    clock = Clock()
    p = policy(clock)
    p.arrived(10)
    d = decide(p)
    assert d.target == 10
    assert "10 requests within" in d.reason


def test_callers_waiting_grow_the_target_at_once() -> None:
    clock = Clock()
    p = policy(clock, initial=2)
    assert decide(p).target == 2
    # Two requests, spread out (no burst, low rate), but a caller still had to wait:
    # the pool was too small by at least one.
    p.arrived()
    clock.advance(5)
    p.arrived()
    p.waited()
    d = decide(p)
    assert d.target >= 3
    assert d.reason


def test_shrinks_only_after_the_idle_period() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=30)
    p.arrived(8)
    assert decide(p).target == 8
    clock.advance(20)
    d = decide(p, ready_now=8)
    assert d.target == 8, d.reason  # idle 20 s of 30: held
    clock.advance(11)
    d = decide(p, ready_now=8)
    assert d.target == 1, d.reason  # min_ready, after 31 s without demand for more
    assert "min_ready" in d.reason


def test_a_steady_level_is_idle_from_when_it_was_last_needed() -> None:
    """Steady demand at one level for longer than shrink_after, then an estimate one
    lower (Poisson noise as often as news): the surplus ready VM is kept, not stopped."""
    clock = Clock()
    p = policy(clock, shrink_after=30)
    levels = set()
    for _ in range(90):  # one a second for 90 s: the steady level, 6
        p.arrived()
        clock.advance(1.0)
        levels.add(decide(p, ready_now=6).target)
    assert 6 in levels
    clock.advance(8)  # a gap: the rate over the window says 5
    d = decide(p, ready_now=6)
    assert d.keep == 6, d
    clock.advance(30)  # then idle for shrink_after: stopped
    assert kept(decide(p, ready_now=6)) < 6


def test_steady_demand_keeps_rate_times_ready_time_plus_margin() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=60)
    for _ in range(60):  # one request a second: 2 in flight per ready time of 2 s
        p.arrived()
        clock.advance(1.0)
        d = decide(p)
    # 2 expected per ready time, plus two standard deviations (2.8) and one: 6.
    assert d.target == 6, d.reason
    assert "requests/min" in d.reason


def test_bounds_win_over_demand() -> None:
    clock = Clock()
    p = policy(clock, min_ready=2, max_ready=5)
    p.arrived(12)
    d = decide(p)
    assert d.target == 5
    assert "max_ready = 5" in d.reason
    clock.advance(100)
    d = decide(p)
    assert d.target == 2
    assert "min_ready = 2" in d.reason


def test_memory_budget_wins_over_everything() -> None:
    clock = Clock()
    p = policy(clock, min_ready=4)
    p.arrived(12)
    d = decide(p, budget=3)
    assert d.target == 3
    assert "memory_budget_mib holds 3" in d.reason
    # Even below min_ready: the host is never harmed.
    d = decide(p, budget=0)
    assert d.target == 0


def test_regular_bursts_are_planned_for_not_held_between() -> None:
    """Bursts of 10 every 45 s: after two, the pool drops to steady demand between bursts
    (the burst took every ready VM, so none is stopped) and grows back in time for the
    next: the time to boot 10 two at a time (5 ready times) plus half a ready time."""
    clock = Clock()
    p = policy(clock, shrink_after=60)
    p.arrived(10)
    assert decide(p).target == 10
    clock.advance(45)
    assert decide(p, ready_now=10).target == 10  # interval unknown: held
    p.arrived(10)
    d = decide(p, ready_now=0)
    assert d.target < 10, d.reason
    lead = 5 * READY + 0.5 * READY
    clock.advance(45 - lead - 1)
    assert decide(p).target < 10
    clock.advance(1)
    d = decide(p)
    assert d.target == 10, d.reason
    assert "burst of 10 expected" in d.reason


def test_a_planned_burst_counts_the_vms_ready_and_is_not_refilled_once_met() -> None:
    clock = Clock()
    p = two_bursts(clock)
    decide(p)
    # Four VMs are still ready: six to boot, three rounds of two, plus half a ready time.
    clock.advance(45 - 3.5 * READY - 0.5)
    d = decide(p, ready_now=4)
    assert d.target < 10, d
    assert kept(d) >= 4, d
    clock.advance(0.5)
    assert decide(p, ready_now=4).target == 10
    # The boots it started count against the lead: the growth goes on all the same.
    assert decide(p, ready_now=4, booting=6).target == 10
    clock.advance(3 * READY)
    d = decide(p, ready_now=10)
    assert d.target < 10, d
    assert d.keep == 10, d
    assert "10 ready" in d.reason
    # The burst begins (not yet told apart from single requests): taken VMs are not
    # replaced, so the burst starts no boot of its own.
    p.arrived(3)
    d = decide(p, ready_now=7)
    assert d.target < 10, d
    assert d.keep == 10, d


def test_a_planned_burst_is_led_by_slow_boots() -> None:
    """Boots vary: the lead counts each round of boots at a slow one of the latest (the
    driver gives their third quartile), plus half a median one."""
    clock = Clock()
    p = two_bursts(clock)
    decide(p)
    lead = 5 * 3.0 + 0.5 * READY
    clock.advance(45 - lead - 0.5)
    assert p.decide(ready_seconds=READY, slow_seconds=3.0, budget_vms=None).target < 10
    clock.advance(0.5)
    assert p.decide(ready_seconds=READY, slow_seconds=3.0, budget_vms=None).target == 10


def test_a_planned_burst_that_does_not_come_ends_the_plan() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=60)
    p.arrived(10)
    clock.advance(45)
    p.arrived(10)
    decide(p)
    clock.advance(45 + 0.25 * 45 + 1)  # well past when the next was due
    d = decide(p, ready_now=10)
    assert "expected" not in d.reason


def test_irregular_bursts_are_held_not_planned() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=120)
    for gap in (10, 50, 20):
        p.arrived(6)
        decide(p)
        clock.advance(gap)
    p.arrived(6)
    d = decide(p, ready_now=0)
    assert d.target == 6, d.reason  # held: no regular interval to plan on


def test_ready_vms_are_not_stopped_before_their_idle_time_between_planned_bursts() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=60)
    p.arrived(4)
    assert decide(p).target == 4
    clock.advance(30)
    p.arrived(4)
    # Three VMs are still ready (refilled meanwhile): kept for the next burst, not stopped,
    # and not replaced when taken until that burst is near.
    d = decide(p, ready_now=3)
    assert d.target < 3 <= kept(d), d
    assert "burst of 4 expected" in d.reason
    d = decide(p, ready_now=0)
    assert d.target < 3, d.reason


@pytest.mark.parametrize("ready_seconds", [None, 0.0])
def test_unmeasured_ready_time_has_a_default(ready_seconds: float | None) -> None:
    clock = Clock()
    p = policy(clock)
    p.arrived(3)
    d = p.decide(ready_seconds=ready_seconds, budget_vms=None)
    assert d.target >= 3
    assert "3.0 s" in d.reason


def test_reconfigure_keeps_demand_and_applies_new_bounds() -> None:
    clock = Clock()
    p = policy(clock)
    p.arrived(10)
    assert decide(p).target == 10
    p.configure(AutoscaleSettings(True, 1, 6, 30.0), parallelism=2)
    assert decide(p).target == 6


def test_no_shrinking_while_callers_wait() -> None:
    """Boots slower than shrink_after (a loaded host): the demand of callers still waiting
    is not forgotten."""
    clock = Clock()
    p = policy(clock, shrink_after=8)
    p.arrived(3)
    p.waited(2)
    assert decide(p, waiting=2).target >= 3
    clock.advance(14)
    d = decide(p, waiting=2)
    assert d.target >= 3, d.reason
    assert "wait" in d.reason
    clock.advance(1)
    # Served just now, the refill booting: the idle time starts now.
    assert decide(p, waiting=0, ready_now=3).target >= 3
    clock.advance(8)
    assert decide(p, ready_now=3).target == 1


def test_a_lower_target_stops_refilling_at_once_but_stops_ready_vms_only_when_idle() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=60)
    for _ in range(30):  # one a second: 6 kept (see the steady test)
        p.arrived()
        clock.advance(1.0)
        assert decide(p, ready_now=6).target <= 6
    assert decide(p, ready_now=6).target == 6
    clock.advance(25)  # the rate is forgotten after 20 s; the peak (2 in 2 s) is not
    # Demand is lower now: the pool is not refilled to six, but its ready VMs are kept.
    d = decide(p, ready_now=4)
    assert d.target < 4, d
    assert d.keep == 6, d
    assert "keeping up to 6" in d.reason
    clock.advance(60)
    d = decide(p, ready_now=3)  # idle for shrink_after: down to min_ready
    assert (d.target, d.keep) == (1, 1), d


def test_callers_waiting_on_slow_boots_do_not_ratchet_the_target_up() -> None:
    """Boots slower than arrivals: a caller waits at every step. The target grows by the
    most waiting at once, not by one per caller, to max_ready."""
    clock = Clock()
    p = policy(clock, initial=4, max_ready=16, shrink_after=60)
    assert decide(p, ready_now=4).target == 4
    for _ in range(30):
        p.waited()
        clock.advance(1)
        d = decide(p, waiting=1, ready_now=4)
    assert d.target <= 6, d.reason


def test_a_burst_of_waiting_callers_grows_by_all_of_them() -> None:
    clock = Clock()
    p = policy(clock, initial=2)
    p.arrived(10)
    p.waited(8)
    assert decide(p, waiting=8).target >= 10


def test_the_waited_floor_counts_from_the_target_callers_found() -> None:
    """A burst of 10 on 2 ready VMs, decided upon request by request (as the driver does):
    its first requests raise the steady estimate, but the 8 callers that wait found 2."""
    clock = Clock()
    p = policy(clock, shrink_after=60)
    for waiting in (0, 0, 1, 2, 3, 4, 5, 6, 7, 8):
        p.arrived()
        if waiting:
            p.waited()
        d = decide(p, waiting=waiting)
        clock.advance(0.01)
    assert d.target == 10, d


def test_callers_waiting_outside_a_planned_burst_end_the_plan() -> None:
    clock = Clock()
    p = two_bursts(clock)
    assert decide(p, ready_now=0).target < 10  # planned: not held
    clock.advance(5)
    p.arrived()
    p.waited()
    d = decide(p, waiting=1)
    # The plan is dropped: the bursts' peak holds the pool again.
    assert d.target >= 10, d.reason
    assert "expected" not in d.reason


def test_a_fast_steady_stream_is_not_taken_for_bursts() -> None:
    clock = Clock()
    p = policy(clock, shrink_after=60)
    for i in range(120):  # 1.2 a second, evenly: never 4 within a second
        p.arrived()
        clock.advance(1 / 1.2)
        if i % 10 == 0:
            decide(p)
    assert p._period() is None


# The driver on a pool of fake VMs (tests/unit/test_cache.py): real asyncio, the policy's
# clock simulated.


@pytest.mark.asyncio
async def test_the_driver_grows_the_pool_on_waits_and_shrinks_it_when_idle(
        tmp_path: Path) -> None:
    clock = Clock()
    async with fake_pool(tmp_path, 2) as (cache, factory):
        await until(cache, lambda: cache.ready_count == 2)
        scaler = Autoscaler(cache, AutoscaleSettings(True, 1, 8, 30.0), fixed=2,
                            parallelism=2, clock=clock)
        driver = asyncio.create_task(scaler.run())
        try:
            factory.gate = asyncio.Event()  # boots hang: the third and fourth callers wait
            takers = [asyncio.create_task(hand_off(cache)) for _ in range(4)]
            await until(cache, lambda: cache.waiting_clients == 2)
            await until(cache, lambda: cache.wanted >= 4)
            assert scaler.kind in ("waited", "peak", "steady")
            assert scaler.reason
            factory.gate.set()
            factory.gate = None
            await asyncio.gather(*takers)
            await until(cache, lambda: cache.ready_count == cache.wanted >= 4)
            clock.advance(31)  # idle for shrink_after: within a TICK, down to min_ready
            await until(cache, lambda: cache.wanted == 1 and cache.ready_count == 1)
            assert "min_ready" in scaler.reason
            assert scaler.changes >= 2
            # Reload: autoscale off, vm_cache_number is the fixed target again.
            scaler.configure(AutoscaleSettings(False, 1, 8, 30.0), fixed=3, parallelism=2)
            await until(cache, lambda: cache.ready_count == 3)
            assert (scaler.kind, scaler.reason) == ("fixed", "fixed: vm_cache_number = 3")
        finally:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
