"""The records of VMs on disk, as a daemon starting up reads them: every directory under
`<state_dir>/vms/` with its `vm.json` (owned.py writes it on every transition), or why
that record cannot be believed (missing, unreadable, truncated, not JSON, the wrong shape
or types).

Recovery (service/daemon.py) decides from these what a crashed predecessor left: VMs it
still owned are stopped, handed-off VMs are left to their clients, and a directory whose
record cannot be believed while its QEMU runs is reported (`Unclaimed`), never stopped:
it may be a client's VM.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .owned import VMState

#: What a record must hold, and of which type, to be believed.
_RECORD_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "state": (str,), "pid": (int, type(None)), "owner_pid": (int,),
}
_RECORD_OPTIONAL: dict[str, tuple[type, ...]] = {
    "vm_dir": (str,), "sandbox_dir": (str,), "proxy_pid": (int, type(None)),
    "virtiofsd_pid": (int, type(None)),
}
_STATES = frozenset(state.value for state in VMState)


@dataclass(frozen=True)
class RecordEntry:
    """One directory under `<state_dir>/vms/`: its record, or why it cannot be believed."""

    dir: Path
    record: dict[str, Any] | None
    problem: str = ""


@dataclass(frozen=True)
class Unclaimed:
    """A VM directory whose record cannot be believed while a QEMU of that VM runs: it may
    be a client's VM, so recovery reports it (log, `status --json`) and never stops it."""

    path: str
    problem: str
    pid: int


def record_problem(record: object, dir_name: str) -> str:
    """Why a parsed vm.json cannot be believed ("" when it can)."""
    if not isinstance(record, dict):
        return f"not a JSON object (got {type(record).__name__})"
    for key, types in _RECORD_FIELDS.items():
        if key not in record:
            return f"no {key!r}"
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            return f"{key!r} has the wrong type (got {type(record[key]).__name__})"
    for key, types in _RECORD_OPTIONAL.items():
        if key in record and (not isinstance(record[key], types)
                              or isinstance(record[key], bool)):
            return f"{key!r} has the wrong type (got {type(record[key]).__name__})"
    if record["id"] != dir_name:
        return f"its id {record['id']!r} is not its directory's name"
    if record["state"] not in _STATES:
        return f"unknown state {record['state']!r}"
    return ""


def scan_records(state_dir: Path) -> Iterator[RecordEntry]:
    """Every VM directory under state_dir with its record, or the reason it cannot be
    believed (missing, unreadable, truncated, not JSON, the wrong shape or types)."""
    root = state_dir / "vms"
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.is_symlink():
            yield RecordEntry(entry, None, "not a directory")
            continue
        try:
            record = json.loads((entry / "vm.json").read_bytes())
        except FileNotFoundError:
            yield RecordEntry(entry, None, "no vm.json")
            continue
        except OSError as exc:
            yield RecordEntry(entry, None, f"vm.json cannot be read ({exc.strerror})")
            continue
        except ValueError as exc:
            yield RecordEntry(entry, None, f"vm.json is not JSON ({exc})")
            continue
        problem = record_problem(record, entry.name)
        yield RecordEntry(entry, record if not problem else None, problem)


def read_records(state_dir: Path) -> Iterable[tuple[Path, dict[str, Any]]]:
    """The believable VM records under state_dir (tests, benchmarks)."""
    for entry in scan_records(state_dir):
        if entry.record is not None:
            yield entry.dir, entry.record
