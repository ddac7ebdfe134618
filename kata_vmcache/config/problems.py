"""Where a problem is in the file, and the hint for a near-miss key.

A problem names its file, dotted key and line: `PATH:LINE: table.key: what is wrong`.
tomllib gives no line numbers, so `KeyLines` finds each `key =` inside its `[table]` in the
text. `problem_in` does the same for checks made after loading (factory/host.py), which only
have the `Config`. `suggest` adds "did you mean ...?" to an unknown key or choice.
"""

from __future__ import annotations

import difflib
import re
from typing import TYPE_CHECKING

from ..errors import ConfigProblem

if TYPE_CHECKING:
    from .model import Config


class KeyLines:
    """Line numbers of `key =` inside `[table]`, for messages (tomllib gives none)."""

    _header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    _key = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")

    def __init__(self, text: str) -> None:
        self._index: dict[tuple[str, str], int] = {}
        self._tables: dict[str, int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            if m := self._header.match(line):
                table = m.group(1).replace('"', "").replace(" ", "")
                self._tables.setdefault(table, number)
            elif m := self._key.match(line):
                self._index.setdefault((table, m.group(1).strip("\"'")), number)

    def find(self, table: str, key: str) -> int | None:
        return self._index.get((table, key)) or self._tables.get(f"{table}.{key}")


def suggest(key: str, known: frozenset[str]) -> str:
    """The hint for the closest of `known` ("; did you mean 'x'?"), or "" if none is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def problem_in(config: Config, key: str, message: str) -> ConfigProblem:
    """A problem with `key` of the file `config` was read from, located at the key's line
    (for checks made after loading: factory/host.py)."""
    line = None
    if config.source is not None:
        try:
            lines = KeyLines(config.source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
        else:
            table, _, name = key.rpartition(".")
            line = lines.find(table, name)
    return ConfigProblem(key, message, config.source, line)
