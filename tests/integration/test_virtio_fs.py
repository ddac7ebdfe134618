"""virtio-fs VMs on the real thing: the daemon on a Kata 1.x virtio-fs file, the demo guest
under QEMU (TCG), QEMU 7.2's own virtiofsd, real signals.

- a VM goes out with its virtiofsd (its pid in the hand-off State), the device is there,
  the guest reads a file the host put in the VM's share, and the daemon's stop leaves the
  client's VM and its virtiofsd running and nothing else;
- a cached VM whose virtiofsd dies is replaced and never handed out;
- a daemon killed outright: its successor stops its VMs and their virtiofsd, and leaves the
  client's;
- a virtiofsd that cannot start fails its boot and leaves nothing behind;
- check-config and init name a missing virtio_fs_daemon in one line.

Skipped, with the reason, without QEMU's virtiofsd or the kernel's virtio-fs modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (  # tests/conftest.py: the leak guard's own census
    _descendants,
    _process_table,
    our_qemus,
)

from kata_vmcache.demo.config import render_config
from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.demo.kernel import find_kernel, kernel_version, share_modules
from kata_vmcache.procs import cmdline, pid_alive
from kata_vmcache.vm.guest_channel import GuestChannel
from kata_vmcache.vm.virtiofsd import is_virtiofsd

from .harness import Daemon, exited, qmp, run_cli, stop_taken_vm, wait_for

pytestmark = pytest.mark.qemu

VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")


@pytest.fixture
def shared_workdir(workdir: Path) -> Iterator[Path]:
    """`workdir` as a shared mount (a bind mount of itself), unmounted afterwards: what a
    systemd host has for /run/vc/vm, and what a virtiofsd needs to see what is mounted in
    its share after it started. This machine's / is private; the test changes only its
    own directory."""
    subprocess.run(["mount", "--bind", str(workdir), str(workdir)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(workdir)], check=True)
        yield workdir
    finally:
        if subprocess.run(["umount", str(workdir)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(workdir)], check=True)


@pytest.fixture
def vfs_config(demo_guest: DemoGuest, shared_workdir: Path) -> Callable[..., Path]:
    """The demo file as a Kata 1.x virtio-fs file (QEMU's own virtiofsd)."""
    workdir = shared_workdir
    if not VIRTIOFSD.is_file():
        pytest.skip(f"needs {VIRTIOFSD} (QEMU's own virtiofsd, in qemu-system-common)")

    def make(cache_number: int = 2, *, daemon: Path = VIRTIOFSD, extra: str = "") -> Path:
        text = render_config(demo_guest, endpoint=workdir / "cache.sock",
                             state_dir=workdir / "state", cache_number=cache_number,
                             accelerator="tcg", kata_version="1.x")
        fs = (f'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "{daemon}"\n'
              f'virtio_fs_cache = "auto"\n{extra}\n')
        text = text.replace('shared_fs = "virtio-9p"\n', fs)
        assert fs in text
        path = workdir / "configuration.toml"
        path.write_text(text)
        return path
    return make


@pytest.fixture
def make_vfs_daemon(vfs_config: Callable[..., Path],
                    workdir: Path) -> Any:
    started: list[Daemon] = []

    def make(cache_number: int = 2, **kwargs: Any) -> Daemon:
        d = Daemon(vfs_config(cache_number, **kwargs), workdir / "cache.sock",
                   workdir / "state")
        started.append(d)
        return d.start()
    yield make
    for d in started:
        d.stop()


def virtiofsds(workdir: Path) -> set[int]:
    """The virtiofsd processes serving a share under `workdir` (each forks once QEMU
    connects: both are counted)."""
    return {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (args := cmdline(pid)) and args[0] == str(VIRTIOFSD)
            and any(a.startswith(f"source={workdir}/") for a in args) and pid_alive(pid)}


def reap(pid: int) -> None:
    """A virtiofsd the daemon left to its client becomes ours (the suite's subreaper) once
    the daemon has exited: reap it when it ends."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


async def read_share(path: Path, name: str) -> str:
    async with await GuestChannel.connect(path) as channel:
        return await channel.share(name)


def test_a_vm_goes_out_with_its_virtiofsd_and_the_guest_reads_the_share(
        make_vfs_daemon: Callable[..., Daemon], workdir: Path) -> None:
    if not share_modules_here():
        pytest.skip("the demo kernel has no virtio-fs modules")
    d = make_vfs_daemon(2)
    ready = d.wait_ready(2)
    for record in ready:
        share = Path(record["vm_dir"]) / "shared"
        assert is_virtiofsd(record["virtiofsd_pid"], share), record
    vm = d.get()["hypervisor"]
    pid = vm["VirtiofsdPid"]
    share = Path(vm["VMDir"]) / "shared"
    assert vm["State"]["VirtiofsdPid"] == pid  # Kata 1.x's receiver reads it there
    assert vm["State"]["VirtiofsDaemonPid"] == 0
    assert is_virtiofsd(pid, share)
    assert str(Path(vm["VMDir"]) / "vhost-fs.sock") in " ".join(cmdline(vm["Pid"]))
    # The device, as QEMU itself describes it, and the RAM it needs shared.
    qtree, memdevs = qmp(Path(vm["QmpChannelpath"]),
                         ("human-monitor-command", {"command-line": "info qtree"}),
                         "query-memdev")
    assert 'tag = "kataShared"' in qtree
    assert "vhost-user-fs-pci" in qtree
    assert [m["share"] for m in memdevs] == [True]
    # The guest, resumed as its client would, reads what the host put in the share, and
    # what the host mounts there after virtiofsd started (as kata-runtime mounts a
    # container's root file system into the share of the VM it took).
    (share / "hello.txt").write_text("hello through virtio-fs\n")
    source = workdir / "rootfs-file"
    source.write_text("mounted after the boot\n")
    (share / "mounted.txt").write_text("not the mount\n")
    subprocess.run(["mount", "--bind", str(source), str(share / "mounted.txt")], check=True)
    try:
        qmp(Path(vm["QmpChannelpath"]), "cont")
        channel = Path(vm["GuestChannelPath"])
        assert asyncio.run(read_share(channel, "hello.txt")) == "hello through virtio-fs"
        assert asyncio.run(read_share(channel, "mounted.txt")) == "mounted after the boot"
    finally:
        # virtiofsd holds what the guest looked up until the guest forgets it: detach now.
        subprocess.run(["umount", "--lazy", str(share / "mounted.txt")], check=True)
    # The daemon's stop: its own VMs and their virtiofsd go, the client's stay.
    others = virtiofsds(workdir) - {pid} - _descendants(_process_table(), pid)
    assert others
    d.send_signal(signal.SIGTERM)
    assert d.wait(15) == 0
    wait_for(lambda: not (virtiofsds(workdir) & others), 10, "the cached VMs' virtiofsd to go")
    assert our_qemus() == {vm["Pid"]}
    assert pid_alive(pid)
    # The client stops its VM: its virtiofsd ends with QEMU's connection.
    stop_taken_vm(vm)
    d.taken.clear()
    wait_for(lambda: not pid_alive(pid), 10, "the client's virtiofsd to exit with its QEMU")
    reap(pid)
    assert not virtiofsds(workdir)


def test_a_cached_vm_whose_virtiofsd_dies_is_replaced_and_never_handed_out(
        make_vfs_daemon: Callable[..., Daemon], workdir: Path) -> None:
    d = make_vfs_daemon(1)
    (record,) = d.wait_ready(1)
    os.kill(record["virtiofsd_pid"], signal.SIGKILL)
    wait_for(lambda: "its virtiofsd exited with code -9" in d.log(), 10,
             "the VM to be seen dead")
    wait_for(lambda: not pid_alive(record["pid"]), 10, "its QEMU to be stopped")
    (replacement,) = d.wait_ready(1)
    assert replacement["id"] != record["id"]
    vm = d.get()["hypervisor"]
    assert vm["ID"] == replacement["id"]
    assert is_virtiofsd(vm["VirtiofsdPid"], Path(vm["VMDir"]) / "shared")
    assert "Traceback" not in d.log()


def test_a_restarted_daemon_stops_its_predecessor_s_vms_and_their_virtiofsd(
        make_vfs_daemon: Callable[..., Daemon], workdir: Path) -> None:
    first = make_vfs_daemon(2)
    ready = first.wait_ready(2)
    vm = first.get()["hypervisor"]
    orphans = [r for r in ready if r["pid"] != vm["Pid"]]
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # A daemon killed outright leaves everything running.
    assert all(pid_alive(r["pid"]) and pid_alive(r["virtiofsd_pid"]) for r in orphans)
    second = make_vfs_daemon(1)
    for r in orphans:
        wait_for(exited(r["pid"], r["virtiofsd_pid"]), 15,
                 f"orphan {r['id']}'s QEMU and virtiofsd to be stopped")
    assert pid_alive(vm["Pid"])
    assert pid_alive(vm["VirtiofsdPid"])
    second.wait_ready(1)
    assert "Traceback" not in second.log()
    first.taken.clear()
    stop_taken_vm(vm)
    wait_for(lambda: not pid_alive(vm["VirtiofsdPid"]), 10, "the client's virtiofsd to exit")
    reap(vm["VirtiofsdPid"])


def test_a_virtiofsd_that_cannot_start_fails_its_boot_and_leaves_nothing(
        make_vfs_daemon: Callable[..., Daemon], workdir: Path) -> None:
    d = make_vfs_daemon(1, extra='virtio_fs_extra_args = ["-o", "no_such_option"]')
    line = wait_for(lambda: next((x for x in d.log().splitlines()
                                  if "VM boot failed" in x), None), 30, "a failed boot")
    assert "virtiofsd exited with 1 before QEMU connected" in line, line
    assert "journalctl -t virtiofsd" in line, line  # --syslog: its words are there
    assert d.serving()
    wait_for(lambda: not our_qemus() and not virtiofsds(workdir), 10,
             "the failed boot's QEMU and virtiofsd to be gone")


def test_a_missing_virtio_fs_daemon_is_one_line_at_check_config_and_start(
        vfs_config: Callable[..., Path], workdir: Path) -> None:
    config = vfs_config(1, daemon=workdir / "no-virtiofsd")
    for command in ("check-config", "init"):
        result = run_cli(["--config", str(config), command])
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert "hypervisor.qemu.virtio_fs_daemon: no virtiofsd at" in result.stderr
    assert not (workdir / "cache.sock").exists()


def share_modules_here() -> bool:
    version = kernel_version(find_kernel())
    return version is not None and bool(share_modules(version))


def test_a_virtiofsd_whose_qemu_never_started_is_found_by_its_share_and_stopped(
        vfs_config: Callable[..., Path], workdir: Path) -> None:
    """A daemon that died between launching a VM's virtiofsd and recording it (its record
    says booting, no pids): the virtiofsd never saw a QEMU, so it would wait forever. Its
    successor finds it by the share it exports, which only that VM's does, and stops it."""
    config = vfs_config(1)
    vm_id = "0123456789ab"
    own = workdir / "state" / "vms" / vm_id
    vm_dir = workdir / "vm" / vm_id
    own.mkdir(parents=True)
    (vm_dir / "shared").mkdir(parents=True)
    (own / "vm.json").write_text(json.dumps({
        "id": vm_id, "state": "booting", "pid": None, "owner_pid": 1,
        "vm_dir": str(vm_dir), "sandbox_dir": str(workdir / "sbs" / vm_id),
        "proxy_pid": None, "virtiofsd_pid": None}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(vm_dir / "vhost-fs.sock"))
    listener.listen()
    fd = listener.fileno()
    lost = subprocess.Popen([str(VIRTIOFSD), f"--fd={fd}", "-o",
                             f"source={vm_dir / 'shared'}", "-o", "cache=auto", "--syslog",
                             "-o", "no_posix_lock", "-f"], pass_fds=(fd,),
                            start_new_session=True)
    listener.close()
    d = Daemon(config, workdir / "cache.sock", workdir / "state")
    try:
        assert pid_alive(lost.pid)
        d.start()
        assert lost.wait(15) is not None
        assert f"stopping virtiofsd {lost.pid} of VM {vm_id}" in d.log()
        assert not vm_dir.exists()
        d.wait_ready(1)
    finally:
        d.stop()
        if lost.poll() is None:
            lost.kill()
            lost.wait()
