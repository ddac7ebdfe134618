"""Kata"s VMConfig JSON: every field as each Kata generation"s loader derives it.

Kata compares our `Config` reply with its own VMConfig field by field, so these tests pin
whole objects rather than a few keys: a dropped key or a drifted default must fail here, not
as a silent fallback on a production host. Host facts (CPU count, memory, vsock) are pinned
so the expected values are exact. The same derivation checked by Kata 3.30.0's own loader:
scripts/kata-compare/run.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import kata
from kata_vmcache.kata import host

HOST_CPUS = 8
HOST_MEMORY_MIB = 16384
MAX_QEMU_VCPUS = 240


@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_go_num_cpu", lambda: HOST_CPUS)
    monkeypatch.setattr(host, "_host_cpus_3x", lambda: HOST_CPUS)
    monkeypatch.setattr(host, "_max_qemu_vcpus", lambda: MAX_QEMU_VCPUS)
    monkeypatch.setattr(host, "_max_qemu_vcpus_3x", lambda: MAX_QEMU_VCPUS)
    monkeypatch.setattr(host, "_is_arm64", lambda: False)
    monkeypatch.setattr(host, "_host_memory_mib", lambda: HOST_MEMORY_MIB)
    monkeypatch.setattr(host, "_host_supports_vsock", lambda: False)


@pytest.fixture
def assets(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("qemu", "vmlinuz", "initrd.img", "rootfs.img"):
        path = tmp_path / name
        path.write_bytes(b"x")
        files[name] = str(path)
    return files


def minimal(assets: dict[str, str], **qemu: Any) -> dict[str, Any]:
    table = {"path": assets["qemu"], "kernel": assets["vmlinuz"], "initrd": assets["initrd.img"]}
    table.update(qemu)
    return {"hypervisor": {"qemu": table}}


#: Every key of 1.x's HypervisorConfig (kata-containers/runtime virtcontainers/hypervisor.go).
EXPECTED_KEYS = {
    "NumVCPUs", "DefaultMaxVCPUs", "MemorySize", "DefaultBridges", "Msize9p", "MemSlots",
    "MemOffset", "VirtioFSCacheSize", "KernelParams", "HypervisorParams", "KernelPath",
    "ImagePath", "InitrdPath", "FirmwarePath", "MachineAccelerators", "CPUFeatures",
    "HypervisorPath", "HypervisorPathList", "HypervisorCtlPathList", "HypervisorCtlPath",
    "JailerPath", "JailerPathList", "BlockDeviceDriver", "HypervisorMachineType",
    "MemoryPath", "DevicesStatePath", "EntropySource", "SharedFS", "VirtioFSDaemon",
    "VirtioFSDaemonList", "VirtioFSCache", "VirtioFSExtraArgs", "FileBackedMemRootDir",
    "PFlash", "FileBackedMemRootList", "BlockDeviceCacheSet", "BlockDeviceCacheDirect",
    "BlockDeviceCacheNoflush", "DisableBlockDeviceUse", "EnableIOThreads", "Debug",
    "MemPrealloc", "HugePages", "VirtioMem", "IOMMU", "IOMMUPlatform", "Realtime", "Mlock",
    "DisableNestingChecks", "UseVSock", "DisableImageNvdimm", "HotplugVFIOOnRootBus",
    "PCIeRootPort", "BootToBeTemplate", "BootFromTemplate", "DisableVhostNet",
    "EnableVhostUserStore", "VhostUserStorePath", "VhostUserStorePathList", "GuestHookPath",
    "VMid", "SELinuxProcessLabel", "EnableAnnotations",
}

#: Every exported field of 3.30.0"s HypervisorConfig
#: (src/runtime/virtcontainers/hypervisor.go), in the struct"s order.
EXPECTED_KEYS_3X = [
    "Groups", "KernelPath", "ImagePath", "InitrdPath", "RootfsType", "FirmwarePath",
    "FirmwareVolumePath", "MachineAccelerators", "CPUFeatures", "HypervisorPath",
    "JailerPath", "BlockDeviceDriver", "HypervisorMachineType", "MemoryPath",
    "DevicesStatePath", "EntropySource", "SharedFS", "SharedPath", "VirtioFSDaemon",
    "VirtioFSCache", "FileBackedMemRootDir", "VhostUserStorePath", "VhostUserDeviceReconnect",
    "GuestMemoryDumpPath", "GuestHookPath", "VMid", "VMStorePath", "RunStorePath",
    "SELinuxProcessLabel", "HypervisorPathList", "JailerPathList", "EntropySourceList",
    "VirtioFSDaemonList", "VirtioFSExtraArgs", "EnableAnnotations", "FileBackedMemRootList",
    "PFlash", "VhostUserStorePathList", "SeccompSandbox", "BlockDeviceAIO",
    "RemoteHypervisorSocket", "SandboxName", "SandboxNamespace", "User", "SnpIdBlock",
    "SnpIdAuth", "SnpGuestPolicy", "KernelParams", "KernelVerityParams", "HypervisorParams",
    "SGXEPCSize", "DiskRateLimiterBwMaxRate", "DiskRateLimiterBwOneTimeBurst",
    "DiskRateLimiterOpsMaxRate", "DiskRateLimiterOpsOneTimeBurst", "RxRateLimiterMaxRate",
    "TxRateLimiterMaxRate", "NetRateLimiterBwMaxRate", "NetRateLimiterBwOneTimeBurst",
    "NetRateLimiterOpsMaxRate", "NetRateLimiterOpsOneTimeBurst", "MemOffset", "VFIODevices",
    "VhostUserBlkDevices", "HotPlugVFIO", "ColdPlugVFIO", "PCIeRootPort", "PCIeSwitchPort",
    "NumVCPUsF", "DefaultMaxVCPUs", "MemorySize", "DefaultMaxMemorySize", "DefaultBridges",
    "Msize9p", "MemSlots", "VirtioFSCacheSize", "VirtioFSQueueSize", "Uid", "Gid",
    "RemoteHypervisorTimeout", "BlockDeviceCacheSet", "BlockDeviceCacheDirect",
    "BlockDeviceCacheNoflush", "BlockDeviceLogicalSectorSize",
    "BlockDevicePhysicalSectorSize", "DisableBlockDeviceUse", "EnableIOThreads",
    "IndepIOThreads", "Debug", "HypervisorLoglevel", "MemPrealloc", "ReclaimGuestFreedMemory",
    "HugePages", "VirtioMem", "IOMMU", "IOMMUPlatform", "GuestNUMANodes",
    "DisableNestingChecks", "DisableImageNvdimm", "GuestMemoryDumpPaging",
    "ConfidentialGuest", "SevSnpGuest", "BootToBeTemplate", "BootFromTemplate",
    "DisableVhostNet", "EnableVhostUserStore", "GuestSwap", "Rootless", "DisableSeccomp",
    "DisableSeLinux", "DisableGuestSeLinux", "LegacySerial", "ExtraMonitorSocket", "QgsPort",
    "Initdata", "InitdataDigest", "InitdataImage", "DefaultGPUs", "DefaultGPUModel",
    "MeasurementAlgo",
]

AGENT_KEYS = {
    "LongLiveConn", "UseVSock", "Debug", "Trace", "ContainerPipeSize", "TraceMode", "TraceType",
    "KernelModules",
}
#: 3.30.0's KataAgentConfig (src/runtime/virtcontainers/kata_agent.go), in struct order.
AGENT_KEYS_3X = [
    "KernelModules", "ContainerPipeSize", "DialTimeout", "CdhApiTimeout",
    "LaunchProcessTimeout", "LongLiveConn", "Debug", "Trace", "EnableDebugConsole", "Policy",
]


def test_key_set_is_complete(assets: dict[str, str]) -> None:
    assert set(kata.hypervisor_config(minimal(assets), "1.x")) == EXPECTED_KEYS
    assert set(kata.agent_config({}, "1.x")) == AGENT_KEYS
    assert set(kata.agent_config({"agent": {"kata": {}}}, "1.x")) == AGENT_KEYS
    # 3.x: exactly its structs" exported fields, in their order (nothing of 1.x"s).
    assert list(kata.hypervisor_config(minimal(assets), "3.x")) == EXPECTED_KEYS_3X
    assert list(kata.agent_config({}, "3.x")) == AGENT_KEYS_3X
    assert list(kata.agent_config({"agent": {"kata": {}}}, "3.x")) == AGENT_KEYS_3X


@pytest.mark.parametrize("generation", kata.GENERATIONS)
def test_keys_are_unique_for_go_case_insensitive_matching(assets: dict[str, str],
                                                          generation: kata.Generation) -> None:
    # encoding/json matches keys case-insensitively: two keys differing only in case would
    # land in the same Go field.
    keys = list(kata.hypervisor_config(minimal(assets), generation))
    assert len({k.lower() for k in keys}) == len(keys)


def test_minimal_config_gets_every_kata_1x_default(assets: dict[str, str]) -> None:
    assert kata.hypervisor_config(minimal(assets), "1.x") == {
        "NumVCPUs": 1,
        "DefaultMaxVCPUs": HOST_CPUS,  # 0 means "as many as the host has"
        "MemorySize": 2048,
        "DefaultBridges": 1,
        "Msize9p": 8192,
        "MemSlots": 10,
        "MemOffset": 0,
        "VirtioFSCacheSize": 0,
        "KernelParams": [{"Key": "scsi_mod.scan", "Value": "none"}],
        "HypervisorParams": None,
        "KernelPath": assets["vmlinuz"],
        "ImagePath": "",
        "InitrdPath": assets["initrd.img"],
        "FirmwarePath": "",
        "MachineAccelerators": "",
        "CPUFeatures": "",
        "HypervisorPath": assets["qemu"],
        "HypervisorCtlPath": "",
        "JailerPath": "",
        "BlockDeviceDriver": "virtio-scsi",
        "HypervisorMachineType": "pc",
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": "/dev/urandom",
        "SharedFS": "virtio-9p",
        "VirtioFSDaemon": "",
        "VirtioFSCache": "none",
        "VirtioFSExtraArgs": None,
        "FileBackedMemRootDir": "",
        "BlockDeviceCacheSet": False,
        "BlockDeviceCacheDirect": False,
        "BlockDeviceCacheNoflush": False,
        "DisableBlockDeviceUse": False,
        "EnableIOThreads": False,
        "Debug": False,
        "MemPrealloc": False,
        "HugePages": False,
        "VirtioMem": False,
        "IOMMU": False,
        "IOMMUPlatform": False,
        "Realtime": False,
        "Mlock": True,  # !enable_swap
        "DisableNestingChecks": False,
        "UseVSock": False,
        "DisableImageNvdimm": False,
        "HotplugVFIOOnRootBus": False,
        "PCIeRootPort": 0,
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": False,
        "EnableVhostUserStore": False,
        "VhostUserStorePath": "/var/run/kata-containers/vhost-user/",
        "GuestHookPath": "",
        "VMid": "",
        "SELinuxProcessLabel": "",
        "HypervisorPathList": None,
        "HypervisorCtlPathList": None,
        "JailerPathList": None,
        "VirtioFSDaemonList": None,
        "EnableAnnotations": None,
        "FileBackedMemRootList": None,
        "PFlash": [],
        "VhostUserStorePathList": None,
    }


def test_minimal_config_gets_every_kata_3x_default(assets: dict[str, str]) -> None:
    """Kata 3.30.0"s newQemuHypervisorConfig with nothing set but the assets (checked against
    Kata"s own loader by scripts/kata-compare/run.py)."""
    assert kata.hypervisor_config(minimal(assets), "3.x") == {
        "Groups": None,
        "KernelPath": assets["vmlinuz"],
        "ImagePath": "",
        "InitrdPath": assets["initrd.img"],
        "RootfsType": "ext4",
        "FirmwarePath": "",
        "FirmwareVolumePath": "",
        "MachineAccelerators": "",
        "CPUFeatures": "",
        "HypervisorPath": assets["qemu"],
        "JailerPath": "",
        "BlockDeviceDriver": "virtio-scsi",
        "HypervisorMachineType": "q35",  # defaultMachineType
        "MemoryPath": "",
        "DevicesStatePath": "",
        "EntropySource": "/dev/urandom",
        "SharedFS": "virtio-fs",  # the default: refused by the loader without virtio_fs_daemon
        "SharedPath": "",
        "VirtioFSDaemon": "",
        "VirtioFSCache": "never",  # defaultVirtioFSCacheMode (1.x: "none")
        "FileBackedMemRootDir": "",
        "VhostUserStorePath": "/var/run/kata-containers/vhost-user/",
        "VhostUserDeviceReconnect": 0,
        "GuestMemoryDumpPath": "",
        "GuestHookPath": "",
        "VMid": "",
        "VMStorePath": "",
        "RunStorePath": "",
        "SELinuxProcessLabel": "",
        "HypervisorPathList": None,
        "JailerPathList": None,
        "EntropySourceList": None,
        "VirtioFSDaemonList": None,
        "VirtioFSExtraArgs": None,
        "EnableAnnotations": None,
        "FileBackedMemRootList": None,
        "PFlash": [],
        "VhostUserStorePathList": None,
        "SeccompSandbox": "",
        "BlockDeviceAIO": "io_uring",
        "RemoteHypervisorSocket": "",
        "SandboxName": "",
        "SandboxNamespace": "",
        "User": "",
        "SnpIdBlock": "",
        "SnpIdAuth": "",
        "SnpGuestPolicy": None,
        "KernelParams": [{"Key": "scsi_mod.scan", "Value": "none"}],
        "KernelVerityParams": "",
        "HypervisorParams": None,
        "SGXEPCSize": 0,
        "DiskRateLimiterBwMaxRate": 0,
        "DiskRateLimiterBwOneTimeBurst": 0,
        "DiskRateLimiterOpsMaxRate": 0,
        "DiskRateLimiterOpsOneTimeBurst": 0,
        "RxRateLimiterMaxRate": 0,
        "TxRateLimiterMaxRate": 0,
        "NetRateLimiterBwMaxRate": 0,
        "NetRateLimiterBwOneTimeBurst": 0,
        "NetRateLimiterOpsMaxRate": 0,
        "NetRateLimiterOpsOneTimeBurst": 0,
        "MemOffset": 0,
        "VFIODevices": None,
        "VhostUserBlkDevices": None,
        "HotPlugVFIO": "no-port",
        "ColdPlugVFIO": "no-port",
        "PCIeRootPort": 0,
        "PCIeSwitchPort": 0,
        "NumVCPUsF": 1.0,
        "DefaultMaxVCPUs": HOST_CPUS,  # 0: the host's CPUs (/proc/cpuinfo)
        "MemorySize": 2048,
        "DefaultMaxMemorySize": HOST_MEMORY_MIB,  # 0: the host's memory
        "DefaultBridges": 1,
        "Msize9p": 8192,
        "MemSlots": 10,
        "VirtioFSCacheSize": 0,
        "VirtioFSQueueSize": 0,
        "Uid": 0,
        "Gid": 0,
        "RemoteHypervisorTimeout": 0,
        "BlockDeviceCacheSet": False,
        "BlockDeviceCacheDirect": False,
        "BlockDeviceCacheNoflush": False,
        "BlockDeviceLogicalSectorSize": 0,
        "BlockDevicePhysicalSectorSize": 0,
        "DisableBlockDeviceUse": False,
        "EnableIOThreads": False,
        "IndepIOThreads": 0,
        "Debug": False,
        "HypervisorLoglevel": 1,  # defaultHypervisorLoglevel (we sent 0)
        "MemPrealloc": False,
        "ReclaimGuestFreedMemory": False,
        "HugePages": False,
        "VirtioMem": False,
        "IOMMU": False,
        "IOMMUPlatform": False,
        "GuestNUMANodes": None,
        "DisableNestingChecks": False,
        "DisableImageNvdimm": False,
        "GuestMemoryDumpPaging": False,
        "ConfidentialGuest": False,
        "SevSnpGuest": False,
        "BootToBeTemplate": False,
        "BootFromTemplate": False,
        "DisableVhostNet": False,
        "EnableVhostUserStore": False,
        "GuestSwap": False,
        "Rootless": False,
        "DisableSeccomp": False,
        "DisableSeLinux": False,
        "DisableGuestSeLinux": False,
        "LegacySerial": False,
        "ExtraMonitorSocket": "",
        "QgsPort": 0,  # no default since 3.21 (we sent 4050)
        "Initdata": "",
        "InitdataDigest": None,
        "InitdataImage": "",
        "DefaultGPUs": 0,
        "DefaultGPUModel": "",
        "MeasurementAlgo": "sha512",  # defaultMeasurementAlgo (we sent nothing)
    }


def test_defaults_for_paths_kata_fills_in() -> None:
    # Neither path nor kernel set: Kata's compiled-in defaults (unresolved when missing).
    hc = kata.hypervisor_config({"hypervisor": {"qemu": {}}}, "1.x")
    assert hc["HypervisorPath"] == "/usr/bin/qemu-lite-system-x86_64"
    assert hc["KernelPath"] == "/usr/share/kata-containers/vmlinuz.container"
    # Even with no [hypervisor.qemu] table at all the loader's defaults come out.
    assert kata.hypervisor_config({}, "1.x")["MemSlots"] == 10
    # 3.x: qemu-system-x86_64 (config-settings.go.in defaultHypervisorPath).
    hc = kata.hypervisor_config({"hypervisor": {"qemu": {}}}, "3.x")
    assert hc["HypervisorPath"] == "/usr/bin/qemu-system-x86_64"
    assert hc["KernelPath"] == "/usr/share/kata-containers/vmlinuz.container"
    assert kata.default_hypervisor_path("1.x") == "/usr/bin/qemu-lite-system-x86_64"
    assert kata.default_hypervisor_path("3.x") == "/usr/bin/qemu-system-x86_64"


def test_explicit_values_are_carried_through(assets: dict[str, str]) -> None:
    hc = kata.hypervisor_config(minimal(
        assets,
        machine_type="q35",
        default_vcpus=2,
        default_maxvcpus=4,
        default_memory=4096,
        memory_slots=20,
        memory_offset=512,
        default_bridges=3,
        msize_9p=16384,
        block_device_driver="virtio-blk",
        shared_fs="virtio-fs",
        virtio_fs_daemon="/usr/libexec/virtiofsd",
        virtio_fs_cache="always",
        virtio_fs_extra_args=["--thread-pool-size=1"],
        enable_debug=True,
        enable_swap=True,
        enable_hugepages=True,
        enable_iothreads=True,
        disable_vhost_net=True,
        pcie_root_port=2,
        entropy_source="/dev/random",
        guest_hook_path="/usr/share/oci/hooks",
        machine_accelerators=" nvdimm=on, ,kernel_irqchip ",
        cpu_features="pmu=off,",
        kernel_params="a=b c d=e=f  quiet\tx=",
        enable_annotations=["enable_iommu"],
        hypervisor_loglevel=7,
    ), "1.x")
    assert hc["HypervisorMachineType"] == "q35"
    assert hc["NumVCPUs"] == 2
    assert hc["DefaultMaxVCPUs"] == 4
    assert hc["MemorySize"] == 4096
    assert hc["MemSlots"] == 20
    assert hc["MemOffset"] == 512
    assert hc["DefaultBridges"] == 3
    assert hc["Msize9p"] == 16384
    assert hc["BlockDeviceDriver"] == "virtio-blk"
    assert hc["SharedFS"] == "virtio-fs"
    assert hc["VirtioFSDaemon"] == "/usr/libexec/virtiofsd"
    assert hc["VirtioFSCache"] == "always"
    assert hc["VirtioFSExtraArgs"] == ["--thread-pool-size=1"]
    assert hc["Debug"] is True
    assert hc["Mlock"] is False
    assert hc["HugePages"] is True
    assert hc["EnableIOThreads"] is True
    assert hc["DisableVhostNet"] is True
    assert hc["PCIeRootPort"] == 2
    assert hc["EntropySource"] == "/dev/random"
    assert hc["GuestHookPath"] == "/usr/share/oci/hooks"
    assert hc["MachineAccelerators"] == "nvdimm=on,,kernel_irqchip"
    assert hc["CPUFeatures"] == "pmu=off"
    assert hc["EnableAnnotations"] == ["enable_iommu"]
    assert "HypervisorLoglevel" not in hc  # 3.x only
    # strings.Fields then DeserializeParams: split at the first "=", bare words get "".
    # virtio-blk, so no scsi_mod.scan parameter in front.
    assert hc["KernelParams"] == [
        {"Key": "a", "Value": "b"},
        {"Key": "c", "Value": ""},
        {"Key": "d", "Value": "e=f"},
        {"Key": "quiet", "Value": ""},
        {"Key": "x", "Value": ""},
    ]


def test_kernel_params_order_defaults_scsi_agent_then_user(assets: dict[str, str]) -> None:
    doc = {
        "hypervisor": {"qemu": {"path": assets["qemu"], "kernel": assets["vmlinuz"],
                                "image": assets["rootfs.img"],
                                "kernel_params": "console=hvc0 agent.log=info"}},
        "agent": {"kata": {"enable_debug": True, "enable_tracing": True,
                           "trace_mode": "static"}},
    }
    assert kata.hypervisor_config(doc, "1.x")["KernelParams"] == [
        {"Key": "systemd.unit", "Value": "kata-containers.target"},
        {"Key": "systemd.mask", "Value": "systemd-networkd.service"},
        {"Key": "systemd.mask", "Value": "systemd-networkd.socket"},
        {"Key": "scsi_mod.scan", "Value": "none"},
        {"Key": "agent.log", "Value": "debug"},
        {"Key": "agent.trace", "Value": "isolated"},  # trace_type "" defaults to isolated
        {"Key": "console", "Value": "hvc0"},
        {"Key": "agent.log", "Value": "info"},  # user values come last, duplicates kept
    ]


def test_dynamic_tracing_adds_no_kernel_param(assets: dict[str, str]) -> None:
    doc = minimal(assets)
    doc["agent"] = {"kata": {"enable_tracing": True}}  # mode "" means dynamic
    assert kata.hypervisor_config(doc, "1.x")["KernelParams"] == [
        {"Key": "scsi_mod.scan", "Value": "none"}]


@pytest.mark.parametrize(("requested", "expected"), [
    (None, 1), (0, 1), (2, 2), (HOST_CPUS, HOST_CPUS), (HOST_CPUS + 1, HOST_CPUS),
    (-1, HOST_CPUS),
])
def test_vcpus_of_both_generations(assets: dict[str, str], requested: int | None,
                                   expected: int) -> None:
    doc = minimal(assets) if requested is None else minimal(assets, default_vcpus=requested)
    one, three = kata.hypervisor_config(doc, "1.x"), kata.hypervisor_config(doc, "3.x")
    assert one["NumVCPUs"] == expected
    assert isinstance(one["NumVCPUs"], int)
    assert three["NumVCPUsF"] == float(expected)
    assert isinstance(three["NumVCPUsF"], float)
    assert "NumVCPUsF" not in one
    assert "NumVCPUs" not in three


def test_3x_takes_a_fraction_of_a_vcpu_and_boots_it_rounded_up(assets: dict[str, str]) -> None:
    doc = minimal(assets, default_vcpus=1.5)
    assert kata.hypervisor_config(doc, "3.x")["NumVCPUsF"] == 1.5
    assert kata.resolve(doc, "3.x").vcpus == 2  # RoundUpNumVCPUs
    assert kata.resolve(doc, "3.x").vcpus_exact == 1.5
    # float32: 0.1 is not 0.1 there, and the VM still gets one CPU.
    tenth = kata.hypervisor_config(minimal(assets, default_vcpus=0.1), "3.x")["NumVCPUsF"]
    assert tenth != 0.1
    assert abs(tenth - 0.1) < 1e-7


def test_3x_counts_host_cpus_in_proc_cpuinfo_not_the_affinity_mask(
        assets: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_go_num_cpu", lambda: 2)  # a process pinned to two CPUs
    doc = minimal(assets, default_vcpus=-1)
    assert kata.hypervisor_config(doc, "1.x")["NumVCPUs"] == 2
    assert kata.hypervisor_config(doc, "3.x")["NumVCPUsF"] == float(HOST_CPUS)
    assert kata.hypervisor_config(doc, "3.x")["DefaultMaxVCPUs"] == HOST_CPUS


@pytest.mark.parametrize("generation", kata.GENERATIONS)
@pytest.mark.parametrize(("requested", "expected"), [
    (0, HOST_CPUS), (1, 1), (HOST_CPUS - 1, HOST_CPUS - 1), (HOST_CPUS, HOST_CPUS),
    (1000, HOST_CPUS),
])
def test_max_vcpus_follow_the_host(assets: dict[str, str], requested: int,
                                   expected: int, generation: kata.Generation) -> None:
    hc = kata.hypervisor_config(minimal(assets, default_maxvcpus=requested), generation)
    assert hc["DefaultMaxVCPUs"] == expected


def test_max_vcpus_never_exceed_what_qemu_supports(assets: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_go_num_cpu", lambda: 512)
    monkeypatch.setattr(host, "_host_cpus_3x", lambda: 512)
    assert kata.hypervisor_config(minimal(assets), "1.x")["DefaultMaxVCPUs"] == MAX_QEMU_VCPUS
    three = kata.hypervisor_config(minimal(assets, default_vcpus=-1), "3.x")
    assert three["DefaultMaxVCPUs"] == MAX_QEMU_VCPUS
    assert three["NumVCPUsF"] == float(MAX_QEMU_VCPUS)  # getCurrentCpuNum's cap


@pytest.mark.parametrize("generation", kata.GENERATIONS)
@pytest.mark.parametrize(("requested", "expected"), [
    (0, 2048), (128, 2048), (255, 2048), (256, 256), (1024, 1024),
])
def test_memory_below_kata_minimum_falls_back_to_default(assets: dict[str, str],
                                                         requested: int, expected: int,
                                                         generation: kata.Generation) -> None:
    doc = minimal(assets, default_memory=requested)
    assert kata.hypervisor_config(doc, generation)["MemorySize"] == expected
    assert kata.resolve(doc, generation).memory_mib == expected


def test_clamps_and_overrides(assets: dict[str, str]) -> None:
    doc = minimal(assets, default_bridges=9, machine_type="microvm", pcie_switch_port=99,
                  pcie_root_port=99, default_maxmemory=10 ** 9, hypervisor_loglevel=7)
    one = kata.hypervisor_config(doc, "1.x")
    assert one["DefaultBridges"] == 5
    assert one["DisableImageNvdimm"] is True  # microvm has no NVDIMM
    assert one["PCIeRootPort"] == 99  # 1.x does not cap it
    three = kata.hypervisor_config(doc, "3.x")
    assert three["DefaultBridges"] == 5
    assert three["DisableImageNvdimm"] is True
    assert three["PCIeSwitchPort"] == 16
    assert three["PCIeRootPort"] == 16
    assert three["DefaultMaxMemorySize"] == HOST_MEMORY_MIB
    assert three["HypervisorLoglevel"] == 3


def test_3x_on_arm64_without_firmware_disables_nvdimm(assets: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_is_arm64", lambda: True)
    assert kata.hypervisor_config(minimal(assets), "3.x")["DisableImageNvdimm"] is True
    with_pflash = minimal(assets, pflashes=[assets["rootfs.img"]])
    assert kata.hypervisor_config(with_pflash, "3.x")["DisableImageNvdimm"] is False


def test_3x_virtio_blk_on_s390_ccw_becomes_virtio_blk_ccw(assets: dict[str, str]) -> None:
    doc = minimal(assets, machine_type="s390-ccw-virtio", block_device_driver="virtio-blk")
    assert kata.hypervisor_config(doc, "3.x")["BlockDeviceDriver"] == "virtio-blk-ccw"
    assert kata.hypervisor_config(doc, "1.x")["BlockDeviceDriver"] == "virtio-blk"


@pytest.mark.parametrize("generation", kata.GENERATIONS)
def test_paths_are_resolved_like_kata_resolvepath(assets: dict[str, str], tmp_path: Path,
                                                  generation: kata.Generation) -> None:
    link = tmp_path / "kernel-link"
    os.symlink(assets["vmlinuz"], link)
    missing = str(tmp_path / "no-such-initrd")
    hc = kata.hypervisor_config(minimal(assets, kernel=str(link), initrd=missing), generation)
    assert hc["KernelPath"] == os.path.realpath(assets["vmlinuz"])
    assert hc["InitrdPath"] == missing  # left for the config validator to report


def test_vsock_needs_both_the_setting_and_the_host(assets: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    doc = minimal(assets, use_vsock=True)
    doc["agent"] = {"kata": {}}
    assert kata.hypervisor_config(doc, "1.x")["UseVSock"] is False
    assert kata.vm_config(doc, "1.x")["ProxyType"] == "kataProxy"

    monkeypatch.setattr(host, "_host_supports_vsock", lambda: True)
    doc["runtime"] = {"enable_debug": True}
    vc = kata.vm_config(doc, "1.x")
    assert vc["HypervisorConfig"]["UseVSock"] is True
    assert vc["AgentConfig"]["UseVSock"] is True
    assert vc["ProxyType"] == "noProxy"
    assert vc["ProxyConfig"] == {"Path": "", "Debug": True}
    # The proxy alone (what the daemon launches) is derived the same way.
    assert kata.proxy_config(doc) == ("noProxy", vc["ProxyConfig"])


def test_proxy_table_sets_proxy_config(assets: dict[str, str]) -> None:
    doc = minimal(assets)
    doc["proxy"] = {"kata": {"path": assets["qemu"], "enable_debug": True}}
    vc = kata.vm_config(doc, "1.x")
    assert vc["ProxyType"] == "kataProxy"
    assert vc["ProxyConfig"] == {"Path": assets["qemu"], "Debug": True}
    assert kata.proxy_config(doc) == ("kataProxy", vc["ProxyConfig"])


def test_agent_config_without_agent_table_is_kata_zero_value() -> None:
    doc = {"hypervisor": {"qemu": {"use_vsock": True}}}
    assert kata.agent_config(doc, "1.x") == {
        "LongLiveConn": False, "UseVSock": False, "Debug": False, "Trace": False,
        "ContainerPipeSize": 0, "TraceMode": "", "TraceType": "", "KernelModules": None,
    }
    assert kata.agent_config(doc, "3.x") == {
        "KernelModules": None, "ContainerPipeSize": 0, "DialTimeout": 0, "CdhApiTimeout": 0,
        "LaunchProcessTimeout": 0, "LongLiveConn": False, "Debug": False, "Trace": False,
        "EnableDebugConsole": False, "Policy": "",
    }


def test_agent_config_from_agent_kata() -> None:
    doc = {"agent": {"kata": {
        "enable_debug": True, "enable_tracing": True, "trace_mode": "static",
        "trace_type": "collated", "kernel_modules": ["e1000e InterruptThrottleRate=3000"],
        "debug_console_enabled": True, "dial_timeout": 45, "cdh_api_timeout": 30,
        "launch_process_timeout": 6,
    }}}
    assert kata.agent_config(doc, "1.x") == {
        "LongLiveConn": False, "UseVSock": False, "Debug": True, "Trace": True,
        "ContainerPipeSize": 0, "TraceMode": "static", "TraceType": "collated",
        "KernelModules": ["e1000e InterruptThrottleRate=3000"],
    }
    # 3.x: updateRuntimeConfigAgent sets LongLiveConn for any [agent.*] table.
    assert kata.agent_config(doc, "3.x") == {
        "KernelModules": ["e1000e InterruptThrottleRate=3000"], "ContainerPipeSize": 0,
        "DialTimeout": 45, "CdhApiTimeout": 30, "LaunchProcessTimeout": 6,
        "LongLiveConn": True, "Debug": True, "Trace": True, "EnableDebugConsole": True,
        "Policy": "",
    }


def test_3x_reads_any_agent_table() -> None:
    doc = {"agent": {"other": {"enable_debug": True}}}
    assert kata.agent_config(doc, "3.x")["Debug"] is True
    assert kata.agent_config(doc, "3.x")["LongLiveConn"] is True
    assert kata.agent_config(doc, "1.x")["Debug"] is False  # 1.x reads [agent.kata] only


def test_3x_kernel_params_of_the_agent(assets: dict[str, str]) -> None:
    doc = minimal(assets, block_device_driver="virtio-blk")
    doc["agent"] = {"kata": {"enable_debug": True, "enable_tracing": True,
                             "debug_console_enabled": True, "cdh_api_timeout": 30,
                             "launch_process_timeout": 6}}
    assert kata.hypervisor_config(doc, "3.x")["KernelParams"] == [
        {"Key": "agent.log", "Value": "debug"},
        {"Key": "agent.trace", "Value": "true"},  # any tracing (1.x: static mode only)
        {"Key": "agent.debug_console", "Value": ""},
        {"Key": "agent.debug_console_vport", "Value": "1026"},
        {"Key": "agent.cdh_api_timeout", "Value": "30"},
        {"Key": "agent.launch_process_timeout", "Value": "6"},
    ]


def test_3x_kernel_params_keep_quoted_values_and_split_on_spaces_only(
        assets: dict[str, str]) -> None:
    doc = minimal(assets, kernel_params='a=b  x="c d" e\tf g=h=i ', block_device_driver="nvdimm")
    assert kata.hypervisor_config(doc, "3.x")["KernelParams"] == [
        {"Key": "a", "Value": "b"},
        {"Key": "x", "Value": '"c d"'},
        {"Key": "e\tf", "Value": ""},  # KernelParamFields splits on " " only
        {"Key": "g", "Value": "h=i"},
    ]
    # 1.x: strings.Fields, quotes or not.
    assert [p["Key"] for p in kata.hypervisor_config(doc, "1.x")["KernelParams"]] == [
        "a", "x", "d\"", "e", "f", "g"]


def test_kernel_modules_absent_and_empty_differ() -> None:
    # Kata 1.x compares AgentConfig with reflect.DeepEqual: nil and [] are not equal there.
    assert kata.agent_config({"agent": {"kata": {}}}, "1.x")["KernelModules"] is None
    assert kata.agent_config({"agent": {"kata": {"kernel_modules": []}}},
                             "1.x")["KernelModules"] == []


def test_vm_config_shape_and_json_round_trip(assets: dict[str, str]) -> None:
    doc = minimal(assets)
    doc["agent"] = {"kata": {"enable_debug": True}}
    vc = kata.vm_config(doc, "1.x")
    assert list(vc) == ["HypervisorType", "HypervisorConfig", "AgentType", "AgentConfig",
                        "ProxyType", "ProxyConfig"]
    assert vc["HypervisorType"] == "qemu"
    assert vc["AgentType"] == "kata"
    assert vc["AgentConfig"] == kata.agent_config(doc, "1.x")
    assert vc["HypervisorConfig"] == kata.hypervisor_config(doc, "1.x")
    assert vc["ProxyConfig"] == {"Path": "", "Debug": False}
    wire = json.dumps(vc, separators=(",", ":"))
    assert json.loads(wire) == vc
    # 3.x's VMConfig: HypervisorType, AgentConfig, HypervisorConfig; no agent type, no proxy.
    three = kata.vm_config(doc, "3.x")
    assert list(three) == ["HypervisorType", "AgentConfig", "HypervisorConfig"]
    assert three["AgentConfig"] == kata.agent_config(doc, "3.x")
    assert three["HypervisorConfig"] == kata.hypervisor_config(doc, "3.x")
    assert json.loads(json.dumps(three)) == three


def test_the_five_differences_kata_3x_found(assets: dict[str, str]) -> None:
    """What Kata 3.30.0's checkVMConfig found in the payload of the demo file (issue 14):
    each is now derived as 3.x derives it, and still as 1.x does for 1.x."""
    doc = minimal(assets, shared_fs="virtio-9p")
    doc["agent"] = {"kata": {}}
    one, three = kata.vm_config(doc, "1.x"), kata.vm_config(doc, "3.x")
    assert (one["AgentConfig"]["LongLiveConn"], three["AgentConfig"]["LongLiveConn"]) \
        == (False, True)
    h1, h3 = one["HypervisorConfig"], three["HypervisorConfig"]
    assert (h1["VirtioFSCache"], h3["VirtioFSCache"]) == ("none", "never")
    assert h3["HypervisorLoglevel"] == 1
    assert h3["QgsPort"] == 0
    assert h3["MeasurementAlgo"] == "sha512"


def test_only_qemu_and_known_generations() -> None:
    with pytest.raises(ValueError, match="qemu"):
        kata.hypervisor_config({}, "1.x", hypervisor="firecracker")
    with pytest.raises(ValueError, match="generation"):
        # A generation the type does not allow: what is tested is the check at run time.
        kata.vm_config({}, "2.x")  # type: ignore[arg-type]


@pytest.mark.parametrize(("doc", "expected"), [
    ({}, ("3.x", "detected: no [proxy.*] or [shim.*] table")),
    ({"proxy": {"kata": {}}}, ("1.x", "detected: [proxy.kata] present")),
    ({"shim": {"kata": {"path": "/x"}}}, ("1.x", "detected: [shim.kata] present")),
    ({"proxy": {}}, ("3.x", "detected: no [proxy.*] or [shim.*] table")),  # empty: nothing
])
def test_detect_generation(doc: dict[str, Any], expected: tuple[str, str]) -> None:
    assert kata.detect_generation(doc) == expected


def test_loader_refusals_of_3x(assets: dict[str, str]) -> None:
    assert kata.loader_refusals(minimal(assets), "1.x") == []
    # virtio-fs is 3.x's default and needs a daemon.
    (refusal,) = kata.loader_refusals(minimal(assets), "3.x")
    assert refusal[0] == "shared_fs"
    assert "virtio-fs (its default) needs virtio_fs_daemon" in refusal[1]
    assert kata.loader_refusals(minimal(assets, virtio_fs_daemon="/usr/libexec/virtiofsd"),
                                "3.x") == []
    bad = minimal(assets, shared_fs="virtio-9p", block_device_driver="ide",
                  block_device_aio="posix", extra_monitor_socket="telnet",
                  kernel_params="quiet =x")
    assert [key for key, _ in kata.loader_refusals(bad, "3.x")] == [
        "block_device_driver", "block_device_aio", "extra_monitor_socket", "kernel_params"]


@pytest.mark.parametrize("generation", kata.GENERATIONS)
def test_resolve_reads_the_payload(assets: dict[str, str], generation: kata.Generation) -> None:
    doc = minimal(assets, default_vcpus=3, default_maxvcpus=4, default_memory=512,
                  memory_slots=6, machine_type="q35", enable_debug=True)
    r = kata.resolve(doc, generation)
    hc = kata.hypervisor_config(doc, generation)
    assert (r.path, r.kernel, r.initrd, r.image) == (
        hc["HypervisorPath"], hc["KernelPath"], hc["InitrdPath"], hc["ImagePath"])
    assert (r.vcpus, r.max_vcpus, r.memory_mib, r.memory_slots) == (3, 4, 512, 6)
    assert (r.machine_type, r.debug, r.generation) == ("q35", True, generation)


RESET_FIELDS_1X = {
    "NumVCPUs": 0, "MemorySize": 0, "BootToBeTemplate": False, "BootFromTemplate": False,
    "MemoryPath": "", "DevicesStatePath": "",
}
RESET_FIELDS_3X = {
    "NumVCPUsF": 0.0, "MemorySize": 0, "BootToBeTemplate": False, "BootFromTemplate": False,
    "MemoryPath": "", "DevicesStatePath": "", "SharedPath": "", "VMStorePath": "",
    "RunStorePath": "",
}


@pytest.mark.parametrize(("generation", "reset_fields"), [
    ("1.x", RESET_FIELDS_1X), ("3.x", RESET_FIELDS_3X)])
def test_reset_for_compare_zeroes_exactly_the_reset_fields(
        assets: dict[str, str], generation: kata.Generation,
        reset_fields: dict[str, Any]) -> None:
    doc = minimal(assets, default_vcpus=2, default_memory=4096)
    doc["proxy"] = {"kata": {"path": assets["qemu"], "enable_debug": True}}
    vc = kata.vm_config(doc, generation)
    # Give every reset field a non-zero value so that zeroing is visible.
    vc["HypervisorConfig"].update({k: v for k, v in dict(
        BootToBeTemplate=True, MemoryPath="/run/mem", DevicesStatePath="/run/state",
        SharedPath="/run/shared", VMStorePath="/run/vm", RunStorePath="/run/run",
        BootFromTemplate=True).items() if k in reset_fields})
    before = json.loads(json.dumps(vc))

    reset = kata.reset_for_compare(vc)

    assert json.loads(json.dumps(vc)) == before  # input untouched
    hc, hc_before = reset["HypervisorConfig"], before["HypervisorConfig"]
    assert set(hc) == set(hc_before)
    changed = {k for k in hc if hc[k] != hc_before[k]}
    assert changed == set(reset_fields)
    assert {k: hc[k] for k in reset_fields} == reset_fields
    # Kata 1.x also resets ProxyConfig; nothing else outside HypervisorConfig changes.
    if generation == "1.x":
        assert reset["ProxyConfig"] == {"Path": "", "Debug": False}
    assert {k: v for k, v in reset.items() if k not in ("HypervisorConfig", "ProxyConfig")} \
        == {k: v for k, v in before.items() if k not in ("HypervisorConfig", "ProxyConfig")}


@pytest.mark.parametrize("generation", kata.GENERATIONS)
def test_reset_makes_different_sizes_compare_equal(assets: dict[str, str],
                                                   generation: kata.Generation) -> None:
    small = kata.vm_config(minimal(assets), generation)
    big = kata.vm_config(minimal(assets, default_vcpus=4, default_memory=8192), generation)
    assert small != big
    assert kata.reset_for_compare(small) == kata.reset_for_compare(big)
    other = kata.vm_config(minimal(assets, machine_type="microvm"), generation)
    assert kata.reset_for_compare(small) != kata.reset_for_compare(other)
