"""Suite-wide guards: no test may leave a QEMU process or a child process behind.

After every test, any QEMU started by kata-vmcache (its `-name kata-vmcache-<id>`) that was
not running before the test, and any child of this pytest process, fails the test; the
leftovers are then killed by pid so one leak does not cascade into the next tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vmcache.procs import cmdline, pid_alive


def our_qemus() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = cmdline(int(entry.name))
            if args and "qemu-system" in args[0] and any(
                    a.startswith("kata-vmcache-") for a in args):
                found.add(int(entry.name))
    return {pid for pid in found if pid_alive(pid)}


def children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if fields[1] == me and fields[0] not in ("Z", "X"):
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    before_qemu, before_children = our_qemus(), children()
    yield
    leaked_qemu = our_qemus() - before_qemu
    leaked_children = children() - before_children - leaked_qemu
    for pid in leaked_qemu | leaked_children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if leaked_qemu or leaked_children:
        pytest.fail(f"test left processes running: QEMU {sorted(leaked_qemu)}, "
                    f"children {sorted(leaked_children)} (killed now)")
