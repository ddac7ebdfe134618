"""The demo guest's initramfs, laid out (cpio.py writes the archive):

- `/bin/busybox` (static, from busybox-static) and a symlink per busybox applet;
- `/init` (`kata_vmcache/demo/init`, which also documents the agent protocol),
  `/dev/console` and the empty directories the init mounts over;
- the kernel's virtio-fs modules (kernel.py), when it has them: `/lib/modules/<name>.ko`,
  with `/lib/modules/share.load` naming them in load order.
"""

from __future__ import annotations

import re
import stat
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import DemoGuestError
from .cpio import CpioEntry, newc_archive
from .kernel import KernelModule

DEFAULT_BUSYBOX = Path("/bin/busybox")
GUEST_INIT = Path(__file__).with_name("init")
#: In the archive: the modules' directory, and the list of them in load order (read by
#: the guest's init).
GUEST_MODULES_DIR = "lib/modules"
GUEST_MODULES_LOAD = f"{GUEST_MODULES_DIR}/share.load"


def init_script() -> bytes:
    """The guest's /init, shipped as package data."""
    # Beside this module (setuptools package data). Not importlib.resources: the package
    # has no __init__.py, and 3.11's reader fails on namespace packages.
    return GUEST_INIT.read_bytes()


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
