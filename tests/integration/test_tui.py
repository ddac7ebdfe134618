"""The dashboard against the real daemon on the demo guest: what it shows is what `status`
says, taking a VM through its key binding takes a real VM, and it follows the server down
and back up. Then the real command in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from kata_vmcache.procs import pid_alive
from kata_vmcache.tui.app import VMCacheApp
from kata_vmcache.tui.backend import SocketBackend
from kata_vmcache.tui.screens import ConfirmStopScreen, TakenVMScreen

from .harness import Daemon, stop_taken_vm, wait_for

pytestmark = pytest.mark.qemu


async def until(pilot: Pilot[Any], predicate: Callable[[], object], what: str,
                timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.02)


def rows(app: VMCacheApp) -> dict[int, str]:
    """QEMU pid -> state, as the VM table shows them."""
    table = app.query_one("#vms", DataTable)
    return {int(str(table.get_row(k)[1])): str(table.get_row(k)[2]) for k in table.rows}


def status_pids(daemon: Daemon) -> set[int]:
    out = daemon.cli("status")
    assert out.returncode == 0, out.stderr
    return {int(line.split()[3]) for line in out.stdout.splitlines()[1:]}


def banner(app: VMCacheApp) -> str:
    widget = app.query_one("#banner", Static)
    return str(widget.render()) if widget.display else ""


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_dashboard_follows_the_real_daemon(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=2)
    app = VMCacheApp(SocketBackend(daemon.endpoint), retry_cap=1.0)
    async with app.run_test(size=(120, 40)) as pilot:
        # The table lists the VMs `status` lists (a full pool stands still).
        await asyncio.to_thread(daemon.wait_ready, 2)
        pids = await asyncio.to_thread(status_pids, daemon)
        assert len(pids) == 2
        await until(pilot, lambda: rows(app) == dict.fromkeys(pids, "ready"),
                    "the table to list the pids of `status`")
        snapshot = app.snapshot
        assert snapshot is not None
        assert snapshot.pid == daemon.pid
        as_json = json.loads((await asyncio.to_thread(daemon.cli, "status", "--json")).stdout)
        assert {v["pid"] for v in as_json["snapshot"]["vms"]} == pids
        assert as_json["snapshot"]["ready"] == 2

        # Take a VM with the key binding: it leaves the table, the refill comes in.
        pressed = time.monotonic()
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, TakenVMScreen), "the hand-off")
        vm = app.taken[0]
        daemon.taken.append(vm.hypervisor)  # stopped by the fixture whatever happens
        assert vm.pid in pids
        shown = "\n".join(str(w.render()) for w in app.screen.query(Static))
        assert f"You now own VM {vm.id}" in shown
        await until(pilot, lambda: vm.pid not in rows(app), "the taken VM to leave the table")
        # Measured, not asserted: key press to the row gone (GetBaseVM + the pushed change).
        print(f"\nkey 't' to the VM gone from the table: {time.monotonic() - pressed:.3f} s")
        await pilot.press("escape")
        await until(pilot, lambda: len(rows(app)) == 2 and vm.pid not in rows(app)
                    and set(rows(app).values()) == {"ready"}, "the refill")
        await asyncio.to_thread(stop_taken_vm, vm.hypervisor)
        assert rows(app).keys() == await asyncio.to_thread(status_pids, daemon)
        assert app.snapshot is not None
        assert app.snapshot.counters.handed_out == 1

        # Stop the server through the dialog: the dashboard says it is disconnected.
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "the dialog")
        await pilot.press("y")
        assert await asyncio.to_thread(daemon.wait, 30) == 0
        await until(pilot, lambda: app.connection == "disconnected", "the disconnected state")
        assert "Disconnected, retrying" in banner(app)
        assert rows(app) == {}

        # The same server comes back: the dashboard reconnects by itself.
        began = time.monotonic()
        await asyncio.to_thread(daemon.start)  # returns once `status` answers
        served = time.monotonic()
        await until(pilot, lambda: app.connection == "connected"
                    and app.snapshot is not None
                    and app.snapshot.pid == daemon.pid,
                    "the dashboard to reconnect")
        now = time.monotonic()
        print(f"reconnected {now - began:.3f} s after the restart began, "
              f"{max(0.0, now - served):.3f} s after `status` first answered")
        assert banner(app) == ""


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A private tmux server (its own socket), killed afterwards."""
    if not shutil.which("tmux"):
        pytest.fail("tmux is not installed (run `make setup`)")
    # Its socket in a directory of ours (-S), not tmux's shared /tmp/tmux-UID (-L), whose
    # socket file would outlive the server.
    sockets = Path(tempfile.mkdtemp(prefix="kvc-tmux-"))
    base = ["tmux", "-S", str(sockets / "tmux.sock"), "-f", "/dev/null"]
    try:
        yield base
    finally:
        _kill_tmux(base)
        shutil.rmtree(sockets, ignore_errors=True)


def _kill_tmux(base: list[str]) -> None:
    server_pid = subprocess.run([*base, "display-message", "-p", "#{pid}"],
                                capture_output=True, text=True).stdout.strip()
    subprocess.run([*base, "kill-server"], capture_output=True)
    if server_pid.isdigit():
        pid = int(server_pid)
        wait_for(lambda: not pid_alive(pid), 10, "the tmux server to exit")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours to reap: pytest is a child subreaper


def screen(tmux: list[str]) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.timeout(180)
def test_tui_in_a_terminal(daemon: Daemon, tmux: list[str]) -> None:
    """`kata-vmcache tui` as a person runs it: the pool on screen, help, quit."""
    ready = daemon.wait_ready(2)
    done = daemon.config.parent / "tui.exit"
    # The tmux server inherits this process's environment (PYTHONPATH included); COLUMNS
    # and LINES, when a shell exported them, would override the pane's real size.
    command = (f"env -u COLUMNS -u LINES {sys.executable} -m kata_vmcache"
               f" --config {daemon.config} tui; echo $? > {done}; sleep 60")
    # A detached session may start at tmux's default 80x24 and be resized a moment later,
    # racing the app's first look at the terminal: size the window first, then start.
    subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "120", "-y", "40",
                    "sleep 60"], check=True)
    subprocess.run([*tmux, "resize-window", "-t", "tui", "-x", "120", "-y", "40"], check=True)
    wait_for(lambda: subprocess.run(
        [*tmux, "display-message", "-p", "-t", "tui", "#{window_width}x#{window_height}"],
        capture_output=True, text=True).stdout.strip() == "120x40", 10, "a 120x40 window")
    subprocess.run([*tmux, "respawn-pane", "-k", "-t", "tui", command], check=True)
    try:
        expected = [*(f" {r['pid']} " for r in ready), "Ready 2 / 2", "t Take VM", "q Quit",
                    f"pid       {daemon.pid}"]
        wait_for(lambda: all(e in screen(tmux) for e in expected), 30,
                 f"{expected} on screen")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "?"], check=True)
        wait_for(lambda: "kata-vmcache dashboard" in screen(tmux), 10, "the help screen")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "Escape"], check=True)
        wait_for(lambda: "kata-vmcache dashboard" not in screen(tmux), 10, "help to close")
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], check=True)
        wait_for(done.exists, 10, "the dashboard to exit")
        assert done.read_text().strip() == "0"
    finally:
        # Quit the dashboard's shell; a leftover would be a child of this run.
        subprocess.run([*tmux, "kill-session", "-t", "tui"], capture_output=True)
    assert daemon.proc is not None
    assert daemon.proc.poll() is None
