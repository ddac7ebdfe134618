"""A fake grpc.aio servicer context, and a hand-off through the servicer's GetBaseVM: the
path a real call takes (reserve, write the reply, give, delivered), with the context as the
only fake. Pool tests take their VMs this way, not through a shortcut of the cache's."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from kata_vmcache.config import Config, DaemonSettings, FactorySettings, HypervisorSettings
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.proto import cache_pb2
from kata_vmcache.service.server import CacheServicer
from kata_vmcache.vm.owned import VM

from .fakes import FakeFactory


def make_config(endpoint: Path) -> Config:
    return Config(
        source=Path("/etc/kata-containers/configuration.toml"),
        hypervisor=HypervisorSettings(
            path=Path("/bin/true"), kernel=Path("/k"), initrd=Path("/i"), image=None,
            machine_type="q35", kernel_params=(), vcpus=1, max_vcpus=2, memory_mib=256,
            memory_slots=4, debug=False),
        factory=FactorySettings(vm_cache_number=2, vm_cache_endpoint=endpoint,
                                enable_template=False, template_path=Path("/t")),
        daemon=DaemonSettings(accelerator="tcg"),
    )


class Aborted(Exception):
    """What `FakeContext.abort()` raises (grpc.aio raises its own AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class FakeContext:
    """The part of grpc.aio.ServicerContext the cache servicer uses. `write` is what the
    test makes of the reply's write: by default it is taken at once; `writer` replaces
    it (a write that blocks, fails, or is cancelled)."""

    def __init__(self, *, deadline: float | None = None,
                 writer: Callable[[cache_pb2.GrpcVM], object] | None = None) -> None:
        self.deadline = deadline
        self.writer = writer
        self.written: list[cache_pb2.GrpcVM] = []
        self.trailing: tuple[tuple[str, str], ...] = ()
        self.aborted: Aborted | None = None
        self._done: list[Callable[[FakeContext], object]] = []

    def add_done_callback(self, callback: Callable[[FakeContext], object]) -> None:
        self._done.append(callback)

    def end(self) -> None:
        """The call is over (its status sent, or it failed): grpc runs the done callbacks."""
        callbacks, self._done = self._done, []
        for callback in callbacks:
            callback(self)

    def time_remaining(self) -> float | None:
        return self.deadline

    async def write(self, message: cache_pb2.GrpcVM) -> None:
        if self.writer is not None:
            result = self.writer(message)
            if inspect.isawaitable(result):
                await result
        self.written.append(message)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = Aborted(code, details)
        raise self.aborted

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.trailing = tuple(metadata)


def servicer_for(cache: VMCache) -> CacheServicer:
    return CacheServicer(cache, make_config(Path("/nonexistent/cache.sock")), lambda: None)


async def get_base_vm(servicer: CacheServicer, context: FakeContext) -> None:
    """One GetBaseVM call, ended as grpc ends it: the done callbacks (where the servicer
    books the delivery) run once the handler is over, however it ended."""
    try:
        await servicer.GetBaseVM(empty_pb2.Empty(), context)
    finally:
        context.end()


async def hand_off(cache: VMCache) -> VM:
    """Take a VM the way GetBaseVM does (the cache's factory is a fakes.FakeFactory, whose
    `created` finds the VM the written reply names)."""
    context = FakeContext()
    await get_base_vm(servicer_for(cache), context)
    reply, = context.written
    factory = cache.factory
    assert isinstance(factory, FakeFactory), factory
    vm, = (vm for vm in factory.created if vm.id == reply.id)
    return vm
