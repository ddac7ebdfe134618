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

Kata 3.x (`generation = "3.x"`) is written as kata-containers 3.30.0 writes it; see
`Kata3Line` below for what it follows and where its line differs from 1.x's.
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
#: The QEMU device id of that port (Kata 1.x's qemu.go: `channel0`); QMP names it in
#: VSERPORT_CHANGE when the guest opens or closes the port.
AGENT_PORT_ID = "channel0"
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
    def vhost_fs(self) -> Path:
        """virtiofsd's vhost-user socket (qemu.go vhostFSSocketPath: in the run storage
        path's VM directory, 1.x and 3.x alike)."""
        return self.dir / "vhost-fs.sock"

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
    #: shared_fs: "virtio-9p" (a 9p device on the share directory), "virtio-fs" (a
    #: vhost-user-fs device on a virtiofsd's socket), "none" (3.x: no device).
    shared_fs: str = "virtio-9p"
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
    hot_plug_vfio: str = "no-port"
    cold_plug_vfio: str = "no-port"
    #: pcie_switch_port: downstream ports of the PCIe switch (with "switch-port").
    pcie_switch_port: int = 0
    #: default_maxmemory (Kata's DefaultMaxMemorySize) is `max_memory_mib`; this is
    #: memory_offset, which 3.x adds to maxmem with 1024 MiB for the NVDIMM.
    memory_offset_mib: int = 0
    #: rootfs_type and kernel_verity_params: the root= parameters of an image.
    rootfs_type: str = "ext4"
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

    def kernel_command_line(self) -> str:
        """qemu.go kernelParameters(): arch defaults, debug or quiet, panic, nr_cpus,
        agent.use_vsock, then the file's parameters (the kernel honours the last value)."""
        if self.generation == "3.x":
            return Kata3Line(self).kernel_command_line()
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
        if self.generation == "3.x":
            return Kata3Line(self).argv(vm_id, uuid, paths, memory=memory,
                                        memory_path=memory_path, cid=cid, incoming=incoming)
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
                "-device", f"virtserialport,chardev=charch0,id={AGENT_PORT_ID},"
                           f"name={AGENT_CHANNEL_NAME}",
                "-chardev", f"socket,id=charch0,path={opt_value(paths.agent)},"
                            "server=on,wait=off",
            ]
        elif self.agent_channel == "vsock":
            if cid is None:
                raise ValueError("a vsock agent channel needs a guest CID")
            devices += ["-device", f"vhost-vsock-pci,{_modern(legacy)}id=vsock-{cid},"
                                   f"guest-cid={cid},romfile="]
        if self.shared_fs == "virtio-fs":
            devices += vhost_user_fs(self, paths, uuid, pci=True)
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
        """govmm's memory knobs: RAM, a shared file (setupFileBackedMem: virtio-fs or
        file_mem_backend), or (templating) the template's file, shared by the template."""
        if memory == "ram" and self.file_mem_backend is not None:
            return (f"memory-backend-file,id=dimm1,size={self.memory_mib}M,"
                    f"mem-path={opt_value(self.file_mem_backend)},share=on")
        if memory == "ram":
            return f"memory-backend-ram,id=dimm1,size={self.memory_mib}M"
        if path is None:
            raise ValueError("templating needs the template's memory file")
        if self.file_mem_backend is not None or self.shared_fs == "virtio-fs":
            raise ValueError(TEMPLATING_REFUSED)
        share = ",share=on" if memory == "template" else ""
        return (f"memory-backend-file,id=dimm1,size={self.memory_mib}M,"
                f"mem-path={opt_value(path)}{share}")


#: Kata's refusal of templating with shared memory (qemu.go createSandbox in 1.x,
#: CreateVM in 3.x): the template's RAM is shared, its clones' private, and virtio-fs
#: needs it shared in every VM.
TEMPLATING_REFUSED = ("VM templating has been enabled with either virtio-fs or file backed "
                      "memory and this configuration will not work")


def vhost_user_fs(spec: VMSpec, paths: VMPaths, uuid: str, *, pci: bool) -> list[str]:
    """The shared directory over virtio-fs, as the agent's configure() adds it (qemu.go
    AddDevice for a types.Volume; qemu_arch_base.go appendVhostUserDevice; govmm's
    VhostUserDevice params): a chardev on virtiofsd's socket, then the device with tag
    kataShared. 1.x writes `romfile=` and has no queue size; 3.x writes queue-size (1024
    unless virtio_fs_queue_size) and no romfile. The ids are "char-" + 8 random bytes in
    Kata; here from the VM's UUID."""
    char = f"char-{_uuid_hex(uuid)}"
    device = [("vhost-user-fs-pci" if pci else "vhost-user-fs-device"), f"chardev={char}",
              f"tag={SHARED_TAG}"]
    if spec.generation == "3.x":
        device.append(f"queue-size={spec.virtio_fs_queue_size or 1024}")
    if spec.virtio_fs_cache_size:
        device.append(f"cache-size={spec.virtio_fs_cache_size}M")
    if spec.generation == "1.x":
        device.append("romfile=")
    return ["-chardev", f"socket,id={char},path={opt_value(paths.vhost_fs)}",
            "-device", ",".join(device)]


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
        if arg.startswith("-"):  # values never do: paths are absolute
            lines.append(arg)
        else:
            lines[-1] += f" {arg}"
    return lines


# --- Kata 3.x ---------------------------------------------------------------------------

#: qemu_amd64.go kernelParams (3.x): 1.x's without the consoles, which appendConsole adds.
_AMD64_PARAMS_3X = (
    "tsc=reliable", "no_timer_check", "rcupdate.rcu_expedited=1", "i8042.direct=1",
    "i8042.dumbkbd=1", "i8042.nopnp=1", "i8042.noaux=1", "noreplace-smp", "reboot=k",
    "cryptomgr.notests", "net.ifnames=0", "pci=lastbus=0",
)
#: qemu_amd64.go supportedQemuMachines: the machine types Kata 3.x builds on amd64.
MACHINES_3X = ("q35", "microvm")
#: hypervisor.go RootfsType: what GetKernelRootParams knows how to mount.
ROOTFS_TYPES_3X = ("ext4", "xfs", "erofs")
#: qemu_arch_base.go maxPCIeRootPort / maxPCIeSwitchPort.
MAX_PCIE_PORTS_3X = 16
#: govmm qemu.go: the memory of an enable_hugepages VM.
HUGEPAGES_PATH = "/dev/hugepages"
#: hypervisor.go verityBlockSizeBytes.
_VERITY_BLOCK = 512


def kernel_verity(params: str) -> dict[str, str] | None:
    """hypervisor.go ParseKernelVerityParams: `root_hash=...,salt=...,data_blocks=N,
    data_block_size=N,hash_block_size=N`, or None when empty. Raises ValueError with
    Kata's own reason when Kata would refuse the value."""
    if params.strip() == "":
        return None
    values: dict[str, str] = {}
    for raw in params.split(","):
        item = raw.strip()
        if item == "":
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid kernel_verity_params entry: {item!r}")
        values[key] = value
    if not values.get("root_hash"):
        raise ValueError("missing kernel_verity_params root_hash")
    for name in ("data_blocks", "data_block_size", "hash_block_size"):
        if not values.get(name):
            raise ValueError(f"missing kernel_verity_params {name}")
        if not values[name].isdigit():
            raise ValueError(f"invalid kernel_verity_params {name} {values[name]!r}")
    if not values.get("salt"):
        raise ValueError("missing kernel_verity_params salt")
    for name in ("data_blocks", "data_block_size", "hash_block_size"):
        if int(values[name]) == 0:
            raise ValueError(f"invalid kernel_verity_params {name}: must be non-zero")
    for name in ("data_block_size", "hash_block_size"):
        if int(values[name]) % _VERITY_BLOCK != 0:
            raise ValueError(f"invalid kernel_verity_params {name}: must be multiple of "
                             f"{_VERITY_BLOCK}")
    return values


def kernel_root_params_3x(rootfs_type: str, nvdimm: bool, verity_params: str) -> list[str]:
    """hypervisor.go GetKernelRootParams, as handleImagePath calls it on amd64 (DAX on
    whenever the image is on an NVDIMM). Raises ValueError where Kata fails."""
    rootfs = rootfs_type or "ext4"
    if rootfs not in ROOTFS_TYPES_3X:
        raise ValueError(f"unsupported rootfs type {rootfs!r}")
    verity = kernel_verity(verity_params)
    if verity is not None:
        root, hashes = ("/dev/pmem0p1", "/dev/pmem0p2") if nvdimm else ("/dev/vda1",
                                                                        "/dev/vda2")
        sectors = int(verity["data_block_size"]) // 512 * int(verity["data_blocks"])
        table = (f"dm-verity,,,ro,0 {sectors} verity 1 {root} {hashes} "
                 f"{int(verity['data_block_size'])} {int(verity['hash_block_size'])} "
                 f"{int(verity['data_blocks'])} 0 sha256 {verity['root_hash']} "
                 f"{verity['salt']}")
        flags = "data=ordered,errors=remount-ro ro" if rootfs == "ext4" else "ro"
        return [f'dm-mod.create="{table}"', "root=/dev/dm-0", f"rootflags={flags}",
                f"rootfstype={rootfs}"]
    params = ["root=/dev/pmem0p1" if nvdimm else "root=/dev/vda1"]
    if rootfs == "ext4":
        params.append("rootflags=dax,data=ordered,errors=remount-ro ro" if nvdimm
                      else "rootflags=data=ordered,errors=remount-ro ro")
    else:
        params.append("rootflags=dax ro" if nvdimm else "rootflags=ro")
    params.append(f"rootfstype={rootfs}")
    return params


class Kata3Line:
    """Kata 3.x's QEMU command line for a factory VM, as kata-containers 3.30.0 writes it.

    Followed (kata-containers/kata-containers, tag 3.30.0, src/runtime/):
    virtcontainers/vm.go (`NewVM`: CreateVM, then the agent's configure, then StartVM),
    virtcontainers/qemu.go (`CreateVM`, `setup`, `kernelParameters`, `buildDevices`,
    `setupTemplate`, `setupFileBackedMem`, `setupIoThread`, `createPCIeTopology`,
    `createQmpSocket`, `genericAppendBridges`, `genericBridges`, `genericMemoryTopology`,
    `genericAppendPCIeRootPort`, `genericAppendPCIeSwitchPort`), qemu_arch_base.go
    (`appendConsole`, `appendNvdimmImage`, `appendBlockImage`/`genericImage`,
    `appendSCSIController`, `append9PVolume`, `appendVSock`, `appendRNGDevice`,
    `appendBalloonDevice`, `appendIOMMU`, `appendPVPanicDevice`, `handleImagePath`,
    `cpuTopology`), qemu_amd64.go (`kernelParams`, `supportedQemuMachines`,
    `newQemuArch`, `cpuModel`, `appendImage`), hypervisor.go (`GetKernelRootParams`,
    `ParseKernelVerityParams`, `IfPVPanicEnabled`, `vSockPort`), hypervisor_linux.go
    (`generateVMSocket`), kata_agent.go (`configure`: the vsock device, then the shared
    directory unless shared_fs = "none"), and govmm, pkg/govmm/qemu/qemu.go (`LaunchQemu`'s
    order and every device's `QemuParams`).

    What changes from 1.x's line (each also said where it is written):

    - machines: q35 and microvm only (no pc); `accel=kvm` without `kernel_irqchip`
      (`kernel_irqchip=split` with enable_iommu); microvm's devices are virtio-mmio
      (`virtio-*-device`), and its memory is `-machine memory-backend=dimm1`, not NUMA.
    - devices: no `romfile=` (3.x's romFile is empty, and govmm writes it only when set),
      `disable-modern=false|true` written on every virtio-pci device that has it; no
      `max_ports` (govmm writes it only beside a romfile); PCI bridges with `shpc=off` and
      4k/1m/1m reservations; the image on an NVDIMM read-only (`unarmed=on`,
      `readonly=on`) or on virtio-blk with `config-wce=off` and a `serial=`; the agent
      over vsock only (no virtio-serial channel); the 9p device only when sharing files;
      new: intel-iommu, pvpanic, virtio-balloon, PCIe root or switch ports per
      hot_plug_vfio/cold_plug_vfio (1.x: pcie_root_port root ports on q35 always).
    - CPU: `host` plus cpu_features, without 1.x's `vmx=off` for templating.
    - memory: maxmem is default_maxmemory + memory_offset + 1024 MiB; prealloc,
      hugepages, file-backed and shared memory knobs.
    - kernel: the consoles after the root parameters, no `iommu=off` and no
      `agent.use_vsock`, `selinux=0|1` after `nr_cpus`; `intel_iommu=on iommu=pt` with
      enable_iommu; root parameters per rootfs_type and kernel_verity_params.
    - options: `--no-reboot`; `-sandbox`, `-bios`, `-pflash`, iothread objects and an
      extra monitor socket when the file asks; `-smp` last, as govmm orders them.

    Where we differ from 3.x's own line, on purpose:

    - QMP and vsock by path and CID: Kata opens the QMP listener and `/dev/vhost-vsock`
      itself and hands QEMU the descriptors (`unix:fd=N`, `vhostfd=N`); we give QEMU the
      path (govmm's own syntax for a socket without a descriptor) and the CID, and QEMU
      opens them.
    - no `debug-threads=on` after the `-name` with enable_debug: the daemon knows its
      QEMU by its exact `-name sandbox-<id>` argument (qemu.is_vm_qemu); the option only
      names QEMU's threads.
    - TCG as for 1.x: `accel=tcg`, no `kernel_irqchip`, `-cpu max`; `-S` (our CPUs wait
      for the readiness probe; 3.x adds `-S` itself only before `-incoming`); our serial
      ports last (with use_legacy_serial, only the ready-line port: Kata's console is
      then ttyS0 already).
    - `intel_iommu=on iommu=pt` once: 3.x appends them to a package-level slice each time
      it builds a VM with enable_iommu (as 1.x did with `iommu=off`).
    - ids Kata draws at random per VM (the image drive, the SCSI iothread) come from the
      VM's random UUID.
    - values are escaped for QEMU (`opt_value`); govmm writes them as they are.
    """

    def __init__(self, spec: VMSpec) -> None:
        # What Kata 3.x itself refuses, or what we cannot build like it: check_kata3()
        # says so about the file first; these guard the specs made by hand.
        if spec.machine_type not in MACHINES_3X:
            raise ValueError(f"Kata 3.x builds {' and '.join(MACHINES_3X)} VMs on amd64 "
                             f"(got {spec.machine_type!r})")
        if spec.iommu and spec.machine_type != "q35":
            raise ValueError(f"machine type {spec.machine_type} does not support vIOMMU")
        if spec.shared_fs not in ("virtio-9p", "virtio-fs", "none"):
            raise ValueError(f"shared_fs {spec.shared_fs!r} is not supported (virtio-9p, "
                             "virtio-fs or none)")
        self.spec = spec
        #: govmm defaultTransport: virtio-mmio on microvm, PCI elsewhere on amd64.
        self.pci = spec.machine_type != "microvm"

    # -- govmm's spelling of a device on this machine's transport --

    def _virtio(self, device: str) -> str:
        return f"{device}-pci" if self.pci else f"{device}-device"

    def _modern(self, legacy: bool) -> list[str]:
        """VirtioTransport.disableModern: PCI devices say it either way, MMIO never."""
        if not self.pci:
            return []
        return ["disable-modern=true" if legacy else "disable-modern=false"]

    # -- the kernel command line --

    def kernel_command_line(self) -> str:
        """qemu.go kernelParameters(): the arch's parameters (with the root and console
        parameters newQemuArch and buildDevices added), debug or quiet, panic=1, nr_cpus,
        selinux, then the file's parameters (KernelParams, which also hold what the loader
        adds: the kernel honours the last value)."""
        s = self.spec
        params = list(_AMD64_PARAMS_3X)
        if s.iommu:  # newQemuArch
            params += ["intel_iommu=on", "iommu=pt"]
        if s.image is not None:  # handleImagePath
            params += kernel_root_params_3x(s.rootfs_type, s.nvdimm_image,
                                            s.kernel_verity_params)
        # appendConsole
        params += ["console=ttyS0"] if s.legacy_serial else ["console=hvc0", "console=hvc1"]
        if s.debug:
            params += ["debug", *(("systemd.show_status=true", "systemd.log_level=debug")
                                  if s.image is not None else ())]
        else:
            params += ["quiet", *(("systemd.show_status=false",)
                                  if s.image is not None else ())]
        params += ["panic=1", f"nr_cpus={s.max_vcpus}",
                   "selinux=0" if s.disable_guest_selinux else "selinux=1"]
        params += s.kernel_params
        return " ".join(params)

    # -- the command line --

    def argv(self, vm_id: str, uuid: str, paths: VMPaths, *, memory: MemoryBackend,
             memory_path: Path | None, cid: int | None, incoming: bool) -> list[str]:
        """govmm LaunchQemu's order: name, uuid, machine, cpu, qmp, memory, devices, rtc,
        global, pflash, vga, knobs (with the memory backend), kernel, bios, iothreads,
        incoming, pidfile, sandbox, smp."""
        s = self.spec
        templated = memory != "ram"
        if templated and memory_path is None:
            raise ValueError("templating needs the template's memory file")
        if templated and (s.file_mem_backend is not None or s.shared_fs == "virtio-fs"):
            raise ValueError(TEMPLATING_REFUSED)  # qemu.go CreateVM, in the same words
        if s.vhost_user_store and not s.hugepages:
            raise ValueError("vhost-user-blk/scsi (enable_vhost_user_store) needs "
                             "enable_hugepages")
        iothread = (f"iothread-{_uuid_hex(uuid)}"
                    if s.iothreads and s.block_device_driver == "virtio-scsi" else "")
        args = [
            str(s.qemu),
            "-name", qemu_name(vm_id),
            "-uuid", uuid,
            "-machine", self._machine(),
            "-cpu", self._cpu(),
            *self._qmp(paths),
            "-m", self._memory_size(),
            *self._devices(uuid, paths, cid, iothread),
            "-rtc", "base=utc,driftfix=slew,clock=host",
            "-global", "kvm-pit.lost_tick_policy=discard",
        ]
        for flash in s.pflash:
            args += ["-pflash", flash]
        args += [
            "-vga", "none", "-no-user-config", "-nodefaults", "-nographic", "--no-reboot",
            *self._memory_backend(memory, memory_path),
            "-kernel", str(s.kernel),
        ]
        if s.initrd is not None:
            args += ["-initrd", str(s.initrd)]
        args += ["-append", self.kernel_command_line()]
        if s.firmware is not None:
            args += ["-bios", str(s.firmware)]
        threads = ([iothread] if iothread else []) + [
            f"indep_iothread_{i}" for i in range(s.indep_iothreads)]
        for thread in threads:
            args += ["-object", f"iothread,id={thread}"]
        stopped = memory == "clone" or incoming
        if stopped:  # setupTemplate: BootFromTemplate -> MigrationDefer
            args += ["-S", "-incoming", "defer"]
        args += ["-pidfile", str(paths.pidfile)]
        if s.seccomp_sandbox:
            args += ["-sandbox", s.seccomp_sandbox]
        args += ["-smp", f"{s.vcpus},cores=1,threads=1,sockets={s.max_vcpus},"
                         f"maxcpus={s.max_vcpus}"]
        args += self._own_serial(paths)
        if not stopped:
            args.append("-S")
        return args

    def _machine(self) -> str:
        """newQemuArch: `accel=kvm`, `accel=kvm,kernel_irqchip=split` with an IOMMU;
        handleImagePath: `nvdimm=on`; getQemuMachine: then machine_accelerators."""
        s = self.spec
        options = [s.machine_type]
        if s.accelerator == "kvm":
            options.append("accel=kvm,kernel_irqchip=split" if s.iommu else "accel=kvm")
        else:
            options.append("accel=tcg")  # kernel_irqchip is a KVM property
        if s.nvdimm_image:
            options.append("nvdimm=on")
        if s.machine_accelerators:
            options.append(s.machine_accelerators.lstrip(","))
        return ",".join(options)

    def _cpu(self) -> str:
        """CreateVM: cpuModel() + "," + cpu_features; 3.x has no `vmx=off` for templating.
        TCG has no `host` CPU."""
        model = "host" if self.spec.accelerator == "kvm" else "max"
        return f"{model},{self.spec.cpu_features}"

    def _qmp(self, paths: VMPaths) -> list[str]:
        """createQmpSocket: the QMP socket, and with enable_debug the extra monitor."""
        args = ["-qmp", f"unix:path={opt_value(paths.qmp)},server=on,wait=off"]
        monitor = self.spec.extra_monitor
        if self.spec.debug and monitor:
            flag = "-monitor" if monitor == "hmp" else f"-{monitor}"
            extra = paths.dir / "extra-monitor.sock"
            args += [flag, f"unix:path={opt_value(extra)},server=on,wait=off"]
        return args

    def _memory_size(self) -> str:
        """genericMemoryTopology: maxmem = default_maxmemory + memory_offset + 1024 MiB
        for the image's NVDIMM; slots are a uint8 in govmm, and 0 is left out."""
        s = self.spec
        slots = s.memory_slots % 256
        maxmem = s.max_memory_mib + s.memory_offset_mib + 1024
        return ",".join([f"{s.memory_mib}M", *([f"slots={slots}"] if slots else []),
                         f"maxmem={maxmem}M"])

    def _devices(self, uuid: str, paths: VMPaths, cid: int | None,
                 iothread: str) -> list[str]:
        """CreateVM's devices (buildDevices, RNG, balloon, PCIe topology), then what the
        agent's configure() adds (vsock, shared directory)."""
        s = self.spec
        legacy = s.nested
        devices: list[str] = []
        if self.pci and s.machine_type == "q35":  # genericBridges: no bridges on microvm
            for i in range(s.bridges):
                devices += ["-device", f"pci-bridge,bus=pcie.0,id=pci-bridge-{i},"
                                       f"chassis_nr={i + 1},shpc=off,"
                                       f"addr={BRIDGE_START_ADDR + i:x},io-reserve=4k,"
                                       "mem-reserve=1m,pref64-reserve=1m"]
        console = (f"socket,id=charconsole0,path={opt_value(paths.console)},"
                   "server=on,wait=off")
        if s.legacy_serial:
            devices += ["-serial", "chardev:charconsole0", "-chardev", console]
        else:
            devices += [
                "-device", ",".join([self._virtio("virtio-serial"), *self._modern(legacy),
                                     "id=serial0"]),
                "-device", "virtconsole,chardev=charconsole0,id=console0",
                "-chardev", console,
            ]
        if s.image is not None and s.initrd is None:
            devices += self._image(uuid)
        if s.iommu:  # appendIOMMU: q35 only (Kata refuses the others)
            devices += ["-device", "intel-iommu,intremap=on,device-iotlb=on,caching-mode=on"]
        if s.pvpanic:
            devices += ["-device", "pvpanic", "-no-shutdown"]
        if s.block_device_driver == "virtio-scsi":
            devices += ["-device", ",".join([f"{self._virtio('virtio-scsi')},id=scsi0",
                                             *self._modern(legacy),
                                             *([f"iothread={iothread}"] if iothread
                                               else [])])]
        devices += [
            "-object", f"rng-random,id=rng0,filename={opt_value(s.entropy_source)}",
            "-device", f"{self._virtio('virtio-rng')},rng=rng0",
        ]
        if s.balloon:  # CreateVM: DisableModern false whatever the nesting
            devices += ["-device", ",".join([f"{self._virtio('virtio-balloon')},id=balloon0",
                                             "deflate-on-oom=on", *self._modern(False),
                                             "free-page-reporting=on"])]
        if s.machine_type == "q35":
            devices += self._pcie_topology()
        if s.agent_channel == "vsock":
            if cid is None:
                raise ValueError("a vsock agent channel needs a guest CID")
            devices += ["-device", ",".join([self._virtio("vhost-vsock"),
                                             *self._modern(legacy), f"id=vsock-{cid}",
                                             f"guest-cid={cid}"])]
        elif s.agent_channel == "serial":
            raise ValueError("Kata 3.x reaches its agent over vsock only")
        if s.shared_fs == "virtio-fs":
            devices += vhost_user_fs(s, paths, uuid, pci=self.pci)
        elif s.shared_fs != "none":
            tag = SHARED_TAG
            devices += [
                "-device", ",".join([self._virtio("virtio-9p"), *self._modern(legacy),
                                     f"fsdev=extra-9p-{tag}", f"mount_tag={tag}"]),
                "-fsdev", f"local,id=extra-9p-{tag},path={opt_value(paths.shared)},"
                          "security_model=none,multidevs=remap",
            ]
        return devices

    def _image(self, uuid: str) -> list[str]:
        s = self.spec
        assert s.image is not None
        if s.nvdimm_image:  # appendNvdimmImage: read-only
            size = s.image.stat().st_size
            return ["-device", "nvdimm,id=nv0,memdev=mem0,unarmed=on",
                    "-object", f"memory-backend-file,id=mem0,mem-path={opt_value(s.image)},"
                               f"size={size},readonly=on"]
        # genericImage + genericBlockDevice: "image-" + 8 random bytes in hex.
        drive = f"image-{_uuid_hex(uuid)}"
        return [
            "-device", ",".join([self._virtio("virtio-blk"), *self._modern(s.nested),
                                 f"drive={drive}", "config-wce=off", "share-rw=on",
                                 f"serial={drive}"]),
            "-drive", f"id={drive},file={opt_value(s.image)},aio=threads,format=raw,"
                      "if=none,readonly=on",
        ]

    def _pcie_topology(self) -> list[str]:
        """createPCIeTopology for a factory VM (no VFIO devices yet): root ports with
        "root-port", a switch with "switch-port", nothing otherwise."""
        s = self.spec
        ports = (s.hot_plug_vfio, s.cold_plug_vfio)
        if "root-port" in ports:
            if s.pcie_root_port > MAX_PCIE_PORTS_3X:
                raise ValueError(f"Kata 3.x allows at most {MAX_PCIE_PORTS_3X} PCIe root "
                                 "ports")
            return [arg for i in range(s.pcie_root_port)
                    for arg in ("-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis=0,"
                                           f"slot={i},multifunction=off")]
        if "switch-port" in ports:
            if s.pcie_switch_port > MAX_PCIE_PORTS_3X:
                raise ValueError(f"Kata 3.x allows at most {MAX_PCIE_PORTS_3X} PCIe switch "
                                 "ports")
            args = ["-device", "pcie-root-port,id=swrp0,bus=pcie.0,chassis=1,slot=0,"
                               "multifunction=off",
                    "-device", "x3130-upstream,id=swup0,bus=swrp0"]
            for i in range(s.pcie_switch_port):
                args += ["-device", f"xio3130-downstream,id=swdp{i},bus=swup0,chassis=2,"
                                    f"slot={i}"]
            return args
        return []

    def _memory_backend(self, memory: MemoryBackend, path: Path | None) -> list[str]:
        """govmm appendMemoryKnobs with the knobs CreateVM sets: templating
        (setupTemplate: the template's file, shared by the template), file-backed memory
        (shared), vhost-user storage (shared), hugepages (prealloc when file-backed)."""
        s = self.spec
        size = f"{s.memory_mib}M"
        shared = memory == "template" or s.vhost_user_store
        prealloc = s.mem_prealloc
        file_path: Path | None = None
        if memory != "ram":
            file_path = path
        elif s.file_mem_backend is not None:
            file_path, shared = s.file_mem_backend, True
            prealloc = prealloc or s.hugepages
        if s.hugepages:
            backend = f"memory-backend-file,id=dimm1,size={size},mem-path={HUGEPAGES_PATH}"
        elif file_path is not None:
            backend = (f"memory-backend-file,id=dimm1,size={size},"
                       f"mem-path={opt_value(file_path)}")
        else:
            backend = f"memory-backend-ram,id=dimm1,size={size}"
        backend += ",share=on" if shared else ""
        backend += ",prealloc=on" if prealloc else ""
        # isDimmSupported: microvm has no NUMA.
        node = (["-numa", "node,memdev=dimm1"] if self.pci
                else ["-machine", "memory-backend=dimm1"])
        return ["-object", backend, *node]

    def _own_serial(self, paths: VMPaths) -> list[str]:
        """Our serial ports, after Kata's devices: ttyS0 the guest's console, ttyS1 its
        ready line. With use_legacy_serial Kata's console is ttyS0 already."""
        if not self.spec.own_serial:
            return []
        args: list[str] = []
        if not self.spec.legacy_serial:
            args += ["-chardev", f"socket,id=vmcserial0,path={opt_value(paths.serial)},"
                                 "server=on,wait=off",
                     "-serial", "chardev:vmcserial0"]
        args += ["-chardev", f"socket,id=vmcguest,path={opt_value(paths.guest)},"
                             "server=on,wait=off",
                 "-serial", "chardev:vmcguest"]
        return args


def _uuid_hex(uuid: str) -> str:
    """16 hex digits (Kata draws 8 random bytes) from the VM's random UUID."""
    return uuid.replace("-", "")[:16]
