"""The daemon is a plain server: importing it must not pull in Textual (the TUI is only a
client of the socket). Checked in a fresh interpreter, where sys.modules is honest."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path


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


# --- the packages' layers ------------------------------------------------------------------
#
# Each package may import only the layers below it; the picture in the README's
# documentation (docs/internals.md) stays true because this test fails otherwise.
#
#   kata        Kata's contract, per generation, with Go's semantics      (ours: nothing)
#   config      the configuration file, validated once                  (kata, errors)
#   vm          one VM and its processes: lines, QEMU, QMP, probes, ...  (+ config)
#   factory     makes VMs: direct boots, templates, spec derivation      (+ vm)
#   pool        the cache of ready VMs and its policy                    (+ factory)
#   service     the daemon: server, reload, metrics, notify, ...         (+ pool)
#   client      talks to a server; boots nothing                         (kata, config, vm)
#   getvm/sync  Kata's GetVM for a caller: the client and the factory    (+ client, factory)
#   demo        the bundled demo guest: builds it, boots it once          (+ factory)
#   tui         the dashboard: a client of the socket                    (client and below)
#   cli         the command line                                         (anything)

PACKAGE = Path(__file__).resolve().parents[2] / "kata_vmcache"
BASE = {"errors", "procs", "shape", "proto", "quiet_grpc", "fds", "__version__"}
ALLOWED: dict[str, set[str]] = {
    "kata": set(),
    "config": {"kata"},
    "vm": {"kata", "config", "vm"},
    "factory": {"kata", "config", "vm", "factory"},
    "pool": {"kata", "config", "vm", "factory", "pool"},
    "service": {"kata", "config", "vm", "factory", "pool", "service"},
    "client": {"kata", "config", "vm", "client"},
    "getvm": {"kata", "config", "vm", "factory", "client"},
    "sync": {"kata", "config", "vm", "client", "getvm"},
    "demo": {"kata", "config", "vm", "factory", "demo"},
    "tui": {"kata", "config", "vm", "client", "tui"},
}


def _layer(parts: list[str]) -> str:
    return parts[0] if parts else ""


def _imports(path: Path) -> set[str]:
    """The first component (under kata_vmcache) of every module `path` imports."""
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    here = list(rel[:-1])  # the package the module is in (an __init__'s own package)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target:  # `from .. import x`: x is the layer
                    found |= {alias.name for alias in node.names}
                else:
                    found.add(_layer(target))
            elif node.module and node.module.startswith("kata_vmcache"):
                found.add(_layer(node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kata_vmcache."):
                    found.add(_layer(alias.name.split(".")[1:]))
    return found - {""}


def test_every_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        layer = rel[0]
        if layer not in ALLOWED:
            continue
        base = set() if layer == "kata" else BASE  # kata/ imports nothing of ours at all
        bad = _imports(path) - ALLOWED[layer] - base - {layer}
        if bad:
            wrong.append(f"{'/'.join(rel)}.py imports {', '.join(sorted(bad))}")
    assert wrong == []
