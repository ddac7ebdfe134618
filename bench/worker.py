"""One benchmark client process: measures what a separate client of the daemon sees.

    python bench/worker.py handoff --endpoint SOCK --count N --floor M
    python bench/worker.py once --endpoint SOCK --at MONOTONIC_NS      (concurrent runs)
    python bench/worker.py guest --endpoint SOCK                       (cached VM to guest)
    python bench/worker.py cold --config FILE                          (direct boot to guest)

Each prints one JSON object on stdout. VMs taken are *not* stopped here: their hand-off
records are printed, and the orchestrator stops them (by QMP, then by pid).

The channel is warmed with one call before anything is timed, so samples measure a call on
an established connection, as kata-runtime's long-lived client makes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kata_vmcache.client.rpc import CacheClient
from kata_vmcache.vm.guest_channel import GuestChannel
from kata_vmcache.vm.qmp import disconnect


def ms(ns: int) -> float:
    return ns / 1e6


async def handoff(endpoint: Path, count: int, floor: int) -> dict[str, Any]:
    """`floor` Status calls on a quiet cache, then `count` pairs (Status, GetBaseVM).

    The first GetBaseVM of each process is not timed, as the first Status is not: that
    first call measured 1.3 ms p50 against 0.9 ms for the rest (12 rounds), a first-use
    cost in a fresh client process that a long-lived client such as kata-runtime's pays
    once. The floor of a hand-off is the Status call right before it: both see the same
    machine, with the refills the earlier hand-offs started booting meanwhile."""
    async with CacheClient(endpoint) as client:
        await client.status()  # warm the channel
        quiet = []
        for _ in range(floor):
            t = time.perf_counter_ns()
            await client.status()
            quiet.append(ms(time.perf_counter_ns() - t))
        vms = [(await client.get_base_vm(timeout=120)).hypervisor]  # warm-up, untimed
        floors, handoffs = [], []
        for _ in range(count):
            t = time.perf_counter_ns()
            await client.status()
            floors.append(ms(time.perf_counter_ns() - t))
            t = time.perf_counter_ns()
            vm = await client.get_base_vm(timeout=120)
            handoffs.append(ms(time.perf_counter_ns() - t))
            vms.append(vm.hypervisor)
    return {"floor_ms": floors, "floor_quiet_ms": quiet, "handoff_ms": handoffs, "vms": vms}


async def once(endpoint: Path, at_ns: int) -> dict[str, Any]:
    async with CacheClient(endpoint) as client:
        await client.status()
        delay = (at_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        t = time.perf_counter_ns()
        vm = await client.get_base_vm(timeout=120)
        return {"handoff_ms": [ms(time.perf_counter_ns() - t)], "vms": [vm.hypervisor]}


async def resume_and_ping(record: dict[str, Any]) -> Callable[[], Awaitable[None]]:
    """Resume a handed-off VM and wait for its guest to answer the liveness ping, as a
    client in a hurry would: the agent port is connected while QMP resumes the guest.
    Returns the clean-up (closing both connections), which is not part of the time."""
    from qemu.qmp import QMPClient

    qmp = QMPClient("bench")
    channel_ready = asyncio.ensure_future(GuestChannel.connect(Path(record["GuestChannelPath"])))
    await qmp.connect(record["QmpChannelpath"])
    await qmp.execute("cont")
    channel = await channel_ready
    await channel.ping(timeout=30)

    async def close() -> None:
        await channel.close()
        await disconnect(qmp)
    return close


async def guest(endpoint: Path) -> dict[str, Any]:
    async with CacheClient(endpoint) as client:
        await client.status()
        t = time.perf_counter_ns()
        vm = await client.get_base_vm(timeout=120)
        close = await resume_and_ping(vm.hypervisor)
        elapsed = ms(time.perf_counter_ns() - t)
        await close()
        return {"to_guest_ms": [elapsed], "vms": [vm.hypervisor]}


async def cold(config_path: Path) -> dict[str, Any]:
    """Boot the same guest directly, as a user without the cache would, to the same point:
    the guest answering the liveness probe."""
    from kata_vmcache.config import load
    from kata_vmcache.factory.direct import DirectFactory

    config, _ = load(config_path)
    factory = DirectFactory(config)
    vm = factory.create()
    t = time.perf_counter_ns()
    await vm.process.start()
    try:
        # Connect before the guest runs, as the daemon does, so the ready line is not missed.
        channel = await GuestChannel.connect(vm.paths.guest)
        await vm.process.execute("cont")
        try:
            await channel.wait_ready(timeout=120)
            await channel.ping(timeout=30)
        finally:
            await channel.close()
        elapsed = ms(time.perf_counter_ns() - t)
    finally:
        await vm.stop(3.0)
        vm.remove_dirs()
    return {"to_guest_ms": [elapsed], "vms": []}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["handoff", "once", "guest", "cold"])
    parser.add_argument("--endpoint", type=Path)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--floor", type=int, default=0)
    parser.add_argument("--at", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "handoff":
        result = asyncio.run(handoff(args.endpoint, args.count, args.floor))
    elif args.mode == "once":
        result = asyncio.run(once(args.endpoint, args.at))
    elif args.mode == "guest":
        result = asyncio.run(guest(args.endpoint))
    else:
        result = asyncio.run(cold(args.config))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
