"""The VM a configuration file describes, derived as the file's Kata generation derives it:
the `VMSpec` the factory boots (`spec_from_config`), the agent channel and kata-proxy Kata
would use, the file-level rules Kata 3.x refuses a VM by (`check_kata3`), and
check-config's lines about the VM (`describe_vm`).

Every value comes from one derivation of the file, Kata's own (kata/): the payload the
`Config` reply sends for the file's generation (`Config.kata_hypervisor`), read once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from .. import kata
from ..config import Config
from ..errors import ConfigError, ConfigProblem
from ..kata.defaults import EXTRA_MONITOR_3X
from ..kata.go import toml_table
from ..vm.devices import AGENT_CHANNEL_NAME, AGENT_VSOCK_PORT, running_nested
from ..vm.line3 import MACHINES_3X, kernel_root_params_3x
from ..vm.paths import sandbox_storage
from ..vm.spec import VMSpec


def spec_from_config(config: Config, accelerator: Literal["kvm", "tcg"]) -> VMSpec:
    """The VM Kata would build from the file: sizes from the validated settings, devices
    and kernel parameters from Kata's own derivation of the file (kata/). Raises
    ConfigError for a Kata 3.x file whose VM cannot be built as Kata builds it."""
    h = config.hypervisor
    # One derivation: the payload the Config reply sends, for the file's generation.
    kata_hv = config.kata_hypervisor
    spec = VMSpec(
        qemu=h.path,
        kernel=h.kernel,
        initrd=h.initrd,
        image=h.image,
        machine_type=h.machine_type,
        kernel_params=tuple(kata_params(kata_hv["KernelParams"])),
        vcpus=h.vcpus,
        max_vcpus=h.max_vcpus,
        memory_mib=h.memory_mib,
        memory_slots=h.memory_slots,
        max_memory_mib=config.max_memory_mib,
        accelerator=accelerator,
        generation=config.daemon.kata_version,
        bridges=kata_hv["DefaultBridges"],
        nested=running_nested() and not kata_hv["DisableNestingChecks"],
        entropy_source=kata_hv["EntropySource"],
        block_device_driver=kata_hv["BlockDeviceDriver"],
        machine_accelerators=kata_hv["MachineAccelerators"],
        cpu_features=kata_hv["CPUFeatures"],
        disable_image_nvdimm=kata_hv["DisableImageNvdimm"],
        agent_channel=agent_channel(config),
        # 1.x's fields; 3.x has no UseVSock (vsock always) nor HotplugVFIOOnRootBus.
        use_vsock=kata_hv.get("UseVSock", True),
        debug=kata_hv["Debug"],
        pcie_root_port=kata_hv["PCIeRootPort"],
        hotplug_vfio_on_root_bus=kata_hv.get("HotplugVFIOOnRootBus", False),
        own_serial=config.daemon.ready_probe == "serial",
        shared_fs=kata_hv["SharedFS"],
        virtio_fs_cache_size=kata_hv["VirtioFSCacheSize"],
        file_mem_backend=file_backed_memory(kata_hv),
    )
    if config.daemon.kata_version == "1.x":
        return spec
    problems = check_kata3(config)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(spec, **kata3_fields(config, kata_hv))


def kata3_fields(config: Config, kata_hv: Mapping[str, Any]) -> dict[str, Any]:
    """The VMSpec fields only Kata 3.x's device model reads (vm/line3.py Kata3Line), from
    Kata's HypervisorConfig (kata/) as kata-containers 3.30.0's loader derives it
    (src/runtime/pkg/katautils/config.go, newQemuHypervisorConfig)."""
    return {
        "machine_type": kata_hv["HypervisorMachineType"],
        "virtio_fs_queue_size": kata_hv["VirtioFSQueueSize"],
        # config.go defaultMaxMemSz(): default_maxmemory, else (or above) the host's
        # memory. Our [vmcache] max_memory, when set, still wins: it is the user's word.
        "max_memory_mib": config.daemon.max_memory_mib or kata_hv["DefaultMaxMemorySize"],
        "memory_offset_mib": kata_hv["MemOffset"],
        "pcie_root_port": kata_hv["PCIeRootPort"],  # capped as config.go caps it
        "pcie_switch_port": kata_hv["PCIeSwitchPort"],
        "hot_plug_vfio": kata_hv["HotPlugVFIO"],
        "cold_plug_vfio": kata_hv["ColdPlugVFIO"],
        "disable_guest_selinux": kata_hv["DisableGuestSeLinux"],
        "iommu": kata_hv["IOMMU"],
        "legacy_serial": kata_hv["LegacySerial"],
        "rootfs_type": kata_hv["RootfsType"],
        "kernel_verity_params": kata_hv["KernelVerityParams"],
        "mem_prealloc": kata_hv["MemPrealloc"],
        "hugepages": kata_hv["HugePages"],
        "vhost_user_store": kata_hv["EnableVhostUserStore"],
        "pvpanic": kata_hv["GuestMemoryDumpPath"] != "",
        "balloon": kata_hv["ReclaimGuestFreedMemory"],
        "iothreads": kata_hv["EnableIOThreads"],
        "indep_iothreads": max(kata_hv["IndepIOThreads"], 0),
        "seccomp_sandbox": kata_hv["SeccompSandbox"],
        "firmware": Path(kata_hv["FirmwarePath"]) if kata_hv["FirmwarePath"] else None,
        "pflash": tuple(kata_hv["PFlash"] or ()),
        "extra_monitor": kata_hv["ExtraMonitorSocket"],
    }


#: qemu.go fallbackFileBackedMemDir (1.x and 3.x).
FALLBACK_FILE_BACKED_MEM = "/dev/shm"


#: The shared file systems a virtiofsd serves (3.x's virtio-fs-nydus runs nydusd instead).
VIRTIO_FS = "virtio-fs"


def file_backed_memory(kata_hv: Mapping[str, Any]) -> Path | None:
    """Where the guest RAM is a shared file, as qemu.go decides it (createSandbox in 1.x,
    CreateVM in 3.x, then setupFileBackedMem): with virtio-fs or file_mem_backend set,
    under file_mem_backend, else /dev/shm. A directory that does not exist is only logged
    by Kata, and the VM gets plain RAM (check_host refuses that for virtio-fs, which
    cannot work without it)."""
    root = kata_hv["FileBackedMemRootDir"]
    if not root and kata_hv["SharedFS"] != VIRTIO_FS:
        return None
    target = root or FALLBACK_FILE_BACKED_MEM
    return Path(target) if os.path.isdir(target) else None


def check_kata3(config: Config) -> list[ConfigProblem]:
    """What in a Kata 3.x file Kata 3.30.0 itself refuses when it builds the VM, or what
    kata-vmcache cannot build the way Kata does. File-level rules, kept beside the 3.x
    device model (vm/line3.py Kata3Line) whose assumptions they state."""
    hv = config.kata_hypervisor  # a 3.x file: its 3.x derivation
    source = config.source
    problems: list[ConfigProblem] = []

    def problem(key: str, message: str) -> None:
        problems.append(ConfigProblem(f"hypervisor.qemu.{key}", message, source))

    machine = hv["HypervisorMachineType"]
    if machine not in MACHINES_3X:
        problem("machine_type", f"Kata 3.x builds only {' and '.join(MACHINES_3X)} VMs on "
                f"amd64 (got {machine!r}; qemu_amd64.go supportedQemuMachines)")
    if hv["ConfidentialGuest"]:
        problem("confidential_guest", "not supported by kata-vmcache (got true): a "
                "confidential guest needs Kata's protection devices and firmware")
    if hv["IOMMU"] and machine != "q35":
        problem("enable_iommu", f"machine type {machine!r} has no vIOMMU (got true; "
                "Kata 3.x adds intel-iommu on q35 only)")
    if hv["ImagePath"]:
        try:
            kernel_root_params_3x(hv["RootfsType"], True, hv["KernelVerityParams"])
        except ValueError as exc:
            key = "rootfs_type" if "rootfs" in str(exc) else "kernel_verity_params"
            problem(key, f"{exc} (Kata 3.x refuses it)")
    if config.factory.enable_template and hv["HugePages"]:
        problem("enable_hugepages", "VM templating does not work with hugepages: Kata "
                "3.x backs the VM's memory with /dev/hugepages, not the template's file")
    if hv["EnableVhostUserStore"] and not hv["HugePages"]:
        problem("enable_vhost_user_store", "needs enable_hugepages = true (Kata 3.x "
                "refuses vhost-user storage without hugepages)")
    shared_fs = hv["SharedFS"]
    if shared_fs not in ("virtio-9p", VIRTIO_FS, "none"):
        problem("shared_fs", f"not supported by kata-vmcache (got {shared_fs!r}; expected "
                '"virtio-fs", "virtio-9p" or "none": virtio-fs-nydus needs a nydusd per '
                "VM, which kata-vmcache does not run)")
    monitor = hv["ExtraMonitorSocket"]
    if monitor and monitor not in EXTRA_MONITOR_3X:
        problem("extra_monitor_socket", f"got {monitor!r}; expected one of "
                f"{', '.join(EXTRA_MONITOR_3X)}")
    return problems


def kata_params(params: list[dict[str, str]]) -> list[str]:
    """vc.SerializeParams: `key=value`, or `key` alone when the value is empty."""
    return [f"{p['Key']}={p['Value']}" if p["Value"] else p["Key"] for p in params]


def agent_channel(config: Config) -> Literal["serial", "vsock", ""]:
    """How the guest's agent is reached, as the file's Kata generation decides it: 1.x
    uses vsock only when use_vsock is set and the host has it (else the virtio-serial
    port, as Kata 1.x falls back), 3.x always uses vsock. A guest without an agent gets
    the channel only where the host can provide it (config.py refuses the rest)."""
    if config.daemon.kata_version == "1.x":
        return "vsock" if config.kata_hypervisor["UseVSock"] else "serial"
    return "vsock" if host_has_vsock() else ""


def host_has_vsock() -> bool:
    return kata.host_has_vhost_vsock()


def proxy_path(config: Config) -> Path | None:
    """The kata-proxy to start per VM: Kata 1.x, an agent in the guest, its serial
    channel (with vsock, 1.x uses no proxy); None otherwise."""
    if (config.daemon.kata_version != "1.x" or config.daemon.guest_agent != "kata"
            or agent_channel(config) != "serial"):
        return None
    path = config.kata_proxy["Path"]
    return Path(path or kata.DEFAULT_PROXY_PATH)


def qemu_table(config: Config) -> Mapping[str, Any]:
    """The file's [hypervisor.qemu] table, as Kata's loader reads it."""
    return toml_table(config.document, "hypervisor", "qemu")


def describe_vm(config: Config) -> list[tuple[str, str]]:
    """What `check-config` says about the Kata VM it will build."""
    d = config.daemon
    where = f"{d.vm_storage_path}/<vm id>/"
    channel = agent_channel(config)
    proxy = proxy_path(config)
    if channel == "serial":
        how = f"virtio-serial port {AGENT_CHANNEL_NAME} on {where}kata.sock"
        how += (f", through kata-proxy {proxy} listening on "
                f"{sandbox_storage(d.vm_storage_path)}/<vm id>/proxy.sock" if proxy else
                " (no proxy: guest_agent = \"none\")")
    elif channel == "vsock":
        how = f"vhost-vsock-pci, a guest CID per VM, agent port {AGENT_VSOCK_PORT}"
    else:
        how = f"none (no {VHOST_VSOCK} on this host)"
    hv = config.kata_hypervisor
    if hv["SharedFS"] == VIRTIO_FS:
        memory = file_backed_memory(hv)
        share = (f"virtio-fs: a virtiofsd per VM ({hv['VirtioFSDaemon']}, cache "
                 f"{hv['VirtioFSCache']}) on {where}vhost-fs.sock exporting {where}shared/, "
                 f"guest RAM shared under {memory or 'nothing (refused)'}")
    elif hv["SharedFS"] == "none":
        share = "none"
    else:
        share = f"virtio-9p on {where}shared/"
    return [
        ("kata.vm_directory", f"{where} (qmp.sock console.sock "
                              f"{'kata.sock ' if channel == 'serial' else ''}pid shared/)"),
        ("kata.agent_channel", how),
        ("kata.shared_fs", share),
        ("kata.readiness", {"kata-agent": "the agent's health check (grpc.Health/Check"
                                          + (f" over ttrpc, vsock port {AGENT_VSOCK_PORT})"
                                             if d.kata_version == "3.x" else ")"),
                            "serial": f"{d.ready_line!r} on our second serial port"}
         [d.ready_probe]),
    ]


#: QEMU opens it for a vhost-vsock-pci device (utils.VHostVSockDevicePath).
VHOST_VSOCK = kata.VHOST_VSOCK_DEVICE
