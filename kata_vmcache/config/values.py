"""TOML values as Kata's loader types them, where Python's types say otherwise.

In Python a bool is an int; in TOML, and in Kata's Go structs, it is not: `default_vcpus =
true` is a wrong type, not one vCPU. Every check of a value's type in config/ asks here
(`is_int`, `is_number`, `is_a`) instead of spelling `isinstance(v, int) and not
isinstance(v, bool)` again. `show` names a value the way problems print it ("a string
'x'"), and `split_address` reads the one value with a syntax of its own, "host:port".
"""

from __future__ import annotations

from typing import TypeGuard


def is_int(value: object) -> TypeGuard[int]:
    """A TOML integer: an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A TOML integer or float: not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_a(value: object, kind: type | tuple[type, ...]) -> bool:
    """isinstance(value, kind), but a bool is only a bool: it passes when `kind` names
    bool, never as an int or a number."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def show(value: object) -> str:
    """The value as a problem's "got ..." names it: its TOML kind and a short repr."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    kind = names.get(type(value), type(value).__name__)
    text = repr(value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind} {text}"


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of a "host:port" or "[v6]:port" address; ValueError says what is
    wrong. The host must be given: listening on every interface is a choice ("0.0.0.0")."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError("needs a host and a port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address needs brackets")
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError("not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    return host, int(port_text)
