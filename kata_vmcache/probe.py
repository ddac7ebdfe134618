"""Readiness probes: how the daemon knows a guest is up, not merely that QEMU started.

A probe is attached before the guest's CPUs run (QEMU starts with `-S`), so a signal the
guest sends early cannot be missed; then the daemon sends `cont` and waits on the probe.

- `SerialLineProbe`: the guest prints a line (`KATA-VMCACHE-READY` for the bundled demo
  guest) on its second serial port, a QEMU chardev socket we connect to.
- `NoProbe`: ready as soon as QEMU runs, for guests that signal nothing.

A Kata guest would get an agent health-check probe beside these (kata-agent over vsock),
behind the same three methods.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from .qemu import VMPaths


class ReadinessProbe(Protocol):
    async def attach(self, paths: VMPaths) -> None:
        """Connect to the guest's signal, before the guest runs."""

    async def wait(self) -> None:
        """Return once the guest is ready (the caller bounds the time)."""

    async def close(self) -> None:
        """Release what attach() took; the guest keeps running."""


class SerialLineProbe:
    def __init__(self, line: str) -> None:
        self.line = line.encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.seen: list[bytes] = []

    async def attach(self, paths: VMPaths) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(str(paths.agent))

    async def wait(self) -> None:
        assert self._reader is not None, "attach() first"
        while True:
            raw = await self._reader.readline()
            if not raw:
                raise ConnectionError("the guest's serial port closed before it was ready")
            line = raw.strip()
            if line == self.line:
                return
            # Keep a little of what the guest said: the timeout error shows it.
            self.seen = [*self.seen[-4:], line]

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class NoProbe:
    async def attach(self, paths: VMPaths) -> None:
        return None

    async def wait(self) -> None:
        return None

    async def close(self) -> None:
        return None
