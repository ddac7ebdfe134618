"""What a VM is made of (`VMSpec`), and its QEMU command line through its generation's
line: `line1.Kata1Line` for Kata 1.x, `line3.Kata3Line` for Kata 3.x.

A VM from Kata's factory is more than a paused QEMU. kata-runtime takes it over and then
builds a sandbox through the devices it expects to find: PCI bridges to hot-plug onto, the
virtio-serial console, the SCSI controller, the RNG, the agent's channel (a virtio-serial
port `agent.channel.0` on `kata.sock`, or a vhost-vsock device), the shared directory
(9p tag `kataShared`, or virtio-fs). `VMSpec` holds what decides those devices, resolved
from the file the way Kata's loader resolves it (factory/spec.py `spec_from_config`);
`VMSpec.argv()` has the line of the spec's generation write them in the syntax the
installed QEMU accepts:

    spec.argv(vm_id, uuid, paths)     # Kata1Line(spec).argv(...) when generation is "1.x",
                                      # Kata3Line(spec).argv(...) when it is "3.x"

Two VMs with equal specs are interchangeable: that is what the pool matches a request's
configuration against. Where the names both lines use live: devices.py; where a VM's
files live: paths.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..kata import Generation, defaults
from .line1 import Kata1Line
from .line3 import Kata3Line
from .paths import VMPaths

#: The accelerator a VM runs with, resolved (config's AcceleratorSetting may say "auto").
Accelerator = Literal["kvm", "tcg"]
#: Kata's templating: plain RAM, the template's shared file, or a clone's private map of it.
MemoryBackend = Literal["ram", "template", "clone"]


class QemuLine(Protocol):
    """A generation's QEMU command line for one spec (Kata1Line, Kata3Line)."""

    def kernel_command_line(self) -> str: ...

    def argv(self, vm_id: str, uuid: str, paths: VMPaths, *, memory: MemoryBackend,
             memory_path: Path | None, cid: int | None, incoming: bool) -> list[str]: ...


@dataclass(frozen=True)
class VMSpec:
    """What a VM is made of. Two VMs with equal specs are interchangeable."""

    qemu: Path
    kernel: Path
    initrd: Path | None
    image: Path | None
    machine_type: str
    #: The user's kernel_params, as Kata splits them (its `KernelParams`, which also hold
    #: the systemd, SCSI-scan and agent parameters its loader adds), in Kata's order.
    kernel_params: tuple[str, ...]
    vcpus: int
    max_vcpus: int
    memory_mib: int
    memory_slots: int
    max_memory_mib: int
    accelerator: Accelerator
    generation: Generation = "1.x"
    #: DefaultBridges: PCI bridges for hot-plug (pc and q35 only).
    bridges: int = defaults.DEFAULT_BRIDGES
    #: Legacy virtio (`disable-modern=true`): the host is a VM and nesting checks are on.
    nested: bool = False
    entropy_source: str = defaults.DEFAULT_ENTROPY_SOURCE
    block_device_driver: str = defaults.DEFAULT_BLOCK_DEVICE_DRIVER
    machine_accelerators: str = ""
    cpu_features: str = ""
    disable_image_nvdimm: bool = False
    #: How the agent is reached: "serial" (virtio-serial port on kata.sock), "vsock"
    #: (vhost-vsock-pci with a CID of ours), or "" (no agent channel at all).
    agent_channel: Literal["serial", "vsock", ""] = "serial"
    #: Whether `agent.use_vsock=` says true (Kata's UseVSock, from the file).
    use_vsock: bool = False
    #: Kata's `enable_debug`: `debug` instead of `quiet` on the kernel command line.
    debug: bool = False
    #: pcie_root_port: PCIe root ports for hot-plug on q35 (and in the hand-off State).
    pcie_root_port: int = 0
    #: hotplug_vfio_on_root_bus: only carried to the receiver in the hand-off State.
    hotplug_vfio_on_root_bus: bool = False
    #: Our own ISA serial ports (console, then the ready-line channel) for guests that
    #: cannot use Kata's virtio devices, such as the demo guest.
    own_serial: bool = False
    #: shared_fs: "virtio-9p" (a 9p device on the share directory), "virtio-fs" (a
    #: vhost-user-fs device on a virtiofsd's socket), "none" (3.x: no device).
    shared_fs: str = defaults.DEFAULT_SHARED_FS
    #: virtio_fs_cache_size (MiB; 0: no DAX window) and, 3.x only, virtio_fs_queue_size.
    virtio_fs_cache_size: int = 0
    virtio_fs_queue_size: int = 0
    #: Where the guest RAM is a shared file (qemu.go setupFileBackedMem: file_mem_backend,
    #: else /dev/shm for virtio-fs), when that directory exists; None: plain RAM.
    file_mem_backend: Path | None = None
    # ---- read by Kata 3.x's model only (kata-containers 3.30.0); 1.x ignores them ----
    #: disable_guest_selinux: `selinux=0`, else `selinux=1` (qemu.go kernelParameters).
    disable_guest_selinux: bool = False
    #: enable_iommu: an intel-iommu device, `kernel_irqchip=split`, `intel_iommu=on iommu=pt`.
    iommu: bool = False
    #: use_legacy_serial: the console on an ISA serial port (ttyS0), not virtio-serial.
    legacy_serial: bool = False
    #: hot_plug_vfio / cold_plug_vfio ("no-port", "bridge-port", "root-port", "switch-port"):
    #: which PCIe ports a q35 VM gets (qemu.go createPCIeTopology).
    hot_plug_vfio: str = defaults.DEFAULT_VFIO_PORT_3X
    cold_plug_vfio: str = defaults.DEFAULT_VFIO_PORT_3X
    #: pcie_switch_port: downstream ports of the PCIe switch (with "switch-port").
    pcie_switch_port: int = 0
    #: default_maxmemory (Kata's DefaultMaxMemorySize) is `max_memory_mib`; this is
    #: memory_offset, which 3.x adds to maxmem with 1024 MiB for the NVDIMM.
    memory_offset_mib: int = 0
    #: rootfs_type and kernel_verity_params: the root= parameters of an image.
    rootfs_type: str = defaults.DEFAULT_ROOTFS_TYPE_3X
    kernel_verity_params: str = ""
    #: enable_mem_prealloc, enable_hugepages, enable_vhost_user_store: memory knobs.
    mem_prealloc: bool = False
    hugepages: bool = False
    vhost_user_store: bool = False
    #: guest_memory_dump_path set: a pvpanic device (IfPVPanicEnabled).
    pvpanic: bool = False
    #: reclaim_guest_freed_memory: a virtio-balloon device with free page reporting.
    balloon: bool = False
    #: enable_iothreads (an iothread for the SCSI controller) and indep_iothreads.
    iothreads: bool = False
    indep_iothreads: int = 0
    #: seccompsandbox: QEMU's `-sandbox` value.
    seccomp_sandbox: str = ""
    #: firmware (`-bios`) and pflashes (`-pflash`).
    firmware: Path | None = None
    pflash: tuple[str, ...] = ()
    #: extra_monitor_socket ("qmp", "qmp-pretty", "hmp"), opened only with enable_debug.
    extra_monitor: str = ""

    @property
    def nvdimm_image(self) -> bool:
        """The image goes on an NVDIMM (Kata: image set, no initrd, NVDIMM not disabled)."""
        return (self.image is not None and self.initrd is None
                and not self.disable_image_nvdimm and self.machine_type != "microvm")

    @property
    def bridge_ids(self) -> list[str]:
        """Kata's genericBridges: PCI bridges on pc and q35 only, named pci-bridge-N."""
        if self.machine_type not in ("pc", "q35", "virt"):
            return []
        return [f"pci-bridge-{i}" for i in range(self.bridges)]

    def line(self) -> QemuLine:
        """The command line of this spec's generation. Kata 3.x's refuses here, with
        ValueError, a spec Kata 3.x itself would refuse."""
        return _LINES[self.generation](self)

    def kernel_command_line(self) -> str:
        """qemu.go kernelParameters() of the spec's generation: the arch's parameters,
        debug or quiet, panic, nr_cpus, ..., then the file's parameters (the kernel
        honours the last value)."""
        return self.line().kernel_command_line()

    def argv(self, vm_id: str, uuid: str, paths: VMPaths, *, memory: MemoryBackend = "ram",
             memory_path: Path | None = None, cid: int | None = None,
             incoming: bool = False) -> list[str]:
        """The QEMU command line, in the order Kata's createSandbox and the agent's
        configure() add devices. `memory` is Kata's templating: "template" boots the VM
        whose RAM is the shared file at `memory_path` (BootToBeTemplate), "clone" maps it
        private and waits for its device state (BootFromTemplate: `-incoming defer`, also
        forced by `incoming`)."""
        return self.line().argv(vm_id, uuid, paths, memory=memory, memory_path=memory_path,
                                cid=cid, incoming=incoming)


_LINES: dict[Generation, Callable[[VMSpec], QemuLine]] = {"1.x": Kata1Line, "3.x": Kata3Line}
