"""The dashboard's dialogs: the VM you just took, stopping the server, help."""

from __future__ import annotations

import json
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from ..client.rpc import BaseVM
from ..client.snapshot import Snapshot
from .format import plural


class TakenVMScreen(ModalScreen[None]):
    """A VM taken with GetBaseVM: whose it is now, how to use and stop it, its JSON."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("c", "copy", "Copy JSON"),
    ]

    def __init__(self, vm: BaseVM) -> None:
        super().__init__()
        self.vm = vm
        self.json_text = json.dumps(vm.as_json(), indent=2)

    def compose(self) -> ComposeResult:
        vm, qmp = self.vm, self.vm.qmp_path
        pid = f"QEMU pid {vm.pid}" if vm.pid else "its QEMU"
        with Vertical(id="dialog"):
            yield Static(f"You now own VM {vm.id} ({pid})", classes="title")
            yield Static(
                "The cache handed this VM over and forgot it: it is yours now. It is "
                "paused, and it keeps running after this dashboard and the server exit, "
                "until you stop it.\n"
                f"  resume it:  QMP {{\"execute\": \"cont\"}} on {qmp}\n"
                f"  stop it:    QMP {{\"execute\": \"quit\"}} on {qmp}"
                + (f"  (or: kill {vm.pid})" if vm.pid else "") + "\n"
                "Its hand-off JSON (below) is printed again when you leave the dashboard.",
                classes="text",
            )
            with VerticalScroll(id="json-box"):
                yield Static(self.json_text, id="json")
            with Horizontal(classes="buttons"):
                yield Button("Copy JSON (c)", id="copy")
                yield Button("Close (esc)", id="close", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.json_text)
        self.notify("Hand-off JSON copied to the clipboard")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "copy":
            self.action_copy()
        else:
            self.dismiss()


class ConfirmStopScreen(ModalScreen[bool]):
    """Quit is for good: say what it stops, and what it leaves alone."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Stop server"),
        Binding("n,escape", "cancel", "Cancel"),
    ]

    def __init__(self, snapshot: Snapshot | None, endpoint: str) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.endpoint = endpoint

    def compose(self) -> ComposeResult:
        s = self.snapshot
        who = f"pid {s.pid} on {s.endpoint}" if s else f"on {self.endpoint}"
        owned = plural(len(s.vms), "VM") if s else "the VMs"
        with Vertical(id="dialog"):
            yield Static("Stop the VM cache server?", classes="title")
            yield Static(f"The server {who} will stop the {owned} it owns and remove its "
                         "socket. VMs already handed out keep running.", classes="text")
            with Horizontal(classes="buttons"):
                yield Button("Stop server (y)", id="confirm", variant="error")
                yield Button("Cancel (n)", id="cancel", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    def action_confirm(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")


HELP = """\
[b]Keys[/b]
  [b]t[/b]        take a VM (GetBaseVM): the cache hands you a paused VM, which you then own
  [b]s[/b]        stop the server (Quit), after you confirm
  [b]?[/b] [b]F1[/b]     this help
  [b]q[/b]        quit the dashboard (the server keeps running)
  [b]Ctrl+S[/b]   save an SVG screenshot of the screen in the current directory
  [b]↑ ↓[/b]      move in the VM table

[b]Panels[/b]
  [b]Server[/b]    the daemon: pid, socket, uptime, the VMs it boots (vCPUs, memory,
            accelerator, templating)
  [b]Cache[/b]     VMs ready against the target (vm_cache_number, or fewer when
            memory_budget_mib holds fewer), VMs booting, callers waiting for a VM
  [b]VMs[/b]       every VM the server owns whose QEMU runs (what `status` lists):
            QEMU pid, state, size, age, boot time
  [b]Activity[/b]  counters since the server started; hand-off latency (GetBaseVM arriving
            to the VM released, waits included) and boot time of the latest VMs
  [b]Events[/b]    VMs ready, handed out, died, boots failed; and this dashboard's
            connection

The screen is pushed by the server on every change (Watch on the socket). When the server
is not there, the dashboard says so and reconnects by itself when it is back.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "dismiss", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static("kata-vmcache dashboard", classes="title")
            yield Static(HELP, classes="text")
            with Horizontal(classes="buttons"):
                yield Button("Close (esc)", id="close", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()
