"""VM factories, after Kata's virtcontainers/factory.

- `direct`: boots one VM from the configuration (`DirectFactory`).
- `template`: clones VMs from one saved template VM (`TemplateFactory`).
- `cache`: keeps `vm_cache_number` VMs from a factory ready and paused (`VMCache`).

`Factory` is everything the rest of the daemon asks of a factory (the pool, the servicer,
the Monitor service, metrics, reload, shut-down): nothing outside this package probes a
factory for what it might have.
"""

from __future__ import annotations

from typing import Protocol

from ..vm.owned import VM
from ..vm.spec import Accelerator, VMSpec


class Factory(Protocol):
    @property
    def spec(self) -> VMSpec:
        """The VM this factory boots now (its size is what the pool's budget counts)."""

    @property
    def accelerator(self) -> str:
        """"kvm" or "tcg": what its VMs run under now (`auto` may have fallen back)."""

    def use_accelerator(self, accelerator: Accelerator) -> None:
        """Boot under `accelerator` from now on (a reload keeps `auto`'s fall-back)."""

    def create(self) -> VM:
        """A VM to boot, not started yet, so that the caller can track it."""

    async def boot(self, vm: VM) -> None:
        """booting -> ready: launch, wait for the guest, pause. On any failure the VM is
        stopped and its files removed before the error propagates."""

    def template_bytes(self) -> int:
        """Bytes the VM template occupies (its pages on the tmpfs and its state); 0 for a
        factory without a template."""

    def status_metadata(self) -> list[tuple[str, str]]:
        """Trailing metadata for the Status RPC (Kata's GrpcStatus has no field for what
        is not Kata's); empty when there is nothing to say."""

    async def close(self) -> None:
        """Release what the factory holds beyond its VMs (the template's files and tmpfs);
        called once at shut-down."""
