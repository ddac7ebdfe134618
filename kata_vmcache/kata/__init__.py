"""Kata's own view of our VMs: the `VMConfig` JSON that kata-runtime compares with its own.

kata-runtime, configured with `[factory] vm_cache_number > 0`, does not trust us to boot the
right VM. Its grpccache factory calls our `Config` RPC, unmarshals `GrpcVMConfig.Data` (Go
`encoding/json`) into its `vc.VMConfig`, and on every sandbox start compares it with the
`VMConfig` it derived itself from the same configuration.toml:

    resetHypervisorConfig(&base); resetHypervisorConfig(&new)   // factory.go
    if !utils.DeepCompare(base, new) { fall back to booting its own VM }

Only the fields `resetHypervisorConfig` zeroes may differ (the vCPU count, MemorySize, the
template fields, and in 3.x SharedPath, VMStorePath, RunStorePath; in 1.x also ProxyConfig).
**Every other field matters**: one wrong default, one unresolved symlink, one kernel
parameter in a different order, and Kata silently boots its own VM - the cache then costs
memory and saves nothing, and nothing logs an error. So this module reproduces Kata's
configuration loader field by field, defaults included, instead of copying what we use.

Two generations, two derivations (`Generation`, chosen by `[vmcache] kata_version` or
`detect_generation()`): Kata 1.x (kata-containers/runtime) and Kata 3.x (kata-containers
3.30.0) share the proto and most JSON field names, but derive several of them differently
(docs/kata-config-fields.md lists every field, both derivations and where they come from).
Each payload holds exactly the fields of its generation's structs: Go's decoder ignores
keys it does not know, so a key of the other generation would only mislead a reader.

`resolve()` gives the values the daemon boots a VM with (binary, kernel, vCPUs, memory),
taken from the same derivation as the payload, so that the VM and the `Config` reply can
never disagree.

Sources read:

* kata-containers/runtime (Kata 1.x), the 1.x derivation (unchanged since it was written;
  the commit is the one each file was read at):
  - pkg/katautils/config.go @ 6626a36c8deb80a6abeab7c8fbbb482dab8ca883 and
    @ 0100af18a2afdd6dfcc95129ec6237ba4915b3e5 (tomlConfig, the hypervisor getters,
    newQemuHypervisorConfig, updateRuntimeConfig{Proxy,Agent}, SetKernelParams,
    LoadConfiguration's "no proxy with vsock" rule)
  - pkg/katautils/config-settings.go.in @ 3a4aec153e5824d437ca1cc2557f4f793dcb9d28 (defaults)
  - pkg/katautils/create.go @ 06f6034db783d69105c9b81cfae699133486b6d7 (systemd kernel
    parameters, HandleFactory: which runtime config becomes the factory's VMConfig)
  - virtcontainers/hypervisor.go @ 0100af18a2afdd6dfcc95129ec6237ba4915b3e5 (HypervisorConfig,
    Param, DeserializeParams, valid(), MinHypervisorMemory); the field list checked against
    the last 1.x (master 04f29832)
  - virtcontainers/vm.go @ 0825f820682134368d5d063db9a9ddf15dff2f8b (VMConfig) and a later
    stored vm.go (ToGrpc/GrpcToVMConfig: AgentType must be "kata")
  - virtcontainers/factory/factory.go @ 06f6034db783d69105c9b81cfae699133486b6d7
    (resetHypervisorConfig, checkVMConfig)
  - virtcontainers/kata_agent.go @ 011ade5299ea18c346e56159c5e89292e299d18c
    (KataAgentConfig, KataAgentKernelParams, KataAgentSetDefaultTraceConfigOptions)
  - virtcontainers/proxy.go (ProxyConfig, ProxyType names), virtcontainers/utils
    (SupportsVsocks), virtcontainers/qemu_<arch>.go (MaxQemuVCPUs)
* kata-containers/kata-containers, tag 3.30.0 (commit 86e5975ad6a2), src/runtime/:
  - pkg/katautils/config.go (hypervisor and agent tables, the getters, newQemuHypervisorConfig,
    updateRuntimeConfigAgent, SetKernelParams, checkConfig)
  - pkg/katautils/config-settings.go.in (defaults; the Makefile's sed fills in only the
    @PROJECT@-style names, every default there is literal), pkg/katautils/create.go
    (getKernelParams, needSystemd), pkg/katautils/utils.go (ResolvePath)
  - virtcontainers/hypervisor.go (HypervisorConfig, Param, KernelParamFields,
    DeserializeParams, AddKernelParam, MinHypervisorMemory, RoundUpNumVCPUs),
    virtcontainers/hypervisor_config_linux.go (validateHypervisorConfig: GetVM runs it on
    the runtime's own config before comparing)
  - virtcontainers/factory/factory.go (resetHypervisorConfig, checkVMConfig, GetVM),
    virtcontainers/utils/compare.go (DeepCompare: slices by length and elements, so nil and
    [] are equal; pointers by address), virtcontainers/vm.go (VMConfig, GrpcToVMConfig)
  - virtcontainers/kata_agent.go (KataAgentConfig, KataAgentKernelParams),
    virtcontainers/pkg/annotations/annotations.go (the agent.* kernel parameter names)
  - pkg/govmm/vmm_<arch>.go (MaxVCPUs), virtcontainers/utils/utils.go (SupportsVsocks)

What we cannot reproduce from the file alone, and why it does not matter here: per-pod
annotations and OCI-spec-derived fields (they change the *new* config, so Kata would not
match its own cache either), and `fips=1` on FIPS hosts (same). The 1.x output mirrors
`kata-runtime factory init` (the 1.x CLI loader, builtIn=false): a 1.x shimv2 client derives
LongLiveConn=true and ProxyType "kataBuiltInProxy" and never matched Kata's own cache either.

Pure: no I/O beyond os.path.exists/realpath and the host facts Kata's loader itself reads
(CPU count, memory size, vsock device nodes).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal

__all__ = [
    "GENERATIONS", "Generation", "HypervisorValues", "agent_config", "default_hypervisor_path",
    "detect_generation", "hypervisor_config", "loader_refusals", "reset_for_compare",
    "resolve", "vm_config",
]

#: The Kata generations whose `Config` payload we can send.
Generation = Literal["1.x", "3.x"]
GENERATIONS: Final[tuple[Generation, ...]] = ("1.x", "3.x")

# --- Kata 1.x defaults: pkg/katautils/config-settings.go.in (literal values, not filled in
# by the Makefile in 1.x) ---------------------------------------------------------------
DEFAULT_HYPERVISOR_PATH: Final = "/usr/bin/qemu-lite-system-x86_64"
DEFAULT_KERNEL_PATH: Final = "/usr/share/kata-containers/vmlinuz.container"
DEFAULT_MACHINE_TYPE: Final = "pc"
DEFAULT_VCPUS: Final = 1
DEFAULT_MEMORY_MIB: Final = 2048
DEFAULT_MEM_SLOTS: Final = 10
DEFAULT_BRIDGES: Final = 1
DEFAULT_BLOCK_DEVICE_DRIVER: Final = "virtio-scsi"
DEFAULT_MSIZE_9P: Final = 8192
DEFAULT_ENTROPY_SOURCE: Final = "/dev/urandom"
DEFAULT_VIRTIO_FS_CACHE: Final = "none"
#: sharedFS() default.
DEFAULT_SHARED_FS: Final = "virtio-9p"
DEFAULT_VHOST_USER_STORE_PATH: Final = "/var/run/kata-containers/vhost-user/"
DEFAULT_PROXY_PATH: Final = "/usr/libexec/kata-containers/kata-proxy"
#: create.go: systemd.unit=<systemdUnitName>, only when booting from an image.
SYSTEMD_UNIT_NAME: Final = "kata-containers.target"

#: config.go maxPCIBridges: default_bridges is capped here (both generations).
MAX_PCI_BRIDGES: Final = 5
#: hypervisor.go MinHypervisorMemory: smaller default_memory values fall back to 2048.
MIN_HYPERVISOR_MEMORY_MIB: Final = 256

# --- Kata 3.30.0 defaults (src/runtime/pkg/katautils/config-settings.go.in) where they
# differ from 1.x or are 3.x-only ---------------------------------------------------------
DEFAULT_HYPERVISOR_PATH_3X: Final = "/usr/bin/qemu-system-x86_64"
DEFAULT_MACHINE_TYPE_3X: Final = "q35"
DEFAULT_VIRTIO_FS_CACHE_3X: Final = "never"
#: sharedFS(): config.VirtioFS, which needs virtio_fs_daemon.
DEFAULT_SHARED_FS_3X: Final = "virtio-fs"
DEFAULT_ROOTFS_TYPE_3X: Final = "ext4"
DEFAULT_BLOCK_DEVICE_AIO_3X: Final = "io_uring"
DEFAULT_HYPERVISOR_LOGLEVEL_3X: Final = 1
DEFAULT_MEASUREMENT_ALGO_3X: Final = "sha512"
#: config.PCIePort NoPort, for hot_plug_vfio / cold_plug_vfio.
DEFAULT_VFIO_PORT_3X: Final = "no-port"
MAX_PCIE_ROOT_PORTS_3X: Final = 16
MAX_PCIE_SWITCH_PORTS_3X: Final = 16
MAX_HYPERVISOR_LOGLEVEL_3X: Final = 3
#: kata_agent.go kernelParamDebugConsole{,VPort,VPortValue}.
DEBUG_CONSOLE_PARAMS_3X: Final = (("agent.debug_console", ""),
                                  ("agent.debug_console_vport", "1026"))
#: The loader's accepted values (blockDeviceDriver, blockDeviceAIO, sharedFS,
#: extraMonitorSocket); anything else fails the whole load.
BLOCK_DRIVERS_3X: Final = ("virtio-scsi", "virtio-blk", "virtio-mmio", "nvdimm",
                           "virtio-blk-ccw")
BLOCK_AIO_3X: Final = ("io_uring", "native", "threads")
SHARED_FS_3X: Final = ("virtio-9p", "virtio-fs", "virtio-fs-nydus", "none")
EXTRA_MONITOR_3X: Final = ("hmp", "qmp", "qmp-pretty")
#: virtcontainers QemuCCWVirtio: validateHypervisorConfig turns virtio-blk into
#: virtio-blk-ccw on this machine type.
MACHINE_TYPE_CCW: Final = "s390-ccw-virtio"

# --- names Kata compares verbatim ------------------------------------------------------------
HYPERVISOR_TYPE: Final = "qemu"
#: vc.KataContainersAgent; 1.x's GrpcToVMConfig refuses any other AgentType.
AGENT_TYPE: Final = "kata"
KATA_PROXY_TYPE: Final = "kataProxy"
NO_PROXY_TYPE: Final = "noProxy"

#: govmmQemu.MachineTypeMicrovm: no NVDIMM, so Kata forces disable_image_nvdimm.
MACHINE_TYPE_MICROVM: Final = "microvm"

#: 1.x MaxQemuVCPUs() per GOARCH (virtcontainers/qemu_<arch>.go). arm64 is gicList[GICv3].
#: Unknown architectures get amd64's value.
_MAX_QEMU_VCPUS: Final[Mapping[str, int]] = MappingProxyType({
    "x86_64": 240, "amd64": 240,
    "aarch64": 123, "arm64": 123,
    "ppc64le": 128,
    "s390x": 248,
    "loongarch64": 256,
})
#: 3.30.0 govmm.MaxVCPUs() (pkg/govmm/vmm_<arch>.go; arm64: gicList[defaultGICVersion 3]).
_MAX_QEMU_VCPUS_3X: Final[Mapping[str, int]] = MappingProxyType({
    "x86_64": 240, "amd64": 240,
    "aarch64": 123, "arm64": 123,
    "ppc64le": 128,
    "s390x": 248,
    "riscv64": 512,
})

#: 1.x utils.SupportsVsocks(): both device nodes must exist.
_VSOCK_DEVICES: Final = ("/dev/vsock", "/dev/vhost-vsock")
#: 3.x utils.SupportsVsocks() stats only this one; without it the QEMU loader fails.
VHOST_VSOCK_DEVICE: Final = "/dev/vhost-vsock"

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


# --- host facts Kata's loader reads (module functions so tests can pin them) ---------------

def _go_num_cpu() -> int:
    """Go's runtime.NumCPU(): the CPUs in the process's affinity mask (1.x uses this)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover - no affinity support
        return os.cpu_count() or 1


def _host_cpus_3x() -> int:
    """3.x getHostCPUs(): the lines of /proc/cpuinfo starting with "processor" (the online
    CPUs, whatever the affinity mask), or Go's NumCPU when the file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.startswith("processor"))
    except OSError:
        return _go_num_cpu()


def _max_qemu_vcpus() -> int:
    return _MAX_QEMU_VCPUS.get(platform.machine(), 240)


def _max_qemu_vcpus_3x() -> int:
    return _MAX_QEMU_VCPUS_3X.get(platform.machine(), 240)


def _is_arm64() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def _host_memory_mib() -> int:
    """3.x memory.TotalMemory() / MiB (sysinfo totalram, which is what sysconf reports)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    except (OSError, ValueError):  # pragma: no cover - sysconf name unknown
        return 0


def _host_supports_vsock() -> bool:
    return all(os.path.exists(p) for p in _VSOCK_DEVICES)


def host_has_vhost_vsock() -> bool:
    """3.x's SupportsVsocks(): its QEMU loader refuses every file on a host without it."""
    return os.path.exists(VHOST_VSOCK_DEVICE)


# --- which generation a file is for ----------------------------------------------------------

def detect_generation(doc: Mapping[str, Any]) -> tuple[Generation, str]:
    """The generation a file is written for, and why we think so.

    Kata 2.0 removed the `[proxy.*]` and `[shim.*]` tables (kata-containers 2.0's
    configuration has neither): a file with either is a 1.x file; any other file is read
    the way today's Kata (3.x) reads it.
    """
    for table in ("proxy", "shim"):
        entries = doc.get(table)
        if isinstance(entries, Mapping) and entries:
            names = ", ".join(f"[{table}.{name}]" for name in entries)
            return "1.x", f"detected: {names} present"
    return "3.x", "detected: no [proxy.*] or [shim.*] table"


# --- reading the parsed TOML the way BurntSushi/toml fills Kata's structs ------------------
# A key with the wrong type would make Kata's loader fail outright; our config validator
# reports those, so here a wrong type simply reads as the Go zero value.

def _table(doc: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    node: Any = doc
    for name in names:
        node = node.get(name) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def _str(t: Mapping[str, Any], key: str) -> str:
    v = t.get(key)
    return v if isinstance(v, str) else ""


def _bool(t: Mapping[str, Any], key: str) -> bool:
    v = t.get(key)
    return v if isinstance(v, bool) else False


def _int(t: Mapping[str, Any], key: str) -> int:
    v = t.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _number(t: Mapping[str, Any], key: str) -> float:
    v = t.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _float32(value: float) -> float:
    """The value a Go float32 holds (3.x decodes default_vcpus into one)."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def _str_list(t: Mapping[str, Any], key: str) -> list[str] | None:
    """A []string: nil (JSON null) when the key is absent, a list (maybe empty) otherwise.

    The difference is visible to Kata 1.x, which compares AgentConfig (an interface{}) with
    reflect.DeepEqual, where a nil slice and an empty one differ. (3.x's DeepCompare
    compares slices by length and elements: there they are equal.)
    """
    v = t.get(key)
    if not isinstance(v, list):
        return None
    return [x for x in v if isinstance(x, str)]


def _resolve(path: str) -> str:
    """Kata's ResolvePath (filepath.Abs + EvalSymlinks) for paths that exist.

    Kata fails to load a configuration naming a missing file; we keep the configured string
    so that the config validator can name the problem instead of this module.
    """
    if path and os.path.exists(path):
        return os.path.realpath(path)
    return path


def _comma_list(value: str) -> str:
    """machineAccelerators()/cpuFeatures(): drop empty items, trim each, re-join with ","."""
    items = [item.strip() for item in value.split(",") if item != ""]
    return ",".join(items).strip(",")


_GO_LATIN1_SPACE: Final = frozenset("\t\n\v\f\r \x85\xa0")


def _go_is_space(c: str) -> bool:
    # unicode.IsSpace: a fixed Latin-1 set, then the White_Space property (which Python's
    # isspace() matches above Latin-1; below it Python also counts \x1c-\x1f, Go does not).
    return c in _GO_LATIN1_SPACE if ord(c) <= 0xFF else c.isspace()


def _go_trim_space(s: str) -> str:
    """strings.TrimSpace."""
    start, end = 0, len(s)
    while start < end and _go_is_space(s[start]):
        start += 1
    while end > start and _go_is_space(s[end - 1]):
        end -= 1
    return s[start:end]


def _go_fields(s: str) -> list[str]:
    """Go's strings.Fields, which is how 1.x splits kernel_params."""
    fields: list[str] = []
    current: list[str] = []
    for c in s:
        if _go_is_space(c):
            if current:
                fields.append("".join(current))
                current = []
        else:
            current.append(c)
    if current:
        fields.append("".join(current))
    return fields


def _kernel_param_fields(s: str) -> list[str]:
    """3.x vc.KernelParamFields: split on ' ' outside double quotes, each field TrimSpace'd
    (a tab or newline inside a field stays in it)."""
    params: list[str] = []
    start, in_quote = 0, False
    for i, c in enumerate(s):
        if c == '"':
            in_quote = not in_quote
        elif c == " " and not in_quote:
            field = _go_trim_space(s[start:i])
            if field:
                params.append(field)
            start = i + 1
    field = _go_trim_space(s[start:])
    if field:
        params.append(field)
    return params


def _param(key: str, value: str) -> dict[str, str]:
    return {"Key": key, "Value": value}


def _deserialize_params(fields: list[str]) -> list[dict[str, str]]:
    """vc.DeserializeParams: split at the first "=", a bare word gets an empty Value."""
    params = []
    for field in fields:
        if field == "":
            continue
        key, sep, value = field.partition("=")
        params.append(_param(key, value if sep else ""))
    return params


# --- the 1.x loader -------------------------------------------------------------------------

def _use_vsock(h: Mapping[str, Any]) -> bool:
    # newQemuHypervisorConfig: use_vsock only sticks when the host has vsock; otherwise Kata
    # warns and falls back to the serial port.
    return _bool(h, "use_vsock") and _host_supports_vsock()


def _agent_table(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """1.x reads `[agent.kata]` only."""
    agents = doc.get("agent")
    if not isinstance(agents, Mapping):
        return None
    kata = agents.get("kata")
    return kata if isinstance(kata, Mapping) else None


def _agent_table_3x(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """3.x's updateRuntimeConfigAgent takes any `[agent.<name>]` table (ranging over a Go
    map: with several, which one wins is random; `[agent.kata]` is the only one Kata
    ships, so it is preferred here)."""
    agents = doc.get("agent")
    if not isinstance(agents, Mapping):
        return None
    tables = [v for v in agents.values() if isinstance(v, Mapping)]
    kata = agents.get("kata")
    if isinstance(kata, Mapping):
        return kata
    return tables[0] if tables else None


def _default_vcpus_1x(requested: int) -> int:
    num_cpus = _go_num_cpu()
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return DEFAULT_VCPUS
    return requested


def _default_max_vcpus_1x(requested: int) -> int:
    num_cpus = _go_num_cpu()
    if requested >= num_cpus or requested == 0:
        requested = num_cpus
    return min(requested, _max_qemu_vcpus())


def _default_memory(requested: int) -> int:
    # 1.x as this module has always derived it (runtime @0100af18); 3.x's defaultMemSz() is
    # the same rule. Kata 1.12.0 and later (runtime ab7f18d9) keep any non-zero value.
    return requested if requested >= MIN_HYPERVISOR_MEMORY_MIB else DEFAULT_MEMORY_MIB


def _boot_params(image_path: str, block_driver: str) -> list[dict[str, str]]:
    """The first KernelParams of both generations' SetKernelParams: systemd's (needSystemd:
    an image boots systemd, an initrd does not), then the virtio-scsi scan mode."""
    params: list[dict[str, str]] = []
    if image_path != "":
        params += [
            _param("systemd.unit", SYSTEMD_UNIT_NAME),
            _param("systemd.mask", "systemd-networkd.service"),
            _param("systemd.mask", "systemd-networkd.socket"),
        ]
    if block_driver == "virtio-scsi":
        params.append(_param("scsi_mod.scan", "none"))
    return params


def _kernel_params_1x(h: Mapping[str, Any], image_path: str, block_driver: str,
                      agent: Mapping[str, Any]) -> list[dict[str, str]]:
    """The KernelParams of the factory's VMConfig: what 1.x's SetKernelParams leaves behind.

    Order matters (DeepCompare walks the slice): defaults, the virtio-scsi scan mode, the
    agent's parameters, then the user's kernel_params, duplicates and all.
    """
    params = _boot_params(image_path, block_driver)
    # KataAgentKernelParams on a copy with KataAgentSetDefaultTraceConfigOptions applied
    # (mode "" -> dynamic, type "" -> isolated).
    if _bool(agent, "enable_debug"):
        params.append(_param("agent.log", "debug"))
    if _bool(agent, "enable_tracing") and _str(agent, "trace_mode") == "static":
        params.append(_param("agent.trace", _str(agent, "trace_type") or "isolated"))
    # ContainerPipeSize only ever comes from an annotation, never from the file.
    user = _deserialize_params(_go_fields(_str(h, "kernel_params")))
    # AddKernelParam rejects an empty key ("=x"), failing Kata's whole load; nothing to match.
    params += [p for p in user if p["Key"] != ""]
    return params


def _hypervisor_1x(h: Mapping[str, Any], agent: Mapping[str, Any]) -> dict[str, Any]:
    """1.x's HypervisorConfig, in the struct's field order (kata-containers/runtime
    virtcontainers/hypervisor.go)."""
    image = _resolve(_str(h, "image"))
    initrd = _resolve(_str(h, "initrd"))
    firmware = _resolve(_str(h, "firmware"))  # defaultFirmwarePath is "": nothing to resolve
    machine_type = _str(h, "machine_type") or DEFAULT_MACHINE_TYPE
    block_driver = _str(h, "block_device_driver") or DEFAULT_BLOCK_DEVICE_DRIVER
    disable_nvdimm = _bool(h, "disable_image_nvdimm") or machine_type == MACHINE_TYPE_MICROVM
    bridges = _int(h, "default_bridges")
    requested_vcpus = h.get("default_vcpus")
    # 1.x decodes default_vcpus as int32: a fractional value does not load (the validator
    # says so); rounded up here only so that this function stays total.
    vcpus = _default_vcpus_1x(
        math.ceil(requested_vcpus)
        if isinstance(requested_vcpus, int | float) and not isinstance(requested_vcpus, bool)
        else 0)
    return {
        "NumVCPUs": vcpus,
        "DefaultMaxVCPUs": _default_max_vcpus_1x(_int(h, "default_maxvcpus")),
        # 1.x @6626a36c keeps any non-zero value; 1.x @0100af18 applies the 256 MiB floor.
        "MemorySize": _default_memory(_int(h, "default_memory")),
        "DefaultBridges": (DEFAULT_BRIDGES if bridges == 0 else min(bridges, MAX_PCI_BRIDGES)),
        "Msize9p": _int(h, "msize_9p") or DEFAULT_MSIZE_9P,
        "MemSlots": _int(h, "memory_slots") or DEFAULT_MEM_SLOTS,
        "MemOffset": _int(h, "memory_offset"),
        "VirtioFSCacheSize": _int(h, "virtio_fs_cache_size"),
        "KernelParams": _kernel_params_1x(h, image, block_driver, agent),
        "HypervisorParams": None,
        "KernelPath": _resolve(_str(h, "kernel") or DEFAULT_KERNEL_PATH),
        "ImagePath": image,
        "InitrdPath": initrd,
        "FirmwarePath": firmware,
        "MachineAccelerators": _comma_list(_str(h, "machine_accelerators")),
        "CPUFeatures": _comma_list(_str(h, "cpu_features")),
        "HypervisorPath": _resolve(_str(h, "path") or DEFAULT_HYPERVISOR_PATH),
        "HypervisorPathList": _str_list(h, "valid_hypervisor_paths"),
        "HypervisorCtlPathList": None,  # acrn only
        "HypervisorCtlPath": "",  # acrn only
        "JailerPath": "",  # firecracker only
        "JailerPathList": None,  # firecracker only
        "BlockDeviceDriver": block_driver,
        "HypervisorMachineType": machine_type,
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": _str(h, "entropy_source") or DEFAULT_ENTROPY_SOURCE,
        "SharedFS": _str(h, "shared_fs") or DEFAULT_SHARED_FS,
        "VirtioFSDaemon": _str(h, "virtio_fs_daemon"),  # not resolved by Kata
        "VirtioFSDaemonList": _str_list(h, "valid_virtio_fs_daemon_paths"),
        "VirtioFSCache": _str(h, "virtio_fs_cache") or DEFAULT_VIRTIO_FS_CACHE,
        "VirtioFSExtraArgs": _str_list(h, "virtio_fs_extra_args"),
        "FileBackedMemRootDir": _str(h, "file_mem_backend"),
        # PFlash(): the configured strings (only checked, not resolved), [] when none.
        "PFlash": _str_list(h, "pflashes") or [],
        "FileBackedMemRootList": _str_list(h, "valid_file_mem_backends"),
        "BlockDeviceCacheSet": _bool(h, "block_device_cache_set"),
        "BlockDeviceCacheDirect": _bool(h, "block_device_cache_direct"),
        "BlockDeviceCacheNoflush": _bool(h, "block_device_cache_noflush"),
        "DisableBlockDeviceUse": _bool(h, "disable_block_device_use"),
        "EnableIOThreads": _bool(h, "enable_iothreads"),
        "Debug": _bool(h, "enable_debug"),
        "MemPrealloc": _bool(h, "enable_mem_prealloc"),
        "HugePages": _bool(h, "enable_hugepages"),
        "VirtioMem": _bool(h, "enable_virtio_mem"),
        "IOMMU": _bool(h, "enable_iommu"),
        "IOMMUPlatform": _bool(h, "enable_iommu_platform"),
        "Realtime": False,  # no configuration key; never set by the loader
        "Mlock": not _bool(h, "enable_swap"),
        "DisableNestingChecks": _bool(h, "disable_nesting_checks"),
        "UseVSock": _use_vsock(h),
        "DisableImageNvdimm": disable_nvdimm,
        "HotplugVFIOOnRootBus": _bool(h, "hotplug_vfio_on_root_bus"),
        "PCIeRootPort": _int(h, "pcie_root_port"),
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": _bool(h, "disable_vhost_net"),
        "EnableVhostUserStore": _bool(h, "enable_vhost_user_store"),
        "VhostUserStorePath": _str(h, "vhost_user_store_path") or DEFAULT_VHOST_USER_STORE_PATH,
        "VhostUserStorePathList": _str_list(h, "valid_vhost_user_store_paths"),
        "GuestHookPath": _str(h, "guest_hook_path"),
        "VMid": "",
        "SELinuxProcessLabel": "",
        "EnableAnnotations": _str_list(h, "enable_annotations"),
    }


def _agent_1x(doc: Mapping[str, Any]) -> dict[str, Any]:
    """1.x's KataAgentConfig, as updateRuntimeConfigAgent derives it.

    Without an `[agent.kata]` table Kata keeps the zero KataAgentConfig - even UseVSock stays
    false then. LongLiveConn stays false: 1.x sets it only on the shimv2 path.
    """
    table = _agent_table(doc)
    agent = table if table is not None else {}
    return {
        "LongLiveConn": False,
        "UseVSock": table is not None and _use_vsock(_table(doc, "hypervisor",
                                                            HYPERVISOR_TYPE)),
        "Debug": _bool(agent, "enable_debug"),
        "Trace": _bool(agent, "enable_tracing"),
        "ContainerPipeSize": 0,  # from an annotation only
        # Kept as written: 1.x applies the trace defaults to a copy, for kernel params only.
        "TraceMode": _str(agent, "trace_mode"),
        "TraceType": _str(agent, "trace_type"),
        "KernelModules": _str_list(agent, "kernel_modules"),
    }


def _proxy(doc: Mapping[str, Any], use_vsock: bool) -> tuple[str, dict[str, Any]]:
    """ProxyType and ProxyConfig (1.x only; 3.x has no proxy)."""
    if use_vsock:
        # LoadConfiguration: with vsock there is no proxy; Debug is [runtime] enable_debug.
        return NO_PROXY_TYPE, {"Path": "", "Debug": _bool(_table(doc, "runtime"),
                                                          "enable_debug")}
    proxy = _table(doc, "proxy")
    kata = proxy.get("kata")
    if isinstance(kata, Mapping):
        return KATA_PROXY_TYPE, {"Path": _resolve(_str(kata, "path") or DEFAULT_PROXY_PATH),
                                 "Debug": _bool(kata, "enable_debug")}
    # initConfig's defaultProxy with a zero ProxyConfig.
    return KATA_PROXY_TYPE, {"Path": "", "Debug": False}


# --- the 3.x loader (kata-containers 3.30.0) -----------------------------------------------

def _default_vcpus_3x(requested: float) -> float:
    """defaultVCPUs(): getCurrentCpuNum() is the host's CPUs, but never more than
    defaultMaxVCPUs() of an empty table (govmm's MaxVCPUs)."""
    num_cpus = float(min(_host_cpus_3x(), _max_qemu_vcpus_3x()))
    requested = _float32(requested)
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return float(DEFAULT_VCPUS)
    return requested


def _default_max_vcpus_3x(requested: int) -> int:
    """defaultMaxVCPUs(), then validateHypervisorConfig's cap (the same MaxVCPUs)."""
    num_cpus = _host_cpus_3x()
    if requested >= num_cpus or requested == 0:
        requested = num_cpus
    value = min(requested, _max_qemu_vcpus_3x())
    return value if value != 0 else _max_qemu_vcpus_3x()


def _default_max_mem_3x(requested: int) -> int:
    host = _host_memory_mib()
    if requested == 0 or requested > host:
        return host
    return requested


def _kernel_params_3x(h: Mapping[str, Any], image_path: str, block_driver: str,
                      agent: Mapping[str, Any]) -> list[dict[str, str]]:
    """3.x's SetKernelParams: getKernelParams (systemd only with an image), the virtio-scsi
    scan mode, KataAgentKernelParams, then the user's kernel_params (KernelParamFields, so
    quoted values keep their spaces), duplicates kept."""
    params = _boot_params(image_path, block_driver)
    if _bool(agent, "enable_debug"):
        params.append(_param("agent.log", "debug"))
    if _bool(agent, "enable_tracing"):
        params.append(_param("agent.trace", "true"))
    # ContainerPipeSize comes from an annotation only: never > 0 here.
    if _bool(agent, "debug_console_enabled"):
        params += [_param(k, v) for k, v in DEBUG_CONSOLE_PARAMS_3X]
    if (timeout := _int(agent, "cdh_api_timeout")) > 0:
        params.append(_param("agent.cdh_api_timeout", str(timeout)))
    if (timeout := _int(agent, "launch_process_timeout")) > 0:
        params.append(_param("agent.launch_process_timeout", str(timeout)))
    user = _deserialize_params(_kernel_param_fields(_str(h, "kernel_params")))
    # AddKernelParam refuses an empty key, failing the load (loader_refusals names it).
    params += [p for p in user if p["Key"] != ""]
    return params


def _optional_uint(t: Mapping[str, Any], key: str) -> int | None:
    """A *uint64: nil when absent."""
    v = t.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _hypervisor_3x(h: Mapping[str, Any], agent: Mapping[str, Any]) -> dict[str, Any]:
    """3.30.0's HypervisorConfig as newQemuHypervisorConfig, SetKernelParams and GetVM's
    validateHypervisorConfig leave it, in the struct's field order (exported fields only:
    encoding/json skips customAssets)."""
    image = _resolve(_str(h, "image"))
    initrd = _resolve(_str(h, "initrd"))
    firmware = _resolve(_str(h, "firmware"))  # defaultFirmwarePath is ""
    pflash = _str_list(h, "pflashes") or []
    machine_type = _str(h, "machine_type") or DEFAULT_MACHINE_TYPE_3X
    block_driver = _str(h, "block_device_driver") or DEFAULT_BLOCK_DEVICE_DRIVER
    if block_driver == "virtio-blk" and machine_type == MACHINE_TYPE_CCW:
        block_driver = "virtio-blk-ccw"  # validateHypervisorConfig
    disable_nvdimm = (_bool(h, "disable_image_nvdimm") or machine_type == MACHINE_TYPE_MICROVM
                      or (_is_arm64() and firmware == "" and not pflash))
    bridges = _int(h, "default_bridges")
    loglevel = _int(h, "hypervisor_loglevel")
    return {
        "Groups": None,
        "KernelPath": _resolve(_str(h, "kernel") or DEFAULT_KERNEL_PATH),
        "ImagePath": image,
        "InitrdPath": initrd,
        "RootfsType": _str(h, "rootfs_type") or DEFAULT_ROOTFS_TYPE_3X,
        "FirmwarePath": firmware,
        "FirmwareVolumePath": _resolve(_str(h, "firmware_volume")),
        "MachineAccelerators": _comma_list(_str(h, "machine_accelerators")),
        "CPUFeatures": _comma_list(_str(h, "cpu_features")),
        "HypervisorPath": _resolve(_str(h, "path") or DEFAULT_HYPERVISOR_PATH_3X),
        "JailerPath": "",  # the QEMU loader never sets it
        "BlockDeviceDriver": block_driver,
        "HypervisorMachineType": machine_type,
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": _str(h, "entropy_source") or DEFAULT_ENTROPY_SOURCE,
        "SharedFS": _str(h, "shared_fs") or DEFAULT_SHARED_FS_3X,
        "SharedPath": "",
        "VirtioFSDaemon": _str(h, "virtio_fs_daemon"),  # not resolved
        "VirtioFSCache": _str(h, "virtio_fs_cache") or DEFAULT_VIRTIO_FS_CACHE_3X,
        "FileBackedMemRootDir": _str(h, "file_mem_backend"),
        "VhostUserStorePath": _str(h, "vhost_user_store_path") or DEFAULT_VHOST_USER_STORE_PATH,
        "VhostUserDeviceReconnect": _int(h, "vhost_user_reconnect_timeout_sec"),
        "GuestMemoryDumpPath": _str(h, "guest_memory_dump_path"),
        "GuestHookPath": _str(h, "guest_hook_path"),
        "VMid": "",
        "VMStorePath": "",
        "RunStorePath": "",
        "SELinuxProcessLabel": "",
        "HypervisorPathList": _str_list(h, "valid_hypervisor_paths"),
        "JailerPathList": None,
        "EntropySourceList": _str_list(h, "valid_entropy_sources"),
        "VirtioFSDaemonList": _str_list(h, "valid_virtio_fs_daemon_paths"),
        "VirtioFSExtraArgs": _str_list(h, "virtio_fs_extra_args"),
        "EnableAnnotations": _str_list(h, "enable_annotations"),
        "FileBackedMemRootList": _str_list(h, "valid_file_mem_backends"),
        # PFlash(): the configured strings (only checked, not resolved), [] when none.
        "PFlash": pflash,
        "VhostUserStorePathList": _str_list(h, "valid_vhost_user_store_paths"),
        "SeccompSandbox": _str(h, "seccompsandbox"),
        "BlockDeviceAIO": _str(h, "block_device_aio") or DEFAULT_BLOCK_DEVICE_AIO_3X,
        "RemoteHypervisorSocket": "",  # the remote hypervisor's loader only
        "SandboxName": "",
        "SandboxNamespace": "",
        "User": "",
        "SnpIdBlock": _str(h, "snp_id_block"),
        "SnpIdAuth": _str(h, "snp_id_auth"),
        # A pointer: DeepCompare compares its address, so a set policy never matches.
        "SnpGuestPolicy": _optional_uint(h, "snp_guest_policy"),
        "KernelParams": _kernel_params_3x(h, image, block_driver, agent),
        "KernelVerityParams": _str(h, "kernel_verity_params"),
        "HypervisorParams": None,
        "SGXEPCSize": 0,  # cloud-hypervisor only
        "DiskRateLimiterBwMaxRate": 0,  # the disk and net rate limiters: other VMMs only
        "DiskRateLimiterBwOneTimeBurst": 0,
        "DiskRateLimiterOpsMaxRate": 0,
        "DiskRateLimiterOpsOneTimeBurst": 0,
        "RxRateLimiterMaxRate": _int(h, "rx_rate_limiter_max_rate"),
        "TxRateLimiterMaxRate": _int(h, "tx_rate_limiter_max_rate"),
        "NetRateLimiterBwMaxRate": 0,
        "NetRateLimiterBwOneTimeBurst": 0,
        "NetRateLimiterOpsMaxRate": 0,
        "NetRateLimiterOpsOneTimeBurst": 0,
        "MemOffset": _int(h, "memory_offset"),
        "VFIODevices": None,
        "VhostUserBlkDevices": None,
        "HotPlugVFIO": _str(h, "hot_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "ColdPlugVFIO": _str(h, "cold_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "PCIeRootPort": min(_int(h, "pcie_root_port"), MAX_PCIE_ROOT_PORTS_3X),
        "PCIeSwitchPort": min(_int(h, "pcie_switch_port"), MAX_PCIE_SWITCH_PORTS_3X),
        "NumVCPUsF": _default_vcpus_3x(_number(h, "default_vcpus")),
        "DefaultMaxVCPUs": _default_max_vcpus_3x(_int(h, "default_maxvcpus")),
        "MemorySize": _default_memory(_int(h, "default_memory")),
        "DefaultMaxMemorySize": _default_max_mem_3x(_int(h, "default_maxmemory")),
        "DefaultBridges": (DEFAULT_BRIDGES if bridges == 0 else min(bridges, MAX_PCI_BRIDGES)),
        "Msize9p": _int(h, "msize_9p") or DEFAULT_MSIZE_9P,
        "MemSlots": _int(h, "memory_slots") or DEFAULT_MEM_SLOTS,
        "VirtioFSCacheSize": _int(h, "virtio_fs_cache_size"),
        "VirtioFSQueueSize": _int(h, "virtio_fs_queue_size"),
        "Uid": 0,
        "Gid": 0,
        "RemoteHypervisorTimeout": 0,  # the remote hypervisor's loader only
        "BlockDeviceCacheSet": _bool(h, "block_device_cache_set"),
        "BlockDeviceCacheDirect": _bool(h, "block_device_cache_direct"),
        "BlockDeviceCacheNoflush": _bool(h, "block_device_cache_noflush"),
        "BlockDeviceLogicalSectorSize": _int(h, "block_device_logical_sector_size"),
        "BlockDevicePhysicalSectorSize": _int(h, "block_device_physical_sector_size"),
        "DisableBlockDeviceUse": _bool(h, "disable_block_device_use"),
        "EnableIOThreads": _bool(h, "enable_iothreads"),
        "IndepIOThreads": _int(h, "indep_iothreads"),
        "Debug": _bool(h, "enable_debug"),
        # defaultHypervisorLoglevel(): 0 (or absent) is the package default 1, capped at 3.
        "HypervisorLoglevel": (DEFAULT_HYPERVISOR_LOGLEVEL_3X if loglevel == 0
                               else min(loglevel, MAX_HYPERVISOR_LOGLEVEL_3X)),
        "MemPrealloc": _bool(h, "enable_mem_prealloc"),
        "ReclaimGuestFreedMemory": _bool(h, "reclaim_guest_freed_memory"),
        "HugePages": _bool(h, "enable_hugepages"),
        "VirtioMem": _bool(h, "enable_virtio_mem"),
        "IOMMU": _bool(h, "enable_iommu"),
        "IOMMUPlatform": _bool(h, "enable_iommu_platform"),
        # enable_numa maps host NUMA nodes (sysfs); kata-vmcache boots no guest NUMA nodes,
        # and the validator says so when the key is set.
        "GuestNUMANodes": None,
        "DisableNestingChecks": _bool(h, "disable_nesting_checks"),
        "DisableImageNvdimm": disable_nvdimm,
        "GuestMemoryDumpPaging": _bool(h, "guest_memory_dump_paging"),
        "ConfidentialGuest": _bool(h, "confidential_guest"),
        "SevSnpGuest": _bool(h, "sev_snp_guest"),
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": _bool(h, "disable_vhost_net"),
        "EnableVhostUserStore": _bool(h, "enable_vhost_user_store"),
        "GuestSwap": _bool(h, "enable_guest_swap"),
        "Rootless": _bool(h, "rootless"),
        "DisableSeccomp": False,  # the QEMU loader never copies disable_seccomp
        "DisableSeLinux": _bool(h, "disable_selinux"),
        # GetDefaultHypervisorConfig's true is replaced by the table's value (false unset).
        "DisableGuestSeLinux": _bool(h, "disable_guest_selinux"),
        "LegacySerial": _bool(h, "use_legacy_serial"),
        "ExtraMonitorSocket": _str(h, "extra_monitor_socket"),
        # qgsPort(): the value as decoded; 0 when absent (no package default since 3.21).
        "QgsPort": _int(h, "tdx_quote_generation_service_socket_port"),
        "Initdata": "",  # from an annotation only
        "InitdataDigest": None,
        "InitdataImage": "",
        "DefaultGPUs": 0,  # from an annotation only
        "DefaultGPUModel": "",
        "MeasurementAlgo": _str(h, "measurement_algo") or DEFAULT_MEASUREMENT_ALGO_3X,
    }


def _agent_3x(doc: Mapping[str, Any]) -> dict[str, Any]:
    """3.30.0's KataAgentConfig, in struct order. Without any `[agent.*]` table it stays
    the zero value (initConfig); with one, updateRuntimeConfigAgent sets LongLiveConn."""
    table = _agent_table_3x(doc)
    agent = table if table is not None else {}
    return {
        "KernelModules": _str_list(agent, "kernel_modules"),
        "ContainerPipeSize": 0,  # from an annotation only
        "DialTimeout": _int(agent, "dial_timeout"),
        "CdhApiTimeout": _int(agent, "cdh_api_timeout"),
        "LaunchProcessTimeout": _int(agent, "launch_process_timeout"),
        "LongLiveConn": table is not None,
        "Debug": _bool(agent, "enable_debug"),
        "Trace": _bool(agent, "enable_tracing"),
        "EnableDebugConsole": _bool(agent, "debug_console_enabled"),
        "Policy": "",  # from an annotation only
    }


# --- the public face ------------------------------------------------------------------------

def _check(generation: str, hypervisor: str = HYPERVISOR_TYPE) -> None:
    if generation not in GENERATIONS:
        raise ValueError(f"unknown Kata generation {generation!r} (expected 1.x or 3.x)")
    if hypervisor != HYPERVISOR_TYPE:
        raise ValueError(f"Kata's VM cache supports only qemu (got {hypervisor!r})")


def hypervisor_config(doc: Mapping[str, Any], generation: Generation = "1.x",
                      hypervisor: str = "qemu") -> dict[str, Any]:
    """Kata's HypervisorConfig JSON object derived from a parsed configuration.toml (the whole
    document, as tomllib returns it) the way `generation`'s loader derives it.

    Only QEMU: Kata's checkFactoryConfig refuses a VM cache with any other hypervisor.
    """
    _check(generation, hypervisor)
    h = _table(doc, "hypervisor", hypervisor)
    if generation == "3.x":
        return _hypervisor_3x(h, _agent_table_3x(doc) or {})
    return _hypervisor_1x(h, _agent_table(doc) or {})


def agent_config(doc: Mapping[str, Any], generation: Generation = "1.x") -> dict[str, Any]:
    """Kata's KataAgentConfig JSON object, as `generation`'s updateRuntimeConfigAgent
    derives it."""
    _check(generation)
    return _agent_3x(doc) if generation == "3.x" else _agent_1x(doc)


def vm_config(doc: Mapping[str, Any], generation: Generation = "1.x") -> dict[str, Any]:
    """The whole VMConfig JSON for GrpcVMConfig.Data, for `generation`.

    1.x: {"HypervisorType": "qemu", "HypervisorConfig": ..., "AgentType": "kata",
    "AgentConfig": ..., "ProxyType": ..., "ProxyConfig": {"Path": ..., "Debug": ...}}.
    3.x: {"HypervisorType": "qemu", "AgentConfig": ..., "HypervisorConfig": ...} (3.x's
    VMConfig has no agent type and no proxy).
    """
    hypervisor = hypervisor_config(doc, generation)
    if generation == "3.x":
        return {
            "HypervisorType": HYPERVISOR_TYPE,
            "AgentConfig": agent_config(doc, generation),
            "HypervisorConfig": hypervisor,
        }
    proxy_type, proxy_config = _proxy(doc, hypervisor["UseVSock"])
    return {
        "HypervisorType": HYPERVISOR_TYPE,
        "HypervisorConfig": hypervisor,
        "AgentType": AGENT_TYPE,
        "AgentConfig": agent_config(doc, generation),
        "ProxyType": proxy_type,
        "ProxyConfig": proxy_config,
    }


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


def default_hypervisor_path(generation: Generation) -> str:
    """The binary `generation`'s loader uses when `path` is unset."""
    _check(generation)
    return DEFAULT_HYPERVISOR_PATH_3X if generation == "3.x" else DEFAULT_HYPERVISOR_PATH


def loader_refusals(doc: Mapping[str, Any], generation: Generation) -> list[tuple[str, str]]:
    """What makes `generation`'s loader refuse the file, beyond what our validator already
    refuses (missing files, both or neither of initrd and image), as (key, reason).

    kata-runtime cannot load such a file, so it never asks the cache; the daemon still
    works for our own client. 3.x's need of /dev/vhost-vsock is about the host, not the
    file: see `host_has_vhost_vsock()`.
    """
    _check(generation)
    h = _table(doc, "hypervisor", HYPERVISOR_TYPE)
    out: list[tuple[str, str]] = []
    if generation == "1.x":
        return out
    shared_fs = _str(h, "shared_fs") or DEFAULT_SHARED_FS_3X
    if shared_fs not in SHARED_FS_3X:
        out.append(("shared_fs", f"not one of {', '.join(SHARED_FS_3X)} (got {shared_fs!r})"))
    elif shared_fs in ("virtio-fs", "virtio-fs-nydus") and not _str(h, "virtio_fs_daemon"):
        default = "" if "shared_fs" in h else " (its default)"
        out.append(("shared_fs", f"{shared_fs}{default} needs virtio_fs_daemon, which is not "
                                 "set; set shared_fs = \"virtio-9p\" or virtio_fs_daemon"))
    for key, allowed in (("block_device_driver", BLOCK_DRIVERS_3X),
                         ("block_device_aio", BLOCK_AIO_3X),
                         ("extra_monitor_socket", EXTRA_MONITOR_3X)):
        value = _str(h, key)
        if value and value not in allowed:
            out.append((key, f"not one of {', '.join(allowed)} (got {value!r})"))
    for p in _deserialize_params(_kernel_param_fields(_str(h, "kernel_params"))):
        if p["Key"] == "":
            out.append(("kernel_params", f"a parameter with an empty name (got "
                                         f"\"={p['Value']}\")"))
    return out


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
