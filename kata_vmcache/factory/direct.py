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
import logging
import os
import shutil
import time
from typing import Literal

from ..config import Config
from ..errors import GuestNotReady, LaunchError
from ..probe import NoProbe, ReadinessProbe, SerialLineProbe
from ..qemu import VMSpec
from ..vm import VM, VMState

log = logging.getLogger(__name__)


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accelerator(setting: str) -> Literal["kvm", "tcg"]:
    if setting == "kvm":
        return "kvm"
    if setting == "tcg":
        return "tcg"
    return "kvm" if kvm_usable() else "tcg"


def spec_from_config(config: Config, accelerator: Literal["kvm", "tcg"]) -> VMSpec:
    h = config.hypervisor
    return VMSpec(
        qemu=h.path,
        kernel=h.kernel,
        initrd=h.initrd,
        image=h.image,
        machine_type=h.machine_type,
        kernel_params=h.kernel_params,
        vcpus=h.vcpus,
        max_vcpus=h.max_vcpus,
        memory_mib=h.memory_mib,
        memory_slots=h.memory_slots,
        max_memory_mib=config.max_memory_mib,
        accelerator=accelerator,
    )


def booted(vm: VM, started: float) -> None:
    """The end of a successful boot (paused, guest ready): ready, with its hand-off data."""
    vm.boot_seconds = time.monotonic() - started
    vm.prepare_handoff()
    vm.transition(VMState.READY)


async def abandon(vm: VM, why: BaseException, stop_timeout: float) -> None:
    """The end of a failed boot: failed (with why), QEMU stopped, its directory gone."""
    if vm.state is VMState.BOOTING:
        vm.transition(VMState.FAILED, str(why) or type(why).__name__)
    await vm.process.stop(stop_timeout)
    remove_vm_dir(vm)


def remove_vm_dir(vm: VM) -> None:
    shutil.rmtree(vm.paths.dir, ignore_errors=True)


class DirectFactory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.auto = config.daemon.accelerator == "auto"
        self.spec = spec_from_config(config, resolve_accelerator(config.daemon.accelerator))
        self.state_dir = config.daemon.state_dir

    @property
    def accelerator(self) -> str:
        return self.spec.accelerator

    def create(self) -> VM:
        return VM(self.spec, self.state_dir, log=log)

    def _probe(self) -> ReadinessProbe:
        if self.config.daemon.ready_probe == "none":
            return NoProbe()
        return SerialLineProbe(self.config.daemon.ready_line)

    async def boot(self, vm: VM) -> None:
        """booting -> ready (paused, QMP held); on failure the VM is stopped and removed."""
        vm.require(VMState.BOOTING)
        started = time.monotonic()
        timeout = self.config.daemon.ready_timeout
        probe = self._probe()
        try:
            await vm.process.start()
            vm.write_record()
            await probe.attach(vm.paths)
            await vm.process.execute("cont")
            await self._wait_ready(vm, probe, timeout)
            await vm.process.execute("stop")
            booted(vm, started)
        except BaseException as exc:
            await abandon(vm, exc, self.config.daemon.stop_timeout)
            raise
        finally:
            await probe.close()

    async def _wait_ready(self, vm: VM, probe: ReadinessProbe, timeout: float) -> None:
        ready = asyncio.ensure_future(probe.wait())
        exited = asyncio.ensure_future(vm.process.wait())
        try:
            done, _ = await asyncio.wait({ready, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, exited):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await ready
            with contextlib.suppress(asyncio.CancelledError):
                await exited
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
        if ready in done:
            raise LaunchError(f"guest readiness probe failed: {ready.exception()}",
                              argv=vm.process.argv)
        raise self._not_ready(vm, probe, timeout)

    def _not_ready(self, vm: VM, probe: ReadinessProbe, timeout: float) -> GuestNotReady:
        accel = self.spec.accelerator
        said = getattr(probe, "seen", [])
        hint = ""
        if accel == "kvm":
            hint = ("; guests hang under KVM on some hosts: set accelerator = \"tcg\" "
                    "in [vmcache] if this keeps happening")
            if self.auto and not said:
                self.spec = spec_from_config(self.config, "tcg")
                log.warning("accelerator auto: the guest did not come up under KVM in %g s; "
                            "using TCG for the next boots", timeout)
        elif accel == "tcg":
            hint = "; under TCG (software emulation) boots are slow: raise ready_timeout"
        last = f" (last guest output: {said[-1].decode(errors='replace')!r})" if said else ""
        return GuestNotReady(f"guest not ready after {timeout:g} s under {accel.upper()}"
                             f"{last}{hint}", argv=vm.process.argv)
