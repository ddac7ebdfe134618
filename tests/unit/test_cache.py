"""Pool logic of VMCache, with a fake QEMU process at the seam (fakes.py; no VMs are booted
here: tests/integration proves the same behaviour on real QEMU)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from kata_vmcache.errors import CacheClosed
from kata_vmcache.pool import filling
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.vm.owned import VMState

from .fakes import FakeFactory, fake, fake_pool, pool_running, until
from .servicer_fakes import Aborted, hand_off


@pytest.fixture
def pool_size() -> int:
    return 3


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
        assert vm.process.released
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
    fake(victim).die()
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
    fake(bad).paused = False
    await until(cache, lambda: fake(bad).killed)
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
    fake(first).probing = probe
    assert cache.reserve_nowait() is None  # the fast path does not wait
    taking = asyncio.ensure_future(hand_off(cache))
    # One loop turn: the hand-off takes `first` and waits for its probe (and only that).
    await asyncio.sleep(0)
    assert cache.ready_count == 2
    assert not taking.done()
    probe.set_result("running")
    fake(first).probing = None
    got = await taking
    assert got is not first
    await until(cache, lambda: fake(first).killed)


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
    assert all(fake(vm).stopped for vm in owned)
    assert not fake(handed).stopped
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
