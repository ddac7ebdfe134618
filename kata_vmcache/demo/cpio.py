"""A newc ("new ASCII", 070701) cpio archive writer in pure Python: the format the kernel
unpacks as an initramfs (initramfs.py lays out the demo guest's).

Deterministic on purpose: entries are written in the given order, inode numbers count from
1, owners are root and every entry's mtime is FIXED_MTIME: the same entries give the same
bytes.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# Every entry of the archive gets this mtime (2020-01-01T00:00:00Z): reproducible bytes.
FIXED_MTIME = 1577836800


@dataclass(frozen=True)
class CpioEntry:
    name: str  # relative, without a leading "/"
    mode: int  # file type and permission bits
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)


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
