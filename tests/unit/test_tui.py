"""The dashboard's screens and its UI logic, fed fixed snapshots through the same path a live
server's pushes take (backend.watch() -> show_snapshot). tests/integration/test_tui.py runs
the same app against the real daemon.

Snapshot tests freeze everything that depends on time: the snapshot carries the uptime and
ages (the app computes none), event times are shown in UTC here, the terminal size is fixed
and animations are off. Update the SVGs with `pytest --snapshot-update` after a deliberate
change, and look at them before committing.
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from kata_vmcache.client.rpc import BaseVM
from kata_vmcache.client.snapshot import Counters, Event, ServerConfig, Snapshot, VMInfo
from kata_vmcache.errors import ServerUnavailable
from kata_vmcache.tui import format as fmt
from kata_vmcache.tui.app import VMCacheApp
from kata_vmcache.tui.backend import FixedBackend
from kata_vmcache.tui.screens import ConfirmStopScreen, HelpScreen, TakenVMScreen

SIZE = (120, 40)
T0 = 1_790_000_000.0  # 2026-09-21 13:33:20 UTC
ENDPOINT = "/run/kata-containers/cache.sock"


def sample(**changes: Any) -> Snapshot:
    """A busy, healthy cache: 2 of 3 ready, one refill booting, history behind it."""
    now = T0 + 3725
    fields: dict[str, Any] = dict(
        pid=4242, endpoint=ENDPOINT, version="0.1.0", started_at=T0,
        uptime_seconds=3725.4, taken_at=now,
        config=ServerConfig(vcpus=1, memory_mib=256, accelerator="tcg",
                            template_enabled=False,
                            config_path="/etc/kata-containers/configuration.toml"),
        target=3, ready=2, booting=1, clients_waiting=0,
        vms=(VMInfo("3f2a9c41d0b7", 51234, "ready", 1, 256, now - 1805, 1805.2, 2.41),
             VMInfo("8be01f77a2c3", 51388, "ready", 1, 256, now - 64, 64.9, 2.87),
             VMInfo("c0d4e5f60718", 51502, "booting", 1, 256, now - 1.2, 1.2, None)),
        counters=Counters(handed_out=7, booted=10, boot_failures=1, died_in_pool=0),
        handoff_seconds=(0.012, 0.009, 0.011, 0.010, 0.034, 0.013, 0.008),
        boot_seconds=(2.31, 2.45, 2.28, 6.12, 2.41, 2.52, 2.39, 2.87, 2.33, 2.62),
        events=(
            Event(11, now - 1806, "boot_failed",
                  "boot failed: QEMU exited with code 1 (next try in 1 s)"),
            Event(12, now - 1805, "ready", "VM 3f2a9c41d0b7 ready in 2.41 s (QEMU pid 51234)",
                  "3f2a9c41d0b7"),
            Event(13, now - 130, "handed_out",
                  "VM 1d9e33aa0c55 handed out in 13 ms (QEMU pid 50990)", "1d9e33aa0c55"),
            Event(14, now - 64, "ready", "VM 8be01f77a2c3 ready in 2.87 s (QEMU pid 51388)",
                  "8be01f77a2c3"),
            Event(15, now - 2, "handed_out",
                  "VM 77a1b2c3d4e5 handed out in 8 ms (QEMU pid 51100)", "77a1b2c3d4e5"),
        ),
        heartbeat_seconds=1.0,
    )
    fields.update(changes)
    return Snapshot(**fields)


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Event times are local times; pin the zone so screenshots match anywhere."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def frozen(app: VMCacheApp) -> VMCacheApp:
    app.animation_level = "none"
    return app


async def until(pilot: Pilot[Any], predicate: Callable[[], object], what: str,
                timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await pilot.pause(0.02)


async def connected(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, VMCacheApp)
    await until(pilot, lambda: app.connection == "connected", "the snapshot to show")


# screenshots


def test_main_screen(snap_compare: Any, utc: None) -> None:
    app = frozen(VMCacheApp(FixedBackend([sample()])))
    assert snap_compare(app, terminal_size=SIZE, run_before=connected)


def test_help_screen(snap_compare: Any, utc: None) -> None:
    app = frozen(VMCacheApp(FixedBackend([sample()])))
    assert snap_compare(app, terminal_size=SIZE, run_before=connected,
                        press=["question_mark"])


class DownBackend(FixedBackend):
    """Nothing listens on the socket."""

    async def watch(self) -> AsyncIterator[Snapshot]:
        raise ServerUnavailable(f"no VM cache server at {self.endpoint} "
                                "(is 'kata-vmcache init' running?)")
        yield  # pragma: no cover - makes this an async generator


def test_disconnected_screen(snap_compare: Any, utc: None) -> None:
    app = frozen(VMCacheApp(DownBackend([sample()]), retry_start=60))

    async def down(pilot: Pilot[Any]) -> None:
        await until(pilot, lambda: app.connection == "disconnected", "the disconnected state")
    assert snap_compare(app, terminal_size=SIZE, run_before=down)


# UI logic with a scripted backend


class ScriptedBackend(FixedBackend):
    """Snapshots pushed by the test; actions recorded."""

    def __init__(self) -> None:
        super().__init__([sample()], Path(ENDPOINT))
        self.queue: asyncio.Queue[Snapshot | Exception] = asyncio.Queue()
        self.quits = 0
        self.takes = 0

    async def watch(self) -> AsyncIterator[Snapshot]:
        while True:
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    async def take_vm(self) -> BaseVM:
        self.takes += 1
        return BaseVM("3f2a9c41d0b7", 1, 256, 0, {
            "ID": "3f2a9c41d0b7", "QmpChannelpath": "/run/kata-vmcache/vms/3f2a/qmp.sock",
            "Pid": 51234})

    async def stop_server(self) -> None:
        self.quits += 1


def table_pids(app: VMCacheApp) -> list[int]:
    table = app.query_one("#vms", DataTable)
    return [int(str(table.get_row(key)[1])) for key in table.rows]


def banner(app: VMCacheApp) -> str:
    widget = app.query_one("#banner", Static)
    return str(widget.render()) if widget.display else ""


@pytest.mark.asyncio
async def test_table_follows_pushed_snapshots_and_disconnects() -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend, retry_start=0.05, retry_cap=0.05)
    async with app.run_test(size=SIZE) as pilot:
        assert "Connecting" in banner(app)
        backend.queue.put_nowait(sample())
        await connected(pilot)
        assert table_pids(app) == [51234, 51388, 51502]
        assert banner(app) == ""
        # The first VM was taken and the booting one came up: rows follow the snapshot.
        s = sample()
        backend.queue.put_nowait(sample(vms=(
            s.vms[1], VMInfo("c0d4e5f60718", 51502, "ready", 1, 256, 0, 3.0, 2.2))))
        await until(pilot, lambda: table_pids(app) == [51388, 51502], "the rows to follow")
        table = app.query_one("#vms", DataTable)
        assert str(table.get_row("c0d4e5f60718")[2]) == "ready"
        # The connection drops: a clear banner, no stale VMs, and it retries by itself.
        backend.queue.put_nowait(ServerUnavailable("no VM cache server at /x"))
        await until(pilot, lambda: app.connection == "disconnected", "the disconnected state")
        assert "Disconnected, retrying" in banner(app)
        assert "no VM cache server at /x" in banner(app)
        assert table_pids(app) == []
        backend.queue.put_nowait(sample())
        await connected(pilot)
        assert table_pids(app) == [51234, 51388, 51502]
        assert banner(app) == ""


@pytest.mark.asyncio
async def test_a_target_held_down_by_the_memory_budget_says_so(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample(target=2, vm_cache_number=2))
        await connected(pilot)
        label = app.query_one("#pool-label", Static)
        assert str(label.render()) == "Ready 2 / 2"
        backend.queue.put_nowait(sample(target=2, vm_cache_number=5, memory_budget_mib=600))
        await until(pilot, lambda: "memory_budget_mib" in str(label.render()), "the note")
        assert str(label.render()) == "Ready 2 / 2  (5 wanted, memory_budget_mib 600)"
        # On screen, not cut off: the text of the rendered screen has it.
        app.save_screenshot(str(tmp_path / "limited.svg"))
        shown = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "limited.svg").read_text()))
        assert "(5 wanted, memory_budget_mib 600)" in shown.replace("\xa0", " ")


@pytest.mark.asyncio
async def test_events_are_logged_once_each() -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample())
        await connected(pilot)
        more = Event(16, T0 + 3726, "died", "VM 8be01f77a2c3 died in the pool", "8be01f77a2c3")
        backend.queue.put_nowait(sample(events=(*sample().events[1:], more)))
        await until(pilot, lambda: app._last_seq == 16, "the new event")
        from textual.widgets import RichLog
        text = "\n".join(strip.text for strip in app.query_one("#events", RichLog).lines)
        assert text.count("VM 3f2a9c41d0b7 ready") == 1
        assert text.count("died in the pool") == 1
        assert text.count("connected to kata-vmcache 0.1.0 (pid 4242)") == 1


@pytest.mark.asyncio
async def test_stop_asks_first() -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample())
        await connected(pilot)
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "the dialog")
        await pilot.press("n")
        await until(pilot, lambda: not isinstance(app.screen, ConfirmStopScreen), "cancel")
        assert backend.quits == 0
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ConfirmStopScreen), "the dialog")
        await pilot.press("y")
        await until(pilot, lambda: backend.quits == 1, "Quit to be sent")


@pytest.mark.asyncio
async def test_take_shows_the_vm_you_now_own() -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample())
        await connected(pilot)
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, TakenVMScreen), "the hand-off")
        assert [vm.id for vm in app.taken] == ["3f2a9c41d0b7"]
        shown = "\n".join(str(w.render()) for w in app.screen.query(Static))
        assert "You now own VM 3f2a9c41d0b7 (QEMU pid 51234)" in shown
        assert '"QmpChannelpath": "/run/kata-vmcache/vms/3f2a/qmp.sock"' in shown
        assert "kill 51234" in shown
        # Other actions wait until the dialog is closed.
        await pilot.press("t")
        assert backend.takes == 1
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, TakenVMScreen), "close")


@pytest.mark.asyncio
async def test_actions_are_off_while_disconnected() -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend, retry_start=60)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(ServerUnavailable("down"))
        await until(pilot, lambda: app.connection == "disconnected", "the disconnected state")
        await pilot.press("t", "s")
        await pilot.pause()
        assert backend.takes == 0
        assert not isinstance(app.screen, ConfirmStopScreen)
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "help")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), "help to close")


def test_formats() -> None:
    assert [fmt.duration(s) for s in (0, 59.9, 60, 3725, 90000)] == [
        "0s", "59s", "1m 00s", "1h 02m", "1d 01h"]
    assert fmt.seconds(None) == "—"
    assert fmt.seconds(2.345) == "2.35 s"
    assert fmt.millis(0.0123) == "12 ms"
    assert fmt.millis(1.44) == "1.4 s"
    assert fmt.size(512) == "512 B"
    assert fmt.size(3 * 1024**3) == "3.0 GiB"


@pytest.mark.asyncio
async def test_ctrl_s_saves_an_svg_of_the_screen(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample())
        await connected(pilot)
        await pilot.press("ctrl+s")
        await until(pilot, lambda: list(tmp_path.glob("*.svg")), "the screenshot")
    svg, = tmp_path.glob("*.svg")
    text = svg.read_text()
    assert text.startswith("<svg")
    assert "51234" in text  # the VM table is in it


@pytest.mark.asyncio
async def test_no_values_no_sparkline() -> None:
    """An empty Sparkline draws a bar that reads as a value: none is shown until there is one."""
    from textual.widgets import Sparkline

    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample(handoff_seconds=()))
        await connected(pilot)
        assert not app.query_one("#latency", Sparkline).display
        assert app.query_one("#boot", Sparkline).display
        assert "none yet" in str(app.query_one("#latency-label", Static).render())
        backend.queue.put_nowait(sample())
        await until(pilot, lambda: app.query_one("#latency", Sparkline).display,
                    "the first latency")


@pytest.mark.asyncio
async def test_autoscaling_shows_why_the_target_is_what_it_is(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    app = VMCacheApp(backend)
    reason = "10 requests within 2.2 s in the last 60 s"
    async with app.run_test(size=SIZE) as pilot:
        backend.queue.put_nowait(sample(target=10, vm_cache_number=10, autoscale=True,
                                        target_reason=reason))
        await connected(pilot)
        detail = app.query_one("#pool-detail", Static)
        await until(pilot, lambda: reason in str(detail.render()), "the reason")
        assert str(app.query_one("#pool-label", Static).render()) == "Ready 2 / 10"
        app.save_screenshot(str(tmp_path / "autoscale.svg"))
        shown = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "autoscale.svg").read_text()))
        assert reason in shown.replace("\xa0", " ")  # on screen, not cut off
