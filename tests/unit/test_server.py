"""The servicer's GetBaseVM path with a fake grpc context (servicer_fakes.py) over the pool of
fake VMs (fakes.py): what a real call does, step by step, and each way out of it. The
same paths run on real QEMU over a real socket in tests/integration/test_handoff_races.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf import empty_pb2

from kata_vmcache.pool.cache import VMCache
from kata_vmcache.proto import cache_pb2
from kata_vmcache.service import server as servermod
from kata_vmcache.shape import KEY as SHAPE_KEY
from kata_vmcache.vm.owned import VM, VMState

from .fakes import FakeFactory, fake, pool_running, until
from .servicer_fakes import Aborted, FakeContext, get_base_vm, servicer_for


@pytest_asyncio.fixture
async def pool(pool: tuple[VMCache, FakeFactory]) -> tuple[VMCache, FakeFactory]:
    """conftest's pool of two, once both are ready."""
    await until(pool[0], lambda: pool[0].ready_count == 2)
    return pool


def by_id(factory: FakeFactory, vm_id: str) -> VM:
    vm, = (vm for vm in factory.created if vm.id == vm_id)
    return vm


class Writes:
    """A reply write the test holds: `entered` is set once the servicer is writing (the VM
    it writes is reserved then), and the write ends as `finish()` says."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ids: list[str] = []

    def __call__(self, reply: cache_pb2.GrpcVM) -> asyncio.Future[None]:
        self.ids.append(reply.id)
        self.entered.set()
        return self.outcome


@pytest.mark.asyncio
async def test_reserve_reply_give_delivered(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, factory = pool
    seen: list[tuple[str, VMState, bool]] = []

    def write(reply: cache_pb2.GrpcVM) -> None:
        # While the reply is written the VM is reserved: out of the pool, still ready
        # (its record says so), still held by the daemon.
        vm = by_id(factory, reply.id)
        seen.append((reply.id, vm.state, vm in cache.owned()))
        assert not vm.process.released

    context = FakeContext(writer=write)
    servicer = servicer_for(cache)
    await servicer.GetBaseVM(empty_pb2.Empty(), context)
    reply, = context.written
    vm = by_id(factory, reply.id)
    assert seen == [(vm.id, VMState.READY, False)]
    # Given before the handler returns (the OK status follows it) ...
    assert vm.state is VMState.HANDED_OFF
    assert vm.process.released
    assert reply is vm.handoff.message  # the record made when it became ready, as is
    # ... and counted once the call is over (grpc's done callbacks, after the status).
    assert cache.stats.handed_out == 0
    context.end()
    assert cache.stats.handed_out == 1
    assert len(cache.activity.handoff_seconds) == 1
    assert [e.kind for e in cache.activity.events if e.vm_id == vm.id] == [
        "ready", "handed_out"]
    assert vm.history == [VMState.BOOTING, VMState.READY, VMState.HANDED_OFF]
    await until(cache, lambda: cache.ready_count == 2)  # refilled


@pytest.mark.asyncio
async def test_a_cancelled_call_returns_its_vm(pool: tuple[VMCache, FakeFactory],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servermod, "REFILL_AFTER", 3600.0)  # no early refill here
    cache, factory = pool
    writes = Writes()
    context = FakeContext(writer=writes)
    call = asyncio.create_task(get_base_vm(servicer_for(cache), context))
    await writes.entered.wait()
    assert cache.ready_count == 1
    call.cancel()  # grpc.aio cancels the handler when its client cancels or disconnects
    with pytest.raises(asyncio.CancelledError):
        await call
    await until(cache, lambda: cache.stats.taken_back == 1 and cache.ready_count == 2)
    assert not context.written
    assert cache.stats.handed_out == 0
    assert all(vm.state is VMState.READY for vm in cache.owned())
    assert cache.owned()[0].id == writes.ids[0]  # the same VM, first in line again
    assert len(factory.created) == 2  # nothing was booted for it


@pytest.mark.asyncio
async def test_a_reply_that_cannot_be_written_is_taken_back(
        pool: tuple[VMCache, FakeFactory]) -> None:
    cache, _ = pool
    writes = Writes()
    writes.outcome.set_exception(RuntimeError("stream closed"))  # the client went away
    context = FakeContext(writer=writes)
    with pytest.raises(asyncio.CancelledError):  # ended as what it is: cancelled
        await get_base_vm(servicer_for(cache), context)
    await until(cache, lambda: cache.stats.taken_back == 1 and cache.ready_count == 2)
    assert cache.stats.handed_out == 0
    assert cache.stats.take_back_stopped == 0


@pytest.mark.asyncio
async def test_a_reply_never_read_is_given_up(pool: tuple[VMCache, FakeFactory],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A client that grants no flow-control window: the write never completes. After
    # REFILL_AFTER the replacement boots; after HANDOFF_WRITE_TIMEOUT the VM comes back
    # and the call ends without a status.
    monkeypatch.setattr(servermod, "REFILL_AFTER", 0.0)
    monkeypatch.setattr(servermod, "HANDOFF_WRITE_TIMEOUT", 0.05)
    cache, factory = pool
    writes = Writes()  # never finishes
    with pytest.raises(asyncio.CancelledError):
        await get_base_vm(servicer_for(cache), FakeContext(writer=writes))
    assert writes.entered.is_set()
    await until(cache, lambda: cache.stats.taken_back == 1 and cache.booting_count == 0)
    assert cache.stats.handed_out == 0
    # The early refill filled the pool; the VM that came back found it full and was
    # stopped (not leaked), or found room: either way the pool holds exactly its target.
    assert cache.ready_count == 2
    await cache.pool.wait_background()  # the surplus VM's stop
    assert sum(fake(vm).stopped for vm in factory.created) == len(factory.created) - 2


@pytest.mark.asyncio
async def test_a_vm_that_dies_while_its_reply_is_written_is_refused(
        pool: tuple[VMCache, FakeFactory]) -> None:
    cache, factory = pool

    def die(reply: cache_pb2.GrpcVM) -> None:
        fake(by_id(factory, reply.id)).die()

    context = FakeContext(writer=die)
    with pytest.raises(Aborted) as refused:
        await get_base_vm(servicer_for(cache), context)
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE
    assert "died during its hand-off" in refused.value.details
    assert cache.stats.handed_out == 0
    await until(cache, lambda: cache.ready_count == 2)


@pytest.mark.asyncio
async def test_no_vm_before_the_deadline(tmp_path: Path) -> None:
    factory = FakeFactory(tmp_path)
    factory.gate = asyncio.Event()  # nothing ever becomes ready
    async with pool_running(VMCache(factory, 1, parallelism=1)) as cache:
        context = FakeContext(deadline=servermod.DEADLINE_MARGIN + 0.05)
        with pytest.raises(Aborted) as refused:
            await get_base_vm(servicer_for(cache), context)
        assert refused.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "0 ready, 1 booting" in refused.value.details
        assert cache.waiting_clients == 0
        factory.gate.set()


@pytest.mark.asyncio
async def test_a_closing_cache_is_unavailable(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, _ = pool
    cache.refuse_new()
    with pytest.raises(Aborted) as refused:
        await get_base_vm(servicer_for(cache), FakeContext())
    assert refused.value.code is grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_config_and_status_read_the_factory(pool: tuple[VMCache, FakeFactory]) -> None:
    cache, _ = pool
    servicer = servicer_for(cache)
    context = FakeContext()
    await servicer.Config(empty_pb2.Empty(), context)
    assert dict(context.trailing)[SHAPE_KEY]  # the VM the factory boots, for clients
    context = FakeContext()
    status = await servicer.Status(empty_pb2.Empty(), context)
    assert context.trailing == ()  # no template: nothing beyond Kata's message
    assert sorted(v.pid for v in status.vmstatus) == sorted(
        vm.pid for vm in cache.owned() if vm.pid is not None)

