"""qmp.py on its own: the StatusChannel, the bounded session helpers and the stop sequence,
against a fake QMP peer on a real Unix socket and real child processes with real signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vmcache.errors import VMDead
from kata_vmcache.vm.qmp import (
    Pidfd,
    StatusChannel,
    ask_quit,
    disconnect,
    kill_process,
    open_session,
    query_status,
    stop_process,
)

from .qmp_peer import FakeQMP, child_argv, sigstop

pytestmark = pytest.mark.asyncio


@pytest.fixture
def spawn() -> Iterator[Spawner]:
    spawner = Spawner()
    yield spawner
    spawner.cleanup()


class Spawner:
    """Fake QEMUs (qmp_peer.child_argv) that are ready when returned; killed at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, vm_id: str = "aaaaaaaaaaaa", *,
                 ignore_term: bool = False) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(child_argv(vm_id, ignore_term=ignore_term),
                                stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None
        # Blocks until the child has set up its signal handling (milliseconds).
        assert proc.stdout.readline() == b"ready\n", f"fake QEMU exited ({proc.wait()})"
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# --- StatusChannel and query_status ----------------------------------------------------


async def test_status_channel_asks_query_status_and_skips_events(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        channel = await StatusChannel.open(peer.path, 1.0, pid=1)
        try:
            assert await channel.status(1.0) == "paused"
            # An event that arrives before the answer is not the answer.
            peer.hold["query-status"] = gate = asyncio.Event()
            status = asyncio.ensure_future(channel.status(5.0))
            await peer.arrived("query-status").wait()
            await peer.event("STOP")
            peer.answers["query-status"] = {"status": "running"}
            gate.set()
            assert await status == "running"
        finally:
            channel.close()
        assert peer.commands == ["qmp_capabilities", "query-status", "query-status"]


@pytest.mark.parametrize(("script", "message"), [
    ("silent", "did not answer QMP 'query-status' within 0.1 s"),
    ("hang_up", "QEMU closed the connection"),
])
async def test_status_channel_names_why_a_check_failed(short_tmp: Path, script: str,
                                                       message: str) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        getattr(peer, script).add("query-status")
        channel = await StatusChannel.open(peer.path, 1.0, pid=1234)
        try:
            with pytest.raises(VMDead, match="QEMU 1234") as failed:
                await channel.status(0.1)
            assert message in str(failed.value)
        finally:
            channel.close()


async def test_query_status_on_a_slot_someone_else_holds_is_vmdead(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        peer.greet = False
        with pytest.raises(VMDead, match=r"did not answer QMP 'query-status' within 0\.3 s"):
            await query_status(peer.path, 0.2, pid=7, connect_timeout=0.1)


async def test_query_status_keeps_the_channel_it_asked_on(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        status, channel = await query_status(peer.path, 1.0, pid=7, keep=True)
        assert status == "paused"
        assert channel is not None
        try:
            assert await channel.status(1.0) == "paused"
        finally:
            channel.close()
        assert peer.connections == 1
        status, channel = await query_status(peer.path, 1.0, pid=7)
        assert (status, channel) == ("paused", None)
        await peer.closed().wait()  # not kept: closed by query_status


async def test_query_status_without_a_socket_is_vmdead(short_tmp: Path) -> None:
    with pytest.raises(VMDead, match="QMP query-status failed"):
        await query_status(short_tmp / "nothing.sock", 1.0, pid=7)


# --- sessions --------------------------------------------------------------------------


async def test_open_session_is_bounded_when_the_slot_never_greets(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        peer.greet = False
        with pytest.raises(TimeoutError):
            await open_session(peer.path, "test", 0.1)
        await peer.closed().wait()  # the half-open client was closed, not leaked


async def test_open_session_and_disconnect(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        client = await open_session(peer.path, "test", 1.0)
        assert await client.execute("query-status") == {"status": "paused", "running": False}
        await disconnect(client)
        await peer.closed().wait()
        await disconnect(client)  # twice: still no error


async def test_ask_quit_on_a_path_opens_and_closes_its_own_session(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        assert await ask_quit(peer.path, 1.0)
        assert peer.commands == ["qmp_capabilities", "quit"]
        await peer.closed().wait()


async def test_ask_quit_says_no_when_quit_is_not_answered(short_tmp: Path) -> None:
    async with FakeQMP(short_tmp / "qmp.sock") as peer:
        peer.silent.add("quit")
        client = await open_session(peer.path, "test", 1.0)
        try:
            assert not await ask_quit(client, 0.1)
        finally:
            await disconnect(client)
    assert not await ask_quit(short_tmp / "gone.sock", 1.0)


# --- Pidfd and the stop sequence --------------------------------------------------------


async def test_of_pid_refuses_a_process_that_is_not_the_one_meant(spawn: Spawner) -> None:
    proc = spawn()
    assert Pidfd.of_pid(proc.pid, check=lambda pid: False) is None
    assert proc.poll() is None  # untouched
    watch = Pidfd.of_pid(proc.pid, check=lambda pid: pid == proc.pid)
    assert watch is not None
    watch.close()
    proc.kill()
    proc.wait()
    assert Pidfd.of_pid(proc.pid, check=lambda pid: True) is None  # gone


async def test_stop_without_quit_is_sigterm(spawn: Spawner,
                                            caplog: pytest.LogCaptureFixture) -> None:
    child = spawn()
    proc = Pidfd.of_child(child)
    try:
        assert await stop_process(proc, 5.0, log=logging.getLogger("t"))
    finally:
        proc.close()
    assert child.returncode == -signal.SIGTERM
    assert "killing" not in caplog.text


async def test_stop_escalates_to_sigkill_and_says_what_was_ignored(
        spawn: Spawner, caplog: pytest.LogCaptureFixture) -> None:
    child = spawn(ignore_term=True)
    proc = Pidfd.of_child(child)
    asked: list[float] = []

    async def quit(seconds: float) -> bool:
        asked.append(seconds)
        return True  # accepted, but the process does not go

    try:
        assert await stop_process(proc, 0.1, quit=quit, log=logging.getLogger("t"))
    finally:
        proc.close()
    assert asked == [0.1]  # quit is given at most the stop's timeout
    assert child.returncode == -signal.SIGKILL
    assert f"QEMU {child.pid} ignored quit for 0.1 s; killing it" in caplog.text


async def test_a_quit_that_fails_falls_back_to_sigterm(spawn: Spawner) -> None:
    child = spawn()
    proc = Pidfd.of_child(child)

    async def quit(seconds: float) -> bool:
        return False

    try:
        assert await stop_process(proc, 5.0, quit=quit)
    finally:
        proc.close()
    assert child.returncode == -signal.SIGTERM


@pytest.mark.parametrize(("wake", "timeout", "ended_by"), [
    # wake gets it to handle SIGTERM; a timeout the test would notice: without SIGCONT
    # this ends with SIGKILL.
    (True, 60.0, signal.SIGTERM),
    (False, 0.1, signal.SIGKILL),  # without wake it needs SIGKILL
], ids=["wake", "no-wake"])
async def test_a_sigstopped_process(spawn: Spawner, wake: bool, timeout: float,
                                    ended_by: signal.Signals) -> None:
    child = spawn()
    sigstop(child.pid)
    proc = Pidfd.of_child(child)
    try:
        assert await stop_process(proc, timeout, wake=wake)
    finally:
        proc.close()
    assert child.returncode == -ended_by


async def test_a_watched_process_that_is_not_our_child(spawn: Spawner) -> None:
    """The client's view of a QEMU: not its child, so its exit is the pidfd's alone."""
    child = spawn("bbbbbbbbbbbb", ignore_term=True)
    ended = asyncio.Event()
    proc = Pidfd.of_pid(child.pid, check=lambda pid: True, on_exit=ended.set)
    assert proc is not None
    try:
        assert proc.running
        assert await kill_process(proc)
        assert ended.is_set()
        assert not proc.running
        proc.signal(signal.SIGTERM)  # exited: nothing is sent, nothing raised
    finally:
        proc.close()
    assert child.wait() == -signal.SIGKILL
