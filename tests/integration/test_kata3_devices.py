"""A Kata 3.x file on real QEMU: the daemon boots the demo guest (guest_agent = "none",
no vsock on this host) with kata-containers 3.30.0's device model, the VM becomes ready,
and QEMU holds the devices Kata 3.x would give it.

The demo configuration carries no [proxy.*] or [shim.*] table, so it is detected as 3.x.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import config as cfg
from kata_vmcache.factory.spec import spec_from_config
from kata_vmcache.procs import cmdline
from kata_vmcache.vm.paths import VMPaths

from .harness import Daemon, qmp

pytestmark = pytest.mark.qemu


def with_qemu_keys(path: Path, keys: str) -> Path:
    """The demo configuration with more [hypervisor.qemu] keys."""
    path.write_text(path.read_text().replace("[hypervisor.qemu]\n",
                                             f"[hypervisor.qemu]\n{keys}\n", 1))
    return path


def expected_argv(config_path: Path, record: dict[str, Any]) -> list[str]:
    """The line machine.Kata3Line writes for this VM, from the same file."""
    config = cfg.load(config_path)[0]
    assert config.daemon.kata_version == "3.x"
    paths = VMPaths.for_vm(record["id"], vm_storage=config.daemon.vm_storage_path,
                           state_dir=config.daemon.state_dir)
    return spec_from_config(config, "tcg").argv(record["id"], record["uuid"], paths)


def peripherals(vm: dict[str, Any]) -> set[str]:
    """The ids of the devices QEMU holds (QOM /machine/peripheral), asked over the
    handed-out VM's own QMP socket."""
    (listing,) = qmp(Path(vm["hypervisor"]["QmpChannelpath"]),
                     ("qom-list", {"path": "/machine/peripheral"}))
    return {entry["name"] for entry in listing if entry["type"].startswith("child<")}


def test_3x_vm_boots_with_katas_3x_devices(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(1)
    (record,) = daemon.wait_ready(1)
    argv = cmdline(record["pid"])
    assert argv == expected_argv(daemon.config, record)
    assert "--no-reboot" in argv
    assert "selinux=1" in argv[argv.index("-append") + 1].split()
    assert not [a for a in argv if "romfile=" in a]

    vm = daemon.get()
    assert vm["id"] == record["id"]
    devices = peripherals(vm)
    # Kata 3.x's q35 devices (no vsock: no /dev/vhost-vsock here) and our serial ports'
    # chardevs; the RNG and the 9p device carry no id.
    assert {"pci-bridge-0", "serial0", "console0", "scsi0"} <= devices
    assert not [d for d in devices if d.startswith("vsock-")]
    (chardevs,) = qmp(Path(vm["hypervisor"]["QmpChannelpath"]), "query-chardev")
    assert {"charconsole0", "vmcserial0", "vmcguest"} <= {c["label"] for c in chardevs}


def test_3x_optional_devices_boot(make_config: Callable[..., Path], workdir: Path) -> None:
    """What a 3.x file may add (IOMMU, PCIe root ports, balloon, pvpanic, iothreads, the
    console on a legacy serial port, guest SELinux off): QEMU 7.2 takes the line and the
    demo guest comes up on it."""
    path = with_qemu_keys(make_config(1), f"""
enable_iommu = true
hot_plug_vfio = "root-port"
pcie_root_port = 2
reclaim_guest_freed_memory = true
guest_memory_dump_path = "{workdir}/dump"
enable_iothreads = true
indep_iothreads = 1
use_legacy_serial = true
disable_guest_selinux = true""")
    daemon = Daemon(path, workdir / "cache.sock", workdir / "state").start()
    try:
        (record,) = daemon.wait_ready(1)
        argv = cmdline(record["pid"])
        assert argv == expected_argv(path, record)
        params = argv[argv.index("-append") + 1].split()
        assert {"intel_iommu=on", "iommu=pt", "console=ttyS0", "selinux=0"} <= set(params)
        vm = daemon.get()
        devices = peripherals(vm)
        assert {"pci-bridge-0", "scsi0", "rp0", "rp1", "balloon0"} <= devices
        assert "serial0" not in devices  # the console is on ttyS0, not virtio-serial
    finally:
        daemon.stop()
