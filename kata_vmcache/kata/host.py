"""The host facts Kata's loader reads: CPUs, memory, the architecture's vCPU limit and the
vsock device nodes.

Kata's defaults depend on the machine it runs on (default_vcpus = 0 means "all host CPUs",
default_maxmemory = 0 "all host memory", use_vsock only sticks where vsock exists), so the
`Config` payload does too. Each fact is a module function so that tests can pin it:
the derivations call them through this module (`host._go_num_cpu()`), and a test patches
them here (`monkeypatch.setattr(host, "_host_memory_mib", ...)`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

#: 1.x MaxQemuVCPUs() per GOARCH (virtcontainers/qemu_<arch>.go). arm64 is gicList[GICv3].
#: Unknown architectures get amd64's value.
_MAX_QEMU_VCPUS: Final[Mapping[str, int]] = MappingProxyType({
    "x86_64": 240, "amd64": 240,
    "aarch64": 123, "arm64": 123,
    "ppc64le": 128,
    "s390x": 248,
    "loongarch64": 256,
})
#: 3.30.0 govmm.MaxVCPUs() (pkg/govmm/vmm_<arch>.go; arm64: gicList[defaultGICVersion 3]).
_MAX_QEMU_VCPUS_3X: Final[Mapping[str, int]] = MappingProxyType({
    "x86_64": 240, "amd64": 240,
    "aarch64": 123, "arm64": 123,
    "ppc64le": 128,
    "s390x": 248,
    "riscv64": 512,
})

#: 1.x utils.SupportsVsocks(): both device nodes must exist.
_VSOCK_DEVICES: Final = ("/dev/vsock", "/dev/vhost-vsock")
#: 3.x utils.SupportsVsocks() stats only this one; without it the QEMU loader fails.
VHOST_VSOCK_DEVICE: Final = "/dev/vhost-vsock"



def _go_num_cpu() -> int:
    """Go's runtime.NumCPU(): the CPUs in the process's affinity mask (1.x uses this)."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:  # pragma: no cover - no affinity support
        return os.cpu_count() or 1


def _host_cpus_3x() -> int:
    """3.x getHostCPUs(): the lines of /proc/cpuinfo starting with "processor" (the online
    CPUs, whatever the affinity mask), or Go's NumCPU when the file cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f if line.startswith("processor"))
    except OSError:
        return _go_num_cpu()


def _max_qemu_vcpus() -> int:
    return _MAX_QEMU_VCPUS.get(platform.machine(), 240)


def _max_qemu_vcpus_3x() -> int:
    return _MAX_QEMU_VCPUS_3X.get(platform.machine(), 240)


def _is_arm64() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def _host_memory_mib() -> int:
    """3.x memory.TotalMemory() / MiB (sysinfo totalram, which is what sysconf reports)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)
    except (OSError, ValueError):  # pragma: no cover - sysconf name unknown
        return 0


def _host_supports_vsock() -> bool:
    return all(os.path.exists(p) for p in _VSOCK_DEVICES)


def host_has_vhost_vsock() -> bool:
    """3.x's SupportsVsocks(): its QEMU loader refuses every file on a host without it."""
    return os.path.exists(VHOST_VSOCK_DEVICE)

