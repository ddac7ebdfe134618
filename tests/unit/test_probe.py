"""The agent health-check probe against a real gRPC server built from the agent's proto
(protos/agent_health.proto) on a real Unix socket: what a kata-proxy relays from an agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from kata_vmcache.proto import agent_health_pb2, agent_health_pb2_grpc
from kata_vmcache.vm.paths import VMPaths
from kata_vmcache.vm.probe import KataAgentProbe

Status = agent_health_pb2.HealthCheckResponse


class Agent(agent_health_pb2_grpc.HealthServicer):
    def __init__(self, status: Status.ServingStatus) -> None:
        self.status = status
        self.checks = 0

    async def Check(self, request: agent_health_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> agent_health_pb2.HealthCheckResponse:
        self.checks += 1
        return Status(status=self.status)


#: Serves an agent on a Unix socket until the test ends.
Serve = Callable[[Agent, Path], Awaitable[None]]


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    servers: list[grpc.aio.Server] = []

    async def start(agent: Agent, path: Path) -> None:
        server = grpc.aio.server()
        agent_health_pb2_grpc.add_HealthServicer_to_server(agent, server)
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        servers.append(server)

    yield start
    for server in servers:
        await server.stop(0)


async def probed(url: str) -> KataAgentProbe:
    """A probe that has waited for the agent at `url` (10 s at most) and is closed."""
    probe = KataAgentProbe(url)
    await probe.attach(PATHS)
    try:
        await asyncio.wait_for(probe.wait(), 10)
    finally:
        await probe.close()
    return probe


PATHS = VMPaths(dir=Path("/nonexistent/vm"), own=Path("/nonexistent/own"),
                sandbox=Path("/nonexistent/sbs"))


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "name"), [(Status.SERVING, "SERVING"),
                                              (Status.NOT_SERVING, "NOT_SERVING")])
async def test_any_answer_is_an_agent_that_is_up(serve: Serve, tmp_path: Path,
                                                 status: Status.ServingStatus,
                                                 name: str) -> None:
    """Kata's agent.check() only asks for an answer; the status is kept for the log."""
    agent = Agent(status)
    await serve(agent, tmp_path / "proxy.sock")
    probe = await probed(f"unix://{tmp_path}/proxy.sock")
    assert probe.answer == name
    assert agent.checks == 1


@pytest.mark.asyncio
async def test_the_probe_asks_until_the_agent_is_up(serve: Serve, tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"
    probe = KataAgentProbe(f"unix://{path}")
    await probe.attach(PATHS)
    try:
        waiting = asyncio.ensure_future(probe.wait())
        # Nobody there yet: the one request waits, and the probe says where it stands.
        done, _ = await asyncio.wait({waiting}, timeout=1.0)
        assert not done
        assert b"did not answer yet (channel TRANSIENT_FAILURE)" in probe.seen[-1]
        assert str(path).encode() in probe.seen[-1]
        agent = Agent(Status.SERVING)
        await serve(agent, path)
        await asyncio.wait_for(waiting, 10)
    finally:
        await probe.close()
    assert probe.answer == "SERVING"


@pytest.mark.asyncio
async def test_one_request_waits_for_the_agent(serve: Serve, tmp_path: Path) -> None:
    """Kata's check is one request on a blocking dial, not a check every few ms: however
    long the agent takes to appear, it is asked once."""
    path = tmp_path / "proxy.sock"
    probe = KataAgentProbe(f"unix://{path}")
    await probe.attach(PATHS)
    try:
        waiting = asyncio.ensure_future(probe.wait())
        await asyncio.sleep(1.5)
        agent = Agent(Status.SERVING)
        await serve(agent, path)
        await asyncio.wait_for(waiting, 10)
    finally:
        await probe.close()
    assert agent.checks == 1


@pytest.mark.asyncio
async def test_the_wait_has_a_deadline(tmp_path: Path) -> None:
    probe = KataAgentProbe(f"unix://{tmp_path}/proxy.sock", timeout=0.5)
    await probe.attach(PATHS)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(probe.wait(), 10)
    finally:
        await probe.close()
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert b"DEADLINE_EXCEEDED" in probe.seen[-1]


class RestartingAgent(Agent):
    """Fails its first check as an agent restarting its server under the call would."""

    async def Check(self, request: agent_health_pb2.CheckRequest,
                    context: grpc.aio.ServicerContext) -> agent_health_pb2.HealthCheckResponse:
        self.checks += 1
        if self.checks == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "agent grpc server quits")
        return Status(status=self.status)


@pytest.mark.asyncio
async def test_a_call_broken_by_a_restarting_agent_is_asked_again(serve: Serve,
                                                                 tmp_path: Path) -> None:
    agent = RestartingAgent(Status.SERVING)
    await serve(agent, tmp_path / "proxy.sock")
    probe = await probed(f"unix://{tmp_path}/proxy.sock")
    assert agent.checks == 2
    assert probe.answer == "SERVING"
    assert probe.seen == []
