"""VM factories, after Kata's virtcontainers/factory.

- `direct`: boots one VM from the configuration (`DirectFactory`).
- `cache`: keeps `vm_cache_number` VMs from a factory ready and paused (`VMCache`).

A factory is anything with `create() -> VM` (not started yet, so callers can track it)
and `async boot(vm)` (launch, wait for the guest, pause; stops the VM if anything fails).
"""

from __future__ import annotations

from typing import Protocol

from ..vm import VM


class Factory(Protocol):
    def create(self) -> VM: ...

    async def boot(self, vm: VM) -> None: ...
