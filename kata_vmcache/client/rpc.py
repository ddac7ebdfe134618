"""Client of a VM cache server: Kata's four RPCs over the Unix socket, with deadlines, and
`get_vm()`, which does what Kata's factory `GetVM` does with the VM it takes.

    async with CacheClient(Path("/run/kata-containers/cache.sock")) as client:
        print(await client.status())
        base = await client.get_base_vm()    # a paused VM that the caller now owns

    config, _ = kata_vmcache.config.load(path)
    async with await get_vm(config, cpus=2, memory_mib=512) as vm:   # running, 2 vCPUs
        print(vm.pid, vm.vcpus, vm.memory_mib)                      # stopped on exit

`get_vm()`, after Kata (virtcontainers/factory/factory.go `GetVM`):

1. compares the server's `Config` with the VMConfig derived from the caller's own
   configuration, both reset as Kata resets them (vCPUs, memory and template fields do not
   count). When they differ, the cache's VMs are not what the caller would boot: it boots
   one directly, with the daemon's own code (`DirectFactory`), sized as asked, and logs
   which keys differ;
2. otherwise takes a paused VM (GetBaseVM), resumes it (QMP `cont` on its QmpChannelpath),
   waits for the guest to answer (a ping that needs the guest's timers), sets the guest's
   clock and reseeds its random pool;
3. hot-adds the vCPUs and memory asked for beyond the base VM (`handle.VMHandle.hotplug`).

The request is checked before anything is taken (a bad one costs the cache nothing). From
the moment a VM is taken, any failure stops it: nothing leaks.

Every call has a deadline. Errors are ours, one line each: `ServerUnavailable` when nothing
listens (naming the path and how to start a server), `RemoteError` when the server refuses,
`TimeoutError`-flavoured `RemoteError` when the deadline passes.

`SyncCacheClient` is the same for scripts, without asyncio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import empty_pb2

from .. import kata
from ..config import Config
from ..errors import RemoteError, RequestError, ServerUnavailable, UsageError
from ..proto import cache_pb2_grpc
from ..shape import KEY as VM_SHAPE_KEY
from ..shape import VMShape
from ..vm.guest_channel import GuestInfo
from ..vm.handoff import HandOff
from .handle import MEMORY_BLOCK_MIB, VMHandle

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
#: GetBaseVM may wait for a VM to boot when the cache is empty.
DEFAULT_GET_TIMEOUT = 60.0
#: How long a resumed guest has to answer its first ping.
GUEST_TIMEOUT = 10.0
#: How long the guest has to acknowledge hot-plugged devices (TCG on a busy host is slow).
HOTPLUG_TIMEOUT = 30.0


@dataclass(frozen=True)
class VMStatus:
    pid: int
    cpu: int
    memory_mib: int


@dataclass(frozen=True)
class ServerStatus:
    pid: int
    vms: tuple[VMStatus, ...]
    #: Bytes the VM template occupies, or None when templating is off.
    template_bytes: int | None = None


#: GetBaseVM's reply, decoded: the daemon's hand-off record (handoff.py), the same type.
BaseVM = HandOff


def not_running(endpoint: Path) -> ServerUnavailable:
    return ServerUnavailable(f"no VM cache server at {endpoint} "
                             "(is 'kata-vmcache init' running?)")


def rpc_error(endpoint: Path, method: str, timeout: float, exc: grpc.aio.AioRpcError, *,
              error: type[RemoteError] = RemoteError) -> ServerUnavailable | RemoteError:
    """One line for a failed call: no server there, no answer in time (with the server's
    reason when it gave one), or the status it answered with."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
        return not_running(endpoint)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The server's own reason (e.g. why no VM is ready), when it gave one.
        why = exc.details() or ""
        why = f" ({why})" if why and why != "Deadline Exceeded" else ""
        return error(f"{method} on {endpoint}: no answer within {timeout:g} s{why}")
    return error(f"{method} on {endpoint} failed: {code.name}: {exc.details()}")


class CacheClient:
    def __init__(self, endpoint: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def __aenter__(self) -> CacheClient:
        self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def connect(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix:{self.endpoint}")
            self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def _call(self, method: str, timeout: float | None,
                    trailers: dict[str, str] | None = None) -> Any:
        if not self.endpoint.exists():
            raise not_running(self.endpoint)
        self.connect()
        try:
            call = getattr(self._stub, method)(empty_pb2.Empty(),
                                              timeout=timeout or self.timeout)
            reply = await call
            if trailers is not None:
                trailers.update((k, v) for k, v in (await call.trailing_metadata() or ())
                                if isinstance(v, str))
            return reply
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(self.endpoint, method, timeout or self.timeout, exc) from None

    async def config(self, timeout: float | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The server's VMConfig and AgentConfig, decoded from Kata's JSON."""
        vm_config, agent_config, _ = await self.config_and_shape(timeout)
        return vm_config, agent_config

    async def config_and_shape(self, timeout: float | None = None
                               ) -> tuple[dict[str, Any], dict[str, Any], VMShape | None]:
        """`config()`, and the VM the server boots (None from a server that does not say:
        Kata's own)."""
        trailers: dict[str, str] = {}
        reply = await self._call("Config", timeout, trailers)
        return (json.loads(reply.Data), json.loads(reply.AgentConfig),
                VMShape.parse(trailers.get(VM_SHAPE_KEY)))

    async def status(self, timeout: float | None = None) -> ServerStatus:
        trailers: dict[str, str] = {}
        reply = await self._call("Status", timeout, trailers)
        template = trailers.get("x-kata-vmcache-template-bytes")
        return ServerStatus(reply.pid, tuple(VMStatus(v.pid, v.cpu, v.memory)
                                             for v in reply.vmstatus),
                            int(template) if template and template.isdigit() else None)

    async def get_base_vm(self, timeout: float = DEFAULT_GET_TIMEOUT) -> BaseVM:
        """Take a paused VM. From the reply on, the caller owns it (and must stop it)."""
        return HandOff.from_message(await self._call("GetBaseVM", timeout))

    async def quit(self, timeout: float | None = None) -> None:
        await self._call("Quit", timeout)


# --- does the request fit the cache? -------------------------------------------------------

_MISSING = object()


def config_differences(cache: Mapping[str, Any],
                       request: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Kata's `checkVMConfig`: both VMConfigs reset for comparison, then compared deeply.

    Returns the differing leaves as (dotted key, cache's value, request's value); empty when
    the request fits. As Go's decoder does, a key absent on one side counts as its zero
    value, so it only differs from a value that is not zero.
    """
    out: list[tuple[str, Any, Any]] = []
    _diff(kata.reset_for_compare(cache), kata.reset_for_compare(request), "", out)
    return out


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str,
          out: list[tuple[str, Any, Any]]) -> None:
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            _diff(x, y, f"{prefix}{key}.", out)
        elif x is _MISSING or y is _MISSING:
            present = y if x is _MISSING else x
            if present:
                out.append((f"{prefix}{key}", None if x is _MISSING else x,
                            None if y is _MISSING else y))
        elif x != y or type(x) is not type(y):
            out.append((f"{prefix}{key}", x, y))


def describe_differences(differences: list[tuple[str, Any, Any]], shown: int = 3) -> str:
    """`HypervisorConfig.KernelPath (cache '/a', request '/b'); ...` for a log line."""
    def short(value: Any, limit: int = 100) -> str:
        # Both ends: paths differ at the end, lists anywhere.
        text = json.dumps(value)
        return text if len(text) <= limit else f"{text[:30]}...{text[33 - limit:]}"

    parts = [f"{key} (cache {short(x)}, request {short(y)})"
             for key, x, y in differences[:shown]]
    if len(differences) > shown:
        parts.append(f"and {len(differences) - shown} more: "
                     + ", ".join(key for key, _, _ in differences[shown:]))
    return "; ".join(parts)


# --- sizing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizing:
    """What a request comes to: the VM's vCPUs and memory once it is handed over."""

    cpus: int
    memory_mib: int


def size_request(cpus: int | None, memory_mib: int | None, *, base_cpus: int,
                 base_memory_mib: int, max_cpus: int, max_memory_mib: int | None,
                 memory_slots: int | None = None) -> Sizing:
    """Check a request against the base VM and its hot-plug headroom; RequestError (one
    line, every problem) when it cannot be had. `None` means the base VM's amount.

    Added memory is rounded up to whole memory blocks (what the guest can online), as
    Kata rounds hot-plugged memory to the guest's block size.
    """
    cpus = base_cpus if cpus is None else cpus
    memory_mib = base_memory_mib if memory_mib is None else memory_mib
    problems = []
    top = max(max_cpus, base_cpus)
    if not base_cpus <= cpus <= top:
        problems.append(f"cpus: must be {base_cpus} (the base VM's) to {top} "
                        f"(default_maxvcpus) (got {cpus})")
    added = memory_mib - base_memory_mib
    rounded = base_memory_mib + math.ceil(added / MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB
    if memory_mib < base_memory_mib:
        problems.append(f"memory: must be at least the base VM's {base_memory_mib} MiB "
                        f"(got {memory_mib})")
    elif max_memory_mib is not None and rounded > max_memory_mib:
        got = f"{memory_mib}" if rounded == memory_mib else (
            f"{memory_mib}, {rounded} in whole {MEMORY_BLOCK_MIB} MiB blocks")
        problems.append(f"memory: must be at most {max_memory_mib} MiB (the VM's maxmem) "
                        f"(got {got})")
    elif added > 0 and memory_slots is not None and memory_slots < 1:
        problems.append("memory: the VM has no memory slot to hot-plug into "
                        "(memory_slots = 0)")
    if problems:
        raise RequestError("; ".join(problems))
    return Sizing(cpus, rounded)


# --- get_vm ----------------------------------------------------------------------------------

async def get_vm(config: Config | None = None, *, cpus: int | None = None,
                 memory_mib: int | None = None, endpoint: Path | None = None,
                 client: CacheClient | None = None, wait_guest: bool = True,
                 guest_timeout: float = GUEST_TIMEOUT, timeout: float = DEFAULT_GET_TIMEOUT,
                 hotplug_timeout: float = HOTPLUG_TIMEOUT) -> VMHandle:
    """A running VM the caller owns, with `cpus` vCPUs and `memory_mib` MiB (default: the
    base VM's). See the module docstring for the steps.

    `config` is the caller's own configuration: the request is compared with the cache's
    and booted directly when it does not fit. Without it (only `endpoint` or `client`), the
    cache's VM is taken as it is. With `wait_guest`, the call returns once the guest has
    answered a ping (GuestUnresponsive after `guest_timeout`), with its clock set and its
    random pool reseeded; a hot-plug always talks to the guest (it onlines what was added).

    Errors, one line each: RequestError before anything is taken (the request cannot be
    had); ServerUnavailable when no server listens (nothing is booted behind the caller's
    back: that is the server's job); after the VM is taken, whatever went wrong (VMDead,
    GuestUnresponsive, HotplugError, ...), with the VM already stopped.
    """
    if client is None:
        if endpoint is None:
            if config is None:
                raise UsageError("get_vm() needs a configuration, an endpoint or a client")
            endpoint = config.factory.vm_cache_endpoint
        async with CacheClient(endpoint) as own:
            return await get_vm(config, cpus=cpus, memory_mib=memory_mib, client=own,
                                wait_guest=wait_guest, guest_timeout=guest_timeout,
                                timeout=timeout, hotplug_timeout=hotplug_timeout)
    cache_config, _, shape = await client.config_and_shape()
    if config is not None:
        differences = config_differences(cache_config, config.kata_vm_config())
        if differences:
            reason = "does not fit the cache: " + describe_differences(differences)
            ours = config.hypervisor
            want = size_request(cpus, memory_mib, base_cpus=ours.vcpus,
                                base_memory_mib=ours.memory_mib, max_cpus=ours.max_vcpus,
                                max_memory_mib=config.max_memory_mib,
                                memory_slots=ours.memory_slots)
            log.info("request %s; booting a VM directly", reason)
            return await boot_direct(config, want, reason=reason, wait_guest=wait_guest,
                                     guest_timeout=guest_timeout)
    # Refuse a request the cache's VMs can never satisfy before taking one (none is spent
    # on it), against the server's own VM: what its Config reply says, with --endpoint as
    # with --config. The VM's record is the final word once it is taken.
    if shape is not None:
        size_request(cpus, memory_mib, base_cpus=shape.cpus, base_memory_mib=shape.memory_mib,
                     max_cpus=shape.max_cpus, max_memory_mib=shape.max_memory_mib,
                     memory_slots=shape.memory_slots)
    else:  # Kata's own server: its VMConfig JSON (3.x has the maxmem, 1.x does not)
        h = cache_config.get("HypervisorConfig") or {}
        size_request(cpus, memory_mib, base_cpus=base_vcpus(h),
                     base_memory_mib=_int(h, "MemorySize", 0),
                     max_cpus=_int(h, "DefaultMaxVCPUs", 0),
                     max_memory_mib=_int(h, "DefaultMaxMemorySize", 0) or (
                         config.max_memory_mib if config else None),
                     memory_slots=_int(h, "MemSlots", 0) if "MemSlots" in h else None)
    base = await client.get_base_vm(timeout=timeout)
    handle = VMHandle.adopt(base, source="cache")
    return await _bring_up(handle, cpus, memory_mib, wait_guest=wait_guest,
                           guest_timeout=guest_timeout, hotplug_timeout=hotplug_timeout)


async def boot_direct(config: Config, want: Sizing, *, reason: str = "",
                      wait_guest: bool = True,
                      guest_timeout: float = GUEST_TIMEOUT) -> VMHandle:
    """Boot one VM sized `want` with the daemon's own code, and own it as a cached one."""
    from ..factory.direct import DirectFactory, abandon
    from ..vm.owned import VMState

    h = dataclasses.replace(config.hypervisor, vcpus=want.cpus, memory_mib=want.memory_mib)
    factory = DirectFactory(dataclasses.replace(config, hypervisor=h))
    vm = factory.create()
    await factory.boot(vm)  # on failure the VM is already stopped and removed
    try:
        handle = VMHandle.adopt(vm.handoff, source="direct", reason=reason)
    except BaseException as exc:
        await abandon(vm, exc, config.daemon.stop_timeout)
        raise
    # As the daemon hands a VM off: its record says so (a daemon recovering this state
    # dir leaves it alone), and the QMP session is closed for the new owner's.
    vm.transition(VMState.HANDED_OFF)
    try:
        await vm.process.release()
    except BaseException:
        await asyncio.shield(handle.stop())
        raise
    return await _bring_up(handle, None, None, wait_guest=wait_guest,
                           guest_timeout=guest_timeout, hotplug_timeout=HOTPLUG_TIMEOUT)


async def _bring_up(handle: VMHandle, cpus: int | None, memory_mib: int | None, *,
                    wait_guest: bool, guest_timeout: float,
                    hotplug_timeout: float) -> VMHandle:
    """Resume a freshly adopted VM, wait for its guest, hot-plug; stop it on any failure."""
    try:
        # Sized against the VM itself: the Config reply does not tell its maxmem.
        want = size_request(cpus, memory_mib, base_cpus=handle.vcpus,
                     base_memory_mib=handle.memory_mib, max_cpus=handle.max_vcpus,
                     max_memory_mib=handle.max_memory_mib, memory_slots=handle.memory_slots)
        grow = (want.cpus, want.memory_mib) != (handle.vcpus, handle.memory_mib)
        talk = wait_guest or grow
        await handle.connect(guest=talk)
        await handle.resume()
        if talk:
            await handle.wait_guest(guest_timeout)
            await handle.sync_guest()
        if grow:
            await handle.hotplug(cpus=want.cpus, memory_mib=want.memory_mib,
                                 timeout=hotplug_timeout)
    except BaseException as exc:
        # Debug only: the error itself reaches the caller (the CLI prints it as one line).
        handle.log.debug("stopping VM %s: %s", handle.id, str(exc) or type(exc).__name__)
        await asyncio.shield(handle.stop())
        raise
    return handle


def _int(table: Mapping[str, Any], key: str, default: int) -> int:
    value = table.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def base_vcpus(hypervisor: Mapping[str, Any]) -> int:
    """The vCPUs of the cache's VMs from its HypervisorConfig: 1.x's NumVCPUs, or 3.x's
    NumVCPUsF rounded up as 3.x's NumVCPUs() does (1 when neither is there)."""
    if "NumVCPUs" in hypervisor:
        return _int(hypervisor, "NumVCPUs", 1)
    exact = hypervisor.get("NumVCPUsF")
    if isinstance(exact, int | float) and not isinstance(exact, bool) and exact > 0:
        return math.ceil(exact)
    return 1


# --- for scripts ---------------------------------------------------------------------------

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
