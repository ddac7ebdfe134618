"""One pass over the parsed document: a `Config`, or every problem the file has.

The order matters. The Kata generation comes first: it decides how `[hypervisor.qemu]` is
read (1.x and 3.x derive the VM's values differently, kata/) and which Go type each of
Kata's integers must fit. Then each table (validate_hypervisor, validate_factory,
validate_vmcache), then Kata's integers across all its tables (validate_integers), and last
what spans tables: a memory budget that holds not even one VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .. import kata
from .keys import OUR_TABLE
from .model import Config, KataVersion
from .reader import Reader
from .validate_factory import factory
from .validate_hypervisor import hypervisor
from .validate_integers import kata_integers
from .validate_vmcache import vmcache


def validate(r: Reader) -> Config | None:
    """The `Config` of `r`'s document; None, with `r.problems` saying why, if it has none."""
    hypervisor_tables = r.table("hypervisor")
    others = sorted(k for k in hypervisor_tables if k != "qemu")
    if "qemu" not in hypervisor_tables:
        found = f" (found: {', '.join(others)})" if others else ""
        r.problem("hypervisor.qemu", f"table missing: kata-vmcache drives QEMU{found}")
    ours_table = r.table(OUR_TABLE)
    # First: it decides how the other tables are read.
    version, origin = generation(r, ours_table, f"{OUR_TABLE}.kata_version")
    hv = hypervisor(r, r.table("hypervisor.qemu"), version)
    fac = factory(r, r.table("factory"))
    ours = vmcache(r, ours_table, version, origin)
    kata_integers(r, version)
    if r.problems or hv is None or fac is None or ours is None:
        return None
    config = Config(r.source, hv, fac, ours, MappingProxyType(dict(r.doc)))
    if fac.vm_cache_number > 0 and hv.memory_mib > config.memory_budget_mib:
        default = ("" if ours.memory_budget_mib
                   else ", the default: half of the host's MemTotal")
        r.problem(f"{OUR_TABLE}.memory_budget_mib",
                  f"smaller than one VM (got {config.memory_budget_mib} MiB{default}; "
                  f"hypervisor.qemu.default_memory is {hv.memory_mib} MiB)")
        return None
    return config


def generation(r: Reader, t: Mapping[str, Any], key: str) -> tuple[KataVersion, str]:
    """The generation the file is for, and where that came from: `[vmcache] kata_version`
    when set, else detected. Kata 2.0 removed the [proxy.*] and [shim.*] tables: either
    present means a 1.x file (kata.detect_generation)."""
    if "kata_version" in t:
        version: KataVersion = r.choice(t, key, kata.GENERATIONS, "3.x")
        return version, "set in [vmcache]"
    return kata.detect_generation(r.doc)
