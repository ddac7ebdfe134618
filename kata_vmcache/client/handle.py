"""A VM the caller owns: what `client.get_vm()` returns.

Ownership arrives with a hand-off record (`GrpcVM.hypervisor`: Kata's `ID`, `QmpChannelpath`,
`QemuSMP`, plus our `Pid`, `GuestChannelPath`, `ConsolePath`, `VMDir`, `SandboxDir`,
`StateDir`, `MaxMemory`,
`MemorySlots`), whether the VM came from the cache or was booted here. From `adopt()` on,
the handle is the VM's only owner and the one thing that stops it:

    async with VMHandle.adopt(base_vm) as vm:    # leaving the block stops the VM
        await vm.connect(guest=True)            # QMP, and the guest's agent port
        await vm.resume()                       # QMP `cont`
        await vm.wait_guest(10)                 # a ping the guest answers after a sleep
        await vm.hotplug(cpus=2, memory_mib=512)
    ...
    await vm.detach()   # instead of stopping: close our sessions, the VM runs on

Stopping (`stop()`): qmp.py's stop sequence (QMP `quit`, or SIGTERM without QMP, a bounded
wait, then SIGKILL); then the VM's state directory goes. The QEMU is usually another
process's child (the daemon that booted it reaps it), so its exit is watched through a
pidfd opened at adoption (`qmp.Pidfd`), never waitpid(); signals go through the same
pidfd, so a recycled pid is never hit.

Liveness: the demo guest answers `ping` only after sleeping on its own clock, so a guest
whose timers do not run (paused, or restored without a working clock) is reported dead,
not alive. A resumed guest's clock stood still while it was paused and its entropy pool is
the one every VM from the same cache started with: `sync_guest()` sets the clock and mixes
fresh bytes in (Kata's `SyncTime` and `ReseedRNG` after `Resume`).

Hot-plug (`hotplug()`) runs hotplug.py's steps, as Kata does it, on the handle's QMP
session and agent port, each wait bounded and cut short when QEMU exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..errors import (
    GuestError,
    GuestTimeout,
    GuestUnresponsive,
    HotplugError,
    VMDead,
    VMStateError,
)
from ..vm.guest_channel import SEED_BYTES, GuestChannel, GuestInfo
from ..vm.proxy import stop_handed_out_proxy
from ..vm.qemu import is_vm_qemu
from ..vm.qmp import Pidfd, ask_quit, disconnect, open_session, stop_process
from ..vm.virtiofsd import stop_handed_out_virtiofsd
from .hotplug import MIB, acknowledged, check_result, growth, plug_cpus, plug_memory

if TYPE_CHECKING:
    from .rpc import BaseVM

log = logging.getLogger(__name__)

#: How long QEMU gets to exit after `quit` (or SIGTERM) before SIGKILL.
STOP_TIMEOUT = 3.0

Source = Literal["cache", "direct"]
T = TypeVar("T")


class _OutOfTime(Exception):
    """A bounded wait on the VM ran out (private: each caller turns it into its own error)."""


class VMHandle:
    """One VM the caller owns: its facts, its QMP session and agent port, and its end."""

    def __init__(self, base: BaseVM, proc: Pidfd | None, *, source: Source,
                 reason: str) -> None:
        self.base = base
        self.source: Source = source
        #: Why the VM was booted directly instead of taken from the cache ("" if it was not).
        self.reason = reason
        self.log = log.getChild(base.id)
        #: The VM's vCPUs and memory now (the base VM's until a hot-plug).
        self.vcpus = base.cpu
        self.memory_mib = base.memory
        #: QEMU, watched and signalled through a pidfd (None: no pid, or detached).
        self._proc = proc
        self._qmp: QMPClient | None = None
        self._guest: GuestChannel | None = None
        self._detached = False
        self._stopped = False
        self._stop_lock = asyncio.Lock()

    @classmethod
    def adopt(cls, base: BaseVM, *, source: Source = "cache", reason: str = "") -> VMHandle:
        """Take ownership of the VM `base` describes. Synchronous on purpose: between the
        hand-off and a handle that can stop the VM there is no point to be cancelled at.

        Raises VMDead (after removing its state directory) when its QEMU is already gone.
        """
        pid = base.pid
        if pid is None:
            # A server that does not say (Kata's own): QMP is then the only way to stop it.
            return cls(base, None, source=source, reason=reason)
        proc = _open_ours(pid, base.id)
        if proc is None:
            _remove_dirs(base.hypervisor)
            raise VMDead(f"VM {base.id}: its QEMU (pid {pid}) is gone")
        return cls(base, proc, source=source, reason=reason)

    def __repr__(self) -> str:
        return (f"<VMHandle {self.id} {self.source} pid={self.pid} vcpus={self.vcpus} "
                f"memory={self.memory_mib}MiB>")

    async def __aenter__(self) -> VMHandle:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._detached:
            await self.stop()

    # --- facts ---------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.base.id

    @property
    def pid(self) -> int | None:
        return self.base.pid

    @property
    def record(self) -> dict[str, Any]:
        """The hand-off record, as the server sent it."""
        return self.base.hypervisor

    @property
    def qmp_path(self) -> Path:
        return self.base.qmp_path

    @property
    def console_path(self) -> Path | None:
        return _path(self.record.get("ConsolePath"))

    @property
    def agent_path(self) -> Path | None:
        """Our line-protocol channel to the guest (the demo guest's second serial port)."""
        return _path(self.record.get("GuestChannelPath"))

    @property
    def state_dir(self) -> Path | None:
        return _path(self.record.get("StateDir"))

    @property
    def vm_dir(self) -> Path | None:
        """Kata's directory of the VM (`<vm storage>/<id>`: sockets, the share)."""
        return _path(self.record.get("VMDir"))

    @property
    def max_vcpus(self) -> int:
        smp = self.record.get("QemuSMP")
        value = smp.get("MaxCPUs") if isinstance(smp, dict) else None
        return value if isinstance(value, int) and value > 0 else self.base.cpu

    @property
    def max_memory_mib(self) -> int | None:
        value = self.record.get("MaxMemory")
        return value if isinstance(value, int) and value > 0 else None

    @property
    def memory_slots(self) -> int | None:
        value = self.record.get("MemorySlots")
        return value if isinstance(value, int) else None

    @property
    def running(self) -> bool:
        """False once QEMU has exited (or we stopped watching it: detached, no pid)."""
        return self._proc is not None and self._proc.running

    @property
    def _exited(self) -> bool:
        return self._proc is not None and self._proc.exited.is_set()

    @property
    def detached(self) -> bool:
        return self._detached

    def as_json(self) -> dict[str, Any]:
        """`kata-vmcache get`'s JSON plus what the VM has now and where it came from."""
        out = {**self.base.as_json(), "vcpus": self.vcpus, "memoryMiB": self.memory_mib,
               "source": self.source}
        if self.reason:
            out["reason"] = self.reason
        return out

    # --- sessions ------------------------------------------------------------------------

    async def connect(self, *, guest: bool = False, timeout: float = 5.0) -> None:
        """Open our QMP session and, with `guest`, the guest's agent port."""
        await self._connect_qmp(timeout)
        if guest:
            await self._guest_channel(timeout)

    async def _connect_qmp(self, timeout: float) -> QMPClient:
        if self._qmp is not None:
            return self._qmp
        self._require_running()
        try:
            client = await open_session(self.qmp_path, f"vm-{self.id}", timeout)
        except TimeoutError:
            # QEMU accepts one QMP client at a time; a second one is accepted by the kernel
            # and then hears nothing, which looks exactly like a hung QEMU.
            raise VMDead(f"VM {self.id}: no QMP greeting on {self.qmp_path} within "
                         f"{timeout:g} s (QEMU hangs, or another client holds its QMP "
                         "connection)") from None
        except (QMPError, OSError) as exc:
            raise VMDead(f"VM {self.id}: cannot connect to QMP at {self.qmp_path}: "
                         f"{_cause(exc)}") from exc
        self._qmp = client
        return client

    async def _guest_channel(self, timeout: float = 5.0) -> GuestChannel:
        if self._guest is not None:
            return self._guest
        self._require_running()
        path = self.agent_path
        if path is None:
            raise VMStateError(f"VM {self.id}: the hand-off record names no agent port "
                               "(GuestChannelPath); the guest cannot be asked anything")
        try:
            self._guest = await GuestChannel.connect(path, timeout=timeout)
        except (GuestTimeout, OSError) as exc:
            raise VMDead(f"VM {self.id}: cannot connect to the guest's agent port "
                         f"{path}: {_cause(exc)}") from exc
        return self._guest

    async def execute(self, command: str, arguments: dict[str, object] | None = None,
                      *, timeout: float = 5.0) -> Any:
        """One QMP command on our session, bounded in time.

        VMDead when QEMU is gone or silent; VMStateError when QEMU refuses the command.
        """
        qmp = await self._connect_qmp(timeout)
        try:
            return await self._until_exit(qmp.execute(command, arguments), timeout,
                                          what=f"QMP {command!r}")
        except _OutOfTime as exc:
            raise VMDead(str(exc)) from None
        except ExecuteError as exc:
            raise VMStateError(f"VM {self.id}: QMP {command!r} failed: {exc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VMDead(f"VM {self.id}: QMP closed during {command!r}: "
                         f"{_cause(exc)}") from exc

    async def _until_exit(self, aw: Awaitable[T], timeout: float, *, what: str) -> T:
        """Await `aw` within `timeout`: VMDead at once if QEMU exits first, _OutOfTime
        (the callers say what it means) when the time is up."""
        self._require_running()
        task = asyncio.ensure_future(aw)
        # Without a pid (Kata's own server) there is no exit to watch: only the timeout.
        watch = self._proc.exited if self._proc is not None else asyncio.Event()
        exited = asyncio.ensure_future(watch.wait())
        try:
            done, _ = await asyncio.wait({task, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, exited):
                if not t.done():
                    t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exited
        if task in done:
            return task.result()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if exited in done:
            raise VMDead(f"VM {self.id}: QEMU {self.pid} exited during {what}")
        raise _OutOfTime(f"VM {self.id}: no answer to {what} within {timeout:g} s")

    def _require_running(self) -> None:
        if self._detached or self._stopped:
            raise VMStateError(f"VM {self.id} is {'detached' if self._detached else 'stopped'}"
                               "; this handle no longer controls it")
        if self._exited:
            raise VMDead(f"VM {self.id}: QEMU {self.pid} has exited")

    # --- guest ---------------------------------------------------------------------------

    async def resume(self) -> None:
        """QMP `cont`: the paused VM runs."""
        await self.execute("cont")

    async def wait_guest(self, timeout: float = 10.0) -> float:
        """Wait until the guest answers a ping (it sleeps on its own clock before it
        answers); return the round trip in seconds. GuestUnresponsive after `timeout`."""
        guest = await self._guest_channel()
        try:
            return await self._until_exit(guest.ping(timeout), timeout + 1.0,
                                          what="the guest's ping")
        except (GuestTimeout, _OutOfTime):
            raise GuestUnresponsive(
                f"VM {self.id}: the guest did not answer within {timeout:g} s (it hangs, "
                "or its clock is frozen)") from None
        except ConnectionError as exc:
            raise VMDead(f"VM {self.id}: the agent port closed: {exc}") from exc

    async def alive(self, timeout: float = 5.0) -> bool:
        """True when the guest answers a ping within `timeout` (its timers run)."""
        try:
            await self.wait_guest(timeout)
        except (GuestUnresponsive, VMDead):
            return False
        return True

    async def sync_guest(self, timeout: float = 5.0) -> None:
        """Set the guest's clock to now and mix fresh bytes into its random pool."""
        guest = await self._guest_channel()
        await self._guest_call(guest.set_time(timeout=timeout), timeout, "time")
        await self._guest_call(guest.seed(os.urandom(SEED_BYTES), timeout=timeout), timeout,
                               "seed")

    async def info(self, timeout: float = 5.0) -> GuestInfo:
        """What the guest itself sees: online CPUs, MemTotal, uptime."""
        guest = await self._guest_channel()
        return await self._guest_call(guest.info(timeout), timeout, "info")

    async def _guest_call(self, aw: Awaitable[T], timeout: float, what: str) -> T:
        try:
            return await self._until_exit(aw, timeout + 1.0, what=f"the guest's {what!r}")
        except (GuestTimeout, _OutOfTime) as exc:
            raise GuestUnresponsive(f"VM {self.id}: {exc}") from None
        except GuestError as exc:
            raise VMStateError(f"VM {self.id}: {exc}") from exc
        except ConnectionError as exc:
            raise VMDead(f"VM {self.id}: the agent port closed: {exc}") from exc

    # --- resources -----------------------------------------------------------------------

    async def query_resources(self) -> tuple[int, int]:
        """(vCPUs, memory in MiB) as QEMU counts them."""
        cpus = await self.execute("query-cpus-fast")
        summary = await self.execute("query-memory-size-summary")
        memory = int(summary["base-memory"]) + int(summary.get("plugged-memory", 0))
        return len(cpus), memory // MIB

    async def hotplug(self, *, cpus: int | None = None, memory_mib: int | None = None,
                      timeout: float = 30.0) -> None:
        """Grow the VM to `cpus` vCPUs and `memory_mib` MiB and have the guest online them
        (hotplug.py: the steps).

        The added memory must be whole memory blocks (hotplug.MEMORY_BLOCK_MIB).
        HotplugError when QEMU or the guest does not take a device, or the result is not
        what was asked.
        """
        cpus = self.vcpus if cpus is None else cpus
        memory_mib = self.memory_mib if memory_mib is None else memory_mib
        add_cpus, add_mib = growth(self, cpus, memory_mib)
        if not add_cpus and not add_mib:
            return
        started = time.monotonic()
        guest = await self._guest_channel()
        before = await self.info()
        qmp = await self._connect_qmp(5.0)
        devices: list[str] = []
        try:
            # Listen before plugging: the acknowledgement can come before device_add returns.
            with qmp.listener(("ACPI_DEVICE_OST",)) as events:
                if add_cpus:
                    devices += await plug_cpus(self, add_cpus)
                if add_mib:
                    devices.append(await plug_memory(self, add_mib))
                await self._until_exit(acknowledged(self.id, events, devices), timeout,
                                       what=f"the guest's acknowledgement of {devices}")
        except _OutOfTime:
            raise HotplugError(f"VM {self.id}: the guest did not acknowledge {devices} "
                               f"within {timeout:g} s") from None
        except VMDead:
            raise
        except VMStateError as exc:
            raise HotplugError(str(exc)) from exc
        after = await self._guest_call(guest.online(timeout), timeout, "online")
        qmp_cpus, qmp_mib = await self.query_resources()
        self.vcpus, self.memory_mib = qmp_cpus, qmp_mib
        check_result(self.id, cpus=cpus, memory_mib=memory_mib, qmp_cpus=qmp_cpus,
                     qmp_mib=qmp_mib, before=before, after=after, add_mib=add_mib)
        self.log.info("hot-added %d vCPUs and %d MiB in %.2f s: %d vCPUs, %d MiB",
                      add_cpus, add_mib, time.monotonic() - started, cpus, memory_mib)

    # --- the end -------------------------------------------------------------------------

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """qmp.py's stop sequence (QMP `quit` or SIGTERM, a bounded wait, SIGKILL); then
        remove the VM's state directory. Idempotent; also for a detached handle (the pidfd
        is then opened again)."""
        async with self._stop_lock:
            if self._stopped:
                return
            if self._detached:
                self._reattach()
            try:
                await self._close_guest()
                if self._proc is not None and self.running:
                    await stop_process(self._proc, timeout, quit=self._ask_quit, log=self.log)
                elif self.pid is None:
                    await self._ask_quit(timeout)  # nothing else we can do without a pid
            finally:
                await self._close_qmp()
                self._close_pidfd()
                stop_handed_out_proxy(self.base.proxy_pid, self.id)
                if isinstance(pid := self.record.get("VirtiofsdPid"), int) and self.vm_dir:
                    stop_handed_out_virtiofsd(pid, self.vm_dir / "shared")
                _remove_dirs(self.record)
                self._stopped = True

    async def _ask_quit(self, timeout: float) -> bool:
        return await ask_quit(self._qmp or self.qmp_path, timeout, name=f"vm-{self.id}")

    async def detach(self) -> None:
        """Stop controlling the VM without stopping it: close our QMP session (QEMU serves
        one client at a time) and the agent port; the VM runs on, the caller's to manage."""
        if self._stopped or self._detached:
            return
        self._detached = True
        await self._close_guest()
        await self._close_qmp()
        self._close_pidfd()

    def _reattach(self) -> None:
        pid = self.pid
        if pid is not None and not self._exited:
            self._proc = _open_ours(pid, self.id)
        self._detached = False

    def _close_pidfd(self) -> None:
        if self._proc is not None:
            self._proc.close()

    async def _close_qmp(self) -> None:
        if self._qmp is not None:
            client, self._qmp = self._qmp, None
            await disconnect(client)

    async def _close_guest(self) -> None:
        if self._guest is not None:
            guest, self._guest = self._guest, None
            await guest.close()


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def _open_ours(pid: int, vm_id: str) -> Pidfd | None:
    """VM vm_id's QEMU at `pid` through a pidfd, or None when that is not (any more) it."""
    return Pidfd.of_pid(pid, check=lambda p: is_vm_qemu(p, vm_id))


def _remove_dirs(record: dict[str, Any]) -> None:
    """What a stopped VM leaves: Kata's directory of it (as Kata's own stop removes it,
    qemu.go cleanupVM), its proxy's, and the server's record of it."""
    for key in ("VMDir", "SandboxDir", "StateDir"):
        _remove_dir(record.get(key))


def _remove_dir(path: object) -> None:
    if isinstance(path, str | Path) and str(path):
        shutil.rmtree(path, ignore_errors=True)


def _cause(exc: BaseException) -> str:
    """The innermost reason: qemu.qmp wraps OSError in ConnectError."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__
