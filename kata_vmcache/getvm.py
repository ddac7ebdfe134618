"""Kata's factory `GetVM` for a caller of its own: a running VM, from the cache when the
cache's VMs are what the caller would boot, else booted directly with the daemon's code.

    config, _ = kata_vmcache.config.load(path)
    async with await get_vm(config, cpus=2, memory_mib=512) as vm:   # running, 2 vCPUs
        print(vm.pid, vm.vcpus, vm.memory_mib)                      # stopped on exit

After Kata (virtcontainers/factory/factory.go `GetVM`):

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

It sits above both the client (which never boots anything) and the factory (which never
talks to a server): the one place the two meet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from .client.handle import VMHandle
from .client.rpc import (
    DEFAULT_GET_TIMEOUT,
    CacheClient,
    config_differences,
    describe_differences,
)
from .client.sizing import Sizing, base_vcpus, int_field, size_request
from .config import Config
from .errors import UsageError
from .factory.direct import DirectFactory, abandon
from .vm.owned import VMState

log = logging.getLogger(__name__)

#: How long a resumed guest has to answer its first ping.
GUEST_TIMEOUT = 10.0
#: How long the guest has to acknowledge hot-plugged devices (TCG on a busy host is slow).
HOTPLUG_TIMEOUT = 30.0


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
                     base_memory_mib=int_field(h, "MemorySize", 0),
                     max_cpus=int_field(h, "DefaultMaxVCPUs", 0),
                     max_memory_mib=int_field(h, "DefaultMaxMemorySize", 0) or (
                         config.max_memory_mib if config else None),
                     memory_slots=int_field(h, "MemSlots", 0) if "MemSlots" in h else None)
    base = await client.get_base_vm(timeout=timeout)
    handle = VMHandle.adopt(base, source="cache")
    return await _bring_up(handle, cpus, memory_mib, wait_guest=wait_guest,
                           guest_timeout=guest_timeout, hotplug_timeout=hotplug_timeout)


async def boot_direct(config: Config, want: Sizing, *, reason: str = "",
                      wait_guest: bool = True,
                      guest_timeout: float = GUEST_TIMEOUT) -> VMHandle:
    """Boot one VM sized `want` with the daemon's own code, and own it as a cached one."""
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


