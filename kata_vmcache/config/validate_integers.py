"""Kata's integers against the Go types its loader decodes them into.

A file Kata cannot load is refused here rather than found out by kata-runtime. Kata's
TOML decoder (BurntSushi/toml) refuses a value out of its field's range, and the two
generations decode some keys into different types (memory_offset = 2**33 loads in 3.x, a
uint64, not in 1.x, a uint32). So each integer key of Kata's tables is checked against the
type of the generation the file is for; a key that generation does not have, it ignores.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .model import KataVersion
from .reader import Reader
from .values import is_number, show

#: Go integer types: the values Kata's TOML decoder (BurntSushi/toml) accepts for each.
GO_INT_RANGES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "uint": (0, 2**64 - 1),  # Kata runs on 64-bit hosts
    "float32": (-(2**127), 2**127),  # an integer into a float32: any TOML integer fits
})

#: Integer keys of the Kata tables we read, and the Go type each generation's loader
#: decodes them into: (Kata 1.x, Kata 3.x); None where that generation has no such key.
#: From the `hypervisor`, `factory`, `agent` and `runtime` structs of pkg/katautils/config.go
#: in kata-containers/runtime (1.x) and src/runtime/pkg/katautils/config.go in
#: kata-containers 3.30.0. A value is refused when the generation the file is for
#: ([vmcache] kata_version, or detected) cannot decode it (memory_offset = 2**33 loads in
#: 3.x, uint64, not in 1.x, uint32); a key that generation does not have, it ignores.
KATA_INTEGER_KEYS: Mapping[str, tuple[str | None, str | None]] = MappingProxyType({
    "hypervisor.qemu.default_vcpus": ("int32", "float32"),
    "hypervisor.qemu.default_maxvcpus": ("uint32", "uint32"),
    "hypervisor.qemu.default_memory": ("uint32", "uint32"),
    "hypervisor.qemu.memory_slots": ("uint32", "uint32"),
    "hypervisor.qemu.memory_offset": ("uint32", "uint64"),
    "hypervisor.qemu.default_bridges": ("uint32", "uint32"),
    "hypervisor.qemu.msize_9p": ("uint32", "uint32"),
    "hypervisor.qemu.pcie_root_port": ("uint32", "uint32"),
    "hypervisor.qemu.virtio_fs_cache_size": ("uint32", "uint32"),
    "hypervisor.qemu.default_maxmemory": (None, "uint64"),
    "hypervisor.qemu.virtio_fs_queue_size": (None, "uint32"),
    "hypervisor.qemu.hypervisor_loglevel": (None, "uint32"),
    "hypervisor.qemu.remote_hypervisor_timeout": (None, "uint32"),
    "hypervisor.qemu.block_device_logical_sector_size": (None, "uint32"),
    "hypervisor.qemu.block_device_physical_sector_size": (None, "uint32"),
    "hypervisor.qemu.vhost_user_reconnect_timeout_sec": (None, "uint32"),
    "hypervisor.qemu.indep_iothreads": (None, "uint32"),
    "hypervisor.qemu.pcie_switch_port": (None, "uint32"),
    "hypervisor.qemu.tdx_quote_generation_service_socket_port": (None, "uint32"),
    "hypervisor.qemu.snp_guest_policy": (None, "uint64"),
    "hypervisor.qemu.rx_rate_limiter_max_rate": (None, "uint64"),
    "hypervisor.qemu.tx_rate_limiter_max_rate": (None, "uint64"),
    **{f"hypervisor.qemu.{kind}_rate_limiter_{what}": (None, "int64")
       for kind in ("disk", "net")
       for what in ("bw_max_rate", "bw_one_time_burst", "ops_max_rate", "ops_one_time_burst")},
    "factory.vm_cache_number": ("uint", "uint"),
    "agent.kata.dial_timeout": (None, "uint32"),
    "agent.kata.cdh_api_timeout": (None, "uint32"),
    "agent.kata.launch_process_timeout": (None, "uint32"),
    "runtime.create_container_timeout": (None, "uint64"),
})


def kata_integers(r: Reader, version: KataVersion) -> None:
    """Every integer key of Kata's tables must fit the Go type the file's Kata
    generation (`version`) decodes it into (`KATA_INTEGER_KEYS`). Keys already refused
    by a check of their own are skipped: one problem per key."""
    refused = {problem.key for problem in r.problems}
    for key, types in KATA_INTEGER_KEYS.items():
        table, _, name = key.rpartition(".")
        node: Any = r.doc
        for part in table.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping) or name not in node or key in refused:
            continue
        value = node[name]
        known = [(gen, go) for gen, go in zip(("1.x", "3.x"), types, strict=True)
                 if go and gen == version]
        if not known:
            continue  # not a key of that generation: its loader ignores it
        floats = any(go.startswith("float") for _, go in known)
        if not is_number(value) or (isinstance(value, float) and not floats):
            r.problem(key, f"wrong type (got {show(value)}, expected an integer)")
            continue
        if isinstance(value, float):
            continue  # a float for a float32 field: Kata 3.x's to judge
        if any(lo <= value <= hi for lo, hi in (GO_INT_RANGES[go] for _, go in known)):
            continue
        gens: dict[str, list[str]] = {}
        for gen, go in known:
            gens.setdefault(go, []).append(gen)
        expected = "; ".join(f"{GO_INT_RANGES[go][0]} to {GO_INT_RANGES[go][1]}: {go} "
                             f"in Kata {' and '.join(g)}" for go, g in gens.items())
        r.problem(key, f"out of range for Kata's loader (got {value}, "
                       f"expected {expected})")
