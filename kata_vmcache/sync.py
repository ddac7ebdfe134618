"""The cache client and `get_vm()` for scripts, without asyncio: one private event loop
runs the client and every VM it returns."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

from .client.handle import VMHandle
from .client.rpc import DEFAULT_GET_TIMEOUT, DEFAULT_TIMEOUT, BaseVM, CacheClient, ServerStatus
from .config import Config
from .getvm import GUEST_TIMEOUT, get_vm
from .vm.guest_channel import GuestInfo


class SyncCacheClient:
    """`CacheClient` and `get_vm()` without asyncio, for scripts:

        with SyncCacheClient(endpoint) as client:
            with client.get_vm(config, cpus=2) as vm:   # stopped at the end of the block
                print(vm.pid, vm.ping())

    One private event loop runs the client and every VM it returns. Closing the client stops
    the VMs it returned that are still running under it (call `detach()` to keep one).
    """

    def __init__(self, endpoint: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._runner = asyncio.Runner()
        self._client = CacheClient(endpoint, timeout=timeout)
        self._vms: list[SyncVM] = []

    def __enter__(self) -> SyncCacheClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            for vm in self._vms:
                if not vm.handle.detached:
                    vm.stop()
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def config(self, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        return self._runner.run(self._client.config(timeout))

    def status(self, timeout: float | None = None) -> ServerStatus:
        return self._runner.run(self._client.status(timeout))

    def get_base_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> BaseVM:
        return self._runner.run(self._client.get_base_vm(timeout))

    def quit(self, timeout: float | None = None) -> None:
        self._runner.run(self._client.quit(timeout))

    def get_vm(self, config: Config | None = None, **kwargs: Any) -> SyncVM:
        """`get_vm(config, client=this client, **kwargs)`."""
        handle = self._runner.run(get_vm(config, client=self._client, **kwargs))
        vm = SyncVM(handle, self._runner)
        self._vms.append(vm)
        return vm


class SyncVM:
    """A `VMHandle` driven from synchronous code (made by `SyncCacheClient.get_vm`)."""

    def __init__(self, handle: VMHandle, runner: asyncio.Runner) -> None:
        self.handle = handle
        self._runner = runner

    def __enter__(self) -> SyncVM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.handle.detached:
            self.stop()

    def __getattr__(self, name: str) -> Any:
        # The facts (id, pid, vcpus, memory_mib, qmp_path, ...) are the handle's.
        return getattr(self.handle, name)

    def ping(self, timeout: float = GUEST_TIMEOUT) -> float:
        return self._runner.run(self.handle.wait_guest(timeout))

    def alive(self, timeout: float = 5.0) -> bool:
        return self._runner.run(self.handle.alive(timeout))

    def info(self, timeout: float = 5.0) -> GuestInfo:
        return self._runner.run(self.handle.info(timeout))

    def hotplug(self, *, cpus: int | None = None, memory_mib: int | None = None) -> None:
        self._runner.run(self.handle.hotplug(cpus=cpus, memory_mib=memory_mib))

    def execute(self, command: str, arguments: dict[str, object] | None = None) -> Any:
        return self._runner.run(self.handle.execute(command, arguments))

    def stop(self) -> None:
        self._runner.run(self.handle.stop())

    def detach(self) -> None:
        self._runner.run(self.handle.detach())
