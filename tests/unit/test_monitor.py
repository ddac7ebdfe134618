"""The Monitor service (protos/vmcache.proto) and its client, over a real gRPC server on a
real Unix socket; the VMs behind it are the pool's fake processes (fakes.py), so this
proves the service's logic: contents, push on change, coalescing, heartbeats, ending on
shutdown. tests/integration/test_tui.py proves the same service on the real daemon."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

import grpc
import pytest

from kata_vmcache.client.snapshot import MonitorClient, Snapshot
from kata_vmcache.errors import NoMonitor, ServerGone, ServerUnavailable
from kata_vmcache.pool.activity import CacheActivity
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.service.monitor import HEARTBEAT, MIN_INTERVAL, MonitorServicer, add_to_server
from kata_vmcache.vm.owned import VMState

from .fakes import FakeFactory, fake, until
from .servicer_fakes import hand_off, make_config


async def serve(cache: VMCache, endpoint: Path, *, heartbeat: float = HEARTBEAT,
                min_interval: float = MIN_INTERVAL) -> tuple[grpc.aio.Server, asyncio.Event]:
    stopping = asyncio.Event()
    servicer = MonitorServicer(cache, make_config(endpoint), stopping=stopping,
                               heartbeat=heartbeat, min_interval=min_interval)
    server = grpc.aio.server()
    add_to_server(servicer, server)
    server.add_insecure_port(f"unix:{endpoint}")
    await server.start()
    return server, stopping


def test_activity_is_bounded_and_numbered() -> None:
    activity = CacheActivity(events=3, latencies=2)
    for i in range(5):
        activity.record("ready", f"event {i}")
        activity.handoff_seconds.append(float(i))
    assert [e.text for e in activity.events] == ["event 2", "event 3", "event 4"]
    assert [e.seq for e in activity.events] == [3, 4, 5]
    assert list(activity.handoff_seconds) == [3.0, 4.0]


@pytest.mark.asyncio
async def test_pool_records_events_and_hand_off_latency(
        pool: tuple[VMCache, FakeFactory]) -> None:
    cache, factory = pool
    await until(cache, lambda: cache.ready_count == 2)
    taken = await hand_off(cache)
    await until(cache, lambda: cache.ready_count == 2)  # the refill is in: one boot at a time
    victim = cache.owned()[0]
    fake(victim).die()
    factory.fail_next = 1
    await until(cache, lambda: cache.stats.boot_failures == 1)
    events = list(cache.activity.events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.time for e in events] == sorted(e.time for e in events)
    by_kind = {kind: [e for e in events if e.kind == kind]
               for kind in ("ready", "handed_out", "died", "boot_failed")}
    assert {e.vm_id for e in by_kind["ready"]} >= {taken.id, victim.id}
    handed, = by_kind["handed_out"]
    assert handed.vm_id == taken.id
    assert "handed out" in handed.text
    died, = by_kind["died"]
    assert died.vm_id == victim.id
    assert victim.id in died.text
    failed, = by_kind["boot_failed"]
    assert "guest exploded" in failed.text
    # Things happen in order: the VM is ready before it is handed out or dies.
    assert events.index(handed) > min(events.index(e) for e in by_kind["ready"]
                                      if e.vm_id == taken.id)
    assert len(cache.activity.handoff_seconds) == 1
    assert cache.activity.handoff_seconds[0] >= 0
    assert cache.next_retry_seconds > 0  # backing off after the failure


@pytest.mark.asyncio
async def test_snapshot_describes_the_pool(pool: tuple[VMCache, FakeFactory],
                                           short_tmp: Path) -> None:
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 2)
    await hand_off(cache)
    # Refilled before the snapshot: a boot ending between the snapshot and the asserts
    # below would make them compare two different moments (seen under a loaded make test).
    await until(cache, lambda: cache.ready_count == 2 and cache.booting_count == 0)
    endpoint = short_tmp / "s.sock"
    server, _ = await serve(cache, endpoint)
    try:
        async with MonitorClient(endpoint) as monitor:
            snap = await monitor.snapshot()
    finally:
        await server.stop(None)
    assert snap.pid == os.getpid()
    assert snap.endpoint == str(endpoint)
    assert (snap.config.vcpus, snap.config.memory_mib, snap.config.accelerator) == (1, 256,
                                                                                    "tcg")
    assert snap.config.template_enabled is False
    assert snap.config.config_path == "/etc/kata-containers/configuration.toml"
    assert snap.target == 2
    assert snap.ready + snap.booting == 2
    assert [v.id for v in snap.vms] == [vm.id for vm in cache.owned()]
    assert [v.pid for v in snap.vms] == [vm.pid for vm in cache.owned()]
    for v in snap.vms:
        assert (v.vcpus, v.memory_mib) == (1, 256)
        assert v.state in ("ready", "booting")
        assert (v.boot_seconds is not None) == (v.state == "ready")
    assert snap.counters.handed_out == 1
    assert len(snap.handoff_seconds) == 1
    assert snap.boot_seconds == tuple(cache.stats.boot_times)
    assert [e.kind for e in snap.events].count("handed_out") == 1
    assert [e.seq for e in snap.events] == [e.seq for e in cache.activity.events]
    assert snap.uptime_seconds >= 0
    assert snap.as_json()["counters"]["handed_out"] == 1


def watch(monitor: MonitorClient) -> AsyncGenerator[Snapshot]:
    """monitor.watch(), as the async generator it is (a test closes it: aclose)."""
    stream = monitor.watch()
    assert isinstance(stream, AsyncGenerator), stream
    return stream


@pytest.mark.asyncio
async def test_watch_pushes_each_change(pool: tuple[VMCache, FakeFactory],
                                        short_tmp: Path) -> None:
    """With heartbeats an hour apart, every snapshot after the first is a push."""
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 2)
    endpoint = short_tmp / "s.sock"
    server, _ = await serve(cache, endpoint, heartbeat=3600, min_interval=0)
    try:
        async with MonitorClient(endpoint) as monitor:
            stream = watch(monitor)
            first = await anext(stream)
            assert first.ready == 2
            assert first.counters.handed_out == 0
            taken = await hand_off(cache)

            latest = first

            async def until_seen(predicate: Callable[[Snapshot], bool]) -> Snapshot:
                nonlocal latest
                while not predicate(latest):
                    latest = await anext(stream)
                return latest
            snap = await asyncio.wait_for(
                until_seen(lambda s: s.counters.handed_out == 1), 10)
            assert taken.id not in [v.id for v in snap.vms]
            # ... and the refill, booting then ready, is pushed too.
            snap = await asyncio.wait_for(until_seen(lambda s: s.ready == 2), 10)
            assert taken.id not in [v.id for v in snap.vms]
            await stream.aclose()
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_watch_coalesces_bursts(pool: tuple[VMCache, FakeFactory],
                                      short_tmp: Path) -> None:
    cache, factory = pool
    cache.resize(6)
    await until(cache, lambda: cache.ready_count == 6)
    factory.gate = asyncio.Event()  # refills wait: the burst is only the hand-offs
    endpoint = short_tmp / "s.sock"
    server, _ = await serve(cache, endpoint, heartbeat=3600, min_interval=1.0)
    try:
        async with MonitorClient(endpoint) as monitor:
            stream = watch(monitor)
            await anext(stream)
            for _ in range(5):
                await hand_off(cache)  # each one is a change the watcher is told about
            seen = 0
            while True:
                snap = await asyncio.wait_for(anext(stream), 10)
                seen += 1
                if snap.counters.handed_out == 5:
                    break
            await stream.aclose()
    finally:
        factory.gate.set()
        await server.stop(None)
    # Five hand-offs (and the boots they start) within the interval: at most the first
    # change goes out alone, the rest arrive together.
    assert seen <= 2


@pytest.mark.asyncio
async def test_watch_heartbeat_and_end_on_shutdown(pool: tuple[VMCache, FakeFactory],
                                                   short_tmp: Path) -> None:
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 2)
    endpoint = short_tmp / "s.sock"
    server, stopping = await serve(cache, endpoint, heartbeat=0.05, min_interval=0)
    try:
        async with MonitorClient(endpoint) as monitor:
            stream = watch(monitor)
            first = await anext(stream)
            beat = await asyncio.wait_for(anext(stream), 10)  # nothing changed: heartbeat
            assert beat.taken_at > first.taken_at
            assert beat.uptime_seconds > first.uptime_seconds
            assert beat.heartbeat_seconds == 0.05
            stopping.set()

            async def last_one() -> Snapshot:
                while not (snap := await anext(stream)).stopping:
                    pass
                return snap
            await asyncio.wait_for(last_one(), 10)
            with pytest.raises(ServerGone, match="ended the stream"):
                await asyncio.wait_for(anext(stream), 10)
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_client_errors(short_tmp: Path) -> None:
    async with MonitorClient(short_tmp / "nothing.sock") as monitor:
        with pytest.raises(ServerUnavailable, match="no VM cache server"):
            await monitor.snapshot()
        with pytest.raises(ServerUnavailable):
            await anext(monitor.watch())
    # A server without our service (Kata's own VMCache server, say).
    endpoint = short_tmp / "kata.sock"
    server = grpc.aio.server()
    server.add_insecure_port(f"unix:{endpoint}")
    await server.start()
    try:
        async with MonitorClient(endpoint) as monitor:
            with pytest.raises(NoMonitor, match="no Monitor service"):
                await monitor.snapshot()
    finally:
        await server.stop(None)


def test_vm_states_in_snapshot_are_the_pools() -> None:
    # The wire carries VMState values; the dashboard colours "ready" and "booting".
    assert {VMState.READY.value, VMState.BOOTING.value} == {"ready", "booting"}
