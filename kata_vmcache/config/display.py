"""The resolved settings as rows of (dotted key, text): what check-config prints.

A reload compares two configurations through the same rows (service/reload.py): a
setting that changes is a row that changes. A value is shown as the file spells it (true,
0660, the words of kernel_params), and a default that depends on the host says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .keys import OUR_TABLE
from .model import AutoscaleSettings, Config, default_memory_budget_mib


def describe(config: Config) -> Iterator[tuple[str, str]]:
    """The resolved settings as (dotted key, value) pairs, for `check-config`."""
    def rows(prefix: str, obj: object, fmt: Callable[[str, Any], str]) -> Iterator[tuple[str, str]]:
        for name in obj.__dataclass_fields__:  # type: ignore[attr-defined]
            if name == "kata_version_origin":
                continue  # how kata_version was chosen, not a setting (check-config shows it)
            value = getattr(obj, name)
            if isinstance(value, AutoscaleSettings):  # its keys are [vmcache]'s own
                yield f"{prefix}.autoscale", fmt(name, value.enabled)
                yield f"{prefix}.min_ready", str(value.min_ready)
                yield f"{prefix}.max_ready", str(value.max_ready)
                yield f"{prefix}.shrink_after", f"{value.shrink_after:g}"
                continue
            yield f"{prefix}.{name}", fmt(name, value)

    def plain(name: str, value: Any) -> str:
        if value is None:
            return "(unset)"
        if isinstance(value, tuple):
            return " ".join(value) or "(none)"
        if name == "socket_mode":
            return f"{value:04o}"
        if name == "memory_budget_mib" and not value:
            return f"{default_memory_budget_mib()} (half of the host's MemTotal)"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    yield from rows("hypervisor.qemu", config.hypervisor, plain)
    yield from rows("factory", config.factory, plain)
    yield from rows(OUR_TABLE, config.daemon, plain)
