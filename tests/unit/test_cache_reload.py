"""What a configuration reload asks of the pool: a new factory (old VMs retired, handed-off
ones untouched), a new size while boots are in flight, a new number of boot slots. Fakes at
the QEMU seam (fakes.py), as in test_cache.py; tests/integration/test_systemd.py does it on
real QEMU."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kata_vmcache.pool import filling
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.vm.owned import VM, VMState

from .fakes import SPEC, FakeFactory, fake, pool_running, until
from .servicer_fakes import hand_off


class SpecFactory(FakeFactory):
    """A FakeFactory that, like DirectFactory, says which spec it builds."""

    def __init__(self, tmp: Path, memory_mib: int) -> None:
        super().__init__(tmp)
        self.spec = dataclasses.replace(SPEC, memory_mib=memory_mib)


@pytest_asyncio.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[VMCache, SpecFactory]]:
    factory = SpecFactory(tmp_path, 256)
    async with pool_running(VMCache(factory, 2, parallelism=2)) as cache:
        yield cache, factory


def stopped(vm: VM) -> bool:
    return fake(vm).stopped


@pytest.mark.asyncio
async def test_new_factory_retires_ready_vms_not_handed_off_ones(
        running: tuple[VMCache, SpecFactory], tmp_path: Path) -> None:
    cache, _ = running
    await until(cache, lambda: cache.ready_count == 2)
    handed = await hand_off(cache)
    await until(cache, lambda: cache.ready_count == 2)
    before = cache.owned()
    new = SpecFactory(tmp_path, 512)
    assert cache.replace_factory(new) == 2
    await until(cache, lambda: cache.ready_count == 2)
    assert all(stopped(vm) for vm in before)
    assert {vm.spec.memory_mib for vm in cache.owned()} == {512}
    assert len(new.created) == 2
    assert not stopped(handed)
    assert handed.state is VMState.HANDED_OFF
    got = await hand_off(cache)
    assert got.spec.memory_mib == 512


@pytest.mark.asyncio
async def test_vms_booting_from_the_old_factory_are_not_offered(tmp_path: Path) -> None:
    old = SpecFactory(tmp_path, 256)
    old.gate = asyncio.Event()
    cache = VMCache(old, 2, parallelism=2)
    async with pool_running(cache):
        await until(cache, lambda: cache.booting_count == 2 and len(old.created) == 2)
        new = SpecFactory(tmp_path, 512)
        cache.replace_factory(new)
        old.gate.set()  # the old boots finish now, after the reload
        await until(cache, lambda: cache.ready_count == 2)
        assert all(stopped(vm) for vm in old.created)
        assert {vm.spec.memory_mib for vm in cache.owned()} == {512}


@pytest.mark.asyncio
async def test_vm_taken_before_the_reload_is_not_put_back(
        running: tuple[VMCache, SpecFactory], tmp_path: Path) -> None:
    cache, _ = running
    await until(cache, lambda: cache.ready_count == 2)
    taken = await cache.take()  # a hand-off in progress, about to be cancelled
    cache.replace_factory(SpecFactory(tmp_path, 512))
    cache.put_back(taken)
    await cache.pool.wait_background()  # the stop runs in the background
    assert stopped(taken)
    assert taken not in cache.owned()


@pytest.mark.asyncio
async def test_shrinking_while_booting_settles_at_the_new_size(tmp_path: Path) -> None:
    factory = SpecFactory(tmp_path, 256)
    factory.gate = asyncio.Event()
    cache = VMCache(factory, 3, parallelism=3)
    async with pool_running(cache):
        await until(cache, lambda: cache.booting_count == 3)
        cache.resize(1)
        factory.gate.set()
        await until(cache, lambda: cache.booting_count == 0)
        assert cache.ready_count == 1
        assert sum(stopped(vm) for vm in factory.created) == 2


@pytest.mark.asyncio
async def test_boot_parallelism_changes_live(tmp_path: Path) -> None:
    factory = SpecFactory(tmp_path, 256)
    factory.gate = asyncio.Event()
    cache = VMCache(factory, 4, parallelism=1)
    async with pool_running(cache):
        await until(cache, lambda: factory.in_flight == 1)
        cache.set_parallelism(3)
        await until(cache, lambda: factory.in_flight == 3)
        cache.set_parallelism(1)
        factory.gate.set()
        await until(cache, lambda: cache.ready_count == 4)
        # Refill four more with the gate shut: one at a time again.
        factory.gate.clear()
        factory.max_in_flight = 0
        for _ in range(4):
            await hand_off(cache)
        await until(cache, lambda: factory.in_flight == 1)
        for _ in range(20):  # loop turns: a wrongly freed slot would be used in these
            await asyncio.sleep(0)
        assert factory.in_flight == 1
        factory.gate.set()
        await until(cache, lambda: cache.ready_count == 4)
        assert factory.max_in_flight == 1


@pytest.mark.asyncio
async def test_a_new_factory_resets_the_backoff(tmp_path: Path) -> None:
    cache = VMCache(SpecFactory(tmp_path, 256), 1, parallelism=1)
    cache.filler.boot_failed("old kernel is broken")
    assert cache.filler.not_before > 0
    cache.replace_factory(SpecFactory(tmp_path, 512))
    assert cache.filler.not_before == 0.0
    assert cache.stats.last_error == ""
    assert filling.BACKOFF_START > 0
