"""The demo guest builder (no QEMU): the initramfs is a valid newc archive with what the
guest needs (the kernel's virtio-fs modules too, from a fake /lib/modules tree), the build
is deterministic and idempotent, and a host without the packages gets a clear error. Also
the host side of the agent protocol, against a scripted fake guest on a Unix socket (the
real guest is exercised in tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_vmcache.demo.config import KERNEL_PARAMS
from kata_vmcache.demo.cpio import FIXED_MTIME
from kata_vmcache.demo.guest import STAMP_NAME, DemoGuest, build_demo_guest
from kata_vmcache.demo.initramfs import init_script
from kata_vmcache.demo.kernel import find_kernel, kernel_version, share_modules
from kata_vmcache.errors import DemoGuestError, GuestError, GuestTimeout
from kata_vmcache.vm.guest_channel import GuestChannel, GuestInfo

BUSYBOX = Path("/bin/busybox")


def _static_busybox() -> bool:
    try:
        data = BUSYBOX.read_bytes()
    except OSError:
        return False
    return data[:4] == b"\x7fELF" and b"/lib64/ld-linux" not in data[:4096]


needs_busybox = pytest.mark.skipif(not _static_busybox(),
                                   reason="needs busybox-static's /bin/busybox")


# --- a newc reader, independent of the writer under test -----------------------------------

@dataclass(frozen=True)
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(archive: bytes) -> list[Member]:
    members: list[Member] = []
    pos = 0
    while True:
        assert archive[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = fields
        assert check == 0
        name_start = pos + 110
        raw_name = archive[name_start:name_start + namesize]
        assert raw_name.endswith(b"\0")
        name = raw_name[:-1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        data = archive[data_start:data_start + size]
        assert len(data) == size, f"{name}: truncated"
        pos = data_start + size + (-size % 4)
        if name == "TRAILER!!!":
            assert archive[pos:] == b"", "bytes after the trailer"
            return members
        members.append(Member(name, ino, mode, uid, gid, nlink, mtime, data, (rmaj, rmin)))


# --- fixtures -------------------------------------------------------------------------------

@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvc-unit-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fake_kernel(path: Path, payload: bytes = b"kernel") -> Path:
    """Enough of a bzImage to pass the builder's check: "HdrS" at 0x202."""
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data) + payload)
    return path


@pytest.fixture
def kernel(scratch: Path) -> Path:
    return fake_kernel(scratch / "vmlinuz-6.1.0-1-test")


def build(dest: Path, kernel: Path, modules_root: Path | None = None) -> DemoGuest:
    if modules_root is None:
        return build_demo_guest(dest, kernel=kernel, busybox=BUSYBOX)
    return build_demo_guest(dest, kernel=kernel, busybox=BUSYBOX, modules_root=modules_root)


def members_of(guest: DemoGuest) -> dict[str, Member]:
    return {m.name: m for m in read_newc(gzip.decompress(guest.initrd.read_bytes()))}


# --- the archive ----------------------------------------------------------------------------

@needs_busybox
def test_initramfs_holds_init_busybox_and_mount_points(scratch: Path, kernel: Path) -> None:
    guest = build(scratch / "out", kernel)
    assert guest == DemoGuest(kernel=scratch / "out/vmlinuz", initrd=scratch / "out/initrd.img",
                              config=scratch / "out/configuration.toml")
    assert guest.kernel.read_bytes() == kernel.read_bytes()
    assert not guest.config.exists(), "rendering the configuration is not the builder's job"
    members = members_of(guest)

    init = members["init"]
    assert stat.S_ISREG(init.mode)
    assert stat.S_IMODE(init.mode) == 0o755
    assert init.data == init_script()
    assert init.data.startswith(b"#!/bin/sh\n")

    busybox = members["bin/busybox"]
    assert stat.S_ISREG(busybox.mode)
    assert stat.S_IMODE(busybox.mode) == 0o755
    assert busybox.data == BUSYBOX.read_bytes()

    # /init's shebang and everything it runs resolve to busybox.
    for applet in ("sh", "init", "mount", "stty", "sleep", "cttyhack", "date", "xxd", "cat"):
        link = members[f"bin/{applet}"]
        assert stat.S_ISLNK(link.mode), applet
        assert link.data == b"busybox", applet

    for directory in ("bin", "dev", "etc", "proc", "sys", "tmp", "root"):
        assert stat.S_ISDIR(members[directory].mode), directory
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    console = members["dev/console"]
    assert stat.S_ISCHR(console.mode)
    assert console.rdev == (5, 1)


@needs_busybox
def test_initramfs_entries_are_reproducible_and_loadable(scratch: Path, kernel: Path) -> None:
    check_loadable(build(scratch / "out", kernel))


def check_loadable(guest: DemoGuest) -> None:
    archive = read_newc(gzip.decompress(guest.initrd.read_bytes()))
    names = [m.name for m in archive]
    assert len(set(names)) == len(names)
    assert len({m.ino for m in archive}) == len(archive), "inode numbers must be unique"
    for m in archive:
        assert not m.name.startswith("/")
        parent = m.name.rpartition("/")[0]
        if parent:
            assert names.index(parent) < names.index(m.name), f"{m.name} before its directory"
        assert (m.uid, m.gid, m.mtime) == (0, 0, FIXED_MTIME)
        # nlink > 1 on a regular file would make the kernel hard-link it to another file.
        assert m.nlink == (2 if stat.S_ISDIR(m.mode) else 1)


@needs_busybox
def test_build_is_deterministic(scratch: Path, kernel: Path) -> None:
    first, second = build(scratch / "a", kernel), build(scratch / "b", kernel)
    assert first.initrd.read_bytes() == second.initrd.read_bytes()
    assert first.kernel.read_bytes() == second.kernel.read_bytes()
    # gzip header: no file name, no timestamp.
    header = first.initrd.read_bytes()[:10]
    assert header[3] & 0x08 == 0
    assert header[4:8] == b"\0\0\0\0"


@needs_busybox
def test_rebuild_is_skipped_when_inputs_are_unchanged(scratch: Path, kernel: Path) -> None:
    guest = build(scratch / "out", kernel)
    before = {p.name: p.stat() for p in (guest.kernel, guest.initrd)}
    build(scratch / "out", kernel)
    for p in (guest.kernel, guest.initrd):
        after = p.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[p.name].st_ino,
                                                      before[p.name].st_mtime_ns), p.name
    assert sorted(p.name for p in (scratch / "out").iterdir()) == [
        ".demo-guest.json", "initrd.img", "vmlinuz"], "no temporary files left behind"


@needs_busybox
def test_rebuild_happens_when_an_input_or_output_changes(scratch: Path, kernel: Path) -> None:
    guest = build(scratch / "out", kernel)
    fake_kernel(kernel, b"a newer kernel")
    build(scratch / "out", kernel)
    assert guest.kernel.read_bytes() == kernel.read_bytes()

    good = guest.initrd.read_bytes()
    guest.initrd.write_bytes(b"damaged")
    build(scratch / "out", kernel)
    assert guest.initrd.read_bytes() == good

    guest.kernel.unlink()
    build(scratch / "out", kernel)
    assert guest.kernel.read_bytes() == kernel.read_bytes()


# --- inputs and their errors ----------------------------------------------------------------

def test_newest_kernel_is_chosen_by_version(scratch: Path) -> None:
    boot = scratch / "boot"
    boot.mkdir()
    for version in ("6.1.0-9-amd64", "6.1.0-56-cloud-amd64", "5.10.0-30-amd64"):
        fake_kernel(boot / f"vmlinuz-{version}")
    (boot / "config-6.1.0-99-amd64").write_text("")
    assert find_kernel(boot) == boot / "vmlinuz-6.1.0-56-cloud-amd64"


def test_no_kernel_in_boot_is_a_clear_error(scratch: Path) -> None:
    with pytest.raises(DemoGuestError,
                       match=r"^no kernel found in /tmp/\S+ \(install linux-image-cloud-amd64\)$"):
        find_kernel(scratch)


@needs_busybox
def test_missing_kernel_is_a_clear_error(scratch: Path) -> None:
    with pytest.raises(DemoGuestError, match=r"kernel .*/nope does not exist"):
        build(scratch / "out", scratch / "nope")
    assert not (scratch / "out").exists()


@needs_busybox
def test_a_file_that_is_not_a_kernel_is_refused(scratch: Path) -> None:
    junk = scratch / "vmlinuz"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(DemoGuestError, match="not an x86 Linux kernel image"):
        build(scratch / "out", junk)


def test_missing_busybox_is_a_clear_error(scratch: Path, kernel: Path) -> None:
    with pytest.raises(DemoGuestError,
                       match=r"busybox .*/busybox does not exist \(install busybox-static\)"):
        build_demo_guest(scratch / "out", kernel=kernel, busybox=scratch / "busybox")


def test_dynamically_linked_busybox_is_refused(scratch: Path, kernel: Path) -> None:
    dynamic = Path("/bin/ls")  # coreutils: dynamically linked on every distribution
    if not dynamic.exists():
        pytest.skip("needs a dynamically linked /bin/ls")
    with pytest.raises(DemoGuestError,
                       match=r"dynamically linked.*install busybox-static"):
        build_demo_guest(scratch / "out", kernel=kernel, busybox=dynamic)


def test_busybox_that_is_not_an_executable_is_refused(scratch: Path, kernel: Path) -> None:
    script = scratch / "busybox"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(DemoGuestError, match="not an ELF executable"):
        build_demo_guest(scratch / "out", kernel=kernel, busybox=script)


def test_kernel_params_put_the_console_on_the_first_serial_port() -> None:
    params = KERNEL_PARAMS.split()
    assert "console=ttyS0" in params
    assert "panic=-1" in params
    assert len(params) == len(set(params))


# --- the host side of the agent protocol, against a scripted fake guest ----------------------

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_guest(script: Script) -> AsyncIterator[Path]:
    """A Unix socket server standing in for QEMU's chardev; `script` plays the guest."""
    with tempfile.TemporaryDirectory(prefix="kvc-chan-") as tmp:
        path = Path(tmp) / "agent.sock"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_unix_server(serve, str(path))
        try:
            yield path
        finally:
            server.close()
            await server.wait_closed()


async def commands(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """The non-empty lines the host sends."""
    while line := await reader.readline():
        if text := line.decode().strip():
            yield text


@pytest.mark.asyncio
async def test_channel_waits_for_ready_and_skips_stale_lines() -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"noise\r\nKATA-VMCACHE-READY\r\n")
        async for cmd in commands(reader):
            verb, _, arg = cmd.partition(" ")
            if verb == "ping":
                # A stale pong of someone else's ping, and an answer to a partial line.
                token = arg.split()[0]
                writer.write(f"pong old\nerr unknown command\npong {token}\n".encode())
            elif verb == "info":
                writer.write(b"pong late\ninfo cpus=2 mem_kib=1024 uptime=3.5\n")
            elif verb == "time":
                writer.write(b"ok\n" if arg.isdigit() else b"err usage\n")
            elif verb == "seed":
                writer.write(b"err cannot write /dev/urandom\n")

    async with fake_guest(guest) as path, await GuestChannel.connect(path) as ch:
        await ch.wait_ready(5)
        assert 0 <= await ch.ping() < 5
        assert await ch.info() == GuestInfo(cpus=2, mem_kib=1024, uptime=3.5)
        await ch.set_time(1_700_000_000.4)
        with pytest.raises(GuestError, match="cannot write /dev/urandom"):
            await ch.seed(b"\x01\x02")
        with pytest.raises(ValueError, match="seed takes"):
            await ch.seed(b"")
    assert ch.closed


@pytest.mark.asyncio
async def test_channel_times_out_on_a_silent_guest() -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"booting...\n")
        async for _ in commands(reader):
            pass  # a frozen guest: reads nothing, answers nothing

    async with fake_guest(guest) as path, await GuestChannel.connect(path) as ch:
        with pytest.raises(GuestTimeout, match=r"ready line.*booting"):
            await ch.wait_ready(0.2)
        with pytest.raises(TimeoutError):
            await ch.ping(timeout=0.2)


@pytest.mark.asyncio
async def test_channel_reports_a_closed_port() -> None:
    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"half a li")

    async with fake_guest(guest) as path, await GuestChannel.connect(path) as ch:
        with pytest.raises(ConnectionError, match="closed while waiting"):
            await ch.wait_ready(5)


@pytest.mark.asyncio
async def test_commands_are_sent_as_one_line_after_a_newline() -> None:
    received: list[bytes] = []

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"info\n"))
        writer.write(b"info cpus=1 mem_kib=2 uptime=0.5\n")
        await writer.drain()

    async with fake_guest(guest) as path, await GuestChannel.connect(path) as ch:
        await ch.info()
    assert received == [b"\ninfo\n"]


def test_info_lines_parse_strictly() -> None:
    assert GuestInfo.parse("info cpus=4 mem_kib=262144 uptime=12.25") == GuestInfo(4, 262144,
                                                                                  12.25)
    for bad in ("info", "info cpus=x mem_kib=1 uptime=1", "pong info", "", "infos cpus=1"):
        assert GuestInfo.parse(bad) is None, bad


# --- the kernel's virtio-fs modules ---------------------------------------------------------

VERSION = "6.1.0-1-test"
# Debian 6.1 cloud kernel's modules.dep for what the share needs (and cuse, which it does not).
MODULES_DEP = {
    "kernel/fs/fuse/fuse.ko": [],
    "kernel/fs/fuse/cuse.ko": ["kernel/fs/fuse/fuse.ko"],
    "kernel/fs/fuse/virtiofs.ko": ["kernel/drivers/virtio/virtio.ko",
                                   "kernel/drivers/virtio/virtio_ring.ko",
                                   "kernel/fs/fuse/fuse.ko"],
    "kernel/drivers/virtio/virtio.ko": ["kernel/drivers/virtio/virtio_ring.ko"],
    "kernel/drivers/virtio/virtio_ring.ko": [],
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko": [],
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko": [],
    "kernel/drivers/virtio/virtio_pci.ko": ["kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                                            "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                                            "kernel/drivers/virtio/virtio.ko",
                                            "kernel/drivers/virtio/virtio_ring.ko"],
}
SHARE_SET = {"virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
             "virtio_pci", "fuse", "virtiofs"}


def module_name(path: str) -> str:
    return path.rpartition("/")[2].partition(".ko")[0]


def fake_modules(root: Path, version: str = VERSION, *, builtin: Iterable[str] = (),
                 rename: dict[str, str] | None = None) -> Path:
    """`root/version/` with a modules.dep, a modules.builtin and a small file per module
    ("module NAME"). `builtin` modules have no file and are listed in modules.builtin;
    `rename` maps a module's path to the one written (virtiofs.ko -> virtiofs.ko.xz)."""
    rename = rename or {}
    tree = root / version
    tree.mkdir(parents=True)
    dep_lines, builtin_lines = [], []
    for path, needs in MODULES_DEP.items():
        if module_name(path) in builtin:
            builtin_lines.append(path)
            continue
        real = rename.get(path, path)
        (tree / real).parent.mkdir(parents=True, exist_ok=True)
        (tree / real).write_bytes(f"module {module_name(path)}".encode())
        dep_lines.append(f"{real}: {' '.join(rename.get(n, n) for n in needs)}".rstrip())
    (tree / "modules.dep").write_text("".join(f"{line}\n" for line in dep_lines))
    (tree / "modules.builtin").write_text("".join(f"{line}\n" for line in builtin_lines))
    return root


def loaded_in_order(names: list[str]) -> None:
    """Every module comes after all the modules it needs."""
    for path, needs in MODULES_DEP.items():
        name = module_name(path)
        if name in names:
            for need in map(module_name, needs):
                assert need not in names or names.index(need) < names.index(name), (need, name)


@pytest.mark.parametrize(("name", "version"), [
    ("vmlinuz-6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64"),
    ("vmlinuz-6.12.9+bpo-amd64", "6.12.9+bpo-amd64"),
    ("vmlinuz", None),
    ("vmlinuz-", None),
    ("bzImage", None),
])
def test_kernel_version_comes_from_the_file_name(scratch: Path, name: str,
                                                  version: str | None) -> None:
    assert kernel_version(fake_kernel(scratch / name)) == version


def test_kernel_version_follows_a_symlink(scratch: Path) -> None:
    target = fake_kernel(scratch / f"vmlinuz-{VERSION}")
    (scratch / "vmlinuz").symlink_to(target.name)
    assert kernel_version(scratch / "vmlinuz") == VERSION


def test_share_modules_are_the_closure_in_load_order(scratch: Path) -> None:
    root = fake_modules(scratch / "modules")
    modules = share_modules(VERSION, root)
    names = [m.name for m in modules]
    assert set(names) == SHARE_SET, "cuse is not needed"
    assert len(names) == len(set(names))
    loaded_in_order(names)
    assert all(m.data == f"module {m.name}".encode() for m in modules)
    assert share_modules(VERSION, root) == modules, "the same order every time"


def test_builtin_modules_are_not_carried(scratch: Path) -> None:
    root = fake_modules(scratch / "modules",
                        builtin=("virtio", "virtio_ring", "virtio_pci", "virtio_pci_modern_dev",
                                 "virtio_pci_legacy_dev"))
    assert [m.name for m in share_modules(VERSION, root)] == ["fuse", "virtiofs"]


@pytest.mark.parametrize("rename", [
    {"kernel/fs/fuse/virtiofs.ko": "kernel/fs/fuse/virtiofs.ko.xz"},
    {"kernel/drivers/virtio/virtio_ring.ko": "kernel/drivers/virtio/virtio_ring.ko.zst"},
], ids=["virtiofs.ko.xz", "virtio_ring.ko.zst"])
def test_a_compressed_module_means_none(scratch: Path, rename: dict[str, str]) -> None:
    assert share_modules(VERSION, fake_modules(scratch / "modules", rename=rename)) == []


def test_a_missing_module_means_none(scratch: Path) -> None:
    root = fake_modules(scratch / "modules")
    (root / VERSION / "kernel/fs/fuse/virtiofs.ko").unlink()
    assert share_modules(VERSION, root) == [], "listed in modules.dep, but no file"
    dep = root / VERSION / "modules.dep"
    dep.write_text("".join(line for line in dep.read_text().splitlines(keepends=True)
                           if not line.startswith("kernel/fs/fuse/virtiofs.ko")))
    assert share_modules(VERSION, root) == [], "not in modules.dep"
    dep.unlink()
    assert share_modules(VERSION, root) == [], "no modules.dep"
    assert share_modules("6.1.0-2-other", root) == [], "another kernel's tree"
    assert share_modules(None, root) == [], "unknown version"


@needs_busybox
def test_the_kernels_modules_go_into_the_archive(scratch: Path) -> None:
    kernel = fake_kernel(scratch / f"vmlinuz-{VERSION}")
    guest = build(scratch / "out", kernel, fake_modules(scratch / "modules"))
    members = members_of(guest)
    carried = {name.removeprefix("lib/modules/").removesuffix(".ko"): m
               for name, m in members.items()
               if name.startswith("lib/modules/") and name.endswith(".ko")}
    assert set(carried) == SHARE_SET
    for name, member in carried.items():
        assert stat.S_ISREG(member.mode), name
        assert member.data == f"module {name}".encode()
    assert stat.S_ISDIR(members["lib"].mode)
    assert stat.S_ISDIR(members["lib/modules"].mode)
    order = members["lib/modules/share.load"].data.decode().splitlines()
    assert set(order) == SHARE_SET
    loaded_in_order(order)
    check_loadable(guest)
    stamp = json.loads((scratch / "out" / STAMP_NAME).read_text())
    assert stamp["modules"] == order


@needs_busybox
def test_a_build_with_modules_is_deterministic(scratch: Path) -> None:
    kernel = fake_kernel(scratch / f"vmlinuz-{VERSION}")
    root = fake_modules(scratch / "modules")
    first, second = build(scratch / "a", kernel, root), build(scratch / "b", kernel, root)
    assert first.initrd.read_bytes() == second.initrd.read_bytes()


@needs_busybox
def test_a_changed_module_rebuilds_the_archive(scratch: Path) -> None:
    kernel = fake_kernel(scratch / f"vmlinuz-{VERSION}")
    root = fake_modules(scratch / "modules")
    guest = build(scratch / "out", kernel, root)
    (root / VERSION / "kernel/fs/fuse/virtiofs.ko").write_bytes(b"module virtiofs, rebuilt")
    build(scratch / "out", kernel, root)
    assert members_of(guest)["lib/modules/virtiofs.ko"].data == b"module virtiofs, rebuilt"


@needs_busybox
@pytest.mark.parametrize("kernel_name", [f"vmlinuz-{VERSION}", "bzImage"])
def test_a_kernel_without_modules_still_builds(scratch: Path, kernel_name: str) -> None:
    """No tree for this version (or a kernel whose version cannot be told, though the
    tree of a kernel of its contents exists): no modules, and no /lib in the archive."""
    root = fake_modules(scratch / "modules", version="6.1.0-2-other")
    if kernel_name == "bzImage":
        fake_modules(root, version=VERSION)
    guest = build(scratch / "out", fake_kernel(scratch / kernel_name), root)
    assert not any(name == "lib" or name.startswith("lib/") for name in members_of(guest))
    assert "init" in members_of(guest)
    assert json.loads((scratch / "out" / STAMP_NAME).read_text())["modules"] == []
