"""The Monitor service: the whole picture of the cache, for dashboards and tooling.

Kata's `cache.CacheService` carries a pid and (pid, cpu, memory) per VM, and it must stay
exactly Kata's. Everything else a person wants to see (uptime, the pool's target and
progress, booting VMs, waiting clients, counters, recent events, latencies) is served by
`kata_vmcache.v1.Monitor` (protos/vmcache.proto) on the same socket:

- `Snapshot`: the cache as it is now (`kata-vmcache status --json`);
- `Watch`: a snapshot on connect, then one per change of the pool, pushed (`kata-vmcache
  tui`). Bursts are coalesced to at most one snapshot per `min_interval`, and a heartbeat
  snapshot goes out every `heartbeat` seconds when nothing changes, so ages and uptime move
  on screen and a client notices a dead connection. When the daemon stops, each stream gets
  a last snapshot with `stopping` set and ends, so shutting down never waits on a watcher.

Nothing here changes the cache: a snapshot only reads it, synchronously, in one go (the
event loop runs nothing else meanwhile, so a snapshot is consistent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from .. import __version__
from ..config import Config
from ..pool.autoscale import Autoscaler
from ..pool.cache import VMCache
from ..proto import vmcache_pb2, vmcache_pb2_grpc
from ..vm.records import Unclaimed

log = logging.getLogger(__name__)

#: Seconds between heartbeat snapshots on Watch when nothing changes.
HEARTBEAT = 1.0
#: At most one snapshot per this many seconds on Watch (coalesces bursts of changes).
MIN_INTERVAL = 0.1


class MonitorServicer(vmcache_pb2_grpc.MonitorServicer):
    def __init__(self, cache: VMCache, config: Config, *,
                 stopping: asyncio.Event, heartbeat: float = HEARTBEAT,
                 min_interval: float = MIN_INTERVAL,
                 unclaimed: Sequence[Unclaimed] = (),
                 autoscaler: Autoscaler | None = None) -> None:
        self.cache = cache
        self.autoscaler = autoscaler
        #: What start-up's recovery left running for an operator (daemon.Unclaimed).
        self.unclaimed = [vmcache_pb2.UnclaimedVM(path=u.path, problem=u.problem, pid=u.pid)
                          for u in unclaimed]
        # What a snapshot shows of `config` (endpoint, templating, file) cannot change while
        # the daemon runs (reload refuses it); the VMs' settings come from the cache's
        # current factory, which a reload replaces.
        self.config = config
        self.stopping = stopping
        self.heartbeat = heartbeat
        self.min_interval = min_interval
        self.started_at = time.time()
        self._started = time.monotonic()

    def snapshot(self) -> vmcache_pb2.CacheSnapshot:
        cache, now = self.cache, time.time()
        factory = cache.factory
        spec = factory.spec
        stats = cache.stats
        vms = []
        for vm in cache.owned():
            info = vmcache_pb2.VMInfo(id=vm.id, pid=vm.pid or 0, state=vm.state.value,
                                      vcpus=vm.spec.vcpus, memory_mib=vm.spec.memory_mib,
                                      created_at=vm.created,
                                      age_seconds=max(0.0, now - vm.created))
            if vm.boot_seconds is not None:
                info.boot_seconds = vm.boot_seconds
            vms.append(info)
        return vmcache_pb2.CacheSnapshot(
            pid=os.getpid(),
            endpoint=str(self.config.factory.vm_cache_endpoint),
            version=__version__,
            started_at=self.started_at,
            uptime_seconds=time.monotonic() - self._started,
            taken_at=now,
            stopping=self.stopping.is_set(),
            heartbeat_seconds=self.heartbeat,
            config=vmcache_pb2.ServerConfig(
                vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                accelerator=factory.accelerator,
                template_enabled=self.config.factory.enable_template,
                template_size_bytes=factory.template_bytes(),
                config_path=str(self.config.source or ""),
            ),
            target=cache.target,
            # The configured one (autoscaling's starting target), not what it made of it.
            vm_cache_number=(self.autoscaler.fixed if self.autoscaler is not None
                             else cache.wanted),
            memory_budget_mib=cache.memory_budget_mib or 0,
            memory_committed_mib=cache.committed_mib,
            unclaimed=self.unclaimed,
            autoscale=self.autoscaler is not None and self.autoscaler.enabled,
            target_reason=self.autoscaler.reason if self.autoscaler is not None else "",
            ready=cache.ready_count,
            booting=cache.booting_count,
            clients_waiting=cache.waiting_clients,
            vms=vms,
            counters=vmcache_pb2.Counters(
                handed_out=stats.handed_out, booted=stats.booted,
                boot_failures=stats.boot_failures, died_in_pool=stats.died_in_pool,
                last_error=stats.last_error, next_retry_seconds=cache.next_retry_seconds,
            ),
            handoff_seconds=list(cache.activity.handoff_seconds),
            boot_seconds=list(stats.boot_times),
            events=[vmcache_pb2.Event(seq=e.seq, time=e.time, kind=e.kind, text=e.text,
                                      vm_id=e.vm_id)
                    for e in cache.activity.events],
        )

    async def Snapshot(self, request: vmcache_pb2.SnapshotRequest,
                       context: grpc.aio.ServicerContext) -> vmcache_pb2.CacheSnapshot:
        return self.snapshot()

    async def Watch(self, request: vmcache_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[vmcache_pb2.CacheSnapshot]:
        while True:
            # Subscribe before reading: a change while the snapshot is sent is not lost.
            changed = self.cache.change_event()
            snapshot = self.snapshot()
            yield snapshot
            if snapshot.stopping:
                return
            sent = time.monotonic()
            await self._next_change(changed)
            pause = sent + self.min_interval - time.monotonic()
            if pause > 0 and not self.stopping.is_set():
                await asyncio.sleep(pause)

    async def _next_change(self, changed: asyncio.Event) -> None:
        """Until the pool changes, the server stops, or the heartbeat is due."""
        waits = {asyncio.ensure_future(changed.wait()),
                 asyncio.ensure_future(self.stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=self.heartbeat,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def add_to_server(servicer: MonitorServicer, server: grpc.aio.Server) -> None:
    vmcache_pb2_grpc.add_MonitorServicer_to_server(servicer, server)
