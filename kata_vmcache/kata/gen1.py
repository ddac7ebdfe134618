"""Kata 1.x's derivation (kata-containers/runtime): its loader's HypervisorConfig,
KataAgentConfig, proxy and kernel parameters for one configuration.toml, field by field.

The output mirrors `kata-runtime factory init`, the 1.x CLI loader: its VMConfig is what
a 1.x runtime compares our `Config` reply with. 1.x differs from 3.x in its machine-type and
binary defaults, in splitting kernel_params with strings.Fields, in reading only
`[agent.kata]`, and in its proxy (kata-proxy unless vsock is in use).

Sources read (kata-containers/runtime; unchanged since it was written; the commit is the
one each file was read at):

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from . import host
from .defaults import (
    DEFAULT_BLOCK_DEVICE_DRIVER,
    DEFAULT_BRIDGES,
    DEFAULT_ENTROPY_SOURCE,
    DEFAULT_HYPERVISOR_PATH,
    DEFAULT_KERNEL_PATH,
    DEFAULT_MACHINE_TYPE,
    DEFAULT_MEM_SLOTS,
    DEFAULT_MSIZE_9P,
    DEFAULT_PROXY_PATH,
    DEFAULT_SHARED_FS,
    DEFAULT_VCPUS,
    DEFAULT_VHOST_USER_STORE_PATH,
    DEFAULT_VIRTIO_FS_CACHE,
    HYPERVISOR_TYPE,
    KATA_PROXY_TYPE,
    MACHINE_TYPE_MICROVM,
    MAX_PCI_BRIDGES,
    NO_PROXY_TYPE,
    _default_memory,
)
from .go import (
    _comma_list,
    _go_fields,
    _resolve,
    toml_bool,
    toml_int,
    toml_str,
    toml_str_list,
    toml_table,
)
from .kernel_params import _boot_params, _deserialize_params, _param


def use_vsock(h: Mapping[str, Any]) -> bool:
    # newQemuHypervisorConfig: use_vsock only sticks when the host has vsock; otherwise Kata
    # warns and falls back to the serial port.
    return toml_bool(h, "use_vsock") and host._host_supports_vsock()


def agent_table(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """1.x reads `[agent.kata]` only."""
    agents = doc.get("agent")
    if not isinstance(agents, Mapping):
        return None
    kata = agents.get("kata")
    return kata if isinstance(kata, Mapping) else None


def _default_vcpus_1x(requested: int) -> int:
    num_cpus = host._go_num_cpu()
    if requested < 0 or requested > num_cpus:
        return num_cpus
    if requested == 0:
        return DEFAULT_VCPUS
    return requested


def _default_max_vcpus_1x(requested: int) -> int:
    num_cpus = host._go_num_cpu()
    if requested >= num_cpus or requested == 0:
        requested = num_cpus
    return min(requested, host._max_qemu_vcpus())


def _kernel_params_1x(h: Mapping[str, Any], image_path: str, block_driver: str,
                      agent: Mapping[str, Any]) -> list[dict[str, str]]:
    """The KernelParams of the factory's VMConfig: what 1.x's SetKernelParams leaves behind.

    Order matters (DeepCompare walks the slice): defaults, the virtio-scsi scan mode, the
    agent's parameters, then the user's kernel_params, duplicates and all.
    """
    params = _boot_params(image_path, block_driver)
    # KataAgentKernelParams on a copy with KataAgentSetDefaultTraceConfigOptions applied
    # (mode "" -> dynamic, type "" -> isolated).
    if toml_bool(agent, "enable_debug"):
        params.append(_param("agent.log", "debug"))
    if toml_bool(agent, "enable_tracing") and toml_str(agent, "trace_mode") == "static":
        params.append(_param("agent.trace", toml_str(agent, "trace_type") or "isolated"))
    # ContainerPipeSize only ever comes from an annotation, never from the file.
    user = _deserialize_params(_go_fields(toml_str(h, "kernel_params")))
    # AddKernelParam rejects an empty key ("=x"), failing Kata's whole load; nothing to match.
    params += [p for p in user if p["Key"] != ""]
    return params


def hypervisor(h: Mapping[str, Any], agent: Mapping[str, Any]) -> dict[str, Any]:
    """1.x's HypervisorConfig, in the struct's field order (kata-containers/runtime
    virtcontainers/hypervisor.go)."""
    image = _resolve(toml_str(h, "image"))
    initrd = _resolve(toml_str(h, "initrd"))
    firmware = _resolve(toml_str(h, "firmware"))  # defaultFirmwarePath is "": nothing to resolve
    machine_type = toml_str(h, "machine_type") or DEFAULT_MACHINE_TYPE
    block_driver = toml_str(h, "block_device_driver") or DEFAULT_BLOCK_DEVICE_DRIVER
    disable_nvdimm = toml_bool(h, "disable_image_nvdimm") or machine_type == MACHINE_TYPE_MICROVM
    bridges = toml_int(h, "default_bridges")
    requested_vcpus = h.get("default_vcpus")
    # 1.x decodes default_vcpus as int32: a fractional value does not load (the validator
    # says so); rounded up here only so that this function stays total.
    vcpus = _default_vcpus_1x(
        math.ceil(requested_vcpus)
        if isinstance(requested_vcpus, int | float) and not isinstance(requested_vcpus, bool)
        else 0)
    return {
        "NumVCPUs": vcpus,
        "DefaultMaxVCPUs": _default_max_vcpus_1x(toml_int(h, "default_maxvcpus")),
        # 1.x @6626a36c keeps any non-zero value; 1.x @0100af18 applies the 256 MiB floor.
        "MemorySize": _default_memory(toml_int(h, "default_memory")),
        "DefaultBridges": (DEFAULT_BRIDGES if bridges == 0 else min(bridges, MAX_PCI_BRIDGES)),
        "Msize9p": toml_int(h, "msize_9p") or DEFAULT_MSIZE_9P,
        "MemSlots": toml_int(h, "memory_slots") or DEFAULT_MEM_SLOTS,
        "MemOffset": toml_int(h, "memory_offset"),
        "VirtioFSCacheSize": toml_int(h, "virtio_fs_cache_size"),
        "KernelParams": _kernel_params_1x(h, image, block_driver, agent),
        "HypervisorParams": None,
        "KernelPath": _resolve(toml_str(h, "kernel") or DEFAULT_KERNEL_PATH),
        "ImagePath": image,
        "InitrdPath": initrd,
        "FirmwarePath": firmware,
        "MachineAccelerators": _comma_list(toml_str(h, "machine_accelerators")),
        "CPUFeatures": _comma_list(toml_str(h, "cpu_features")),
        "HypervisorPath": _resolve(toml_str(h, "path") or DEFAULT_HYPERVISOR_PATH),
        "HypervisorPathList": toml_str_list(h, "valid_hypervisor_paths"),
        "HypervisorCtlPathList": None,  # acrn only
        "HypervisorCtlPath": "",  # acrn only
        "JailerPath": "",  # firecracker only
        "JailerPathList": None,  # firecracker only
        "BlockDeviceDriver": block_driver,
        "HypervisorMachineType": machine_type,
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": toml_str(h, "entropy_source") or DEFAULT_ENTROPY_SOURCE,
        "SharedFS": toml_str(h, "shared_fs") or DEFAULT_SHARED_FS,
        "VirtioFSDaemon": toml_str(h, "virtio_fs_daemon"),  # not resolved by Kata
        "VirtioFSDaemonList": toml_str_list(h, "valid_virtio_fs_daemon_paths"),
        "VirtioFSCache": toml_str(h, "virtio_fs_cache") or DEFAULT_VIRTIO_FS_CACHE,
        "VirtioFSExtraArgs": toml_str_list(h, "virtio_fs_extra_args"),
        "FileBackedMemRootDir": toml_str(h, "file_mem_backend"),
        # PFlash(): the configured strings (only checked, not resolved), [] when none.
        "PFlash": toml_str_list(h, "pflashes") or [],
        "FileBackedMemRootList": toml_str_list(h, "valid_file_mem_backends"),
        "BlockDeviceCacheSet": toml_bool(h, "block_device_cache_set"),
        "BlockDeviceCacheDirect": toml_bool(h, "block_device_cache_direct"),
        "BlockDeviceCacheNoflush": toml_bool(h, "block_device_cache_noflush"),
        "DisableBlockDeviceUse": toml_bool(h, "disable_block_device_use"),
        "EnableIOThreads": toml_bool(h, "enable_iothreads"),
        "Debug": toml_bool(h, "enable_debug"),
        "MemPrealloc": toml_bool(h, "enable_mem_prealloc"),
        "HugePages": toml_bool(h, "enable_hugepages"),
        "VirtioMem": toml_bool(h, "enable_virtio_mem"),
        "IOMMU": toml_bool(h, "enable_iommu"),
        "IOMMUPlatform": toml_bool(h, "enable_iommu_platform"),
        "Realtime": False,  # no configuration key; never set by the loader
        "Mlock": not toml_bool(h, "enable_swap"),
        "DisableNestingChecks": toml_bool(h, "disable_nesting_checks"),
        "UseVSock": use_vsock(h),
        "DisableImageNvdimm": disable_nvdimm,
        "HotplugVFIOOnRootBus": toml_bool(h, "hotplug_vfio_on_root_bus"),
        "PCIeRootPort": toml_int(h, "pcie_root_port"),
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": toml_bool(h, "disable_vhost_net"),
        "EnableVhostUserStore": toml_bool(h, "enable_vhost_user_store"),
        "VhostUserStorePath": toml_str(h, "vhost_user_store_path") or DEFAULT_VHOST_USER_STORE_PATH,
        "VhostUserStorePathList": toml_str_list(h, "valid_vhost_user_store_paths"),
        "GuestHookPath": toml_str(h, "guest_hook_path"),
        "VMid": "",
        "SELinuxProcessLabel": "",
        "EnableAnnotations": toml_str_list(h, "enable_annotations"),
    }


def agent_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """1.x's KataAgentConfig, as updateRuntimeConfigAgent derives it.

    Without an `[agent.kata]` table Kata keeps the zero KataAgentConfig - even UseVSock stays
    false then. LongLiveConn stays false: 1.x sets it only on the shimv2 path.
    """
    table = agent_table(doc)
    agent = table if table is not None else {}
    return {
        "LongLiveConn": False,
        "UseVSock": table is not None and use_vsock(toml_table(doc, "hypervisor",
                                                            HYPERVISOR_TYPE)),
        "Debug": toml_bool(agent, "enable_debug"),
        "Trace": toml_bool(agent, "enable_tracing"),
        "ContainerPipeSize": 0,  # from an annotation only
        # Kept as written: 1.x applies the trace defaults to a copy, for kernel params only.
        "TraceMode": toml_str(agent, "trace_mode"),
        "TraceType": toml_str(agent, "trace_type"),
        "KernelModules": toml_str_list(agent, "kernel_modules"),
    }


def proxy_config(doc: Mapping[str, Any], use_vsock: bool) -> tuple[str, dict[str, Any]]:
    """ProxyType and ProxyConfig (1.x only; 3.x has no proxy)."""
    if use_vsock:
        # LoadConfiguration: with vsock there is no proxy; Debug is [runtime] enable_debug.
        return NO_PROXY_TYPE, {"Path": "", "Debug": toml_bool(toml_table(doc, "runtime"),
                                                          "enable_debug")}
    proxy = toml_table(doc, "proxy")
    kata = proxy.get("kata")
    if isinstance(kata, Mapping):
        return KATA_PROXY_TYPE, {"Path": _resolve(toml_str(kata, "path") or DEFAULT_PROXY_PATH),
                                 "Debug": toml_bool(kata, "enable_debug")}
    # initConfig's defaultProxy with a zero ProxyConfig.
    return KATA_PROXY_TYPE, {"Path": "", "Debug": False}
