"""Pool logic of VMCache, with a fake QEMU process at the seam (no VMs are booted here:
tests/integration proves the same behaviour on real QEMU)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from servicer_fakes import Aborted, hand_off

from kata_vmcache.errors import CacheClosed, LaunchError
from kata_vmcache.pool import filling
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.vm.owned import VM, VMState
from kata_vmcache.vm.spec import VMSpec

SPEC = VMSpec(qemu=Path("/bin/true"), kernel=Path("/k"), initrd=Path("/i"), image=None,
              machine_type="q35", kernel_params=(), vcpus=1, max_vcpus=2, memory_mib=256,
              memory_slots=4, max_memory_mib=1024, accelerator="tcg")


class FakeProcess:
    # Above any pid_max (2**22): a fake pid never names a real process, whose threads
    # priority.promote() would otherwise touch.
    _next_pid = 5_000_000
    priority = "normal"

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.pid: int | None = None
        self.running = False
        self.released = False
        self.stopped = False
        self.killed = False
        self.paused = True

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

    # The pool holds no QMP session (QemuProcess.idle); this fake never has one.
    qmp = None
    probing = None

    async def idle(self) -> None:
        pass

    def release_idle(self) -> None:
        self.released = True

    def problem_now(self) -> str | None:
        return None if self.running else "QEMU is not running"

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

    def die(self) -> None:
        self.running = False
        self.vm._qemu_exited(-9)


LOG = logging.getLogger("test_cache")


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
        vm.process = FakeProcess(vm)  # type: ignore[assignment]
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
    """The pool's run() for the block; afterwards it is cancelled and the cache closed."""
    task = asyncio.create_task(cache.run())
    try:
        yield cache
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cache.close()


@contextlib.asynccontextmanager
async def fake_pool(directory: Path, target: int) -> AsyncIterator[tuple[VMCache, FakeFactory]]:
    """A running pool of `target` fake VMs; run() must end by its cancellation."""
    factory = FakeFactory(directory)
    cache = VMCache(factory, target, parallelism=2)
    task = asyncio.create_task(cache.run())
    yield cache, factory
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await cache.close()


@pytest_asyncio.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[VMCache, FakeFactory]]:
    async with fake_pool(tmp_path, 3) as pool:
        yield pool


async def until(cache: VMCache, predicate: object, timeout: float = 5.0) -> None:
    async def loop() -> None:
        while not predicate():  # type: ignore[operator]
            await cache.wait_changed()
    await asyncio.wait_for(loop(), timeout)


@pytest.mark.asyncio
async def test_fills_to_target_with_bounded_parallelism(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, factory = pool
    await until(cache, lambda: cache.ready_count == 3)
    assert factory.max_in_flight <= 2
    assert len(factory.created) == 3
    assert all(vm.state is VMState.READY for vm in cache.owned())


@pytest.mark.asyncio
async def test_each_vm_handed_out_once_and_refilled(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, _factory = pool
    await until(cache, lambda: cache.ready_count == 3)
    taken = [await hand_off(cache) for _ in range(5)]
    assert len({vm.id for vm in taken}) == 5
    for vm in taken:
        assert vm.state is VMState.HANDED_OFF
        assert vm.history == [VMState.BOOTING, VMState.READY, VMState.HANDED_OFF]
        assert vm.process.released  # type: ignore[attr-defined]
    await until(cache, lambda: cache.ready_count == 3)
    assert cache.stats.handed_out == 5
    assert not any(vm in cache.owned() for vm in taken)


@pytest.mark.asyncio
async def test_waiters_are_served_in_order_by_refills(tmp_path: Path) -> None:
    factory = FakeFactory(tmp_path)
    factory.gate = asyncio.Event()
    cache = VMCache(factory, 1, parallelism=1)
    async with pool_running(cache):
        waiters = [asyncio.create_task(hand_off(cache)) for _ in range(3)]
        await until(cache, lambda: cache.waiting_clients == 3)
        factory.gate.set()
        vms = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert len({vm.id for vm in vms}) == 3


@pytest.mark.asyncio
async def test_cancelled_waiter_loses_no_vm(tmp_path: Path) -> None:
    factory = FakeFactory(tmp_path)
    factory.gate = asyncio.Event()
    cache = VMCache(factory, 1, parallelism=1)
    async with pool_running(cache):
        impatient = asyncio.create_task(hand_off(cache))
        await until(cache, lambda: cache.waiting_clients == 1)
        impatient.cancel()
        with pytest.raises(asyncio.CancelledError):
            await impatient
        factory.gate.set()
        await until(cache, lambda: cache.ready_count == 1)
        assert cache.waiting_clients == 0
        vm = await hand_off(cache)
        assert vm.state is VMState.HANDED_OFF


@pytest.mark.asyncio
async def test_boot_failures_back_off_then_recover(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filling, "BACKOFF_START", 0.01)
    factory = FakeFactory(tmp_path)
    factory.fail_next = 3
    cache = VMCache(factory, 2, parallelism=1)
    async with pool_running(cache):
        await until(cache, lambda: cache.ready_count == 2)
        assert cache.stats.boot_failures == 3
        assert cache.stats.last_error == ""
        failed = [vm for vm in factory.created if vm.state is VMState.FAILED]
        assert len(failed) == 3


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    cache = VMCache(FakeFactory(tmp_path), 1, parallelism=1)
    delays = []
    for _ in range(10):
        cache.filler.boot_failed("same reason")
        delays.append(round(cache.filler.not_before - time.monotonic()))
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]
    assert cache.stats.boot_failures == 10
    assert cache.stats.last_error == "same reason"


@pytest.mark.asyncio
async def test_dead_vm_leaves_pool_and_is_replaced(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, factory = pool
    await until(cache, lambda: cache.ready_count == 3)
    victim = cache.owned()[0]
    victim.process.die()  # type: ignore[attr-defined]
    assert victim not in cache.owned()
    assert victim.state is VMState.DEAD
    await until(cache, lambda: cache.ready_count == 3)
    assert len(factory.created) == 4
    assert cache.stats.died_in_pool == 1


@pytest.mark.asyncio
async def test_running_vm_leaves_the_pool_at_the_next_check(
        pool: tuple[VMCache, FakeFactory]) -> None:
    # The hand-off itself does not ask QMP (that is the hot path); the supervisor asks every
    # pooled VM every SUPERVISE_INTERVAL, and one that is not paused is killed and replaced.
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 3)
    bad = cache.owned()[0]
    bad.process.paused = False  # type: ignore[attr-defined]
    await until(cache, lambda: bad.process.killed)  # type: ignore[attr-defined]
    assert bad not in cache.owned()
    assert cache.stats.discarded == 1
    got = await hand_off(cache)
    assert got is not bad


@pytest.mark.asyncio
async def test_vm_being_probed_is_handed_out_after_its_probe(
        pool: tuple[VMCache, FakeFactory]) -> None:
    # A supervisor probe holds QEMU's one QMP slot: the hand-off waits for it, and a VM the
    # probe finds not paused is discarded, not handed out.
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 3)
    first = cache.owned()[0]
    probe: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    first.process.probing = probe  # type: ignore[attr-defined]
    assert cache.reserve_nowait() is None  # the fast path does not wait
    taking = asyncio.ensure_future(hand_off(cache))
    # One loop turn: the hand-off takes `first` and waits for its probe (and only that).
    await asyncio.sleep(0)
    assert cache.ready_count == 2
    assert not taking.done()
    probe.set_result("running")
    first.process.probing = None  # type: ignore[attr-defined]
    got = await taking
    assert got is not first
    await until(cache, lambda: first.process.killed)  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_close_stops_owned_vms_and_fails_waiters(tmp_path: Path) -> None:
    factory = FakeFactory(tmp_path)
    cache = VMCache(factory, 2, parallelism=2)
    task = asyncio.create_task(cache.run())
    await until(cache, lambda: cache.ready_count == 2)
    handed = await hand_off(cache)
    await until(cache, lambda: cache.ready_count == 2)
    owned = cache.owned()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await cache.close()
    assert all(vm.process.stopped for vm in owned)  # type: ignore[attr-defined]
    assert not handed.process.stopped  # type: ignore[attr-defined]
    with pytest.raises(Aborted) as refused:
        await hand_off(cache)
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    with pytest.raises(CacheClosed):
        cache.reserve_nowait()


@pytest.mark.asyncio
async def test_resize(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 3)
    cache.resize(1)
    await until(cache, lambda: cache.ready_count == 1)
    cache.resize(4)
    await until(cache, lambda: cache.ready_count == 4)


@pytest.mark.asyncio
async def test_resize_with_keep_stops_refilling_but_not_the_ready_vms(tmp_path: Path) -> None:
    async with fake_pool(tmp_path, 6) as (cache, factory):
        await until(cache, lambda: cache.ready_count == 6)
        # The autoscaler's "hold": the target is 1, the six ready VMs stay.
        cache.resize(1, keep=6)
        assert (cache.wanted, cache.keep, cache.ready_count) == (1, 6, 6)
        booted = len(factory.created)
        for _ in range(4):  # taken: not replaced while more than the target are ready
            await hand_off(cache)
        await until(cache, lambda: cache.ready_count == 2)
        cache.resize(1, keep=1)  # idle long enough: the surplus is stopped
        await until(cache, lambda: cache.ready_count == 1)
        assert len(factory.created) == booted


@pytest.mark.asyncio
async def test_boots_queued_beyond_a_lowered_target_do_not_start(tmp_path: Path) -> None:
    factory = FakeFactory(tmp_path)
    factory.gate = asyncio.Event()  # the first two boots hold both slots
    cache = VMCache(factory, 8, parallelism=2)
    async with pool_running(cache):
        await until(cache, lambda: factory.in_flight == 2 and cache.booting_count == 8)
        cache.resize(3)  # six boots wait for a slot: one of them is still wanted
        factory.gate.set()
        await until(cache, lambda: cache.ready_count == 3 and cache.booting_count == 0)
        assert len(factory.created) == 3


class SizedFactory(FakeFactory):
    """A fake factory whose VMs have 256 MiB (SPEC's), as its spec says."""


@pytest.mark.asyncio
async def test_the_memory_budget_holds_the_pool_down(tmp_path: Path) -> None:
    factory = SizedFactory(tmp_path)
    cache = VMCache(factory, 3, parallelism=3, memory_budget_mib=600)
    async with pool_running(cache):
        assert cache.target == 2  # 600 MiB hold two VMs of 256
        await until(cache, lambda: cache.ready_count == 2)
        assert len(factory.created) == 2
        assert cache.committed_mib == 512
        cache.set_memory_budget(768)
        await until(cache, lambda: cache.ready_count == 3)
        cache.set_memory_budget(256)  # surplus VMs are stopped, and stop counting
        await until(cache, lambda: cache.ready_count == 1 and cache.committed_mib == 256)

        # A VM out of the pool but not handed off still counts: no replacement boots
        # while it is out, for there is no room for one.
        vm = await cache.reserve()
        cache.refill()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(factory.created) == 3
        assert cache.booting_count == 0
        assert cache.committed_mib == 256
        # Handed off, it is the client's memory: the refill boots at once.
        cache.give_now(vm)
        cache.delivered(vm)
        await until(cache, lambda: cache.ready_count == 1)
        assert cache.committed_mib == 256
        assert len(factory.created) == 4


@pytest.mark.asyncio
async def test_memory_of_every_boot_counts_from_its_start(tmp_path: Path) -> None:
    factory = SizedFactory(tmp_path)
    factory.gate = asyncio.Event()  # boots hang until the gate opens
    cache = VMCache(factory, 4, parallelism=4, memory_budget_mib=1024)
    async with pool_running(cache):
        await until(cache, lambda: cache.booting_count == 4)
        assert cache.committed_mib == 1024
        cache.set_memory_budget(512)  # less room: nothing more starts, nothing is lost
        factory.gate.set()
        await until(cache, lambda: cache.ready_count == 2 and cache.booting_count == 0)
        await until(cache, lambda: cache.committed_mib == 512)
