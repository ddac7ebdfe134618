"""A snapshot of a VM cache server, as its Monitor service reports it, and how to get one.

    async with MonitorClient(endpoint) as monitor:
        snap = await monitor.snapshot()          # once
        async for snap in monitor.watch():       # pushed on every change, and heartbeats
            ...

`Snapshot` is plain, frozen data decoded from the wire (protos/vmcache.proto), so the
dashboard and `status --json` never touch protobuf objects, and tests can build one by hand.
`watch()` raises `ServerUnavailable` when nothing listens, `ServerGone` when the stream ends
or falls silent for several heartbeats: a caller reconnects on either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from ..errors import NoMonitor, ServerGone
from ..proto import vmcache_pb2, vmcache_pb2_grpc
from .rpc import not_running, rpc_error

#: How long to wait for the first snapshot of a Watch.
FIRST_SNAPSHOT_TIMEOUT = 10.0
#: Heartbeats that may go missing before a watch counts as dead.
MISSED_HEARTBEATS = 3


@dataclass(frozen=True)
class ServerConfig:
    vcpus: int
    memory_mib: int
    accelerator: str
    template_enabled: bool
    template_size_bytes: int = 0
    config_path: str = ""


@dataclass(frozen=True)
class VMInfo:
    id: str
    pid: int
    state: str
    vcpus: int
    memory_mib: int
    created_at: float
    age_seconds: float
    boot_seconds: float | None = None


@dataclass(frozen=True)
class Counters:
    handed_out: int = 0
    booted: int = 0
    boot_failures: int = 0
    died_in_pool: int = 0
    last_error: str = ""
    next_retry_seconds: float = 0.0


@dataclass(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    text: str
    vm_id: str = ""


@dataclass(frozen=True)
class UnclaimedVM:
    path: str
    problem: str
    pid: int


@dataclass(frozen=True)
class Snapshot:
    pid: int
    endpoint: str
    version: str
    started_at: float
    uptime_seconds: float
    taken_at: float
    config: ServerConfig
    target: int
    ready: int
    booting: int
    clients_waiting: int
    vms: tuple[VMInfo, ...] = ()
    counters: Counters = field(default_factory=Counters)
    handoff_seconds: tuple[float, ...] = ()
    boot_seconds: tuple[float, ...] = ()
    events: tuple[Event, ...] = ()
    stopping: bool = False
    heartbeat_seconds: float = 1.0
    #: vm_cache_number; `target` is less when the memory budget holds fewer VMs.
    vm_cache_number: int = 0
    memory_budget_mib: int = 0
    memory_committed_mib: int = 0
    #: Running VMs whose record could not be believed at start-up, left for an operator.
    unclaimed: tuple[UnclaimedVM, ...] = ()
    #: [vmcache] autoscale: the pool sizes itself; `target_reason` says why it is `target`.
    autoscale: bool = False
    target_reason: str = ""

    @classmethod
    def from_proto(cls, m: vmcache_pb2.CacheSnapshot) -> Snapshot:
        c, k = m.config, m.counters
        return cls(
            pid=m.pid, endpoint=m.endpoint, version=m.version, started_at=m.started_at,
            uptime_seconds=m.uptime_seconds, taken_at=m.taken_at,
            config=ServerConfig(c.vcpus, c.memory_mib, c.accelerator, c.template_enabled,
                                c.template_size_bytes, c.config_path),
            target=m.target, ready=m.ready, booting=m.booting,
            clients_waiting=m.clients_waiting,
            vms=tuple(VMInfo(v.id, v.pid, v.state, v.vcpus, v.memory_mib, v.created_at,
                             v.age_seconds,
                             v.boot_seconds if v.HasField("boot_seconds") else None)
                      for v in m.vms),
            counters=Counters(k.handed_out, k.booted, k.boot_failures, k.died_in_pool,
                              k.last_error, k.next_retry_seconds),
            handoff_seconds=tuple(m.handoff_seconds),
            boot_seconds=tuple(m.boot_seconds),
            events=tuple(Event(e.seq, e.time, e.kind, e.text, e.vm_id) for e in m.events),
            stopping=m.stopping,
            heartbeat_seconds=m.heartbeat_seconds or 1.0,
            vm_cache_number=m.vm_cache_number,
            memory_budget_mib=m.memory_budget_mib,
            memory_committed_mib=m.memory_committed_mib,
            unclaimed=tuple(UnclaimedVM(u.path, u.problem, u.pid) for u in m.unclaimed),
            autoscale=m.autoscale,
            target_reason=m.target_reason,
        )

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class MonitorClient:
    """Client of the Monitor service. One channel per client: after the server went away,
    a new client connects at once, where a reused channel would sit in grpc's own
    reconnect backoff."""

    def __init__(self, endpoint: Path, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> MonitorClient:
        self._channel = grpc.aio.insecure_channel(f"unix:{self.endpoint}")
        self._stub = vmcache_pb2_grpc.MonitorStub(self._channel)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    def _error(self, method: str, exc: grpc.aio.AioRpcError) -> Exception:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return NoMonitor(f"the server at {self.endpoint} has no Monitor service "
                             "(not a kata-vmcache server?)")
        return rpc_error(self.endpoint, method, self.timeout, exc, error=ServerGone)

    async def snapshot(self) -> Snapshot:
        if not self.endpoint.exists():
            raise not_running(self.endpoint)
        try:
            reply = await self._stub.Snapshot(vmcache_pb2.SnapshotRequest(),
                                              timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error("Snapshot", exc) from None
        return Snapshot.from_proto(reply)

    async def watch(self) -> AsyncIterator[Snapshot]:
        """Snapshots as the server pushes them, until the stream ends or goes silent."""
        if not self.endpoint.exists():
            raise not_running(self.endpoint)
        call = self._stub.Watch(vmcache_pb2.WatchRequest())
        silence = FIRST_SNAPSHOT_TIMEOUT
        try:
            while True:
                try:
                    message = await asyncio.wait_for(call.read(), silence)
                except TimeoutError:
                    raise ServerGone(f"the server at {self.endpoint} fell silent "
                                     f"(nothing for {silence:g} s)") from None
                except grpc.aio.AioRpcError as exc:
                    raise self._error("Watch", exc) from None
                if message is grpc.aio.EOF:
                    raise ServerGone(f"the server at {self.endpoint} ended the stream")
                snapshot = Snapshot.from_proto(message)
                silence = max(MISSED_HEARTBEATS * snapshot.heartbeat_seconds, 1.0)
                yield snapshot
        finally:
            call.cancel()
