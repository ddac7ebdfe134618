"""An operator's bad day, on real QEMU: damaged records after a crash, a full disk, stuck
orphans. The rule: the client's VM survives, nothing the daemon launched and still owns
outlives it, and the daemon stays up."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import our_qemus  # tests/conftest.py: the leak guard's own census

from kata_vmcache.procs import pid_alive

from .harness import Daemon, exited, qmp, wait_for

pytestmark = pytest.mark.qemu

Report = Callable[[str, object], None]


def crash(daemon: Daemon) -> None:
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)


def stop_by_pid(pid: int) -> None:
    """What an operator does with a VM the daemon reported and left alone."""
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 10, f"QEMU {pid} to die")
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # orphaned to us (the suite is a subreaper)


def test_damaged_records_after_a_crash_stop_no_vm_that_may_be_a_clients(
        make_daemon: Callable[..., Daemon], workdir: Path, report: Report) -> None:
    first = make_daemon(cache_number=3)
    first.wait_ready(3)
    taken = first.get()["hypervisor"]
    ready = first.wait_ready(3)  # refilled: three in the pool, one handed out
    crash(first)
    vms = first.state_dir / "vms"
    truncated, wrong_types, intact = (r for r in ready if r["id"] != taken["ID"])
    # Truncated (a torn write), JSON null (the crash loop of old), wrong types.
    (vms / truncated["id"] / "vm.json").write_text(
        json.dumps(truncated)[:40])
    (vms / taken["ID"] / "vm.json").write_text("null")
    (vms / wrong_types["id"] / "vm.json").write_text(json.dumps({**wrong_types, "pid": "1234"}))
    # A record whose VM is gone, damaged too: nothing runs for it, so it is just removed.
    stale = vms / "0123456789ab"
    stale.mkdir()
    (stale / "vm.json").write_text("{not json")

    started = time.monotonic()
    second = make_daemon(cache_number=3)  # starts, and stays up
    report("damaged records: serving after (s)", f"{time.monotonic() - started:.2f}")
    try:
        second.wait_ready(3)
        log = second.log()
        # The one VM the daemon can prove it owned is stopped; nothing else is.
        wait_for(lambda: not pid_alive(intact["pid"]), 10, "the intact orphan to be stopped")
        for damaged in (truncated, wrong_types):
            assert pid_alive(damaged["pid"]), log
            path = vms / damaged["id"] / "vm.json"
            assert log.count(f"{path}:") == 1, log  # warned once, naming the file
            assert path.exists()  # its files stay: an operator decides
        assert pid_alive(taken["Pid"])
        assert qmp(Path(taken["QmpChannelpath"]), "query-status")[0]["status"] == "paused"
        assert log.count(f"{vms / taken['ID'] / 'vm.json'}: not a JSON object") == 1
        assert "no QEMU of VM 0123456789ab runs: its files are removed" in log
        # ... and in status --json, for an operator to decide.
        status = json.loads(second.cli("status", "--json").stdout)
        unclaimed = {u["pid"]: u for u in status["snapshot"]["unclaimed"]}
        assert set(unclaimed) == {truncated["pid"], wrong_types["pid"], taken["Pid"]}
        assert unclaimed[taken["Pid"]]["problem"] == "not a JSON object (got NoneType)"
        assert unclaimed[taken["Pid"]]["path"] == str(vms / taken["ID"] / "vm.json")
        assert not stale.exists()
        assert "Traceback" not in log
    finally:
        second.stop()
        for pid in (truncated["pid"], wrong_types["pid"], taken["Pid"]):
            stop_by_pid(pid)


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A tmpfs with few inodes for the state directory, unmounted afterwards. Full of
    inodes rather than of bytes: tmpfs counts its pages per CPU in batches, so a small
    one does not refuse the very next write when full; it refuses the next inode exactly."""
    path = workdir / "state"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=64,mode=0700",
                    "kvc-test", str(path)], check=True)
    try:
        yield path
    finally:
        # A QEMU that still has its log open there (a test that failed half-way) makes the
        # mount busy: then detach it now, the kernel frees it when the last file closes.
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(disk: Path, *, more: bool = False) -> list[Path]:
    """Use up every inode of `disk`; the files, to give some back."""
    filler = disk / "filler"
    filler.mkdir(exist_ok=more)
    made: list[Path] = []
    with contextlib.suppress(OSError):
        while True:
            path = filler / f"{len(made)}{'b' if more else ''}"
            path.touch()
            made.append(path)
    return made


@pytest.mark.timeout(240)  # the backoff may wait up to 60 s between attempts
def test_a_full_disk_fails_refills_clearly_leaks_no_qemu_and_recovers(
        make_daemon: Callable[..., Daemon], small_disk: Path, report: Report) -> None:
    d = make_daemon(cache_number=2)
    try:
        ready = d.wait_ready(2)
        # In the pool, not only recorded ready: each has written its hand-off record.
        wait_for(lambda: d.log().count(" ready in ") >= 2, 30, "2 VMs in the pool")
        known = {r["pid"] for r in ready}
        filler = fill(small_disk)
        # Ready VMs are still handed out: the hand-off renames a record written ahead.
        taken = d.get()["hypervisor"]
        assert taken["Pid"] in known
        # The refill cannot create its directory: one clear reason, then backoff.
        wait_for(lambda: "No space left on device" in d.log(), 30, "a refill to fail")
        failure = next(line for line in d.log().splitlines() if "VM boot failed:" in line)
        assert "No space left on device" in failure
        assert str(small_disk) in failure
        # Back, the inodes a boot needs to launch QEMU: its directory and what a booted
        # VM holds in it (record, QEMU log, the sockets QEMU binds), less the hand-off
        # record written ahead once booted. The record written once QEMU runs then cannot
        # be: that QEMU must be stopped, whatever can no longer be written. (It lives for
        # ~0.1 s: the log line naming that record shows it ran, not a poll of the
        # process table.)
        kept = next(r for r in ready if r["pid"] != taken["Pid"])
        needed = 1 + sum(1 for f in (small_disk / "vms" / kept["id"]).iterdir()
                         if f.suffix != ".handed_off")
        filler += fill(small_disk, more=True)  # what the hand-off's rename gave back
        mark = len(d.log())
        for path in filler[-needed:]:
            path.unlink()
        # The next attempt comes after the backoff (a few seconds by now).
        failed = wait_for(lambda: "VM boot failed" in d.log()[mark:] and d.log()[mark:], 90,
                          "the next boot to fail")
        assert "QEMU exited during start-up" not in failed, (needed, failed)
        assert "vm.tmp)" in failed, failed  # the record after QEMU's launch
        wait_for(lambda: not (our_qemus() - known), 15, "the failed boot's QEMU to stop")
        assert len(d.records("ready")) == 1
        assert "Traceback" not in d.log()
        shutil.rmtree(small_disk / "filler")
        started = time.monotonic()
        wait_for(lambda: "VM boots work again" in d.log(), 120, "the cache to recover")
        report("full disk: ready again after space returned (s)",
               f"{time.monotonic() - started:.1f}")
        d.wait_ready(2)
        d.send_signal(signal.SIGTERM)
        assert d.wait(15) == 0
        assert our_qemus() == {taken["Pid"]}  # only the client's VM outlives the daemon
    finally:
        d.stop()


def test_stuck_orphans_are_stopped_side_by_side(make_daemon: Callable[..., Daemon],
                                                report: Report) -> None:
    first = make_daemon(cache_number=3)
    orphans = [r["pid"] for r in first.wait_ready(3)]
    crash(first)
    for pid in orphans:
        os.kill(pid, signal.SIGSTOP)  # stuck: deaf to SIGTERM until continued
    started = time.monotonic()
    second = make_daemon(cache_number=1)
    serving = time.monotonic() - started
    for pid in orphans:
        wait_for(exited(pid), 10, f"stuck orphan {pid} to be stopped")
    gone = time.monotonic() - started
    report("3 SIGSTOPped orphans: serving after, all gone after (s)",
           f"{serving:.2f}, {gone:.2f}")
    assert second.log().count("by a previous daemon") == 3
    second.wait_ready(1)
