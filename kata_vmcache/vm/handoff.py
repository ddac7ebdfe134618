"""The hand-off record: what GetBaseVM hands over for one VM, on both sides of the socket.

One type, `HandOff`, for the one concept:

- the daemon builds it once, when the VM becomes ready (`VM.prepare_handoff()`, called by
  the factory's `booted()`), together with its wire form `message` (Kata's `GrpcVM`), so the
  hand-off only sends what is already made;
- the client decodes the reply it receives into the same type (`HandOff.from_message()`;
  `client.BaseVM` is this type), and a VM the client boots itself (`client.boot_direct`)
  is described by its own record, so everything downstream (`handle.VMHandle.adopt`, the
  CLI's JSON, the dashboard) reads one shape.

The fields are Kata's `GrpcVM` (protocols/cache/cache.proto; Kata 1.x
virtcontainers/vm.go `ToGrpc`/`NewVMFromGrpc`): `id`, `cpu`, `memory` (MiB), `cpuDelta`,
`hypervisor` (Kata's qemu hand-off JSON, vm.py `hypervisor_record()`), `proxyPid` and
`proxyURL` (Kata 1.x's kata-proxy; 0 and "" without one). The JSON goes on the wire as
compact `json.dumps` output, bytes that Kata's Go decoder reads (`encoding/json` ignores the
keys it does not know).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..proto import cache_pb2


@dataclass(frozen=True)
class HandOff:
    id: str
    cpu: int
    memory: int
    cpu_delta: int
    #: Kata's qemu hand-off record (QmpChannelpath, State, QemuSMP, ...) plus ours.
    hypervisor: dict[str, Any]
    #: Kata 1.x's kata-proxy of the VM (GrpcVM.proxyPid, proxyURL): 0 and "" if none.
    proxy_pid: int = 0
    proxy_url: str = ""

    @classmethod
    def from_message(cls, reply: cache_pb2.GrpcVM) -> HandOff:
        """The record a GetBaseVM reply carries (client side)."""
        return cls(reply.id, reply.cpu, reply.memory, reply.cpuDelta,
                   json.loads(reply.hypervisor), reply.proxyPid, reply.proxyURL)

    @functools.cached_property
    def message(self) -> cache_pb2.GrpcVM:
        """Kata's GrpcVM for this record: what GetBaseVM sends (made once)."""
        return cache_pb2.GrpcVM(
            id=self.id, cpu=self.cpu, memory=self.memory, cpuDelta=self.cpu_delta,
            hypervisor=json.dumps(self.hypervisor, separators=(",", ":")).encode(),
            proxyPid=self.proxy_pid, proxyURL=self.proxy_url)

    @property
    def qmp_path(self) -> Path:
        return Path(self.hypervisor["QmpChannelpath"])

    @property
    def pid(self) -> int | None:
        pid = self.hypervisor.get("Pid")
        return pid if isinstance(pid, int) else None

    def as_json(self) -> dict[str, Any]:
        """GrpcVM's field names, the hypervisor record decoded (`kata-vmcache get`)."""
        return {"id": self.id, "cpu": self.cpu, "memory": self.memory,
                "cpuDelta": self.cpu_delta, "proxyPid": self.proxy_pid,
                "proxyURL": self.proxy_url, "hypervisor": self.hypervisor}
