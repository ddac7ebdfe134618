"""The VM a server boots, as its Config reply tells a client in trailing metadata.

A client sizing a request (`get --resume --memory ...`) must know how far the server's VMs
can grow before it takes one: a request no VM can satisfy is refused without spending a VM.
Kata's `GrpcVMConfig` has no field for a VM's maxmem, and the Kata JSON in it applies Kata's
own defaults to some sizes, so the server adds what it boots as trailing metadata of the
Config RPC (the wire contract's messages stay Kata's; Kata's clients ignore the metadata).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

#: The metadata key; its value is the JSON of a VMShape.
KEY = "x-kata-vmcache-vm"


@dataclass(frozen=True)
class VMShape:
    """The base VM's vCPUs and memory (MiB), and their hot-plug ceilings."""

    cpus: int
    max_cpus: int
    memory_mib: int
    max_memory_mib: int
    memory_slots: int

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((KEY, json.dumps(dataclasses.asdict(self), separators=(",", ":"))),)

    @classmethod
    def parse(cls, text: str | None) -> VMShape | None:
        """None when absent (Kata's own servers) or not what a kata-vmcache server sends."""
        try:
            data = json.loads(text or "")
            values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        except (ValueError, TypeError, KeyError):
            return None
        if not all(type(v) is int and v >= 0 for v in values.values()):
            return None
        return cls(**values)
