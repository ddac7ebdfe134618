"""virtio-fs VMs as each Kata generation builds them: the QEMU line (the vhost-user-fs
device, shared guest RAM), virtiofsd's command line, and what check-config refuses.

The expected strings are Kata's, read from its sources: 1.x kata-containers/runtime
virtcontainers/qemu.go (`virtiofdsArgs`, `setupFileBackedMem`, `addDevice`) with its vendored
govmm (`VhostUserDevice.QemuParams`, `appendMemoryKnobs`); 3.x kata-containers 3.30.0
src/runtime/virtcontainers/virtiofsd.go (`args`) and pkg/govmm/qemu/qemu.go (`QemuFSParams`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import config as cfg
from kata_vmcache.factory import host as host_checks
from kata_vmcache.factory.host import check_shared_fs
from kata_vmcache.factory.spec import spec_from_config
from kata_vmcache.kata import host
from kata_vmcache.vm.devices import TEMPLATING_REFUSED
from kata_vmcache.vm.virtiofsd import is_virtiofsd, receives_mounts, virtiofsd_argv

from .machine_cases import UUID, base, paths

QEMU_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
CHAR = "char-" + UUID.replace("-", "")[:16]
SOCKET = "/run/vc/vm/0123456789ab/vhost-fs.sock"


def line(generation: str = "1.x", **changes: Any) -> list[str]:
    three = generation == "3.x"
    spec = base(generation=generation, shared_fs="virtio-fs",
                file_mem_backend=Path("/dev/shm"),
                agent_channel="vsock" if three else "serial", **changes)
    return spec.argv("0123456789ab", UUID, paths(), cid=7 if three else None)


def after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_1x_line_has_the_vhost_user_fs_device_instead_of_9p() -> None:
    argv = line()
    assert f"socket,id={CHAR},path={SOCKET}" in after(argv, "-chardev")
    assert f"vhost-user-fs-pci,chardev={CHAR},tag=kataShared,romfile=" in after(argv, "-device")
    assert not [d for d in after(argv, "-device") if "9p" in d]
    assert "-fsdev" not in argv
    # the chardev comes right before its device, as govmm writes them
    i = argv.index(f"socket,id={CHAR},path={SOCKET}")
    assert argv[i + 1] == "-device"


def test_1x_line_shares_the_guest_ram() -> None:
    assert "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/shm,share=on" \
        in after(line(), "-object")


def test_1x_cache_size_is_the_dax_window() -> None:
    devices = after(line(virtio_fs_cache_size=1024), "-device")
    assert f"vhost-user-fs-pci,chardev={CHAR},tag=kataShared,cache-size=1024M,romfile=" \
        in devices


def test_3x_line_has_a_queue_size_and_no_romfile() -> None:
    devices = after(line("3.x"), "-device")
    assert f"vhost-user-fs-pci,chardev={CHAR},tag=kataShared,queue-size=1024" in devices
    devices = after(line("3.x", virtio_fs_queue_size=512, virtio_fs_cache_size=64), "-device")
    assert f"vhost-user-fs-pci,chardev={CHAR},tag=kataShared,queue-size=512,cache-size=64M" \
        in devices
    assert "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/shm,share=on" \
        in after(line("3.x"), "-object")


def test_3x_microvm_uses_the_mmio_device() -> None:
    devices = after(line("3.x", machine_type="microvm", bridges=0), "-device")
    assert f"vhost-user-fs-device,chardev={CHAR},tag=kataShared,queue-size=1024" in devices


@pytest.mark.parametrize("generation", ["1.x", "3.x"])
def test_templating_is_refused_in_kata_s_words(generation: str) -> None:
    spec = base(generation=generation, shared_fs="virtio-fs",
                agent_channel="vsock" if generation == "3.x" else "serial")
    with pytest.raises(ValueError, match=TEMPLATING_REFUSED):
        spec.argv("0123456789ab", UUID, paths(), memory="template",
                  memory_path=Path("/run/vc/vm/template/memory"), cid=7)


def test_virtiofsd_argv_per_generation() -> None:
    share = Path("/run/vc/vm/0123456789ab/shared")
    one = virtiofsd_argv(QEMU_VIRTIOFSD, "1.x", fd=3, share=share, cache="auto",
                         debug=False, extra_args=["-o", "xattr"], guest_selinux=True)
    assert one == [str(QEMU_VIRTIOFSD), "--fd=3", "-o", f"source={share}", "-o",
                   "cache=auto", "--syslog", "-o", "no_posix_lock", "-f", "-o", "xattr"]
    debug = virtiofsd_argv(QEMU_VIRTIOFSD, "1.x", fd=3, share=share, cache="none",
                           debug=True, extra_args=[], guest_selinux=False)
    assert debug[-1] == "-d"
    three = virtiofsd_argv(Path("/usr/libexec/virtiofsd"), "3.x", fd=9, share=share,
                           cache="", debug=True, extra_args=["--thread-pool-size=1"],
                           guest_selinux=True)
    assert three == ["/usr/libexec/virtiofsd", "--syslog", "--cache=auto",
                     f"--shared-dir={share}", "--fd=9", "--thread-pool-size=1", "--xattr"]
    assert "--xattr" not in virtiofsd_argv(Path("/v"), "3.x", fd=9, share=share,
                                           cache="never", debug=False, extra_args=[],
                                           guest_selinux=False)


def test_a_recorded_pid_must_export_that_share() -> None:
    assert not is_virtiofsd(os.getpid(), Path("/run/vc/vm/0123456789ab/shared"))


# --- the file: spec and check-config ------------------------------------------------------

@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_host_memory_mib", lambda: 16384)
    monkeypatch.setattr(host_checks, "syslog_listens", lambda path="/dev/log": True)
    monkeypatch.setattr(host_checks, "receives_mounts", lambda path: (True, "/"))


def write(tmp: Path, qemu: str, *, version: str = "1.x", factory: str = "") -> cfg.Config:
    for name in ("vmlinuz", "initrd.img"):
        (tmp / name).write_bytes(b"x")
    path = tmp / "configuration.toml"
    path.write_text(f"""
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "{tmp}/vmlinuz"
initrd = "{tmp}/initrd.img"
machine_type = "q35"
default_memory = 256
{qemu}

[factory]
vm_cache_number = 1
vm_cache_endpoint = "{tmp}/cache.sock"
{factory}

[vmcache]
kata_version = "{version}"
accelerator = "tcg"
state_dir = "{tmp}/state"
vm_storage_path = "{tmp}/vm"
guest_agent = "none"
ready_probe = "serial"
""")
    return cfg.load(path)[0]


def fake_daemon(tmp: Path, *, kind: str = "fs", help_text: str = "-o source=PATH --fd=FDNUM",
                status: int = 0) -> Path:
    """A stand-in for a daemon's --print-capabilities and --help (pure logic: the real
    virtiofsd is checked below, where the host has it)."""
    script = tmp / "daemon"
    script.write_text(f"""#!/bin/sh
case "$1" in
--print-capabilities) echo '{{"type": "{kind}"}}'; exit {status} ;;
--help) echo '{help_text}' ;;
esac
""")
    script.chmod(0o755)
    return script


def test_a_1x_virtio_fs_file_makes_a_virtio_fs_spec(tmp_path: Path) -> None:
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = '
                             f'"{fake_daemon(tmp_path)}"\nvirtio_fs_cache_size = 0')
    spec = spec_from_config(config, "tcg")
    assert (spec.shared_fs, spec.file_mem_backend) == ("virtio-fs", Path("/dev/shm"))
    assert check_shared_fs(config) == []


def test_file_mem_backend_alone_shares_the_ram_in_1x_too(tmp_path: Path) -> None:
    config = write(tmp_path, f'file_mem_backend = "{tmp_path}"')
    assert spec_from_config(config, "tcg").file_mem_backend == tmp_path
    assert spec_from_config(write(tmp_path, ""), "tcg").file_mem_backend is None


@pytest.mark.parametrize("version", ["1.x", "3.x"])
def test_templating_with_virtio_fs_is_refused(tmp_path: Path, version: str) -> None:
    daemon = fake_daemon(tmp_path, help_text="--shared-dir --cache --fd source=")
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{daemon}"',
                   version=version, factory="enable_template = true")
    problems = check_shared_fs(config)
    assert [p.key for p in problems] == ["factory.enable_template"]
    assert TEMPLATING_REFUSED in problems[0].message


def test_templating_with_file_backed_memory_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, f'file_mem_backend = "{tmp_path}"',
                   factory="enable_template = true")
    assert [p.key for p in check_shared_fs(config)] == ["factory.enable_template"]


@pytest.mark.parametrize(("daemon", "version", "said"), [
    ("missing", "1.x", "no virtiofsd at"),
    ("failing", "1.x", "is not a working virtiofsd: `--print-capabilities` exited with 3"),
    ("net", "1.x", "is a vhost-user backend of type 'net', not a virtiofsd"),
    ("c", "3.x", "does not take Kata 3.x's arguments (--shared-dir, --cache not in its "
                 "--help"),
])
def test_a_daemon_that_cannot_serve_is_named(tmp_path: Path, daemon: str, version: str,
                                             said: str) -> None:
    path = {"missing": lambda: tmp_path / "nothing",
            "failing": lambda: fake_daemon(tmp_path, status=3),
            "net": lambda: fake_daemon(tmp_path, kind="net"),
            "c": lambda: fake_daemon(tmp_path)}[daemon]()
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{path}"',
                   version=version)
    problems = check_shared_fs(config)
    assert [p.key for p in problems] == ["hypervisor.qemu.virtio_fs_daemon"]
    assert said in problems[0].message


@pytest.mark.parametrize(("version", "cache", "ok"), [
    ("1.x", "always", True), ("1.x", "never", False),
    ("3.x", "metadata", True), ("3.x", "none", False),
])
def test_cache_modes_per_generation(tmp_path: Path, version: str, cache: str,
                                    ok: bool) -> None:
    daemon = fake_daemon(tmp_path, help_text="--shared-dir --cache --fd source=")
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{daemon}"\n'
                             f'virtio_fs_cache = "{cache}"', version=version)
    keys = [p.key for p in check_shared_fs(config)]
    assert keys == ([] if ok else ["hypervisor.qemu.virtio_fs_cache"])


def test_no_shared_memory_directory_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = '
                             f'"{fake_daemon(tmp_path)}"\nfile_mem_backend = "{tmp_path}/no"')
    problems = check_shared_fs(config)
    assert [p.key for p in problems] == ["hypervisor.qemu.file_mem_backend"]
    assert "is not a directory" in problems[0].message


def test_no_syslog_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_checks, "syslog_listens", lambda path="/dev/log": False)
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = '
                             f'"{fake_daemon(tmp_path)}"')
    problems = check_shared_fs(config)
    assert [p.key for p in problems] == ["hypervisor.qemu.virtio_fs_daemon"]
    assert "nothing listens on /dev/log" in problems[0].message


@pytest.mark.skipif(not QEMU_VIRTIOFSD.is_file(), reason="no QEMU virtiofsd on this host")
def test_qemu_s_own_virtiofsd_serves_1x_not_3x(tmp_path: Path) -> None:
    one = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{QEMU_VIRTIOFSD}"')
    assert check_shared_fs(one) == []
    three = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{QEMU_VIRTIOFSD}"',
                  version="3.x")
    assert [p.key for p in check_shared_fs(three)] == ["hypervisor.qemu.virtio_fs_daemon"]


@pytest.mark.skipif(not QEMU_VIRTIOFSD.is_file(), reason="no QEMU virtiofsd on this host")
def test_a_cache_size_needs_a_qemu_with_a_dax_window(tmp_path: Path) -> None:
    """Debian's QEMU 7.2 has no DAX window for virtio-fs (upstream QEMU never merged it):
    Kata 1.x's stock cache size of 1024 MiB cannot boot on it."""
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = '
                             f'"{QEMU_VIRTIOFSD}"\nvirtio_fs_cache_size = 1024')
    has_dax = host_checks.qemu_device_has(Path("/usr/bin/qemu-system-x86_64"),
                                     "vhost-user-fs-pci", "cache-size")
    keys = [p.key for p in check_shared_fs(config)]
    assert keys == ([] if has_dax else ["hypervisor.qemu.virtio_fs_cache_size"])


MOUNTINFO = """\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /run rw,nosuid shared:12 - tmpfs tmpfs rw
41 40 0:51 / /run/vc/vm rw master:3 - tmpfs tmpfs rw
42 27 0:52 / /srv/my\\040vms rw shared:9 - tmpfs tmpfs rw
"""


@pytest.mark.parametrize(("path", "receives", "point"), [
    ("/var/lib/x", False, "/"),
    ("/run/vc", True, "/run"),
    ("/run/vc/vm/abc", True, "/run/vc/vm"),
    ("/runner", False, "/"),
    ("/srv/my vms/a", True, "/srv/my vms"),
])
def test_which_mount_decides_propagation(tmp_path: Path, path: str, receives: bool,
                                         point: str) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert receives_mounts(Path(path), str(info)) == (receives, point)


def test_a_private_vm_storage_is_refused_unless_virtiofsd_chroots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_checks, "receives_mounts", lambda path: (False, "/"))
    daemon = fake_daemon(tmp_path)
    config = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{daemon}"')
    problems = check_shared_fs(config)
    assert [p.key for p in problems] == ["vmcache.vm_storage_path"]
    assert "is on a private mount (/)" in problems[0].message
    chroot = write(tmp_path, f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{daemon}"\n'
                             'virtio_fs_extra_args = ["-o", "sandbox=chroot"]')
    assert check_shared_fs(chroot) == []
