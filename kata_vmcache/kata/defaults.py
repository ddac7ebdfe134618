"""Kata's defaults and fixed names: what each generation's loader puts where the file says
nothing, and the strings Kata compares verbatim.

They live apart from the derivations because both generations share most of them (3.x
changed only some defaults; the `_3X` names are those) and because other layers name them
too: the config validator's messages and the VM's fallbacks must say what Kata would do.
Values are Kata's literals, each with the Go name or file it comes from.
"""

from __future__ import annotations

from typing import Final

# --- Kata 1.x defaults: pkg/katautils/config-settings.go.in (literal values, not filled in
# by the Makefile in 1.x) ---------------------------------------------------------------
DEFAULT_HYPERVISOR_PATH: Final = "/usr/bin/qemu-lite-system-x86_64"
DEFAULT_KERNEL_PATH: Final = "/usr/share/kata-containers/vmlinuz.container"
DEFAULT_MACHINE_TYPE: Final = "pc"
DEFAULT_VCPUS: Final = 1
DEFAULT_MEMORY_MIB: Final = 2048
DEFAULT_MEM_SLOTS: Final = 10
DEFAULT_BRIDGES: Final = 1
DEFAULT_BLOCK_DEVICE_DRIVER: Final = "virtio-scsi"
DEFAULT_MSIZE_9P: Final = 8192
DEFAULT_ENTROPY_SOURCE: Final = "/dev/urandom"
DEFAULT_VIRTIO_FS_CACHE: Final = "none"
#: sharedFS() default.
DEFAULT_SHARED_FS: Final = "virtio-9p"
DEFAULT_VHOST_USER_STORE_PATH: Final = "/var/run/kata-containers/vhost-user/"
DEFAULT_PROXY_PATH: Final = "/usr/libexec/kata-containers/kata-proxy"
#: create.go: systemd.unit=<systemdUnitName>, only when booting from an image.
SYSTEMD_UNIT_NAME: Final = "kata-containers.target"

#: config.go maxPCIBridges: default_bridges is capped here (both generations).
MAX_PCI_BRIDGES: Final = 5
#: hypervisor.go MinHypervisorMemory: smaller default_memory values fall back to 2048.
MIN_HYPERVISOR_MEMORY_MIB: Final = 256

# --- Kata 3.30.0 defaults (src/runtime/pkg/katautils/config-settings.go.in) where they
# differ from 1.x or are 3.x-only ---------------------------------------------------------
DEFAULT_HYPERVISOR_PATH_3X: Final = "/usr/bin/qemu-system-x86_64"
DEFAULT_MACHINE_TYPE_3X: Final = "q35"
DEFAULT_VIRTIO_FS_CACHE_3X: Final = "never"
#: sharedFS(): config.VirtioFS, which needs virtio_fs_daemon.
DEFAULT_SHARED_FS_3X: Final = "virtio-fs"
DEFAULT_ROOTFS_TYPE_3X: Final = "ext4"
DEFAULT_BLOCK_DEVICE_AIO_3X: Final = "io_uring"
DEFAULT_HYPERVISOR_LOGLEVEL_3X: Final = 1
DEFAULT_MEASUREMENT_ALGO_3X: Final = "sha512"
#: config.PCIePort NoPort, for hot_plug_vfio / cold_plug_vfio.
DEFAULT_VFIO_PORT_3X: Final = "no-port"
MAX_PCIE_ROOT_PORTS_3X: Final = 16
MAX_PCIE_SWITCH_PORTS_3X: Final = 16
MAX_HYPERVISOR_LOGLEVEL_3X: Final = 3
#: kata_agent.go kernelParamDebugConsole{,VPort,VPortValue}.
DEBUG_CONSOLE_PARAMS_3X: Final = (("agent.debug_console", ""),
                                  ("agent.debug_console_vport", "1026"))
#: The loader's accepted values (blockDeviceDriver, blockDeviceAIO, sharedFS,
#: extraMonitorSocket); anything else fails the whole load.
BLOCK_DRIVERS_3X: Final = ("virtio-scsi", "virtio-blk", "virtio-mmio", "nvdimm",
                           "virtio-blk-ccw")
BLOCK_AIO_3X: Final = ("io_uring", "native", "threads")
SHARED_FS_3X: Final = ("virtio-9p", "virtio-fs", "virtio-fs-nydus", "none")
EXTRA_MONITOR_3X: Final = ("hmp", "qmp", "qmp-pretty")
#: virtcontainers QemuCCWVirtio: validateHypervisorConfig turns virtio-blk into
#: virtio-blk-ccw on this machine type.
MACHINE_TYPE_CCW: Final = "s390-ccw-virtio"

# --- names Kata compares verbatim ------------------------------------------------------------
HYPERVISOR_TYPE: Final = "qemu"
#: vc.KataContainersAgent; 1.x's GrpcToVMConfig refuses any other AgentType.
AGENT_TYPE: Final = "kata"
KATA_PROXY_TYPE: Final = "kataProxy"
NO_PROXY_TYPE: Final = "noProxy"

#: govmmQemu.MachineTypeMicrovm: no NVDIMM, so Kata forces disable_image_nvdimm.
MACHINE_TYPE_MICROVM: Final = "microvm"


def _default_memory(requested: int) -> int:
    """default_memory as both generations' loaders read it: below the floor, the default."""
    # 1.x as kata-vmcache has always derived it (runtime @0100af18); 3.x's defaultMemSz() is
    # the same rule. Kata 1.12.0 and later (runtime ab7f18d9) keep any non-zero value.
    return requested if requested >= MIN_HYPERVISOR_MEMORY_MIB else DEFAULT_MEMORY_MIB

