"""Suite-wide guards: no test may leave a QEMU process or a child process behind.

After every test, any QEMU started by kata-vmcache (its `-name sandbox-<id>`, as Kata names
its VMs) that was not running before the test, and any child of this pytest process (a
kata-proxy too), fails the test; the leftovers are then killed by pid so one leak does not
cascade into the next tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vmcache.procs import cmdline

PR_SET_CHILD_SUBREAPER = 36


def _process_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, command name) for every process we can see."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, _, rest = stat.partition(" (")[2].rpartition(")")
        fields = rest.split()
        table[int(entry.name)] = (int(fields[1]), fields[0], name)
    return table


def _descendants(table: dict[int, tuple[int, str, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def our_qemus() -> set[int]:
    """Live kata-vmcache QEMUs started by this test run (directly, by a daemon we started,
    or orphaned to us). Other runs on the same machine are not ours to judge."""
    table = _process_table()
    return {pid for pid in _descendants(table, os.getpid())
            if table[pid][1] not in ("Z", "X") and table[pid][2].startswith("qemu-system")
            and any(a.startswith("sandbox-") for a in cmdline(pid))}


def zombie_qemus() -> set[int]:
    table = _process_table()
    return {pid for pid, (ppid, state, name) in table.items()
            if ppid == os.getpid() and state == "Z" and name.startswith("qemu-system")}


def children() -> set[int]:
    table = _process_table()
    return {pid for pid, (ppid, state, _) in table.items()
            if ppid == os.getpid() and state not in ("Z", "X")}


@pytest.fixture(scope="session", autouse=True)
def _subreaper() -> None:
    """VMs taken from a daemon outlive it; when it exits they are orphaned. As a child
    subreaper, this process (not an init that may never reap) inherits and reaps them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


def reap(pid: int) -> None:
    """Collect an exited child's status so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    before_qemu, before_children = our_qemus(), children()
    yield
    leaked_qemu = our_qemus() - before_qemu
    leaked_children = children() - before_children - leaked_qemu
    for pid in leaked_qemu | leaked_children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in zombie_qemus():
        reap(pid)
    if leaked_qemu or leaked_children:
        pytest.fail(f"test left processes running: QEMU {sorted(leaked_qemu)}, "
                    f"children {sorted(leaked_children)} (killed now)")
