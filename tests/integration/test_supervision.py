"""Dead and hung cached VMs, on real QEMU: a cached QEMU that exits, is killed, or stops
answering QMP leaves Status and is replaced; GetBaseVM never hands out such a VM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_vmcache.procs import pid_alive

from .harness import Daemon, qmp, stop_taken_vm, wait_for
from .observe import get_vm, status_pids

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP: the process stays, its QMP socket accepts, nothing answers. Whatever the
    test does, the process is thawed afterwards (a stopped QEMU would ignore even SIGTERM)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def stopped(pid: int) -> bool:
    """The process's main thread is in the stopped state (SIGSTOP has landed)."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat.rpartition(b")")[2].split()[0] == b"T"


def leaves_status(endpoint: Path, pid: int, started: float, timeout: float = 20.0) -> float:
    wait_for(lambda: pid not in status_pids(endpoint), timeout, f"QEMU {pid} to leave Status",
             interval=0.02)
    return time.monotonic() - started


def test_dead_killed_and_hung_vms_leave_status_and_are_replaced(
        make_daemon: Callable[..., Daemon], report: Report) -> None:
    d = make_daemon(cache_number=3)
    d.wait_ready(3)
    wait_for(lambda: len(status_pids(d.endpoint)) == 3, 30, "3 VMs in Status")
    exited, killed, hung = status_pids(d.endpoint)

    def replaced(victim: int, started: float) -> str:
        """Seconds until 3 VMs are ready (booted and paused) again, the victim not among
        them."""
        wait_for(lambda: len({r["pid"] for r in d.records("ready")} - {victim}) == 3, 60,
                 f"a replacement for {victim}", interval=0.02)
        return f"{time.monotonic() - started:.3f}"

    started = time.monotonic()
    os.kill(exited, signal.SIGTERM)  # QEMU's own orderly exit, behind the daemon's back
    report("QEMU exited (SIGTERM): out of Status after (s)",
           f"{leaves_status(d.endpoint, exited, started):.3f}")
    report("QEMU exited (SIGTERM): replacement ready after (s)", replaced(exited, started))

    started = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    report("QEMU killed (SIGKILL): out of Status after (s)",
           f"{leaves_status(d.endpoint, killed, started):.3f}")
    report("QEMU killed (SIGKILL): replacement ready after (s)", replaced(killed, started))

    with frozen(hung):
        started = time.monotonic()
        took = leaves_status(d.endpoint, hung, started)
        report("QEMU hung (SIGSTOP): out of Status after (s)", f"{took:.3f}")
        # Not merely forgotten: the daemon killed it (a stopped process still dies of
        # SIGKILL), so nothing is leaked.
        wait_for(lambda: not pid_alive(hung), 10, f"hung QEMU {hung} to be killed",
                 interval=0.02)
        report("QEMU hung (SIGSTOP): killed after (s)", f"{time.monotonic() - started:.3f}")
        report("QEMU hung (SIGSTOP): replacement ready after (s)", replaced(hung, started))

    assert not any(pid_alive(p) for p in (exited, killed, hung))
    log = d.log()
    assert log.count("died (QEMU exited with code 0); replacing it") == 1, log
    assert log.count("died (QEMU exited with code -9); replacing it") == 1, log
    assert f"(QEMU pid {hung}) QEMU {hung} did not answer QMP 'query-status' within 1 s; " \
           "killing it and booting a replacement" in log, log
    assert "Traceback" not in log, log


def test_get_never_hands_out_a_dead_or_hung_vm(make_daemon: Callable[..., Daemon]) -> None:
    """Both cached VMs go bad just before GetBaseVM: the caller gets a fresh one."""
    d = make_daemon(cache_number=2)
    d.wait_ready(2)
    wait_for(lambda: len(status_pids(d.endpoint)) == 2, 30, "2 VMs in Status")
    dead, hung = status_pids(d.endpoint)
    with frozen(hung):
        os.kill(dead, signal.SIGKILL)
        # Signals take effect when their target next runs, which on a loaded machine can
        # be milliseconds after kill() returns; until then the VM is not dead or stopped
        # yet, for any check. Ask once both are, without giving the supervisor time to act
        # (it asks every 0.5 s): the hand-off's own check must catch them.
        wait_for(lambda: not pid_alive(dead) and stopped(hung), 1, "the signals to land",
                 interval=0.001)
        vm = get_vm(d.endpoint, timeout=60)
        d.taken.append(vm.hypervisor)
        assert vm.pid not in (dead, hung)
        assert pid_alive(vm.pid)
        status, = qmp(Path(vm.hypervisor["QmpChannelpath"]), "query-status")
        assert status["status"] == "paused"
        wait_for(lambda: not pid_alive(hung), 10, f"hung QEMU {hung} to be killed")
    stop_taken_vm(vm.hypervisor)
    d.taken.clear()
