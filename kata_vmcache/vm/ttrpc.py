"""A ttrpc client: unary calls, enough for Kata 3.x's agent health check.

Kata 3.x's runtime talks to the agent in its guest with containerd's ttrpc, not gRPC
(kata-containers 3.30.0, src/runtime/virtcontainers/pkg/agent/protocols/client/client.go
`NewAgentClient`: a vsock connection to `vsock://<cid>:1024`, then `ttrpc.NewClient`; the
agent's services are registered as "grpc.Health", "grpc.AgentService", ...,
pkg/agent/protocols/grpc/health_ttrpc.pb.go). ttrpc, as vendored there
(github.com/containerd/ttrpc v1.2.7, PROTOCOL.md, channel.go, client.go):

- a connection carries frames: a 10-byte header (data length and stream id, big-endian
  uint32; message type and flags, uint8) and at most 4 MiB of data;
- a unary call is one stream: the client sends a Request frame (type 1, no flags) on a
  new odd stream id (1, 3, 5, ...), whose data is a `ttrpc.Request` {service, method,
  payload, timeout_nano, metadata}; the server answers with one Response frame (type 2) on
  the same stream, a `ttrpc.Response` {status (google.rpc.Status), payload};
- the method's own messages travel serialized in `payload`.

The two envelope messages are declared in protos/ttrpc.proto and generated like our other
protobuf code, rather than encoded by hand: their field numbers and types then sit in one
file that reads like ttrpc's own request.proto, the protobuf runtime (already ours for
gRPC) does the varint and length-prefix work and skips what we do not declare (a Status's
`details`), and `make proto` keeps them fresh like the rest. The framing, which no
.proto describes, is written out here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from ..errors import TtrpcError, TtrpcProtocolError
from ..proto import ttrpc_pb2

#: channel.go: length, stream id, type, flags.
HEADER = struct.Struct(">IIBB")
#: channel.go messageLengthMax.
MESSAGE_LENGTH_MAX = 4 << 20
#: channel.go message types.
TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3

#: gRPC status codes by number (ttrpc's statuses are gRPC's).
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass(frozen=True)
class VsockAddress:
    """An AF_VSOCK address: the guest's context id and a port."""

    cid: int
    port: int

    def __str__(self) -> str:
        # Kata's agent URL (types.VSock.String(): vsock://<cid>:<port>).
        return f"vsock://{self.cid}:{self.port}"


#: Where a ttrpc server listens: a guest's vsock port, or a Unix socket (tests, hybrid
#: setups).
Address = VsockAddress | Path


class TtrpcClient:
    """One ttrpc connection. Calls are made one at a time (each waits for its response,
    which is all a health check needs); after any failed call the connection's state is
    unknown, so the caller closes it and connects again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        #: client.go: client-initiated streams are odd, from 1, in steps of 2.
        self._next_stream = 1
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, address: Address, timeout: float) -> TtrpcClient:
        async with asyncio.timeout(timeout):
            if isinstance(address, Path):
                reader, writer = await asyncio.open_unix_connection(str(address))
                return cls(reader, writer)
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (address.cid,
                                                                     address.port))
                reader, writer = await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
            return cls(reader, writer)

    async def call(self, service: str, method: str, payload: bytes, timeout: float) -> bytes:
        """One unary call; returns the response's payload. Raises TtrpcError for a non-OK
        status, TtrpcProtocolError for a broken frame, TimeoutError, or OSError."""
        async with self._lock, asyncio.timeout(timeout):
            stream = self._next_stream
            self._next_stream += 2
            # client.go Call: the deadline goes along as timeout_nano.
            request = ttrpc_pb2.Request(service=service, method=method, payload=payload,
                                        timeout_nano=int(timeout * 1e9)).SerializeToString()
            if len(request) > MESSAGE_LENGTH_MAX:
                raise TtrpcProtocolError(f"request of {len(request)} bytes exceeds "
                                         f"{MESSAGE_LENGTH_MAX}")
            self._writer.write(HEADER.pack(len(request), stream, TYPE_REQUEST, 0) + request)
            await self._writer.drain()
            data = await self._response(stream)
        try:
            response = ttrpc_pb2.Response.FromString(data)
        except DecodeError as exc:
            raise TtrpcProtocolError(f"undecodable response: {exc}") from exc
        if response.status.code != 0:
            code = response.status.code
            raise TtrpcError(code, response.status.message, _CODE_NAMES.get(code, ""))
        return response.payload

    async def _response(self, stream: int) -> bytes:
        try:
            header = await self._reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the ttrpc server closed the connection") from exc
        length, got_stream, kind, _flags = HEADER.unpack(header)
        if length > MESSAGE_LENGTH_MAX:
            raise TtrpcProtocolError(f"a frame of {length} bytes exceeds {MESSAGE_LENGTH_MAX}")
        if got_stream != stream or kind != TYPE_RESPONSE:
            raise TtrpcProtocolError(f"expected a response on stream {stream}, got message "
                                     f"type {kind} on stream {got_stream}")
        try:
            return await self._reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the ttrpc server closed the connection in the "
                                       "middle of a frame") from exc

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
