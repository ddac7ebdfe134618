"""Kata 3.x's agent health check over ttrpc (kata_vmcache/vm/ttrpc.py, probe.KataTtrpcProbe),
against a stand-in agent: a ttrpc server written here from ttrpc's PROTOCOL.md, on a real
Unix socket with real framing. The envelope's field numbers are pinned against ttrpc's
request.proto, and one frame against bytes worked out by hand, so client and stand-in
cannot agree on a wrong encoding. Over AF_VSOCK only the failure path can run here (no
/dev/vhost-vsock, so no guest to connect to).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor as F

from kata_vmcache.errors import TtrpcError, TtrpcProtocolError
from kata_vmcache.proto import agent_health_pb2, ttrpc_pb2
from kata_vmcache.vm.paths import VMPaths
from kata_vmcache.vm.probe import KataTtrpcProbe
from kata_vmcache.vm.ttrpc import TtrpcClient, VsockAddress

#: PROTOCOL.md: data length, stream id (big-endian uint32), type, flags (uint8).
FRAME = struct.Struct(">IIBB")
REQUEST, RESPONSE = 1, 2
UNAVAILABLE = 14


class AgentStandIn:
    """The agent's ttrpc side, as far as a health check goes. `script` says what to do with
    each request in turn ("serve" once it runs out): "serve" answers SERVING, "unavailable"
    a non-OK status, "close" hangs up without answering, "wrong-stream" answers on
    another stream, "oversize" announces a frame over 4 MiB, "silent" never answers."""

    def __init__(self, path: Path, script: list[str] | None = None) -> None:
        self.path = path
        self.script = list(script or [])
        #: (stream id, type, flags, request) of every request frame received.
        self.received: list[tuple[int, int, int, Any]] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> AgentStandIn:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            while True:
                length, stream, kind, flags = FRAME.unpack(await reader.readexactly(FRAME.size))
                request = ttrpc_pb2.Request.FromString(await reader.readexactly(length))
                self.received.append((stream, kind, flags, request))
                action = self.script.pop(0) if self.script else "serve"
                if action == "close":
                    return
                if action == "silent":
                    await asyncio.Event().wait()
                if action == "oversize":
                    writer.write(FRAME.pack(5 << 20, stream, RESPONSE, 0))
                    await writer.drain()
                    continue
                if action == "unavailable":
                    response = ttrpc_pb2.Response(status=ttrpc_pb2.Status(
                        code=UNAVAILABLE, message="agent starting"))
                else:
                    health = agent_health_pb2.HealthCheckResponse(
                        status=agent_health_pb2.HealthCheckResponse.SERVING)
                    response = ttrpc_pb2.Response(payload=health.SerializeToString())
                data = response.SerializeToString()
                reply_stream = stream + 2 if action == "wrong-stream" else stream
                writer.write(FRAME.pack(len(data), reply_stream, RESPONSE, 0) + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()


@pytest_asyncio.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentStandIn]:
    stand_in = await AgentStandIn(tmp_path / "agent.sock").start()
    yield stand_in
    await stand_in.stop()


async def probe_until_ready(probe: KataTtrpcProbe, bound: float = 30.0) -> None:
    try:
        await asyncio.wait_for(probe.wait(), bound)
    finally:
        await probe.close()


# --- the wire format ------------------------------------------------------------------

#: github.com/containerd/ttrpc v1.2.7 request.proto (vendored by kata-containers 3.30.0)
#: and google.rpc.Status, which its Response carries.
ENVELOPE = {
    "Request": [("service", 1, F.TYPE_STRING), ("method", 2, F.TYPE_STRING),
                ("payload", 3, F.TYPE_BYTES), ("timeout_nano", 4, F.TYPE_INT64),
                ("metadata", 5, F.TYPE_MESSAGE)],
    "Response": [("status", 1, F.TYPE_MESSAGE), ("payload", 2, F.TYPE_BYTES)],
    "KeyValue": [("key", 1, F.TYPE_STRING), ("value", 2, F.TYPE_STRING)],
    "Status": [("code", 1, F.TYPE_INT32), ("message", 2, F.TYPE_STRING)],
}


def test_envelope_matches_ttrpc() -> None:
    for name, fields in ENVELOPE.items():
        descriptor = ttrpc_pb2.DESCRIPTOR.message_types_by_name[name]
        assert [(f.name, f.number, f.type) for f in descriptor.fields] == fields, name
    assert ttrpc_pb2.Request.DESCRIPTOR.fields_by_name["metadata"].is_repeated


@pytest.mark.asyncio
async def test_a_check_is_one_request_frame_as_ttrpc_writes_it(tmp_path: Path) -> None:
    """The bytes of a health check with a 1 s deadline, worked out from protobuf's encoding
    and ttrpc's framing: header (26 bytes of data, stream 1, type 1, no flags), field 1
    "grpc.Health", field 2 "Check", no payload (an empty CheckRequest), field 4 1e9."""
    frames: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames.append(await reader.readexactly(10 + 26))
        writer.close()

    server = await asyncio.start_unix_server(record, str(tmp_path / "raw.sock"))
    client = await TtrpcClient.connect(tmp_path / "raw.sock", 5.0)
    try:
        with pytest.raises(ConnectionResetError):
            await client.call("grpc.Health", "Check", b"", timeout=1.0)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert frames == [bytes.fromhex(
        "0000001a 00000001 01 00"
        "0a0b 67 72 70 63 2e 48 65 61 6c 74 68"   # 1: "grpc.Health"
        "1205 43 68 65 63 6b"                     # 2: "Check"
        "20 80 94 eb dc 03")]                     # 4: 1000000000


@pytest.mark.asyncio
async def test_a_response_decodes_as_ttrpc_sends_it(tmp_path: Path) -> None:
    """A Response frame in bytes (status {14, "x"}, payload SERVING) is read as such."""
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length, stream, _, _ = FRAME.unpack(await reader.readexactly(10))
        await reader.readexactly(length)
        body = bytes.fromhex("0a05 080e 120178"  # 1: Status{code 14, message "x"}
                             "1202 0801")        # 2: payload HealthCheckResponse{SERVING}
        writer.write(FRAME.pack(len(body), stream, RESPONSE, 0) + body)
        await writer.drain()

    server = await asyncio.start_unix_server(reply, str(tmp_path / "raw.sock"))
    client = await TtrpcClient.connect(tmp_path / "raw.sock", 5.0)
    try:
        with pytest.raises(TtrpcError) as failed:
            await client.call("grpc.Health", "Check", b"", timeout=5.0)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert (failed.value.code, failed.value.code_name, failed.value.message) == (
        UNAVAILABLE, "UNAVAILABLE", "x")


# --- the client -----------------------------------------------------------------------

@pytest.mark.asyncio
async def test_calls_use_odd_increasing_streams(agent: AgentStandIn) -> None:
    client = await TtrpcClient.connect(agent.path, 5.0)
    try:
        for _ in range(3):
            payload = await client.call("grpc.Health", "Check", b"", timeout=5.0)
            assert agent_health_pb2.HealthCheckResponse.FromString(payload).status == \
                agent_health_pb2.HealthCheckResponse.SERVING
    finally:
        await client.close()
    assert [(s, t, f) for s, t, f, _ in agent.received] == [(1, REQUEST, 0), (3, REQUEST, 0),
                                                            (5, REQUEST, 0)]
    assert agent.connections == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("action", "error", "text"), [
    ("unavailable", TtrpcError, "UNAVAILABLE: agent starting"),
    ("close", ConnectionResetError, "closed the connection"),
    ("wrong-stream", TtrpcProtocolError, "expected a response on stream 1"),
    ("oversize", TtrpcProtocolError, "exceeds 4194304"),
])
async def test_a_failed_call_says_why(tmp_path: Path, action: str, error: type[Exception],
                                      text: str) -> None:
    agent = await AgentStandIn(tmp_path / "agent.sock", [action]).start()
    client = await TtrpcClient.connect(agent.path, 5.0)
    try:
        with pytest.raises(error, match=text):
            await client.call("grpc.Health", "Check", b"", timeout=5.0)
    finally:
        await client.close()
        await agent.stop()


@pytest.mark.asyncio
async def test_an_unanswered_call_times_out(tmp_path: Path) -> None:
    agent = await AgentStandIn(tmp_path / "agent.sock", ["silent"]).start()
    client = await TtrpcClient.connect(agent.path, 5.0)
    try:
        with pytest.raises(TimeoutError):
            await client.call("grpc.Health", "Check", b"", timeout=0.2)
    finally:
        await client.close()
        await agent.stop()
    (_, _, _, request), = agent.received
    assert request.timeout_nano == 200_000_000


# --- the probe ------------------------------------------------------------------------

NO_VM = VMPaths(dir=Path("/nonexistent/vm"), own=Path("/nonexistent/own"),
                sandbox=Path("/nonexistent/sbs"))

@pytest.mark.asyncio
async def test_probe_is_ready_when_the_agent_answers(agent: AgentStandIn) -> None:
    probe = KataTtrpcProbe(agent.path)
    await probe.attach(NO_VM)  # nothing to attach to: the agent answers when asked
    await probe_until_ready(probe)
    assert probe.answer == "SERVING"
    (stream, kind, flags, request), = agent.received
    assert (stream, kind, flags) == (1, REQUEST, 0)
    assert (request.service, request.method) == ("grpc.Health", "Check")
    assert agent_health_pb2.CheckRequest.FromString(request.payload) == \
        agent_health_pb2.CheckRequest()
    assert request.timeout_nano > 0


@pytest.mark.asyncio
async def test_probe_asks_again_after_failures(tmp_path: Path) -> None:
    """An error status, a hang-up and a broken frame each cost one attempt on a fresh
    connection; the last failure is kept for the timeout message."""
    agent = await AgentStandIn(tmp_path / "agent.sock",
                               ["unavailable", "close", "wrong-stream"]).start()
    probe = KataTtrpcProbe(agent.path)
    try:
        await probe_until_ready(probe)
    finally:
        await agent.stop()
    assert probe.answer == "SERVING"
    assert len(agent.received) == 4
    assert agent.connections == 4  # every failure drops the connection
    assert b"expected a response on stream 1" in probe.seen[-1]


@pytest.mark.asyncio
async def test_probe_waits_for_the_agent_to_listen(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    probe = KataTtrpcProbe(path)
    waiting = asyncio.ensure_future(probe_until_ready(probe))
    try:
        while not probe.seen:  # the probe has tried, and failed, to connect
            assert not waiting.done()
            await asyncio.sleep(0.01)
        assert str(path).encode() in probe.seen[-1]
        agent = await AgentStandIn(path).start()
        try:
            await waiting
        finally:
            await agent.stop()
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    assert probe.answer == "SERVING"


@pytest.mark.asyncio
async def test_probe_over_vsock_reports_an_unreachable_guest() -> None:
    """AF_VSOCK for real: no guest has CID 3 here (no /dev/vhost-vsock), so the probe
    keeps failing, names the agent's URL, and is never ready."""
    probe = KataTtrpcProbe(VsockAddress(3, 1024))
    with pytest.raises(TimeoutError):
        await probe_until_ready(probe, bound=1.0)
    assert probe.url == "vsock://3:1024"
    assert probe.seen
    assert probe.seen[-1].startswith(b"the agent at vsock://3:1024 did not answer (")
