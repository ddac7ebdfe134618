"""The VMSpecs the machine tests build command lines from, shared by the tests and by the
golden file of Kata 1.x's command lines (tests/data/machine/argv-1x.json).

Paths are fixed strings (the command line is pure logic) except the image, whose size goes
on the command line: it is written under a temporary directory, shown as `<tmp>` in the
golden file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from kata_vmcache.vm.paths import VMPaths
from kata_vmcache.vm.spec import VMSpec

VM_ID = "0123456789ab"
UUID = "4d0f6a3e-8f5b-4c1e-9d1a-2b3c4d5e6f70"
IMAGE_BYTES = 8 * 1024 * 1024
TMP = "<tmp>"


def paths() -> VMPaths:
    return VMPaths.for_vm(VM_ID, vm_storage=Path("/run/vc/vm"),
                          state_dir=Path("/run/kata-vmcache"))


def base(**changes: Any) -> VMSpec:
    """The demo configuration, as the issue's reference line was captured from (KVM)."""
    spec = VMSpec(
        qemu=Path("/usr/bin/qemu-system-x86_64"), kernel=Path("/srv/kata/vmlinuz"),
        initrd=Path("/srv/kata/initrd.img"), image=None, machine_type="q35",
        kernel_params=("scsi_mod.scan=none", "console=ttyS0", "quiet", "panic=-1"),
        vcpus=1, max_vcpus=2, memory_mib=256, memory_slots=4, max_memory_mib=25129,
        accelerator="kvm")
    return dataclasses.replace(spec, **changes)


def image(tmp: Path) -> Path:
    path = tmp / "rootfs.img"
    if not path.exists():
        path.write_bytes(b"\0" * IMAGE_BYTES)
    return path


#: name -> (VMSpec changes, argv() keyword arguments); "image" in the changes is replaced
#: by the image file.
CASES_1X: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "reference": ({}, {}),
    "tcg-demo": ({"accelerator": "tcg", "agent_channel": "serial", "own_serial": True}, {}),
    "pc": ({"machine_type": "pc"}, {}),
    "image-nvdimm": ({"initrd": None, "image": "image"}, {}),
    "image-virtio-blk": ({"initrd": None, "image": "image", "disable_image_nvdimm": True}, {}),
    "nested": ({"nested": True}, {}),
    "vsock": ({"agent_channel": "vsock", "use_vsock": True}, {"cid": 1234}),
    "no-channel": ({"agent_channel": ""}, {}),
    "debug": ({"debug": True, "initrd": None, "image": "image"}, {}),
    "template": ({}, {"memory": "template", "memory_path": Path("/run/vc/vm/template/memory")}),
    "clone": ({}, {"memory": "clone", "memory_path": Path("/run/vc/vm/template/memory")}),
    "incoming": ({}, {"incoming": True}),
    "pcie-root-ports": ({"pcie_root_port": 2}, {}),
    "virtio-blk-driver": ({"block_device_driver": "virtio-blk"}, {}),
    "accelerators": ({"machine_accelerators": "usb=off", "cpu_features": "pmu=off",
                      "entropy_source": "/dev/random", "bridges": 2}, {}),
    "microvm": ({"machine_type": "microvm", "bridges": 0}, {}),
}


def build(changes: dict[str, Any], kwargs: dict[str, Any], tmp: Path,
          generation: str = "1.x") -> list[str]:
    changes = dict(changes)
    if changes.get("image") == "image":
        changes["image"] = image(tmp)
    spec = base(generation=generation, **changes)
    return spec.argv(VM_ID, UUID, paths(), **kwargs)


def masked(argv: list[str], tmp: Path) -> list[str]:
    return [arg.replace(str(tmp), TMP) for arg in argv]
