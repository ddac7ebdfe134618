"""Kata's own view of our VMs: the `VMConfig` JSON that kata-runtime compares with its own.

kata-runtime, configured with `[factory] vm_cache_number > 0`, does not trust us to boot the
right VM. Its grpccache factory calls our `Config` RPC, unmarshals `GrpcVMConfig.Data` (Go
`encoding/json`) into its `vc.VMConfig`, and on every sandbox start compares it with the
`VMConfig` it derived itself from the same configuration.toml:

    resetHypervisorConfig(&base); resetHypervisorConfig(&new)   // factory.go
    if !utils.DeepCompare(base, new) { fall back to booting its own VM }

Only the fields `resetHypervisorConfig` zeroes may differ (NumVCPUs, MemorySize, the template
fields, and in 2.x/3.x SharedPath, VMStorePath, RunStorePath; in 1.x also ProxyConfig).
**Every other field matters**: one wrong default, one unresolved symlink, one kernel
parameter in a different order, and Kata silently boots its own VM - the cache then costs
memory and saves nothing, and nothing logs an error. So this module reproduces Kata's
configuration loader field by field, defaults included, instead of copying what we use.

Go `encoding/json` rules this relies on: keys are the Go field names; the receiver ignores
keys it does not know and leaves missing ones at their zero value; a key with the wrong JSON
type makes `json.Unmarshal` fail (kata-runtime then runs without a factory). That lets one
document serve every Kata version: we emit the *union* of the field names of Kata 1.x and
2.x/3.x, each derived the way its own version's loader derives it (e.g. both `NumVCPUs`,
1.x uint32, and `NumVCPUsF`, 3.x float32). Where both versions share a field name but derive
a different default we follow Kata 1.x - the version whose `kata-runtime factory init` this
daemon replaces - and say so in a comment marked "3.x differs".

Sources read (GitHub, stored copies; the commit is the one the copy was read at):

* kata-containers/runtime (Kata 1.x):
  - pkg/katautils/config.go @ 6626a36c8deb80a6abeab7c8fbbb482dab8ca883 and
    @ 0100af18a2afdd6dfcc95129ec6237ba4915b3e5 (tomlConfig, the hypervisor getters,
    newQemuHypervisorConfig, updateRuntimeConfig{Proxy,Agent}, SetKernelParams,
    LoadConfiguration's "no proxy with vsock" rule)
  - pkg/katautils/config-settings.go.in @ 3a4aec153e5824d437ca1cc2557f4f793dcb9d28 (defaults)
  - pkg/katautils/create.go @ 06f6034db783d69105c9b81cfae699133486b6d7 (systemd kernel
    parameters, HandleFactory: which runtime config becomes the factory's VMConfig)
  - virtcontainers/hypervisor.go @ 0100af18a2afdd6dfcc95129ec6237ba4915b3e5 (HypervisorConfig,
    Param, DeserializeParams, valid(), MinHypervisorMemory)
  - virtcontainers/vm.go @ 0825f820682134368d5d063db9a9ddf15dff2f8b (VMConfig) and a later
    stored vm.go (ToGrpc/GrpcToVMConfig: AgentType must be "kata")
  - virtcontainers/factory/factory.go @ 06f6034db783d69105c9b81cfae699133486b6d7
    (resetHypervisorConfig, checkVMConfig)
  - virtcontainers/kata_agent.go @ 011ade5299ea18c346e56159c5e89292e299d18c
    (KataAgentConfig, KataAgentKernelParams, KataAgentSetDefaultTraceConfigOptions)
  - virtcontainers/proxy.go (ProxyConfig, ProxyType names), virtcontainers/utils
    (SupportsVsocks), virtcontainers/qemu_<arch>.go (MaxQemuVCPUs)
* kata-containers/kata-containers (Kata 2.x/3.x):
  - src/runtime/virtcontainers/hypervisor.go @ 9da5c91d27087a5b0cb29e91baa6696a8dbc4bc3
    (3.x HypervisorConfig with NumVCPUsF) and @ 00552864fa888e88422af9265af725235b8cec43
  - src/runtime/pkg/katautils/config.go @ 3fc170788d88efe9d1eb767f0c2f2c85c463a210
  - src/runtime/pkg/katautils/create.go @ 00c774e2a5640f445548e0274e610249e0b39718
  - src/runtime/virtcontainers/factory/factory_linux.go @ 46004506eadf...,
    factory/grpccache/grpccache.go @ 5a9fc728..., utils/compare.go @ 2e87dd4f... (DeepCompare)
  - 3.x defaults: the generated config-settings of Kata 3.18.0 (commit 9cebbab29d64), as
    vendored in a fork; the upstream .in at that version was not available to read.

What we cannot reproduce from the file alone, and why it does not matter here: per-pod
annotations and OCI-spec-derived fields (they change the *new* config, so Kata would not
match its own cache either), and `fips=1` on FIPS hosts (same). The output mirrors
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
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = ["agent_config", "hypervisor_config", "reset_for_compare", "vm_config"]

# --- Kata 1.x defaults: pkg/katautils/config-settings.go.in (literal values, not filled in
# by the Makefile in 1.x) ---------------------------------------------------------------
#: 3.x differs: "/usr/bin/qemu-system-x86_64" (Makefile-generated).
DEFAULT_HYPERVISOR_PATH: Final = "/usr/bin/qemu-lite-system-x86_64"
DEFAULT_KERNEL_PATH: Final = "/usr/share/kata-containers/vmlinuz.container"
#: 3.x differs: "q35".
DEFAULT_MACHINE_TYPE: Final = "pc"
DEFAULT_VCPUS: Final = 1
DEFAULT_MEMORY_MIB: Final = 2048
DEFAULT_MEM_SLOTS: Final = 10
DEFAULT_BRIDGES: Final = 1
DEFAULT_BLOCK_DEVICE_DRIVER: Final = "virtio-scsi"
DEFAULT_MSIZE_9P: Final = 8192
DEFAULT_ENTROPY_SOURCE: Final = "/dev/urandom"
#: 3.x differs: "never".
DEFAULT_VIRTIO_FS_CACHE: Final = "none"
#: sharedFS() default; 3.x differs: "virtio-fs".
DEFAULT_SHARED_FS: Final = "virtio-9p"
DEFAULT_VHOST_USER_STORE_PATH: Final = "/var/run/kata-containers/vhost-user/"
DEFAULT_PROXY_PATH: Final = "/usr/libexec/kata-containers/kata-proxy"
#: create.go: systemd.unit=<systemdUnitName>, only when booting from an image.
SYSTEMD_UNIT_NAME: Final = "kata-containers.target"

#: config.go maxPCIBridges: default_bridges is capped here.
MAX_PCI_BRIDGES: Final = 5
#: hypervisor.go MinHypervisorMemory: smaller default_memory values fall back to 2048.
MIN_HYPERVISOR_MEMORY_MIB: Final = 256

# --- Kata 3.x-only defaults (3.18.0 generated config-settings) ------------------------------
DEFAULT_ROOTFS_TYPE_3X: Final = "ext4"
DEFAULT_BLOCK_DEVICE_AIO_3X: Final = "io_uring"
DEFAULT_QGS_PORT_3X: Final = 4050
#: config.PCIePort NoPort, for hot_plug_vfio / cold_plug_vfio.
DEFAULT_VFIO_PORT_3X: Final = "no-port"
#: 3.x caps pcie_switch_port here (maxPCIeSwitchPorts).
MAX_PCIE_SWITCH_PORTS_3X: Final = 16
MAX_HYPERVISOR_LOGLEVEL_3X: Final = 3

# --- names Kata compares verbatim ------------------------------------------------------------
HYPERVISOR_TYPE: Final = "qemu"
#: vc.KataContainersAgent; GrpcToVMConfig refuses any other AgentType.
AGENT_TYPE: Final = "kata"
KATA_PROXY_TYPE: Final = "kataProxy"
NO_PROXY_TYPE: Final = "noProxy"

#: govmmQemu.MachineTypeMicrovm: no NVDIMM, so Kata forces disable_image_nvdimm.
MACHINE_TYPE_MICROVM: Final = "microvm"

#: MaxQemuVCPUs() per GOARCH (virtcontainers/qemu_<arch>.go; 3.x govmm/vmm_<arch>.go).
#: arm64 is gicList[GICv3]. Unknown architectures get amd64's value.
_MAX_QEMU_VCPUS: Final[Mapping[str, int]] = MappingProxyType({
    "x86_64": 240, "amd64": 240,
    "aarch64": 123, "arm64": 123,
    "ppc64le": 128,
    "s390x": 248,
    "loongarch64": 256,  # 3.x only
})

#: utils.SupportsVsocks(): both device nodes must exist.
_VSOCK_DEVICES: Final = ("/dev/vsock", "/dev/vhost-vsock")

#: What factory.resetHypervisorConfig zeroes in HypervisorConfig before comparing (1.x: the
#: first six; 2.x/3.x add the last three; NumVCPUsF is 3.x's NumVCPUs).
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
    """3.x getHostCPUs(): the "processor" lines of /proc/cpuinfo, i.e. the online CPUs."""
    return os.cpu_count() or 1


def _max_qemu_vcpus() -> int:
    return _MAX_QEMU_VCPUS.get(platform.machine(), 240)


def _host_memory_mib() -> int:
    """3.x memory.TotalMemory() / MiB (sysinfo totalram, which is what sysconf reports)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    except (OSError, ValueError):  # pragma: no cover - sysconf name unknown
        return 0


def _host_supports_vsock() -> bool:
    return all(os.path.exists(p) for p in _VSOCK_DEVICES)


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


def _str_list(t: Mapping[str, Any], key: str) -> list[str] | None:
    """A []string: nil (JSON null) when the key is absent, a list (maybe empty) otherwise.

    The difference is visible to Kata 1.x, which compares AgentConfig (an interface{}) with
    reflect.DeepEqual, where a nil slice and an empty one differ.
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


def _go_fields(s: str) -> list[str]:
    """Go's strings.Fields, which is how 1.x splits kernel_params.

    3.x differs: KernelParamFields() splits on ' ' only and keeps quoted substrings together.
    """
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


# --- the loader ---------------------------------------------------------------------------

def _use_vsock(h: Mapping[str, Any]) -> bool:
    # newQemuHypervisorConfig: use_vsock only sticks when the host has vsock; otherwise Kata
    # warns and falls back to the serial port.
    return _bool(h, "use_vsock") and _host_supports_vsock()


def _agent_table(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    agents = doc.get("agent")
    if not isinstance(agents, Mapping):
        return None
    kata = agents.get("kata")
    return kata if isinstance(kata, Mapping) else None


def _default_vcpus_1x(requested: int) -> int:
    num_cpus = _go_num_cpu()
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return DEFAULT_VCPUS
    return requested


def _default_vcpus_3x(requested: float) -> float:
    # getCurrentCpuNum(): host CPUs, but never more than defaultMaxVCPUs() of an empty table.
    num_cpus = float(min(_host_cpus_3x(), _max_qemu_vcpus()))
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return float(DEFAULT_VCPUS)
    return requested


def _default_max_vcpus(requested: int) -> int:
    # 3.x differs only in where the host CPU count comes from (/proc/cpuinfo, not affinity).
    num_cpus = _go_num_cpu()
    if requested >= num_cpus or requested == 0:
        requested = num_cpus
    return min(requested, _max_qemu_vcpus())


def _default_max_mem_3x(requested: int) -> int:
    host = _host_memory_mib()
    if requested == 0 or requested > host:
        return host
    return requested


def _kernel_params(h: Mapping[str, Any], image_path: str, block_driver: str,
                   agent: Mapping[str, Any]) -> list[dict[str, str]]:
    """The KernelParams of the factory's VMConfig: what SetKernelParams leaves behind.

    Order matters (DeepCompare walks the slice): defaults, the virtio-scsi scan mode, the
    agent's parameters, then the user's kernel_params, duplicates and all.
    """
    params: list[dict[str, str]] = []
    if image_path != "":  # needSystemd(): an image boots systemd, an initrd does not
        params += [
            _param("systemd.unit", SYSTEMD_UNIT_NAME),
            _param("systemd.mask", "systemd-networkd.service"),
            _param("systemd.mask", "systemd-networkd.socket"),
        ]
    if block_driver == "virtio-scsi":
        params.append(_param("scsi_mod.scan", "none"))
    # KataAgentKernelParams on a copy with KataAgentSetDefaultTraceConfigOptions applied
    # (mode "" -> dynamic, type "" -> isolated). 3.x differs: agent.trace=true whenever
    # tracing, plus debug-console and cdh_api_timeout parameters.
    if _bool(agent, "enable_debug"):
        params.append(_param("agent.log", "debug"))
    if _bool(agent, "enable_tracing") and _str(agent, "trace_mode") == "static":
        params.append(_param("agent.trace", _str(agent, "trace_type") or "isolated"))
    # ContainerPipeSize only ever comes from an annotation, never from the file.
    user = _deserialize_params(_go_fields(_str(h, "kernel_params")))
    # AddKernelParam rejects an empty key ("=x"), failing Kata's whole load; nothing to match.
    params += [p for p in user if p["Key"] != ""]
    return params


def hypervisor_config(doc: Mapping[str, Any], hypervisor: str = "qemu") -> dict[str, Any]:
    """Kata's HypervisorConfig JSON object derived from a parsed configuration.toml (the whole
    document, as tomllib returns it).

    Only QEMU: Kata's checkFactoryConfig refuses a VM cache with any other hypervisor.
    """
    if hypervisor != HYPERVISOR_TYPE:
        raise ValueError(f"Kata's VM cache supports only qemu (got {hypervisor!r})")
    h = _table(doc, "hypervisor", hypervisor)
    agent = _agent_table(doc) or {}

    image = _resolve(_str(h, "image"))
    initrd = _resolve(_str(h, "initrd"))
    firmware = _resolve(_str(h, "firmware"))  # defaultFirmwarePath is "": nothing to resolve
    machine_type = _str(h, "machine_type") or DEFAULT_MACHINE_TYPE
    block_driver = _str(h, "block_device_driver") or DEFAULT_BLOCK_DEVICE_DRIVER
    # 3.x differs: on arm64 without firmware or pflash it also forces this to true.
    disable_nvdimm = _bool(h, "disable_image_nvdimm") or machine_type == MACHINE_TYPE_MICROVM
    memory = _int(h, "default_memory")
    bridges = _int(h, "default_bridges")
    vcpus_f = _default_vcpus_3x(_number(h, "default_vcpus"))
    requested_vcpus = h.get("default_vcpus")
    # 1.x decodes default_vcpus as int32; a fractional value only loads in 3.x, so round up
    # the way 3.x's NumVCPUs() does. Both fields are reset before comparing anyway.
    vcpus_1x = _default_vcpus_1x(
        math.ceil(requested_vcpus)
        if isinstance(requested_vcpus, int | float) and not isinstance(requested_vcpus, bool)
        else 0)

    return {
        # ---- Kata 1.x fields (virtcontainers/hypervisor.go), in struct order ----
        "NumVCPUs": vcpus_1x,
        "DefaultMaxVCPUs": _default_max_vcpus(_int(h, "default_maxvcpus")),
        # 1.x @6626a36c keeps any non-zero value; 1.x @0100af18 and 3.x apply the 256 MiB floor.
        "MemorySize": memory if memory >= MIN_HYPERVISOR_MEMORY_MIB else DEFAULT_MEMORY_MIB,
        "DefaultBridges": (DEFAULT_BRIDGES if bridges == 0 else min(bridges, MAX_PCI_BRIDGES)),
        "Msize9p": _int(h, "msize_9p") or DEFAULT_MSIZE_9P,
        "MemSlots": _int(h, "memory_slots") or DEFAULT_MEM_SLOTS,
        "MemOffset": _int(h, "memory_offset"),  # uint32 in 1.x, uint64 in 3.x; default 0
        "VirtioFSCacheSize": _int(h, "virtio_fs_cache_size"),
        "KernelParams": _kernel_params(h, image, block_driver, agent),
        "HypervisorParams": None,
        "KernelPath": _resolve(_str(h, "kernel") or DEFAULT_KERNEL_PATH),
        "ImagePath": image,
        "InitrdPath": initrd,
        "FirmwarePath": firmware,
        "MachineAccelerators": _comma_list(_str(h, "machine_accelerators")),
        "CPUFeatures": _comma_list(_str(h, "cpu_features")),
        "HypervisorPath": _resolve(_str(h, "path") or DEFAULT_HYPERVISOR_PATH),
        "HypervisorCtlPath": "",  # acrn only
        "JailerPath": "",  # firecracker only
        "BlockDeviceDriver": block_driver,
        "HypervisorMachineType": machine_type,
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": _str(h, "entropy_source") or DEFAULT_ENTROPY_SOURCE,
        "SharedFS": _str(h, "shared_fs") or DEFAULT_SHARED_FS,
        "VirtioFSDaemon": _str(h, "virtio_fs_daemon"),  # not resolved by Kata
        "VirtioFSCache": _str(h, "virtio_fs_cache") or DEFAULT_VIRTIO_FS_CACHE,
        "VirtioFSExtraArgs": _str_list(h, "virtio_fs_extra_args"),
        "FileBackedMemRootDir": _str(h, "file_mem_backend"),
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
        # 3.x differs: caps pcie_root_port at 16.
        "PCIeRootPort": _int(h, "pcie_root_port"),
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": _bool(h, "disable_vhost_net"),
        "EnableVhostUserStore": _bool(h, "enable_vhost_user_store"),
        "VhostUserStorePath": _str(h, "vhost_user_store_path") or DEFAULT_VHOST_USER_STORE_PATH,
        "GuestHookPath": _str(h, "guest_hook_path"),
        "VMid": "",
        "SELinuxProcessLabel": "",
        # ---- fields only Kata 2.x/3.x has (1.x ignores them), derived the 3.x way ----
        "NumVCPUsF": vcpus_f,
        "Groups": None,
        "RootfsType": _str(h, "rootfs_type") or DEFAULT_ROOTFS_TYPE_3X,
        "FirmwareVolumePath": _resolve(_str(h, "firmware_volume")),
        "SharedPath": "",
        "VhostUserDeviceReconnect": _int(h, "vhost_user_reconnect_timeout_sec"),
        "GuestMemoryDumpPath": _str(h, "guest_memory_dump_path"),
        "VMStorePath": "",
        "RunStorePath": "",
        "HypervisorPathList": _str_list(h, "valid_hypervisor_paths"),
        "HypervisorCtlPathList": None,  # 2.x, acrn only
        "JailerPathList": None,  # firecracker only
        "EntropySourceList": _str_list(h, "valid_entropy_sources"),
        "VirtioFSDaemonList": _str_list(h, "valid_virtio_fs_daemon_paths"),
        "EnableAnnotations": _str_list(h, "enable_annotations"),
        "FileBackedMemRootList": _str_list(h, "valid_file_mem_backends"),
        # PFlash(): the configured strings (only checked, not resolved), [] when none.
        "PFlash": _str_list(h, "pflashes") or [],
        "VhostUserStorePathList": _str_list(h, "valid_vhost_user_store_paths"),
        "SeccompSandbox": _str(h, "seccompsandbox"),
        "BlockDeviceAIO": _str(h, "block_device_aio") or DEFAULT_BLOCK_DEVICE_AIO_3X,
        "RemoteHypervisorSocket": "",
        "SandboxName": "",
        "SandboxNamespace": "",
        "User": "",
        "SGXEPCSize": 0,  # set for cloud-hypervisor only
        "DiskRateLimiterBwMaxRate": 0,  # the rate limiters below: cloud-hypervisor only
        "DiskRateLimiterBwOneTimeBurst": 0,
        "DiskRateLimiterOpsMaxRate": 0,
        "DiskRateLimiterOpsOneTimeBurst": 0,
        "RxRateLimiterMaxRate": _int(h, "rx_rate_limiter_max_rate"),
        "TxRateLimiterMaxRate": _int(h, "tx_rate_limiter_max_rate"),
        "NetRateLimiterBwMaxRate": 0,
        "NetRateLimiterBwOneTimeBurst": 0,
        "NetRateLimiterOpsMaxRate": 0,
        "NetRateLimiterOpsOneTimeBurst": 0,
        "VFIODevices": None,
        "VhostUserBlkDevices": None,
        "HotPlugVFIO": _str(h, "hot_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "ColdPlugVFIO": _str(h, "cold_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "PCIeSwitchPort": min(_int(h, "pcie_switch_port"), MAX_PCIE_SWITCH_PORTS_3X),
        "DefaultMaxMemorySize": _default_max_mem_3x(_int(h, "default_maxmemory")),
        "VirtioFSQueueSize": _int(h, "virtio_fs_queue_size"),
        "Uid": 0,
        "Gid": 0,
        "RemoteHypervisorTimeout": 0,  # remote hypervisor only
        # Capped at 3; the loader does not apply the package default of 1 to an absent key.
        "HypervisorLoglevel": min(_int(h, "hypervisor_loglevel"), MAX_HYPERVISOR_LOGLEVEL_3X),
        "GuestMemoryDumpPaging": _bool(h, "guest_memory_dump_paging"),
        "ConfidentialGuest": _bool(h, "confidential_guest"),
        "SevSnpGuest": _bool(h, "sev_snp_guest"),
        "GuestSwap": _bool(h, "enable_guest_swap"),
        "Rootless": _bool(h, "rootless"),
        "DisableSeccomp": False,  # the qemu loader never copies disable_seccomp
        "DisableSeLinux": _bool(h, "disable_selinux"),
        "DisableGuestSeLinux": _bool(h, "disable_guest_selinux"),
        "LegacySerial": _bool(h, "use_legacy_serial"),
        "ExtraMonitorSocket": _str(h, "extra_monitor_socket"),
        "QgsPort": (_int(h, "tdx_quote_generation_service_socket_port")
                    or DEFAULT_QGS_PORT_3X),
        "Initdata": "",
        "DefaultGPUs": 0,
        "DefaultGPUModel": "",
    }


def agent_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """Kata's KataAgentConfig JSON object, as updateRuntimeConfigAgent derives it.

    Without an `[agent.kata]` table Kata keeps the zero KataAgentConfig - even UseVSock stays
    false then. 3.x differs: LongLiveConn is true (1.x sets it only on the shimv2 path).
    """
    table = _agent_table(doc)
    agent = table if table is not None else {}
    return {
        # ---- Kata 1.x fields (virtcontainers/kata_agent.go) ----
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
        # ---- 2.x/3.x-only fields ----
        "EnableDebugConsole": _bool(agent, "debug_console_enabled"),
        "DialTimeout": _int(agent, "dial_timeout"),
        "CdhApiTimeout": _int(agent, "cdh_api_timeout"),
        "Policy": "",
    }


def _proxy(doc: Mapping[str, Any], use_vsock: bool) -> tuple[str, dict[str, Any]]:
    """ProxyType and ProxyConfig (1.x only; 2.x/3.x have no proxy and ignore both keys)."""
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


def vm_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The whole VMConfig JSON for GrpcVMConfig.Data.

    {"HypervisorType": "qemu", "HypervisorConfig": ..., "AgentType": "kata",
     "AgentConfig": ..., "ProxyType": ..., "ProxyConfig": {"Path": ..., "Debug": ...}}.
    """
    hypervisor = hypervisor_config(doc)
    proxy_type, proxy_config = _proxy(doc, hypervisor["UseVSock"])
    return {
        "HypervisorType": HYPERVISOR_TYPE,
        "HypervisorConfig": hypervisor,
        "AgentType": AGENT_TYPE,
        "AgentConfig": agent_config(doc),
        "ProxyType": proxy_type,
        "ProxyConfig": proxy_config,
    }


def reset_for_compare(vm_config: Mapping[str, Any]) -> dict[str, Any]:
    """Copy with the fields Kata's factory resets before comparing set to their zero values.

    HypervisorConfig: NumVCPUs, NumVCPUsF, MemorySize, BootToBeTemplate, BootFromTemplate,
    MemoryPath, DevicesStatePath, SharedPath, VMStorePath, RunStorePath. Kata 1.x also
    resets ProxyConfig (the proxy's path and debug flag never decide whether a VM fits), so
    that is zeroed too when present. Used by our client to decide whether a request fits
    the cache; the input is not modified.
    """
    out = copy.deepcopy(dict(vm_config))
    hypervisor = out.get("HypervisorConfig")
    hypervisor = dict(hypervisor) if isinstance(hypervisor, Mapping) else {}
    hypervisor.update(RESET_HYPERVISOR_FIELDS)
    out["HypervisorConfig"] = hypervisor
    if "ProxyConfig" in out:
        out["ProxyConfig"] = {"Path": "", "Debug": False}
    return out
