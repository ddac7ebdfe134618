"""Live reload of configuration.toml: SIGHUP, `kata-vmcache reload`, `systemctl reload`.

The daemon re-reads the file it was started with and validates it exactly as at start-up
(the file, then what it names on this host: factory/host.py).
Then, by what changed:

| setting                                             | on reload                              |
|-----------------------------------------------------|----------------------------------------|
| [factory] vm_cache_number, [vmcache]               | the pool grows or shrinks (to what the |
| memory_budget_mib                                   | budget holds, which the log says)      |
| [hypervisor.qemu] (any key), [vmcache] accelerator, | VM settings: new VMs are built from the|
| max_memory, ready_probe, guest_agent, kata_version, | new settings, ready VMs built from the |
| and any edit that changes Kata's `Config` reply     | old ones are stopped and replaced, and |
| (e.g. [agent.kata], [proxy.kata])                   | `Config` answers with the new settings |
| [vmcache] ready_timeout, ready_line, stop_timeout   | used for the next boots and stops;     |
|                                                     | ready VMs are kept                     |
| [vmcache] boot_parallelism                          | boots in flight finish; then the new   |
|                                                     | number applies                         |
| [vmcache] boot_priority                             | the next boots; "normal" also promotes |
|                                                     | the boots in flight                    |
| [vmcache] autoscale, min_ready, max_ready,          | the target is decided again at once    |
| shrink_after                                        | (autoscale off: vm_cache_number)       |
| [vmcache] socket_mode, socket_group                 | applied to the socket at once          |
| [vmcache] log_format                                | applied at once                        |
| [factory] vm_cache_endpoint, enable_template,       | cannot change while running: the whole |
| template_path; [vmcache] state_dir, vm_storage_path| reload is refused, naming the key;     |
| metrics_address                                     | restart the service to apply it        |

VMs already handed off are never touched: they belong to whoever took them.

A reload is all or nothing. An edit with errors, one that changes a setting that needs a
restart, or `vm_cache_number = 0` (which would disable the cache) is refused: each problem
is logged as an error naming the key, and the daemon keeps serving with the settings it has.
Settings are compared, not files: a kernel replaced in place at the same path is not a
change (restart the service to boot from it).

Each attempt is recorded in `<state_dir>/reload.json` (pid, generation, result, message),
written atomically; `kata-vmcache reload` signals the daemon and waits for the generation to
move, which is how it reports "applied" or "refused" and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .. import config as configmod
from ..config import Config
from ..errors import ConfigError, ConfigProblem, VmcacheError
from ..factory import Factory, host
from ..pool.autoscale import Autoscaler
from ..pool.cache import VMCache
from ..procs import pid_alive
from .logs import setup_logging
from .notify import Notifier, status_line
from .server import CacheServicer, apply_permissions

log = logging.getLogger(__name__)

OUTCOME_FILE = "reload.json"
KATA_CONFIG = "Kata's Config reply"

#: Bound at start-up: the socket, the VM records, the kind of factory.
RESTART_KEYS = frozenset({"factory.vm_cache_endpoint", "factory.enable_template",
                          "factory.template_path", "vmcache.state_dir",
                          "vmcache.vm_storage_path", "vmcache.metrics_address"})
#: What a VM is made of: VMs built with other values are retired. The probe decides
#: devices too (our serial ports), the agent and the generation the proxy and channel.
VM_KEYS = frozenset({"vmcache.accelerator", "vmcache.max_memory_mib", KATA_CONFIG,
                     "vmcache.ready_probe", "vmcache.guest_agent", "vmcache.kata_version",
                     "vmcache.kata_version_origin"})
VM_PREFIX = "hypervisor.qemu."
#: How VMs are booted and stopped, not what they are: the factory is rebuilt, VMs are kept.
BOOT_KEYS = frozenset({"vmcache.ready_timeout", "vmcache.ready_line",
                       "vmcache.stop_timeout"})
AUTOSCALE_KEYS = frozenset({"vmcache.autoscale", "vmcache.min_ready", "vmcache.max_ready",
                            "vmcache.shrink_after"})
LIVE_KEYS = AUTOSCALE_KEYS | frozenset({"factory.vm_cache_number", "vmcache.memory_budget_mib",
                       "vmcache.boot_parallelism", "vmcache.boot_priority",
                       "vmcache.socket_mode", "vmcache.socket_group", "vmcache.log_format"})

Result = Literal["started", "applied", "refused"]


@dataclass(frozen=True)
class Change:
    key: str
    old: str
    new: str

    def __str__(self) -> str:
        if self.key == KATA_CONFIG:
            return f"{self.key} changed"
        return f"{self.key} {self.old} -> {self.new}"


@dataclass(frozen=True)
class Plan:
    """What a reload from `old` to `new` changes, and what that takes."""

    changes: tuple[Change, ...]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(c.key for c in self.changes)

    @property
    def needs_restart(self) -> tuple[Change, ...]:
        # Keys nobody classified are treated as needing a restart: never half-apply.
        return tuple(c for c in self.changes if c.key in RESTART_KEYS or not classified(c.key))

    @property
    def new_vms(self) -> bool:
        return any(k in VM_KEYS or k.startswith(VM_PREFIX) for k in self.keys)

    @property
    def new_factory(self) -> bool:
        return self.new_vms or bool(self.keys & BOOT_KEYS)


def classified(key: str) -> bool:
    return (key in RESTART_KEYS or key in VM_KEYS or key.startswith(VM_PREFIX)
            or key in BOOT_KEYS or key in LIVE_KEYS)


def plan(old: Config, new: Config) -> Plan:
    before, after = dict(configmod.describe(old)), dict(configmod.describe(new))
    changes = [Change(k, before.get(k, "(unset)"), v) for k, v in after.items()
               if before.get(k) != v]
    if old.kata_vm_config() != new.kata_vm_config():
        changes.append(Change(KATA_CONFIG, "", ""))
    return Plan(tuple(changes))


@dataclass(frozen=True)
class Outcome:
    """One reload attempt, as `kata-vmcache reload` reads it back."""

    pid: int
    generation: int
    result: Result
    message: str

    def write(self, state_dir: Path) -> None:
        path = state_dir / OUTCOME_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "generation": self.generation,
                                   "result": self.result, "message": self.message}))
        tmp.replace(path)

    @classmethod
    def read(cls, state_dir: Path) -> Outcome | None:
        try:
            data = json.loads((state_dir / OUTCOME_FILE).read_text())
            result = data["result"]
            if result not in ("started", "applied", "refused"):
                return None
            return cls(int(data["pid"]), int(data["generation"]), result,
                       str(data["message"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def remove_outcome(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir / OUTCOME_FILE).unlink()


class Reloader:
    """Applies edits of the configuration file to the running daemon, one at a time."""

    def __init__(self, config: Config, *, cache: VMCache, servicer: CacheServicer,
                 notifier: Notifier, factory_for: Callable[[Config], Factory],
                 autoscaler: Autoscaler | None = None) -> None:
        self.config = config
        self.autoscaler = autoscaler
        self.cache = cache
        self.servicer = servicer
        self.notifier = notifier
        self.factory_for = factory_for
        self.generation = 0
        self.state_dir = config.daemon.state_dir

    def started(self) -> None:
        self._record("started", f"serving with {self.config.source}")

    async def run(self, requested: asyncio.Event) -> None:
        """Reload each time `requested` is set (signals that arrive during a reload are
        folded into one more reload after it)."""
        while True:
            await requested.wait()
            requested.clear()
            await self.reload()

    async def reload(self) -> Outcome:
        self.generation += 1
        self.notifier.reloading()
        log.info("reloading the configuration from %s", self.config.source)
        try:
            result, message = await self._reload()
        except VmcacheError as exc:
            result, message = "refused", str(exc)
            log.error("configuration reload refused: %s", exc)
        self.notifier.ready(status_line(self.cache))
        return self._record(result, message)

    def _record(self, result: Result, message: str) -> Outcome:
        outcome = Outcome(os.getpid(), self.generation, result, message)
        try:
            outcome.write(self.state_dir)
        except OSError as exc:
            log.warning("cannot record the reload result in %s: %s", self.state_dir, exc)
        return outcome

    async def _reload(self) -> tuple[Result, str]:
        old = self.config
        keep = "still serving with the previous settings"
        try:
            # Off the loop: the host's checks run subprocesses (virtiofsd's and QEMU's
            # probes), and the loop keeps handing out VMs meanwhile.
            new, warnings = await asyncio.to_thread(load_checked, old.source)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("configuration reload refused: %s", problem)
            log.error("configuration reload refused (%d problem%s); %s", len(exc.problems),
                      "" if len(exc.problems) == 1 else "s", keep)
            first = str(exc.problems[0]) if exc.problems else "invalid configuration"
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            return "refused", f"{first}{more}"
        for w in warnings:
            log.warning("%s", w)
        p = plan(old, new)
        if p.needs_restart:
            what = "; ".join(str(c) for c in p.needs_restart)
            message = (f"{what}: cannot change while running, restart the service to apply "
                       f"it (systemctl restart kata-vmcache)")
            log.error("configuration reload refused: %s; %s", message, keep)
            return "refused", message
        if new.factory.vm_cache_number < 1:
            message = ("factory.vm_cache_number is 0, which would disable the cache "
                       "(stop the service instead)")
            log.error("configuration reload refused: %s; %s", message, keep)
            return "refused", message
        if not p.changes:
            log.info("configuration reloaded: no setting changed")
            return "applied", "no setting changed"
        self._apply(p, old, new)
        summary = "; ".join(str(c) for c in p.changes)
        log.info("configuration reloaded: %s", summary)
        return "applied", summary

    def _apply(self, p: Plan, old: Config, new: Config) -> None:
        keys = p.keys
        d = new.daemon
        if keys & {"vmcache.socket_mode", "vmcache.socket_group"}:
            try:
                apply_permissions(new.factory.vm_cache_endpoint, d.socket_mode, d.socket_group)
            except (OSError, KeyError) as exc:
                raise VmcacheError(f"cannot apply socket_mode/socket_group to "
                                   f"{new.factory.vm_cache_endpoint}: {exc}") from exc
        # From here nothing can fail: the new settings are committed together.
        self.config = new
        if "vmcache.log_format" in keys:
            setup_logging(debug=logging.getLogger().isEnabledFor(logging.DEBUG),
                          json_lines=d.log_format == "json")
        if p.new_factory:
            factory = self.factory_for(new)
            if not p.new_vms:
                _keep_accelerator(factory, self.cache.factory)
            # Config first: from the moment new VMs are wanted, Config describes them.
            self.servicer.set_config(new)
            if p.new_vms:
                retired = self.cache.replace_factory(factory)
                log.info("VM settings changed: %d ready VM%s retired, refilling with the new "
                         "settings", retired, "" if retired == 1 else "s")
            else:
                self.cache.factory = factory
        self.cache.stop_timeout = d.stop_timeout
        if "vmcache.boot_parallelism" in keys:
            self.cache.set_parallelism(d.boot_parallelism)
        if "vmcache.boot_priority" in keys:
            self.cache.set_boot_priority(d.boot_priority)
        if "vmcache.memory_budget_mib" in keys:
            self.cache.set_memory_budget(new.memory_budget_mib)
        scaler = self.autoscaler
        if scaler is not None and keys & (AUTOSCALE_KEYS | {"factory.vm_cache_number",
                                                           "vmcache.boot_parallelism"}):
            # The autoscaler owns the target: vm_cache_number is its fixed value (autoscale
            # off) or its starting one.
            scaler.configure(d.autoscale, fixed=new.factory.vm_cache_number,
                             parallelism=d.boot_parallelism)
        elif scaler is None and "factory.vm_cache_number" in keys:
            self.cache.resize(new.factory.vm_cache_number)
        if keys & {"factory.vm_cache_number", "vmcache.memory_budget_mib",
                   "hypervisor.qemu.memory_mib"} and (note := new.budget_note()):
            log.warning("%s", note)


def load_checked(source: Path | None) -> tuple[Config, list[ConfigProblem]]:
    """The file at `source` and, as at start, what the file cannot tell (QEMU's machine
    types, the VM's virtiofsd, kata-proxy, ...) checked on this host: the configuration and
    its warnings, or ConfigError."""
    new, warnings = configmod.load(source)
    return new, [*warnings, *host.require(new)]


def _keep_accelerator(factory: Factory, previous: Factory) -> None:
    """A boot-only change must not undo `accelerator = "auto"`'s fall-back to TCG (the new
    factory would try KVM again, and retiring nothing, find out the slow way)."""
    factory.use_accelerator(previous.spec.accelerator)


async def request_reload(pid: int, state_dir: Path, *, timeout: float) -> Outcome:
    """SIGHUP the server `pid`, then wait for the reload it records in `state_dir`."""
    before = Outcome.read(state_dir)
    if before is None or before.pid != pid:
        raise VmcacheError(f"the server (pid {pid}) keeps no reload record in {state_dir}: it "
                           "runs with another [vmcache] state_dir (changing it needs a restart)")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise VmcacheError(f"no server process {pid}") from None
    except PermissionError:
        raise VmcacheError(f"not allowed to signal the server (pid {pid}): run this as the "
                           "server's user") from None
    deadline = time.monotonic() + timeout
    while True:
        now = Outcome.read(state_dir)
        if now is not None and now.pid == pid and now.generation > before.generation:
            return now
        if not pid_alive(pid):
            raise VmcacheError(f"the server (pid {pid}) exited during the reload")
        if time.monotonic() > deadline:
            raise VmcacheError(f"the server (pid {pid}) did not report the reload within "
                               f"{timeout:g} s (see its log)")
        await asyncio.sleep(0.05)
