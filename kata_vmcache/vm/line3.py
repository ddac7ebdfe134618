"""Kata 3.x's QEMU command line for a factory VM (`generation = "3.x"`), as
kata-containers 3.30.0 writes it: `Kata3Line`, with the 3.x checks of an image's root
parameters (`kernel_root_params_3x`, `kernel_verity`) that factory/spec.py also runs on
the file before any VM is built. line1.py is its 1.x counterpart; `VMSpec.argv()` picks
one by the spec's generation. `Kata3Line`'s docstring says what it follows and where its
line differs from 1.x's and from 3.x's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .devices import (
    BRIDGE_START_ADDR,
    SHARED_TAG,
    TEMPLATING_REFUSED,
    opt_value,
    uuid_hex,
    vhost_user_fs,
)
from .paths import VMPaths, qemu_name

if TYPE_CHECKING:
    from .spec import MemoryBackend, VMSpec

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
        iothread = (f"iothread-{uuid_hex(uuid)}"
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
        drive = f"image-{uuid_hex(uuid)}"
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
