"""What a request for a VM comes to: its vCPUs and memory checked against the base VM and
its hot-plug headroom, before anything is taken (a bad request costs the cache nothing)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import RequestError
from .hotplug import MEMORY_BLOCK_MIB


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


def int_field(table: Mapping[str, Any], key: str, default: int) -> int:
    """An integer of a server's JSON reply (a bool is not one), else `default`."""
    value = table.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def base_vcpus(hypervisor: Mapping[str, Any]) -> int:
    """The vCPUs of the cache's VMs from its HypervisorConfig: 1.x's NumVCPUs, or 3.x's
    NumVCPUsF rounded up as 3.x's NumVCPUs() does (1 when neither is there)."""
    if "NumVCPUs" in hypervisor:
        return int_field(hypervisor, "NumVCPUs", 1)
    exact = hypervisor.get("NumVCPUsF")
    if isinstance(exact, int | float) and not isinstance(exact, bool) and exact > 0:
        return math.ceil(exact)
    return 1


