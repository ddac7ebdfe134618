"""The bundled demo guest: the host's own kernel plus a busybox initramfs.

`build_demo_guest(dest)` makes, from the host's distribution packages only:

- `dest/vmlinuz`: a copy of the host kernel (the newest `/boot/vmlinuz-*` unless given);
- `dest/initrd.img`: a gzip'd newc cpio archive, written here in pure Python, holding
  `/bin/busybox` (static, from busybox-static), a symlink per busybox applet, `/init`
  (`kata_vmcache/guest/init`, which also documents the agent protocol), `/dev/console` and
  the empty directories the init mounts over;
- in the same archive, the kernel modules the guest needs to mount a virtio-fs share (its
  `share` command): `virtiofs` and `virtio_pci` with everything they depend on, taken from
  `/lib/modules/<version>/` of the chosen kernel (the version is the file's
  `vmlinuz-<version>` name). They go to `/lib/modules/<name>.ko`, with
  `/lib/modules/share.load` naming them in load order. A kernel whose version cannot be
  told, or whose modules are missing or compressed (busybox's insmod takes plain `.ko`
  files), gets none, and the guest answers `share` with an error; modules built into the
  kernel (`modules.builtin`) need nothing.

The archive is deterministic (sorted entries, fixed inode numbers, owners and mtimes, a
gzip header without time or name): the same inputs give the same bytes. A stamp in `dest`
records a digest of the inputs and of the outputs; when both still match, nothing is
rewritten, so running it on every `make setup` is cheap. Outputs are replaced atomically.

The guest boots with `KERNEL_PARAMS`: a root shell on the console (ttyS0, the VM's console
socket) and the agent on the second serial port (ttyS1), which says `KATA-VMCACHE-READY`
when the guest is up. `guest_channel.GuestChannel` is the host side of that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DemoGuestError, VmcacheError

log = logging.getLogger(__name__)

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

KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
CONFIG_NAME = "configuration.toml"
STAMP_NAME = ".demo-guest.json"
DEFAULT_BOOT_DIR = Path("/boot")
DEFAULT_BUSYBOX = Path("/bin/busybox")
DEFAULT_MODULES_ROOT = Path("/lib/modules")
GUEST_INIT = Path(__file__).with_name("guest") / "init"
#: What the guest's `share` command needs: the virtio-fs file system and the PCI transport
#: its device sits on (Debian's cloud kernel has both as modules); dependencies follow.
SHARE_MODULES = ("virtio_pci", "virtiofs")
#: In the archive: the modules' directory, and the list of them in load order (read by
#: the guest's init).
GUEST_MODULES_DIR = "lib/modules"
GUEST_MODULES_LOAD = f"{GUEST_MODULES_DIR}/share.load"

# Bump when the archive layout changes, so existing builds are redone.
BUILD_FORMAT = 2
# Every entry of the archive gets this mtime (2020-01-01T00:00:00Z): reproducible bytes.
FIXED_MTIME = 1577836800


@dataclass(frozen=True)
class DemoGuest:
    """Where a built demo guest lives. `config` is where its configuration.toml goes
    (written by whoever renders it, not by `build_demo_guest`)."""

    kernel: Path
    initrd: Path
    config: Path


def init_script() -> bytes:
    """The guest's /init, shipped as package data."""
    # Beside this module (setuptools package data). Not importlib.resources: the package
    # has no __init__.py, and 3.11's reader fails on namespace packages.
    return GUEST_INIT.read_bytes()


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


# --- inputs -----------------------------------------------------------------------------

def find_kernel(boot: Path = DEFAULT_BOOT_DIR) -> Path:
    """The newest `boot/vmlinuz-*`, by kernel version (6.1.0-10 is newer than 6.1.0-9)."""
    candidates = [p for p in boot.glob("vmlinuz-*") if p.is_file()]
    if not candidates:
        raise DemoGuestError(f"no kernel found in {boot} (install linux-image-cloud-amd64)")
    return max(candidates, key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))


def kernel_version(kernel: Path) -> str | None:
    """The version of a `vmlinuz-<version>` kernel (followed through a symlink, such as
    Debian's /vmlinuz), or None when the name does not tell it."""
    for name in (kernel.name, kernel.resolve().name):
        version = name.removeprefix("vmlinuz-")
        if version != name and version:
            return version
    return None


@dataclass(frozen=True)
class KernelModule:
    name: str  # the module's name, as in /sys/module: "virtio_pci"
    data: bytes  # the uncompressed .ko file


def share_modules(version: str | None,
                  root: Path = DEFAULT_MODULES_ROOT) -> list[KernelModule]:
    """The modules of kernel `version` the guest loads to mount a virtio-fs share:
    SHARE_MODULES and what they depend on (`root/version/modules.dep`), dependencies
    first; those built into the kernel are left out. All or nothing: an empty list when
    one is missing or compressed, or the version is unknown."""
    if version is None:
        return []
    tree = root / version
    try:
        dep_lines = (tree / "modules.dep").read_text().splitlines()
    except OSError:
        log.info("no %s: the demo guest gets no virtio-fs modules", tree / "modules.dep")
        return []
    try:
        builtin = {_module_name(line) for line in
                   (tree / "modules.builtin").read_text().split()}
    except OSError:
        builtin = set()
    # name -> (path relative to `tree`, names of the modules it needs)
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in dep_lines:
        path, sep, needs = line.partition(":")
        if sep:
            deps[_module_name(path)] = (path.strip(), [_module_name(n) for n in needs.split()])

    order: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> bool:
        if name in builtin or name in seen:
            return True
        seen.add(name)
        if name not in deps or not all(add(need) for need in deps[name][1]):
            return False
        order.append(name)
        return True

    for wanted in SHARE_MODULES:
        if not add(wanted):
            log.info("kernel %s has no module %s (or one it needs): the demo guest "
                     "gets no virtio-fs modules", version, wanted)
            return []
    modules = []
    for name in order:
        path = deps[name][0]
        if not path.endswith(".ko"):
            log.info("module %s of kernel %s is compressed (%s): the demo guest gets no "
                     "virtio-fs modules", name, version, path)
            return []
        try:
            modules.append(KernelModule(name, (tree / path).read_bytes()))
        except OSError as exc:
            log.info("cannot read %s (%s): the demo guest gets no virtio-fs modules",
                     tree / path, exc.strerror)
            return []
    return modules


def _module_name(path: str) -> str:
    """`kernel/drivers/virtio/virtio_pci.ko[.xz]` -> `virtio_pci` (modprobe's rule: a
    dash in a file name is an underscore in the module's name)."""
    return path.strip().rpartition("/")[2].partition(".ko")[0].replace("-", "_")


def _version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, int(tok), "") if tok.isdigit() else (1, 0, tok)
                 for tok in re.findall(r"\d+|[^\d.+~-]+", version))


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


def check_kernel(path: Path, data: bytes) -> None:
    """An x86 bzImage carries "HdrS" at 0x202 (the boot protocol header)."""
    if data[0x202:0x206] != b"HdrS":
        raise DemoGuestError(f"kernel {path} is not an x86 Linux kernel image (bzImage)")


def check_static_busybox(path: Path, data: bytes) -> None:
    """An x86-64 ELF executable without a PT_INTERP program header (no dynamic loader)."""
    if data[:4] != b"\x7fELF":
        raise DemoGuestError(f"busybox {path} is not an ELF executable")
    if data[4] != 2 or data[5] != 1 or int.from_bytes(data[18:20], "little") != 62:
        raise DemoGuestError(f"busybox {path} is not an x86-64 executable")
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off:off + 4], "little") == 3:  # PT_INTERP
            raise DemoGuestError(
                f"busybox {path} is dynamically linked; the guest has no C library "
                "(install busybox-static, which provides a static /bin/busybox)")


def busybox_applets(busybox: Path) -> list[str]:
    """The applets this busybox has (it is static, so the host can run it to ask)."""
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, check=True,
                             timeout=30).stdout.decode()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DemoGuestError(f"cannot run {busybox} --list: {exc}") from None
    applets = sorted({a for a in out.split() if re.fullmatch(r"[\w.+\[\]-]+", a)} - {"busybox"})
    missing = {"sh", "init", "mount", "stty", "sleep", "cttyhack", "date", "xxd"} - set(applets)
    if missing:
        raise DemoGuestError(f"busybox {busybox} lacks applets the guest needs: "
                             f"{', '.join(sorted(missing))}")
    return applets


# --- the archive --------------------------------------------------------------------------

@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, without a leading "/"
    mode: int  # file type and permission bits
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


def initramfs(busybox: bytes, init: bytes, applets: Iterable[str],
              modules: Sequence[KernelModule] = ()) -> bytes:
    """The uncompressed newc archive of the demo guest. `modules` are in load order."""
    d, f, ln = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
    module_files = [
        *(CpioEntry(f"{GUEST_MODULES_DIR}/{m.name}.ko", f | 0o644, m.data) for m in modules),
        CpioEntry(GUEST_MODULES_LOAD, f | 0o644,
                  "".join(f"{m.name}\n" for m in modules).encode()),
    ]
    module_entries = [
        CpioEntry("lib", d | 0o755),
        CpioEntry(GUEST_MODULES_DIR, d | 0o755),
        *sorted(module_files, key=lambda e: e.name),
    ] if modules else []
    entries = [
        CpioEntry("bin", d | 0o755),
        CpioEntry("bin/busybox", f | 0o755, busybox),
        *(CpioEntry(f"bin/{a}", ln | 0o777, b"busybox") for a in applets),
        CpioEntry("dev", d | 0o755),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("etc", d | 0o755),
        CpioEntry("init", f | 0o755, init),
        *module_entries,
        CpioEntry("proc", d | 0o555),
        CpioEntry("root", d | 0o700),
        CpioEntry("sys", d | 0o555),
        CpioEntry("tmp", d | 0o1777),
    ]
    return newc_archive(entries)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """A "new ASCII" (070701) cpio archive, the format the kernel unpacks as initramfs.

    Entries are written in the given order (parents before children), numbered from 1;
    owners are root, mtimes FIXED_MTIME, no hard links (nlink 1, 2 for directories).
    """
    return b"".join(_newc_records(entries))


def _newc_records(entries: Iterable[CpioEntry]) -> Iterator[bytes]:
    for ino, e in enumerate(entries, start=1):
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        yield _newc_record(e.name, ino=ino, mode=e.mode, nlink=nlink, data=e.data,
                           rdev=e.rdev, mtime=FIXED_MTIME)
    yield _newc_record("TRAILER!!!", ino=0, mode=0, nlink=1, data=b"", rdev=(0, 0), mtime=0)


def _newc_record(name: str, *, ino: int, mode: int, nlink: int, data: bytes,
                 rdev: tuple[int, int], mtime: int) -> bytes:
    raw_name = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1],
              len(raw_name), 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields)
    head = header + raw_name
    return head + _pad4(len(head)) + data + _pad4(len(data))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


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


# --- the demo guest's configuration.toml ---------------------------------------------

CONFIG_HEADER = "# Written by `kata-vmcache demo-guest`"
#: How long `demo-guest` lets the guest come up under KVM before it settles on TCG.
KVM_PROBE_SECONDS = 10.0


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
    from .factory.host import kvm_usable
    from .vm.guest_channel import READY_LINE
    from .vm.paths import VMPaths
    from .vm.probe import SerialLineProbe
    from .vm.qemu import QemuProcess
    from .vm.spec import VMSpec

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
