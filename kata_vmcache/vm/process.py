"""What a VM's owners use of its QEMU process: `VMProcess`, the type of `VM.process`.

`qemu.QemuProcess` is the one real implementation; the unit tests' `FakeProcess`
(tests/unit/fakes.py) is the other, and mypy checks that both satisfy this Protocol. Its
members are what is used through `vm.process`, by whom:

    the VM (owned.py)        pid, running, priority, on_end, problem_now, release_idle,
                             reclaim, stop, kill
    the pool (pool/)         running, released, probing, idle, probe_status, exited_now
    a factory (factory/)     start, execute, qmp, wait, returncode, argv, log_tail, on_end
    getvm.py                 release

Signatures are as their callers use them: `start()` takes no timeout here although
QemuProcess's has one, since no caller passes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from qemu.qmp import QMPClient

from .priority import Level


class VMProcess(Protocol):
    """One QEMU process as its VM, the pool and the factories see it (QemuProcess's
    docstrings say what each member does)."""

    #: The CPU priority QEMU is launched at (priority.py); set before start().
    priority: Level

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def released(self) -> bool: ...

    @property
    def argv(self) -> Sequence[str]: ...

    @property
    def qmp(self) -> QMPClient | None: ...

    @property
    def probing(self) -> asyncio.Future[str] | None: ...

    def on_end(self, callback: Callable[[], None]) -> None: ...

    def log_tail(self) -> str: ...

    def problem_now(self) -> str | None: ...

    def exited_now(self) -> bool: ...

    def release_idle(self) -> None: ...

    async def start(self) -> None: ...

    async def execute(self, command: str,
                      arguments: dict[str, object] | None = None) -> object: ...

    async def idle(self) -> None: ...

    async def probe_status(self, timeout: float) -> str: ...

    async def release(self) -> None: ...

    async def reclaim(self, timeout: float = 1.0) -> str: ...

    async def wait(self, timeout: float | None = None) -> int | None: ...

    async def stop(self, timeout: float = 3.0) -> None: ...

    async def kill(self) -> None: ...
