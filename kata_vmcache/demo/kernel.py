"""The host kernel the demo guest boots, and the modules it needs to mount a virtio-fs share.

The kernel is the newest `/boot/vmlinuz-*` unless one is given (`find_kernel`), an x86
bzImage (`check_kernel`); its version is its file's `vmlinuz-<version>` name
(`kernel_version`). The modules (`share_modules`) are `virtiofs` and `virtio_pci` with
everything they depend on, taken from `/lib/modules/<version>/` of that kernel. A kernel
whose version cannot be told, or whose modules are missing or compressed (busybox's insmod
takes plain `.ko` files), gets none, and the guest answers `share` with an error; modules
built into the kernel (`modules.builtin`) need nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DemoGuestError

log = logging.getLogger(__name__)

DEFAULT_BOOT_DIR = Path("/boot")
DEFAULT_MODULES_ROOT = Path("/lib/modules")
#: What the guest's `share` command needs: the virtio-fs file system and the PCI transport
#: its device sits on (Debian's cloud kernel has both as modules); dependencies follow.
SHARE_MODULES = ("virtio_pci", "virtiofs")


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


def check_kernel(path: Path, data: bytes) -> None:
    """An x86 bzImage carries "HdrS" at 0x202 (the boot protocol header)."""
    if data[0x202:0x206] != b"HdrS":
        raise DemoGuestError(f"kernel {path} is not an x86 Linux kernel image (bzImage)")
