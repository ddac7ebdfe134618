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
derivation in kata.py (`kata.resolve()`), the same one the `Config` reply is built from, so
the VM we boot is the VM kata-runtime compares and would have booted from the same file: a
`default_memory` under Kata's 256 MiB floor boots 2048 MiB, as Kata's would; with `path`
unset the binary is the generation's default, refused when it does not exist, as Kata
refuses it. Integers in Kata's tables must fit the Go type Kata decodes them into
(`KATA_INTEGER_KEYS`): a value Kata itself cannot load is refused here.

What the file alone cannot tell (does the configured QEMU know the machine type, can the
state directory be ours) is checked by `preflight.py`, at `check-config`, start and reload.
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli stays the fallback the brief asks for
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import kata
from .errors import ConfigError, ConfigProblem

#: Kata's configuration lookup order (kata-containers/runtime, pkg/katautils).
DEFAULT_CONFIG_PATHS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
)

# Kata defaults (pkg/katautils/config-settings.go.in). The hypervisor's (binary, machine
# type, vCPUs, memory, slots) are the generation's, in kata.py: the values come from there.
KATA_DEFAULT_KERNEL = kata.DEFAULT_KERNEL_PATH
KATA_DEFAULT_ENDPOINT = "/var/run/kata-containers/cache.sock"
KATA_DEFAULT_TEMPLATE_PATH = "/run/vc/vm/template"
#: qemu.go genericMemoryTopology: maxmem has 1024 MiB above the host's memory for an NVDIMM.
NVDIMM_ROOM_MIB = 1024
#: persist/fs RunVMStoragePath(): where kata-runtime looks for a VM's sockets.
KATA_VM_STORAGE_PATH = "/run/vc/vm"
#: A VM id (12 characters) plus the longest file name Kata puts in a VM's directory.
_VM_SOCKET_TAIL = len("/0123456789ab/console.sock")

OUR_TABLE = "vmcache"

Accelerator = Literal["auto", "kvm", "tcg"]
ReadyProbe = Literal["kata-agent", "serial"]
GuestAgent = Literal["kata", "none"]
KataVersion = Literal["1.x", "3.x"]
LogFormat = Literal["text", "json"]
BootPriority = Literal["idle", "normal"]

# Keys Kata reads in [hypervisor.qemu] (1.x and 2.x). We use a few; the others are Kata's
# business and must not produce warnings on a stock Kata file.
KATA_QEMU_KEYS = frozenset(
    """
    path kernel initrd image firmware firmware_volume machine_accelerators cpu_features
    kernel_params machine_type default_vcpus default_maxvcpus default_bridges default_memory
    memory_slots memory_offset enable_virtio_mem disable_block_device_use shared_fs
    virtio_fs_daemon valid_virtio_fs_daemon_paths virtio_fs_cache_size virtio_fs_extra_args
    virtio_fs_cache virtio_fs_queue_size block_device_driver block_device_aio
    block_device_cache_set block_device_cache_direct block_device_cache_noflush
    enable_iothreads enable_mem_prealloc enable_hugepages enable_vhost_user_store
    vhost_user_store_path valid_vhost_user_store_paths enable_iommu enable_iommu_platform
    file_mem_backend valid_file_mem_backends pflashes enable_swap enable_debug
    disable_nesting_checks msize_9p disable_image_nvdimm hotplug_vfio_on_root_bus
    pcie_root_port hot_plug_vfio cold_plug_vfio pcie_switch_port disable_vhost_net
    entropy_source valid_entropy_sources guest_hook_path rx_rate_limiter_max_rate
    tx_rate_limiter_max_rate use_vsock valid_hypervisor_paths valid_jailer_paths jailer_path
    ctlpath valid_ctlpaths enable_annotations guest_memory_dump_path guest_memory_dump_paging
    confidential_guest sev_snp_guest enable_guest_swap seccompsandbox disable_selinux
    disable_guest_selinux kernel_verity_params dial_timeout rootfs_type
    disable_seccomp static_sandbox_resource_mgmt sgx_epc_size snp_id_block snp_id_auth
    snp_guest_policy snp_certs_path extra_monitor_socket reclaim_guest_freed_memory
    tdx_quote_generation_service_socket_port indep_iothreads
    block_device_logical_sector_size block_device_physical_sector_size default_maxmemory
    disk_rate_limiter_bw_max_rate disk_rate_limiter_bw_one_time_burst
    disk_rate_limiter_ops_max_rate disk_rate_limiter_ops_one_time_burst
    net_rate_limiter_bw_max_rate net_rate_limiter_bw_one_time_burst
    net_rate_limiter_ops_max_rate net_rate_limiter_ops_one_time_burst enable_numa
    numa_mapping hypervisor_loglevel measurement_algo remote_hypervisor_socket
    remote_hypervisor_timeout rootless use_legacy_serial vhost_user_reconnect_timeout_sec
    """.split()
)
OUR_KEYS = frozenset(
    """
    accelerator ready_timeout state_dir boot_parallelism boot_priority stop_timeout ready_probe
    ready_line
    max_memory socket_mode socket_group log_format vm_storage_path guest_agent kata_version
    memory_budget_mib metrics_address autoscale min_ready max_ready shrink_after
    """.split()
)
KATA_FACTORY_KEYS = frozenset(
    {"enable_template", "template_path", "vm_cache_number", "vm_cache_endpoint"}
)

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

#: The fewest seconds that can work: no guest is ready within a second of QEMU's start
#: (the demo guest under KVM takes longer), and QMP `quit` plus QEMU's exit take a good
#: part of half a second on a busy host (below it every stop would end in SIGKILL).
MIN_READY_TIMEOUT = 1.0
MIN_STOP_TIMEOUT = 0.5
#: Not ours to fill: pseudo-file systems where a directory of ours or a socket cannot be.
SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))


@dataclass(frozen=True)
class HypervisorSettings:
    """`[hypervisor.qemu]`, resolved the way Kata resolves it."""

    #: QEMU binary (Kata: `path`; unset: the generation's default, 1.x qemu-lite).
    path: Path
    #: Guest kernel (Kata: `kernel`).
    kernel: Path
    #: Initramfs; exactly one of initrd and image is set (Kata: `initrd`).
    initrd: Path | None
    #: Root disk image, attached read-only as Kata does (Kata: `image`).
    image: Path | None
    #: QEMU machine type (Kata: `machine_type`, default 1.x "pc", 3.x "q35").
    machine_type: str
    #: Extra kernel command line, split on white space (Kata: `kernel_params`).
    kernel_params: tuple[str, ...]
    #: vCPUs a VM boots with (Kata: `default_vcpus`; 0 -> 1, <0 or > host CPUs -> host CPUs;
    #: 3.x takes a fraction and boots it rounded up).
    vcpus: int
    #: vCPU hot-plug ceiling (Kata: `default_maxvcpus`; 0 or > host CPUs -> host CPUs).
    max_vcpus: int
    #: Boot memory in MiB (Kata: `default_memory`; under 256 -> 2048).
    memory_mib: int
    #: DIMM slots for memory hot-plug (Kata: `memory_slots`, 0 -> 10).
    memory_slots: int
    #: Kata's `enable_debug`: keeps the guest console verbose.
    debug: bool

    # path, kernel, vcpus, max_vcpus, memory_mib and memory_slots are `kata.resolve()`'s
    # values for the file's Kata generation: the Config reply carries the same ones.


@dataclass(frozen=True)
class FactorySettings:
    """`[factory]`."""

    #: VMs kept booted and paused (Kata: `vm_cache_number`; 0 disables the cache).
    vm_cache_number: int
    #: gRPC Unix socket (Kata: `vm_cache_endpoint`).
    vm_cache_endpoint: Path
    #: Clone VMs from a saved template VM (Kata: `enable_template`).
    enable_template: bool
    #: Where the template's memory and device state live (Kata: `template_path`).
    template_path: Path


@dataclass(frozen=True)
class AutoscaleSettings:
    """`[vmcache] autoscale`, `min_ready`, `max_ready`, `shrink_after` (autoscale.py)."""

    #: Size the pool from demand; false: vm_cache_number is the fixed target (Kata's way).
    enabled: bool = False
    #: Bounds of the target while autoscaling (the memory budget still wins).
    min_ready: int = 1
    max_ready: int = 16
    #: Seconds without demand for them before surplus ready VMs are stopped.
    shrink_after: float = 60.0


@dataclass(frozen=True)
class DaemonSettings:
    """`[vmcache]`: what Kata has no key for. Documented in etc/configuration.toml."""

    #: "kvm", "tcg", or "auto" (KVM when /dev/kvm is usable, else TCG).
    accelerator: Accelerator = "auto"
    #: Seconds from QEMU start to the guest's ready signal before the boot counts as failed.
    ready_timeout: float = 30.0
    #: Runtime state: one directory per VM (QMP, console, record) for crash recovery.
    state_dir: Path = Path("/run/kata-vmcache")
    #: VMs booting at the same time.
    boot_parallelism: int = 2
    #: CPU priority of boots made ahead of demand: "idle" (SCHED_IDLE: they never take a
    #: core a sandbox wants) or "normal". A boot a caller waits for, and every handed-out
    #: VM, runs at normal priority either way (priority.py).
    boot_priority: BootPriority = "idle"
    #: Seconds QEMU gets to exit after QMP `quit` before it is killed.
    stop_timeout: float = 3.0
    #: How readiness is decided: "kata-agent" (the agent answers its health check, as
    #: Kata's NewVM asks before pausing) or "serial" (a line on our second serial port, as
    #: the bundled demo guest prints). Default: "kata-agent" with guest_agent = "kata".
    ready_probe: ReadyProbe = "kata-agent"
    #: The line the guest prints when it is up ("serial" probe).
    ready_line: str = "KATA-VMCACHE-READY"
    #: Hot-plug memory ceiling in MiB; 0 means Kata's (Config.max_memory_mib).
    max_memory_mib: int = 0
    #: The most guest memory in MiB the daemon commits: the configured memory of every VM
    #: it keeps or boots (hot-plug headroom not counted). 0: half of the host's MemTotal.
    memory_budget_mib: int = 0
    #: Permission bits of the gRPC socket.
    socket_mode: int = 0o600
    #: Group owning the gRPC socket (a non-root runtime group with socket_mode 0660).
    socket_group: str = ""
    #: Log lines as "text" or "json".
    log_format: LogFormat = "text"
    #: Kata's RunVMStoragePath: each VM's sockets, pid file and shared directory live in
    #: `<vm_storage_path>/<vm id>/`, where kata-runtime looks for them (Kata 1.x's
    #: kata-proxy sockets in `<its parent>/sbs/<vm id>/`).
    vm_storage_path: Path = Path(KATA_VM_STORAGE_PATH)
    #: "kata": the guest image runs Kata's agent (a proxy is started for 1.x, readiness
    #: is its health check); "none": a guest without one (the demo guest).
    guest_agent: GuestAgent = "kata"
    #: Which Kata generation the file is for ([proxy.*] or [shim.*] present: 1.x): how the
    #: file is read, which generation's `Config` payload is sent and which device model
    #: its VMs get.
    kata_version: KataVersion = "3.x"
    #: Where kata_version came from, for check-config.
    kata_version_origin: str = "detected: no [proxy.*] or [shim.*] table"
    #: "host:port" serving Prometheus's /metrics (metrics.py); "" serves none.
    metrics_address: str = ""
    #: The pool's target from demand (autoscale.py); off by default.
    autoscale: AutoscaleSettings = AutoscaleSettings()


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: Path | None
    hypervisor: HypervisorSettings
    factory: FactorySettings
    daemon: DaemonSettings
    #: The parsed document, for rebuilding Kata's JSON exactly as Kata's loader sees it.
    document: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def kata_vm_config(self) -> dict[str, Any]:
        """The `Config` payload: Kata's VMConfig JSON for the file's generation."""
        return kata.vm_config(self.document, self.daemon.kata_version)

    @property
    def max_memory_mib(self) -> int:
        """QEMU's maxmem: `[vmcache] max_memory`, else Kata's (genericMemoryTopology): the
        host's memory plus memory_offset plus 1024 MiB, the room an image's NVDIMM needs."""
        if self.daemon.max_memory_mib:
            return self.daemon.max_memory_mib
        qemu = self.document.get("hypervisor", {}).get("qemu", {})
        offset = qemu.get("memory_offset", 0) if isinstance(qemu, Mapping) else 0
        offset = offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
        return host_memory_mib() + offset + NVDIMM_ROOM_MIB

    @property
    def memory_budget_mib(self) -> int:
        """[vmcache] memory_budget_mib, or its default: half of the host's MemTotal."""
        return self.daemon.memory_budget_mib or default_memory_budget_mib()

    @property
    def cache_target(self) -> int:
        """The VMs kept ready: vm_cache_number, or as many as the memory budget holds."""
        return min(self.factory.vm_cache_number,
                   self.memory_budget_mib // self.hypervisor.memory_mib)

    def budget_note(self) -> str:
        """Why fewer than vm_cache_number VMs are kept, naming the numbers; "" if not."""
        wanted, kept = self.factory.vm_cache_number, self.cache_target
        if kept >= wanted:
            return ""
        memory = self.hypervisor.memory_mib
        return (f"keeping {kept} VM{'' if kept == 1 else 's'} ready, not vm_cache_number = "
                f"{wanted}: memory_budget_mib = {self.memory_budget_mib} holds {kept} of "
                f"{memory} MiB ({wanted} would need {wanted * memory} MiB)")



def host_memory_mib() -> int:
    """The host's MemTotal in MiB (sysconf's physical pages are what /proc/meminfo says)."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))


def default_memory_budget_mib() -> int:
    """memory_budget_mib's default: half of MemTotal, so a cache never takes the host."""
    return host_memory_mib() // 2


def find_config(explicit: Path | None) -> Path:
    """The file to read: `explicit`, or the first of Kata's default paths that exists."""
    if explicit is not None:
        return explicit
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
    raise ConfigError(
        [ConfigProblem("", f"no configuration file found (looked for {tried}; use --config PATH)")]
    )


def find_class_config(runtime_class: str) -> Path:
    """The file of one Kata runtime class: `configuration-<class>.toml` in Kata's lookup
    directories, in Kata's order (what kata-deploy installs per runtime class, e.g.
    configuration-qemu.toml)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", runtime_class):
        raise ConfigError([ConfigProblem("", f"--runtime-class: not a runtime class name "
                                             f"(got {runtime_class!r}, expected e.g. \"qemu\")")])
    name = f"configuration-{runtime_class}.toml"
    candidates = [p.parent / name for p in DEFAULT_CONFIG_PATHS]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    tried = " or ".join(str(p) for p in candidates)
    raise ConfigError([ConfigProblem("", f"no configuration file for runtime class "
                                         f"{runtime_class!r} (looked for {tried})")])


def load(path: Path | None = None) -> tuple[Config, list[ConfigProblem]]:
    """Read, parse and validate a configuration file; raise ConfigError with every problem."""
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigProblem("", f"{path}: no such file")]) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem("", f"{path}: is a directory, not a file")]) from None
    except PermissionError:
        raise ConfigError([ConfigProblem("", f"{path}: permission denied")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"not UTF-8 text ({exc.reason})", path)]) from None
    return parse(text, source=path)


def parse(text: str, *, source: Path | None = None) -> tuple[Config, list[ConfigProblem]]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("", f"invalid TOML: {exc}", source)]) from None
    v = _Validator(doc, text, source)
    config = v.build()
    if v.problems:
        raise ConfigError(v.problems)
    assert config is not None
    return config, v.warnings


# --- validation -------------------------------------------------------------------------

_MISSING: Any = object()


class _Validator:
    """Collects problems while reading the document; `build()` returns None if any."""

    def __init__(self, doc: Mapping[str, Any], text: str, source: Path | None) -> None:
        self.doc = doc
        self.source = source
        self.lines = _KeyLines(text)
        self.problems: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []

    # reporting

    def problem(self, key: str, message: str) -> None:
        table, _, name = key.rpartition(".")
        line = self.lines.find(table, name)
        self.problems.append(ConfigProblem(key, message, self.source, line))

    def warn(self, key: str, message: str) -> None:
        table, _, name = key.rpartition(".")
        self.warnings.append(ConfigProblem(key, message, self.source,
                                           self.lines.find(table, name)))

    # typed getters: each returns a usable default after recording a problem

    def table(self, dotted: str) -> Mapping[str, Any]:
        node: Any = self.doc
        for part in dotted.split("."):
            if not isinstance(node, Mapping):
                return {}
            node = node.get(part, {})
        if not isinstance(node, Mapping):
            self.problem(dotted, f"must be a table (got {_show(node)})")
            return {}
        return node

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        expected: str,
    ) -> Any:
        value = table.get(key.rpartition(".")[2], _MISSING)
        if value is _MISSING:
            return default
        # bool is an int in Python; TOML keeps them apart and so do we.
        if isinstance(value, bool) and bool not in _as_tuple(kind):
            self.problem(key, f"wrong type (got {_show(value)}, expected {expected})")
            return default
        if not isinstance(value, kind):
            self.problem(key, f"wrong type (got {_show(value)}, expected {expected})")
            return default
        return value

    def check_keys(self, table: Mapping[str, Any], prefix: str, known: frozenset[str],
                   *, strict: bool) -> None:
        for key in table:
            if key in known:
                continue
            hint = _suggest(key, known)
            if strict:
                self.problem(f"{prefix}.{key}", f"unknown key{hint}")
            else:
                self.warn(f"{prefix}.{key}", f"unknown key, ignored{hint}")

    # the file's three tables

    def build(self) -> Config | None:
        hypervisor_tables = self.table("hypervisor")
        others = sorted(k for k in hypervisor_tables if k != "qemu")
        if "qemu" not in hypervisor_tables:
            found = f" (found: {', '.join(others)})" if others else ""
            self.problem("hypervisor.qemu", f"table missing: kata-vmcache drives QEMU{found}")
        ours_table = self.table(OUR_TABLE)
        # First: it decides how the other tables are read.
        version, origin = self.kata_version(ours_table, f"{OUR_TABLE}.kata_version")
        hv = self.hypervisor(self.table("hypervisor.qemu"), version)
        fac = self.factory(self.table("factory"))
        ours = self.ours(ours_table, version, origin)
        self.kata_integers(version)
        if self.problems or hv is None or fac is None or ours is None:
            return None
        config = Config(self.source, hv, fac, ours, MappingProxyType(dict(self.doc)))
        if fac.vm_cache_number > 0 and hv.memory_mib > config.memory_budget_mib:
            default = ("" if ours.memory_budget_mib
                       else ", the default: half of the host's MemTotal")
            self.problem(f"{OUR_TABLE}.memory_budget_mib",
                         f"smaller than one VM (got {config.memory_budget_mib} MiB{default}; "
                         f"hypervisor.qemu.default_memory is {hv.memory_mib} MiB)")
            return None
        return config

    def hypervisor(self, t: Mapping[str, Any],
                   version: KataVersion) -> HypervisorSettings | None:
        p = "hypervisor.qemu"
        self.check_keys(t, p, KATA_QEMU_KEYS, strict=False)
        qemu = self.existing_file(t, f"{p}.path", kata.default_hypervisor_path(version),
                                  executable=True, generation=version)
        kernel = self.existing_file(t, f"{p}.kernel", KATA_DEFAULT_KERNEL, generation=version)
        initrd = self.existing_file(t, f"{p}.initrd", "")
        image = self.existing_file(t, f"{p}.image", "")
        if t.get("initrd") and t.get("image"):
            self.problem(f"{p}.image",
                         "cannot be set together with initrd (Kata boots one of them)")
        elif not t.get("initrd") and not t.get("image"):
            self.problem(f"{p}.initrd", "missing: set initrd or image (got neither)")
        machine = self.get(t, f"{p}.machine_type", str, "", "a QEMU machine type like \"q35\"")
        if machine and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", machine):
            self.problem(f"{p}.machine_type", f"not a machine type (got {machine!r}, "
                         "expected a name like \"q35\" or \"pc\")")
        params = self.get(t, f"{p}.kernel_params", str, "", "a string of kernel parameters")
        for i, c in enumerate(params):
            if unicodedata.category(c) == "Cc":
                self.problem(f"{p}.kernel_params", f"contains a control character "
                             f"(U+{ord(c):04X} at offset {i}); separate parameters with "
                             "spaces, on one line")
                break
        # Kata 1.x decodes default_vcpus into an int32, 3.x into a float32 (a fraction of a
        # CPU is a cgroup quota; the VM boots with it rounded up).
        if version == "3.x":
            self.get(t, f"{p}.default_vcpus", (int, float), 0, "a number")
        else:
            self.get(t, f"{p}.default_vcpus", int, 0, "an integer")
        max_vcpus = self.get(t, f"{p}.default_maxvcpus", int, 0, "an integer >= 0")
        if max_vcpus < 0:
            self.problem(f"{p}.default_maxvcpus", f"must be >= 0 (got {max_vcpus})")
        memory = self.get(t, f"{p}.default_memory", int, 0, "an integer (MiB)")
        if memory < 0:
            self.problem(f"{p}.default_memory", f"must be >= 0 MiB (got {memory})")
        elif 0 < memory < kata.MIN_HYPERVISOR_MEMORY_MIB:
            self.warn(f"{p}.default_memory", f"under Kata's minimum of "
                      f"{kata.MIN_HYPERVISOR_MEMORY_MIB} MiB (got {memory}): Kata {version}, "
                      f"and so kata-vmcache, boots {kata.DEFAULT_MEMORY_MIB} MiB")
        slots = self.get(t, f"{p}.memory_slots", int, 0, "an integer")
        if not 0 <= slots <= 255:
            self.problem(f"{p}.memory_slots", f"out of range (got {slots}, expected 0 to 255)")
        debug = self.get(t, f"{p}.enable_debug", bool, False, "true or false")
        if version == "3.x" and t.get("enable_numa") is True:
            self.warn(f"{p}.enable_numa", "kata-vmcache boots VMs without guest NUMA nodes: "
                      "Kata 3.x will not take them (its Config has GuestNUMANodes)")
        for key, reason in kata.loader_refusals(self.doc, version):
            self.warn(f"{p}.{key}", f"Kata {version}'s loader refuses this file: {reason}")

        if self.problems or qemu is None or kernel is None:
            return None
        # One derivation: what the VM boots with is what the Config reply says.
        r = kata.resolve(self.doc, version)
        if r.max_vcpus < r.vcpus:
            self.problem(f"{p}.default_maxvcpus", f"smaller than default_vcpus "
                         f"(got {r.max_vcpus}, expected >= {r.vcpus})")
            return None
        return HypervisorSettings(
            path=Path(r.path),
            kernel=Path(r.kernel),
            initrd=initrd,
            image=image,
            machine_type=r.machine_type,
            kernel_params=tuple(params.split()),
            vcpus=r.vcpus,
            max_vcpus=r.max_vcpus,
            memory_mib=r.memory_mib,
            memory_slots=r.memory_slots,
            debug=debug,
        )

    def factory(self, t: Mapping[str, Any]) -> FactorySettings | None:
        p = "factory"
        self.check_keys(t, p, KATA_FACTORY_KEYS, strict=False)
        number = self.get(t, f"{p}.vm_cache_number", int, 0, "an integer >= 0")
        if number < 0:
            self.problem(f"{p}.vm_cache_number", f"must be >= 0 (got {number}, "
                         "expected the number of VMs to keep ready)")
        elif number > 256:
            self.problem(f"{p}.vm_cache_number", f"too large (got {number}, expected at most 256)")
        endpoint = self.abs_path(t, f"{p}.vm_cache_endpoint", KATA_DEFAULT_ENDPOINT)
        # sun_path is 108 bytes on Linux; a longer path fails late and obscurely in bind().
        if endpoint is not None and len(os.fsencode(endpoint)) > 107:
            self.problem(f"{p}.vm_cache_endpoint", f"too long for a Unix socket "
                         f"(got {len(os.fsencode(endpoint))} bytes, expected at most 107)")
        if endpoint is not None:
            self.not_in_system_tree(f"{p}.vm_cache_endpoint", endpoint)
        template = self.get(t, f"{p}.enable_template", bool, False, "true or false")
        template_path = self.abs_path(t, f"{p}.template_path", KATA_DEFAULT_TEMPLATE_PATH)
        if endpoint is None or template_path is None:
            return None
        return FactorySettings(number, endpoint, template, template_path)

    def ours(self, t: Mapping[str, Any], version: KataVersion,
             origin: str) -> DaemonSettings | None:
        p = OUR_TABLE
        d = DaemonSettings()
        self.check_keys(t, p, OUR_KEYS, strict=True)
        accel = self.choice(t, f"{p}.accelerator", ("auto", "kvm", "tcg"), d.accelerator)
        ready_timeout = self.seconds(t, f"{p}.ready_timeout", d.ready_timeout,
                                     MIN_READY_TIMEOUT, 3600)
        stop_timeout = self.seconds(t, f"{p}.stop_timeout", d.stop_timeout,
                                    MIN_STOP_TIMEOUT, 60)
        state_dir = self.abs_path(t, f"{p}.state_dir", str(d.state_dir))
        if state_dir is not None:
            self.not_in_system_tree(f"{p}.state_dir", state_dir)
        parallel = self.get(t, f"{p}.boot_parallelism", int, d.boot_parallelism,
                            "an integer from 1 to 64")
        if not 1 <= parallel <= 64:
            self.problem(f"{p}.boot_parallelism", f"out of range (got {parallel}, "
                         "expected 1 to 64)")
        boot_priority = self.choice(t, f"{p}.boot_priority", ("idle", "normal"),
                                    d.boot_priority)
        agent = self.choice(t, f"{p}.guest_agent", ("kata", "none"), d.guest_agent)
        probe = self.ready_probe(t, f"{p}.ready_probe", agent)
        ready_line = self.get(t, f"{p}.ready_line", str, d.ready_line, "a string")
        if not ready_line.strip() or "\n" in ready_line:
            self.problem(f"{p}.ready_line", f"must be one non-empty line (got {ready_line!r})")
        max_memory = self.get(t, f"{p}.max_memory", int, 0, "an integer (MiB), 0 for host memory")
        if max_memory < 0:
            self.problem(f"{p}.max_memory", f"must be >= 0 MiB (got {max_memory})")
        budget = self.get(t, f"{p}.memory_budget_mib", int, 0,
                          "an integer (MiB), 0 for half of the host's memory")
        if budget < 0:
            self.problem(f"{p}.memory_budget_mib", f"must be >= 0 MiB (got {budget})")
            budget = 0
        mode_text = self.get(t, f"{p}.socket_mode", str, "0600", "an octal string like \"0660\"")
        mode = d.socket_mode
        if not re.fullmatch(r"0?[0-7]{3}", mode_text):
            self.problem(f"{p}.socket_mode", f"not an octal mode (got {mode_text!r}, "
                         "expected \"0600\" or \"0660\")")
        else:
            mode = int(mode_text, 8)
            if mode & 0o007:
                self.problem(f"{p}.socket_mode", f"must not grant access to others "
                             f"(got {mode_text!r}, expected \"0600\" or \"0660\")")
            elif mode & 0o600 != 0o600:
                self.problem(f"{p}.socket_mode", f"the owner needs read and write "
                             f"(got {mode_text!r}, expected \"0600\" or \"0660\")")
        group = self.get(t, f"{p}.socket_group", str, "", "a group name")
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                self.problem(f"{p}.socket_group", f"no such group on this host (got {group!r})")
        log_format = self.choice(t, f"{p}.log_format", ("text", "json"), d.log_format)
        vm_storage = self.abs_path(t, f"{p}.vm_storage_path", KATA_VM_STORAGE_PATH)
        if vm_storage is not None:
            self.not_in_system_tree(f"{p}.vm_storage_path", vm_storage)
        for key, root in ((f"{p}.vm_storage_path", vm_storage), (f"{p}.state_dir", state_dir)):
            # sun_path holds 107 bytes: the VM's sockets must fit below this directory.
            if root is not None and len(os.fsencode(root)) + _VM_SOCKET_TAIL > 107:
                self.problem(key, f"too long for the VMs' sockets below it (got "
                             f"{len(os.fsencode(root))} bytes, expected at most "
                             f"{107 - _VM_SOCKET_TAIL})")
        metrics = self.get(t, f"{p}.metrics_address", str, d.metrics_address,
                           'a "host:port" string like "127.0.0.1:9464", or ""')
        if metrics:
            try:
                split_address(metrics)
            except ValueError as exc:
                self.problem(f"{p}.metrics_address", f"{exc} (got {metrics!r}, expected "
                             '"host:port" like "127.0.0.1:9464" or "[::1]:9464", or "")')
        autoscale = self.autoscale(t, p)
        if state_dir is None or vm_storage is None:
            return None
        return DaemonSettings(
            accelerator=accel,
            ready_timeout=ready_timeout,
            state_dir=state_dir,
            boot_parallelism=parallel,
            boot_priority=boot_priority,
            stop_timeout=stop_timeout,
            ready_probe=probe,
            ready_line=ready_line,
            max_memory_mib=max_memory,
            memory_budget_mib=budget,
            socket_mode=mode,
            socket_group=group,
            log_format=log_format,
            vm_storage_path=vm_storage,
            guest_agent=agent,
            kata_version=version,
            kata_version_origin=origin,
            metrics_address=metrics,
            autoscale=autoscale,
        )

    def autoscale(self, t: Mapping[str, Any], p: str) -> AutoscaleSettings:
        d = AutoscaleSettings()
        enabled = self.get(t, f"{p}.autoscale", bool, d.enabled, "true or false")
        # min_ready = 0: no VM is held without demand (scale to zero; the first request
        # after an idle period waits for a boot). max_ready = 0 would be no cache at all.
        least = self.get(t, f"{p}.min_ready", int, d.min_ready, "an integer from 0 to 256")
        most = self.get(t, f"{p}.max_ready", int, d.max_ready, "an integer from 1 to 256")
        for key, value, low in ((f"{p}.min_ready", least, 0), (f"{p}.max_ready", most, 1)):
            if not low <= value <= 256:
                self.problem(key, f"out of range (got {value}, expected {low} to 256)")
        if 1 <= most < least <= 256:
            self.problem(f"{p}.max_ready", f"below min_ready (got {most}, expected at least "
                                           f"min_ready = {least})")
        idle = self.seconds(t, f"{p}.shrink_after", d.shrink_after, 1, 86400)
        return AutoscaleSettings(enabled, least, most, idle)

    def ready_probe(self, t: Mapping[str, Any], key: str, agent: str) -> Any:
        default = "kata-agent" if agent == "kata" else "serial"
        if t.get("ready_probe") == "none":
            # It cached VMs whose guest had barely run (`cont`, then `stop`), so a
            # hand-off saved no boot at all: a cached VM must have booted (Kata's NewVM).
            self.problem(key, 'no longer supported (got "none": it cached VMs before their '
                         'guest had booted; expected "kata-agent" for a Kata guest, or '
                         '"serial" for a guest that prints ready_line)')
            return default
        probe = self.choice(t, key, ("kata-agent", "serial"), default)
        if probe == "kata-agent" and agent == "none":
            self.problem(key, 'needs an agent to ask (got "kata-agent" with guest_agent = '
                         '"none"; expected "serial")')
        return probe

    def kata_version(self, t: Mapping[str, Any], key: str) -> tuple[Any, str]:
        """Kata 2.0 removed the [proxy.*] and [shim.*] tables: either present means a 1.x
        file (kata.detect_generation)."""
        if "kata_version" in t:
            return self.choice(t, key, kata.GENERATIONS, "3.x"), "set in [vmcache]"
        return kata.detect_generation(self.doc)

    # value helpers

    def choice(self, t: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any) -> Any:
        expected = " or ".join(f'"{c}"' for c in choices)
        value = self.get(t, key, str, default, expected)
        if value not in choices:
            hint = _suggest(value, frozenset(choices))
            self.problem(key, f"not a valid choice (got {value!r}, expected {expected}){hint}")
            return default
        return value

    def seconds(self, t: Mapping[str, Any], key: str, default: float, least: float,
                most: float) -> float:
        value = self.get(t, key, (int, float), default, "a number of seconds")
        if not (math.isfinite(value) and least <= value <= most):
            self.problem(key, f"out of range (got {value}, expected seconds >= {least:g} "
                              f"and <= {most:g})")
            return default
        return float(value)

    def not_in_system_tree(self, key: str, path: Path) -> None:
        """Refuse a path under /proc, /sys or /dev (as written, or once symlinks resolve)."""
        for candidate in (path, Path(os.path.realpath(path))):
            if candidate == Path("/"):
                self.problem(key, "must not be / (got '/')")
                return
            for tree in SYSTEM_TREES:
                if candidate == tree or tree in candidate.parents:
                    self.problem(key, f"is under {tree}, which is the kernel's, not a place "
                                      f"for files of ours (got {str(path)!r})")
                    return

    def kata_integers(self, version: str) -> None:
        """Every integer key of Kata's tables must fit the Go type the file's Kata
        generation (`version`) decodes it into (`KATA_INTEGER_KEYS`). Keys already refused
        by a check of their own are skipped: one problem per key."""
        refused = {problem.key for problem in self.problems}
        for key, types in KATA_INTEGER_KEYS.items():
            table, _, name = key.rpartition(".")
            node: Any = self.doc
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
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    isinstance(value, float) and not floats):
                self.problem(key, f"wrong type (got {_show(value)}, expected an integer)")
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
            self.problem(key, f"out of range for Kata's loader (got {value}, "
                              f"expected {expected})")

    def abs_path(self, t: Mapping[str, Any], key: str, default: str) -> Path | None:
        value = self.get(t, key, str, default, "an absolute path")
        if not value or not os.path.isabs(value):
            self.problem(key, f"must be an absolute path (got {value!r})")
            return None
        if "\0" in value:
            self.problem(key, "contains a NUL byte")
            return None
        return Path(os.path.normpath(value))

    def existing_file(self, t: Mapping[str, Any], key: str, default: str,
                      *, executable: bool = False, generation: str = "") -> Path | None:
        value = self.get(t, key, str, default, "a path to a file")
        if not value:
            return None
        if "\0" in value:
            self.problem(key, "contains a NUL byte")
            return None
        path = Path(value)
        if not path.exists():
            # Kata's loader refuses a file whose paths do not resolve (ResolvePath).
            origin = ("" if key.rpartition(".")[2] in t
                      else f" (Kata {generation}'s default, which its loader refuses when "
                           "missing; set it)")
            self.problem(key, f"no such file (got {value!r}){origin}")
        elif not path.is_file():
            self.problem(key, f"not a regular file (got {value!r})")
        elif executable and not os.access(path, os.X_OK):
            self.problem(key, f"not executable (got {value!r})")
        elif not os.access(path, os.R_OK):
            self.problem(key, f"not readable (got {value!r})")
        # Kata resolves symlinks (ResolvePath) and so compares real paths: so do we.
        return Path(os.path.realpath(path)) if path.exists() else path


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of a "host:port" or "[v6]:port" address; ValueError says what is
    wrong. The host must be given: listening on every interface is a choice ("0.0.0.0")."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError("needs a host and a port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_text)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _show(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = names.get(type(value), type(value).__name__)
    text = repr(value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def _suggest(key: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class _KeyLines:
    """Line numbers of `key =` inside `[table]`, for messages (tomllib gives none)."""

    _header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")

    def __init__(self, text: str) -> None:
        self._index: dict[tuple[str, str], int] = {}
        self._tables: dict[str, int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            if m := self._header.match(line):
                table = m.group(1).replace('"', "").replace(" ", "")
                self._tables.setdefault(table, number)
            elif m := self._key.match(line):
                self._index.setdefault((table, m.group(1).strip("\"'")), number)

    def find(self, table: str, key: str) -> int | None:
        return self._index.get((table, key)) or self._tables.get(f"{table}.{key}")


def problem_in(config: Config, key: str, message: str) -> ConfigProblem:
    """A problem with `key` of the file `config` was read from, located at the key's line
    (for checks made after loading: preflight.py)."""
    line = None
    if config.source is not None:
        try:
            lines = _KeyLines(config.source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
        else:
            table, _, name = key.rpartition(".")
            line = lines.find(table, name)
    return ConfigProblem(key, message, config.source, line)


def describe(config: Config) -> Iterator[tuple[str, str]]:
    """The resolved settings as (dotted key, value) pairs, for `check-config`."""
    def rows(prefix: str, obj: object, fmt: Callable[[str, Any], str]) -> Iterator[tuple[str, str]]:
        for name in obj.__dataclass_fields__:  # type: ignore[attr-defined]
            if name == "kata_version_origin":
                continue  # how kata_version was chosen, not a setting (check-config shows it)
            value = getattr(obj, name)
            if isinstance(value, AutoscaleSettings):  # its keys are [vmcache]'s own
                yield f"{prefix}.autoscale", fmt(name, value.enabled)
                yield f"{prefix}.min_ready", str(value.min_ready)
                yield f"{prefix}.max_ready", str(value.max_ready)
                yield f"{prefix}.shrink_after", f"{value.shrink_after:g}"
                continue
            yield f"{prefix}.{name}", fmt(name, value)

    def plain(name: str, value: Any) -> str:
        if value is None:
            return "(unset)"
        if isinstance(value, tuple):
            return " ".join(value) or "(none)"
        if name == "socket_mode":
            return f"{value:04o}"
        if name == "memory_budget_mib" and not value:
            return f"{default_memory_budget_mib()} (half of the host's MemTotal)"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    yield from rows("hypervisor.qemu", config.hypervisor, plain)
    yield from rows("factory", config.factory, plain)
    yield from rows(OUR_TABLE, config.daemon, plain)
