"""The notify protocol on a real AF_UNIX datagram socket bound by the test (what systemd
does), in-process. tests/integration/test_systemd.py checks the same against the real daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vmcache.pool.activity import CacheStats
from kata_vmcache.service.notify import Notifier, status_line


class Listener:
    """systemd's side: a bound datagram socket; `take()` drains what has arrived."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if not path.startswith("@") else "\0" + path[1:])
        self.sock.setblocking(False)

    def take(self) -> list[str]:
        got = []
        while True:
            try:
                got.append(self.sock.recv(4096).decode("latin-1"))
            except BlockingIOError:
                return got

    def wait(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode("latin-1")
        finally:
            self.sock.setblocking(False)


@pytest.fixture
def listener() -> Iterator[Listener]:
    root = tempfile.mkdtemp(prefix="kvc-n-")  # short: sun_path holds 107 bytes
    listener = Listener(os.path.join(root, "notify.sock"))
    try:
        yield listener
    finally:
        listener.sock.close()
        shutil.rmtree(root, ignore_errors=True)


def test_no_notify_socket_is_a_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.watchdog_interval is None
    n.ready("x")
    n.status("y")
    n.reloading()
    n.stopping()
    n.ping()
    asyncio.run(asyncio.wait_for(n.watchdog(), 1))  # returns at once: nothing to ping


def test_messages_on_the_wire(listener: Listener) -> None:
    n = Notifier(listener.path)
    assert n.enabled
    n.ready("0/2 VMs ready, 0 handed out")
    n.status("2/2 VMs ready, 14 handed out")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.ready()
    n.stopping()
    ready, status, reloading, ready_again, stopping = listener.take()
    assert ready == "READY=1\nSTATUS=0/2 VMs ready, 0 handed out\n"
    assert status == "STATUS=2/2 VMs ready, 14 handed out\n"
    fields = reloading.splitlines()
    assert fields[0] == "RELOADING=1"
    # systemd >= 253 (Type=notify-reload) wants CLOCK_MONOTONIC in microseconds with it.
    assert fields[1].startswith("MONOTONIC_USEC=")
    assert before <= int(fields[1].partition("=")[2]) <= after
    assert ready_again == "READY=1\n"
    assert stopping == "STOPPING=1\nSTATUS=stopping\n"


def test_status_is_one_line_and_bounded(listener: Listener) -> None:
    n = Notifier(listener.path)
    n.status("boots failing: QEMU said\nsomething\n\nlong " + "x" * 500 + " \u2603")
    msg, = listener.take()
    assert msg.count("\n") == 1  # a newline inside would start another protocol field
    assert msg.startswith("STATUS=boots failing: QEMU said something long xxx")
    assert len(msg) <= len("STATUS=") + 200 + 1


def test_abstract_socket_address() -> None:
    name = f"@kvc-notify-test-{os.getpid()}"
    listener = Listener(name)
    try:
        Notifier(name).ready()
        assert listener.take() == ["READY=1\n"]
    finally:
        listener.sock.close()


def test_from_environ_reads_and_unsets(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "3000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    n = Notifier.from_environ(env)
    assert n.enabled
    assert n.watchdog_interval == 1.5  # half of WatchdogSec
    assert env == {"OTHER": "kept"}  # QEMU, our child, must not inherit them
    other = Notifier.from_environ({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "3000000",
                                   "WATCHDOG_PID": "1"})
    assert other.enabled
    assert other.watchdog_interval is None  # the watchdog is for another process


def test_watchdog_pings_come_from_the_event_loop(listener: Listener) -> None:
    """A blocked loop sends no pings: that is what gets a stuck daemon restarted."""
    n = Notifier(listener.path, watchdog_usec=100_000)  # a ping every 50 ms

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        task = asyncio.create_task(n.watchdog())
        try:
            first = await asyncio.to_thread(listener.wait)
            # Deliberately blocking: the loop is stuck, no task runs whatever its timers say.
            time.sleep(0.5)  # noqa: ASYNC251
            while_stuck = listener.take()
            # Once the loop runs again, so do the pings: wait for the next one.
            after = [await asyncio.to_thread(listener.wait)]
            after += listener.take()
        finally:
            task.cancel()
        return [first], while_stuck, after

    first, while_stuck, after = asyncio.run(scenario())
    assert first == ["WATCHDOG=1\n"]
    assert while_stuck == []
    assert after
    assert set(after) == {"WATCHDOG=1\n"}


def test_a_vanished_socket_is_warned_about_once(listener: Listener,
                                                caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(listener.path)
    listener.sock.close()
    Path(listener.path).unlink()
    with caplog.at_level(logging.WARNING, logger="kata_vmcache.service.notify"):
        n.status("a")
        n.status("b")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "systemd notify message dropped"]


class Pool:
    def __init__(self) -> None:
        self.target = 2
        self.ready_count = 1
        self.booting_count = 1
        self.stats = CacheStats(handed_out=14)

    async def wait_changed(self) -> None:
        await asyncio.Event().wait()  # nothing changes


def test_status_line() -> None:
    pool = Pool()
    assert status_line(pool) == "1/2 VMs ready (1 booting), 14 handed out"
    pool.ready_count, pool.booting_count = 2, 0
    assert status_line(pool) == "2/2 VMs ready, 14 handed out"
    pool.stats.last_error = "guest not ready after 30 s under TCG"
    assert status_line(pool) == ("2/2 VMs ready, 14 handed out; boots failing: "
                                 "guest not ready after 30 s under TCG")
