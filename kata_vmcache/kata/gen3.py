"""Kata 3.x's derivation (kata-containers 3.30.0): its loader's HypervisorConfig and
KataAgentConfig for one configuration.toml, field by field, and what makes that loader
refuse the file.

3.x is today's Kata: a larger HypervisorConfig (rate limiters, VFIO ports, confidential
guests...), default_vcpus as a float32 (NumVCPUsF), q35 and virtio-fs by default,
kernel_params split with KernelParamFields (quotes keep spaces), any `[agent.<name>]`
table, no proxy; and a stricter loader, which refuses unknown values outright.

Sources read (kata-containers/kata-containers, tag 3.30.0 (commit 86e5975ad6a2),
src/runtime/):

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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import host
from .defaults import (
    BLOCK_AIO_3X,
    BLOCK_DRIVERS_3X,
    DEBUG_CONSOLE_PARAMS_3X,
    DEFAULT_BLOCK_DEVICE_AIO_3X,
    DEFAULT_BLOCK_DEVICE_DRIVER,
    DEFAULT_BRIDGES,
    DEFAULT_ENTROPY_SOURCE,
    DEFAULT_HYPERVISOR_LOGLEVEL_3X,
    DEFAULT_HYPERVISOR_PATH_3X,
    DEFAULT_KERNEL_PATH,
    DEFAULT_MACHINE_TYPE_3X,
    DEFAULT_MEASUREMENT_ALGO_3X,
    DEFAULT_MEM_SLOTS,
    DEFAULT_MSIZE_9P,
    DEFAULT_ROOTFS_TYPE_3X,
    DEFAULT_SHARED_FS_3X,
    DEFAULT_VCPUS,
    DEFAULT_VFIO_PORT_3X,
    DEFAULT_VHOST_USER_STORE_PATH,
    DEFAULT_VIRTIO_FS_CACHE_3X,
    EXTRA_MONITOR_3X,
    MACHINE_TYPE_CCW,
    MACHINE_TYPE_MICROVM,
    MAX_HYPERVISOR_LOGLEVEL_3X,
    MAX_PCI_BRIDGES,
    MAX_PCIE_ROOT_PORTS_3X,
    MAX_PCIE_SWITCH_PORTS_3X,
    SHARED_FS_3X,
    _default_memory,
)
from .go import (
    _comma_list,
    _float32,
    _resolve,
    toml_bool,
    toml_int,
    toml_number,
    toml_optional_uint,
    toml_str,
    toml_str_list,
)
from .kernel_params import _boot_params, _deserialize_params, _kernel_param_fields, _param


def agent_table(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
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


def _default_vcpus_3x(requested: float) -> float:
    """defaultVCPUs(): getCurrentCpuNum() is the host's CPUs, but never more than
    defaultMaxVCPUs() of an empty table (govmm's MaxVCPUs)."""
    num_cpus = float(min(host._host_cpus_3x(), host._max_qemu_vcpus_3x()))
    requested = _float32(requested)
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return float(DEFAULT_VCPUS)
    return requested


def _default_max_vcpus_3x(requested: int) -> int:
    """defaultMaxVCPUs(), then validateHypervisorConfig's cap (the same MaxVCPUs)."""
    num_cpus = host._host_cpus_3x()
    if requested >= num_cpus or requested == 0:
        requested = num_cpus
    value = min(requested, host._max_qemu_vcpus_3x())
    return value if value != 0 else host._max_qemu_vcpus_3x()


def _default_max_mem_3x(requested: int) -> int:
    host_mib = host._host_memory_mib()
    if requested == 0 or requested > host_mib:
        return host_mib
    return requested


def _kernel_params_3x(h: Mapping[str, Any], image_path: str, block_driver: str,
                      agent: Mapping[str, Any]) -> list[dict[str, str]]:
    """3.x's SetKernelParams: getKernelParams (systemd only with an image), the virtio-scsi
    scan mode, KataAgentKernelParams, then the user's kernel_params (KernelParamFields, so
    quoted values keep their spaces), duplicates kept."""
    params = _boot_params(image_path, block_driver)
    if toml_bool(agent, "enable_debug"):
        params.append(_param("agent.log", "debug"))
    if toml_bool(agent, "enable_tracing"):
        params.append(_param("agent.trace", "true"))
    # ContainerPipeSize comes from an annotation only: never > 0 here.
    if toml_bool(agent, "debug_console_enabled"):
        params += [_param(k, v) for k, v in DEBUG_CONSOLE_PARAMS_3X]
    if (timeout := toml_int(agent, "cdh_api_timeout")) > 0:
        params.append(_param("agent.cdh_api_timeout", str(timeout)))
    if (timeout := toml_int(agent, "launch_process_timeout")) > 0:
        params.append(_param("agent.launch_process_timeout", str(timeout)))
    user = _deserialize_params(_kernel_param_fields(toml_str(h, "kernel_params")))
    # AddKernelParam refuses an empty key, failing the load (loader_refusals names it).
    params += [p for p in user if p["Key"] != ""]
    return params


def hypervisor(h: Mapping[str, Any], agent: Mapping[str, Any]) -> dict[str, Any]:
    """3.30.0's HypervisorConfig as newQemuHypervisorConfig, SetKernelParams and GetVM's
    validateHypervisorConfig leave it, in the struct's field order (exported fields only:
    encoding/json skips customAssets)."""
    image = _resolve(toml_str(h, "image"))
    initrd = _resolve(toml_str(h, "initrd"))
    firmware = _resolve(toml_str(h, "firmware"))  # defaultFirmwarePath is ""
    pflash = toml_str_list(h, "pflashes") or []
    machine_type = toml_str(h, "machine_type") or DEFAULT_MACHINE_TYPE_3X
    block_driver = toml_str(h, "block_device_driver") or DEFAULT_BLOCK_DEVICE_DRIVER
    if block_driver == "virtio-blk" and machine_type == MACHINE_TYPE_CCW:
        block_driver = "virtio-blk-ccw"  # validateHypervisorConfig
    disable_nvdimm = (toml_bool(h, "disable_image_nvdimm") or machine_type == MACHINE_TYPE_MICROVM
                      or (host._is_arm64() and firmware == "" and not pflash))
    bridges = toml_int(h, "default_bridges")
    loglevel = toml_int(h, "hypervisor_loglevel")
    return {
        "Groups": None,
        "KernelPath": _resolve(toml_str(h, "kernel") or DEFAULT_KERNEL_PATH),
        "ImagePath": image,
        "InitrdPath": initrd,
        "RootfsType": toml_str(h, "rootfs_type") or DEFAULT_ROOTFS_TYPE_3X,
        "FirmwarePath": firmware,
        "FirmwareVolumePath": _resolve(toml_str(h, "firmware_volume")),
        "MachineAccelerators": _comma_list(toml_str(h, "machine_accelerators")),
        "CPUFeatures": _comma_list(toml_str(h, "cpu_features")),
        "HypervisorPath": _resolve(toml_str(h, "path") or DEFAULT_HYPERVISOR_PATH_3X),
        "JailerPath": "",  # the QEMU loader never sets it
        "BlockDeviceDriver": block_driver,
        "HypervisorMachineType": machine_type,
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": toml_str(h, "entropy_source") or DEFAULT_ENTROPY_SOURCE,
        "SharedFS": toml_str(h, "shared_fs") or DEFAULT_SHARED_FS_3X,
        "SharedPath": "",
        "VirtioFSDaemon": toml_str(h, "virtio_fs_daemon"),  # not resolved
        "VirtioFSCache": toml_str(h, "virtio_fs_cache") or DEFAULT_VIRTIO_FS_CACHE_3X,
        "FileBackedMemRootDir": toml_str(h, "file_mem_backend"),
        "VhostUserStorePath": toml_str(h, "vhost_user_store_path") or DEFAULT_VHOST_USER_STORE_PATH,
        "VhostUserDeviceReconnect": toml_int(h, "vhost_user_reconnect_timeout_sec"),
        "GuestMemoryDumpPath": toml_str(h, "guest_memory_dump_path"),
        "GuestHookPath": toml_str(h, "guest_hook_path"),
        "VMid": "",
        "VMStorePath": "",
        "RunStorePath": "",
        "SELinuxProcessLabel": "",
        "HypervisorPathList": toml_str_list(h, "valid_hypervisor_paths"),
        "JailerPathList": None,
        "EntropySourceList": toml_str_list(h, "valid_entropy_sources"),
        "VirtioFSDaemonList": toml_str_list(h, "valid_virtio_fs_daemon_paths"),
        "VirtioFSExtraArgs": toml_str_list(h, "virtio_fs_extra_args"),
        "EnableAnnotations": toml_str_list(h, "enable_annotations"),
        "FileBackedMemRootList": toml_str_list(h, "valid_file_mem_backends"),
        # PFlash(): the configured strings (only checked, not resolved), [] when none.
        "PFlash": pflash,
        "VhostUserStorePathList": toml_str_list(h, "valid_vhost_user_store_paths"),
        "SeccompSandbox": toml_str(h, "seccompsandbox"),
        "BlockDeviceAIO": toml_str(h, "block_device_aio") or DEFAULT_BLOCK_DEVICE_AIO_3X,
        "RemoteHypervisorSocket": "",  # the remote hypervisor's loader only
        "SandboxName": "",
        "SandboxNamespace": "",
        "User": "",
        "SnpIdBlock": toml_str(h, "snp_id_block"),
        "SnpIdAuth": toml_str(h, "snp_id_auth"),
        # A pointer: DeepCompare compares its address, so a set policy never matches.
        "SnpGuestPolicy": toml_optional_uint(h, "snp_guest_policy"),
        "KernelParams": _kernel_params_3x(h, image, block_driver, agent),
        "KernelVerityParams": toml_str(h, "kernel_verity_params"),
        "HypervisorParams": None,
        "SGXEPCSize": 0,  # cloud-hypervisor only
        "DiskRateLimiterBwMaxRate": 0,  # the disk and net rate limiters: other VMMs only
        "DiskRateLimiterBwOneTimeBurst": 0,
        "DiskRateLimiterOpsMaxRate": 0,
        "DiskRateLimiterOpsOneTimeBurst": 0,
        "RxRateLimiterMaxRate": toml_int(h, "rx_rate_limiter_max_rate"),
        "TxRateLimiterMaxRate": toml_int(h, "tx_rate_limiter_max_rate"),
        "NetRateLimiterBwMaxRate": 0,
        "NetRateLimiterBwOneTimeBurst": 0,
        "NetRateLimiterOpsMaxRate": 0,
        "NetRateLimiterOpsOneTimeBurst": 0,
        "MemOffset": toml_int(h, "memory_offset"),
        "VFIODevices": None,
        "VhostUserBlkDevices": None,
        "HotPlugVFIO": toml_str(h, "hot_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "ColdPlugVFIO": toml_str(h, "cold_plug_vfio") or DEFAULT_VFIO_PORT_3X,
        "PCIeRootPort": min(toml_int(h, "pcie_root_port"), MAX_PCIE_ROOT_PORTS_3X),
        "PCIeSwitchPort": min(toml_int(h, "pcie_switch_port"), MAX_PCIE_SWITCH_PORTS_3X),
        "NumVCPUsF": _default_vcpus_3x(toml_number(h, "default_vcpus")),
        "DefaultMaxVCPUs": _default_max_vcpus_3x(toml_int(h, "default_maxvcpus")),
        "MemorySize": _default_memory(toml_int(h, "default_memory")),
        "DefaultMaxMemorySize": _default_max_mem_3x(toml_int(h, "default_maxmemory")),
        "DefaultBridges": (DEFAULT_BRIDGES if bridges == 0 else min(bridges, MAX_PCI_BRIDGES)),
        "Msize9p": toml_int(h, "msize_9p") or DEFAULT_MSIZE_9P,
        "MemSlots": toml_int(h, "memory_slots") or DEFAULT_MEM_SLOTS,
        "VirtioFSCacheSize": toml_int(h, "virtio_fs_cache_size"),
        "VirtioFSQueueSize": toml_int(h, "virtio_fs_queue_size"),
        "Uid": 0,
        "Gid": 0,
        "RemoteHypervisorTimeout": 0,  # the remote hypervisor's loader only
        "BlockDeviceCacheSet": toml_bool(h, "block_device_cache_set"),
        "BlockDeviceCacheDirect": toml_bool(h, "block_device_cache_direct"),
        "BlockDeviceCacheNoflush": toml_bool(h, "block_device_cache_noflush"),
        "BlockDeviceLogicalSectorSize": toml_int(h, "block_device_logical_sector_size"),
        "BlockDevicePhysicalSectorSize": toml_int(h, "block_device_physical_sector_size"),
        "DisableBlockDeviceUse": toml_bool(h, "disable_block_device_use"),
        "EnableIOThreads": toml_bool(h, "enable_iothreads"),
        "IndepIOThreads": toml_int(h, "indep_iothreads"),
        "Debug": toml_bool(h, "enable_debug"),
        # defaultHypervisorLoglevel(): 0 (or absent) is the package default 1, capped at 3.
        "HypervisorLoglevel": (DEFAULT_HYPERVISOR_LOGLEVEL_3X if loglevel == 0
                               else min(loglevel, MAX_HYPERVISOR_LOGLEVEL_3X)),
        "MemPrealloc": toml_bool(h, "enable_mem_prealloc"),
        "ReclaimGuestFreedMemory": toml_bool(h, "reclaim_guest_freed_memory"),
        "HugePages": toml_bool(h, "enable_hugepages"),
        "VirtioMem": toml_bool(h, "enable_virtio_mem"),
        "IOMMU": toml_bool(h, "enable_iommu"),
        "IOMMUPlatform": toml_bool(h, "enable_iommu_platform"),
        # enable_numa maps host NUMA nodes (sysfs); kata-vmcache boots no guest NUMA nodes,
        # and the validator says so when the key is set.
        "GuestNUMANodes": None,
        "DisableNestingChecks": toml_bool(h, "disable_nesting_checks"),
        "DisableImageNvdimm": disable_nvdimm,
        "GuestMemoryDumpPaging": toml_bool(h, "guest_memory_dump_paging"),
        "ConfidentialGuest": toml_bool(h, "confidential_guest"),
        "SevSnpGuest": toml_bool(h, "sev_snp_guest"),
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": toml_bool(h, "disable_vhost_net"),
        "EnableVhostUserStore": toml_bool(h, "enable_vhost_user_store"),
        "GuestSwap": toml_bool(h, "enable_guest_swap"),
        "Rootless": toml_bool(h, "rootless"),
        "DisableSeccomp": False,  # the QEMU loader never copies disable_seccomp
        "DisableSeLinux": toml_bool(h, "disable_selinux"),
        # GetDefaultHypervisorConfig's true is replaced by the table's value (false unset).
        "DisableGuestSeLinux": toml_bool(h, "disable_guest_selinux"),
        "LegacySerial": toml_bool(h, "use_legacy_serial"),
        "ExtraMonitorSocket": toml_str(h, "extra_monitor_socket"),
        # qgsPort(): the value as decoded; 0 when absent (no package default since 3.21).
        "QgsPort": toml_int(h, "tdx_quote_generation_service_socket_port"),
        "Initdata": "",  # from an annotation only
        "InitdataDigest": None,
        "InitdataImage": "",
        "DefaultGPUs": 0,  # from an annotation only
        "DefaultGPUModel": "",
        "MeasurementAlgo": toml_str(h, "measurement_algo") or DEFAULT_MEASUREMENT_ALGO_3X,
    }


def agent_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """3.30.0's KataAgentConfig, in struct order. Without any `[agent.*]` table it stays
    the zero value (initConfig); with one, updateRuntimeConfigAgent sets LongLiveConn."""
    table = agent_table(doc)
    agent = table if table is not None else {}
    return {
        "KernelModules": toml_str_list(agent, "kernel_modules"),
        "ContainerPipeSize": 0,  # from an annotation only
        "DialTimeout": toml_int(agent, "dial_timeout"),
        "CdhApiTimeout": toml_int(agent, "cdh_api_timeout"),
        "LaunchProcessTimeout": toml_int(agent, "launch_process_timeout"),
        "LongLiveConn": table is not None,
        "Debug": toml_bool(agent, "enable_debug"),
        "Trace": toml_bool(agent, "enable_tracing"),
        "EnableDebugConsole": toml_bool(agent, "debug_console_enabled"),
        "Policy": "",  # from an annotation only
    }


def refusals(h: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What makes 3.x's loader refuse the file's `[hypervisor.qemu]` table `h`, as (key,
    reason): values outside the loader's accepted lists, virtio-fs without its daemon, a
    kernel parameter with an empty name (`loader_refusals` in the package's face)."""
    out: list[tuple[str, str]] = []
    shared_fs = toml_str(h, "shared_fs") or DEFAULT_SHARED_FS_3X
    if shared_fs not in SHARED_FS_3X:
        out.append(("shared_fs", f"not one of {', '.join(SHARED_FS_3X)} (got {shared_fs!r})"))
    elif shared_fs in ("virtio-fs", "virtio-fs-nydus") and not toml_str(h, "virtio_fs_daemon"):
        default = "" if "shared_fs" in h else " (its default)"
        out.append(("shared_fs", f"{shared_fs}{default} needs virtio_fs_daemon, which is not "
                                 "set; set shared_fs = \"virtio-9p\" or virtio_fs_daemon"))
    for key, allowed in (("block_device_driver", BLOCK_DRIVERS_3X),
                         ("block_device_aio", BLOCK_AIO_3X),
                         ("extra_monitor_socket", EXTRA_MONITOR_3X)):
        value = toml_str(h, key)
        if value and value not in allowed:
            out.append((key, f"not one of {', '.join(allowed)} (got {value!r})"))
    for p in _deserialize_params(_kernel_param_fields(toml_str(h, "kernel_params"))):
        if p["Key"] == "":
            out.append(("kernel_params", f"a parameter with an empty name (got "
                                         f"\"={p['Value']}\")"))
    return out
