"""What the robustness tests look at from outside the daemon: its process (/proc: open
files, RSS, CPU time), its gRPC endpoint (a synchronous client, and raw HTTP/2 frames for
the conversations no well-behaved client would have), and the VMs it hands out."""

from __future__ import annotations

import json
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2

from kata_vmcache.proto import cache_pb2_grpc, vmcache_pb2, vmcache_pb2_grpc

# --- the daemon's process ------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process itself (not of its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command name: state is field 3 of stat(5); utime and stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- gRPC, synchronously ------------------------------------------------------------------


@dataclass(frozen=True)
class TakenVM:
    id: str
    pid: int
    hypervisor: dict[str, Any]


def stub(endpoint: Path) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(f"unix:{endpoint}")
    return channel, cache_pb2_grpc.CacheServiceStub(channel)


def status_pids(endpoint: Path, timeout: float = 10.0) -> list[int]:
    channel, s = stub(endpoint)
    with channel:
        reply = s.Status(empty_pb2.Empty(), timeout=timeout)
    return [v.pid for v in reply.vmstatus]


def owned_vms(endpoint: Path, timeout: float = 10.0) -> list[tuple[int, str]]:
    """(pid, state) of every VM the daemon owns, booting ones included: the Monitor
    snapshot (Kata's Status lists only the ready ones)."""
    channel = grpc.insecure_channel(f"unix:{endpoint}")
    with channel:
        reply = vmcache_pb2_grpc.MonitorStub(channel).Snapshot(
            vmcache_pb2.SnapshotRequest(), timeout=timeout)
    return [(v.pid, v.state) for v in reply.vms]


def get_vm(endpoint: Path, timeout: float = 60.0) -> TakenVM:
    channel, s = stub(endpoint)
    with channel:
        reply = s.GetBaseVM(empty_pb2.Empty(), timeout=timeout)
    hypervisor = json.loads(reply.hypervisor)
    return TakenVM(reply.id, hypervisor["Pid"], hypervisor)


# --- raw HTTP/2 -----------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = (
    0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + \
        struct.pack(">I", stream) + payload


def settings(**values: int) -> bytes:
    ids = {"initial_window_size": SETTINGS_INITIAL_WINDOW_SIZE}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v)
                                          for k, v in values.items()))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def _hpack_int(value: int) -> bytes:
    # HPACK integer with a 7-bit prefix, no Huffman bit (RFC 7541 5.1).
    if value < 127:
        return bytes([value])
    out, value = [127], value - 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def header_block(headers: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing (RFC 7541 6.2.2): no table, no Huffman."""
    block = b""
    for name, value in headers:
        n, v = name.encode(), value.encode()
        block += b"\x00" + _hpack_int(len(n)) + n + _hpack_int(len(v)) + v
    return block


def grpc_request(method: str, message: bytes = b"", *, stream: int = 1,
                 declared_length: int | None = None,
                 extra_headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """HEADERS + DATA of one gRPC call; `declared_length` lies about the message size."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", method),
               (":authority", "localhost"), ("content-type", "application/grpc"),
               ("te", "trailers"), *extra_headers]
    length = len(message) if declared_length is None else declared_length
    body = b"\x00" + struct.pack(">I", length) + message
    return (frame(HEADERS, END_HEADERS, stream, header_block(headers))
            + frame(DATA, END_STREAM, stream, body))


class RawConnection:
    """A Unix-socket connection that speaks whatever bytes a test sends."""

    def __init__(self, endpoint: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(endpoint))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream, payload), or None at end of stream."""
        head = self._read(9)
        if head is None:
            return None
        length = int.from_bytes(head[:3], "big")
        payload = self._read(length) if length else b""
        if payload is None:
            return None
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def closed_by_peer(self) -> bool:
        """True once the server has closed its end (reads return EOF or reset)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()
