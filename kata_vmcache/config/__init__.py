"""Configuration: Kata's own configuration.toml, read unchanged, validated once.

Who reads what in the file:

| table             | owner        | what we do with it                                    |
|-------------------|--------------|-------------------------------------------------------|
| [hypervisor.qemu] | Kata         | how to build each VM (QEMU, kernel, initrd/image ...) |
| [factory]         | Kata         | cache size, endpoint, templating                      |
| [vmcache]         | kata-vmcache | settings Kata has no key for (accelerator, timeouts)  |
| anything else     | Kata         | kept as-is for the Kata JSON of `Config` replies      |

Kata's parser ignores tables it does not know, so `[vmcache]` is invisible to kata-runtime
and the same file serves both. Inside the tables we read, Kata keys we do not use are
accepted silently, unknown keys get a warning (a typo in Kata's own tables must not stop a
host), and unknown keys in our own table are refused with a "did you mean" hint.

Every problem in the file is collected and reported at once, each as
`PATH:LINE: table.key: what is wrong (got X, expected Y)`. After `load()` returns, the rest of
the program trusts the `Config` object: nothing downstream re-validates.

The file is read the way one Kata generation reads it (`[vmcache] kata_version`, "1.x" or
"3.x"; by default detected: a `[proxy.*]` or `[shim.*]` table means 1.x). The VM's values
(binary, kernel, vCPUs, max vCPUs, memory, memory slots) come from that generation's
derivation in kata/ (`kata.resolve()`), the same one the `Config` reply is built from, so
the VM we boot is the VM kata-runtime compares and would have booted from the same file.
Integers in Kata's tables must fit the Go type Kata decodes them into: a value Kata itself
cannot load is refused here.

What the file alone cannot tell (does the configured QEMU know the machine type, can the
state directory be ours) is checked by factory/host.py, at `check-config`, start and
reload.

The modules, in the order a file goes through them:

| module                 | holds                                                        |
|------------------------|--------------------------------------------------------------|
| loader.py              | which file, TOML parsing, `load()` and `parse()`             |
| validate.py            | the one pass: generation first, then each table, then budget |
| validate_hypervisor.py | [hypervisor.qemu], with kata.resolve()'s values              |
| validate_factory.py    | [factory]                                                    |
| validate_vmcache.py    | [vmcache], our own table                                     |
| validate_integers.py   | Kata's integers against the Go types its loader has          |
| reader.py              | typed reads that record a problem and go on                  |
| problems.py            | line numbers of keys, "did you mean", `problem_in`           |
| values.py              | TOML values as Kata types them ("int, not bool"), host:port  |
| keys.py                | the keys of each table and whose they are; Kata's defaults   |
| model.py               | the frozen `Config` and its settings                         |
| display.py             | `describe()`: check-config's rows, reload's comparison       |

The names below are the package's interface: import them from `kata_vmcache.config`.
"""

from __future__ import annotations

from .display import describe
from .keys import (
    KATA_DEFAULT_ENDPOINT,
    KATA_DEFAULT_KERNEL,
    KATA_DEFAULT_TEMPLATE_PATH,
    KATA_FACTORY_KEYS,
    KATA_QEMU_KEYS,
    KATA_VM_STORAGE_PATH,
    OUR_KEYS,
    OUR_TABLE,
)
from .loader import DEFAULT_CONFIG_PATHS, find_class_config, find_config, load, parse
from .model import (
    NVDIMM_ROOM_MIB,
    AcceleratorSetting,
    AutoscaleSettings,
    BootPriority,
    Config,
    DaemonSettings,
    FactorySettings,
    GuestAgent,
    HypervisorSettings,
    KataVersion,
    LogFormat,
    ReadyProbe,
    default_memory_budget_mib,
    host_memory_mib,
)
from .problems import problem_in
from .reader import SYSTEM_TREES
from .validate_integers import GO_INT_RANGES, KATA_INTEGER_KEYS
from .validate_vmcache import MIN_READY_TIMEOUT, MIN_STOP_TIMEOUT
from .values import split_address

__all__ = [
    "DEFAULT_CONFIG_PATHS",
    "GO_INT_RANGES",
    "KATA_DEFAULT_ENDPOINT",
    "KATA_DEFAULT_KERNEL",
    "KATA_DEFAULT_TEMPLATE_PATH",
    "KATA_FACTORY_KEYS",
    "KATA_INTEGER_KEYS",
    "KATA_QEMU_KEYS",
    "KATA_VM_STORAGE_PATH",
    "MIN_READY_TIMEOUT",
    "MIN_STOP_TIMEOUT",
    "NVDIMM_ROOM_MIB",
    "OUR_KEYS",
    "OUR_TABLE",
    "SYSTEM_TREES",
    "AcceleratorSetting",
    "AutoscaleSettings",
    "BootPriority",
    "Config",
    "DaemonSettings",
    "FactorySettings",
    "GuestAgent",
    "HypervisorSettings",
    "KataVersion",
    "LogFormat",
    "ReadyProbe",
    "default_memory_budget_mib",
    "describe",
    "find_class_config",
    "find_config",
    "host_memory_mib",
    "load",
    "parse",
    "problem_in",
    "split_address",
]
