"""Kata 1.x's QEMU command line for a factory VM (`generation = "1.x"`): the devices,
kernel parameters and options kata-runtime 1.x's qemu driver gives a VM it builds from the
same configuration file, as `Kata1Line`. line3.py is its 3.x counterpart; `VMSpec.argv()`
picks one by the spec's generation.

The line is pinned byte for byte by tests/data/machine/argv-1x.json (written before the
3.x model existed): a change here that moves one character of it is a change of behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .devices import (
    AGENT_CHANNEL_NAME,
    AGENT_PORT_ID,
    BRIDGE_START_ADDR,
    SHARED_TAG,
    TEMPLATING_REFUSED,
    opt_value,
    vhost_user_fs,
)
from .paths import VMPaths, qemu_name

if TYPE_CHECKING:
    from .spec import MemoryBackend, VMSpec

#: qemu_amd64.go kernelParams (1.x), in Kata's order.
_AMD64_PARAMS_1X = (
    "tsc=reliable", "no_timer_check", "rcupdate.rcu_expedited=1", "i8042.direct=1",
    "i8042.dumbkbd=1", "i8042.nopnp=1", "i8042.noaux=1", "noreplace-smp", "reboot=k",
    "console=hvc0", "console=hvc1", "cryptomgr.notests", "net.ifnames=0", "pci=lastbus=0",
)
#: hypervisor.go: the root of an image, on an NVDIMM (DAX) or on virtio-blk.
_NVDIMM_ROOT = ("root=/dev/pmem0p1", "rootflags=dax,data=ordered,errors=remount-ro ro",
                "rootfstype=ext4")
_VIRTIO_BLK_ROOT = ("root=/dev/vda1", "rootflags=data=ordered,errors=remount-ro ro",
                    "rootfstype=ext4")


class Kata1Line:
    """Kata 1.x's QEMU command line for a factory VM, as kata-containers/runtime writes it.

    Followed (kata-containers/runtime, tag 1.13.0-alpha0, the version whose factory the
    issue captured): virtcontainers/qemu.go (`createSandbox`, `kernelParameters`,
    `buildDevices`, `setupTemplate`, `getSandboxConsole`, `qmpSocketPath`),
    qemu_arch_base.go (`appendBridges`, `appendConsole`, `appendSCSIController`,
    `append9PVolume`, `appendSocket`, `appendVSock`, `appendRNGDevice`,
    `appendNvdimmImage`, `handleImagePath`, `cpuTopology`), qemu_amd64.go (`kernelParams`,
    `supportedQemuMachines`, `cpuModel`, `genericBridges`, `genericMemoryTopology`),
    kata_agent.go (`configure`: the agent's channel, then the shared directory),
    hypervisor.go (`generateVMSocket`, the root parameters) and govmm's qemu.go (the
    option syntax).

    Where we differ from the line Kata writes, on purpose (each is also said at its place):

    - QEMU 7.2's syntax: `server=on,wait=off` for `server,nowait`, `kernel_irqchip=on`
      (a bare `kernel_irqchip` is refused), `nvdimm=on`.
    - TCG (no working KVM here): `accel=tcg`, no `kernel_irqchip`, `-cpu max` for `host`.
    - `-S` instead of `-daemonize`: QEMU runs as our child in a session of its own (the
      same detachment `-daemonize` gives) so that its exit is seen at once through a
      pidfd, and its CPUs wait until the readiness probe is attached, so no early signal
      of the guest is lost.
    - One `iommu=off`: Kata 1.x appends it to a package-level slice each time it builds a
      VM, so its line carries it once per VM built in that process (the kernel reads the
      last).
    - Devices of ours for guests that cannot use Kata's (the demo guest's serial ports),
      after Kata's, only when the serial readiness probe is used.
    """

    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec

    def kernel_command_line(self) -> str:
        """qemu.go kernelParameters(): arch defaults, debug or quiet, panic, nr_cpus,
        agent.use_vsock, then the file's parameters (the kernel honours the last value)."""
        s = self.spec
        params = list(_AMD64_PARAMS_1X)
        params.append("iommu=off")  # newQemuArch, without enable_iommu
        if s.image is not None:  # handleImagePath
            params += _NVDIMM_ROOT if s.nvdimm_image else _VIRTIO_BLK_ROOT
        if s.debug:
            params += ["debug", *(("systemd.show_status=true", "systemd.log_level=debug")
                                  if s.image is not None else ())]
        else:
            params += ["quiet", *(("systemd.show_status=false",)
                                  if s.image is not None else ())]
        params += ["panic=1", f"nr_cpus={s.max_vcpus}",
                   f"agent.use_vsock={'true' if s.use_vsock else 'false'}"]
        params += s.kernel_params
        return " ".join(params)

    def argv(self, vm_id: str, uuid: str, paths: VMPaths, *, memory: MemoryBackend,
             memory_path: Path | None, cid: int | None, incoming: bool) -> list[str]:
        """The QEMU command line, in the order Kata's createSandbox and the agent's
        configure() add devices. `memory` is Kata's templating: "template" boots the VM
        whose RAM is the shared file at `memory_path` (BootToBeTemplate), "clone" maps it
        private and waits for its device state (BootFromTemplate: `-incoming defer`, also
        forced by `incoming`)."""
        s = self.spec
        legacy = s.nested
        args = [
            str(s.qemu),
            "-name", qemu_name(vm_id),
            "-uuid", uuid,
            "-machine", self._machine(),
            "-cpu", self._cpu(templated=memory != "ram"),
            "-qmp", f"unix:{opt_value(paths.qmp)},server=on,wait=off",
            "-m", f"{s.memory_mib}M,slots={s.memory_slots},"
                  f"maxmem={max(s.max_memory_mib, s.memory_mib)}M",
        ]
        devices: list[str] = []
        for addr, bridge in enumerate(s.bridge_ids, start=BRIDGE_START_ADDR):
            bus = "pcie.0" if s.machine_type == "q35" else "pci.0"
            devices += ["-device", f"pci-bridge,bus={bus},id={bridge},"
                                   f"chassis_nr={addr - BRIDGE_START_ADDR + 1},shpc=on,"
                                   f"addr={addr},romfile="]
        devices += [
            "-device", f"virtio-serial-pci,{_modern(legacy)}id=serial0,romfile=,max_ports=2",
            "-device", "virtconsole,chardev=charconsole0,id=console0",
            "-chardev", f"socket,id=charconsole0,path={opt_value(paths.console)},"
                        "server=on,wait=off",
        ]
        if s.image is not None and s.initrd is None:
            devices += self._image()
        if s.block_device_driver == "virtio-scsi":
            devices += ["-device", f"virtio-scsi-pci,id=scsi0,{_modern(legacy)}romfile="]
        devices += [
            "-object", f"rng-random,id=rng0,filename={opt_value(s.entropy_source)}",
            "-device", "virtio-rng-pci,rng=rng0,romfile=",
        ]
        if s.machine_type == "q35":  # genericAppendPCIeRootPort: q35 only
            devices += [arg for i in range(s.pcie_root_port)
                        for arg in ("-device", f"pcie-root-port,id=rp{i},bus=pcie.0,"
                                               f"chassis=0,slot={i},multifunction=off")]
        if s.agent_channel == "serial":
            devices += [
                "-device", f"virtserialport,chardev=charch0,id={AGENT_PORT_ID},"
                           f"name={AGENT_CHANNEL_NAME}",
                "-chardev", f"socket,id=charch0,path={opt_value(paths.agent)},"
                            "server=on,wait=off",
            ]
        elif s.agent_channel == "vsock":
            if cid is None:
                raise ValueError("a vsock agent channel needs a guest CID")
            devices += ["-device", f"vhost-vsock-pci,{_modern(legacy)}id=vsock-{cid},"
                                   f"guest-cid={cid},romfile="]
        if s.shared_fs == "virtio-fs":
            devices += vhost_user_fs(s, paths, uuid, pci=True)
        else:  # 1.x has no "none": sharing is always on
            tag = SHARED_TAG
            devices += [
                "-device", f"virtio-9p-pci,{_modern(legacy)}fsdev=extra-9p-{tag},"
                           f"mount_tag={tag},romfile=",
                "-fsdev", f"local,id=extra-9p-{tag},path={opt_value(paths.shared)},"
                          "security_model=none,multidevs=remap",
            ]
        args += devices
        args += [
            "-rtc", "base=utc,driftfix=slew,clock=host",
            "-global", "kvm-pit.lost_tick_policy=discard",
            "-vga", "none", "-no-user-config", "-nodefaults", "-nographic", "-no-reboot",
            "-object", self._memory_object(memory, memory_path),
            "-numa", "node,memdev=dimm1",
            "-kernel", str(s.kernel),
        ]
        if s.initrd is not None:
            args += ["-initrd", str(s.initrd)]
        args += [
            "-append", self.kernel_command_line(),
            "-pidfile", str(paths.pidfile),
            "-smp", f"{s.vcpus},cores=1,threads=1,sockets={s.max_vcpus},"
                    f"maxcpus={s.max_vcpus}",
        ]
        if s.own_serial:
            # After Kata's devices, so Kata's PCI addresses are what Kata's would be.
            args += [
                "-chardev", f"socket,id=vmcserial0,path={opt_value(paths.serial)},"
                            "server=on,wait=off",
                "-serial", "chardev:vmcserial0",
                "-chardev", f"socket,id=vmcguest,path={opt_value(paths.guest)},"
                            "server=on,wait=off",
                "-serial", "chardev:vmcguest",
            ]
        if memory == "clone" or incoming:
            args += ["-incoming", "defer"]
        args.append("-S")
        return args

    def _machine(self) -> str:
        """qemu_amd64.go supportedQemuMachines: `accel=kvm,kernel_irqchip` (QEMU 7.2
        wants `kernel_irqchip=on`), `nvdimm` for an image on an NVDIMM, then the file's
        machine_accelerators (getQemuMachine)."""
        s = self.spec
        options = [s.machine_type]
        if s.accelerator == "kvm":
            options += ["accel=kvm", "kernel_irqchip=on"]
        else:
            options.append("accel=tcg")  # kernel_irqchip is a KVM property
        if s.nvdimm_image:
            options.append("nvdimm=on")
        if s.machine_accelerators:
            options.append(s.machine_accelerators)
        return ",".join(options)

    def _cpu(self, *, templated: bool) -> str:
        """qemu_amd64.go cpuModel() + "," + cpu_features: `host`, with `vmx=off` for a
        template and its clones (VMX state does not migrate). TCG has no `host` CPU."""
        s = self.spec
        model = "host" if s.accelerator == "kvm" else "max"
        if templated:
            model += ",vmx=off"
        return f"{model},{s.cpu_features}"

    def _image(self) -> list[str]:
        s = self.spec
        if s.nvdimm_image:
            assert s.image is not None
            size = s.image.stat().st_size
            return ["-device", "nvdimm,id=nv0,memdev=mem0",
                    "-object", f"memory-backend-file,id=mem0,mem-path={opt_value(s.image)},"
                               f"size={size}"]
        # genericImage + genericBlockDevice: read-only raw virtio-blk, shared for
        # read-write access by other QEMUs of the same image.
        return [
            "-device", f"virtio-blk-pci,{_modern(s.nested)}drive=image-0,romfile=,"
                       "share-rw=on",
            "-drive", f"id=image-0,file={opt_value(s.image)},aio=threads,format=raw,"
                      "if=none,readonly=on",
        ]

    def _memory_object(self, memory: MemoryBackend, path: Path | None) -> str:
        """govmm's memory knobs: RAM, a shared file (setupFileBackedMem: virtio-fs or
        file_mem_backend), or (templating) the template's file, shared by the template."""
        s = self.spec
        if memory == "ram" and s.file_mem_backend is not None:
            return (f"memory-backend-file,id=dimm1,size={s.memory_mib}M,"
                    f"mem-path={opt_value(s.file_mem_backend)},share=on")
        if memory == "ram":
            return f"memory-backend-ram,id=dimm1,size={s.memory_mib}M"
        if path is None:
            raise ValueError("templating needs the template's memory file")
        if s.file_mem_backend is not None or s.shared_fs == "virtio-fs":
            raise ValueError(TEMPLATING_REFUSED)
        share = ",share=on" if memory == "template" else ""
        return (f"memory-backend-file,id=dimm1,size={s.memory_mib}M,"
                f"mem-path={opt_value(path)}{share}")



def _modern(legacy: bool) -> str:
    """govmm's disable-modern option as 1.x writes it: only when legacy, before the
    device's other options."""
    return "disable-modern=true," if legacy else ""
