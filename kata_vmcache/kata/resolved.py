"""What a VM is booted with: the binary, kernel, vCPUs and memory, read out of the very
payload the `Config` reply sends.

The daemon must boot the VM the reply describes, or Kata compares a promise with a
different machine. So these values are not derived a second time from the file: `resolve()`
reads them out of `hypervisor_config()`'s result for the same generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .generation import Generation
from .payload import hypervisor_config


@dataclass(frozen=True)
class HypervisorValues:
    """What a VM is booted with, as `generation`'s loader resolves it: the same values the
    `Config` payload carries (`resolve()` reads them out of it)."""

    generation: Generation
    #: HypervisorPath: the binary (resolved like ResolvePath; missing paths kept as given).
    path: str
    kernel: str
    #: "" when not set.
    initrd: str
    image: str
    machine_type: str
    #: The vCPUs a VM boots with: 1.x NumVCPUs; 3.x NumVCPUs() = ceil(NumVCPUsF).
    vcpus: int
    #: 3.x's NumVCPUsF as it is (1.x: vcpus).
    vcpus_exact: float
    max_vcpus: int
    memory_mib: int
    memory_slots: int
    debug: bool


def resolve(doc: Mapping[str, Any], generation: Generation) -> HypervisorValues:
    """The hypervisor values of `generation`, read out of the payload `vm_config()` sends,
    so that what the daemon boots and what `Config` says are one derivation."""
    h = hypervisor_config(doc, generation)
    if generation == "3.x":
        exact = float(h["NumVCPUsF"])
        vcpus = math.ceil(exact)  # RoundUpNumVCPUs
    else:
        vcpus = int(h["NumVCPUs"])
        exact = float(vcpus)
    return HypervisorValues(
        generation=generation,
        path=h["HypervisorPath"],
        kernel=h["KernelPath"],
        initrd=h["InitrdPath"],
        image=h["ImagePath"],
        machine_type=h["HypervisorMachineType"],
        vcpus=vcpus,
        vcpus_exact=exact,
        max_vcpus=int(h["DefaultMaxVCPUs"]),
        memory_mib=int(h["MemorySize"]),
        memory_slots=int(h["MemSlots"]),
        debug=bool(h["Debug"]),
    )
