"""What the dashboard talks to: a VM cache server's socket, or anything shaped like it.

The app only sees this interface, so tests can feed it fixed snapshots through exactly the
code path a live server's pushes take (`FixedBackend`), and the live app is nothing but a
client of the socket (`SocketBackend`): Watch for the picture, GetBaseVM and Quit for the
actions, a fresh connection for each attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from ..client.rpc import BaseVM, CacheClient
from ..client.snapshot import MonitorClient, Snapshot
from ..errors import UsageError


class Backend(Protocol):
    endpoint: Path

    def watch(self) -> AsyncIterator[Snapshot]:
        """Snapshots as they come; raises VmcacheError when the connection is lost."""
        ...

    async def take_vm(self) -> BaseVM:
        """GetBaseVM: the caller owns the VM from then on."""
        ...

    async def stop_server(self) -> None:
        """Quit."""
        ...


class SocketBackend:
    def __init__(self, endpoint: Path) -> None:
        self.endpoint = endpoint

    async def watch(self) -> AsyncIterator[Snapshot]:
        async with MonitorClient(self.endpoint) as monitor:
            async for snapshot in monitor.watch():
                yield snapshot

    async def take_vm(self) -> BaseVM:
        async with CacheClient(self.endpoint) as client:
            return await client.get_base_vm()

    async def stop_server(self) -> None:
        async with CacheClient(self.endpoint) as client:
            await client.quit()


class FixedBackend:
    """Shows the given snapshots, then stays connected and silent (screenshots, tests)."""

    def __init__(self, snapshots: Sequence[Snapshot], endpoint: Path | None = None) -> None:
        self.snapshots = list(snapshots)
        self.endpoint = endpoint or Path(snapshots[0].endpoint)

    async def watch(self) -> AsyncIterator[Snapshot]:
        for snapshot in self.snapshots:
            yield snapshot
        await asyncio.Event().wait()

    async def take_vm(self) -> BaseVM:
        raise UsageError("this dashboard shows a fixed snapshot: there is no server")

    async def stop_server(self) -> None:
        raise UsageError("this dashboard shows a fixed snapshot: there is no server")
