"""`[hypervisor.qemu]`: the VM Kata would boot from this file, and so the VM we boot.

The file's values are checked here, but the VM's numbers (binary, kernel, vCPUs, max vCPUs,
memory, memory slots) are not computed here: they are `kata.resolve()`'s, the generation's
own derivation, the one the `Config` reply is built from. So the VM we boot is the VM
kata-runtime compares: a `default_memory` under Kata's 256 MiB floor boots 2048 MiB, as
Kata's would (with a warning), and with `path` unset the binary is the generation's default,
refused when it does not exist, as Kata refuses it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import kata
from .keys import KATA_DEFAULT_KERNEL, KATA_QEMU_KEYS
from .model import HypervisorSettings, KataVersion
from .reader import Reader


def hypervisor(r: Reader, t: Mapping[str, Any],
               version: KataVersion) -> HypervisorSettings | None:
    """The table `t` read the way Kata `version` reads it; None if it has a problem."""
    p = "hypervisor.qemu"
    r.check_keys(t, p, KATA_QEMU_KEYS, strict=False)
    qemu = r.existing_file(t, f"{p}.path", kata.default_hypervisor_path(version),
                           executable=True, generation=version)
    kernel = r.existing_file(t, f"{p}.kernel", KATA_DEFAULT_KERNEL, generation=version)
    initrd = r.existing_file(t, f"{p}.initrd", "")
    image = r.existing_file(t, f"{p}.image", "")
    if t.get("initrd") and t.get("image"):
        r.problem(f"{p}.image",
                  "cannot be set together with initrd (Kata boots one of them)")
    elif not t.get("initrd") and not t.get("image"):
        r.problem(f"{p}.initrd", "missing: set initrd or image (got neither)")
    machine = r.get(t, f"{p}.machine_type", str, "", "a QEMU machine type like \"q35\"")
    if machine and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", machine):
        r.problem(f"{p}.machine_type", f"not a machine type (got {machine!r}, "
                  "expected a name like \"q35\" or \"pc\")")
    params = r.get(t, f"{p}.kernel_params", str, "", "a string of kernel parameters")
    for i, c in enumerate(params):
        if unicodedata.category(c) == "Cc":
            r.problem(f"{p}.kernel_params", f"contains a control character "
                      f"(U+{ord(c):04X} at offset {i}); separate parameters with "
                      "spaces, on one line")
            break
    sizes(r, t, p, version)
    debug = r.get(t, f"{p}.enable_debug", bool, False, "true or false")
    if version == "3.x" and t.get("enable_numa") is True:
        r.warn(f"{p}.enable_numa", "kata-vmcache boots VMs without guest NUMA nodes: "
               "Kata 3.x will not take them (its Config has GuestNUMANodes)")
    for key, reason in kata.loader_refusals(r.doc, version):
        r.warn(f"{p}.{key}", f"Kata {version}'s loader refuses this file: {reason}")

    if r.problems or qemu is None or kernel is None:
        return None
    # One derivation: what the VM boots with is what the Config reply says.
    values = kata.resolve(r.doc, version)
    if values.max_vcpus < values.vcpus:
        r.problem(f"{p}.default_maxvcpus", f"smaller than default_vcpus "
                  f"(got {values.max_vcpus}, expected >= {values.vcpus})")
        return None
    return HypervisorSettings(
        path=Path(values.path),
        kernel=Path(values.kernel),
        initrd=initrd,
        image=image,
        machine_type=values.machine_type,
        kernel_params=tuple(params.split()),
        vcpus=values.vcpus,
        max_vcpus=values.max_vcpus,
        memory_mib=values.memory_mib,
        memory_slots=values.memory_slots,
        debug=debug,
    )


def sizes(r: Reader, t: Mapping[str, Any], p: str, version: KataVersion) -> None:
    """The VM's size as written (vCPUs, memory, slots): its type and its bounds. What the
    VM gets from them is the generation's derivation (kata.resolve)."""
    # Kata 1.x decodes default_vcpus into an int32, 3.x into a float32 (a fraction of a
    # CPU is a cgroup quota; the VM boots with it rounded up).
    if version == "3.x":
        r.get(t, f"{p}.default_vcpus", (int, float), 0, "a number")
    else:
        r.get(t, f"{p}.default_vcpus", int, 0, "an integer")
    max_vcpus = r.get(t, f"{p}.default_maxvcpus", int, 0, "an integer >= 0")
    if max_vcpus < 0:
        r.problem(f"{p}.default_maxvcpus", f"must be >= 0 (got {max_vcpus})")
    memory = r.get(t, f"{p}.default_memory", int, 0, "an integer (MiB)")
    if memory < 0:
        r.problem(f"{p}.default_memory", f"must be >= 0 MiB (got {memory})")
    elif 0 < memory < kata.MIN_HYPERVISOR_MEMORY_MIB:
        r.warn(f"{p}.default_memory", f"under Kata's minimum of "
               f"{kata.MIN_HYPERVISOR_MEMORY_MIB} MiB (got {memory}): Kata {version}, "
               f"and so kata-vmcache, boots {kata.DEFAULT_MEMORY_MIB} MiB")
    slots = r.get(t, f"{p}.memory_slots", int, 0, "an integer")
    if not 0 <= slots <= 255:
        r.problem(f"{p}.memory_slots", f"out of range (got {slots}, expected 0 to 255)")
