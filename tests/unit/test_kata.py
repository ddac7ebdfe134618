"""Kata's VMConfig JSON: every field as Kata's loader derives it from configuration.toml.

Kata compares our `Config` reply with its own VMConfig field by field, so these tests pin
whole objects rather than a few keys: a dropped key or a drifted default must fail here, not
as a silent fallback on a production host. Host facts (CPU count, memory, vsock) are pinned
so the expected values are exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import kata

HOST_CPUS = 8
HOST_MEMORY_MIB = 16384
MAX_QEMU_VCPUS = 240


@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kata, "_go_num_cpu", lambda: HOST_CPUS)
    monkeypatch.setattr(kata, "_host_cpus_3x", lambda: HOST_CPUS)
    monkeypatch.setattr(kata, "_max_qemu_vcpus", lambda: MAX_QEMU_VCPUS)
    monkeypatch.setattr(kata, "_host_memory_mib", lambda: HOST_MEMORY_MIB)
    monkeypatch.setattr(kata, "_host_supports_vsock", lambda: False)


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


#: Every key of the HypervisorConfig we emit: Kata 1.x's fields, then 2.x/3.x's.
EXPECTED_KEYS = {
    # 1.x (kata-containers/runtime virtcontainers/hypervisor.go)
    "NumVCPUs", "DefaultMaxVCPUs", "MemorySize", "DefaultBridges", "Msize9p", "MemSlots",
    "MemOffset", "VirtioFSCacheSize", "KernelParams", "HypervisorParams", "KernelPath",
    "ImagePath", "InitrdPath", "FirmwarePath", "MachineAccelerators", "CPUFeatures",
    "HypervisorPath", "HypervisorCtlPath", "JailerPath", "BlockDeviceDriver",
    "HypervisorMachineType", "MemoryPath", "DevicesStatePath", "EntropySource", "SharedFS",
    "VirtioFSDaemon", "VirtioFSCache", "VirtioFSExtraArgs", "FileBackedMemRootDir",
    "BlockDeviceCacheSet", "BlockDeviceCacheDirect", "BlockDeviceCacheNoflush",
    "DisableBlockDeviceUse", "EnableIOThreads", "Debug", "MemPrealloc", "HugePages",
    "VirtioMem", "IOMMU", "IOMMUPlatform", "Realtime", "Mlock", "DisableNestingChecks",
    "UseVSock", "DisableImageNvdimm", "HotplugVFIOOnRootBus", "PCIeRootPort",
    "BootToBeTemplate", "BootFromTemplate", "DisableVhostNet", "EnableVhostUserStore",
    "VhostUserStorePath", "GuestHookPath", "VMid", "SELinuxProcessLabel",
    # 2.x/3.x only (kata-containers/kata-containers src/runtime/virtcontainers/hypervisor.go)
    "NumVCPUsF", "Groups", "RootfsType", "FirmwareVolumePath", "SharedPath",
    "VhostUserDeviceReconnect", "GuestMemoryDumpPath", "VMStorePath", "RunStorePath",
    "HypervisorPathList", "HypervisorCtlPathList", "JailerPathList", "EntropySourceList",
    "VirtioFSDaemonList", "EnableAnnotations", "FileBackedMemRootList", "PFlash",
    "VhostUserStorePathList", "SeccompSandbox", "BlockDeviceAIO", "RemoteHypervisorSocket",
    "SandboxName", "SandboxNamespace", "User", "SGXEPCSize", "DiskRateLimiterBwMaxRate",
    "DiskRateLimiterBwOneTimeBurst", "DiskRateLimiterOpsMaxRate",
    "DiskRateLimiterOpsOneTimeBurst", "RxRateLimiterMaxRate", "TxRateLimiterMaxRate",
    "NetRateLimiterBwMaxRate", "NetRateLimiterBwOneTimeBurst", "NetRateLimiterOpsMaxRate",
    "NetRateLimiterOpsOneTimeBurst", "VFIODevices", "VhostUserBlkDevices", "HotPlugVFIO",
    "ColdPlugVFIO", "PCIeSwitchPort", "DefaultMaxMemorySize", "VirtioFSQueueSize", "Uid",
    "Gid", "RemoteHypervisorTimeout", "HypervisorLoglevel", "GuestMemoryDumpPaging",
    "ConfidentialGuest", "SevSnpGuest", "GuestSwap", "Rootless", "DisableSeccomp",
    "DisableSeLinux", "DisableGuestSeLinux", "LegacySerial", "ExtraMonitorSocket", "QgsPort",
    "Initdata", "DefaultGPUs", "DefaultGPUModel",
}

AGENT_KEYS = {
    "LongLiveConn", "UseVSock", "Debug", "Trace", "ContainerPipeSize", "TraceMode", "TraceType",
    "KernelModules", "EnableDebugConsole", "DialTimeout", "CdhApiTimeout", "Policy",
}


def test_key_set_is_complete(assets: dict[str, str]) -> None:
    assert set(kata.hypervisor_config(minimal(assets))) == EXPECTED_KEYS
    assert set(kata.agent_config({})) == AGENT_KEYS
    assert set(kata.agent_config({"agent": {"kata": {}}})) == AGENT_KEYS


def test_keys_are_unique_for_go_case_insensitive_matching(assets: dict[str, str]) -> None:
    # encoding/json matches keys case-insensitively: two keys differing only in case would
    # land in the same Go field.
    keys = list(kata.hypervisor_config(minimal(assets)))
    assert len({k.lower() for k in keys}) == len(keys)


def test_minimal_config_gets_every_kata_default(assets: dict[str, str]) -> None:
    assert kata.hypervisor_config(minimal(assets)) == {
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
        "NumVCPUsF": 1.0,
        "Groups": None,
        "RootfsType": "ext4",
        "FirmwareVolumePath": "",
        "SharedPath": "",
        "VhostUserDeviceReconnect": 0,
        "GuestMemoryDumpPath": "",
        "VMStorePath": "",
        "RunStorePath": "",
        "HypervisorPathList": None,
        "HypervisorCtlPathList": None,
        "JailerPathList": None,
        "EntropySourceList": None,
        "VirtioFSDaemonList": None,
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
        "VFIODevices": None,
        "VhostUserBlkDevices": None,
        "HotPlugVFIO": "no-port",
        "ColdPlugVFIO": "no-port",
        "PCIeSwitchPort": 0,
        "DefaultMaxMemorySize": HOST_MEMORY_MIB,
        "VirtioFSQueueSize": 0,
        "Uid": 0,
        "Gid": 0,
        "RemoteHypervisorTimeout": 0,
        "HypervisorLoglevel": 0,
        "GuestMemoryDumpPaging": False,
        "ConfidentialGuest": False,
        "SevSnpGuest": False,
        "GuestSwap": False,
        "Rootless": False,
        "DisableSeccomp": False,
        "DisableSeLinux": False,
        "DisableGuestSeLinux": False,
        "LegacySerial": False,
        "ExtraMonitorSocket": "",
        "QgsPort": 4050,
        "Initdata": "",
        "DefaultGPUs": 0,
        "DefaultGPUModel": "",
    }


def test_defaults_for_paths_kata_fills_in() -> None:
    # Neither path nor kernel set: Kata's compiled-in defaults (unresolved when missing).
    hc = kata.hypervisor_config({"hypervisor": {"qemu": {}}})
    assert hc["HypervisorPath"] == "/usr/bin/qemu-lite-system-x86_64"
    assert hc["KernelPath"] == "/usr/share/kata-containers/vmlinuz.container"
    # Even with no [hypervisor.qemu] table at all the loader's defaults come out.
    assert kata.hypervisor_config({})["MemSlots"] == 10


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
    ))
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
    assert hc["HypervisorLoglevel"] == 3
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
    assert kata.hypervisor_config(doc)["KernelParams"] == [
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
    assert kata.hypervisor_config(doc)["KernelParams"] == [
        {"Key": "scsi_mod.scan", "Value": "none"}]


@pytest.mark.parametrize(("requested", "expected"), [
    (None, 1), (0, 1), (2, 2), (HOST_CPUS, HOST_CPUS), (HOST_CPUS + 1, HOST_CPUS),
    (-1, HOST_CPUS),
])
def test_num_vcpus_and_num_vcpus_f_agree(assets: dict[str, str], requested: int | None,
                                          expected: int) -> None:
    doc = minimal(assets) if requested is None else minimal(assets, default_vcpus=requested)
    hc = kata.hypervisor_config(doc)
    assert hc["NumVCPUs"] == expected
    assert hc["NumVCPUsF"] == float(expected)
    assert isinstance(hc["NumVCPUs"], int)
    assert isinstance(hc["NumVCPUsF"], float)


@pytest.mark.parametrize(("requested", "expected"), [
    (0, HOST_CPUS), (1, 1), (HOST_CPUS - 1, HOST_CPUS - 1), (HOST_CPUS, HOST_CPUS),
    (1000, HOST_CPUS),
])
def test_max_vcpus_follow_the_host(assets: dict[str, str], requested: int,
                                   expected: int) -> None:
    hc = kata.hypervisor_config(minimal(assets, default_maxvcpus=requested))
    assert hc["DefaultMaxVCPUs"] == expected


def test_max_vcpus_never_exceed_what_qemu_supports(assets: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kata, "_go_num_cpu", lambda: 512)
    assert kata.hypervisor_config(minimal(assets))["DefaultMaxVCPUs"] == MAX_QEMU_VCPUS


@pytest.mark.parametrize(("requested", "expected"), [
    (0, 2048), (128, 2048), (255, 2048), (256, 256), (1024, 1024),
])
def test_memory_below_kata_minimum_falls_back_to_default(assets: dict[str, str],
                                                         requested: int,
                                                         expected: int) -> None:
    assert kata.hypervisor_config(minimal(assets, default_memory=requested))["MemorySize"] \
        == expected


def test_clamps_and_overrides(assets: dict[str, str]) -> None:
    hc = kata.hypervisor_config(minimal(assets, default_bridges=9, machine_type="microvm",
                                        pcie_switch_port=99, default_maxmemory=10 ** 9))
    assert hc["DefaultBridges"] == 5
    assert hc["DisableImageNvdimm"] is True  # microvm has no NVDIMM
    assert hc["PCIeSwitchPort"] == 16
    assert hc["DefaultMaxMemorySize"] == HOST_MEMORY_MIB


def test_paths_are_resolved_like_kata_resolvepath(assets: dict[str, str],
                                                  tmp_path: Path) -> None:
    link = tmp_path / "kernel-link"
    os.symlink(assets["vmlinuz"], link)
    missing = str(tmp_path / "no-such-initrd")
    hc = kata.hypervisor_config(minimal(assets, kernel=str(link), initrd=missing))
    assert hc["KernelPath"] == os.path.realpath(assets["vmlinuz"])
    assert hc["InitrdPath"] == missing  # left for the config validator to report


def test_vsock_needs_both_the_setting_and_the_host(assets: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    doc = minimal(assets, use_vsock=True)
    doc["agent"] = {"kata": {}}
    assert kata.hypervisor_config(doc)["UseVSock"] is False
    assert kata.vm_config(doc)["ProxyType"] == "kataProxy"

    monkeypatch.setattr(kata, "_host_supports_vsock", lambda: True)
    doc["runtime"] = {"enable_debug": True}
    vc = kata.vm_config(doc)
    assert vc["HypervisorConfig"]["UseVSock"] is True
    assert vc["AgentConfig"]["UseVSock"] is True
    assert vc["ProxyType"] == "noProxy"
    assert vc["ProxyConfig"] == {"Path": "", "Debug": True}


def test_proxy_table_sets_proxy_config(assets: dict[str, str]) -> None:
    doc = minimal(assets)
    doc["proxy"] = {"kata": {"path": assets["qemu"], "enable_debug": True}}
    vc = kata.vm_config(doc)
    assert vc["ProxyType"] == "kataProxy"
    assert vc["ProxyConfig"] == {"Path": assets["qemu"], "Debug": True}


def test_agent_config_without_agent_table_is_kata_zero_value() -> None:
    assert kata.agent_config({"hypervisor": {"qemu": {"use_vsock": True}}}) == {
        "LongLiveConn": False, "UseVSock": False, "Debug": False, "Trace": False,
        "ContainerPipeSize": 0, "TraceMode": "", "TraceType": "", "KernelModules": None,
        "EnableDebugConsole": False, "DialTimeout": 0, "CdhApiTimeout": 0, "Policy": "",
    }


def test_agent_config_from_agent_kata() -> None:
    doc = {"agent": {"kata": {
        "enable_debug": True, "enable_tracing": True, "trace_mode": "static",
        "trace_type": "collated", "kernel_modules": ["e1000e InterruptThrottleRate=3000"],
        "debug_console_enabled": True, "dial_timeout": 45,
    }}}
    assert kata.agent_config(doc) == {
        "LongLiveConn": False, "UseVSock": False, "Debug": True, "Trace": True,
        "ContainerPipeSize": 0, "TraceMode": "static", "TraceType": "collated",
        "KernelModules": ["e1000e InterruptThrottleRate=3000"],
        "EnableDebugConsole": True, "DialTimeout": 45, "CdhApiTimeout": 0, "Policy": "",
    }


def test_kernel_modules_absent_and_empty_differ() -> None:
    # Kata 1.x compares AgentConfig with reflect.DeepEqual: nil and [] are not equal there.
    assert kata.agent_config({"agent": {"kata": {}}})["KernelModules"] is None
    assert kata.agent_config({"agent": {"kata": {"kernel_modules": []}}})["KernelModules"] == []


def test_vm_config_shape_and_json_round_trip(assets: dict[str, str]) -> None:
    doc = minimal(assets)
    doc["agent"] = {"kata": {"enable_debug": True}}
    vc = kata.vm_config(doc)
    assert list(vc) == ["HypervisorType", "HypervisorConfig", "AgentType", "AgentConfig",
                        "ProxyType", "ProxyConfig"]
    assert vc["HypervisorType"] == "qemu"
    assert vc["AgentType"] == "kata"
    assert vc["AgentConfig"] == kata.agent_config(doc)
    assert vc["HypervisorConfig"] == kata.hypervisor_config(doc)
    assert vc["ProxyConfig"] == {"Path": "", "Debug": False}
    wire = json.dumps(vc, separators=(",", ":"))
    assert json.loads(wire) == vc


def test_only_qemu_is_supported() -> None:
    with pytest.raises(ValueError, match="qemu"):
        kata.hypervisor_config({}, hypervisor="firecracker")


RESET_FIELDS = {
    "NumVCPUs": 0, "NumVCPUsF": 0.0, "MemorySize": 0, "BootToBeTemplate": False,
    "BootFromTemplate": False, "MemoryPath": "", "DevicesStatePath": "", "SharedPath": "",
    "VMStorePath": "", "RunStorePath": "",
}


def test_reset_for_compare_zeroes_exactly_the_reset_fields(assets: dict[str, str]) -> None:
    doc = minimal(assets, default_vcpus=2, default_memory=4096)
    doc["proxy"] = {"kata": {"path": assets["qemu"], "enable_debug": True}}
    vc = kata.vm_config(doc)
    # Give every reset field a non-zero value so that zeroing is visible.
    vc["HypervisorConfig"].update(BootToBeTemplate=True, MemoryPath="/run/mem",
                                  DevicesStatePath="/run/state", SharedPath="/run/shared",
                                  VMStorePath="/run/vm", RunStorePath="/run/run",
                                  BootFromTemplate=True)
    before = json.loads(json.dumps(vc))

    reset = kata.reset_for_compare(vc)

    assert json.loads(json.dumps(vc)) == before  # input untouched
    hc, hc_before = reset["HypervisorConfig"], before["HypervisorConfig"]
    assert set(hc) == set(hc_before)
    changed = {k for k in hc if hc[k] != hc_before[k]}
    assert changed == set(RESET_FIELDS)
    assert {k: hc[k] for k in RESET_FIELDS} == RESET_FIELDS
    # Kata 1.x also resets ProxyConfig; nothing else outside HypervisorConfig changes.
    assert reset["ProxyConfig"] == {"Path": "", "Debug": False}
    assert {k: v for k, v in reset.items() if k not in ("HypervisorConfig", "ProxyConfig")} \
        == {k: v for k, v in before.items() if k not in ("HypervisorConfig", "ProxyConfig")}


def test_reset_makes_different_sizes_compare_equal(assets: dict[str, str]) -> None:
    small = kata.vm_config(minimal(assets))
    big = kata.vm_config(minimal(assets, default_vcpus=4, default_memory=8192))
    assert small != big
    assert kata.reset_for_compare(small) == kata.reset_for_compare(big)
    other = kata.vm_config(minimal(assets, machine_type="q35"))
    assert kata.reset_for_compare(small) != kata.reset_for_compare(other)
