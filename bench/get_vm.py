"""Time from `get_vm()` to a guest that answers, against a cold boot of the same guest to
the same point. Runs a real daemon (cache of 1) on the bundled demo guest under TCG.

    PYTHONPATH=. python bench/get_vm.py [--samples 7] [--json FILE]

- cached, to ping: `get_vm(wait_guest=False)` (Config, fit check, GetBaseVM, QMP `cont`),
  then the first ping the guest answers;
- cached, get_vm(): the default call (the above, plus the guest's clock and random pool);
- cached, +1 vCPU +256 MiB: `get_vm(cpus=2, memory_mib=512)`, hot-plug and online included;
- cold, to ping: QEMU launched with the daemon's command line, the guest's ready line,
  then the same ping.

Each cached sample starts from a full, idle cache. The guest's ping sleeps on the guest's
clock before answering (10 ms, GuestChannel.ping's default); it is in every figure alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kata_vmcache.client.rpc import CacheClient
from kata_vmcache.config import Config, load
from kata_vmcache.demo.config import render_config
from kata_vmcache.demo.guest import build_demo_guest
from kata_vmcache.factory.spec import spec_from_config
from kata_vmcache.getvm import get_vm
from kata_vmcache.vm.guest_channel import GuestChannel
from kata_vmcache.vm.owned import new_vm_id
from kata_vmcache.vm.paths import VMPaths
from kata_vmcache.vm.qemu import QemuProcess
from kata_vmcache.vm.records import read_records


async def cache_full(config: Config, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("state") == "ready" for _, r in read_records(config.daemon.state_dir)):
        if time.monotonic() > deadline:
            raise TimeoutError("the cache did not refill")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # the refill's boot has just ended: let the CPUs settle


async def cached_to_ping(config: Config) -> float:
    start = time.monotonic()
    async with await get_vm(config, wait_guest=False) as vm:
        await vm.wait_guest(10)
        return time.monotonic() - start


async def cached_get_vm(config: Config, cpus: int | None = None,
                        memory_mib: int | None = None) -> float:
    start = time.monotonic()
    async with await get_vm(config, cpus=cpus, memory_mib=memory_mib):
        return time.monotonic() - start


async def cold_to_ping(config: Config) -> float:
    spec = spec_from_config(config, "tcg")
    tmp = Path(tempfile.mkdtemp(prefix="kvc-cold-"))
    paths = VMPaths(dir=tmp / "vm", own=tmp / "own", sandbox=tmp / "sbs")
    try:
        start = time.monotonic()
        argv = spec.argv(new_vm_id(), "00000000-0000-0000-0000-000000000000", paths)
        async with QemuProcess(argv, paths, log=logging.getLogger("bench")) as qemu, \
                await GuestChannel.connect(paths.guest) as guest:
            await qemu.execute("cont")
            await guest.wait_ready(60)
            await guest.ping(10)
            return time.monotonic() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def sample(name: str, n: int, measure: Callable[[], Awaitable[float]],
                 before: Callable[[], Awaitable[None]] | None = None) -> list[float]:
    times = []
    for _ in range(n):
        if before is not None:
            await before()
        times.append(await measure())
    print(f"{name:<28} median {statistics.median(times) * 1000:6.0f} ms   "
          f"min {min(times) * 1000:6.0f}  max {max(times) * 1000:6.0f}  (n={n})", flush=True)
    return times


async def main(samples: int) -> dict[str, list[float]]:
    root = Path(tempfile.mkdtemp(prefix="kvc-b-"))
    daemon = None
    try:
        guest = build_demo_guest(root / "guest")
        path = root / "configuration.toml"
        path.write_text(render_config(guest, endpoint=root / "cache.sock",
                                      state_dir=root / "state", cache_number=1,
                                      accelerator="tcg"))
        config = load(path)[0]
        daemon = subprocess.Popen([sys.executable, "-m", "kata_vmcache", "--config",
                                   str(path), "init"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not config.factory.vm_cache_endpoint.exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon did not start")
            await asyncio.sleep(0.05)
        async with CacheClient(config.factory.vm_cache_endpoint) as client:
            await client.status()
        full = lambda: cache_full(config)  # noqa: E731
        results = {
            "cached_to_ping": await sample("cached: get_vm -> ping", samples,
                                           lambda: cached_to_ping(config), full),
            "cached_get_vm": await sample("cached: get_vm()", samples,
                                          lambda: cached_get_vm(config), full),
            "cached_hotplug": await sample("cached: +1 vCPU +256 MiB", samples,
                                           lambda: cached_get_vm(config, 2, 512), full),
        }
        daemon.terminate()
        daemon.wait(30)
        results["cold_to_ping"] = await sample("cold boot -> ping", samples,
                                               lambda: cold_to_ping(config))
        ratio = (statistics.median(results["cold_to_ping"])
                 / statistics.median(results["cached_to_ping"]))
        print(f"cold / cached (to ping): {ratio:.1f}x; load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        return results
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the raw times (s) here")
    args = parser.parse_args()
    out = asyncio.run(main(args.samples))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
