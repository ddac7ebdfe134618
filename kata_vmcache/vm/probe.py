"""Readiness probes: how the daemon knows a guest is up, not merely that QEMU started.

A probe is attached before the guest's CPUs run (QEMU starts with `-S`), so a signal the
guest sends early cannot be missed; then the daemon sends `cont` and waits on the probe.

- `KataAgentProbe`: the guest's Kata agent answers its gRPC health check (`/grpc.Health/
  Check`), which is what Kata's `NewVM` asks (`agent.check()`) before a factory VM is
  paused. Kata 1.x with a serial channel: through the VM's kata-proxy, at its URL.
- `KataTtrpcProbe`: the same check as Kata 3.x asks it, over ttrpc (`grpc.Health`,
  `Check`) on the agent's vsock port.
- `SerialLineProbe`: the guest prints a line (`KATA-VMCACHE-READY` for the bundled demo
  guest) on our second serial port, a QEMU chardev socket we connect to.

There is no probe that declares a VM ready without its guest's word: a VM enters the cache
only once its guest has booted (Kata's NewVM boots, checks the agent, then pauses).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from ..errors import TtrpcError, TtrpcProtocolError
from ..proto import agent_health_pb2, agent_health_pb2_grpc
from .guest_channel import GuestChannel
from .paths import VMPaths
from .ttrpc import Address, TtrpcClient

#: Kata 3.x over ttrpc: one health check's deadline; the probe asks again until the
#: caller's bound.
AGENT_CHECK_TIMEOUT = 1.0
#: Kata 3.x over ttrpc: pause between checks while the agent is not up yet.
AGENT_RETRY_INTERVAL = 0.1
#: Kata 1.x over gRPC: the deadline of the one blocking health check, when the caller sets
#: none (the daemon passes its ready_timeout).
AGENT_WAIT_TIMEOUT = 30.0
#: The agent probe's gRPC channel. gRPC's reconnect backoff (1 s, growing to 120 s) is made
#: for servers far away; here the proxy's socket appears milliseconds after its launch and an
#: agent that restarted its session listens again at once, so a failed connection is tried
#: again within 10 to 100 ms. Kata's own dialer retries at once, bypassing gRPC's backoff
#: (kata-containers/agent protocols/client/client.go, commonDialer). The connect timeout
#: (grpc.min_reconnect_backoff_ms, 20 s) stays: a connection through kata-proxy waits in
#: its handshake until the agent reads the serial port, and cutting that short would only
#: open one yamux stream after another while the guest boots.
AGENT_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 10),
                         ("grpc.max_reconnect_backoff_ms", 100))


class ReadinessProbe(Protocol):
    async def attach(self, paths: VMPaths) -> None:
        """Connect to the guest's signal, before the guest runs."""

    async def wait(self) -> None:
        """Return once the guest is ready (the caller bounds the time)."""

    async def close(self) -> None:
        """Release what attach() took; the guest keeps running."""

    @property
    def seen(self) -> list[bytes]:
        """What the guest (or the agent's channel) last said short of ready: a boot that
        times out shows it."""
        ...


class SerialLineProbe:
    """Ready when the guest prints `line` on our second serial port: the guest channel's
    own reader (`GuestChannel.wait_ready`), connected before the guest runs. `seen` holds
    the last lines the guest said instead, which the boot's timeout error shows."""

    def __init__(self, line: str) -> None:
        self.line = line
        # Kept after close(): a failed boot's error reads `seen` then.
        self._channel: GuestChannel | None = None

    @property
    def seen(self) -> list[bytes]:
        return [line.encode() for line in self._channel.seen] if self._channel else []

    async def attach(self, paths: VMPaths) -> None:
        self._channel = await GuestChannel.connect(paths.guest)

    async def wait(self) -> None:
        assert self._channel is not None, "attach() first"
        await self._channel.wait_ready(None, line=self.line)  # the caller bounds the time

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class KataAgentProbe:
    """Ready when the Kata agent answers `Health.Check` at `url` (Kata's agent.check()
    treats any answer as alive; the status it gave is kept for the log).

    One request that blocks until the agent answers, as Kata's `NewVM` asks it (kata_agent.go
    `check` on a connection dialled with `grpc.WithBlock()`): `wait_for_ready` holds the call
    through the channel's connection attempts, so no check runs every few ms while the guest
    boots on the CPU a sandbox may need. A call that fails anyway (the agent restarted its
    session under it) is asked again at once. `timeout` bounds the call (the caller may
    cancel it sooner). `seen` says where the wait stands, which a boot's timeout shows."""

    def __init__(self, url: str, timeout: float = AGENT_WAIT_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self.answer = ""
        self._failure = ""
        self._channel: grpc.aio.Channel | None = None

    @property
    def seen(self) -> list[bytes]:
        if self._failure:
            return [self._failure.encode()]
        if self._channel is not None and not self.answer:
            state = self._channel.get_state().name
            return [f"the agent at {self.url} did not answer yet (channel {state})".encode()]
        return []

    async def attach(self, paths: VMPaths) -> None:
        # Nothing to catch early: the agent answers when asked, whenever it is up.
        self._channel = grpc.aio.insecure_channel(self.url, options=AGENT_CHANNEL_OPTIONS)

    async def wait(self) -> None:
        assert self._channel is not None, "attach() first"
        stub = agent_health_pb2_grpc.HealthStub(self._channel)
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                reply = await stub.Check(agent_health_pb2.CheckRequest(), timeout=max(left, 0),
                                         wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                self._failure = (f"the agent at {self.url} did not answer "
                                 f"({exc.code().name}: {exc.details()})")
                if exc.code() is grpc.StatusCode.UNAVAILABLE and left > 0:
                    continue  # the connection broke under the call: ask again at once
                raise
            self._failure = ""
            self.answer = agent_health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status)
            return

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()


class KataTtrpcProbe:
    """Kata 3.x: ready when the agent answers `grpc.Health`/`Check` over ttrpc at
    `address` (its vsock port, kata_agent.go agentURL; a Unix socket in tests). As Kata's
    `NewVM` (3.30.0 vm.go: `agent.check()`, kata_agent.go `check` sends a CheckRequest)
    any answer counts, and its status is kept for the log; until then the probe connects
    and asks again, as Kata's dialer retries (protocols/client/client.go commonDialer).
    `seen` holds the last failure, which the boot's timeout error shows."""

    SERVICE = "grpc.Health"
    METHOD = "Check"

    def __init__(self, address: Address) -> None:
        self.address = address
        self.seen: list[bytes] = []
        self.answer = ""
        self._client: TtrpcClient | None = None

    @property
    def url(self) -> str:
        return str(self.address)

    async def attach(self, paths: VMPaths) -> None:
        # Nothing to catch early: the agent answers when asked, whenever it is up.
        pass

    async def wait(self) -> None:
        request = agent_health_pb2.CheckRequest().SerializeToString()
        while True:
            try:
                if self._client is None:
                    self._client = await TtrpcClient.connect(self.address,
                                                             AGENT_CHECK_TIMEOUT)
                payload = await self._client.call(self.SERVICE, self.METHOD, request,
                                                  timeout=AGENT_CHECK_TIMEOUT)
                reply = agent_health_pb2.HealthCheckResponse.FromString(payload)
            except (OSError, TimeoutError, TtrpcError, TtrpcProtocolError,
                    DecodeError) as exc:
                detail = str(exc) or type(exc).__name__
                self.seen = [f"the agent at {self.url} did not answer ({detail})".encode()]
                await self.close()
                await asyncio.sleep(AGENT_RETRY_INTERVAL)
                continue
            self.answer = agent_health_pb2.HealthCheckResponse.ServingStatus.Name(
                reply.status)
            return

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
