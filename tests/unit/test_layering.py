"""The daemon is a plain server: importing it must not pull in Textual (the TUI is only a
client of the socket). Checked in a fresh interpreter, where sys.modules is honest."""

from __future__ import annotations

import subprocess
import sys


def test_daemon_does_not_import_textual() -> None:
    code = ("import sys, kata_vmcache.daemon, kata_vmcache.cli, kata_vmcache.client; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
