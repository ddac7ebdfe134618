"""The client's handed-out VM (handle.VMHandle) against a fake QMP peer on a real Unix socket,
with a real process as its QEMU (named as the VM's QEMU is, and not the handle's child, as
a handed-out QEMU is not): adoption, commands that fail each their own way, the stop
sequence, detach."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache.client.handle import VMHandle
from kata_vmcache.client.rpc import BaseVM
from kata_vmcache.errors import VMDead, VMStateError

from .qmp_peer import FakeQMP, child_argv

pytestmark = pytest.mark.asyncio
VM_ID = "dddddddddddd"


class QEMU:
    """A fake QEMU process for VM VM_ID (killed and reaped at the end of the test)."""

    def __init__(self, *, ignore_term: bool = False, vm_id: str = VM_ID) -> None:
        self.proc = subprocess.Popen(child_argv(vm_id, ignore_term=ignore_term),
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"  # its signal handling is set

    @property
    def pid(self) -> int:
        return self.proc.pid

    def end(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def exit_signal(self) -> int:
        return -self.proc.wait()

    def close(self) -> None:
        self.end()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def qemus() -> Iterator[list[QEMU]]:
    made: list[QEMU] = []
    yield made
    for qemu in made:
        qemu.close()


def record(tmp: Path, qmp: Path, pid: int) -> dict[str, Any]:
    for name in ("vm", "sandbox", "state"):
        (tmp / name).mkdir(exist_ok=True)
    return {"ID": VM_ID, "QmpChannelpath": str(qmp), "Pid": pid,
            "QemuSMP": {"MaxCPUs": 2}, "VMDir": str(tmp / "vm"),
            "SandboxDir": str(tmp / "sandbox"), "StateDir": str(tmp / "state")}


def adopt(tmp: Path, qmp: Path, qemu: QEMU) -> VMHandle:
    return VMHandle.adopt(BaseVM(VM_ID, 1, 256, 0, record(tmp, qmp, qemu.pid)))


async def test_stop_asks_quit_then_removes_the_vms_directories(
        short_tmp: Path, peer: FakeQMP, qemus: list[QEMU]) -> None:
    qemus.append(qemu := QEMU())
    peer.on["quit"] = qemu.end
    async with adopt(short_tmp, peer.path, qemu) as vm:
        assert vm.running
        await vm.resume()
    assert peer.commands == ["qmp_capabilities", "cont", "quit"]
    assert qemu.exit_signal() == signal.SIGKILL  # how the fake answers quit
    assert not vm.running
    assert not (short_tmp / "state").exists()
    assert not (short_tmp / "vm").exists()


async def test_adopting_a_pid_that_is_not_the_vms_qemu(short_tmp: Path, peer: FakeQMP,
                                                       qemus: list[QEMU]) -> None:
    qemus.append(other := QEMU(vm_id="eeeeeeeeeeee"))
    with pytest.raises(VMDead, match=f"its QEMU \\(pid {other.pid}\\) is gone"):
        adopt(short_tmp, peer.path, other)
    assert other.proc.poll() is None  # never signalled: not proven to be that VM's
    assert not (short_tmp / "state").exists()


async def test_stop_when_another_client_holds_qmp_is_sigterm(
        short_tmp: Path, peer: FakeQMP, qemus: list[QEMU],
        caplog: pytest.LogCaptureFixture) -> None:
    qemus.append(qemu := QEMU())
    peer.greet = False
    vm = adopt(short_tmp, peer.path, qemu)
    await vm.stop(0.2)  # quit gets 0.2 s to be answered, then SIGTERM
    assert qemu.exit_signal() == signal.SIGTERM
    assert "killing" not in caplog.text


async def test_stop_kills_a_qemu_that_ignores_sigterm(
        short_tmp: Path, qemus: list[QEMU], caplog: pytest.LogCaptureFixture) -> None:
    qemus.append(qemu := QEMU(ignore_term=True))
    vm = adopt(short_tmp, short_tmp / "no-qmp.sock", qemu)
    await vm.stop(0.1)
    assert qemu.exit_signal() == signal.SIGKILL
    assert f"QEMU {qemu.pid} ignored SIGTERM for 0.1 s; killing it" in caplog.text


# The hang-up ends its command at once: its timeout only has to outlast a loaded host's
# round trip (0.1 s did not, twice, on this 2-core machine under load).
@pytest.mark.parametrize(("script", "timeout", "message"), [
    ("silent", 0.1, "no answer to QMP 'query-status' within 0.1 s"),
    ("hang_up", 10.0, "QMP closed during 'query-status'"),
])
async def test_a_command_fails_naming_its_cause(short_tmp: Path, peer: FakeQMP,
                                                qemus: list[QEMU], script: str,
                                                timeout: float, message: str) -> None:
    qemus.append(qemu := QEMU())
    getattr(peer, script).add("query-status")
    vm = adopt(short_tmp, peer.path, qemu)
    try:
        with pytest.raises(VMDead, match=VM_ID) as failed:
            await vm.execute("query-status", timeout=timeout)
        assert message in str(failed.value)
        assert qemu.proc.poll() is None  # a failed command stops nothing
    finally:
        await vm.detach()


async def test_qemu_exiting_during_a_command_is_said_at_once(
        short_tmp: Path, peer: FakeQMP, qemus: list[QEMU]) -> None:
    qemus.append(qemu := QEMU())
    peer.hold["query-status"] = asyncio.Event()  # never set: only the exit can end it
    vm = adopt(short_tmp, peer.path, qemu)
    command = asyncio.ensure_future(vm.execute("query-status", timeout=60))
    await peer.arrived("query-status").wait()
    await peer.event("SHUTDOWN", {"guest": False, "reason": "host-signal"})
    qemu.end()
    with pytest.raises(VMDead, match=f"QEMU {qemu.pid} exited during QMP 'query-status'"):
        await command
    assert not vm.running
    await vm.stop()  # nothing left to stop: the directories go
    assert not (short_tmp / "state").exists()


async def test_detach_leaves_it_running_and_stop_takes_it_again(
        short_tmp: Path, peer: FakeQMP, qemus: list[QEMU]) -> None:
    qemus.append(qemu := QEMU())
    peer.on["quit"] = qemu.end
    vm = adopt(short_tmp, peer.path, qemu)
    await vm.connect()
    await vm.detach()
    await peer.closed().wait()  # QEMU's one QMP slot is free for whoever comes next
    assert qemu.proc.poll() is None
    with pytest.raises(VMStateError, match="detached"):
        await vm.execute("cont")
    await vm.stop()
    assert qemu.exit_signal() == signal.SIGKILL  # quit, as the fake answers it
