"""The configuration the rest of the program trusts: frozen dataclasses, one per table.

Only `load()` (loader.py) builds a `Config` from a file, after every check has passed;
nothing downstream re-validates what it holds. Each setting is documented where it is
declared here and in etc/configuration.toml.

Two values are the host's, not the file's, and are read when asked for: QEMU's maxmem (the
host's memory plus Kata's room for an NVDIMM) and the memory budget's default (half of the
host's MemTotal), which `cache_target` and `budget_note` weigh against one VM's memory.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .. import kata
from .keys import KATA_VM_STORAGE_PATH
from .values import is_int

#: `[vmcache] accelerator` as written. "auto" is decided on the host (KVM when /dev/kvm is
#: usable, else TCG, factory/host.py), so a VM is launched with one of the other two:
#: the VM's `Accelerator` (vm/), which cannot say "auto".
AcceleratorSetting = Literal["auto", "kvm", "tcg"]
ReadyProbe = Literal["kata-agent", "serial"]
GuestAgent = Literal["kata", "none"]
#: The Kata generation the file is for: kata/'s `Generation`, under the key's name.
KataVersion = kata.Generation
LogFormat = Literal["text", "json"]
BootPriority = Literal["idle", "normal"]

#: qemu.go genericMemoryTopology: maxmem has 1024 MiB above the host's memory for an NVDIMM.
NVDIMM_ROOM_MIB = 1024


@dataclass(frozen=True)
class HypervisorSettings:
    """`[hypervisor.qemu]`, resolved the way Kata resolves it."""

    #: QEMU binary (Kata: `path`; unset: the generation's default, 1.x qemu-lite).
    path: Path
    #: Guest kernel (Kata: `kernel`).
    kernel: Path
    #: Initramfs; exactly one of initrd and image is set (Kata: `initrd`).
    initrd: Path | None
    #: Root disk image, attached read-only as Kata does (Kata: `image`).
    image: Path | None
    #: QEMU machine type (Kata: `machine_type`, default 1.x "pc", 3.x "q35").
    machine_type: str
    #: Extra kernel command line, split on white space (Kata: `kernel_params`).
    kernel_params: tuple[str, ...]
    #: vCPUs a VM boots with (Kata: `default_vcpus`; 0 -> 1, <0 or > host CPUs -> host CPUs;
    #: 3.x takes a fraction and boots it rounded up).
    vcpus: int
    #: vCPU hot-plug ceiling (Kata: `default_maxvcpus`; 0 or > host CPUs -> host CPUs).
    max_vcpus: int
    #: Boot memory in MiB (Kata: `default_memory`; under 256 -> 2048).
    memory_mib: int
    #: DIMM slots for memory hot-plug (Kata: `memory_slots`, 0 -> 10).
    memory_slots: int
    #: Kata's `enable_debug`: keeps the guest console verbose.
    debug: bool

    # path, kernel, vcpus, max_vcpus, memory_mib and memory_slots are `kata.resolve()`'s
    # values for the file's Kata generation: the Config reply carries the same ones.


@dataclass(frozen=True)
class FactorySettings:
    """`[factory]`."""

    #: VMs kept booted and paused (Kata: `vm_cache_number`; 0 disables the cache).
    vm_cache_number: int
    #: gRPC Unix socket (Kata: `vm_cache_endpoint`).
    vm_cache_endpoint: Path
    #: Clone VMs from a saved template VM (Kata: `enable_template`).
    enable_template: bool
    #: Where the template's memory and device state live (Kata: `template_path`).
    template_path: Path


@dataclass(frozen=True)
class AutoscaleSettings:
    """`[vmcache] autoscale`, `min_ready`, `max_ready`, `shrink_after` (autoscale.py)."""

    #: Size the pool from demand; false: vm_cache_number is the fixed target (Kata's way).
    enabled: bool = False
    #: Bounds of the target while autoscaling (the memory budget still wins).
    min_ready: int = 1
    max_ready: int = 16
    #: Seconds without demand for them before surplus ready VMs are stopped.
    shrink_after: float = 60.0


@dataclass(frozen=True)
class DaemonSettings:
    """`[vmcache]`: what Kata has no key for. Documented in etc/configuration.toml."""

    #: "kvm", "tcg", or "auto" (KVM when /dev/kvm is usable, else TCG).
    accelerator: AcceleratorSetting = "auto"
    #: Seconds from QEMU start to the guest's ready signal before the boot counts as failed.
    ready_timeout: float = 30.0
    #: Runtime state: one directory per VM (QMP, console, record) for crash recovery.
    state_dir: Path = Path("/run/kata-vmcache")
    #: VMs booting at the same time.
    boot_parallelism: int = 2
    #: CPU priority of boots made ahead of demand: "idle" (nice 19, and their session's
    #: autogroup: they never take a core a sandbox wants) or "normal". A boot a caller
    #: waits for, and every handed-out VM, runs at normal priority either way (priority.py).
    boot_priority: BootPriority = "idle"
    #: Seconds QEMU gets to exit after QMP `quit` before it is killed.
    stop_timeout: float = 3.0
    #: How readiness is decided: "kata-agent" (the agent answers its health check, as
    #: Kata's NewVM asks before pausing) or "serial" (a line on our second serial port, as
    #: the bundled demo guest prints). Default: "kata-agent" with guest_agent = "kata".
    ready_probe: ReadyProbe = "kata-agent"
    #: The line the guest prints when it is up ("serial" probe).
    ready_line: str = "KATA-VMCACHE-READY"
    #: Hot-plug memory ceiling in MiB; 0 means Kata's (Config.max_memory_mib).
    max_memory_mib: int = 0
    #: The most guest memory in MiB the daemon commits: the configured memory of every VM
    #: it keeps or boots (hot-plug headroom not counted). 0: half of the host's MemTotal.
    memory_budget_mib: int = 0
    #: Permission bits of the gRPC socket.
    socket_mode: int = 0o600
    #: Group owning the gRPC socket (a non-root runtime group with socket_mode 0660).
    socket_group: str = ""
    #: Log lines as "text" or "json".
    log_format: LogFormat = "text"
    #: Kata's RunVMStoragePath: each VM's sockets, pid file and shared directory live in
    #: `<vm_storage_path>/<vm id>/`, where kata-runtime looks for them (Kata 1.x's
    #: kata-proxy sockets in `<its parent>/sbs/<vm id>/`).
    vm_storage_path: Path = Path(KATA_VM_STORAGE_PATH)
    #: "kata": the guest image runs Kata's agent (a proxy is started for 1.x, readiness
    #: is its health check); "none": a guest without one (the demo guest).
    guest_agent: GuestAgent = "kata"
    #: Which Kata generation the file is for ([proxy.*] or [shim.*] present: 1.x): how the
    #: file is read, which generation's `Config` payload is sent and which device model
    #: its VMs get.
    kata_version: KataVersion = "3.x"
    #: Where kata_version came from, for check-config.
    kata_version_origin: str = "detected: no [proxy.*] or [shim.*] table"
    #: "host:port" serving Prometheus's /metrics (metrics.py); "" serves none.
    metrics_address: str = ""
    #: The pool's target from demand (autoscale.py); off by default.
    autoscale: AutoscaleSettings = AutoscaleSettings()


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: Path | None
    hypervisor: HypervisorSettings
    factory: FactorySettings
    daemon: DaemonSettings
    #: The parsed document, for rebuilding Kata's JSON exactly as Kata's loader sees it.
    document: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def kata_vm_config(self) -> dict[str, Any]:
        """The `Config` payload: Kata's VMConfig JSON for the file's generation (a fresh
        copy: the caller may change it)."""
        return kata.vm_config(self.document, self.daemon.kata_version)

    @functools.cached_property
    def kata_hypervisor(self) -> Mapping[str, Any]:
        """Kata's HypervisorConfig for this file, as the file's generation's loader derives
        it: derived once per configuration, and read (never changed) by everything that
        builds or checks its VM."""
        return MappingProxyType(kata.hypervisor_config(self.document, self.daemon.kata_version))

    @functools.cached_property
    def kata_proxy(self) -> Mapping[str, Any]:
        """Kata 1.x's ProxyConfig for this file (Path, Debug), derived once."""
        return MappingProxyType(kata.proxy_config(self.document)[1])

    @property
    def max_memory_mib(self) -> int:
        """QEMU's maxmem: `[vmcache] max_memory`, else Kata's (genericMemoryTopology): the
        host's memory plus memory_offset plus 1024 MiB, the room an image's NVDIMM needs."""
        if self.daemon.max_memory_mib:
            return self.daemon.max_memory_mib
        qemu = self.document.get("hypervisor", {}).get("qemu", {})
        offset = qemu.get("memory_offset", 0) if isinstance(qemu, Mapping) else 0
        offset = offset if is_int(offset) else 0
        return host_memory_mib() + offset + NVDIMM_ROOM_MIB

    @property
    def memory_budget_mib(self) -> int:
        """[vmcache] memory_budget_mib, or its default: half of the host's MemTotal."""
        return self.daemon.memory_budget_mib or default_memory_budget_mib()

    @property
    def cache_target(self) -> int:
        """The VMs kept ready: vm_cache_number, or as many as the memory budget holds."""
        return min(self.factory.vm_cache_number,
                   self.memory_budget_mib // self.hypervisor.memory_mib)

    def budget_note(self) -> str:
        """Why fewer than vm_cache_number VMs are kept, naming the numbers; "" if not."""
        wanted, kept = self.factory.vm_cache_number, self.cache_target
        if kept >= wanted:
            return ""
        memory = self.hypervisor.memory_mib
        return (f"keeping {kept} VM{'' if kept == 1 else 's'} ready, not vm_cache_number = "
                f"{wanted}: memory_budget_mib = {self.memory_budget_mib} holds {kept} of "
                f"{memory} MiB ({wanted} would need {wanted * memory} MiB)")


def host_memory_mib() -> int:
    """The host's MemTotal in MiB (sysconf's physical pages are what /proc/meminfo says)."""
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))


def default_memory_budget_mib() -> int:
    """memory_budget_mib's default: half of MemTotal, so a cache never takes the host."""
    return host_memory_mib() // 2
