"""The demo guest's configuration.toml (`render_config`): Kata's tables for it (valid for
kata-runtime too), with the kernel command line it boots with (`KERNEL_PARAMS`), plus our
[vmcache] table. `CONFIG_HEADER` opens every file written for it, so `demo-guest` knows
one it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .guest import DemoGuest

# The demo guest's kernel command line. Measured under TCG on the build machine (2 cores,
# QEMU 7.2, Debian 6.1 cloud kernel, median of 5 boots, `cont` to KATA-VMCACHE-READY):
# "console=ttyS0 panic=-1" alone 2.2 s; with these parameters 1.7 s (q35 and pc alike).
# - console=ttyS0: kernel messages and the guest's shell go to the first serial port, the
#   VM's console socket; ttyS1 is left to the agent.
# - quiet: every byte printed on an emulated UART costs guest time (-0.1 s).
# - panic=-1: a guest that panics reboots at once; under QEMU's -no-reboot the VM then
#   exits and is seen as dead, instead of hanging with a panic message.
# - cryptomgr.notests: the Debian kernel self-tests its crypto algorithms at boot, which
#   is slow under TCG (-0.25 s).
# - swiotlb=1024: a 2 MiB DMA bounce buffer instead of 64 MiB. The kernel reserves one
#   because hot-pluggable memory lies above 4 GiB; zeroing 64 MiB under TCG takes 0.1 to
#   0.3 s, and the guest (which has no DMA devices) gets 64 MiB more of its 256 MiB.
# - nowatchdog: a TCG vCPU starved by a busy host (a cache boots VMs in parallel) looks
#   like a soft lockup; the splats would only fill the console.
# Tried without a measurable gain, so left out: mitigations=off, tsc=reliable,
# no_timer_check, i8042.noaux/nokbd/nopnp, init_on_alloc=0, audit=0.
KERNEL_PARAMS = "console=ttyS0 quiet panic=-1 cryptomgr.notests swiotlb=1024 nowatchdog"

CONFIG_HEADER = "# Written by `kata-vmcache demo-guest`"


def render_config(guest: DemoGuest, *, endpoint: Path, state_dir: Path, cache_number: int = 2,
                  accelerator: str = "tcg", **ours: object) -> str:
    """A configuration.toml for the demo guest: Kata's tables (valid for kata-runtime too)
    plus our [vmcache] table. Extra keyword arguments become [vmcache] keys."""
    qemu = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
    settings: dict[str, object] = {
        "accelerator": accelerator,
        "state_dir": str(state_dir),
        # Beside the state directory, not Kata's /run/vc/vm: the demo guest has no Kata
        # agent, so no kata-runtime could use these VMs, and a test must not leave files
        # where a real Kata host keeps its VMs.
        "vm_storage_path": str(state_dir.parent / "vm"),
        # No Kata agent in the demo guest: no proxy, no agent health check; it signals
        # readiness on our serial port instead (Kata's devices are there all the same).
        "guest_agent": "none",
        "ready_probe": "serial",
        # TCG on a busy 2-core host can take several times the ~3 s of an idle one.
        "ready_timeout": 60.0,
        **ours,
    }
    lines = "\n".join(f"{key} = {_toml_value(value)}" for key, value in settings.items())
    return f"""{CONFIG_HEADER} for the bundled demo guest.
# A Kata Containers configuration (kata-runtime loads it too) plus kata-vmcache's own
# [vmcache] table; etc/configuration.toml in the source tree documents every key.

[hypervisor.qemu]
path = "{qemu}"
kernel = "{guest.kernel}"
initrd = "{guest.initrd}"
machine_type = "q35"
# Kata 3.x's default is virtio-fs, which needs a virtiofsd per VM (its loader refuses the
# file without virtio_fs_daemon, and 3.x starts the Rust virtiofsd); virtio-9p is 1.x's
# default, and fine for both.
shared_fs = "virtio-9p"
kernel_params = "{KERNEL_PARAMS}"
default_vcpus = 1
# 0: as many as the host has (Kata's rule); headroom for vCPU hot-plug.
default_maxvcpus = 0
default_memory = 256
memory_slots = 4
enable_debug = false

[agent.kata]

[runtime]

[factory]
enable_template = false
vm_cache_number = {cache_number}
vm_cache_endpoint = "{endpoint}"

[vmcache]
{lines}
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string
