"""Host side of the demo guest's agent channel: its second serial port (ttyS1).

QEMU exposes the port as a Unix socket chardev (`-chardev socket,id=agent,...,server=on,
wait=off -serial chardev:agent`). The protocol is one ASCII line per message; the guest
side, with the full list of commands, is `kata_vmcache/demo/init`:

    async with await GuestChannel.connect(paths.agent) as ch:
        await qmp.execute("cont")
        await ch.wait_ready(30)          # KATA-VMCACHE-READY
        rtt = await ch.ping()

Things to know about the socket:

- Connect before the guest runs (QEMU started with `-S`): QEMU drops what the guest writes
  while no client is connected, so a READY line written earlier is lost.
- QEMU serves one client at a time. A second client's connect() succeeds (the kernel's
  backlog) but it hears nothing until the first one disconnects.
- The guest may hold stale bytes: a line a previous client left half-written, or a reply
  to a command whose client went away. Each command is therefore sent as "\\n<command>\\n"
  (the agent ignores empty lines, so a partial line is terminated and answered with
  `err unknown command`), and each command reads lines until one that answers it, skipping
  the others. `ping` matches its random token exactly; the other replies carry no token,
  so a stale reply of the same kind is the only thing that can fool them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from ..errors import GuestError, GuestTimeout

READY_LINE = "KATA-VMCACHE-READY"
MAX_SEED_BYTES = 512
#: What a host gives a resumed guest to reseed its random pool with.
SEED_BYTES = 64
_SEEN_KEPT = 5

T = TypeVar("T")


@dataclass(frozen=True)
class GuestInfo:
    cpus: int
    mem_kib: int
    uptime: float

    @classmethod
    def parse(cls, line: str) -> GuestInfo | None:
        """`info cpus=N mem_kib=M uptime=S`, or None for any other line."""
        words = line.split()
        if not words or words[0] != "info":
            return None
        fields = dict(w.partition("=")[::2] for w in words[1:])
        try:
            return cls(cpus=int(fields["cpus"]), mem_kib=int(fields["mem_kib"]),
                       uptime=float(fields["uptime"]))
        except (KeyError, ValueError):
            return None


class GuestChannel:
    """One connection to a guest's agent port; commands are serialised."""

    def __init__(self, path: Path, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer: asyncio.StreamWriter | None = writer
        self._lock = asyncio.Lock()
        # The last lines skipped, for error messages.
        self.seen: list[str] = []

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 5.0) -> GuestChannel:
        """Connect to the chardev socket at `path` (it must exist: QEMU creates it)."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(str(path))
        except TimeoutError:
            raise GuestTimeout(f"cannot connect to {path} within {timeout:g} s") from None
        return cls(path, reader, writer)

    async def __aenter__(self) -> GuestChannel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._writer is None

    async def close(self) -> None:
        """Disconnect; the guest keeps running and the next client may connect."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    # --- protocol ---------------------------------------------------------------------

    async def wait_ready(self, timeout: float | None, *, line: str = READY_LINE) -> None:
        """Read lines until the guest says `line` (the demo guest's KATA-VMCACHE-READY;
        `[vmcache] ready_line` for the daemon's probe, probe.py). `timeout` None: the
        caller bounds the wait."""
        await self._exchange(None, lambda said: True if said == line else None,
                             timeout, what="the ready line")

    async def ping(self, timeout: float = 5.0, *, guest_sleep_ms: int = 10) -> float:
        """Round trip, in seconds, of a ping the guest answers only after sleeping
        `guest_sleep_ms` of its own time: any sleep needs the guest's timers, so a guest
        whose clock is frozen never answers, however short the sleep."""
        if not 1 <= guest_sleep_ms <= 60_000:
            raise ValueError(f"guest_sleep_ms must be 1 to 60000 (got {guest_sleep_ms})")
        token = secrets.token_hex(8)
        expected = f"pong {token}"
        start = time.monotonic()
        await self._exchange(f"ping {token} {guest_sleep_ms}",
                             lambda line: True if line == expected else None, timeout)
        return time.monotonic() - start

    async def info(self, timeout: float = 5.0) -> GuestInfo:
        """Online CPUs, MemTotal and uptime, as the guest sees them."""
        return await self._exchange("info", GuestInfo.parse, timeout)

    async def share(self, name: str, timeout: float = 30.0) -> str:
        """The first line of file `name` in the guest's virtio-fs share (tag kataShared),
        which the guest mounts at first use; GuestError with the guest's reason when it
        cannot (no modules, no such device, no such file)."""
        if not name or "/" in name or name in (".", "..") or not name.isprintable() \
                or " " in name:
            raise ValueError(f"a file name in the share, without / or spaces (got {name!r})")
        return await self._exchange(f"share {name}", _shared_line, timeout)

    async def online(self, timeout: float = 10.0) -> GuestInfo:
        """Online every hot-plugged CPU and memory block the guest has seen so far."""
        return await self._exchange("online", GuestInfo.parse, timeout)

    async def set_time(self, epoch: float | None = None, timeout: float = 5.0) -> None:
        """Set the guest's clock (to whole seconds) to `epoch`, by default now."""
        epoch = time.time() if epoch is None else epoch
        if not math.isfinite(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a finite number >= 0 (got {epoch!r})")
        await self._exchange(f"time {round(epoch)}", _ok, timeout)

    async def seed(self, data: bytes, timeout: float = 5.0) -> None:
        """Mix `data` into the guest's random pool (not credited as entropy)."""
        if not 0 < len(data) <= MAX_SEED_BYTES:
            raise ValueError(f"seed takes 1 to {MAX_SEED_BYTES} bytes (got {len(data)})")
        await self._exchange(f"seed {data.hex()}", _ok, timeout)

    async def _exchange(self, command: str | None, answer: Callable[[str], T | None],
                        timeout: float | None, *, what: str | None = None) -> T:
        """Send `command` (if any), then read lines until `answer` accepts one."""
        if what is None:
            what = repr(command.split()[0]) if command else "a line"
        async with self._lock:
            if self._writer is None:
                raise ConnectionError(f"guest channel {self.path} is closed")
            try:
                async with asyncio.timeout(timeout):
                    if command is not None:
                        self._writer.write(f"\n{command}\n".encode("ascii"))
                        await self._writer.drain()
                    while True:
                        raw = await self._reader.readline()
                        if not raw:
                            raise ConnectionError(
                                f"guest channel {self.path} closed while waiting for {what}")
                        line = raw.decode("ascii", "replace").strip()
                        result = answer(line)
                        if result is not None:
                            return result
                        if line:
                            self.seen = [*self.seen[-(_SEEN_KEPT - 1):], line]
            except TimeoutError:
                last = f" (last lines: {self.seen})" if self.seen else ""
                raise GuestTimeout(
                    f"no answer to {what} on {self.path} within {timeout:g} s{last}") from None


def _shared_line(line: str) -> str | None:
    if line.startswith("share ") or line == "share":
        return line[6:]
    if line.startswith("err ") and line != "err unknown command":
        raise GuestError(f"guest refused the command: {line[4:]}")
    return None


def _ok(line: str) -> bool | None:
    """`ok`; `err ...` raises, except `err unknown command`: every command we send is
    known to the agent, so that is the answer to a stale partial line, not to us."""
    if line == "ok":
        return True
    if line.startswith("err ") and line != "err unknown command":
        raise GuestError(f"guest refused the command: {line[4:]}")
    return None
