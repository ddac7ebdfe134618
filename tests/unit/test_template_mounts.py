"""Pure logic of factory/template.py: reading /proc/self/mountinfo."""

from __future__ import annotations

from pathlib import Path

from kata_vmcache.factory.template import mount_fstype

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:26 / /run rw,nosuid shared:5 - tmpfs tmpfs rw,mode=755
41 22 0:40 / /tmp/a\\040b rw,relatime shared:20 - tmpfs kata-vmcache-template rw,size=327680k
42 22 0:41 / /tmp/over rw,relatime shared:21 - ext4 /dev/sdb rw
43 42 0:42 / /tmp/over rw,relatime shared:22 - tmpfs kata-vmcache-template rw
"""


def test_mount_point_type_with_escapes_and_overmounts(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert mount_fstype(Path("/run"), info) == "tmpfs"
    assert mount_fstype(Path("/tmp/a b"), info) == "tmpfs"  # \040 is a space
    assert mount_fstype(Path("/tmp/over"), info) == "tmpfs"  # the last mount is on top
    # Not a mount point, even though it lives on one: we mount our own tmpfs there.
    assert mount_fstype(Path("/run/vc/vm/template"), info) is None
