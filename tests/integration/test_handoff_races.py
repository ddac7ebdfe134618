"""Hand-off under races, on real QEMU and the real socket: a client that goes away before the
reply is written, 20 callers racing for 2 VMs, and a soak of hand-offs with refill.

The invariant checked throughout: the daemon's own log line "VM X handed out" appears exactly
for the VMs some client received, each once; every other VM is still the daemon's (in Status)
or stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kata_vmcache.procs import pid_alive
from kata_vmcache.service.server import HANDOFF_WRITE_TIMEOUT

from .harness import Daemon, wait_for
from .observe import (
    ACK,
    END_STREAM,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    RawConnection,
    TakenVM,
    fd_count,
    frame,
    get_vm,
    grpc_request,
    rss_kib,
    settings,
    status_pids,
    window_update,
)

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]

GET_BASE_VM = "/cache.CacheService/GetBaseVM"
CANCEL = 0x8  # HTTP/2 error code CANCEL, what a gRPC client sends when it gives up


def handed_out(log: str) -> list[str]:
    """VM ids the daemon says it handed out, in order (one line per delivered reply)."""
    return re.findall(r"VM (\w+) handed out", log)


def kill_taken(vm: TakenVM) -> None:
    """A fast end for a taken VM (the soak takes many): SIGKILL by pid, reap if ours."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(vm.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(vm.pid), 10, f"QEMU {vm.pid} to die", interval=0.01)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(vm.pid, os.WNOHANG)


def stalled_get(endpoint: Path) -> RawConnection:
    """Start GetBaseVM on a connection that grants the server no flow-control window: the
    server reserves a VM, gives it, and sends the reply's HEADERS, but cannot send the
    message. Returns once the HEADERS are seen, i.e. while the reply is being written."""
    conn = RawConnection(endpoint, timeout=60)
    conn.send(PREFACE + settings(initial_window_size=0))
    conn.send(grpc_request(GET_BASE_VM))
    while True:
        f = conn.read_frame()
        assert f is not None, "the server closed the connection"
        kind, flags, stream, _ = f
        if kind == SETTINGS and not flags & ACK:
            conn.send(frame(SETTINGS, ACK, 0, b""))
        if kind == HEADERS and stream == 1:
            return conn


def test_client_gone_before_the_reply_is_written_gets_the_vm_back(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    d = make_daemon(cache_number=2)
    d.wait_ready(2)
    wait_for(lambda: len(status_pids(d.endpoint)) == 2, 30, "2 VMs in Status")
    before = set(status_pids(d.endpoint))

    # 1: the client cancels the call (RST_STREAM CANCEL) while the reply is in flight.
    conn = stalled_get(d.endpoint)
    started = time.monotonic()
    conn.send(frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")))
    wait_for(lambda: d.log().count("back in the pool") == 1, 30, "the cancelled VM back")
    report("cancelled mid-reply: VM back in the pool after (s)",
           f"{time.monotonic() - started:.3f}")
    conn.close()

    # 2: the client's connection goes away while the reply is in flight.
    conn = stalled_get(d.endpoint)
    started = time.monotonic()
    conn.close()
    wait_for(lambda: d.log().count("back in the pool") == 2, 30, "the dropped VM back")
    report("disconnected mid-reply: VM back in the pool after (s)",
           f"{time.monotonic() - started:.3f}")

    log = d.log()
    assert "GetBaseVM was cancelled before its reply was written" in log \
        or "the client went away before the reply was written" in log, log
    assert handed_out(log) == [], log  # neither counts as handed out
    assert d.records("handed_off") == []
    # The VMs came back, alive and the daemon's: Status lists them again.
    assert before <= set(status_pids(d.endpoint))

    # Taken back means usable: the next callers get them, each exactly once, paused.
    got = [get_vm(d.endpoint), get_vm(d.endpoint)]
    d.taken.extend(vm.hypervisor for vm in got)
    assert len({vm.id for vm in got}) == 2
    assert {vm.pid for vm in got} <= before | set(status_pids(d.endpoint)) | {
        vm.pid for vm in got}
    assert sorted(handed_out(d.log())) == sorted(vm.id for vm in got)
    assert "Traceback" not in d.log()


def log_time(log: str, needle: str) -> float:
    """Unix time of the first JSON log line whose message contains `needle`."""
    for line in log.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if needle in entry["message"]:
                stamp = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
                return stamp.replace(tzinfo=datetime.UTC).timestamp()
    raise AssertionError(f"no log line with {needle!r}:\n{log}")


def test_a_client_that_stops_reading_cannot_pin_a_vm(make_daemon: Callable[..., Daemon],
                                                      report: Report) -> None:
    """GetBaseVM from a client that grants no flow-control window: the reply's message can
    never be written. The hand-off is undone within HANDOFF_WRITE_TIMEOUT (the VM back in
    the pool, alive), the replacement starts booting meanwhile, another caller is served,
    and the stalled client, when it reads at last, cannot complete its call."""
    d = make_daemon(cache_number=1, log_format="json")
    first, = d.wait_ready(1)
    conn = stalled_get(d.endpoint)
    stalled_at, started = time.time(), time.monotonic()

    other = get_vm(d.endpoint)  # not kept waiting by the stalled hand-off
    d.taken.append(other.hypervisor)
    report("stalled hand-off: another caller served after (s)",
           f"{time.monotonic() - started:.3f}")
    back = f"VM {first['id']} back in the pool"
    wait_for(lambda: back in d.log(), 30, "the stalled hand-off to be undone")
    report("stalled hand-off: undone after (s)", f"{time.monotonic() - started:.3f}")
    log = d.log()
    assert (f"{back}: the client did not read its reply within {HANDOFF_WRITE_TIMEOUT:g} s"
            in log), log
    # The refill began while the hand-off was stalled, not once it was undone: the first
    # VM created after the stall was created before the take-back.
    created = min(r["created"] for r in d.records() if r["created"] > stalled_at)
    assert created < log_time(log, back), (created, log)

    # The VM the stalled client held is the cache's again, or stopped if the refill had
    # filled the cache by then; either way the cache is full and nothing else runs.
    if other.id != first["id"]:
        wait_for(lambda: not pid_alive(first["pid"]) or first["pid"] in status_pids(d.endpoint),
                 30, "the VM taken back to be in Status, or stopped")
    wait_for(lambda: len(status_pids(d.endpoint)) == 1 and len(d.records("ready")) == 1, 30,
             "one VM ready")
    assert [r["id"] for r in d.records("handed_off")] == [other.id]

    # Reading at last, the stalled client may get the message, but never a status: no
    # gRPC client returns a reply from a call that does not end with status OK.
    conn.send(window_update(0, 1 << 20) + window_update(1, 1 << 20))
    conn.sock.settimeout(2.0)
    frames = []
    with contextlib.suppress(TimeoutError):
        while (f := conn.read_frame()) is not None:
            frames.append(f)
    conn.close()
    assert not [f for f in frames if f[0] == HEADERS and f[2] == 1 and f[1] & END_STREAM], \
        frames
    assert handed_out(d.log()) == [other.id]
    assert "Traceback" not in d.log()


def test_a_crash_during_a_stalled_hand_off_leaves_no_vm_running(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    """SIGKILL while a hand-off's reply is blocked: the record still says `ready` (the
    client cannot have the VM: no status went out), so the next daemon stops that VM."""
    d = make_daemon(cache_number=1)
    first, = d.wait_ready(1)
    conn = stalled_get(d.endpoint)
    d.send_signal(signal.SIGKILL)
    d.wait(10)
    conn.close()
    assert pid_alive(first["pid"])
    assert [(r["id"], r["state"]) for r in d.records()] == [(first["id"], "ready")]
    started = time.monotonic()
    successor = make_daemon(cache_number=1)
    wait_for(lambda: not pid_alive(first["pid"]), 30, "the orphaned VM to be stopped")
    report("crash mid-hand-off: successor started and the orphan stopped after (s)",
           f"{time.monotonic() - started:.3f}")
    assert f"stopping VM {first['id']}" in successor.log()
    assert first["id"] not in [r["id"] for r in successor.records()]


def test_twenty_callers_race_for_a_cache_of_two(make_daemon: Callable[..., Daemon],
                                                report: Report) -> None:
    # The serial probe: boots of seconds, so that most callers outlast their deadline.
    d = make_daemon(cache_number=2, boot_parallelism=1)
    d.wait_ready(2)
    deadlines = [1.0 + (i % 5) * 0.5 for i in range(20)]  # 1 .. 3 s, each call its own
    results: list[tuple[float, float, TakenVM | grpc.RpcError]] = []
    lock = threading.Lock()
    go = threading.Event()

    def call(deadline: float) -> None:
        go.wait()
        started = time.monotonic()
        outcome: TakenVM | grpc.RpcError
        try:
            outcome = get_vm(d.endpoint, timeout=deadline)
        except grpc.RpcError as exc:
            outcome = exc
        with lock:
            results.append((deadline, time.monotonic() - started, outcome))

    threads = [threading.Thread(target=call, args=(t,)) for t in deadlines]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    got = [o for _, _, o in results if isinstance(o, TakenVM)]
    d.taken.extend(vm.hypervisor for vm in got)
    failed = [(deadline, took, o) for deadline, took, o in results
              if isinstance(o, grpc.RpcError)]
    assert len(results) == 20
    report("20 callers vs cache of 2: got a VM / DEADLINE_EXCEEDED",
           f"{len(got)} / {len(failed)}")

    # Every VM exactly once.
    assert len(got) >= 2
    assert len({vm.id for vm in got}) == len(got)
    assert len({vm.pid for vm in got}) == len(got)
    for deadline, took, exc in failed:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED, exc
        # At its own deadline: not before it, and not long after (a loaded host is slow).
        assert deadline - 0.2 <= took <= deadline + 3, (deadline, took, exc)
    if failed:
        report("DEADLINE_EXCEEDED after (s), deadline: worst lateness",
               f"{max(took - deadline for deadline, took, _ in failed):+.3f}")
    # Nothing was handed out that nobody received (a reply racing its caller's deadline).
    wait_for(lambda: len(handed_out(d.log())) >= len(got), 10, "the hand-off log lines")
    assert sorted(handed_out(d.log())) == sorted(vm.id for vm in got), d.log()
    assert sorted(r["id"] for r in d.records("handed_off")) == sorted(vm.id for vm in got)
    assert "Traceback" not in d.log()


SOAK_HANDOFFS = 60


@pytest.mark.timeout(300)
def test_soak_hand_offs_with_refill(make_config: Callable[..., Path], workdir: Path,
                                    report: Report) -> None:
    """SOAK_HANDOFFS real hand-offs, each VM refilled by a real clone of a template (a
    cold boot per refill would take ten times as long): the daemon's RSS and open file
    count stay flat. Taken VMs are killed at once (SIGKILL) to keep it short."""
    config = make_config(cache_number=4, boot_parallelism=2)
    config.write_text(config.read_text().replace(
        "enable_template = false", f'enable_template = true\ntemplate_path = "{workdir}/tmpl"'))
    d = Daemon(config, workdir / "cache.sock", workdir / "state").start()
    try:
        d.wait_ready(4)
        wait_for(lambda: len(status_pids(d.endpoint)) == 4, 30, "4 VMs in Status")
        baseline = fd_count(d.pid)  # 4 VMs, each with its QMP socket and pidfd
        warmup = 20
        started = time.monotonic()
        fds, rss = [], []
        for i in range(SOAK_HANDOFFS):
            vm = get_vm(d.endpoint, timeout=60)
            kill_taken(vm)
            if (i + 1) % warmup == 0:
                fds.append(fd_count(d.pid))
                rss.append(rss_kib(d.pid))
        took = time.monotonic() - started
        report("soak: hand-offs, seconds, per hand-off incl. refill (ms)",
               f"{SOAK_HANDOFFS}, {took:.1f}, {took / SOAK_HANDOFFS * 1000:.0f}")
        report("soak: daemon fds after 20, 40, 60 hand-offs", fds)
        report("soak: daemon RSS KiB after 20, 40, 60 hand-offs", rss)
        d.wait_ready(4)
        wait_for(lambda: len(status_pids(d.endpoint)) == 4, 30, "4 VMs in Status")
        wait_for(lambda: fd_count(d.pid) <= baseline, 10,
                 f"fd count back to {baseline} (now {fd_count(d.pid)})")
        report("soak: daemon fds with 4 VMs ready, before and after",
               f"{baseline}, {fd_count(d.pid)}")
        assert max(fds) - fds[0] <= 8, fds  # no descriptor per hand-off
        assert rss[-1] - rss[0] < 20 * 1024, rss  # under 20 MiB growth over the whole soak
        assert len(handed_out(d.log())) == SOAK_HANDOFFS
        assert "Traceback" not in d.log()
        assert d.stop() == 0  # the template's tmpfs goes with it
    finally:
        d.stop()
