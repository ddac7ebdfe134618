"""Boot one VM straight from the configuration (Kata's `direct` factory).

`boot()` takes a VM from `booting` to `ready`: launch QEMU with its CPUs stopped, attach the
readiness probe, `cont`, wait for the guest's signal within `ready_timeout`, `stop`. On any
failure the VM is stopped and its directory removed before the error propagates: a failed
boot leaks nothing.

Accelerator `auto` picks KVM when /dev/kvm can be opened, else TCG. Some hosts have a
/dev/kvm under which guests hang (this project's build machine is one), so when an `auto`
boot under KVM times out without the guest ever signalling, the factory says so in a
warning and uses TCG from then on, rather than leave the user with a silent hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from .. import kata
from ..config import Config
from ..errors import ConfigError, ConfigProblem, GuestNotReady, LaunchError
from ..vm.devices import (
    AGENT_CHANNEL_NAME,
    AGENT_VSOCK_PORT,
    TEMPLATING_REFUSED,
    running_nested,
)
from ..vm.line3 import MACHINES_3X, MAX_PCIE_PORTS_3X, kernel_root_params_3x
from ..vm.owned import VM, VMState
from ..vm.paths import sandbox_storage
from ..vm.probe import KataAgentProbe, KataTtrpcProbe, ReadinessProbe, SerialLineProbe
from ..vm.proxy import KataProxy
from ..vm.spec import Accelerator, VMSpec
from ..vm.ttrpc import VsockAddress
from ..vm.virtiofsd import ARGUMENTS as VIRTIOFSD_ARGUMENTS
from ..vm.virtiofsd import (
    CACHE_MODES_3X,
    Virtiofsd,
    capabilities,
    chroot_sandbox,
    help_text,
    receives_mounts,
)

log = logging.getLogger(__name__)

#: QEMU opens it for a vhost-vsock-pci device (utils.VHostVSockDevicePath).
VHOST_VSOCK = kata.VHOST_VSOCK_DEVICE
#: The agent probe's own deadline is past ready_timeout: the boot's bound decides, and
#: says so as a boot that timed out, not as a failed call.
PROBE_DEADLINE_MARGIN = 1.0


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accelerator(setting: str) -> Literal["kvm", "tcg"]:
    if setting == "kvm":
        return "kvm"
    if setting == "tcg":
        return "tcg"
    return "kvm" if kvm_usable() else "tcg"


def spec_from_config(config: Config, accelerator: Literal["kvm", "tcg"]) -> VMSpec:
    """The VM Kata would build from the file: sizes from the validated settings, devices
    and kernel parameters from Kata's own derivation of the file (kata.py). Raises
    ConfigError for a Kata 3.x file whose VM cannot be built as Kata builds it."""
    h = config.hypervisor
    # One derivation: the payload the Config reply sends, for the file's generation.
    kata_hv = kata.hypervisor_config(config.document, config.daemon.kata_version)
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


def kata3_fields(config: Config, kata_hv: dict[str, Any]) -> dict[str, Any]:
    """The VMSpec fields only Kata 3.x's device model reads (machine.Kata3Line), from
    Kata's HypervisorConfig (kata.py), and where that has no key, from the file as
    kata-containers 3.30.0's loader reads it (src/runtime/pkg/katautils/config.go,
    newQemuHypervisorConfig)."""
    q = _qemu_table(config)
    return {
        "machine_type": kata_hv["HypervisorMachineType"],
        "virtio_fs_queue_size": kata_hv["VirtioFSQueueSize"],
        # config.go defaultMaxMemSz(): default_maxmemory, else (or above) the host's
        # memory. Our [vmcache] max_memory, when set, still wins: it is the user's word.
        "max_memory_mib": config.daemon.max_memory_mib or kata_hv["DefaultMaxMemorySize"],
        "memory_offset_mib": kata_hv["MemOffset"],
        # config.go pcieRootPort(): capped at maxPCIeRootPorts (16).
        "pcie_root_port": min(kata_hv["PCIeRootPort"], MAX_PCIE_PORTS_3X),
        "pcie_switch_port": kata_hv["PCIeSwitchPort"],
        "hot_plug_vfio": kata_hv["HotPlugVFIO"],
        "cold_plug_vfio": kata_hv["ColdPlugVFIO"],
        "disable_guest_selinux": kata_hv["DisableGuestSeLinux"],
        "iommu": kata_hv["IOMMU"],
        "legacy_serial": kata_hv["LegacySerial"],
        "rootfs_type": kata_hv["RootfsType"],
        # config.go kernelVerityParams(): the string as written (HypervisorConfig's
        # KernelVerityParams, which kata.py does not emit).
        "kernel_verity_params": _str(q, "kernel_verity_params"),
        "mem_prealloc": kata_hv["MemPrealloc"],
        "hugepages": kata_hv["HugePages"],
        "vhost_user_store": kata_hv["EnableVhostUserStore"],
        "pvpanic": kata_hv["GuestMemoryDumpPath"] != "",
        # config.go: reclaim_guest_freed_memory and indep_iothreads (defaults false and 0,
        # config-settings.go.in), which kata.py does not emit.
        "balloon": _bool(q, "reclaim_guest_freed_memory"),
        "iothreads": kata_hv["EnableIOThreads"],
        "indep_iothreads": _int(q, "indep_iothreads"),
        "seccomp_sandbox": kata_hv["SeccompSandbox"],
        "firmware": Path(kata_hv["FirmwarePath"]) if kata_hv["FirmwarePath"] else None,
        "pflash": tuple(kata_hv["PFlash"] or ()),
        "extra_monitor": kata_hv["ExtraMonitorSocket"],
    }


#: qemu.go fallbackFileBackedMemDir (1.x and 3.x).
FALLBACK_FILE_BACKED_MEM = "/dev/shm"
#: The shared file systems a virtiofsd serves (3.x's virtio-fs-nydus runs nydusd instead).
VIRTIO_FS = "virtio-fs"


def file_backed_memory(kata_hv: dict[str, Any]) -> Path | None:
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


#: config.go extraMonitorSocket(): the protocols Kata 3.x accepts.
EXTRA_MONITORS_3X = ("hmp", "qmp", "qmp-pretty")


def check_kata3(config: Config) -> list[ConfigProblem]:
    """What in a Kata 3.x file Kata 3.30.0 itself refuses when it builds the VM, or what
    kata-vmcache cannot build the way Kata does. File-level rules, kept beside the 3.x
    device model (machine.Kata3Line) whose assumptions they state."""
    q = _qemu_table(config)
    hv = kata.hypervisor_config(config.document, "3.x")
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
            kernel_root_params_3x(hv["RootfsType"], True, _str(q, "kernel_verity_params"))
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
    if monitor and monitor not in EXTRA_MONITORS_3X:
        problem("extra_monitor_socket", f"got {monitor!r}; expected one of "
                f"{', '.join(EXTRA_MONITORS_3X)}")
    return problems


def _str(table: Any, key: str) -> str:
    value = table.get(key)
    return value if isinstance(value, str) else ""


def _bool(table: Any, key: str) -> bool:
    value = table.get(key)
    return value if isinstance(value, bool) else False


def _int(table: Any, key: str) -> int:
    value = table.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def kata_params(params: list[dict[str, str]]) -> list[str]:
    """vc.SerializeParams: `key=value`, or `key` alone when the value is empty."""
    return [f"{p['Key']}={p['Value']}" if p["Value"] else p["Key"] for p in params]


def agent_channel(config: Config) -> Literal["serial", "vsock", ""]:
    """How the guest's agent is reached, as the file's Kata generation decides it: 1.x
    uses vsock only when use_vsock is set and the host has it (else the virtio-serial
    port, as Kata 1.x falls back), 3.x always uses vsock. A guest without an agent gets
    the channel only where the host can provide it (config.py refuses the rest)."""
    if config.daemon.kata_version == "1.x":
        return "vsock" if kata.hypervisor_config(config.document, "1.x")["UseVSock"] else "serial"
    return "vsock" if host_has_vsock() else ""


def host_has_vsock() -> bool:
    return kata.host_has_vhost_vsock()


def proxy_path(config: Config) -> Path | None:
    """The kata-proxy to start per VM: Kata 1.x, an agent in the guest, its serial
    channel (with vsock, 1.x uses no proxy); None otherwise."""
    if (config.daemon.kata_version != "1.x" or config.daemon.guest_agent != "kata"
            or agent_channel(config) != "serial"):
        return None
    path = kata.vm_config(config.document, "1.x")["ProxyConfig"]["Path"]
    return Path(path or kata.DEFAULT_PROXY_PATH)


def check_host(config: Config) -> list[ConfigProblem]:
    """What this host must have for the configured Kata VM, checked before anything boots
    (`init` and `check-config`): raises ConfigError naming each missing piece, returns
    warnings. Not part of config.load(): a file is valid or not on any host."""
    problems: list[ConfigProblem] = []
    warnings: list[ConfigProblem] = []
    d = config.daemon
    source = config.source
    problems += check_shared_fs(config)
    # A guest without an agent needs no vsock: that its VMs get none is no warning (it
    # asks nothing of its reader); check-config's kata.agent_channel line says so.
    if d.kata_version == "3.x" and not host_has_vsock() and d.guest_agent == "kata":
        problems.append(ConfigProblem(
            "vmcache.guest_agent", f"Kata 3.x reaches its agent over vsock, and this host "
            f"has no {VHOST_VSOCK} (load the vhost_vsock module; got guest_agent = "
            '"kata")', source))
    if d.kata_version == "3.x":
        # Once per key: shared_fs or a virtio-fs key may be named above already.
        named = {p.key for p in problems}
        problems += [p for p in check_kata3(config) if p.key not in named]
    proxy = proxy_path(config)
    if proxy is not None and not (proxy.is_file() and os.access(proxy, os.X_OK)):
        problems.append(ConfigProblem(
            "proxy.kata.path", f"no kata-proxy at {str(proxy)!r}: Kata 1.x with use_vsock = "
            "false reaches the agent only through a kata-proxy per VM (install Kata 1.x's "
            'kata-proxy, or set [vmcache] guest_agent = "none" for a guest without an agent)',
            source))
    elif proxy is not None and not syslog_listens():
        warnings.append(ConfigProblem(
            "proxy.kata.path", "nothing listens on /dev/log: Kata 1.x's kata-proxy logs to "
            "syslog and exits at once without it, so no VM can boot until a syslog (journald) "
            "listens there", source))
    if problems:
        raise ConfigError(problems)
    return warnings


def check_shared_fs(config: Config) -> list[ConfigProblem]:
    """What sharing files with the guest needs of the file and of this host: templating
    refused with shared memory (as Kata refuses it), and for virtio-fs a virtiofsd that
    takes the generation's arguments, shared guest RAM, and a QEMU with the DAX window a
    cache size asks for."""
    generation = config.daemon.kata_version
    hv = kata.hypervisor_config(config.document, generation)
    problems: list[ConfigProblem] = []

    def problem(key: str, message: str) -> None:
        problems.append(ConfigProblem(key, message, config.source))

    shared_fs = hv["SharedFS"]
    virtio_fs = shared_fs == VIRTIO_FS
    if config.factory.enable_template and (virtio_fs or hv["FileBackedMemRootDir"]):
        why = 'shared_fs = "virtio-fs"' if virtio_fs else "file_mem_backend set"
        where = "createSandbox" if generation == "1.x" else "CreateVM"
        problem("factory.enable_template", f"{TEMPLATING_REFUSED} (Kata {generation}'s "
                f"qemu.go {where}, with {why}): set enable_template = false")
    if not virtio_fs:
        return problems
    origin = "" if "shared_fs" in _qemu_table(config) else f" (Kata {generation}'s default)"
    daemon = hv["VirtioFSDaemon"]
    if not daemon:
        problem("hypervisor.qemu.virtio_fs_daemon", f'not set, and shared_fs = "virtio-fs"'
                f"{origin} needs one (Kata's loader refuses the file too; QEMU's own "
                "virtiofsd is /usr/lib/qemu/virtiofsd in Debian's qemu-system-common)")
    else:
        said = virtiofsd_problem(Path(daemon), generation)
        if said:
            problem("hypervisor.qemu.virtio_fs_daemon", said)
    if daemon and not syslog_listens():
        problem("hypervisor.qemu.virtio_fs_daemon", "nothing listens on /dev/log: Kata "
                "starts virtiofsd with --syslog, and QEMU's virtiofsd then exits as soon as "
                "QEMU connects (start a syslog daemon, such as journald)")
    storage = config.daemon.vm_storage_path
    receives, mountpoint = receives_mounts(storage)
    if not receives and not chroot_sandbox(list(hv["VirtioFSExtraArgs"] or ())):
        problem("vmcache.vm_storage_path", f"{storage} is on a private mount ({mountpoint}): "
                "what kata-runtime mounts into a VM's share once a sandbox takes it (the "
                "container's root file system) never reaches that VM's virtiofsd, which "
                "serves the share from a mount namespace of its own; make it shared (`mount "
                f"--make-rshared {mountpoint}`, as systemd hosts have it) or add \"-o\", "
                '"sandbox=chroot" to virtio_fs_extra_args')
    cache = hv["VirtioFSCache"]
    modes = CACHE_MODES_3X if generation == "3.x" else CACHE_MODES_1X
    if cache not in modes:
        problem("hypervisor.qemu.virtio_fs_cache", f"got {cache!r}; Kata {generation}'s "
                f"virtiofsd takes {', '.join(modes)}")
    if file_backed_memory(hv) is None:
        root = hv["FileBackedMemRootDir"] or FALLBACK_FILE_BACKED_MEM
        problem("hypervisor.qemu.file_mem_backend", f"virtio-fs needs the guest RAM in "
                f"shared memory, under file_mem_backend or {FALLBACK_FILE_BACKED_MEM}, and "
                f"{root!r} is not a directory (Kata would boot the VM with private RAM, "
                "which vhost-user cannot map)")
    size = hv["VirtioFSCacheSize"]
    if size and not qemu_device_has(config.hypervisor.path, "vhost-user-fs-pci", "cache-size"):
        problem("hypervisor.qemu.virtio_fs_cache_size", f"got {size}: QEMU "
                f"{config.hypervisor.path} has no DAX window for virtio-fs (its "
                "vhost-user-fs-pci has no cache-size property); set 0")
    return problems


#: The cache modes each generation's virtiofsd takes: 1.x's configuration documents
#: none, auto and always (QEMU's C virtiofsd), 3.x's virtiofsd.go valid() the rest.
CACHE_MODES_1X = ("none", "auto", "always")


def virtiofsd_problem(daemon: Path, generation: kata.Generation) -> str | None:
    """Why `daemon` cannot be the VMs' virtiofsd, or None: it must run, be a vhost-user
    fs backend, and take the arguments the generation starts it with."""
    if not (daemon.is_file() and os.access(daemon, os.X_OK)):
        return (f"no virtiofsd at {str(daemon)!r} (QEMU's own is /usr/lib/qemu/virtiofsd in "
                "Debian's qemu-system-common)")
    try:
        kind = capabilities(daemon).get("type")
    except (OSError, ValueError) as exc:
        return f"{str(daemon)!r} is not a working virtiofsd: {exc}"
    if kind != "fs":
        return (f"{str(daemon)!r} is a vhost-user backend of type {kind!r}, not a virtiofsd "
                '(type "fs")')
    text = help_text(daemon)
    missing = [arg for arg in VIRTIOFSD_ARGUMENTS[generation] if arg not in text]
    if missing:
        hint = ("Kata 3.x starts the Rust virtiofsd (--shared-dir, --cache); QEMU's own C "
                "virtiofsd takes 1.x's -o source=" if generation == "3.x" else
                "Kata 1.x starts virtiofsd with -o source= and --fd, as QEMU's own C "
                "virtiofsd takes them")
        return (f"{str(daemon)!r} does not take Kata {generation}'s arguments "
                f"({', '.join(missing)} not in its --help; {hint})")
    return None


def qemu_device_has(qemu: Path, device: str, prop: str) -> bool:
    """Whether QEMU's `device` has the property `prop` (`-device <device>,help`)."""
    try:
        done = subprocess.run([str(qemu), "-device", f"{device},help"], capture_output=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"{prop}=" in done.stdout.decode(errors="replace")


def syslog_listens(path: str = "/dev/log") -> bool:
    """Whether a syslog daemon receives datagrams on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _qemu_table(config: Config) -> Any:
    hypervisor = config.document.get("hypervisor")
    return hypervisor.get("qemu", {}) if isinstance(hypervisor, dict) else {}


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
    hv = kata.hypervisor_config(config.document, d.kata_version)
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


def booted(vm: VM, started: float, *, paused: bool = True) -> None:
    """The end of a successful boot (guest ready; paused unless `paused` says otherwise):
    ready, with its hand-off data. Paused, it needs no CPU: back at normal priority before
    its record says ready (priority.py)."""
    vm.boot_seconds = time.monotonic() - started
    if paused:
        vm.promote()
    vm.prepare_handoff()
    vm.transition(VMState.READY)


async def abandon(vm: VM, why: BaseException, stop_timeout: float) -> None:
    """The end of a failed boot: failed (with why), QEMU and its proxy stopped, its
    directories gone. Stopping depends on nothing on disk: a failure to write (a full
    disk) must not leave a QEMU running."""
    try:
        if vm.state is VMState.BOOTING:
            # Recorded first (with why), then stopped; a record that cannot be written
            # (a full disk) is only logged for a failed VM, so the stop always follows.
            vm.transition(VMState.FAILED, str(why) or type(why).__name__)
    finally:
        await vm.stop(stop_timeout)
        vm.remove_dirs()


class VsockCids:
    """Guest CIDs for the VMs' vhost-vsock devices: unique among ours, random start (as
    Kata's FindContextID, so two daemons rarely collide; QEMU refuses a CID in use, and
    that boot fails and the next one gets another)."""

    FIRST, LAST = 3, 0xFFFFFFFE

    def __init__(self) -> None:
        self._next = secrets.randbelow(self.LAST - self.FIRST) + self.FIRST
        self._used: set[int] = set()

    def take(self) -> int:
        while self._next in self._used:
            self._next = self._next + 1 if self._next < self.LAST else self.FIRST
        cid = self._next
        self._used.add(cid)
        return cid

    def give_back(self, cid: int | None) -> None:
        if cid is not None:
            self._used.discard(cid)


class DirectFactory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.auto = config.daemon.accelerator == "auto"
        self.spec = spec_from_config(config, resolve_accelerator(config.daemon.accelerator))
        self.state_dir = config.daemon.state_dir
        self.vm_storage = config.daemon.vm_storage_path
        self.proxy = proxy_path(config)
        self.cids = VsockCids()
        hv = kata.hypervisor_config(config.document, config.daemon.kata_version)
        #: What each VM's virtiofsd is started with (virtio-fs only).
        self.virtiofsd: dict[str, Any] | None = None
        if self.spec.shared_fs == VIRTIO_FS:
            self.virtiofsd = {
                "binary": Path(hv["VirtioFSDaemon"]), "cache": hv["VirtioFSCache"],
                "debug": hv["Debug"], "extra_args": list(hv["VirtioFSExtraArgs"] or ()),
                "guest_selinux": not hv.get("DisableGuestSeLinux", True)}

    # the Factory protocol (factory/__init__.py), besides create() and boot()

    @property
    def accelerator(self) -> str:
        return self.spec.accelerator

    def use_accelerator(self, accelerator: Accelerator) -> None:
        if accelerator != self.spec.accelerator:
            self.spec = dataclasses.replace(self.spec, accelerator=accelerator)

    def template_bytes(self) -> int:
        return 0

    def status_metadata(self) -> list[tuple[str, str]]:
        return []

    async def close(self) -> None:
        pass  # nothing beyond its VMs, which the pool stops

    def create(self, **template: Any) -> VM:
        """A VM to boot (not started yet); `template` are templating's VM arguments."""
        cid = self.cids.take() if self.spec.agent_channel == "vsock" else None
        vm = VM(self.spec, state_dir=self.state_dir, vm_storage=self.vm_storage, log=log,
                cid=cid, **template)
        if cid is not None:
            # A CID is ours until the VM is handed out (then its receiver's, until QEMU
            # exits) or gone.
            vm.process.on_end(lambda: self.cids.give_back(cid))
        return vm

    def probe_for(self, vm: VM) -> ReadinessProbe:
        if self.config.daemon.ready_probe == "serial":
            return SerialLineProbe(self.config.daemon.ready_line)
        timeout = self.config.daemon.ready_timeout
        if vm.proxy is not None:
            return KataAgentProbe(vm.proxy.url, timeout + PROBE_DEADLINE_MARGIN)
        if self.config.daemon.kata_version == "3.x":
            # Kata 3.x's agent speaks ttrpc on its vsock port (kata_agent.go agentURL:
            # vsock://<cid>:1024); check_host refuses a 3.x agent on a host without vsock.
            if vm.cid is None:
                raise LaunchError(f"VM {vm.id} has no vsock device: Kata 3.x's agent is "
                                  "reached over vsock only", argv=vm.process.argv)
            return KataTtrpcProbe(VsockAddress(vm.cid, AGENT_VSOCK_PORT))
        # Kata 1.x's agent URL over vsock (kata_agent.go agentURL: vsock://<cid>:<port>),
        # in gRPC's own spelling of a vsock target.
        return KataAgentProbe(f"vsock:{vm.cid}:{AGENT_VSOCK_PORT}",
                              timeout + PROBE_DEADLINE_MARGIN)

    def start_virtiofsd(self, vm: VM) -> None:
        """qemu.go (1.x startSandbox, 3.x StartVM): virtiofsd on its listener, just before
        QEMU, which connects to it at start-up."""
        if self.virtiofsd is None:
            return
        vm.virtiofsd = Virtiofsd(generation=self.spec.generation, paths=vm.paths,
                                 log=vm.log, **self.virtiofsd)
        vm.virtiofsd.on_exit(vm.virtiofsd_exited)
        vm.virtiofsd.start(vm.priority)
        vm.write_record()

    def start_proxy(self, vm: VM) -> None:
        """Kata 1.x's setupProxy: once QEMU has created kata.sock, before the agent check."""
        if self.proxy is None:
            return
        kata_proxy = kata.vm_config(self.config.document, "1.x")["ProxyConfig"]
        vm.proxy = KataProxy(self.proxy, vm.id, vm.paths, debug=bool(kata_proxy["Debug"]),
                             log=vm.log)
        vm.proxy.start(vm.priority)
        vm.write_record()

    async def boot(self, vm: VM, *, pause: bool = True) -> None:
        """booting -> ready (paused, guest ready; still running with `pause=False`, for
        the template, which disconnects from its agent first); on failure the VM is stopped
        and removed."""
        vm.require(VMState.BOOTING)
        started = time.monotonic()
        timeout = self.config.daemon.ready_timeout
        probe = None
        try:
            vm.claim()
            self.start_virtiofsd(vm)
            await self.start_qemu(vm)
            vm.write_record()
            self.start_proxy(vm)
            probe = self.probe_for(vm)
            await probe.attach(vm.paths)
            await vm.process.execute("cont")
            await self.wait_ready(vm, probe, timeout)
            if pause:
                await vm.process.execute("stop")
            booted(vm, started, paused=pause)
        except BaseException as exc:
            await abandon(vm, exc, self.config.daemon.stop_timeout)
            raise
        finally:
            if probe is not None:
                await probe.close()
        if isinstance(probe, KataAgentProbe | KataTtrpcProbe):
            vm.log.info("the agent answered its health check (%s)", probe.answer)

    async def start_qemu(self, vm: VM) -> None:
        """QEMU's start; when it fails because its virtiofsd has exited (QEMU then cannot
        connect to the vhost-user socket), virtiofsd's own reason is the boot's."""
        try:
            await vm.process.start()
        except LaunchError as exc:
            code = vm.virtiofsd.exited_now() if vm.virtiofsd is not None else None
            if code is None:
                raise
            # Started with --syslog, as Kata starts it: its reasons are in the journal.
            said = vm.virtiofsd.last_words() or "its reasons went to syslog (journalctl -t " \
                "virtiofsd)"
            raise LaunchError(f"virtiofsd exited with {code} before QEMU connected: {said}",
                              argv=vm.virtiofsd.argv) from exc

    async def wait_ready(self, vm: VM, probe: ReadinessProbe, timeout: float) -> None:
        """The guest's signal (`probe`) within `timeout`; LaunchError as soon as QEMU or
        one of the VM's companions (kata-proxy, virtiofsd) exits, GuestNotReady at the
        timeout."""
        ready = asyncio.ensure_future(probe.wait())
        exited = asyncio.ensure_future(vm.process.wait())
        # A kata-proxy that exits leaves the agent unreachable, a virtiofsd the share:
        # the boot fails now, not at its timeout.
        gone = {asyncio.ensure_future(c.wait()): c for c in vm.companions}
        watched = {ready, exited, *gone}
        try:
            done, _ = await asyncio.wait(watched, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watched:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
            for task in watched - {ready}:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if ready in done and not ready.cancelled() and ready.exception() is None:
            return
        if ready in done:
            # The guest's serial port closing is usually QEMU exiting (a guest panic with
            # -no-reboot); its exit code and log say more than the closed port does.
            await vm.process.wait(1.0)
        if exited in done or not vm.process.running:
            raise LaunchError("QEMU exited before the guest was ready", argv=vm.process.argv,
                              returncode=vm.process.returncode,
                              log_tail=vm.process.log_tail())
        for task, companion in gone.items():
            if task in done:
                said = companion.last_words()
                awaited = "the agent answered" if companion is vm.proxy else "the guest was ready"
                raise LaunchError(f"{companion.what} exited with {companion.returncode} before "
                                  f"{awaited}{': ' + said if said else ''}",
                                  argv=companion.argv)
        if ready in done:
            raise LaunchError(f"guest readiness probe failed: {ready.exception()}",
                              argv=vm.process.argv)
        raise self._not_ready(vm, probe, timeout)

    def _not_ready(self, vm: VM, probe: ReadinessProbe, timeout: float) -> GuestNotReady:
        accel = self.spec.accelerator
        said = getattr(probe, "seen", [])
        hint = ""
        if accel == "kvm":
            hint = ("; guests hang under KVM on some hosts: set accelerator = \"tcg\" "
                    "in [vmcache] if this keeps happening")
            if self.auto and not said:
                self.spec = spec_from_config(self.config, "tcg")
                log.warning("accelerator auto: the guest did not come up under KVM in %g s; "
                            "using TCG for the next boots", timeout)
        elif accel == "tcg":
            hint = "; under TCG (software emulation) boots are slow: raise ready_timeout"
        last = f" (last guest output: {said[-1].decode(errors='replace')!r})" if said else ""
        return GuestNotReady(f"guest not ready after {timeout:g} s under {accel.upper()}"
                             f"{last}{hint}", argv=vm.process.argv)
