"""The socket against hostile peers, and who may use it; the QEMU argument list and the
state directories. Real daemon, real Unix socket, real QEMU."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.procs import cmdline

from .harness import Daemon, wait_for
from .observe import (
    PREFACE,
    RawConnection,
    fd_count,
    grpc_request,
    settings,
    status_pids,
)

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]


def test_hostile_peers_leave_the_server_answering_and_no_fd_behind(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    d = make_daemon(cache_number=1)
    d.wait_ready(1)
    wait_for(lambda: len(status_pids(d.endpoint)) == 1, 30, "1 VM in Status")
    baseline = fd_count(d.pid)
    rng = random.Random(4)

    def answers() -> None:
        assert len(status_pids(d.endpoint)) == 1

    # Random bytes, then an HTTP/1.1 request: the server closes those connections.
    for payload in (rng.randbytes(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        c = RawConnection(d.endpoint)
        c.send(payload)
        assert wait_for(c.closed_by_peer, 10, "the server to close a garbage connection")
        c.close()
        answers()
    # Oversized: a real 1 MiB message, and a header claiming 2 GiB; the call is refused
    # (RESOURCE_EXHAUSTED) and the server neither allocates it nor falls over.
    for request in (grpc_request("/cache.CacheService/Status", b"\x00" * (1 << 20)),
                    grpc_request("/cache.CacheService/Status", declared_length=(1 << 31) - 1)):
        c = RawConnection(d.endpoint)
        c.send(PREFACE + settings(initial_window_size=1 << 20))
        with contextlib.suppress(OSError):  # the server may close before reading it all
            c.send(request)
        c.close()
        answers()
    # Half-open: connections that say nothing, or stop after the preface, held open.
    silent = [RawConnection(d.endpoint) for _ in range(5)]
    halfway = [RawConnection(d.endpoint) for _ in range(5)]
    for c in halfway:
        c.send(PREFACE[:10])
    answers()
    # 200 connections opened and dropped at once.
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.endpoint))
        s.close()
    answers()
    report("hostile input: daemon fds before / with 10 half-open peers",
           f"{baseline} / {fd_count(d.pid)}")
    for c in silent + halfway:
        c.close()
    answers()
    wait_for(lambda: fd_count(d.pid) <= baseline, 15,
             f"the daemon's fd count back to {baseline}")
    report("hostile input: daemon fds after", fd_count(d.pid))
    assert d.proc is not None
    assert d.proc.poll() is None
    assert "Traceback" not in d.log()


def test_a_silent_peer_is_dropped_by_the_server(make_daemon: Callable[..., Daemon]) -> None:
    """A peer that connects and never speaks HTTP/2 is closed after the handshake timeout
    (5 s), so half-open connections cannot pile up even if their peers never close."""
    d = make_daemon(cache_number=1)
    c = RawConnection(d.endpoint, timeout=1)
    try:
        wait_for(c.closed_by_peer, 30, "the server to drop a silent peer")
    finally:
        c.close()


def _as_nobody(endpoint: Path, gid: int) -> subprocess.CompletedProcess[str]:
    """Connect as uid nobody with `gid` as its group, what a non-root runtime does, and
    read the server's first HTTP/2 frame (its SETTINGS). The system Python: the venv's
    interpreter may live where nobody cannot read."""
    code = ("import socket, sys; s = socket.socket(socket.AF_UNIX);"
            f"s.settimeout(10); s.connect({str(endpoint)!r});"
            "s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' + bytes(9) "
            "[:3] + b'\\x04' + bytes(5));"
            "h = s.recv(9); sys.exit(0 if len(h) == 9 and h[3] == 4 else 3)")
    return subprocess.run(["/usr/bin/python3", "-c", code], user=65534, group=gid,
                          extra_groups=[gid], capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
def test_permissions_group_socket_argv_and_state_dirs(
        make_daemon: Callable[..., Daemon], make_config: Callable[..., Path],
        demo_guest: DemoGuest, workdir: Path) -> None:
    # The workdir must be reachable by `nobody` for the group test (mkdtemp makes it 0700).
    os.chmod(workdir, 0o755)
    d = make_daemon(cache_number=1)
    d.wait_ready(1)
    st = d.endpoint.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    refused = _as_nobody(d.endpoint, 65534)
    assert refused.returncode == 1, refused.stderr
    assert "PermissionError" in refused.stderr, refused.stderr
    # State directories: the daemon's and each VM's, owner only.
    assert stat.S_IMODE(d.state_dir.stat().st_mode) == 0o700
    vm_dirs = list((d.state_dir / "vms").iterdir())
    assert vm_dirs
    for vm_dir in vm_dirs:
        assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700, vm_dir
    d.stop()

    # A kernel path full of shell syntax is one argument to QEMU, never shell input.
    trap = workdir / "k;touch PWNED;$(touch PWNED2)"
    shutil.copy(demo_guest.kernel, trap)
    config = make_config(cache_number=1, socket_mode="0660",
                         socket_group="nogroup")
    text = config.read_text()
    kernel_line = next(line for line in text.splitlines() if line.startswith("kernel = "))
    config.write_text(text.replace(kernel_line, f'kernel = "{trap}"'))
    d = Daemon(config, d.endpoint, d.state_dir)
    try:
        d.start()
        ready, = d.wait_ready(1)
        argv = cmdline(ready["pid"])
        assert Path(argv[0]).name == "qemu-system-x86_64", argv
        assert str(trap) in argv  # whole, as one argument
        assert not (workdir / "PWNED").exists()
        assert not list(Path.cwd().glob("PWNED*"))
        # Group and mode from the configuration; the group's member gets in.
        st = d.endpoint.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == 65534
        allowed = _as_nobody(d.endpoint, 65534)
        assert allowed.returncode == 0, allowed.stderr
    finally:
        d.stop()
