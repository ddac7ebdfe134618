"""Boot one VM straight from the configuration (Kata's `direct` factory).

`boot()` takes a VM from `booting` to `ready`: launch QEMU with its CPUs stopped, attach the
readiness probe, `cont`, wait for the guest's signal within `ready_timeout`, `stop`. On any
failure the VM is stopped and its directory removed before the error propagates: a failed
boot leaks nothing.

Accelerator `auto` picks KVM when /dev/kvm can be opened, else TCG. Some hosts have a
/dev/kvm under which guests hang (this project's build machine is one), so when an `auto`
boot under KVM times out without the guest ever signalling, the factory says so in a
warning and uses TCG from then on, rather than leave the user with a silent hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import GuestNotReady, LaunchError
from ..vm.devices import (
    AGENT_VSOCK_PORT,
)
from ..vm.owned import VM, VMState
from ..vm.probe import KataAgentProbe, KataTtrpcProbe, ReadinessProbe, SerialLineProbe
from ..vm.proxy import KataProxy
from ..vm.spec import Accelerator
from ..vm.ttrpc import VsockAddress
from ..vm.virtiofsd import (
    Virtiofsd,
)
from .host import resolve_accelerator
from .spec import VIRTIO_FS, proxy_path, spec_from_config

log = logging.getLogger(__name__)

#: The agent probe's own deadline is past ready_timeout: the boot's bound decides, and
#: says so as a boot that timed out, not as a failed call.
PROBE_DEADLINE_MARGIN = 1.0


def booted(vm: VM, started: float, *, paused: bool = True) -> None:
    """The end of a successful boot (guest ready; paused unless `paused` says otherwise):
    ready, with its hand-off data. Paused, it needs no CPU: back at normal priority before
    its record says ready (priority.py)."""
    vm.boot_seconds = time.monotonic() - started
    if paused:
        vm.promote()
    vm.prepare_handoff()
    vm.transition(VMState.READY)


async def abandon(vm: VM, why: BaseException, stop_timeout: float) -> None:
    """The end of a failed boot: failed (with why), QEMU and its proxy stopped, its
    directories gone. Stopping depends on nothing on disk: a failure to write (a full
    disk) must not leave a QEMU running."""
    try:
        if vm.state is VMState.BOOTING:
            # Recorded first (with why), then stopped; a record that cannot be written
            # (a full disk) is only logged for a failed VM, so the stop always follows.
            vm.transition(VMState.FAILED, str(why) or type(why).__name__)
    finally:
        await vm.stop(stop_timeout)
        vm.remove_dirs()


class VsockCids:
    """Guest CIDs for the VMs' vhost-vsock devices: unique among ours, random start (as
    Kata's FindContextID, so two daemons rarely collide; QEMU refuses a CID in use, and
    that boot fails and the next one gets another)."""

    FIRST, LAST = 3, 0xFFFFFFFE

    def __init__(self) -> None:
        self._next = secrets.randbelow(self.LAST - self.FIRST) + self.FIRST
        self._used: set[int] = set()

    def take(self) -> int:
        while self._next in self._used:
            self._next = self._next + 1 if self._next < self.LAST else self.FIRST
        cid = self._next
        self._used.add(cid)
        return cid

    def give_back(self, cid: int | None) -> None:
        if cid is not None:
            self._used.discard(cid)


class DirectFactory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.auto = config.daemon.accelerator == "auto"
        self.spec = spec_from_config(config, resolve_accelerator(config.daemon.accelerator))
        self.state_dir = config.daemon.state_dir
        self.vm_storage = config.daemon.vm_storage_path
        self.proxy = proxy_path(config)
        self.cids = VsockCids()
        hv = config.kata_hypervisor
        #: What each VM's virtiofsd is started with (virtio-fs only).
        self.virtiofsd: dict[str, Any] | None = None
        if self.spec.shared_fs == VIRTIO_FS:
            self.virtiofsd = {
                "binary": Path(hv["VirtioFSDaemon"]), "cache": hv["VirtioFSCache"],
                "debug": hv["Debug"], "extra_args": list(hv["VirtioFSExtraArgs"] or ()),
                "guest_selinux": not hv.get("DisableGuestSeLinux", True)}

    # the Factory protocol (factory/__init__.py), besides create() and boot()

    @property
    def accelerator(self) -> str:
        return self.spec.accelerator

    def use_accelerator(self, accelerator: Accelerator) -> None:
        if accelerator != self.spec.accelerator:
            self.spec = dataclasses.replace(self.spec, accelerator=accelerator)

    def template_bytes(self) -> int:
        return 0

    def status_metadata(self) -> list[tuple[str, str]]:
        return []

    async def close(self) -> None:
        pass  # nothing beyond its VMs, which the pool stops

    def create(self, **template: Any) -> VM:
        """A VM to boot (not started yet); `template` are templating's VM arguments."""
        cid = self.cids.take() if self.spec.agent_channel == "vsock" else None
        vm = VM(self.spec, state_dir=self.state_dir, vm_storage=self.vm_storage, log=log,
                cid=cid, **template)
        if cid is not None:
            # A CID is ours until the VM is handed out (then its receiver's, until QEMU
            # exits) or gone.
            vm.process.on_end(lambda: self.cids.give_back(cid))
        return vm

    def probe_for(self, vm: VM) -> ReadinessProbe:
        if self.config.daemon.ready_probe == "serial":
            return SerialLineProbe(self.config.daemon.ready_line)
        timeout = self.config.daemon.ready_timeout
        if vm.proxy is not None:
            return KataAgentProbe(vm.proxy.url, timeout + PROBE_DEADLINE_MARGIN)
        if self.config.daemon.kata_version == "3.x":
            # Kata 3.x's agent speaks ttrpc on its vsock port (kata_agent.go agentURL:
            # vsock://<cid>:1024); check_host refuses a 3.x agent on a host without vsock.
            if vm.cid is None:
                raise LaunchError(f"VM {vm.id} has no vsock device: Kata 3.x's agent is "
                                  "reached over vsock only", argv=vm.process.argv)
            return KataTtrpcProbe(VsockAddress(vm.cid, AGENT_VSOCK_PORT))
        # Kata 1.x's agent URL over vsock (kata_agent.go agentURL: vsock://<cid>:<port>),
        # in gRPC's own spelling of a vsock target.
        return KataAgentProbe(f"vsock:{vm.cid}:{AGENT_VSOCK_PORT}",
                              timeout + PROBE_DEADLINE_MARGIN)

    def start_virtiofsd(self, vm: VM) -> None:
        """qemu.go (1.x startSandbox, 3.x StartVM): virtiofsd on its listener, just before
        QEMU, which connects to it at start-up."""
        if self.virtiofsd is None:
            return
        vm.virtiofsd = Virtiofsd(generation=self.spec.generation, paths=vm.paths,
                                 log=vm.log, **self.virtiofsd)
        vm.virtiofsd.on_exit(vm.virtiofsd_exited)
        vm.virtiofsd.start(vm.priority)
        vm.write_record()

    def start_proxy(self, vm: VM) -> None:
        """Kata 1.x's setupProxy: once QEMU has created kata.sock, before the agent check."""
        if self.proxy is None:
            return
        kata_proxy = self.config.kata_proxy
        vm.proxy = KataProxy(self.proxy, vm.id, vm.paths, debug=bool(kata_proxy["Debug"]),
                             log=vm.log)
        vm.proxy.start(vm.priority)
        vm.write_record()

    async def boot(self, vm: VM, *, pause: bool = True) -> None:
        """booting -> ready (paused, guest ready; still running with `pause=False`, for
        the template, which disconnects from its agent first); on failure the VM is stopped
        and removed."""
        vm.require(VMState.BOOTING)
        started = time.monotonic()
        timeout = self.config.daemon.ready_timeout
        probe = None
        try:
            vm.claim()
            self.start_virtiofsd(vm)
            await self.start_qemu(vm)
            vm.write_record()
            self.start_proxy(vm)
            probe = self.probe_for(vm)
            await probe.attach(vm.paths)
            await vm.process.execute("cont")
            await self.wait_ready(vm, probe, timeout)
            if isinstance(probe, KataAgentProbe | KataTtrpcProbe):
                # Said before the VM's record can say ready: a reader of both sees them in order.
                vm.log.info("the agent answered its health check (%s)", probe.answer)
            if pause:
                await vm.process.execute("stop")
            booted(vm, started, paused=pause)
        except BaseException as exc:
            await abandon(vm, exc, self.config.daemon.stop_timeout)
            raise
        finally:
            if probe is not None:
                await probe.close()

    async def start_qemu(self, vm: VM) -> None:
        """QEMU's start; when it fails because its virtiofsd has exited (QEMU then cannot
        connect to the vhost-user socket), virtiofsd's own reason is the boot's."""
        try:
            await vm.process.start()
        except LaunchError as exc:
            code = vm.virtiofsd.returncode_now() if vm.virtiofsd is not None else None
            if code is None:
                raise
            # Started with --syslog, as Kata starts it: its reasons are in the journal.
            said = vm.virtiofsd.last_words() or "its reasons went to syslog (journalctl -t " \
                "virtiofsd)"
            raise LaunchError(f"virtiofsd exited with {code} before QEMU connected: {said}",
                              argv=vm.virtiofsd.argv) from exc

    async def wait_ready(self, vm: VM, probe: ReadinessProbe, timeout: float) -> None:
        """The guest's signal (`probe`) within `timeout`; LaunchError as soon as QEMU or
        one of the VM's companions (kata-proxy, virtiofsd) exits, GuestNotReady at the
        timeout."""
        ready = asyncio.ensure_future(probe.wait())
        exited = asyncio.ensure_future(vm.process.wait())
        # A kata-proxy that exits leaves the agent unreachable, a virtiofsd the share:
        # the boot fails now, not at its timeout.
        gone = {asyncio.ensure_future(c.wait()): c for c in vm.companions}
        watched = {ready, exited, *gone}
        try:
            done, _ = await asyncio.wait(watched, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watched:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
            for task in watched - {ready}:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if ready in done and not ready.cancelled() and ready.exception() is None:
            return
        if ready in done:
            # The guest's serial port closing is usually QEMU exiting (a guest panic with
            # -no-reboot); its exit code and log say more than the closed port does.
            await vm.process.wait(1.0)
        if exited in done or not vm.process.running:
            raise LaunchError("QEMU exited before the guest was ready", argv=vm.process.argv,
                              returncode=vm.process.returncode,
                              log_tail=vm.process.log_tail())
        for task, companion in gone.items():
            if task in done:
                said = companion.last_words()
                awaited = "the agent answered" if companion is vm.proxy else "the guest was ready"
                raise LaunchError(f"{companion.what} exited with {companion.returncode} before "
                                  f"{awaited}{': ' + said if said else ''}",
                                  argv=companion.argv)
        if ready in done:
            raise LaunchError(f"guest readiness probe failed: {ready.exception()}",
                              argv=vm.process.argv)
        heard = probe.seen
        if self.spec.accelerator == "kvm" and self.auto and not heard:
            self._fall_back_to_tcg(timeout)
        raise not_ready(vm, heard, timeout)

    def _fall_back_to_tcg(self, timeout: float) -> None:
        """Accelerator auto, and a guest that never said a word under KVM: the hosts where
        guests hang under KVM (this project's build machine) get TCG from now on."""
        self.use_accelerator("tcg")
        log.warning("accelerator auto: the guest did not come up under KVM in %g s; "
                    "using TCG for the next boots", timeout)


def not_ready(vm: VM, said: list[bytes], timeout: float) -> GuestNotReady:
    """The error of a boot whose guest did not signal within `timeout`: what it last said,
    and what to do about it under the VM's accelerator."""
    accel = vm.spec.accelerator
    hint = ""
    if accel == "kvm":
        hint = ("; guests hang under KVM on some hosts: set accelerator = \"tcg\" "
                "in [vmcache] if this keeps happening")
    elif accel == "tcg":
        hint = "; under TCG (software emulation) boots are slow: raise ready_timeout"
    last = f" (last guest output: {said[-1].decode(errors='replace')!r})" if said else ""
    return GuestNotReady(f"guest not ready after {timeout:g} s under {accel.upper()}"
                         f"{last}{hint}", argv=vm.process.argv)
