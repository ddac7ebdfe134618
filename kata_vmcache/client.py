"""Client of a VM cache server: Kata's four RPCs over the Unix socket, with deadlines.

    async with CacheClient(Path("/run/kata-containers/cache.sock")) as client:
        print(await client.status())
        vm = await client.get_base_vm()      # a paused VM that the caller now owns

Every call has a deadline. Errors are ours, one line each: `ServerUnavailable` when nothing
listens (naming the path and how to start a server), `RemoteError` when the server refuses,
`TimeoutError`-flavoured `RemoteError` when the deadline passes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2

from .errors import RemoteError, ServerUnavailable
from .proto import cache_pb2_grpc

DEFAULT_TIMEOUT = 10.0
#: GetBaseVM may wait for a VM to boot when the cache is empty.
DEFAULT_GET_TIMEOUT = 60.0


@dataclass(frozen=True)
class VMStatus:
    pid: int
    cpu: int
    memory_mib: int


@dataclass(frozen=True)
class ServerStatus:
    pid: int
    vms: tuple[VMStatus, ...]
    #: Bytes the VM template occupies, or None when templating is off.
    template_bytes: int | None = None


@dataclass(frozen=True)
class BaseVM:
    """GetBaseVM's reply, decoded. `hypervisor` is Kata's qemu hand-off record."""

    id: str
    cpu: int
    memory: int
    cpu_delta: int
    hypervisor: dict[str, Any]

    @property
    def qmp_path(self) -> Path:
        return Path(self.hypervisor["QmpChannelpath"])

    @property
    def pid(self) -> int | None:
        pid = self.hypervisor.get("Pid")
        return pid if isinstance(pid, int) else None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "cpu": self.cpu, "memory": self.memory,
                "cpuDelta": self.cpu_delta, "hypervisor": self.hypervisor}


def not_running(endpoint: Path) -> ServerUnavailable:
    return ServerUnavailable(f"no VM cache server at {endpoint} "
                             "(is 'kata-vmcache init' running?)")


class CacheClient:
    def __init__(self, endpoint: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> CacheClient:
        self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def connect(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self.endpoint}")
            self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _call(self, method: str, timeout: float | None,
                    trailers: dict[str, str] | None = None) -> Any:
        if not self.endpoint.exists():
            raise not_running(self.endpoint)
        self.connect()
        try:
            call = getattr(self._stub, method)(empty_pb2.Empty(),
                                              timeout=timeout or self.timeout)
            reply = await call
            if trailers is not None:
                trailers.update((k, v) for k, v in (await call.trailing_metadata() or ())
                                if isinstance(v, str))
            return reply
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
                raise not_running(self.endpoint) from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RemoteError(f"{method} on {self.endpoint}: no answer within "
                                  f"{timeout or self.timeout:g} s") from None
            raise RemoteError(f"{method} on {self.endpoint} failed: {code.name}: "
                              f"{exc.details()}") from None

    async def config(self, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The server's VMConfig and AgentConfig, decoded from Kata's JSON."""
        reply = await self._call("Config", timeout)
        return json.loads(reply.Data), json.loads(reply.AgentConfig)

    async def status(self, timeout: float | None = None) -> ServerStatus:
        trailers: dict[str, str] = {}
        reply = await self._call("Status", timeout, trailers)
        template = trailers.get("x-kata-vmcache-template-bytes")
        return ServerStatus(reply.pid, tuple(VMStatus(v.pid, v.cpu, v.memory)
                                             for v in reply.vmstatus),
                            int(template) if template and template.isdigit() else None)

    async def get_base_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> BaseVM:
        """Take a paused VM. From the reply on, the caller owns it (and must stop it)."""
        reply = await self._call("GetBaseVM", timeout)
        return BaseVM(reply.id, reply.cpu, reply.memory, reply.cpuDelta,
                      json.loads(reply.hypervisor))

    async def quit(self, timeout: float | None = None) -> None:
        await self._call("Quit", timeout)
