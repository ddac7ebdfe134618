"""Crash recovery (`daemon.recover`) over a crafted state directory: good records, damaged
ones, stale ones, and pids that are not ours. Where a pid must be alive it is a real child
process of this test standing in for a VM's QEMU (its command line carries the VM's
`sandbox-<id>`, which is all recovery reads of a process) or for its kata-proxy (`-sandbox
<id>`); no QEMU is started, and none is touched."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_vmcache.service.daemon import Recovery, recover
from kata_vmcache.vm.owned import new_vm_id
from kata_vmcache.vm.paths import VMPaths, qemu_name

Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """A child process that runs until stopped (or until this test process goes: it reads
    its stdin to the end), with `args` on its command line; it says when it is up (with
    ignore_term, once SIGTERM is ignored). Killed if need be and reaped at the end."""
    children: list[subprocess.Popen[bytes]] = []

    def start(*args: str, ignore_term: bool = False) -> subprocess.Popen[bytes]:
        code = ("import signal, sys\n"
                + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
                + "print('up', flush=True)\nsys.stdin.read()\n")
        child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                 stdin=subprocess.PIPE)
        children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdout, child.stdin):
            if stream is not None:
                stream.close()


def alive(child: subprocess.Popen[bytes]) -> bool:
    return child.poll() is None


class StateDir:
    """<root>/state (our records) and <root>/vc/vm, <root>/vc/sbs (Kata's directories)."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        self.vm_storage = root / "vc" / "vm"

    def paths(self, vm_id: str) -> VMPaths:
        return VMPaths.for_vm(vm_id, vm_storage=self.vm_storage, state_dir=self.state)

    def vm(self, state: str, pid: int | None, *, proxy_pid: int | None = None,
           vm_id: str | None = None) -> VMPaths:
        """A VM's three directories and its record, as VM.write_record writes it."""
        paths = self.paths(vm_id or new_vm_id())
        for path in (paths.dir, paths.sandbox, paths.own):
            path.mkdir(parents=True)
        (paths.dir / "qmp.sock").write_bytes(b"")
        self.record(paths, {
            "id": paths.own.name, "state": state, "pid": pid, "owner_pid": 1,
            "uuid": "u", "created": 0.0, "vm_dir": str(paths.dir),
            "sandbox_dir": str(paths.sandbox), "proxy_pid": proxy_pid,
            "qmp": str(paths.qmp)})
        return paths

    def record(self, paths: VMPaths, record: object) -> None:
        (paths.own / "vm.json").write_text(json.dumps(record))

    def damaged(self, content: bytes | None) -> VMPaths:
        """A VM directory whose vm.json is `content` (None: no vm.json at all)."""
        paths = self.paths(new_vm_id())
        for path in (paths.dir, paths.own):
            path.mkdir(parents=True)
        if content is not None:
            (paths.own / "vm.json").write_bytes(content)
        return paths


def gone(paths: VMPaths) -> bool:
    return not any(p.exists() for p in (paths.dir, paths.sandbox, paths.own))


def kept(paths: VMPaths) -> bool:
    return paths.dir.exists() and paths.own.exists()


@pytest.fixture
def sd(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path)


async def run_recovery(sd: StateDir, timeout: float = 3.0) -> Recovery:
    found = await recover(sd.state, sd.vm_storage, timeout=timeout)
    for unwatch in found.watches:
        unwatch()
    return found


@pytest.mark.asyncio
async def test_vms_still_owned_are_stopped_with_their_proxies(sd: StateDir,
                                                              spawn: Spawn) -> None:
    ready_id, booting_id = new_vm_id(), new_vm_id()
    ready_qemu = spawn("-name", qemu_name(ready_id))
    proxy = spawn("-sandbox", ready_id)
    booting_qemu = spawn("-name", qemu_name(booting_id))
    ready = sd.vm("ready", ready_qemu.pid, proxy_pid=proxy.pid, vm_id=ready_id)
    # Recorded before its launch (no pid yet): found by its name.
    booting = sd.vm("booting", None, vm_id=booting_id)
    found = await run_recovery(sd)
    assert found.unclaimed == []
    for child in (ready_qemu, proxy, booting_qemu):
        assert child.wait(5) is not None
    assert gone(ready)
    assert gone(booting)


@pytest.mark.asyncio
async def test_a_stop_that_is_ignored_ends_in_sigkill(sd: StateDir, spawn: Spawn) -> None:
    vm_id = new_vm_id()
    stubborn = spawn("-name", qemu_name(vm_id), ignore_term=True)
    paths = sd.vm("ready", stubborn.pid, vm_id=vm_id)
    await run_recovery(sd, timeout=0.2)
    assert stubborn.wait(5) == -9
    assert gone(paths)


@pytest.mark.asyncio
async def test_handed_off_vms_are_left_alone_until_their_qemu_exits(
        sd: StateDir, spawn: Spawn) -> None:
    vm_id = new_vm_id()
    qemu = spawn("-name", qemu_name(vm_id))
    proxy = spawn("-sandbox", vm_id)
    paths = sd.vm("handed_off", qemu.pid, proxy_pid=proxy.pid, vm_id=vm_id)
    exited = sd.vm("handed_off", None)  # its client stopped it while we were down
    found = await recover(sd.state, sd.vm_storage, timeout=3.0)
    try:
        assert alive(qemu)
        assert alive(proxy)  # the client's, with its VM
        assert kept(paths)
        assert gone(exited)
        assert len(found.watches) == 1
        # Its client stops it: then its leftover directories go (the watch's pidfd). Our
        # own pidfd on it becomes readable in the same loop turn as the watch's, so by the
        # time our event is awaited the watch has run.
        loop = asyncio.get_running_loop()
        pidfd = os.pidfd_open(qemu.pid)
        ended = asyncio.Event()
        loop.add_reader(pidfd, ended.set)
        try:
            qemu.terminate()
            await asyncio.wait_for(ended.wait(), 5)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        assert gone(paths)
        qemu.wait()
    finally:
        for unwatch in found.watches:
            unwatch()
    assert alive(proxy)  # recovery never stops a handed-off VM's proxy


@pytest.mark.asyncio
async def test_pids_that_are_not_the_vms_are_never_signalled(sd: StateDir,
                                                             spawn: Spawn) -> None:
    # Recycled pids: the recorded QEMU and proxy exited long ago, and other processes
    # (another VM's QEMU, anything) have their numbers now.
    other = spawn("-name", qemu_name(new_vm_id()))
    stranger = spawn("unrelated")
    ready = sd.vm("ready", other.pid, proxy_pid=stranger.pid)
    handed = sd.vm("handed_off", stranger.pid)
    found = await run_recovery(sd)
    assert alive(other)
    assert alive(stranger)
    assert gone(ready)  # its QEMU is gone: nothing of it is left to keep
    assert gone(handed)
    assert found.watches == []


@pytest.mark.asyncio
async def test_stale_records_of_vms_that_are_gone(sd: StateDir, spawn: Spawn) -> None:
    done = spawn("-name", "x")
    done.kill()
    done.wait()  # reaped: its pid names nobody (or, recycled, somebody else)
    states = ("booting", "ready", "failed", "dead", "handed_off")
    stale = [sd.vm(state, done.pid) for state in states]
    stale.append(sd.vm("ready", None))
    found = await run_recovery(sd)
    assert all(gone(paths) for paths in stale)
    assert (found.unclaimed, found.watches) == ([], [])


@pytest.mark.asyncio
@pytest.mark.parametrize(("content", "problem"), [
    (None, "no vm.json"),
    (b'{"id": "x", "sta', "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"state": "ready", "pid": 1, "owner_pid": 1}', "no 'id'"),
    (b'{"id": "ID", "state": "ready", "pid": "7", "owner_pid": 1}', "'pid' has the wrong type"),
    (b'{"id": "ID", "state": "sleeping", "pid": 7, "owner_pid": 1}', "unknown state"),
])
async def test_a_damaged_record_with_a_running_qemu_is_reported_not_stopped(
        sd: StateDir, spawn: Spawn, content: bytes | None, problem: str) -> None:
    paths = sd.damaged(None)
    vm_id = paths.own.name
    if content is not None:
        (paths.own / "vm.json").write_bytes(content.replace(b"ID", vm_id.encode()))
    qemu = spawn("-name", qemu_name(vm_id))
    found = await run_recovery(sd)
    unclaimed, = found.unclaimed
    assert problem in unclaimed.problem
    assert (unclaimed.pid, unclaimed.path) == (qemu.pid, str(paths.own / "vm.json"))
    assert alive(qemu)
    assert kept(paths)


@pytest.mark.asyncio
async def test_damaged_records_without_a_qemu_are_cleaned_up(sd: StateDir) -> None:
    damaged = [sd.damaged(content) for content in (None, b"", b"\x00garbage", b"{}")]
    # Not ours to judge: a name that is not a VM id, a file where a directory belongs.
    foreign = sd.state / "vms" / "notes"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("x")
    stray = sd.state / "vms" / new_vm_id()
    stray.write_text("a file")
    found = await run_recovery(sd)
    assert all(gone(paths) for paths in damaged)
    assert (foreign / "keep.txt").exists()
    assert stray.exists()
    assert found.unclaimed == []


@pytest.mark.asyncio
async def test_an_empty_or_missing_state_dir_is_nothing_to_do(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    assert await run_recovery(sd) == Recovery()
    (sd.state / "vms").mkdir(parents=True)
    assert await run_recovery(sd) == Recovery()
    assert os.listdir(sd.state / "vms") == []
