"""Suite-wide guards: no test may leave a QEMU process, a child process or an asyncio task
behind.

After every test, any QEMU started by kata-vmcache (its `-name sandbox-<id>`, as Kata names
its VMs) that was not running before the test, and any child of this pytest process (a
kata-proxy too), fails the test; the leftovers are then killed by pid so one leak does not
cascade into the next tests.

After every asyncio test, a task still pending on the test's loop (once the loop has had a
few turns to let finishing callbacks run) fails the test: pytest-asyncio's runner would
cancel it silently when it closes the loop, hiding a task the code forgot to end or await.
The leaked tasks are named in the failure, then cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

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


#: Loop turns a test's loop gets after the test, before a pending task counts as leaked:
#: enough for call_soon bookkeeping and done callbacks, not for anything that waits.
SETTLE_TURNS = 5


def _describe(task: asyncio.Task[object]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", None) or repr(coro)
    return f"{task.get_name()} ({name})"


@pytest_asyncio.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Runs on the test's own loop (pytest-asyncio's function-scoped runner, which closes
    after this teardown)."""
    yield
    this = asyncio.current_task()
    for _ in range(SETTLE_TURNS):
        await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() if t is not this and not t.done()]
    if not leaked:
        return
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    pytest.fail(f"test left asyncio tasks pending: {sorted(map(_describe, leaked))} "
                "(cancelled now)")


@pytest.fixture(autouse=True)
def _check_asyncio_tasks(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("asyncio") is not None:
        request.getfixturevalue("_no_leaked_tasks")


# Measurements: tests report what they measured (latencies, CPU, RSS, fds); the numbers
# are printed at the end of the run, never asserted beyond generous sanity bounds. They
# travel as the test report's user_properties, so a run on several workers (pytest-xdist)
# prints them too. The summary hook lives here, in the root conftest: under pytest-xdist
# the controller process collects nothing, so it never loads tests/integration/conftest.py.

_MEASURED = "measured"


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    def record(what: str, value: object) -> None:
        request.node.user_properties.append(
            (_MEASURED, f"{request.node.name}: {what} = {value}"))
    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [line for reports in terminalreporter.stats.values() for rep in reports
             if getattr(rep, "when", None) == "call"
             for name, line in getattr(rep, "user_properties", ()) if name == _MEASURED]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)


# --- a syslog on /dev/log ------------------------------------------------------------------
#
# Kata starts virtiofsd with --syslog (and Kata 1.x's kata-proxy logs to syslog only):
# QEMU's virtiofsd then exits as soon as QEMU connects if nothing receives on /dev/log.
# A real host has journald there; a bare test machine may have nothing. So the run's one
# controlling process (the xdist controller, or the only process) listens there for the
# whole run when nobody else does, and removes the socket it made at the end. Workers
# never touch it: one socket for every worker, alive until all are done.

#: What the run's controlling process set up for the run, undone at its end.
_RUN: dict[str, Any] = {}


def _pytest_temp_root() -> Path:
    """Where pytest makes each run's tmp_path directories (`pytest-of-<user>`)."""
    import getpass
    import tempfile
    return Path(os.environ.get("PYTEST_DEBUG_TEMPROOT") or tempfile.gettempdir()) / \
        f"pytest-of-{getpass.getuser()}"


def pytest_configure(config: pytest.Config) -> None:
    import socket
    import threading

    from kata_vmcache.factory.host import syslog_listens
    if hasattr(config, "workerinput"):
        return
    # tmp_path_retention_policy = "failed" (pyproject.toml) removes a passing run's
    # directories but not pytest's root above them: removed at the end if this run made it.
    _RUN["made_temp_root"] = not _pytest_temp_root().exists()
    if syslog_listens():
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink("/dev/log")  # a stale socket: nobody receives on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    os.chmod("/dev/log", 0o666)

    def drain() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the run
            while True:
                sock.recv(65536)

    threading.Thread(target=drain, daemon=True, name="devlog").start()
    _RUN["socket"] = sock


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN.pop("made_temp_root", False):
        root = _pytest_temp_root()
        current = root / "pytest-current"  # pytest's link to this run's directory
        with contextlib.suppress(OSError):  # not empty: a failed test's directory stays
            if current.is_symlink() and not current.exists():
                current.unlink()
            root.rmdir()
    sock = _RUN.pop("socket", None)
    if sock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/dev/log")
        sock.close()
