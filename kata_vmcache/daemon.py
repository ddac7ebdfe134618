"""The daemon's lifecycle: configuration -> factory -> cache -> gRPC server, and back down.

    await serve(config)                       # until SIGTERM/SIGINT or Quit
    await serve(config, shutdown=event)       # tests: set the event to stop

Order of start-up (each step can fail with a one-line error, before anything is touched):
1. refuse if a live server answers on the endpoint (a second daemon must not steal VMs);
2. recover: stop the VMs a previous, crashed daemon still owned (their records say so),
   leave handed-off VMs alone, drop the records of VMs that are gone;
3. bind the socket, start the pool, tell systemd READY.

Shut-down (signal, Quit, or the pool failing): stop serving (grace period for in-flight
replies), stop the pool (booting VMs are stopped by their factory), stop every ready VM,
remove the socket. Handed-off VMs are never touched: they are not ours any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

from .config import Config
from .errors import UsageError
from .factory.cache import VMCache
from .factory.direct import DirectFactory
from .factory.template import TemplateFactory
from .procs import cmdline, pid_alive
from .server import CacheServicer, prepare_endpoint, remove_endpoint, start_server
from .vm import read_records

log = logging.getLogger(__name__)

SERVER_GRACE = 1.0


def _is_our_qemu(pid: int, vm_id: str) -> bool:
    """pid is alive and is the QEMU of VM vm_id (guards against pid reuse)."""
    return pid_alive(pid) and f"kata-vmcache-{vm_id}" in cmdline(pid)


async def _kill_and_wait(pid: int, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(pidfd, exited.set)
        try:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(exited.wait(), wait)
                    return
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


async def recover(state_dir: Path, *, timeout: float = 3.0) -> None:
    """Clean up after a daemon that did not stop cleanly (crash, SIGKILL, power loss)."""
    for vm_dir, record in read_records(state_dir):
        vm_id, pid, state = record.get("id", vm_dir.name), record.get("pid"), record.get("state")
        alive = isinstance(pid, int) and _is_our_qemu(pid, vm_id)
        if state == "handed_off":
            if not alive:
                shutil.rmtree(vm_dir, ignore_errors=True)
            continue  # someone else's VM now: never touch it
        if alive:
            assert isinstance(pid, int)
            log.warning("stopping VM %s (QEMU pid %d) left %s by a previous daemon",
                        vm_id, pid, state)
            await _kill_and_wait(pid, timeout)
        shutil.rmtree(vm_dir, ignore_errors=True)


async def serve(config: Config, *, shutdown: asyncio.Event | None = None) -> None:
    """Run the VM cache server until `shutdown` is set, SIGTERM/SIGINT, or Quit."""
    if config.factory.vm_cache_number < 1:
        raise UsageError("factory.vm_cache_number is 0, which disables the VM cache "
                         "(set it to the number of VMs to keep ready)")
    shutdown = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(sig, _on_signal, sig, shutdown)
            handled.append(sig)

    endpoint = config.factory.vm_cache_endpoint
    try:
        prepare_endpoint(endpoint)
        state_dir = config.daemon.state_dir
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        await recover(state_dir, timeout=config.daemon.stop_timeout)

        factory: DirectFactory | TemplateFactory = (
            TemplateFactory(config) if config.factory.enable_template else DirectFactory(config))
        cache = VMCache(factory, config.factory.vm_cache_number,
                        parallelism=config.daemon.boot_parallelism,
                        stop_timeout=config.daemon.stop_timeout)
        servicer = CacheServicer(cache, config, shutdown.set)
        server = await start_server(config, servicer)
        log.info("serving %d %s VMs (%d vCPU, %d MiB) on %s", cache.target,
                 factory.accelerator.upper(), factory.spec.vcpus, factory.spec.memory_mib,
                 endpoint)
        pool = asyncio.create_task(cache.run(), name="vm-pool")
        stop = asyncio.create_task(shutdown.wait(), name="shutdown")
        try:
            await asyncio.wait({pool, stop}, return_when=asyncio.FIRST_COMPLETED)
            if pool.done():
                pool.result()  # the pool only ends by failing: surface why
        finally:
            log.info("shutting down")
            stop.cancel()
            await server.stop(SERVER_GRACE)
            pool.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool
            await cache.close()
            if isinstance(factory, TemplateFactory):
                await factory.close()  # template files, and the tmpfs if we mounted it
            # Last: `destroy` waits for the socket to vanish as the sign that all is stopped.
            remove_endpoint(endpoint)
            log.info("stopped (%d VMs handed out)", cache.stats.handed_out)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def _on_signal(sig: signal.Signals, shutdown: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    shutdown.set()
