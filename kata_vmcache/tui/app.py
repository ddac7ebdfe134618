"""The dashboard: one screen that shows the cache as the server pushes it.

    ┌ header ──────────────────────────────────────────────────────────────┐
    │ banner: connecting / disconnected, retrying / server stopping        │
    ├ Server ─────────────────────────┬ Cache ─────────────────────────────┤
    │ pid, socket, uptime, VM shape   │ ready / target gauge, booting, ... │
    ├ VMs ────────────────────────────┴────────────────────────────────────┤
    │ VM · QEMU pid · state · vCPUs · memory · age · boot                  │
    ├ Activity ───────────────┬ Events ────────────────────────────────────┤
    │ counters, sparklines    │ scrolling log                              │
    └ footer: key bindings ───┴────────────────────────────────────────────┘

One worker owns the connection: it reads snapshots from the backend's Watch and shows each
one (`show_snapshot`); when the stream fails or ends it shows the disconnected state and
tries again with exponential backoff. Everything on screen is a function of the latest
snapshot (plus the event log and the connection state), so a fixed snapshot gives a fixed
screen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from rich.markup import escape
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    ProgressBar,
    RichLog,
    Sparkline,
    Static,
)

from ..client.rpc import BaseVM
from ..client.snapshot import Event, Snapshot, VMInfo
from ..errors import VmcacheError
from . import format as fmt
from .backend import Backend
from .screens import ConfirmStopScreen, HelpScreen, TakenVMScreen

RETRY_START = 0.5
RETRY_CAP = 5.0

EVENT_STYLES = {
    "ready": "green",
    "handed_out": "cyan",
    "died": "yellow",
    "boot_failed": "red",
    "connected": "blue",
    "disconnected": "red",
    "action": "magenta",
}

COLUMNS = (
    ("VM", "id"), ("QEMU pid", "pid"), ("State", "state"), ("vCPUs", "vcpus"),
    ("Memory", "memory"), ("Age", "age"), ("Boot", "boot"),
)


class VMCacheApp(App[None]):
    TITLE = "kata-vmcache"
    CSS = """
    #banner { display: none; height: auto; padding: 0 1; text-style: bold; }
    #banner.disconnected { display: block; background: $error; color: $text; }
    #banner.connecting { display: block; background: $primary-darken-2; color: $text; }
    #banner.stopping { display: block; background: $warning; color: $text; }
    .panel { border: round $primary; padding: 0 1; }
    #top { height: auto; }
    #server { width: 1fr; height: 7; }
    #pool { width: 1fr; height: 7; }
    #gauge { margin: 1 0; }
    #gauge Bar { width: 1fr; }
    #vms { height: 1fr; min-height: 5; }
    #bottom { height: 2fr; min-height: 12; }
    #activity { width: 40; }
    #counters { height: auto; }
    .spark-label { margin-top: 1; }
    Sparkline { height: 2; width: 1fr; }
    #events { width: 1fr; }
    ModalScreen { align: center middle; }
    #dialog {
        width: 96; max-width: 95%; height: auto; max-height: 90%;
        border: thick $primary; background: $surface; padding: 1 2;
    }
    #dialog .title { text-style: bold; margin-bottom: 1; }
    #dialog .text { margin-bottom: 1; }
    #json-box { height: auto; max-height: 16; border: round $secondary; }
    #dialog .buttons { height: auto; align-horizontal: right; }
    #dialog Button { margin-left: 2; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "take_vm", "Take VM"),
        Binding("s", "stop_server", "Stop server"),
        Binding("question_mark,f1", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
        # Not in the footer (it is for docs and bug reports): an SVG of the screen, in cwd.
        Binding("ctrl+s", "save_screenshot", "Screenshot", show=False),
    ]

    def __init__(self, backend: Backend, *, retry_start: float = RETRY_START,
                 retry_cap: float = RETRY_CAP) -> None:
        super().__init__()
        self.backend = backend
        self.retry_start = retry_start
        self.retry_cap = retry_cap
        #: The latest snapshot while connected; None while not.
        self.snapshot: Snapshot | None = None
        #: "connecting", "connected" or "disconnected".
        self.connection = "connecting"
        self.retry_attempt = 0
        #: Every VM taken in this session, in order: the caller owns them.
        self.taken: list[BaseVM] = []
        self._taking = False
        self._server: tuple[int, float] | None = None
        self._last_seq = 0

    # layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="▣")
        yield Static(id="banner")
        with Horizontal(id="top"):
            yield Static(id="server", classes="panel")
            with Vertical(id="pool", classes="panel"):
                yield Static(id="pool-label")
                yield ProgressBar(id="gauge", show_eta=False, show_percentage=False)
                yield Static(id="pool-detail")
        yield DataTable(id="vms", classes="panel", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="bottom"):
            with Vertical(id="activity", classes="panel"):
                yield Static(id="counters")
                yield Static(id="latency-label", classes="spark-label")
                yield Sparkline([], id="latency")
                yield Static(id="boot-label", classes="spark-label")
                yield Sparkline([], id="boot")
            yield RichLog(id="events", classes="panel", max_lines=500, wrap=True,
                          min_width=20)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.backend.endpoint)
        for selector, title in (("#server", "Server"), ("#pool", "Cache"), ("#vms", "VMs"),
                                ("#activity", "Activity"), ("#events", "Events")):
            self.query_one(selector).border_title = title
        table = self.query_one("#vms", DataTable)
        for label, key in COLUMNS:
            table.add_column(label, key=key)
        self._show_empty()
        self._set_banner("connecting", f"Connecting to {self.backend.endpoint} …")
        self._connection()

    # the connection

    @work(group="connection", exclusive=True)
    async def _connection(self) -> None:
        delay = self.retry_start
        while True:
            reason = "the server ended the stream"
            try:
                async for snapshot in self.backend.watch():
                    # The app may have begun shutting down while we awaited: its screen's
                    # widgets are being removed (seen once, as a NoMatches on #banner).
                    if not self.is_running:
                        return
                    self.show_snapshot(snapshot)
                    delay = self.retry_start
            except VmcacheError as exc:
                reason = str(exc)
            if not self.is_running:
                return
            self.show_disconnected(reason, delay)
            await self._retry_after(delay)
            delay = min(delay * 2, self.retry_cap)

    async def _retry_after(self, delay: float) -> None:
        """Sleep out the backoff, but retry at once when the socket appears: a server
        that comes back is seen as soon as it binds (a stat, not a call to the server)."""
        endpoint = self.backend.endpoint
        absent = not endpoint.exists()
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.2))
            if absent and endpoint.exists():
                return

    def show_snapshot(self, s: Snapshot) -> None:
        """Put a snapshot on screen: everything shown comes from it."""
        server = (s.pid, s.started_at)
        if server != self._server:
            self._server, self._last_seq = server, 0
            # What happened before we connected first, then that we did.
            self._show_events(s.events)
            self._write_event(s.taken_at, "connected",
                            f"connected to kata-vmcache {s.version} (pid {s.pid})")
        elif self.connection != "connected":
            self._write_event(s.taken_at, "connected", f"reconnected to pid {s.pid}")
        self.snapshot = s
        self.connection, self.retry_attempt = "connected", 0
        if s.stopping:
            self._set_banner("stopping", f"The server (pid {s.pid}) is stopping …")
        else:
            self._set_banner("", "")
        self._show_server(s)
        self._show_pool(s)
        self._show_vms(s.vms)
        self._show_activity(s)
        self._show_events(s.events)
        self.refresh_bindings()

    def show_disconnected(self, reason: str, retry_in: float) -> None:
        if self.connection == "connected":
            self._write_event(time.time(), "disconnected", reason)
        self.snapshot = None
        self.connection = "disconnected"
        self.retry_attempt += 1
        self._set_banner("disconnected",
                         f"⚠ Disconnected, retrying in {retry_in:g} s "
                         f"(attempt {self.retry_attempt}): {reason}")
        self._show_empty()
        self.refresh_bindings()

    # panels

    def _set_banner(self, state: str, text: str) -> None:
        banner = self.query_one("#banner", Static)
        banner.set_classes(state)
        banner.update(text)

    def _show_server(self, s: Snapshot) -> None:
        c = s.config
        template = "on" if c.template_enabled else "off"
        if c.template_enabled and c.template_size_bytes:
            template += f" ({fmt.size(c.template_size_bytes)})"
        self.query_one("#server", Static).update(
            f"[b]pid[/b]       {s.pid}   [dim]version {s.version}[/dim]\n"
            f"[b]socket[/b]    {s.endpoint}\n"
            f"[b]uptime[/b]    {fmt.duration(s.uptime_seconds)}\n"
            f"[b]VMs[/b]       {fmt.plural(c.vcpus, 'vCPU')} · {c.memory_mib} MiB · "
            f"{c.accelerator.upper()} · template {template}\n"
            f"[b]config[/b]    {c.config_path or '—'}")

    def _show_pool(self, s: Snapshot) -> None:
        full = s.ready >= s.target
        colour = "green" if full else "yellow"
        # A target held below vm_cache_number by the memory budget says so, on this line:
        # the panel has no room for another.
        limited = (f"  [yellow]({s.vm_cache_number} wanted, memory_budget_mib "
                   f"{s.memory_budget_mib})[/]" if s.target < s.vm_cache_number
                   and not s.autoscale else "")
        self.query_one("#pool-label", Static).update(
            f"[b]Ready[/b] [{colour}][b]{s.ready}[/b][/] / {s.target}{limited}")
        self.query_one("#gauge", ProgressBar).update(total=max(1, s.target),
                                                     progress=min(s.ready, s.target))
        waiting = (f"[b yellow]{s.clients_waiting}[/]" if s.clients_waiting
                   else str(s.clients_waiting))
        # Autoscaling says why the target is what it is, below: the top panels grow by the
        # two lines that may take (and keep their height without autoscaling).
        scaled = (f"\n[b]autoscale[/b] [dim]{escape(s.target_reason)}[/]" if s.autoscale
                  else "")
        for panel in ("#server", "#pool"):
            self.query_one(panel).styles.height = 9 if s.autoscale else 7
        self.query_one("#pool-detail", Static).update(
            f"booting {s.booting} · clients waiting {waiting}{scaled}")

    def _show_empty(self) -> None:
        self.query_one("#server", Static).update(
            f"[b]socket[/b]    {self.backend.endpoint}\n[dim]not connected[/dim]")
        self.query_one("#pool-label", Static).update("[b]Ready[/b] — / —")
        self.query_one("#gauge", ProgressBar).update(total=1, progress=0)
        self.query_one("#pool-detail", Static).update("")
        self.query_one("#vms", DataTable).clear()
        self.query_one("#counters", Static).update("[dim]not connected[/dim]")
        for name in ("latency", "boot"):
            self.query_one(f"#{name}-label", Static).update("")
            self.query_one(f"#{name}", Sparkline).display = False

    def _show_vms(self, vms: tuple[VMInfo, ...]) -> None:
        table = self.query_one("#vms", DataTable)
        if [str(k.value) for k in table.rows] != [vm.id for vm in vms]:
            selected = None
            if table.row_count and table.is_valid_row_index(table.cursor_row):
                selected = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
            table.clear()
            for vm in vms:
                table.add_row(*self._cells(vm), key=vm.id)
            ids = [vm.id for vm in vms]
            if selected in ids:
                table.move_cursor(row=ids.index(selected))
            return
        for vm in vms:
            for (_, column), value in zip(COLUMNS, self._cells(vm), strict=True):
                table.update_cell(vm.id, column, value)

    @staticmethod
    def _cells(vm: VMInfo) -> tuple[Text | str, ...]:
        state = Text(vm.state, style="green" if vm.state == "ready" else "yellow")
        return (vm.id, Text(str(vm.pid), justify="right"), state,
                Text(str(vm.vcpus), justify="right"),
                Text(f"{vm.memory_mib} MiB", justify="right"),
                Text(fmt.duration(vm.age_seconds), justify="right"),
                Text(fmt.seconds(vm.boot_seconds), justify="right"))

    def _show_activity(self, s: Snapshot) -> None:
        k = s.counters
        lines = [
            f"Handed out          [b]{k.handed_out}[/b]",
            f"Boot failures       [b]{k.boot_failures}[/b]"
            + (f"   [dim]died in pool {k.died_in_pool}[/dim]" if k.died_in_pool else ""),
            f"Refills in flight   [b]{s.booting}[/b]",
            f"Clients waiting     [b]{s.clients_waiting}[/b]",
        ]
        if k.last_error:
            retry = (f" (next try in {k.next_retry_seconds:.0f} s)"
                     if k.next_retry_seconds else "")
            lines.append(f"[red]Last error{retry}:[/red] {k.last_error}")
        self.query_one("#counters", Static).update("\n".join(lines))
        self._show_series("latency", "Hand-off latency", s.handoff_seconds, fmt.millis)
        self._show_series("boot", "Boot time", s.boot_seconds, fmt.seconds)

    def _show_series(self, name: str, title: str, values: tuple[float, ...],
                     show: Callable[[float], str]) -> None:
        label = self.query_one(f"#{name}-label", Static)
        if values:
            label.update(f"[b]{title}[/b]  {show(values[-1])}  "
                         f"[dim](max {show(max(values))})[/dim]")
        else:
            label.update(f"[b]{title}[/b]  [dim]none yet[/dim]")
        sparkline = self.query_one(f"#{name}", Sparkline)
        # An empty Sparkline still draws a bar, which reads as a value: hide it instead.
        sparkline.display = bool(values)
        # One column per value while they fit: a few values are not stretched into blocks.
        sparkline.styles.max_width = max(1, len(values))
        sparkline.data = list(values)

    def _show_events(self, events: tuple[Event, ...]) -> None:
        for event in events:
            if event.seq > self._last_seq:
                self._write_event(event.time, event.kind, event.text)
                self._last_seq = event.seq

    def _write_event(self, when: float, kind: str, text: str) -> None:
        line = Text.assemble((fmt.clock(when), "dim"), " ",
                             (f"{kind.replace('_', ' '):<12}", EVENT_STYLES.get(kind, "")),
                             " ", text)
        self.query_one("#events", RichLog).write(line)

    # actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("take_vm", "stop_server", "help") and isinstance(self.screen,
                                                                        ModalScreen):
            return False
        if action in ("take_vm", "stop_server"):
            live = self.snapshot is not None and not self.snapshot.stopping
            return True if live else None  # None: shown, greyed out
        return True

    def action_take_vm(self) -> None:
        if self._taking:
            self.notify("Still waiting for a VM from the server …")
            return
        self._take_vm()

    @work(group="take")
    async def _take_vm(self) -> None:
        self._taking = True
        try:
            vm = await self.backend.take_vm()
        except VmcacheError as exc:
            self.notify(str(exc), title="No VM taken", severity="error")
            return
        finally:
            self._taking = False
        self.taken.append(vm)
        self._write_event(time.time(), "action", f"you took VM {vm.id} (QEMU pid {vm.pid})")
        self.push_screen(TakenVMScreen(vm))

    def action_stop_server(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self._stop_server()
        self.push_screen(ConfirmStopScreen(self.snapshot, str(self.backend.endpoint)),
                         confirmed)

    @work(group="stop")
    async def _stop_server(self) -> None:
        try:
            await self.backend.stop_server()
        except VmcacheError as exc:
            self.notify(str(exc), title="Server not stopped", severity="error")
            return
        self._write_event(time.time(), "action", "you asked the server to stop (Quit)")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_save_screenshot(self) -> None:
        """Textual's own SVG export of the screen, into the current directory (the command
        palette's "Screenshot" writes to ~/Downloads, which a server often lacks)."""
        try:
            path = self.save_screenshot(path=str(Path.cwd()))
        except OSError as exc:
            self.notify(f"{exc.strerror}: {exc.filename}", title="No screenshot",
                        severity="error")
            return
        self.notify(f"Saved {path}", title="Screenshot")
