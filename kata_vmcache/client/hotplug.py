"""vCPU and memory hot-plug, as Kata does it (virtcontainers/qemu.go `hotplugAddCPUs`,
`hotplugAddMemory`): the steps `VMHandle.hotplug()` runs on its QMP session and agent port.

- vCPUs: `query-hotpluggable-cpus` lists the free slots with the driver and the properties
  (socket-id, core-id, thread-id) that place one; Kata's layout is one core per socket, so
  each vCPU is one `device_add` of that driver.
- memory: a `memory-backend-ram` object plus a `pc-dimm` device on it, one DIMM slot per
  request; the VM was started with `slots` and `maxmem` headroom for this.

The guest finishes a hot-plug asynchronously and acknowledges it through ACPI `_OST`, which
QEMU reports as an `ACPI_DEVICE_OST` event. Only then may the guest's agent `online` the new
CPUs and memory blocks; afterwards both QMP and the guest are asked what the VM has.

In order: `growth()` (what to add; hot-unplug is refused), `plug_cpus()` and
`plug_memory()` under a listener for `ACPI_DEVICE_OST` (registered before the first
`device_add`: the acknowledgement can come before device_add returns), `acknowledged()`,
the guest's `online`, then `check_result()`. The device ids say what and where they are
(`kvc-cpu-core0-socket1-thread0`, `kvc-dimm0` on backend `kvc-mem0`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qemu.qmp import EventListener

from ..errors import HotplugError, RequestError, VMStateError
from ..vm.guest_channel import GuestInfo

if TYPE_CHECKING:
    from .handle import VMHandle

MIB = 1024 * 1024
#: The unit x86_64 Linux onlines hot-added memory in (its memory block, for guests with
#: less than 64 GiB); a DIMM of another size would leave part of it offline.
MEMORY_BLOCK_MIB = 128
#: ACPI _OST status codes (ACPI 6.5, 6.3.5): success, and "insertion in progress".
OST_SUCCESS = 0
OST_IN_PROGRESS = 0x80


def growth(vm: VMHandle, cpus: int, memory_mib: int) -> tuple[int, int]:
    """The vCPUs and MiB to add for `vm` to have `cpus` and `memory_mib`; RequestError
    when that would take some away, or the added memory is not whole memory blocks."""
    add_cpus, add_mib = cpus - vm.vcpus, memory_mib - vm.memory_mib
    if add_cpus < 0 or add_mib < 0:
        raise RequestError(f"VM {vm.id} has {vm.vcpus} vCPUs and {vm.memory_mib} "
                           f"MiB; hot-unplug is not supported (asked for {cpus} vCPUs, "
                           f"{memory_mib} MiB)")
    if add_mib % MEMORY_BLOCK_MIB:
        raise RequestError(f"memory: hot-added memory must be a multiple of "
                           f"{MEMORY_BLOCK_MIB} MiB (asked for {add_mib} MiB more)")
    return add_cpus, add_mib


async def plug_cpus(vm: VMHandle, count: int) -> list[str]:
    """`device_add` `count` vCPUs into the lowest free slots; their device ids."""
    slots = await vm.execute("query-hotpluggable-cpus")
    free = sorted((s for s in slots if "qom-path" not in s),
                  key=lambda s: tuple(s["props"].get(k, 0)
                                      for k in ("socket-id", "core-id", "thread-id")))
    if len(free) < count:
        raise HotplugError(f"VM {vm.id}: {count} more vCPUs asked for, but only "
                           f"{len(free)} free vCPU slots (QemuSMP.MaxCPUs "
                           f"{vm.max_vcpus})")
    devices = []
    for slot in free[:count]:
        props = slot["props"]
        # e.g. kvc-cpu-core0-socket1-thread0: unique, and says where it sits.
        device = "kvc-cpu-" + "-".join(f"{k.removesuffix('-id')}{props[k]}"
                                       for k in sorted(props))
        await vm.execute("device_add", {"driver": slot["type"], "id": device, **props})
        devices.append(device)
    return devices


async def plug_memory(vm: VMHandle, mib: int) -> str:
    """One DIMM of `mib` MiB on a backend of its own; its device id. A DIMM QEMU refuses
    takes its backend with it."""
    existing = await vm.execute("query-memory-devices")
    n = len(existing)
    backend, device = f"kvc-mem{n}", f"kvc-dimm{n}"
    await vm.execute("object-add", {"qom-type": "memory-backend-ram", "id": backend,
                                    "size": mib * MIB})
    try:
        await vm.execute("device_add", {"driver": "pc-dimm", "id": device,
                                        "memdev": backend})
    except VMStateError:
        with contextlib.suppress(VMStateError):
            await vm.execute("object-del", {"id": backend})
        raise
    return device


async def acknowledged(vm_id: str, events: EventListener, devices: Iterable[str]) -> None:
    """Return once the guest has acknowledged every device (ACPI _OST status 0)."""
    pending = set(devices)
    async for event in events:
        data: Any = event["data"]
        info = data["info"]
        device, status = info.get("device"), info.get("status")
        if device not in pending or status == OST_IN_PROGRESS:
            continue
        if status != OST_SUCCESS:
            raise HotplugError(f"VM {vm_id}: the guest refused {device} (ACPI _OST "
                               f"status {status:#x})")
        pending.discard(device)
        if not pending:
            return


def check_result(vm_id: str, *, cpus: int, memory_mib: int, qmp_cpus: int, qmp_mib: int,
                 before: GuestInfo, after: GuestInfo, add_mib: int) -> None:
    """HotplugError unless QEMU has the `cpus` and `memory_mib` wanted, the guest has the
    vCPUs online, and its memory grew by the `add_mib` added."""
    problems = []
    if (qmp_cpus, qmp_mib) != (cpus, memory_mib):
        problems.append(f"QEMU has {qmp_cpus} vCPUs and {qmp_mib} MiB")
    if after.cpus != cpus:
        problems.append(f"the guest has {after.cpus} vCPUs online")
    # The guest's MemTotal grows by the whole DIMM once every block of it is online.
    added_kib = after.mem_kib - before.mem_kib
    if added_kib < add_mib * 1024:
        problems.append(f"the guest's memory grew by {added_kib // 1024} MiB")
    if problems:
        raise HotplugError(f"VM {vm_id}: asked for {cpus} vCPUs and {memory_mib} MiB, "
                           f"but {'; '.join(problems)}")
