"""What Kata's two command lines (line1.py for 1.x, line3.py for 3.x) share: the names
kata-runtime looks for on a factory VM (the shared directory's tag, the agent's channel
and vsock port, the PCI bridges' addresses), QEMU's option syntax (`opt_value`), the
virtio-fs device both generations add the same way but for two options, Kata's refusal of
templating with shared memory, and the host fact that makes every virtio device legacy.

Anything one generation writes differently belongs to that generation's line; what is
here is written once so the two lines cannot drift apart on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .paths import VMPaths
    from .spec import VMSpec

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
    char = f"char-{uuid_hex(uuid)}"
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


def argv_lines(argv: Sequence[str]) -> list[str]:
    """The argument list one option per line, for `check-config` and the README."""
    lines: list[str] = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("-"):  # values never do: paths are absolute
            lines.append(arg)
        else:
            lines[-1] += f" {arg}"
    return lines


def uuid_hex(uuid: str) -> str:
    """16 hex digits (Kata draws 8 random bytes) from the VM's random UUID."""
    return uuid.replace("-", "")[:16]
