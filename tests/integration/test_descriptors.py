"""File descriptors, on the real daemon: started with the soft limit of a login shell (1024)
it serves 1,500 idle HTTP/2 connections and more; when descriptors do run out it says so
once, keeps serving the connections it has (a ready VM is still handed out), and recovers
by itself once they are closed (new connections served, the cache refilled)."""

from __future__ import annotations

import contextlib
import json
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2

from kata_vmcache.procs import pid_alive
from kata_vmcache.proto import vmcache_pb2, vmcache_pb2_grpc

from .harness import Daemon, wait_for
from .observe import ACK, PREFACE, SETTINGS, RawConnection, fd_count, frame, settings, stub

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]

IDLE_CONNECTIONS = 1500


def open_limit(pid: int) -> tuple[int, int]:
    """The (soft, hard) "Max open files" of a process, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for {pid}")


def idle_connection(endpoint: Path, *, accept_within: float = 10.0) -> RawConnection | None:
    """A connection that completes HTTP/2's opening (so the server keeps it) and then says
    nothing. None when the server did not accept it within `accept_within` seconds: the
    connection is closed then."""
    conn = RawConnection(endpoint, timeout=accept_within)
    conn.send(PREFACE + settings())
    try:
        while True:
            f = conn.read_frame()
            assert f is not None, "the server closed a new connection"
            if f[0] == SETTINGS and not f[1] & ACK:
                conn.send(frame(SETTINGS, ACK, 0, b""))
                return conn
    except TimeoutError:
        conn.close()
        return None


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room in this process for the connections the tests open (a login shell's 1024 is
    not enough; the hard limit is, as on any systemd host)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNECTIONS + 512
    if hard < need:
        pytest.fail(f"these tests open {IDLE_CONNECTIONS} connections: raise the hard "
                    f"open-file limit to at least {need} (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_started_with_a_soft_limit_of_1024_it_serves_1500_idle_connections(
        make_daemon: Callable[..., Daemon], many_files: None, report: Report) -> None:
    d = make_daemon(cache_number=1, nofile=(1024, 4096))
    d.wait_ready(1)
    assert open_limit(d.pid) == (4096, 4096)
    assert "raised the open-file limit from 1024 to 4096" in d.log()
    conns: list[RawConnection] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            conn = idle_connection(d.endpoint)
            assert conn is not None, f"connection {len(conns) + 1} was not accepted"
            conns.append(conn)
        report("daemon fds with 1,500 idle connections", fd_count(d.pid))
        assert fd_count(d.pid) > IDLE_CONNECTIONS
        # Still serving, new connections included: Status, and a VM handed out.
        assert d.cli("status").returncode == 0
        vm = d.get()
        assert pid_alive(vm["hypervisor"]["Pid"])
    finally:
        for conn in conns:
            conn.close()
    assert "out of file descriptors" not in d.log()
    assert "Traceback" not in d.log()


def test_out_of_descriptors_is_said_once_and_the_daemon_recovers(
        make_daemon: Callable[..., Daemon], many_files: None, report: Report) -> None:
    limit = 128
    d = make_daemon(cache_number=1, nofile=(limit, limit))
    first, = d.wait_ready(1)
    channel, cache = stub(d.endpoint)  # a client connected before the descriptors run out
    monitor = vmcache_pb2_grpc.MonitorStub(channel)
    conns: list[RawConnection] = []
    with channel, contextlib.ExitStack() as closing:
        @closing.callback
        def close_all() -> None:
            for c in conns:
                c.close()

        cache.Status(empty_pb2.Empty(), timeout=10)
        # Idle connections until the daemon accepts no more (one more waits in the backlog).
        while (conn := idle_connection(d.endpoint, accept_within=2.0)) is not None:
            conns.append(conn)
            assert len(conns) < limit, "the daemon accepts more connections than its limit"
        conns.append(RawConnection(d.endpoint))  # queued: accepted once descriptors free up
        report("idle connections the daemon accepted with a limit of 128", len(conns) - 1)
        wait_for(lambda: "out of file descriptors" in d.log(), 10, "the daemon to notice")

        # What it has, it still serves: the connected client gets Status and the ready VM.
        assert len(cache.Status(empty_pb2.Empty(), timeout=10).vmstatus) == 1
        reply = cache.GetBaseVM(empty_pb2.Empty(), timeout=10)
        d.taken.append(json.loads(reply.hypervisor))
        assert reply.id == first["id"]
        # Its refill cannot start a QEMU now: it fails (quietly) and backs off.
        wait_for(lambda: monitor.Snapshot(vmcache_pb2.SnapshotRequest(), timeout=10
                                          ).counters.last_error == "out of file descriptors",
                 30, "the refill to fail for want of descriptors")

        for conn in conns:
            conn.close()
        conns.clear()
        closed = time.monotonic()
    wait_for(lambda: "file descriptors are available again" in d.log(), 15, "the recovery")
    report("descriptors freed: recovery logged after (s)", f"{time.monotonic() - closed:.3f}")
    assert d.cli("status").returncode == 0  # a new connection is served again
    second, = d.wait_ready(1, timeout=60)  # the refill works again
    report("descriptors freed: cache refilled after (s)", f"{time.monotonic() - closed:.3f}")
    assert second["id"] != first["id"]
    log = d.log()
    assert log.count("out of file descriptors (the limit is 128)") == 1, log
    assert log.count("file descriptors are available again") == 1, log
    assert "File descriptor limit reached" not in log  # grpc's own line, once a second
    assert "Traceback" not in log
