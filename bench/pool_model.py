"""The pool policies against bench/pool.py's traces on a model of the pool, in a second.

    python bench/pool_model.py [BOOT_SECONDS] [PARALLELISM]

No QEMU: a pool that boots a VM in BOOT_SECONDS (2.2 here, the median under 2 parallel
boots), PARALLELISM at a time, hands out instantly, and serves waiting callers first; the
real `autoscale.Policy` decides, on a simulated clock. It is how the traces' parameters and
the policy's margins were checked before spending real runs on them (a loaded machine
boots in 3 s or more: try 3.0). The real figures are `make bench`'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pool

from kata_vmcache.config import AutoscaleSettings
from kata_vmcache.pool.autoscale import Policy

STEP = 0.05


def simulate(trace: pool.Trace, policy: str, boot: float,
             parallelism: int) -> tuple[float, float]:
    """(miss rate, idle VM-seconds) of `policy` on `trace`."""
    now = 0.0
    settings = pool.POLICIES[policy]
    target = settings["cache_number"]
    scaler = None
    if settings.get("autoscale"):
        scaler = Policy(AutoscaleSettings(True, settings["min_ready"], settings["max_ready"], 60.0),
                        initial=target, parallelism=parallelism, clock=lambda: now)
    ready = target
    booting: list[float] = []  # when each boot in flight is ready
    waiters: list[float] = []  # when each waiting caller arrived
    arrivals, i = sorted(trace.arrivals), 0
    waits: list[float] = []
    idle = 0.0
    while now < trace.duration or waiters:
        for _ in [b for b in booting if b <= now]:
            if waiters:
                waits.append(now - waiters.pop(0))
            elif ready < target:
                ready += 1
        booting = [b for b in booting if b > now]
        came = waited = 0
        while i < len(arrivals) and arrivals[i] <= now:
            came += 1
            if ready:
                ready -= 1
                waits.append(0.0)
            else:
                waiters.append(arrivals[i])
                waited += 1
            i += 1
        if scaler is not None:
            if came:
                scaler.arrived(came)
            if waited:
                scaler.waited(waited)
            decision = scaler.decide(ready_seconds=boot, budget_vms=None, ready_now=ready,
                                     booting=len(booting), waiting=len(waiters))
            target = decision.target
            ready = min(ready, decision.keep if decision.keep is not None else target)
        # As the filler does: boots up to the target, a finished one to a waiting caller first.
        while ready + len(booting) < target and len(booting) < parallelism:
            booting.append(now + boot)
        if now < trace.duration:
            idle += ready * STEP
        now += STEP
    return sum(1 for w in waits if w > pool.MISS_MS / 1000) / len(waits), idle


def main() -> None:
    boot = float(sys.argv[1]) if len(sys.argv) > 1 else 2.2
    parallelism = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for trace in pool.traces().values():
        got = {p: simulate(trace, p, boot, parallelism) for p in pool.POLICIES}
        line = "  ".join(f"{p}: miss {m:.0%} idle {s:.0f}" for p, (m, s) in got.items())
        ratio = got["autoscale"][1] / got["fixed-8"][1]
        print(f"{trace.name:7} {line}  autoscale/fixed-8 idle {ratio:.2f}")


if __name__ == "__main__":
    main()
