"""`kata-vmcache tui`: a live Textual dashboard of a VM cache server.

Only a client of the server's socket: it watches the Monitor service for the picture and
calls Kata's GetBaseVM and Quit for its actions. Nothing outside this package imports
Textual, and only the `tui` command imports this package (the daemon stays free of it).

    app.py       the main screen and the connection (watch, show, reconnect with backoff)
    screens.py   dialogs: the VM you took, stopping the server, help
    backend.py   what the app talks to: the socket, or fixed snapshots for screenshots
    format.py    how numbers and times are written
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .app import VMCacheApp
from .backend import SocketBackend


def run(endpoint: Path) -> int:
    """Run the dashboard on the terminal; print the VMs taken in it when it exits."""
    app = VMCacheApp(SocketBackend(endpoint))
    # Our log lines would scribble over the screen; the dashboard shows what matters.
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []
    try:
        app.run()
    finally:
        root.handlers = handlers
    for vm in app.taken:
        print(json.dumps(vm.as_json()))
    return app.return_code or 0


__all__ = ["VMCacheApp", "run"]
