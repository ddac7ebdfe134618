"""The validator's toolkit: typed reads of the document that record problems and go on.

Every problem in the file is reported at once, so no read stops at the first: each getter
records what is wrong (at the key's line) and returns a usable default, and the table
validators (validate_*.py) carry on with it. Problems refuse the file; warnings do not (an
unknown key in Kata's own tables, a value Kata would change). `validate.py` decides at the
end whether there is a `Config` at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigProblem
from .problems import KeyLines, suggest
from .values import is_a, show

#: Not ours to fill: pseudo-file systems where a directory of ours or a socket cannot be.
SYSTEM_TREES = (Path("/proc"), Path("/sys"), Path("/dev"))

_MISSING: Any = object()


class Reader:
    """Collects problems and warnings while the document is read."""

    def __init__(self, doc: Mapping[str, Any], text: str, source: Path | None) -> None:
        self.doc = doc
        self.source = source
        self.lines = KeyLines(text)
        self.problems: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []

    # reporting

    def problem(self, key: str, message: str) -> None:
        table, _, name = key.rpartition(".")
        line = self.lines.find(table, name)
        self.problems.append(ConfigProblem(key, message, self.source, line))

    def warn(self, key: str, message: str) -> None:
        table, _, name = key.rpartition(".")
        self.warnings.append(ConfigProblem(key, message, self.source,
                                           self.lines.find(table, name)))

    # typed getters: each returns a usable default after recording a problem

    def table(self, dotted: str) -> Mapping[str, Any]:
        node: Any = self.doc
        for part in dotted.split("."):
            if not isinstance(node, Mapping):
                return {}
            node = node.get(part, {})
        if not isinstance(node, Mapping):
            self.problem(dotted, f"must be a table (got {show(node)})")
            return {}
        return node

    def get(
        self,
        table: Mapping[str, Any],
        key: str,
        kind: type | tuple[type, ...],
        default: Any,
        expected: str,
    ) -> Any:
        value = table.get(key.rpartition(".")[2], _MISSING)
        if value is _MISSING:
            return default
        # bool is an int in Python; TOML keeps them apart and so do we.
        if not is_a(value, kind):
            self.problem(key, f"wrong type (got {show(value)}, expected {expected})")
            return default
        return value

    def check_keys(self, table: Mapping[str, Any], prefix: str, known: frozenset[str],
                   *, strict: bool) -> None:
        for key in table:
            if key in known:
                continue
            hint = suggest(key, known)
            if strict:
                self.problem(f"{prefix}.{key}", f"unknown key{hint}")
            else:
                self.warn(f"{prefix}.{key}", f"unknown key, ignored{hint}")

    def choice(self, t: Mapping[str, Any], key: str, choices: tuple[str, ...], default: Any) -> Any:
        expected = " or ".join(f'"{c}"' for c in choices)
        value = self.get(t, key, str, default, expected)
        if value not in choices:
            hint = suggest(value, frozenset(choices))
            self.problem(key, f"not a valid choice (got {value!r}, expected {expected}){hint}")
            return default
        return value

    def seconds(self, t: Mapping[str, Any], key: str, default: float, least: float,
                most: float) -> float:
        value = self.get(t, key, (int, float), default, "a number of seconds")
        if not (math.isfinite(value) and least <= value <= most):
            self.problem(key, f"out of range (got {value}, expected seconds >= {least:g} "
                              f"and <= {most:g})")
            return default
        return float(value)

    # paths

    def not_in_system_tree(self, key: str, path: Path) -> None:
        """Refuse a path under /proc, /sys or /dev (as written, or once symlinks resolve)."""
        for candidate in (path, Path(os.path.realpath(path))):
            if candidate == Path("/"):
                self.problem(key, "must not be / (got '/')")
                return
            for tree in SYSTEM_TREES:
                if candidate == tree or tree in candidate.parents:
                    self.problem(key, f"is under {tree}, which is the kernel's, not a place "
                                      f"for files of ours (got {str(path)!r})")
                    return

    def abs_path(self, t: Mapping[str, Any], key: str, default: str) -> Path | None:
        value = self.get(t, key, str, default, "an absolute path")
        if not value or not os.path.isabs(value):
            self.problem(key, f"must be an absolute path (got {value!r})")
            return None
        if "\0" in value:
            self.problem(key, "contains a NUL byte")
            return None
        return Path(os.path.normpath(value))

    def existing_file(self, t: Mapping[str, Any], key: str, default: str,
                      *, executable: bool = False, generation: str = "") -> Path | None:
        value = self.get(t, key, str, default, "a path to a file")
        if not value:
            return None
        if "\0" in value:
            self.problem(key, "contains a NUL byte")
            return None
        path = Path(value)
        if not path.exists():
            # Kata's loader refuses a file whose paths do not resolve (ResolvePath).
            origin = ("" if key.rpartition(".")[2] in t
                      else f" (Kata {generation}'s default, which its loader refuses when "
                           "missing; set it)")
            self.problem(key, f"no such file (got {value!r}){origin}")
        elif not path.is_file():
            self.problem(key, f"not a regular file (got {value!r})")
        elif executable and not os.access(path, os.X_OK):
            self.problem(key, f"not executable (got {value!r})")
        elif not os.access(path, os.R_OK):
            self.problem(key, f"not readable (got {value!r})")
        # Kata resolves symlinks (ResolvePath) and so compares real paths: so do we.
        return Path(os.path.realpath(path)) if path.exists() else path
