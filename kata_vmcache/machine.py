"""Kata's QEMU command line for a factory VM: the devices, kernel parameters and options
kata-runtime's qemu driver gives a VM it builds from the same configuration file.

A VM from Kata's factory is more than a paused QEMU. kata-runtime takes it over and then
builds a sandbox through the devices it expects to find: PCI bridges to hot-plug onto, the
virtio-serial console, the SCSI controller, the RNG, the agent's channel (a virtio-serial
port `agent.channel.0` on `kata.sock`, or a vhost-vsock device), the shared directory
(9p tag `kataShared`). `VMSpec` holds what decides those devices, resolved from the file
the way Kata's loader resolves it; `VMSpec.argv()` writes them in the syntax the installed
QEMU accepts.

Followed (kata-containers/runtime, tag 1.13.0-alpha0, the version whose factory the issue
captured): virtcontainers/qemu.go (`createSandbox`, `kernelParameters`, `buildDevices`,
`setupTemplate`, `getSandboxConsole`, `qmpSocketPath`), qemu_arch_base.go
(`appendBridges`, `appendConsole`, `appendSCSIController`, `append9PVolume`,
`appendSocket`, `appendVSock`, `appendRNGDevice`, `appendNvdimmImage`, `handleImagePath`,
`cpuTopology`), qemu_amd64.go (`kernelParams`, `supportedQemuMachines`, `cpuModel`,
`genericBridges`, `genericMemoryTopology`), kata_agent.go (`configure`: the agent's
channel, then the shared directory), hypervisor.go (`generateVMSocket`, the root
parameters) and govmm's qemu.go (the option syntax).

Where we differ from the line Kata writes, on purpose (each is also said at its place):

- QEMU 7.2's syntax: `server=on,wait=off` for `server,nowait`, `kernel_irqchip=on` (a
  bare `kernel_irqchip` is refused), `nvdimm=on`.
- TCG (no working KVM here): `accel=tcg`, no `kernel_irqchip`, `-cpu max` for `host`.
- `-S` instead of `-daemonize`: QEMU runs as our child in a session of its own (the same
  detachment `-daemonize` gives) so that its exit is seen at once through a pidfd, and its
  CPUs wait until the readiness probe is attached, so no early signal of the guest is lost.
- One `iommu=off`: Kata 1.x appends it to a package-level slice each time it builds a VM,
  so its line carries it once per VM built in that process (the kernel reads the last).
- Devices of ours for guests that cannot use Kata's (the demo guest's serial ports),
  after Kata's, only when the serial readiness probe is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Generation = Literal["1.x", "3.x"]
Accelerator = Literal["kvm", "tcg"]
MemoryBackend = Literal["ram", "template", "clone"]

#: kata_agent.go mountGuestTag; the 9p device's id is "extra-9p-" + the tag.
SHARED_TAG = "kataShared"
#: hypervisor.go defaultSocketChannelName / DeviceID / ID (the agent's serial channel).
AGENT_CHANNEL_NAME = "agent.channel.0"
#: hypervisor.go vSockPort: where the agent listens over vsock.
AGENT_VSOCK_PORT = 1024
#: qemu_arch_base.go bridgePCIStartAddr: slots 0 and 1 belong to the platform on x86.
BRIDGE_START_ADDR = 2
#: types.PCIBridgeMaxCapacity: the slots a receiver may hot-plug onto one bridge.
BRIDGE_CAPACITY = 30

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


def opt_value(value: object) -> str:
    """A value inside one of QEMU's `key=value,key=value` options: a comma is doubled, or
    a path such as `/srv/a,readonly=off` would smuggle in options of its own."""
    return str(value).replace(",", ",,")


def running_nested(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Kata's RunningOnVMM: the host is itself a VM (the `hypervisor` CPU flag). Kata then
    gives its virtio devices `disable-modern=true` (legacy virtio), unless the file says
    `disable_nesting_checks = true`."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "hypervisor" in line.split(":", 1)[-1].split()
               for line in text.splitlines())


@dataclass(frozen=True)
class VMPaths:
    """Where one VM's files live.

    `dir` is Kata's: `<vm_storage_path>/<id>`, named as kata-runtime names them, because
    it looks for them there (`NewVMFromGrpc`, `VM.assignSandbox` links a sandbox to this
    directory and to its `shared` subdirectory). Once a VM is handed out, this directory is
    the client's. `own` is the daemon's (`<state_dir>/vms/<id>`: record, QEMU log, the
    sockets of our own devices). `sandbox` is where Kata 1.x's kata-proxy listens
    (`<run storage path>/<id>/proxy.sock`, kata_proxy.go `defaultProxyURL`).
    """

    dir: Path
    own: Path
    sandbox: Path

    @classmethod
    def for_vm(cls, vm_id: str, *, vm_storage: Path, state_dir: Path) -> VMPaths:
        return cls(dir=vm_storage / vm_id, own=state_dir / "vms" / vm_id,
                   sandbox=sandbox_storage(vm_storage) / vm_id)

    # Kata's (qemu.go qmpSocket, consoleSocket; hypervisor.go defaultSocketName;
    # createSandbox PidFile; vm.go buildVMSharePath)
    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "kata.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "pid"

    @property
    def shared(self) -> Path:
        return self.dir / "shared"

    @property
    def proxy_socket(self) -> Path:
        return self.sandbox / "proxy.sock"

    # ours
    @property
    def log(self) -> Path:
        return self.own / "qemu.log"

    @property
    def record(self) -> Path:
        return self.own / "vm.json"

    @property
    def serial(self) -> Path:
        """ttyS0 of a guest that uses our serial ports (the demo guest's console)."""
        return self.own / "serial.sock"

    @property
    def guest(self) -> Path:
        """ttyS1 of a guest that uses our serial ports: its ready line and our channel."""
        return self.own / "guest.sock"

    @property
    def longest_socket(self) -> Path:
        return max((self.qmp, self.console, self.agent, self.proxy_socket, self.serial,
                    self.guest), key=lambda p: len(str(p)))


def sandbox_storage(vm_storage: Path) -> Path:
    """Kata keeps VMs in `<root>/vm` and sandboxes in `<root>/sbs` (persist/fs: root
    `/run/vc`); a moved VM storage path moves both."""
    return vm_storage.parent / "sbs"


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
    bridges: int = 1
    #: Legacy virtio (`disable-modern=true`): the host is a VM and nesting checks are on.
    nested: bool = False
    entropy_source: str = "/dev/urandom"
    block_device_driver: str = "virtio-scsi"
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

    def kernel_command_line(self) -> str:
        """qemu.go kernelParameters(): arch defaults, debug or quiet, panic, nr_cpus,
        agent.use_vsock, then the file's parameters (the kernel honours the last value)."""
        params = list(_AMD64_PARAMS_1X)
        params.append("iommu=off")  # newQemuArch, without enable_iommu
        if self.image is not None:  # handleImagePath
            params += _NVDIMM_ROOT if self.nvdimm_image else _VIRTIO_BLK_ROOT
        if self.debug:
            params += ["debug", *(("systemd.show_status=true", "systemd.log_level=debug")
                                  if self.image is not None else ())]
        else:
            params += ["quiet", *(("systemd.show_status=false",)
                                  if self.image is not None else ())]
        params += ["panic=1", f"nr_cpus={self.max_vcpus}",
                   f"agent.use_vsock={'true' if self.use_vsock else 'false'}"]
        params += self.kernel_params
        return " ".join(params)

    def argv(self, vm_id: str, uuid: str, paths: VMPaths, *, memory: MemoryBackend = "ram",
             memory_path: Path | None = None, cid: int | None = None,
             incoming: bool = False) -> list[str]:
        """The QEMU command line, in the order Kata's createSandbox and the agent's
        configure() add devices. `memory` is Kata's templating: "template" boots the VM
        whose RAM is the shared file at `memory_path` (BootToBeTemplate), "clone" maps it
        private and waits for its device state (BootFromTemplate: `-incoming defer`, also
        forced by `incoming`)."""
        legacy = self.nested
        args = [
            str(self.qemu),
            "-name", qemu_name(vm_id),
            "-uuid", uuid,
            "-machine", self._machine(),
            "-cpu", self._cpu(templated=memory != "ram"),
            "-qmp", f"unix:{opt_value(paths.qmp)},server=on,wait=off",
            "-m", f"{self.memory_mib}M,slots={self.memory_slots},"
                  f"maxmem={max(self.max_memory_mib, self.memory_mib)}M",
        ]
        devices: list[str] = []
        for addr, bridge in enumerate(self.bridge_ids, start=BRIDGE_START_ADDR):
            bus = "pcie.0" if self.machine_type == "q35" else "pci.0"
            devices += ["-device", f"pci-bridge,bus={bus},id={bridge},"
                                   f"chassis_nr={addr - BRIDGE_START_ADDR + 1},shpc=on,"
                                   f"addr={addr},romfile="]
        devices += [
            "-device", f"virtio-serial-pci,{_modern(legacy)}id=serial0,romfile=,max_ports=2",
            "-device", "virtconsole,chardev=charconsole0,id=console0",
            "-chardev", f"socket,id=charconsole0,path={opt_value(paths.console)},"
                        "server=on,wait=off",
        ]
        if self.image is not None and self.initrd is None:
            devices += self._image()
        if self.block_device_driver == "virtio-scsi":
            devices += ["-device", f"virtio-scsi-pci,id=scsi0,{_modern(legacy)}romfile="]
        devices += [
            "-object", f"rng-random,id=rng0,filename={opt_value(self.entropy_source)}",
            "-device", "virtio-rng-pci,rng=rng0,romfile=",
        ]
        if self.machine_type == "q35":  # genericAppendPCIeRootPort: q35 only
            devices += [arg for i in range(self.pcie_root_port)
                        for arg in ("-device", f"pcie-root-port,id=rp{i},bus=pcie.0,"
                                               f"chassis=0,slot={i},multifunction=off")]
        if self.agent_channel == "serial":
            devices += [
                "-device", f"virtserialport,chardev=charch0,id=channel0,"
                           f"name={AGENT_CHANNEL_NAME}",
                "-chardev", f"socket,id=charch0,path={opt_value(paths.agent)},"
                            "server=on,wait=off",
            ]
        elif self.agent_channel == "vsock":
            if cid is None:
                raise ValueError("a vsock agent channel needs a guest CID")
            devices += ["-device", f"vhost-vsock-pci,{_modern(legacy)}id=vsock-{cid},"
                                   f"guest-cid={cid},romfile="]
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
            "-kernel", str(self.kernel),
        ]
        if self.initrd is not None:
            args += ["-initrd", str(self.initrd)]
        args += [
            "-append", self.kernel_command_line(),
            "-pidfile", str(paths.pidfile),
            "-smp", f"{self.vcpus},cores=1,threads=1,sockets={self.max_vcpus},"
                    f"maxcpus={self.max_vcpus}",
        ]
        if self.own_serial:
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
        options = [self.machine_type]
        if self.accelerator == "kvm":
            options += ["accel=kvm", "kernel_irqchip=on"]
        else:
            options.append("accel=tcg")  # kernel_irqchip is a KVM property
        if self.nvdimm_image:
            options.append("nvdimm=on")
        if self.machine_accelerators:
            options.append(self.machine_accelerators)
        return ",".join(options)

    def _cpu(self, *, templated: bool) -> str:
        """qemu_amd64.go cpuModel() + "," + cpu_features: `host`, with `vmx=off` for a
        template and its clones (VMX state does not migrate). TCG has no `host` CPU."""
        model = "host" if self.accelerator == "kvm" else "max"
        if templated:
            model += ",vmx=off"
        return f"{model},{self.cpu_features}"

    def _image(self) -> list[str]:
        if self.nvdimm_image:
            assert self.image is not None
            size = self.image.stat().st_size
            return ["-device", "nvdimm,id=nv0,memdev=mem0",
                    "-object", f"memory-backend-file,id=mem0,mem-path={opt_value(self.image)},"
                               f"size={size}"]
        # genericImage + genericBlockDevice: read-only raw virtio-blk, shared for
        # read-write access by other QEMUs of the same image.
        return [
            "-device", f"virtio-blk-pci,{_modern(self.nested)}drive=image-0,romfile=,"
                       "share-rw=on",
            "-drive", f"id=image-0,file={opt_value(self.image)},aio=threads,format=raw,"
                      "if=none,readonly=on",
        ]

    def _memory_object(self, memory: MemoryBackend, path: Path | None) -> str:
        """govmm's memory knobs: RAM, or (templating) a file, shared for the template."""
        if memory == "ram":
            return f"memory-backend-ram,id=dimm1,size={self.memory_mib}M"
        if path is None:
            raise ValueError("templating needs the template's memory file")
        share = ",share=on" if memory == "template" else ""
        return (f"memory-backend-file,id=dimm1,size={self.memory_mib}M,"
                f"mem-path={opt_value(path)}{share}")


def _modern(legacy: bool) -> str:
    return "disable-modern=true," if legacy else ""


def qemu_name(vm_id: str) -> str:
    """The `-name` a VM's QEMU runs with, as Kata names it: how a pid is known to be that
    VM's QEMU."""
    return f"sandbox-{vm_id}"


#: What a VM id may be: it becomes a directory name and part of socket paths.
VM_ID = re.compile(r"[0-9a-f]{12}")


def argv_lines(argv: Sequence[str]) -> list[str]:
    """The argument list one option per line, for `check-config` and the README."""
    lines: list[str] = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("-") and not arg.startswith("--"):
            lines.append(arg)
        else:
            lines[-1] += f" {arg}"
    return lines
