"""The bundled demo guest on real QEMU (TCG), launched exactly as the daemon launches it:
CPUs stopped (-S), QMP and the agent port connected first, then `cont`, so the ready line
cannot be lost. Every test stops its QEMU (QMP quit, bounded wait, then SIGKILL by pid) and
removes its state directory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from qemu.qmp import ConnectError, QMPClient

from kata_vmcache.demo.config import KERNEL_PARAMS
from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.vm.guest_channel import GuestChannel, GuestInfo

from .harness import console_run

pytestmark = pytest.mark.qemu

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

# A cold boot takes about 2 s on an idle machine; leave room for a loaded CI host.
BOOT_TIMEOUT = 60.0
QMP_TIMEOUT = 10.0
MIB = 1024


def qemu_argv(guest: DemoGuest, state: Path, machine: str = "q35") -> list[str]:
    """The daemon's command line for the demo guest."""
    return [
        "qemu-system-x86_64", "-name", "demo", "-machine", f"{machine},accel=tcg",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-m", "256M,slots=4,maxmem=1280M",
        "-smp", "1,cores=1,threads=1,sockets=4,maxcpus=4",
        "-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", KERNEL_PARAMS,
        "-chardev", f"socket,id=console,path={state}/console.sock,server=on,wait=off",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=agent,path={state}/agent.sock,server=on,wait=off",
        "-serial", "chardev:agent",
        "-qmp", f"unix:{state}/qmp.sock,server=on,wait=off",
        "-S",
    ]


@dataclass
class DemoVM:
    state: Path
    proc: asyncio.subprocess.Process
    qmp: QMPClient | None = None
    channel: GuestChannel | None = None
    ready_seconds: float = 0.0
    extra_channels: list[GuestChannel] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return (self.state / "qemu.log").read_text(errors="replace")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None
        return await asyncio.wait_for(self.qmp.execute(command, arguments), QMP_TIMEOUT)

    async def connect_qmp(self) -> QMPClient:
        """A fresh QMP connection (QEMU serves one at a time: drop ours first)."""
        path = self.state / "qmp.sock"
        async with asyncio.timeout(QMP_TIMEOUT):
            # QEMU creates the socket a few ms after exec; wake on its exit, or shortly.
            while not path.exists():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.01)
                if self.proc.returncode is not None:
                    raise AssertionError(f"QEMU exited ({self.proc.returncode}): {self.log()}")
            client = QMPClient("demo-test")
            while True:
                try:
                    await client.connect(str(path))
                    break
                except ConnectError:
                    # The socket is bound a moment before QEMU listens on it.
                    await asyncio.sleep(0.01)
        self.qmp = client
        return client

    async def disconnect_qmp(self) -> None:
        if self.qmp is not None:
            client, self.qmp = self.qmp, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)

    async def stop(self) -> None:
        """QMP quit, a bounded wait, then SIGKILL by pid; always reaped."""
        for ch in [self.channel, *self.extra_channels]:
            if ch is not None:
                await ch.close()
        if self.proc.returncode is None:
            if self.qmp is None:
                with contextlib.suppress(Exception):
                    await self.connect_qmp()
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.qmp.execute("quit"), 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 10)
        await self.disconnect_qmp()


@contextlib.asynccontextmanager
async def boot_demo_vm(guest: DemoGuest, machine: str = "q35") -> AsyncIterator[DemoVM]:
    """Launch paused, connect QMP and the agent port, `cont`, wait for READY."""
    state = Path(tempfile.mkdtemp(prefix="kvc-demo-"))
    try:
        async with launch_demo_vm(state, qemu_argv(guest, state, machine)) as vm:
            yield vm
    finally:
        shutil.rmtree(state, ignore_errors=True)


@contextlib.asynccontextmanager
async def launch_demo_vm(state: Path, argv: list[str]) -> AsyncIterator[DemoVM]:
    """QEMU on `argv` (qemu_argv's, plus any devices), booted to READY, stopped after."""
    with open(state / "qemu.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    vm = DemoVM(state, proc)
    try:
        await vm.connect_qmp()
        vm.channel = await GuestChannel.connect(state / "agent.sock")
        start = time.monotonic()
        await vm.execute("cont")
        await vm.channel.wait_ready(BOOT_TIMEOUT)
        vm.ready_seconds = time.monotonic() - start
        yield vm
    finally:
        await vm.stop()


@pytest_asyncio.fixture
async def vm(demo_guest: DemoGuest) -> AsyncIterator[DemoVM]:
    async with boot_demo_vm(demo_guest) as booted:
        yield booted


# --- tests ----------------------------------------------------------------------------------

@pytest.mark.asyncio
@pytest.mark.parametrize("machine", ["q35", "pc"])
async def test_guest_boots_to_ready_and_answers_ping(demo_guest: DemoGuest,
                                                    machine: str) -> None:
    async with boot_demo_vm(demo_guest, machine) as vm:
        assert vm.channel is not None
        rtt = await vm.channel.ping(guest_sleep_ms=200)
        # The guest sleeps 0.2 s of its own time before answering: at least that passes here.
        assert 0.2 <= rtt < 5
        print(f"{machine}: ready after {vm.ready_seconds:.2f} s, ping {rtt * 1000:.0f} ms")


@pytest.mark.asyncio
async def test_paused_guest_is_silent_and_resumes_from_a_new_qmp_connection(vm: DemoVM) -> None:
    assert vm.channel is not None
    await vm.execute("stop")
    assert (await vm.execute("query-status"))["status"] == "paused"
    # A paused guest's clock is frozen: its 0.2 s sleep never ends.
    with pytest.raises(TimeoutError):
        await vm.channel.ping(timeout=1.0)
    # The hand-off: our QMP session goes, another process's comes and resumes the VM.
    await vm.disconnect_qmp()
    await vm.connect_qmp()
    await vm.execute("cont")
    # The pong of the timed-out ping arrives first and is skipped (wrong token).
    assert await vm.channel.ping(guest_sleep_ms=200) >= 0.2
    assert (await vm.execute("query-status"))["status"] == "running"


@pytest.mark.asyncio
async def test_agent_survives_its_host_reconnecting(vm: DemoVM) -> None:
    assert vm.channel is not None
    await vm.channel.close()
    for _ in range(2):
        async with await GuestChannel.connect(vm.state / "agent.sock") as channel:
            await channel.ping()
    vm.channel = await GuestChannel.connect(vm.state / "agent.sock")
    assert (await vm.channel.info()).cpus == 1


@pytest.mark.asyncio
async def test_agent_answers_without_echo_and_rejects_unknown_commands(vm: DemoVM) -> None:
    assert vm.channel is not None
    await vm.channel.close()
    vm.channel = None
    reader, writer = await asyncio.open_unix_connection(str(vm.state / "agent.sock"))
    try:
        # A partial line left by a previous host, then ours (tolerating CR LF).
        writer.write(b"garbage from a previous ho")
        writer.write(b"\r\nbogus command\r\ninfo\n")
        await writer.drain()
        async with asyncio.timeout(10):
            lines = [(await reader.readline()).decode() for _ in range(3)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert lines[:2] == ["err unknown command\n", "err unknown command\n"]
    assert GuestInfo.parse(lines[2]) is not None, lines[2]


@pytest.mark.asyncio
async def test_console_is_a_root_shell(vm: DemoVM) -> None:
    # The shell echoes the typed line; only the output has the computed value.
    out = await console_run(vm.state / "console.sock", "echo console-$((6 * 7)) $(id -u)",
                            "console-42 0", timeout=10)
    assert "echo console-$((6 * 7))" in out


@pytest.mark.asyncio
async def test_time_and_seed(vm: DemoVM) -> None:
    assert vm.channel is not None
    await vm.channel.set_time(1_700_000_000)
    out = await console_run(vm.state / "console.sock",
                            'echo "clock=$(date +%s) done-$((40 + 2))"', "done-42", timeout=10)
    match = re.search(r"clock=(\d+) done-42", out)
    assert match, out
    seconds = int(match.group(1))
    assert 1_700_000_000 <= seconds < 1_700_000_000 + 60
    await vm.channel.set_time()
    await vm.channel.seed(os.urandom(64))


@pytest.mark.asyncio
async def test_hot_added_cpu_and_memory_are_onlined(vm: DemoVM) -> None:
    assert vm.channel is not None
    before = await vm.channel.info()
    assert before.cpus == 1
    nothing_to_do = await vm.channel.online()
    assert (nothing_to_do.cpus, nothing_to_do.mem_kib) == (1, before.mem_kib)

    assert vm.qmp is not None
    cpus = await vm.execute("query-hotpluggable-cpus")
    free = sorted((c for c in cpus if "qom-path" not in c),
                  key=lambda c: c["props"].get("socket-id", 0))
    assert len(free) == 3
    plugged = {"cpu1", "dimm1"}
    done: dict[str, int] = {}
    with vm.qmp.listener(("ACPI_DEVICE_OST",)) as events:
        await vm.execute("device_add", {"driver": free[0]["type"], "id": "cpu1",
                                        **free[0]["props"]})
        await vm.execute("object-add", {"qom-type": "memory-backend-ram", "id": "mem1",
                                        "size": 256 * MIB * MIB})
        await vm.execute("device_add", {"driver": "pc-dimm", "id": "dimm1", "memdev": "mem1"})
        # The guest acknowledges each hot-plug (ACPI _OST) once it has added the device.
        async with asyncio.timeout(30):
            async for event in events:
                data: Any = event["data"]
                info = data["info"]
                if info.get("device") in plugged:
                    done[info["device"]] = info["status"]
                if set(done) == plugged:
                    break
    assert done == {"cpu1": 0, "dimm1": 0}

    after = await vm.channel.online()
    assert after.cpus == 2
    assert after.mem_kib >= before.mem_kib + 200 * MIB
    assert await vm.channel.ping(guest_sleep_ms=200) >= 0.2
    # Idempotent: nothing is left offline.
    assert (await vm.channel.online()).cpus == 2


@pytest.mark.asyncio
async def test_ping_sleep_is_guest_time(vm: DemoVM) -> None:
    """The probe's sleep is the guest's own: a longer one takes longer, a bad one is refused."""
    assert vm.channel is not None
    short = await vm.channel.ping(guest_sleep_ms=1)
    long = await vm.channel.ping(guest_sleep_ms=500)
    assert long >= 0.5
    assert long > short
    with pytest.raises(ValueError, match="guest_sleep_ms"):
        await vm.channel.ping(guest_sleep_ms=0)
