"""The hand-off as a plain synchronous grpcio client sees it (grpc.insecure_channel, not
grpc.aio): each GetBaseVM from a full cache, paired with the Status calls made right before
it on the same channel.

    python bench/sync_client.py --endpoint SOCK --cache 8 --samples 40 [--status 5]

Prints one JSON object on stdout: per sample the Status times (ms) right before the
GetBaseVM, the GetBaseVM time, and their ratio (GetBaseVM over the median of its Status
calls). Between samples the VM just handed out is stopped (QMP quit, then SIGKILL by pid:
run.py's stop_vm) and the client polls Status on the same channel until the daemon has
`--cache` VMs ready again, then lets the refill's boot settle, so every GetBaseVM is served
from a full cache and no boot competes with it for the CPU.

A synchronous client puts less of its own time into each call than a grpc.aio one (no event
loop between the socket and the caller), so the daemon's share of a call shows more: this is
the client of the issue's figure (Status 0.50-0.56 ms, GetBaseVM 1.1-1.2 ms before the
hand-off path was cut).

One process, one channel for every sample, as kata-runtime's long-lived client: the first
Status and the first GetBaseVM are not timed (first-use costs of a fresh channel and stub).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2
from run import stop_vm  # bench/run.py: the one way the bench stops a handed-out VM

from kata_vmcache.proto import cache_pb2_grpc

#: Seconds a full cache is left alone before a sample: the refill's QEMU has just paused.
SETTLE = 0.3


def ms(ns: int) -> float:
    return ns / 1e6


class SyncClient:
    def __init__(self, endpoint: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{endpoint}")
        self.stub = cache_pb2_grpc.CacheServiceStub(self.channel)
        self.empty = empty_pb2.Empty()

    def close(self) -> None:
        self.channel.close()

    def status(self) -> Any:
        return self.stub.Status(self.empty, timeout=10)

    def get_base_vm(self) -> dict[str, Any]:
        reply = self.stub.GetBaseVM(self.empty, timeout=120)
        record: dict[str, Any] = json.loads(reply.hypervisor)
        return record

    def wait_ready(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.status().vmstatus) < count:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: the cache did not get back to {count} ready VMs")
            time.sleep(0.05)
        time.sleep(SETTLE)


def measure(endpoint: Path, cache: int, samples: int, statuses: int) -> dict[str, Any]:
    client = SyncClient(endpoint)
    try:
        client.wait_ready(cache)
        client.status()  # warm up the channel
        stop_vm(client.get_base_vm())  # and GetBaseVM's first use
        status_ms: list[list[float]] = []
        handoff_ms: list[float] = []
        for _ in range(samples):
            client.wait_ready(cache)
            before = []
            for _ in range(statuses):
                t = time.perf_counter_ns()
                client.status()
                before.append(ms(time.perf_counter_ns() - t))
            t = time.perf_counter_ns()
            record = client.get_base_vm()
            handoff_ms.append(ms(time.perf_counter_ns() - t))
            status_ms.append(before)
            stop_vm(record)
    finally:
        client.close()
    paired = [statistics.median(s) for s in status_ms]
    return {"status_ms": status_ms, "status_paired_ms": paired, "handoff_ms": handoff_ms,
            "ratio": [h / s for h, s in zip(handoff_ms, paired, strict=True)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--endpoint", type=Path, required=True)
    parser.add_argument("--cache", type=int, default=8, help="ready VMs before each sample")
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--status", type=int, default=5,
                        help="Status calls right before each GetBaseVM (default 5)")
    args = parser.parse_args()
    json.dump(measure(args.endpoint, args.cache, args.samples, args.status), sys.stdout)


if __name__ == "__main__":
    main()
