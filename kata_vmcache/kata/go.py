"""The file as Kata's Go loader sees it: TOML values decoded into Go types, Go's string
functions, and the path and list clean-ups both generations apply.

Kata's loader is Go: BurntSushi/toml fills structs, so an absent key is the zero value, a
[]string is nil or a list, default_vcpus is a float32 in 3.x; kernel_params is split with
Go's notion of white space. The payload must reproduce those semantics exactly (one stray
character and Kata boots its own VM), so they are written once, here, for both generations.

The names keep their leading underscore: they are the derivations' tools, not part of
`kata`'s public face (`kata/__init__.py` re-exports none of them).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from typing import Any, Final

# --- reading the parsed TOML the way BurntSushi/toml fills Kata's structs ------------------
# A key with the wrong type would make Kata's loader fail outright; our config validator
# reports those, so here a wrong type simply reads as the Go zero value.

def toml_table(doc: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    node: Any = doc
    for name in names:
        node = node.get(name) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def toml_str(t: Mapping[str, Any], key: str) -> str:
    v = t.get(key)
    return v if isinstance(v, str) else ""


def toml_bool(t: Mapping[str, Any], key: str) -> bool:
    v = t.get(key)
    return v if isinstance(v, bool) else False


def toml_int(t: Mapping[str, Any], key: str) -> int:
    v = t.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def toml_number(t: Mapping[str, Any], key: str) -> float:
    v = t.get(key)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


def _float32(value: float) -> float:
    """The value a Go float32 holds (3.x decodes default_vcpus into one)."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def toml_str_list(t: Mapping[str, Any], key: str) -> list[str] | None:
    """A []string: nil (JSON null) when the key is absent, a list (maybe empty) otherwise.

    The difference is visible to Kata 1.x, which compares AgentConfig (an interface{}) with
    reflect.DeepEqual, where a nil slice and an empty one differ. (3.x's DeepCompare
    compares slices by length and elements: there they are equal.)
    """
    v = t.get(key)
    if not isinstance(v, list):
        return None
    return [x for x in v if isinstance(x, str)]


def toml_optional_uint(t: Mapping[str, Any], key: str) -> int | None:
    """A *uint64: nil when absent."""
    v = t.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _resolve(path: str) -> str:
    """Kata's ResolvePath (filepath.Abs + EvalSymlinks) for paths that exist.

    Kata fails to load a configuration naming a missing file; we keep the configured string
    so that the config validator can name the problem instead of this module.
    """
    if path and os.path.exists(path):
        return os.path.realpath(path)
    return path


def _comma_list(value: str) -> str:
    """machineAccelerators()/cpuFeatures(): drop empty items, trim each, re-join with ","."""
    items = [item.strip() for item in value.split(",") if item != ""]
    return ",".join(items).strip(",")


_GO_LATIN1_SPACE: Final = frozenset("\t\n\v\f\r \x85\xa0")


def _go_is_space(c: str) -> bool:
    # unicode.IsSpace: a fixed Latin-1 set, then the White_Space property (which Python's
    # isspace() matches above Latin-1; below it Python also counts \x1c-\x1f, Go does not).
    return c in _GO_LATIN1_SPACE if ord(c) <= 0xFF else c.isspace()


def _go_trim_space(s: str) -> str:
    """strings.TrimSpace."""
    start, end = 0, len(s)
    while start < end and _go_is_space(s[start]):
        start += 1
    while end > start and _go_is_space(s[end - 1]):
        end -= 1
    return s[start:end]


def _go_fields(s: str) -> list[str]:
    """Go's strings.Fields, which is how 1.x splits kernel_params."""
    fields: list[str] = []
    current: list[str] = []
    for c in s:
        if _go_is_space(c):
            if current:
                fields.append("".join(current))
                current = []
        else:
            current.append(c)
    if current:
        fields.append("".join(current))
    return fields
