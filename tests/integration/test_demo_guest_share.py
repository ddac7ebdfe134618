"""The demo guest's `share` command on real QEMU (TCG) and a real virtiofsd: a VM with a
`vhost-user-fs-pci` device (tag kataShared) reads a file the host put in the shared
directory, so a VM's virtio-fs device is shown to work end to end.

QEMU is launched as test_demo_guest.py launches it (paused, QMP and the agent port first),
plus guest memory shared with virtiofsd (a file in /dev/shm, share=on) and the device. Each
test stops what it started by pid: QEMU first (QMP quit, then SIGKILL), which ends
virtiofsd's session so that it exits by itself; then virtiofsd, SIGTERM and SIGKILL if it
has not. Skipped, with the reason, where QEMU 7.2's C virtiofsd or the kernel's virtio-fs
modules are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.demo.kernel import find_kernel, kernel_version, share_modules
from kata_vmcache.errors import DemoGuestError
from kata_vmcache.vm.guest_channel import GuestChannel

from .harness import console_run
from .test_demo_guest import DemoVM, boot_demo_vm, launch_demo_vm, qemu_argv

pytestmark = pytest.mark.qemu

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
TAG = "kataShared"
#: The first `share` loads seven modules and mounts under TCG: well under a second idle.
SHARE_TIMEOUT = 30.0
#: virtiofsd ends its session when QEMU disconnects.
VIRTIOFSD_EXIT_TIMEOUT = 10.0


@pytest.fixture
def guest_modules() -> None:
    """Skips unless the demo guest carries virtio-fs modules (the kernel has them as plain
    .ko files in /lib/modules, as Debian's cloud kernel does)."""
    try:
        kernel = find_kernel()
    except DemoGuestError as exc:
        pytest.skip(str(exc))
    if not share_modules(kernel_version(kernel)):
        pytest.skip(f"the kernel {kernel} has no virtiofs module (plain .ko) in /lib/modules")


@pytest.fixture
def share_dir(guest_modules: None) -> Iterator[Path]:
    """The directory virtiofsd serves; skips unless virtiofsd can run here."""
    if not VIRTIOFSD.exists():
        pytest.skip(f"needs {VIRTIOFSD} (QEMU 7.2's C virtiofsd, from qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("virtiofsd needs root")
    path = Path(tempfile.mkdtemp(prefix="kvc-share-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _children_of(pid: int) -> list[int]:
    """The live children of `pid` (virtiofsd forks once a VM connects: its sandbox)."""
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


async def _stop_virtiofsd(proc: asyncio.subprocess.Process) -> None:
    """Wait for it to end with its VM's session; else SIGTERM, then SIGKILL, by pid (its
    forked child too, which it would otherwise leave to this process, our subreaper)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), VIRTIOFSD_EXIT_TIMEOUT)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        for pid in [*_children_of(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)


@contextlib.asynccontextmanager
async def virtiofsd(source: Path, state: Path) -> AsyncIterator[Path]:
    """A virtiofsd serving `source`; yields its vhost-user socket once it listens."""
    sock = state / "vfs.sock"
    with open(state / "virtiofsd.log", "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={source}",
            "-o", "cache=auto", stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        async with asyncio.timeout(10):
            # It creates the socket just before it listens; wake on its exit, or shortly.
            while not sock.exists():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.01)
                if proc.returncode is not None:
                    log_text = (state / "virtiofsd.log").read_text(errors="replace")
                    raise AssertionError(f"virtiofsd exited ({proc.returncode}): {log_text}")
        yield sock
    finally:
        await _stop_virtiofsd(proc)


@contextlib.asynccontextmanager
async def boot_with_share(guest: DemoGuest, source: Path) -> AsyncIterator[DemoVM]:
    """The demo VM with a virtio-fs device served from `source`, booted to READY."""
    state = Path(tempfile.mkdtemp(prefix="kvc-vfs-"))
    try:
        async with virtiofsd(source, state) as sock:
            argv = [*qemu_argv(guest, state),
                    # vhost-user: virtiofsd maps the guest's RAM, so it must be shared.
                    "-object", "memory-backend-file,id=mem,size=256M,mem-path=/dev/shm,share=on",
                    "-numa", "node,memdev=mem",
                    "-chardev", f"socket,id=vfs,path={sock}",
                    "-device", f"vhost-user-fs-pci,chardev=vfs,tag={TAG}"]
            async with launch_demo_vm(state, argv) as vm:
                yield vm
    finally:
        shutil.rmtree(state, ignore_errors=True)


async def share(vm: DemoVM, name: str, timeout: float = SHARE_TIMEOUT) -> str:
    """The guest's answer to `share NAME` (GuestChannel has no such command): `share LINE`
    or `err REASON`. The command goes on its own connection, after a newline that ends
    any partial line; an `err unknown command` answers that partial line, not us."""
    if vm.channel is not None:
        await vm.channel.close()
        vm.channel = None
    reader, writer = await asyncio.open_unix_connection(str(vm.state / "agent.sock"))
    try:
        writer.write(f"\nshare {name}\n".encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                line = (await reader.readline()).decode(errors="replace")
                if not line:
                    raise ConnectionError("the agent port closed")
                line = line.rstrip("\r\n")
                if line.startswith(("share", "err ")) and line != "err unknown command":
                    return line
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- tests ----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_share_reads_the_hosts_file_through_virtio_fs(
        demo_guest: DemoGuest, share_dir: Path, report: Callable[[str, object], None]) -> None:
    (share_dir / "hello.txt").write_text("hello from the host\nsecond line\n")
    async with boot_with_share(demo_guest, share_dir) as vm:
        start = time.monotonic()
        assert await share(vm, "hello.txt") == "share hello from the host"
        report("first share (modules, mount, read)", f"{time.monotonic() - start:.2f} s")

        # The mount is kept, and it is live: a file the host writes now is seen.
        (share_dir / "later.txt").write_text("written after the mount")
        assert await share(vm, "later.txt") == "share written after the mount"
        assert await share(vm, "hello.txt") == "share hello from the host"
        out = await console_run(vm.state / "console.sock",
                                "echo mounts=$(grep -c ' /mnt/share virtiofs ' /proc/mounts)-ok",
                                "mounts=1-ok", timeout=10)
        assert "mounts=1-ok" in out

        (share_dir / "dir").mkdir()
        assert await share(vm, "missing.txt") == "err no such file: missing.txt"
        assert await share(vm, "dir") == "err not a regular file: dir"
        for bad in ("../hello.txt", "..", ".", "a/b", "", "two words"):
            assert await share(vm, bad) == "err usage: share NAME", bad
        # Every other command is as it was.
        channel = vm.channel = await GuestChannel.connect(vm.state / "agent.sock")
        assert (await channel.info()).cpus == 1


@pytest.mark.asyncio
async def test_share_without_a_device_is_an_error(demo_guest: DemoGuest,
                                                  guest_modules: None) -> None:
    """The modules load, but no device has the tag: the mount fails and says so, each time
    (nothing is left half-mounted)."""
    async with boot_demo_vm(demo_guest) as vm:
        for _ in range(2):
            answer = await share(vm, "hello.txt")
            assert answer.startswith(f"err cannot mount {TAG}: "), answer
        vm.channel = await GuestChannel.connect(vm.state / "agent.sock")
        assert await vm.channel.ping() >= 0
