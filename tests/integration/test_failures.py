"""The daemon's own failures, on real QEMU: boots that keep failing, a daemon killed with
SIGKILL and started again, and SIGTERM while hand-offs and boots are in flight."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from conftest import our_qemus  # tests/conftest.py: the leak guard's own census

from kata_vmcache.procs import pid_alive

from .harness import Daemon, exited, qmp, wait_for
from .observe import TakenVM, cpu_seconds, get_vm, owned_vms, status_pids

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]


def test_failing_boots_back_off_quietly_and_the_daemon_keeps_serving(
        make_config: Callable[..., Path], workdir: Path, report: Report) -> None:
    broken = workdir / "broken-kernel"
    broken.write_bytes(b"this is not a kernel\n" * 64)  # exists, so the config accepts it
    config = make_config(cache_number=2)
    text = config.read_text()
    kernel_line = next(line for line in text.splitlines() if line.startswith("kernel = "))
    config.write_text(text.replace(kernel_line, f'kernel = "{broken}"'))
    d = Daemon(config, workdir / "cache.sock", workdir / "state", debug=True)
    try:
        d.start()
        wait_for(lambda: d.log().count("VM boot failed again") >= 2, 60, "three failed boots")
        # Backing off (1, 2, 4 ... s), one attempt at a time: the daemon is idle meanwhile.
        cpu, started = cpu_seconds(d.pid), time.monotonic()
        time.sleep(4)  # a measuring window, not synchronisation
        used = (cpu_seconds(d.pid) - cpu) / (time.monotonic() - started)
        report("failing boots: daemon CPU while backing off (fraction of a core)", f"{used:.3f}")
        assert used < 0.25, used  # a busy loop would be ~1.0

        log = d.log()
        attempts = log.count("VM boot failed")
        report("failing boots: attempts in the first ~8 s", attempts)
        assert attempts <= 6, log  # 1 s doubling to a 60 s cap, not a retry per loop turn
        # Logged at ERROR once for this reason; the repeats are debug lines.
        assert sum(" ERROR " in line and "VM boot failed:" in line
                   for line in log.splitlines()) == 1, log
        # Still serving: Status answers (at most the one attempt in flight), and a caller
        # learns why no VM comes.
        assert len(status_pids(d.endpoint)) <= 1
        result = d.cli("get", "--timeout", "1.5")
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "boots failing" in result.stderr, result.stderr
        report("failing boots: what `get` says", result.stderr.strip())

        # A new reason is logged again, once.
        broken.unlink()
        wait_for(lambda: sum(" ERROR " in line and "VM boot failed:" in line
                             for line in d.log().splitlines()) == 2, 40,
                 "the changed reason to be logged")
        assert d.proc is not None
        assert d.proc.poll() is None
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def test_restart_after_sigkill_stops_orphans_and_keeps_handed_off_vms(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    first = make_daemon(cache_number=2)
    first.wait_ready(2)
    taken = first.get()["hypervisor"]
    wait_for(lambda: len(status_pids(first.endpoint)) == 2, 30, "2 VMs in Status")
    orphans = status_pids(first.endpoint)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # The crash leaves everything behind: a stale socket and the owned QEMUs, still running.
    assert first.endpoint.is_socket()
    assert all(pid_alive(p) for p in orphans)

    started = time.monotonic()
    second = make_daemon(cache_number=2)  # same socket, same state dir
    report("restart after SIGKILL: serving after (s)", f"{time.monotonic() - started:.3f}")
    for pid in orphans:
        wait_for(exited(pid), 10, f"orphaned QEMU {pid} to be stopped")
    log = second.log()
    assert log.count("by a previous daemon") == 2, log
    assert "replacing stale socket" in log, log
    # The handed-off VM is untouched: alive, paused, and its record still says whose it is.
    assert pid_alive(taken["Pid"])
    status, = qmp(Path(taken["QmpChannelpath"]), "query-status")
    assert status["status"] == "paused"
    assert [r["id"] for r in second.records("handed_off")] == [taken["ID"]]
    fresh = {r["pid"] for r in second.wait_ready(2)}
    assert fresh.isdisjoint(orphans)


def test_sigterm_under_load_exits_fast_and_touches_no_handed_off_vm(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    # The serial probe: boots take seconds, so some are in flight when SIGTERM comes.
    d = make_daemon(cache_number=3, boot_parallelism=2)
    d.wait_ready(3)
    outcomes: list[TakenVM | grpc.RpcError] = []
    lock = threading.Lock()

    def call() -> None:
        try:
            outcome: TakenVM | grpc.RpcError = get_vm(d.endpoint, timeout=60)
        except grpc.RpcError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)
            if isinstance(outcome, TakenVM):
                d.taken.append(outcome.hypervisor)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    # The three ready VMs are gone; three callers wait; the refills are booting.
    wait_for(lambda: len(outcomes) >= 3, 60, "three hand-offs")
    # The daemon owns QEMUs it has not finished booting (the snapshot lists them; Kata's
    # Status lists ready VMs only).
    wait_for(lambda: [pid for pid, state in owned_vms(d.endpoint) if state == "booting"],
             30, "boots in flight")
    handed = {o.pid for o in outcomes if isinstance(o, TakenVM)}
    started = time.monotonic()
    d.send_signal(signal.SIGTERM)
    code = d.wait(10)
    took = time.monotonic() - started
    report("SIGTERM under load: exited after (s)", f"{took:.3f}")
    for t in threads:
        t.join(30)
    assert code == 0, d.log()
    assert took < 5, took
    # Waiting callers were answered (a VM, or UNAVAILABLE), not left to their deadline.
    assert len(outcomes) == 6
    for o in outcomes:
        if isinstance(o, grpc.RpcError):
            assert o.code() is grpc.StatusCode.UNAVAILABLE, o
    received = {o.pid for o in outcomes if isinstance(o, TakenVM)}
    assert handed <= received
    # Exactly the handed-off QEMUs survive, each still paused and answering.
    assert our_qemus() == received, (our_qemus(), received)
    for o in outcomes:
        if isinstance(o, TakenVM):
            status, = qmp(Path(o.hypervisor["QmpChannelpath"]), "query-status")
            assert status["status"] == "paused"
    assert "Traceback" not in d.log()

