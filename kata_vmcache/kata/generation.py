"""Which Kata reads the file: Kata 1.x and today's Kata (3.x) derive one configuration.toml
into different `Config` payloads, so every derivation here is for one generation, named by
`Generation`, and the daemon speaks one generation per file.

The generation is chosen by `[vmcache] kata_version` or, when that is not set, by
`detect_generation()` from the tables only one generation's file can hold. This is the one
definition of the type; every layer above imports it from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

#: The Kata generations whose `Config` payload we can send.
Generation = Literal["1.x", "3.x"]
GENERATIONS: Final[tuple[Generation, ...]] = ("1.x", "3.x")


def detect_generation(doc: Mapping[str, Any]) -> tuple[Generation, str]:
    """The generation a file is written for, and why we think so.

    Kata 2.0 removed the `[proxy.*]` and `[shim.*]` tables (kata-containers 2.0's
    configuration has neither): a file with either is a 1.x file; any other file is read
    the way today's Kata (3.x) reads it.
    """
    for table in ("proxy", "shim"):
        entries = doc.get(table)
        if isinstance(entries, Mapping) and entries:
            names = ", ".join(f"[{table}.{name}]" for name in entries)
            return "1.x", f"detected: {names} present"
    return "3.x", "detected: no [proxy.*] or [shim.*] table"
