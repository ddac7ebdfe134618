"""The pool's unit tests' fakes at the QEMU seam: no VM is booted (tests/integration proves
the same behaviour on real QEMU).

- `FakeProcess` stands in for a VM's `QemuProcess`: it satisfies `vm.process.VMProcess`,
  which mypy checks where `FakeFactory.create` assigns it to `VM.process`. What a test
  does to it beyond that Protocol (`die()`, `paused`, `stopped`, ...) goes through
  `fake(vm)`.
- `FakeFactory` is the `Factory` protocol (factory/__init__.py) over fake processes: boots
  can be held (`gate`), failed (`fail_next`) and counted (`in_flight`, `created`).
- `fake_pool` and `pool_running` run a `VMCache` over them for a block; `until` awaits a
  condition on the pool (never a sleep).

The fixtures made of them (`pool`, ...) are in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from qemu.qmp import QMPClient

from kata_vmcache.errors import LaunchError
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.vm.owned import VM, VMState
from kata_vmcache.vm.priority import Level
from kata_vmcache.vm.spec import VMSpec

SPEC = VMSpec(qemu=Path("/bin/true"), kernel=Path("/k"), initrd=Path("/i"), image=None,
              machine_type="q35", kernel_params=(), vcpus=1, max_vcpus=2, memory_mib=256,
              memory_slots=4, max_memory_mib=1024, accelerator="tcg")


class FakeProcess:
    """A VM's QEMU process that never runs: `start()` gives it a pid, `die()` ends it."""

    # Above any pid_max (2**22): a fake pid never names a real process, whose threads
    # priority.promote() would otherwise touch.
    _next_pid = 5_000_000
    priority: Level = "normal"
    # The pool holds no QMP session (QemuProcess.idle); this fake never has one.
    qmp: QMPClient | None = None
    probing: asyncio.Future[str] | None = None
    returncode: int | None = None

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.argv: list[str] = []
        self.pid: int | None = None
        self.running = False
        self.released = False
        self.stopped = False
        self.killed = False
        self.paused = True
        self.end_callbacks: list[Callable[[], None]] = []

    async def start(self) -> None:
        FakeProcess._next_pid += 1
        self.pid = FakeProcess._next_pid
        self.running = True

    async def execute(self, command: str, arguments: object = None,
                      timeout: float = 5.0) -> object:
        assert self.running
        assert not self.released
        if command == "query-status":
            return {"status": "paused" if self.paused else "running"}
        return {}

    async def release(self) -> None:
        self.released = True

    async def idle(self) -> None:
        pass

    def release_idle(self) -> None:
        self.released = True

    def problem_now(self) -> str | None:
        return None if self.running else "QEMU is not running"

    def exited_now(self) -> bool:
        return not self.running

    async def probe_status(self, timeout: float) -> str:
        assert self.running
        assert not self.released
        return "paused" if self.paused else "running"

    async def stop(self, timeout: float = 3.0) -> None:
        self.stopped = True
        self.running = False

    async def kill(self) -> None:
        self.killed = True
        self.running = False

    async def reclaim(self, timeout: float = 1.0) -> str:
        assert self.running
        self.released = False
        return "paused" if self.paused else "running"

    async def wait(self, timeout: float | None = None) -> int | None:
        """Never blocks: no test waits for a fake QEMU's exit."""
        return self.returncode

    def on_end(self, callback: Callable[[], None]) -> None:
        self.end_callbacks.append(callback)

    def log_tail(self) -> str:
        return ""

    def die(self) -> None:
        self.running = False
        self.vm._qemu_exited(-9)


def fake(vm: VM) -> FakeProcess:
    """The fake behind a VM of a FakeFactory, for what the VMProcess Protocol does not say."""
    process = vm.process
    assert isinstance(process, FakeProcess), process
    return process


LOG = logging.getLogger("fakes")


class FakeFactory:
    """The Factory protocol (factory/__init__.py) over fake QEMU processes."""

    spec = SPEC
    accelerator = "tcg"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gate: asyncio.Event | None = None  # when set, boots wait for it
        self.fail_next = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.created: list[VM] = []

    def use_accelerator(self, accelerator: str) -> None:
        pass

    def template_bytes(self) -> int:
        return 0

    def status_metadata(self) -> list[tuple[str, str]]:
        return []

    async def close(self) -> None:
        pass

    def create(self) -> VM:
        vm = VM(self.spec, state_dir=self.tmp, vm_storage=self.tmp / "vm", log=LOG)
        vm.process = FakeProcess(vm)
        self.created.append(vm)
        return vm

    async def boot(self, vm: VM) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await vm.process.start()
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
            if self.fail_next:
                self.fail_next -= 1
                vm.transition(VMState.FAILED, "boom")
                raise LaunchError("guest exploded")
            vm.boot_seconds = 0.01
            vm.prepare_handoff()
            vm.transition(VMState.READY)
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def pool_running(cache: VMCache) -> AsyncIterator[VMCache]:
    """The pool's run() for the block; afterwards it is cancelled and the cache closed.
    run() must end by that cancellation (or by the cache's close): an error of its own
    fails the test."""
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        task.cancel()
        await asyncio.wait([task])
        await cache.close()
    if not task.cancelled():
        task.result()


@contextlib.asynccontextmanager
async def fake_pool(directory: Path, target: int) -> AsyncIterator[tuple[VMCache, FakeFactory]]:
    """A running pool of `target` fake VMs (pool_running)."""
    factory = FakeFactory(directory)
    async with pool_running(VMCache(factory, target, parallelism=2)) as cache:
        yield cache, factory


async def until(cache: VMCache, predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait until `predicate()` holds, looking again at each change of the pool."""
    async def loop() -> None:
        while not predicate():
            await cache.wait_changed()
    await asyncio.wait_for(loop(), timeout)
