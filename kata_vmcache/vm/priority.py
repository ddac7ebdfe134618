"""CPU priority of what the daemon launches: its own work never slows a running sandbox.

The cache exists to make sandboxes start faster, yet its refill boots, template builds,
clone checks and autoscale growth all run on the cores the sandboxes run on (a refill starts
right after each hand-off, while the sandbox that took the VM boots its container). So a VM
booted ahead of demand runs at `SCHED_IDLE`: it gets a core only when nothing else wants it,
and on an idle host it boots as fast as before. A boot a waiting caller needs, and every VM
handed out, runs at normal priority (`SCHED_OTHER`).

- `launching(level)`: processes forked inside the block start at `level`. A thread inherits
  the policy of the thread that created it (sched(7)), so the policy is set on our launching
  thread for the span of the fork, and QEMU's vCPU threads, its kata-proxy's threads and
  everything they start are born at that level. Setting it on QEMU afterwards would miss the
  threads it made meanwhile.
- `promote(pid, ...)`: every thread of those processes back to `SCHED_OTHER`: once the VM is
  paused in the cache (it needs no CPU then, and the hand-off has nothing left to do: a
  promotion of seven threads costs 0.15 ms), or as soon as a caller waits for its boot.

Leaving `SCHED_IDLE` needs CAP_SYS_NICE (or an RLIMIT_NICE that allows nice 0): the daemon
runs as root. Where it cannot, nothing is launched at idle (`can_lower()`), so nothing is
ever left there: one log line says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from typing import Literal

log = logging.getLogger(__name__)

Level = Literal["idle", "normal"]
LEVELS: tuple[Level, ...] = ("idle", "normal")

_NO_PARAM = os.sched_param(0)  # SCHED_IDLE and SCHED_OTHER take priority 0


@functools.cache
def can_lower() -> bool:
    """Whether a thread of ours can go to SCHED_IDLE and come back (tried on a throwaway
    thread, so the answer costs nothing if it is no)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, _NO_PARAM)
            os.sched_setscheduler(0, os.SCHED_OTHER, _NO_PARAM)
        except OSError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=attempt, name="sched-idle-check")
    thread.start()
    thread.join()
    if not result[0]:
        log.warning("boot_priority = \"idle\" needs CAP_SYS_NICE to give handed-out VMs "
                    "their priority back; VMs boot at normal priority")
    return result[0]


@contextlib.contextmanager
def launching(level: Level) -> Iterator[None]:
    """Processes forked in the block start at `level` (the calling thread's policy while
    the block runs: keep it to the fork, it is synchronous)."""
    if level == "normal" or not can_lower():
        yield
        return
    before = os.sched_getscheduler(0)
    os.sched_setscheduler(0, os.SCHED_IDLE, _NO_PARAM)
    try:
        yield
    finally:
        os.sched_setscheduler(0, before, _NO_PARAM)


def promote(*pids: int | None) -> int:
    """Every thread of the processes `pids` (our children: their pids cannot be reused
    before we reap them) at SCHED_OTHER; how many threads changed. A thread created during
    a pass by one not yet changed is born idle, so passes repeat until one changes none."""
    changed = 0
    for pid in pids:
        if pid is None:
            continue
        while True:
            this_pass = 0
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                break  # exited
            for name in tids:
                tid = int(name)
                with contextlib.suppress(ProcessLookupError):
                    if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                        os.sched_setscheduler(tid, os.SCHED_OTHER, _NO_PARAM)
                        this_pass += 1
            changed += this_pass
            if not this_pass:
                break
    return changed


def level_of(pid: int) -> Level | None:
    """The level of a process's main thread (None once it is gone)."""
    try:
        policy = os.sched_getscheduler(pid)
    except OSError:
        return None
    return "idle" if policy == os.SCHED_IDLE else "normal"
