"""A VM as the daemon sees it: its state, its record on disk, its hand-off record.

States:

    booting ──> ready (paused, in the pool) ──> handed_off
       │            │
       ├──> failed  └──> dead          (any state but handed_off ──> dead when QEMU exits)
       └──> dead

Only `ready` VMs are handed out, each exactly once. One way back exists: a hand-off whose
reply the client never received (it cancelled or vanished while the reply was being
written) returns the VM to `ready` (`take_back`). Transitions are guarded: asking for one
the state machine does not allow raises `VMStateError` naming the current and the required
state, the way qemu.qmp's `@require` does.

Each VM has a directory under `<state_dir>/vms/<id>/` with QEMU's sockets, its log and
`vm.json`, rewritten atomically on every transition. A daemon restarted after a crash reads
those records (records.py) to stop the VMs it still owned and to leave handed-off VMs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import os
import shutil
import threading
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from ..errors import VMStateError
from .companion import Companion
from .devices import BRIDGE_CAPACITY, BRIDGE_START_ADDR
from .handoff import HandOff
from .paths import VMPaths
from .priority import Level, promote
from .process import VMProcess
from .qemu import QemuProcess
from .spec import MemoryBackend, VMSpec


class VMState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    HANDED_OFF = "handed_off"
    DEAD = "dead"
    FAILED = "failed"


_ALLOWED: dict[VMState, frozenset[VMState]] = {
    VMState.BOOTING: frozenset({VMState.READY, VMState.FAILED, VMState.DEAD}),
    VMState.READY: frozenset({VMState.HANDED_OFF, VMState.DEAD}),
    VMState.HANDED_OFF: frozenset(),
    VMState.DEAD: frozenset(),
    VMState.FAILED: frozenset({VMState.DEAD}),
}


def new_vm_id() -> str:
    # Short: the id is part of socket paths, and sun_path holds 107 bytes.
    return uuidlib.uuid4().hex[:12]


class VM:
    """One VM owned by the daemon, from launch until it is handed off or dead."""

    def __init__(self, spec: VMSpec, *, state_dir: Path, vm_storage: Path,
                 log: logging.Logger, template: str | None = None,
                 memory: MemoryBackend = "ram", memory_path: Path | None = None,
                 cid: int | None = None, incoming: bool = False) -> None:
        self.id = new_vm_id()
        self.uuid = str(uuidlib.uuid4())
        self.spec = spec
        self.paths = VMPaths.for_vm(self.id, vm_storage=vm_storage, state_dir=state_dir)
        self.log = log.getChild(self.id)
        self.template = template
        self.cid = cid
        self.state = VMState.BOOTING
        self.history: list[VMState] = [VMState.BOOTING]
        self.reason = ""
        self.created = time.time()
        self.boot_seconds: float | None = None
        self._handoff: HandOff | None = None
        #: Kata 1.x's kata-proxy for this VM, once started (`proxy.KataProxy`).
        self.proxy: Any = None
        #: The virtiofsd of a virtio-fs VM, once started (`virtiofsd.Virtiofsd`).
        self.virtiofsd: Any = None
        # memory, memory_path: Kata's templating (the template VM's shared RAM file, or a
        # clone's private mapping of it).
        self.process: VMProcess = QemuProcess(
            spec.argv(self.id, self.uuid, self.paths, memory=memory, memory_path=memory_path,
                      cid=cid, incoming=incoming),
            self.paths, log=self.log, on_exit=self._qemu_exited)
        self.process.on_end(self._qemu_ended)
        self._exit_listeners: list[Any] = []
        #: vm.json as it was when the handed-off record was prepared, held open so that the
        #: hand-off's rename does not free it (prepare_handed_off_record); a worker thread
        #: may set it while the loop replaces it, hence the lock.
        self._held_record: int | None = None
        self._held_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<VM {self.id} {self.state.value} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid

    # state machine

    def require(self, *states: VMState) -> None:
        if self.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise VMStateError(f"VM {self.id} is {self.state.value}, needs to be {wanted}")

    def transition(self, new: VMState, reason: str = "") -> None:
        if new not in _ALLOWED[self.state]:
            raise VMStateError(f"VM {self.id}: cannot go from {self.state.value} "
                               f"to {new.value}")
        if new is VMState.READY and self._handoff is None:
            raise VMStateError(f"VM {self.id}: cannot be ready without its hand-off record "
                               "(prepare_handoff)")
        self.state = new
        self.history.append(new)
        if reason:
            self.reason = reason
        self.write_record()

    def take_back(self, reason: str) -> None:
        """handed_off -> ready, for a hand-off whose reply never reached the client.

        Not in the transition table on purpose: a handed-off VM is the client's, and only
        the hand-off itself, having proof that its reply was not written, may undo it."""
        self.require(VMState.HANDED_OFF)
        self.state = VMState.READY
        self.history.append(VMState.READY)
        self.reason = reason
        self.write_record()

    def on_exit(self, callback: Any) -> None:
        """Call `callback(vm)` when QEMU exits while we own the VM, or at once if it has
        died already: a listener added late misses no death."""
        self._exit_listeners.append(callback)
        if self.state is VMState.DEAD:
            callback(self)

    def _qemu_exited(self, returncode: int) -> None:
        if self.virtiofsd is not None:
            self.virtiofsd.expect_exit()  # it exits once QEMU's connection closes
        if self.state in (VMState.BOOTING, VMState.READY, VMState.FAILED):
            self.log.debug("QEMU %s exited with %s while %s", self.pid, returncode,
                           self.state.value)
            self.transition(VMState.DEAD, f"QEMU exited with code {returncode}")
            for callback in self._exit_listeners:
                callback(self)

    def virtiofsd_exited(self, returncode: int | None) -> None:
        """A ready VM whose virtiofsd exited has a share no guest can use: dead now, like
        one whose QEMU exited, so it is out of the pool and replaced at once (its QEMU is
        stopped with it). Kata 1.x stops the VM the same way (qemu.go setupVirtiofsd). A
        booting VM's boot sees it itself (DirectFactory.wait_ready)."""
        if self.state is VMState.READY:
            self.transition(VMState.DEAD, f"its virtiofsd exited with code {returncode}")
            for callback in self._exit_listeners:
                callback(self)

    def _qemu_ended(self) -> None:
        if self.state is VMState.HANDED_OFF:
            # Its receiver has stopped it (QEMU is our child, so we see it go): what is
            # left of its directories and our record of it is nobody's now. Kata's own
            # stop removes the VM's directory itself (qemu.go cleanupVM); a client that
            # crashed does not.
            self.log.info("handed-out VM's QEMU %s has exited; removing its files", self.pid)
            # Its companions served that QEMU alone, and their sockets go with the files: a
            # receiver that never stopped them (Kata 1.x's vm.Stop() leaves the kata-proxy)
            # would leave them running for nothing. They are still our children.
            for companion in self.companions:
                companion.end_with_qemu()
            self.remove_dirs()

    # the VM's processes: QEMU and its companions (Kata 1.x's kata-proxy, virtiofsd)

    @property
    def companions(self) -> list[Companion]:
        """The processes that go with QEMU: stopped with it, handed out with it."""
        return [c for c in (self.virtiofsd, self.proxy) if c is not None]

    def problem_now(self) -> str | None:
        """Why the VM cannot be handed out right now (synchronous, for the hand-off)."""
        problem = self.process.problem_now()
        for companion in self.companions:
            if problem is None:
                problem = companion.problem_now()
        return problem

    @property
    def priority(self) -> Level:
        """The CPU priority its processes are launched at (priority.py): set before the
        boot, "idle" for a VM booted ahead of demand."""
        return self.process.priority

    @priority.setter
    def priority(self, level: Level) -> None:
        self.process.priority = level

    def promote(self) -> None:
        """Normal priority for every thread of its QEMU and proxy, and for what it launches
        from now on (a caller waits for it, or it is being handed out)."""
        if self.process.priority == "normal":
            return
        self.process.priority = "normal"
        promote(self.process.pid if self.process.running else None,
                *(c.pid for c in self.companions if c.running))

    def release_idle(self) -> None:
        """Hand out QEMU and its companions: none is signalled by us again."""
        self.process.release_idle()
        for companion in self.companions:
            companion.release()

    async def reclaim(self, timeout: float = 1.0) -> str:
        """Take back a released VM whose hand-off reply was never written, and say what
        state its QEMU is in ("paused", ...), asked on the connection that reclaimed it
        (`QemuProcess.reclaim`). VMDead when QEMU is gone or does not answer."""
        status = await self.process.reclaim(timeout)
        for companion in self.companions:
            companion.reclaim()
        return status

    async def stop(self, timeout: float) -> None:
        """QEMU (QMP quit, bounded wait, SIGKILL), then its companions (a virtiofsd
        usually exits by itself once QEMU's connection closes); all reaped on return.
        A no-op for what was handed out."""
        for companion in self.companions:
            companion.expect_exit()
        await self.process.stop(timeout)
        for companion in self.companions:
            await companion.stop(timeout)

    async def kill(self) -> None:
        """SIGKILL QEMU now (it stopped answering), then stop its companions."""
        for companion in self.companions:
            companion.expect_exit()
        await self.process.kill()
        for companion in self.companions:
            companion.reclaim()  # the caller decided: even a released companion goes
            await companion.stop(1.0)

    def remove_dirs(self) -> None:
        """Kata's directory of the VM, its proxy's, and ours: for a VM the daemon stopped
        (never for one handed out whose QEMU still runs: those are the client's)."""
        for path in (self.paths.dir, self.paths.sandbox, self.paths.own):
            shutil.rmtree(path, ignore_errors=True)
        _close(self._hold_record(None))

    # records

    def _record(self, state: VMState) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": state.value,
            "pid": self.pid,
            "owner_pid": os.getpid(),
            "uuid": self.uuid,
            "created": self.created,
            # Kata's directory of this VM, and where its kata-proxy listens: a restarted
            # daemon removes them only for VMs it still owned, or whose QEMU is gone.
            "vm_dir": str(self.paths.dir),
            "sandbox_dir": str(self.paths.sandbox),
            "proxy_pid": self.proxy.pid if self.proxy is not None else None,
            "virtiofsd_pid": self.virtiofsd.pid if self.virtiofsd is not None else None,
            "qmp": str(self.paths.qmp),
        }

    def claim(self) -> None:
        """Write the VM's first record ("booting", no pid yet) before its QEMU is launched:
        a daemon that dies at any moment after the launch leaves a record saying the VM
        was ours and never handed out, so its successor may stop it. A VM whose record is
        missing or damaged while its QEMU runs is then not ours to judge (recovery)."""
        self.paths.own.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.write_record()

    def write_record(self) -> None:
        """vm.json, written in full, flushed, then renamed over the old one: a crash (or
        power loss) at any moment leaves the old record or the new one, never half of one.
        The hand-off only renames the record `prepare_handed_off_record()` wrote ahead, and
        leaves the record it replaces to `close_replaced_record()`; any other write lets go
        of the record held for the hand-off at once (it has just been replaced).

        A record that cannot be written (a full disk) fails a boot or a hand-off; for a VM
        that is over (dead, failed) it is only logged: its files are removed next, and
        nothing must stop its QEMU being stopped."""
        try:
            self._write_record()
        except OSError as exc:
            if self.state not in (VMState.DEAD, VMState.FAILED):
                raise
            # Debug only: the failure that caused this is reported once, by the cache.
            self.log.debug("cannot record VM %s as %s in %s: %s", self.id,
                           self.state.value, self.paths.record, exc.strerror or exc)

    def _write_record(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.state is VMState.HANDED_OFF:
                try:
                    os.rename(self._handed_off_path, self._record_path)
                    return
                except FileNotFoundError:
                    pass  # not prepared (or used already): write it now
                    # (what it replaces is held still: close_replaced_record() frees it)
            tmp = self.paths.record.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, json.dumps(self._record(self.state)).encode())
                os.fsync(fd)
            except OSError as exc:  # name the file: os.write() does not
                raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
            finally:
                os.close(fd)
            os.rename(tmp, self.paths.record)
        if self.state is not VMState.HANDED_OFF:
            _close(self._hold_record(None))

    def _hold_record(self, fd: int | None) -> int | None:
        """Hold `fd` (or nothing) as the record a hand-off will replace; returns the one
        held before, for the caller to close."""
        with self._held_lock:
            old, self._held_record = self._held_record, fd
        return old

    def close_replaced_record(self) -> None:
        """Free the record the hand-off's rename replaced, in a worker thread: freeing a file
        costs some file systems milliseconds (ext4 here: 0.5-4 ms, the inode and its block),
        which is why the rename did not. Called once the reply is out (VMCache.delivered)."""
        fd = self._hold_record(None)
        if fd is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _close(fd)
            return
        loop.run_in_executor(None, _close, fd)

    @functools.cached_property
    def _handed_off_path(self) -> str:
        return str(self.paths.record.with_suffix(".handed_off"))

    @functools.cached_property
    def _record_path(self) -> str:
        return str(self.paths.record)

    def prepare_handed_off_record(self) -> None:
        """Write the record this VM will have once handed off, and flush it to disk, so
        the hand-off's record update is one rename. Blocking (fsync): run it in a thread.

        Why flush: ext4 (auto_da_alloc) writes out a file's unwritten data when a rename
        makes it replace another, so renaming a freshly written record costs the hand-off
        a disk write (0.3-0.7 ms measured here); a flushed one renames in microseconds.

        Why hold vm.json open: a rename that replaces a file frees it, unless someone still
        has it open, and freeing a file is what costs ext4 time (0.5-4 ms here, against
        0.07 ms for the rename of a file someone holds: bench/README.md, "The hand-off
        profile"). The hand-off's rename then replaces a file still held, and
        `close_replaced_record()` frees it after the reply. Only a saving: a descriptor
        that cannot be had changes nothing else.
        """
        data = json.dumps(self._record(VMState.HANDED_OFF)).encode()
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self._handed_off_path,
                         os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        try:
            held: int | None = os.open(self._record_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            held = None
        _close(self._hold_record(held))

    def hypervisor_record(self) -> dict[str, Any]:
        """Kata's qemu hand-off record (virtcontainers/qemu.go `qemuGrpc`: ID,
        QmpChannelpath, State, NvdimmCount, QemuSMP) plus ours.

        State.Bridges lists the VM's PCI bridges as Kata's `types.Bridge` (its receiver
        hot-plugs devices onto them: an empty list would leave it nowhere to plug a
        disk); HotplugVFIOOnRootBus and PCIeRootPort are what Kata's setup() copies from
        the file. Kata ignores the keys it does not know; our client reads them (pid, our
        serial console and guest channel, directories, hot-plug limits).
        """
        s = self.spec
        virtiofsd_pid = (self.virtiofsd.pid or 0) if self.virtiofsd is not None else 0
        return {
            "ID": self.id,
            "QmpChannelpath": str(self.paths.qmp),
            "State": {
                "Bridges": [{"Devices": {}, "ID": bridge, "Addr": addr, "Type": "pci",
                             "MaxCapacity": BRIDGE_CAPACITY}
                            for addr, bridge in enumerate(s.bridge_ids,
                                                          start=BRIDGE_START_ADDR)],
                "HotpluggedVCPUs": [],
                "HotpluggedMemory": 0,
                "UUID": self.uuid,
                "HotplugVFIOOnRootBus": s.hotplug_vfio_on_root_bus,
                # Kata 1.x's receiver lists it among the VM's pids (getPids: cgroups).
                "VirtiofsdPid": virtiofsd_pid if s.generation == "1.x" else 0,
                # Kata 3.x's is left 0 on purpose: its fromGrpc restores the pid but not
                # the virtiofsd handle that StopVM stops through (qemu.go
                # stopVirtiofsDaemon), so a pid here would make its StopVM call a method
                # on a nil interface. At 0 it logs "The virtiofsd had stopped", and ours
                # exits by itself once that QEMU's connection closes.
                "VirtiofsDaemonPid": 0,
                "PCIeRootPort": s.pcie_root_port,
            },
            "NvdimmCount": 1 if s.nvdimm_image else 0,
            "QemuSMP": {
                "CPUs": s.vcpus,
                "Cores": 1,
                "Threads": 1,
                "Sockets": s.max_vcpus,
                "MaxCPUs": s.max_vcpus,
            },
            "Pid": self.pid,
            "VirtiofsdPid": virtiofsd_pid,
            "ConsolePath": str(self.paths.serial if s.own_serial else self.paths.console),
            "GuestChannelPath": str(self.paths.guest) if s.own_serial else "",
            "KataAgentPath": str(self.paths.agent) if s.agent_channel == "serial" else "",
            "VsockCID": self.cid or 0,
            "VMDir": str(self.paths.dir),
            "SandboxDir": str(self.paths.sandbox),
            "StateDir": str(self.paths.own),
            "MaxMemory": max(s.max_memory_mib, s.memory_mib),
            "MemorySlots": s.memory_slots,
            # A clone of a template: whoever resumes it should give the guest the time and
            # fresh entropy (every clone starts with the template's clock and random pool).
            "FromTemplate": self.template is not None,
        }

    def prepare_handoff(self) -> None:
        """Make the hand-off record, and its wire form, now that the VM is about to be
        ready (its QEMU and proxy run): the hand-off itself only sends it."""
        proxy = self.proxy
        handoff = HandOff(self.id, self.spec.vcpus, self.spec.memory_mib, 0,
                          self.hypervisor_record(),
                          proxy_pid=(proxy.pid or 0) if proxy is not None else 0,
                          proxy_url=proxy.url if proxy is not None else "")
        handoff.message  # noqa: B018 (made now, off the hand-off's path)
        self._handoff = handoff

    @property
    def handoff(self) -> HandOff:
        """What GetBaseVM hands over (handoff.py), made once when the VM became ready:
        every VM that is or was ready has one (`transition` refuses `ready` without)."""
        if self._handoff is None:
            raise VMStateError(f"VM {self.id} is {self.state.value}: no hand-off record yet")
        return self._handoff


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
