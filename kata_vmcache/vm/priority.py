"""CPU priority of what the daemon launches: its own work never slows a running sandbox.

The cache exists to make sandboxes start faster, yet its refill boots, template builds,
clone checks and autoscale growth all run on the cores the sandboxes run on (a refill starts
right after each hand-off, while the sandbox that took the VM boots its container). So a VM
booted ahead of demand runs at idle priority: it gets a core only when nothing else wants
it, and on an idle host it boots as fast as at normal priority. A boot a waiting caller
needs, and every VM handed out, runs at normal priority.

Idle priority is two settings, because the kernel weighs a thread twice:

- every thread at nice 19 (weight 15 against nice 0's 1024): this decides between threads
  of one scheduling group, such as the daemon's cgroup when the cpu controller groups it;
- the process's autogroup at nice 19. QEMU and its companions lead sessions of their own,
  and with autogroup scheduling (`kernel.sched_autogroup_enabled`, on by default) each
  session is a group whose weight is its autogroup's nice, whatever the nice or policy of
  the threads inside it. Measured with two CPU-bound stand-ins for sandboxes in sessions of
  their own: while 8 VMs refilled, they kept 0.99 of their CPU with both settings, 0.45
  with the threads' nice alone, and 0.51 with every thread at `SCHED_IDLE`.

`SCHED_IDLE` (and `SCHED_BATCH`) are not used: a thread under them never preempts on
wakeup, so QEMU's main loop waits for the tick behind another boot's vCPU thread, and two
boots at once on 2 cores took 1.39x as long as at normal priority on an idle host (nice 19:
1.01x). The autogroup is changed only for a process that leads its own session: never a
group the daemon shares.

- `spawn(argv, level, **popen)`: `subprocess.Popen` at `level`. A thread inherits the nice
  of the thread that created it, so the nice is set on our launching thread for the span of
  the fork, and QEMU's vCPU threads, its companions' threads and everything they start are
  born at that level (setting it afterwards would miss the threads made meanwhile); then
  the new session's group is lowered.
- `promote(pid, ...)`: every thread of those processes, and their groups, back to normal:
  once the VM is paused in the cache (it needs no CPU then, and the hand-off has nothing
  left to do), or as soon as a caller waits for its boot.

Leaving nice 19 needs CAP_SYS_NICE (or an RLIMIT_NICE that allows it): the daemon runs as
root. Where it cannot, nothing is launched at idle (`can_lower()`), so nothing is ever left
there: one log line says so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import threading
from collections.abc import Sequence
from typing import Any, Literal

log = logging.getLogger(__name__)

Level = Literal["idle", "normal"]
LEVELS: tuple[Level, ...] = ("idle", "normal")

#: The nice of idle priority, for threads and for their session's autogroup.
IDLE_NICE = 19


@functools.cache
def normal_nice() -> int:
    """Normal priority: the daemon's own nice (a unit's `Nice=` included)."""
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def _set_nice(tid: int, nice: int) -> None:
    # PRIO_PROCESS with a thread id is that thread alone on Linux.
    os.setpriority(os.PRIO_PROCESS, tid, nice)


@functools.cache
def can_lower() -> bool:
    """Whether a thread of ours can go to idle priority and come back (tried on a throwaway
    thread, so the answer costs nothing if it is no)."""
    result: list[bool] = []

    def attempt() -> None:
        tid = threading.get_native_id()
        try:
            _set_nice(tid, IDLE_NICE)
            _set_nice(tid, normal_nice())
        except OSError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=attempt, name="nice-check")
    thread.start()
    thread.join()
    if not result[0]:
        log.warning("boot_priority = \"idle\" needs CAP_SYS_NICE to give handed-out VMs "
                    "their priority back; VMs boot at normal priority")
    return result[0]


def _set_group_nice(pid: int, nice: int) -> None:
    """The nice of `pid`'s autogroup, if `pid` leads its own session (the group is then
    its own). A kernel without autogroups has no file: nothing to do. A refusal (a
    read-only /proc) costs the VM its priority, never its boot: logged once."""
    try:
        if os.getsid(pid) != pid:
            return
        with open(f"/proc/{pid}/autogroup", "w") as group:
            group.write(str(nice))
    except (FileNotFoundError, ProcessLookupError):
        return
    except OSError as exc:
        _group_refused(exc.strerror)


@functools.cache
def _group_refused(why: str | None) -> None:
    """Said once (per reason)."""
    log.warning("cannot set the CPU priority of a VM's session group "
                "(/proc/PID/autogroup: %s); its threads' nice still applies", why)


def group_nice(pid: int) -> int | None:
    """The nice of `pid`'s autogroup ("/autogroup-N nice K"), None when unknown."""
    try:
        with open(f"/proc/{pid}/autogroup") as group:
            return int(group.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def spawn(argv: Sequence[str], level: Level, **popen: Any) -> subprocess.Popen[Any]:
    """`subprocess.Popen(argv, **popen)` at `level`: its threads are born at it and, when it
    leads a session of its own (`start_new_session=True`), so is its session's group.
    OSError when it cannot run."""
    if level == "normal" or not can_lower():
        return subprocess.Popen(argv, **popen)
    # Our launching thread's nice for the span of the fork (synchronous: nothing else of
    # ours runs on this thread meanwhile), so the child's first thread inherits it.
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    _set_nice(tid, IDLE_NICE)
    try:
        proc = subprocess.Popen(argv, **popen)
    finally:
        _set_nice(tid, before)
    _set_group_nice(proc.pid, IDLE_NICE)
    return proc


def promote(*pids: int | None) -> int:
    """Every thread of the processes `pids` (our children: their pids cannot be reused
    before we reap them), and their session's group, at normal priority; how many threads
    changed. A thread created during a pass by one not yet changed is born idle, so passes
    repeat until one changes none."""
    normal = normal_nice()
    changed = 0
    for pid in pids:
        if pid is None:
            continue
        _set_group_nice(pid, 0)
        while True:
            this_pass = 0
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                break  # exited
            for name in tids:
                tid = int(name)
                with contextlib.suppress(ProcessLookupError):
                    if os.getpriority(os.PRIO_PROCESS, tid) > normal:
                        _set_nice(tid, normal)
                        this_pass += 1
            changed += this_pass
            if not this_pass:
                break
    return changed

