"""The daemon's lifecycle: configuration -> factory -> cache -> gRPC server, and back down.

    await serve(config)                       # until SIGTERM/SIGINT or Quit
    await serve(config, shutdown=event)       # tests: set the event to stop

Order of start-up (each step can fail with a one-line error, before anything is touched):
1. refuse if a live server answers on the endpoint, or another daemon holds the state
   directory (its lock file; a second daemon must not steal VMs);
2. recover: stop the VMs a previous, crashed daemon still owned (their records say so),
   leave handed-off VMs alone, drop the records of VMs that are gone;
3. listen for Prometheus (`metrics_address`, metrics.py), bind the socket, start the pool,
   tell systemd READY (notify.py; a no-op outside systemd).

While serving: WATCHDOG=1 pings and a STATUS= line kept current for systemd; SIGHUP reloads
the configuration file (reload.py).

Shut-down (signal, Quit, or the pool failing): tell systemd STOPPING, callers still waiting
for a VM get UNAVAILABLE at once, stop serving (grace period for replies being written), stop
the pool (booting VMs are stopped by their factory), stop every ready VM, remove the socket.
Handed-off VMs are never touched: they are not ours any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import EndpointInUse, UsageError
from ..factory import Factory, host
from ..factory.direct import DirectFactory
from ..factory.template import TemplateFactory
from ..fds import DescriptorWatch, raise_open_file_limit
from ..pool.autoscale import Autoscaler
from ..pool.cache import VMCache
from ..procs import pids
from ..vm.paths import VM_ID, VMPaths
from ..vm.proxy import is_kata_proxy
from ..vm.qemu import is_vm_qemu
from ..vm.qmp import Pidfd, stop_process
from ..vm.records import Unclaimed, scan_records
from ..vm.virtiofsd import is_virtiofsd
from .metrics import MetricsServer, registry_for
from .monitor import MonitorServicer
from .notify import Notifier, publish_status, status_line
from .reload import Reloader, remove_outcome
from .server import CacheServicer, prepare_endpoint, remove_endpoint, start_server

log = logging.getLogger(__name__)

SERVER_GRACE = 1.0
#: In the state directory: held (flock) by the daemon serving from it.
LOCK_FILE = "lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold `state_dir` for this daemon: an exclusive flock on its lock file, released when
    the process exits however it exits. Another live daemon (another runtime class's
    instance whose file names the same state_dir) holding it is refused: two daemons
    recovering and recording VMs in one directory would take each other's VMs for orphans.
    Returns the descriptor (closed by `unlock_state_dir`)."""
    path = state_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise EndpointInUse(f"{state_dir}: another kata-vmcache (pid {holder}) uses this "
                                "state_dir; give each instance its own [vmcache] state_dir"
                                ) from None
        # The previous holder may have removed the file between our open and our lock: a
        # lock on a removed file holds nothing, so start again on the current one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)


def unlock_state_dir(state_dir: Path, fd: int) -> None:
    """Remove the lock file while still holding it (so nobody locks a file about to go)."""
    with contextlib.suppress(FileNotFoundError):
        (state_dir / LOCK_FILE).unlink()
    os.close(fd)


def find_qemu(vm_id: str) -> int | None:
    """The pid of VM vm_id's QEMU, found by the `-name` it was started with."""
    for pid in pids():
        if is_vm_qemu(pid, vm_id):
            return pid
    return None


@dataclass
class Recovery:
    #: Stop watching handed-out VMs of a previous daemon (called at shut-down).
    watches: list[Callable[[], None]] = field(default_factory=list)
    unclaimed: list[Unclaimed] = field(default_factory=list)


async def recover(state_dir: Path, vm_storage: Path, *, timeout: float = 3.0) -> Recovery:
    """Clean up after a daemon that did not stop cleanly (crash, SIGKILL, power loss).

    A record names the VM's QEMU, its kata-proxy and its directories (Kata's, the proxy's,
    ours). VMs still ours are stopped (QEMU and proxy, all side by side, so stuck ones
    cost one `timeout` in all) and their directories removed; handed-off VMs are the
    client's: left alone while their QEMU runs, their directories removed once it has
    exited. A record that cannot be believed (missing, truncated, not JSON, the wrong
    shape) proves nothing: if a QEMU of that VM runs it is reported and left alone,
    with its files; if none runs, the directories are removed. Each is warned about once.
    """
    found = Recovery()
    stops: list[Coroutine[Any, Any, None]] = []
    for entry in scan_records(state_dir):
        vm_id = entry.dir.name
        record = entry.record
        if record is None:
            pid = find_qemu(vm_id) if VM_ID.fullmatch(vm_id) else None
            where = entry.dir / "vm.json"
            if pid is not None:
                log.warning("%s: %s; VM %s's QEMU (pid %d) runs, and may be a client's: "
                            "left running, with its files (see status --json)", where,
                            entry.problem, vm_id, pid)
                found.unclaimed.append(Unclaimed(str(where), entry.problem, pid))
                continue
            if not VM_ID.fullmatch(vm_id) or not entry.dir.is_dir():
                log.warning("%s: %s; not a VM directory of ours: left alone", entry.dir,
                            entry.problem)
                continue
            log.warning("%s: %s; no QEMU of VM %s runs: its files are removed", where,
                        entry.problem, vm_id)
            paths = VMPaths.for_vm(vm_id, vm_storage=vm_storage, state_dir=state_dir)
            _remove(paths.dir, paths.sandbox, paths.own)
            continue
        pid, state = record["pid"], record["state"]
        if pid is None:
            # Recorded before its launch: the daemon died before it could note the pid.
            pid = find_qemu(vm_id)
        alive = pid is not None and is_vm_qemu(pid, vm_id)
        dirs = [entry.dir, *(Path(record[key]) for key in ("vm_dir", "sandbox_dir")
                             if key in record)]
        if state == "handed_off":
            if not alive:
                _remove(*dirs)
            elif pid is not None and (unwatch := _remove_when_gone(pid, vm_id, dirs)):
                found.watches.append(unwatch)
            continue  # someone else's VM now: never touch it
        share = Path(record.get("vm_dir") or vm_storage / vm_id) / "shared"
        stops.append(_stop_orphan(vm_id, state, pid if alive else None,
                                  record.get("proxy_pid"), record.get("virtiofsd_pid"),
                                  share, dirs, timeout))
    await asyncio.gather(*stops)
    return found


async def _stop_orphan(vm_id: str, state: str, pid: int | None, proxy: int | None,
                       virtiofsd: int | None, share: Path, dirs: list[Path],
                       timeout: float) -> None:
    if pid is not None and (qemu := Pidfd.of_pid(pid, check=lambda p: is_vm_qemu(p, vm_id))):
        log.warning("stopping VM %s (QEMU pid %d) left %s by a previous daemon", vm_id, pid,
                    state)
        await _stop_orphan_process(qemu, timeout)
    if proxy is not None and (kp := Pidfd.of_pid(proxy, check=lambda p: is_kata_proxy(p, vm_id))):
        log.warning("stopping kata-proxy %d of VM %s left by a previous daemon", proxy, vm_id)
        await _stop_orphan_process(kp, timeout)
    # Usually gone with its QEMU's connection; not if QEMU never connected (a crash
    # between the two launches, before the record named it: then found by its share,
    # which only this VM's virtiofsd exports).
    if virtiofsd is None:
        virtiofsd = find_virtiofsd(share)
    if virtiofsd is not None and (
            vfs := Pidfd.of_pid(virtiofsd, check=lambda p: is_virtiofsd(p, share))):
        log.warning("stopping virtiofsd %d of VM %s left by a previous daemon", virtiofsd,
                    vm_id)
        await _stop_orphan_process(vfs, timeout)
    _remove(*dirs)


def find_virtiofsd(share: Path) -> int | None:
    """The pid of the virtiofsd exporting `share`, found by its arguments."""
    for pid in pids():
        if is_virtiofsd(pid, share):
            return pid
    return None


async def _stop_orphan_process(proc: Pidfd, timeout: float) -> None:
    """The stop sequence without QMP (an orphan's QMP slot may be held by anyone): SIGTERM,
    with SIGCONT so that one stopped by a signal handles it now rather than hang until
    SIGKILL after `timeout`."""
    try:
        await stop_process(proc, timeout, wake=True)
    finally:
        proc.close()


def _remove(*dirs: Path) -> None:
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def _remove_when_gone(pid: int, vm_id: str, dirs: list[Path]) -> Callable[[], None] | None:
    """A handed-out VM a previous daemon launched (so not our child): watch its QEMU
    through a pidfd and remove its leftover directories once it exits, never before.
    Returns how to stop watching."""

    def gone() -> None:
        watch.close()
        log.info("handed-out VM %s's QEMU %d has exited; removing its files", vm_id, pid)
        for path in dirs:
            shutil.rmtree(path, ignore_errors=True)

    found = Pidfd.of_pid(pid, check=lambda p: is_vm_qemu(p, vm_id), on_exit=gone)
    if found is None:
        return None
    watch = found
    return watch.close


async def serve(config: Config, *, shutdown: asyncio.Event | None = None,
                notifier: Notifier | None = None) -> None:
    """Run the VM cache server until `shutdown` is set, SIGTERM/SIGINT, or Quit."""
    if config.factory.vm_cache_number < 1:
        raise UsageError("factory.vm_cache_number is 0, which disables the VM cache "
                         "(set it to the number of VMs to keep ready)")
    raise_open_file_limit()  # a daemon started by hand gets the shell's 1024 (fds.py)
    shutdown = shutdown or asyncio.Event()
    notifier = notifier or Notifier.from_environ()
    reload_requested = asyncio.Event()  # set by SIGHUP, even before the reloader runs
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig, event in ((signal.SIGTERM, shutdown), (signal.SIGINT, shutdown),
                       (signal.SIGHUP, reload_requested)):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(sig, _on_signal, sig, event)
            handled.append(sig)

    endpoint = config.factory.vm_cache_endpoint
    # From the start: recovery and start-up run on the loop too, and must not stall it.
    watchdog = asyncio.create_task(notifier.watchdog(), name="watchdog")
    watches: list[Callable[[], None]] = []
    state_dir = config.daemon.state_dir
    lock: int | None = None
    metrics: MetricsServer | None = None
    try:
        # What the file cannot tell (QEMU's machine types, whose state_dir): before
        # anything is touched. An existing state_dir is never re-moded (factory/host.py).
        await asyncio.to_thread(host.require, config, vm_needs=False)
        prepare_endpoint(endpoint)
        host.claim_state_dir(config)
        lock = lock_state_dir(state_dir)
        recovered = await recover(state_dir, config.daemon.vm_storage_path,
                                  timeout=config.daemon.stop_timeout)
        watches = recovered.watches

        factory = make_factory(config)
        cache = VMCache(factory, config.factory.vm_cache_number,
                        parallelism=config.daemon.boot_parallelism,
                        stop_timeout=config.daemon.stop_timeout,
                        memory_budget_mib=config.memory_budget_mib,
                        boot_priority=config.daemon.boot_priority)
        autoscaler = Autoscaler(cache, config.daemon.autoscale,
                                fixed=config.factory.vm_cache_number,
                                parallelism=config.daemon.boot_parallelism)
        servicer = CacheServicer(cache, config, shutdown.set)
        monitor = MonitorServicer(cache, config, stopping=shutdown,
                                  unclaimed=recovered.unclaimed, autoscaler=autoscaler)
        if config.daemon.metrics_address:
            metrics = MetricsServer(registry_for(cache, config, autoscaler))
            await metrics.start(config.daemon.metrics_address)
        server = await start_server(config, servicer, monitor)
        log.info("serving %d %s VMs (%d vCPU, %d MiB) on %s", cache.target,
                 factory.accelerator.upper(), factory.spec.vcpus, factory.spec.memory_mib,
                 endpoint)
        if note := config.budget_note():
            log.warning("%s", note)
        duties = _service_duties(config, cache, servicer, notifier, reload_requested,
                                 autoscaler)
        pool = asyncio.create_task(cache.run(), name="vm-pool")
        stop = asyncio.create_task(shutdown.wait(), name="shutdown")
        try:
            await asyncio.wait({pool, stop}, return_when=asyncio.FIRST_COMPLETED)
            if pool.done():
                pool.result()  # the pool only ends by failing: surface why
        finally:
            await _cancel(duties)
            notifier.stopping()
            log.info("shutting down")
            stop.cancel()
            cache.refuse_new()
            await server.stop(SERVER_GRACE)
            pool.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pool
            await cache.close()
            await cache.factory.close()  # template files, and the tmpfs if we mounted it
            remove_outcome(state_dir)
            # Last: `destroy` waits for the socket to vanish as the sign that all is stopped.
            remove_endpoint(endpoint)
            log.info("stopped (%d VMs handed out)", cache.stats.handed_out)
    finally:
        if metrics is not None:
            await metrics.stop()
        for unwatch in watches:
            unwatch()
        if lock is not None:
            unlock_state_dir(state_dir, lock)
        await _cancel({watchdog})
        for sig in handled:
            loop.remove_signal_handler(sig)


def make_factory(config: Config) -> Factory:
    """Clones of a template (`enable_template`), or VMs booted one by one. A reload that
    changes the VM's settings makes a new factory of the same kind (switching templating
    on or off needs a restart); a new template factory rebuilds the template, whose stored
    settings no longer match."""
    return TemplateFactory(config) if config.factory.enable_template else DirectFactory(config)


def _service_duties(config: Config, cache: VMCache, servicer: CacheServicer,
                    notifier: Notifier, reload_requested: asyncio.Event,
                    autoscaler: Autoscaler) -> set[asyncio.Task[None]]:
    """Once the socket serves: READY=1, the STATUS= line, reloads on SIGHUP, the watch
    for running out of file descriptors, and the pool's autoscaling."""
    reloader = Reloader(config, cache=cache, servicer=servicer, notifier=notifier,
                        factory_for=make_factory, autoscaler=autoscaler)
    reloader.started()
    line = status_line(cache)
    notifier.ready(line)
    return {asyncio.create_task(publish_status(notifier, cache, sent=line), name="status"),
            asyncio.create_task(reloader.run(reload_requested), name="reload"),
            asyncio.create_task(DescriptorWatch(cache.retry_now).run(), name="fds"),
            asyncio.create_task(autoscaler.run(), name="autoscale")}


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _on_signal(sig: signal.Signals, event: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    event.set()
