"""The daemon is a plain server: importing it must not pull in Textual (the TUI is only a
client of the socket). Checked in a fresh interpreter, where sys.modules is honest."""

from __future__ import annotations

import os
import subprocess
import sys


def test_daemon_does_not_import_textual() -> None:
    code = ("import sys, kata_vmcache.service.daemon, kata_vmcache.cli, kata_vmcache.client.rpc; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_grpc_core_logging_is_off_before_grpc_is_imported() -> None:
    """grpc reads GRPC_VERBOSITY when it is first imported (quiet_grpc.py): the command line
    must set it before any of its imports pulls grpc in."""
    code = ("import os, sys\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'grpc':\n"
            "            print(os.environ.get('GRPC_VERBOSITY'))\n"
            "        return None\n"
            "sys.meta_path.insert(0, Spy())\n"
            "import kata_vmcache.cli\n")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out[:1] == ["NONE"]
