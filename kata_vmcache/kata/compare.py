"""What Kata's factory compares: before it decides whether our VM fits, kata-runtime resets
some fields of both VMConfigs (factory.go resetHypervisorConfig, and in 1.x the proxy's),
so those may differ and every other field must match.

Our client asks the same question before taking a VM from the cache (`reset_for_compare`),
and scripts/kata-compare reads the field list to judge real Kata's answers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

#: What factory.resetHypervisorConfig zeroes in HypervisorConfig before comparing (1.x: the
#: first seven but NumVCPUsF; 3.x: NumVCPUsF instead of NumVCPUs, and the last three).
RESET_HYPERVISOR_FIELDS: Final[Mapping[str, Any]] = MappingProxyType({
    "NumVCPUs": 0,
    "NumVCPUsF": 0.0,
    "MemorySize": 0,
    "BootToBeTemplate": False,
    "BootFromTemplate": False,
    "MemoryPath": "",
    "DevicesStatePath": "",
    "SharedPath": "",
    "VMStorePath": "",
    "RunStorePath": "",
})


def reset_for_compare(vm_config: Mapping[str, Any]) -> dict[str, Any]:
    """Copy with the fields Kata's factory resets before comparing set to their zero values.

    HypervisorConfig: NumVCPUs (1.x), NumVCPUsF (3.x), MemorySize, BootToBeTemplate,
    BootFromTemplate, MemoryPath, DevicesStatePath, SharedPath, VMStorePath, RunStorePath;
    each only where the payload has it. Kata 1.x also resets ProxyConfig (the proxy's path
    and debug flag never decide whether a VM fits), so that is zeroed too when present.
    Used by our client to decide whether a request fits the cache; the input is not
    modified.
    """
    out = copy.deepcopy(dict(vm_config))
    hypervisor = out.get("HypervisorConfig")
    hypervisor = dict(hypervisor) if isinstance(hypervisor, Mapping) else {}
    hypervisor.update({k: v for k, v in RESET_HYPERVISOR_FIELDS.items() if k in hypervisor})
    out["HypervisorConfig"] = hypervisor
    if "ProxyConfig" in out:
        out["ProxyConfig"] = {"Path": "", "Debug": False}
    return out
