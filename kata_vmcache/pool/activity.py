"""What the pool did, for people and tooling: counters, boot failure classes, duration
histograms and a bounded record of recent events (the Monitor service, `kata-vmcache tui`,
`status --json`, Prometheus).

Owns: `CacheStats` (counters since start, the latest boot error and the backoff's exponent),
`failure_class()` (a failure's reason as a metric label), `Histogram` (cumulative buckets a
scrape only reads) and `CacheActivity` (the latest events and hand-off latencies).

Invariants: nothing here grows with uptime (bounded deques, fixed buckets: a daemon runs
for months); event numbers increase within one daemon process; nothing here acts on a VM.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

from ..vm.owned import VM


@dataclass
class CacheStats:
    handed_out: int = 0
    #: GetBaseVM callers that found no ready VM and waited (autoscale.py grows on them).
    waited: int = 0
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
    LaunchError/GuestNotReady and filling.py's."""
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
