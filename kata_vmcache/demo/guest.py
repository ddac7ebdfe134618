"""The bundled demo guest: the host's own kernel plus a busybox initramfs, in a directory.

`build_demo_guest(dest)` makes, from the host's distribution packages only:

- `dest/vmlinuz`: a copy of the host kernel (the newest `/boot/vmlinuz-*` unless given;
  kernel.py);
- `dest/initrd.img`: a gzip'd newc cpio archive (cpio.py, in pure Python) holding busybox,
  the guest's `/init` and, when the kernel has them, the modules the guest needs to mount a
  virtio-fs share (its `share` command): initramfs.py lays it out.

The archive is deterministic (sorted entries, fixed inode numbers, owners and mtimes, a
gzip header without time or name): the same inputs give the same bytes. A stamp in `dest`
records a digest of the inputs and of the outputs; when both still match, nothing is
rewritten, so running it on every `make setup` is cheap. Outputs are replaced atomically.

`build_demo(dest)` is the `demo-guest DIR` command: the guest plus `dest/configuration.toml`
for it (config.py), its accelerator chosen once by booting the guest under KVM
(`probe_accelerator`).

The guest boots with `demo_config.KERNEL_PARAMS`: a root shell on the console (ttyS0, the
VM's console socket) and the agent on the second serial port (ttyS1), which says
`KATA-VMCACHE-READY` when the guest is up. `guest_channel.GuestChannel` is the host side of
that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import DemoGuestError, VmcacheError
from .config import CONFIG_HEADER, KERNEL_PARAMS, render_config
from .initramfs import (
    DEFAULT_BUSYBOX,
    busybox_applets,
    check_static_busybox,
    init_script,
    initramfs,
)
from .kernel import DEFAULT_MODULES_ROOT, check_kernel, find_kernel, kernel_version, share_modules

log = logging.getLogger(__name__)

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
CONFIG_NAME = "configuration.toml"
STAMP_NAME = ".demo-guest.json"

# Bump when the archive layout changes, so existing builds are redone.
BUILD_FORMAT = 2


@dataclass(frozen=True)
class DemoGuest:
    """Where a built demo guest lives. `config` is where its configuration.toml goes
    (written by whoever renders it, not by `build_demo_guest`)."""

    kernel: Path
    initrd: Path
    config: Path


def build_demo_guest(dest: Path, *, kernel: Path | None = None,
                     busybox: Path | None = None,
                     modules_root: Path = DEFAULT_MODULES_ROOT) -> DemoGuest:
    """Build (or find up to date) the demo guest in `dest`; see the module docstring.
    `modules_root` is where the kernel's modules are looked for (`<root>/<version>/`)."""
    kernel = find_kernel() if kernel is None else kernel
    busybox = DEFAULT_BUSYBOX if busybox is None else busybox
    kernel_bytes = _read_input(kernel, "kernel")
    check_kernel(kernel, kernel_bytes)
    busybox_bytes = _read_input(busybox, "busybox")
    check_static_busybox(busybox, busybox_bytes)
    init = init_script()
    modules = share_modules(kernel_version(kernel), modules_root)

    guest = DemoGuest(kernel=dest / KERNEL_NAME, initrd=dest / INITRD_NAME,
                      config=dest / CONFIG_NAME)
    inputs = hashlib.sha256()
    for part in (str(BUILD_FORMAT).encode(), kernel_bytes, busybox_bytes, init,
                 *(p for m in modules for p in (m.name.encode(), m.data))):
        inputs.update(hashlib.sha256(part).digest())
    inputs_digest = inputs.hexdigest()
    if _up_to_date(dest, guest, inputs_digest):
        return guest

    applets = busybox_applets(busybox)
    initrd = gzip.compress(initramfs(busybox_bytes, init, applets, modules),
                           compresslevel=9, mtime=0)
    dest.mkdir(parents=True, exist_ok=True)
    _write_atomically(guest.kernel, kernel_bytes)
    _write_atomically(guest.initrd, initrd)
    stamp = {
        "format": BUILD_FORMAT,
        "inputs": inputs_digest,
        "kernel_source": str(kernel),
        "busybox_source": str(busybox),
        "modules": [m.name for m in modules],
        KERNEL_NAME: hashlib.sha256(kernel_bytes).hexdigest(),
        INITRD_NAME: hashlib.sha256(initrd).hexdigest(),
    }
    _write_atomically(dest / STAMP_NAME, (json.dumps(stamp, indent=2) + "\n").encode())
    return guest


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        hint = (" (install busybox-static)" if what == "busybox"
                else " (install linux-image-cloud-amd64)")
        raise DemoGuestError(f"{what} {path} does not exist{hint}") from None
    except PermissionError:
        raise DemoGuestError(f"cannot read {what} {path}: permission denied") from None
    except IsADirectoryError:
        raise DemoGuestError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise DemoGuestError(f"cannot read {what} {path}: {exc.strerror}") from None


# --- output -------------------------------------------------------------------------------

def _up_to_date(dest: Path, guest: DemoGuest, inputs_digest: str) -> bool:
    try:
        stamp = json.loads((dest / STAMP_NAME).read_text())
        if stamp.get("format") != BUILD_FORMAT or stamp.get("inputs") != inputs_digest:
            return False
        return all(hashlib.sha256(path.read_bytes()).hexdigest() == stamp.get(path.name)
                   for path in (guest.kernel, guest.initrd))
    except (OSError, ValueError, AttributeError):
        return False


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- the demo-guest command ------------------------------------------------------------

#: How long `demo-guest` lets the guest come up under KVM before it settles on TCG.
KVM_PROBE_SECONDS = 10.0


@dataclass(frozen=True)
class DemoBuild:
    guest: DemoGuest
    config: Path
    accelerator: str


def build_demo(dest: Path, *, cache_number: int = 2) -> DemoBuild:
    """The `demo-guest DIR` command: the guest, and DIR/configuration.toml for it.

    An existing configuration written by us for the same guest is kept as it is (the user
    may have edited it); the accelerator is chosen once, by booting the guest under KVM
    and falling back to TCG when it does not come up (as on hosts where KVM guests hang).
    """
    dest = dest.resolve()
    guest = build_demo_guest(dest)
    config = dest / CONFIG_NAME
    if config.exists():
        text = config.read_text()
        # One written before shared_fs (Kata 3.x would read virtio-fs) or guest_agent (the
        # default, "kata", would want an agent the demo guest does not have) is redone.
        if (text.startswith(CONFIG_HEADER) and f'initrd = "{guest.initrd}"' in text
                and "\nshared_fs = " in text and "\nguest_agent = " in text):
            accel = "kvm" if 'accelerator = "kvm"' in text else "tcg"
            return DemoBuild(guest, config, accel)
    accel = asyncio.run(probe_accelerator(guest))
    _write_atomically(config, render_config(
        guest, endpoint=dest / "cache.sock", state_dir=dest / "state",
        cache_number=cache_number, accelerator=accel).encode())
    return DemoBuild(guest, config, accel)


async def probe_accelerator(guest: DemoGuest, timeout: float = KVM_PROBE_SECONDS) -> str:
    """"kvm" if the demo guest comes up under KVM within `timeout`, else "tcg"."""
    from ..factory.host import kvm_usable
    from ..vm.guest_channel import READY_LINE
    from ..vm.paths import VMPaths
    from ..vm.probe import SerialLineProbe
    from ..vm.qemu import QemuProcess
    from ..vm.spec import VMSpec

    if not kvm_usable():
        return "tcg"
    spec = VMSpec(qemu=Path(shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"),
                  kernel=guest.kernel, initrd=guest.initrd, image=None, machine_type="q35",
                  kernel_params=tuple(KERNEL_PARAMS.split()), vcpus=1, max_vcpus=1,
                  memory_mib=256, memory_slots=0, max_memory_mib=256, accelerator="kvm",
                  agent_channel="", own_serial=True)
    with tempfile.TemporaryDirectory(prefix="kvc-probe-") as tmp:
        paths = VMPaths(dir=Path(tmp) / "vm", own=Path(tmp) / "own", sandbox=Path(tmp) / "sbs")
        probe = SerialLineProbe(READY_LINE)
        try:
            async with QemuProcess(spec.argv("kvmprobe0000", str(uuid.uuid4()), paths), paths,
                                   log=log) as qemu:
                await probe.attach(paths)
                await qemu.execute("cont")
                await asyncio.wait_for(probe.wait(), timeout)
                return "kvm"
        except (TimeoutError, VmcacheError, OSError) as exc:
            log.warning("the demo guest did not come up under KVM (%s); using TCG",
                        str(exc) or f"no ready signal in {timeout:g} s")
            return "tcg"
        finally:
            await probe.close()
