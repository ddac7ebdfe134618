"""QemuProcess's run states and what each allows, driven against a fake QMP peer (a real Unix
socket) with a real child process as its QEMU: start, idle, probe, release, reclaim, stop,
kill, and the signals they come to."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kata_vmcache.errors import LaunchError, VMDead, VMStateError
from kata_vmcache.vm import qemu as qemu_module
from kata_vmcache.vm.paths import VMPaths
from kata_vmcache.vm.qemu import QemuProcess, RunState

from .qmp_peer import FakeQMP, child_argv, sigstop

pytestmark = pytest.mark.asyncio
VM_ID = "cccccccccccc"


def state(qemu: QemuProcess) -> RunState:
    """Its run state now (read through a call: mypy would keep an assert's narrowing of
    `qemu.state` across the awaits that change it)."""
    return qemu.state


class Fake:
    """One QemuProcess whose QEMU is a child process and whose QMP is `peer`."""

    def __init__(self, tmp: Path, peer: FakeQMP, *, ignore_term: bool = False) -> None:
        self.paths = VMPaths.for_vm(VM_ID, vm_storage=tmp / "vm", state_dir=tmp / "state")
        self.exits: list[int] = []
        self.ended = asyncio.Event()
        # The child makes the QMP socket (a link to the peer) once its signal handling is
        # set: start() waits for the socket, so no signal can come before that.
        argv = child_argv(VM_ID, ignore_term=ignore_term, ready=self.paths.qmp,
                          target=peer.path)
        self.qemu = QemuProcess(argv, self.paths, log=logging.getLogger("test.qemu"),
                                on_exit=self.exits.append)
        self.qemu.on_end(self.ended.set)
        # quit ends the fake QEMU the way QEMU ends: by exiting (here: SIGKILL from us).
        peer.on["quit"] = self.end

    def end(self) -> None:
        if self.qemu.pid is not None and self.qemu.running:
            os.kill(self.qemu.pid, signal.SIGKILL)


@pytest_asyncio.fixture
async def fake(short_tmp: Path, peer: FakeQMP) -> AsyncIterator[Fake]:
    made = Fake(short_tmp, peer)
    try:
        yield made
    finally:
        await made.qemu.kill()  # whatever state the test left it in: gone, and reaped


async def test_start_idle_probe_and_stop_with_quit(fake: Fake, peer: FakeQMP) -> None:
    qemu = fake.qemu
    assert state(qemu) is RunState.NEW
    await qemu.start()
    assert state(qemu) is RunState.SESSION
    assert await qemu.execute("query-status") == {"status": "paused", "running": False}
    await qemu.idle()
    assert state(qemu) is RunState.IDLE
    assert qemu.qmp is None
    assert peer.open_connections == 1  # the status channel only: the session is closed
    assert await qemu.probe_status(1.0) == "paused"
    assert qemu.problem_now() is None
    await qemu.stop()  # IDLE: no session to ask, so SIGTERM
    assert state(qemu) is RunState.EXITED
    assert fake.exits == [-signal.SIGTERM]
    assert fake.ended.is_set()
    assert "quit" not in peer.commands


async def test_stop_in_a_session_asks_quit(fake: Fake, peer: FakeQMP) -> None:
    await fake.qemu.start()
    await fake.qemu.stop()
    assert "quit" in peer.commands
    assert fake.exits == [-signal.SIGKILL]  # how the fake QEMU answers quit
    assert state(fake.qemu) is RunState.EXITED
    await fake.qemu.stop()  # idempotent


async def test_two_stops_at_once_share_one_sequence(fake: Fake, peer: FakeQMP) -> None:
    await fake.qemu.start()
    await asyncio.gather(fake.qemu.stop(), fake.qemu.stop())
    assert peer.commands.count("quit") == 1
    assert fake.exits == [-signal.SIGKILL]
    assert state(fake.qemu) is RunState.EXITED


async def test_execute_in_idle_opens_a_session_again(fake: Fake, peer: FakeQMP) -> None:
    await fake.qemu.start()
    await fake.qemu.idle()
    await fake.qemu.execute("cont")
    assert state(fake.qemu) is RunState.SESSION
    assert peer.commands.count("qmp_capabilities") == 3  # session, channel, session


async def test_release_idle_gives_it_away_and_reclaim_asks_on_one_connection(
        fake: Fake, peer: FakeQMP) -> None:
    qemu = fake.qemu
    await qemu.start()
    await qemu.idle()
    qemu.release_idle()
    assert state(qemu) is RunState.RELEASED
    assert qemu.released
    with pytest.raises(VMDead, match="not running"):
        await qemu.execute("cont")
    with pytest.raises(VMDead, match="is released: only an idle one is probed"):
        await qemu.probe_status(1.0)
    await qemu.stop()  # the receiver's now: never stopped by us
    assert qemu.running
    await peer.closed().wait()  # our channel closed right after the release
    before = peer.connections
    peer.answers["query-status"] = {"status": "running"}
    assert await qemu.reclaim(1.0) == "running"
    assert state(qemu) is RunState.IDLE
    assert peer.connections == before + 1  # reclaimed and asked on the same connection
    assert peer.open_connections == 1  # and that is the status channel it keeps
    assert await qemu.probe_status(1.0) == "running"


async def test_reclaim_of_a_slot_someone_else_holds_stays_released(
        fake: Fake, peer: FakeQMP, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_module, "RECLAIM_CONNECT_TIMEOUT", 0.05)
    qemu = fake.qemu
    await qemu.start()
    await qemu.release()
    assert state(qemu) is RunState.RELEASED
    peer.greet = False  # the receiver holds QEMU's one QMP slot
    with pytest.raises(VMDead, match="query-status"):
        await qemu.reclaim(0.05)
    assert state(qemu) is RunState.RELEASED
    await qemu.kill()  # the caller decides: even a released process goes
    assert state(qemu) is RunState.EXITED
    assert fake.exits == [-signal.SIGKILL]


async def test_an_exit_while_released_is_not_reported(fake: Fake) -> None:
    qemu = fake.qemu
    await qemu.start()
    await qemu.idle()
    qemu.release_idle()
    fake.end()  # the receiver stops it
    await fake.ended.wait()
    assert state(qemu) is RunState.EXITED
    assert fake.exits == []  # not ours any more: nothing to report
    with pytest.raises(VMDead, match="not running"):
        await qemu.reclaim()


async def test_a_probe_that_is_not_answered_is_vmdead(fake: Fake, peer: FakeQMP) -> None:
    await fake.qemu.start()
    await fake.qemu.idle()
    peer.silent.add("query-status")
    probe = asyncio.ensure_future(fake.qemu.probe_status(0.1))
    await peer.arrived("query-status").wait()
    assert fake.qemu.probing is not None  # a hand-off would wait for this verdict
    with pytest.raises(VMDead, match=r"did not answer QMP 'query-status' within 0\.1 s"):
        await probe
    assert fake.qemu.probing is None


async def test_sigstop_is_a_problem_now_and_kill_ends_it(fake: Fake) -> None:
    qemu = fake.qemu
    await qemu.start()
    await qemu.idle()
    assert qemu.pid is not None
    sigstop(qemu.pid)
    assert qemu.problem_now() == "QEMU is stopped by a signal"
    await qemu.kill()
    assert state(qemu) is RunState.EXITED
    assert qemu.problem_now() == "QEMU is not running"
    assert fake.exits == [-signal.SIGKILL]


async def test_a_qemu_ignoring_sigterm_is_killed_after_the_timeout(
        short_tmp: Path, peer: FakeQMP, caplog: pytest.LogCaptureFixture) -> None:
    made = Fake(short_tmp, peer, ignore_term=True)
    try:
        await made.qemu.start()
        await made.qemu.idle()
        await made.qemu.stop(0.1)
    finally:
        await made.qemu.kill()
    assert made.exits == [-signal.SIGKILL]
    assert f"QEMU {made.qemu.pid} ignored SIGTERM for 0.1 s; killing it" in caplog.text


async def test_transitions_outside_the_table_name_both_states(fake: Fake) -> None:
    with pytest.raises(VMStateError, match="QEMU None is new; a release without awaiting "
                                           "needs it to be idle"):
        fake.qemu.release_idle()
    await fake.qemu.start()
    with pytest.raises(VMStateError, match="is session;"):
        fake.qemu.release_idle()
    with pytest.raises(VMStateError, match="is session; going to starting needs it to be new"):
        await fake.qemu.start()


async def test_a_launch_whose_qemu_exits_says_why(short_tmp: Path) -> None:
    paths = VMPaths.for_vm(VM_ID, vm_storage=short_tmp / "vm", state_dir=short_tmp / "state")
    qemu = QemuProcess(["/bin/sh", "-c", "echo no such machine; exit 3"], paths,
                       log=logging.getLogger("test.qemu"))
    with pytest.raises(LaunchError, match="exited during start-up") as failed:
        await qemu.start()
    assert failed.value.returncode == 3
    assert "no such machine" in failed.value.log_tail
    assert state(qemu) is RunState.EXITED
