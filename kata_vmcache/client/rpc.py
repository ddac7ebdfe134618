"""Client of a VM cache server: Kata's four RPCs over the Unix socket, with deadlines.

    async with CacheClient(Path("/run/kata-containers/cache.sock")) as client:
        print(await client.status())
        base = await client.get_base_vm()    # a paused VM that the caller now owns

Every call has a deadline. Errors are ours, one line each: `ServerUnavailable` when nothing
listens (naming the path and how to start a server), `RemoteError` when the server refuses,
`TimeoutError`-flavoured `RemoteError` when the deadline passes. `config_differences` is
Kata's `checkVMConfig`, for a caller that compares its own configuration with the cache's.

Taking a VM and bringing it up as asked (Kata's factory `GetVM`) is `getvm.get_vm()`;
`sync.SyncCacheClient` is this client and `get_vm()` for scripts, without asyncio.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2

from .. import kata
from ..errors import RemoteError, ServerUnavailable
from ..proto import cache_pb2_grpc
from ..shape import KEY as VM_SHAPE_KEY
from ..shape import VMShape
from ..vm.handoff import HandOff

log = logging.getLogger(__name__)

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


#: GetBaseVM's reply, decoded: the daemon's hand-off record (handoff.py), the same type.
BaseVM = HandOff


def not_running(endpoint: Path) -> ServerUnavailable:
    return ServerUnavailable(f"no VM cache server at {endpoint} "
                             "(is 'kata-vmcache init' running?)")


def rpc_error(endpoint: Path, method: str, timeout: float, exc: grpc.aio.AioRpcError, *,
              error: type[RemoteError] = RemoteError) -> ServerUnavailable | RemoteError:
    """One line for a failed call: no server there, no answer in time (with the server's
    reason when it gave one), or the status it answered with."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
        return not_running(endpoint)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The server's own reason (e.g. why no VM is ready), when it gave one.
        why = exc.details() or ""
        why = f" ({why})" if why and why != "Deadline Exceeded" else ""
        return error(f"{method} on {endpoint}: no answer within {timeout:g} s{why}")
    return error(f"{method} on {endpoint} failed: {code.name}: {exc.details()}")


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
            raise rpc_error(self.endpoint, method, timeout or self.timeout, exc) from None

    async def config(self, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The server's VMConfig and AgentConfig, decoded from Kata's JSON."""
        vm_config, agent_config, _ = await self.config_and_shape(timeout)
        return vm_config, agent_config

    async def config_and_shape(self, timeout: float | None = None
                               ) -> tuple[dict[str, Any], dict[str, Any], VMShape | None]:
        """`config()`, and the VM the server boots (None from a server that does not say:
        Kata's own)."""
        trailers: dict[str, str] = {}
        reply = await self._call("Config", timeout, trailers)
        return (json.loads(reply.Data), json.loads(reply.AgentConfig),
                VMShape.parse(trailers.get(VM_SHAPE_KEY)))

    async def status(self, timeout: float | None = None) -> ServerStatus:
        trailers: dict[str, str] = {}
        reply = await self._call("Status", timeout, trailers)
        template = trailers.get("x-kata-vmcache-template-bytes")
        return ServerStatus(reply.pid, tuple(VMStatus(v.pid, v.cpu, v.memory)
                                             for v in reply.vmstatus),
                            int(template) if template and template.isdigit() else None)

    async def get_base_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> BaseVM:
        """Take a paused VM. From the reply on, the caller owns it (and must stop it)."""
        return HandOff.from_message(await self._call("GetBaseVM", timeout))

    async def quit(self, timeout: float | None = None) -> None:
        await self._call("Quit", timeout)


# --- does the request fit the cache? -------------------------------------------------------

_MISSING = object()


def config_differences(cache: Mapping[str, Any],
                       request: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Kata's `checkVMConfig`: both VMConfigs reset for comparison, then compared deeply.

    Returns the differing leaves as (dotted key, cache's value, request's value); empty when
    the request fits. As Go's decoder does, a key absent on one side counts as its zero
    value, so it only differs from a value that is not zero.
    """
    out: list[tuple[str, Any, Any]] = []
    _diff(kata.reset_for_compare(cache), kata.reset_for_compare(request), "", out)
    return out


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str,
          out: list[tuple[str, Any, Any]]) -> None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            _diff(x, y, f"{prefix}{key}.", out)
        elif x is _MISSING or y is _MISSING:
            present = y if x is _MISSING else x
            if present:
                out.append((f"{prefix}{key}", None if x is _MISSING else x,
                            None if y is _MISSING else y))
        elif x != y or type(x) is not type(y):
            out.append((f"{prefix}{key}", x, y))


def describe_differences(differences: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    """`HypervisorConfig.KernelPath (cache '/a', request '/b'); ...` for a log line."""
    def short(value: Any, limit: int = 100) -> str:
        # Both ends: paths differ at the end, lists anywhere.
        text = json.dumps(value)
        return text if len(text) <= limit else f"{text[:30]}...{text[33 - limit:]}"

    parts = [f"{key} (cache {short(x)}, request {short(y)})"
             for key, x, y in differences[:shown]]
    if len(differences) > shown:
        parts.append(f"and {len(differences) - shown} more: "
                     + ", ".join(key for key, _, _ in differences[shown:]))
    return "; ".join(parts)
