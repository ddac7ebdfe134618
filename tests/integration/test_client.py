"""The client side on real QEMU and a real daemon: `get_vm()` takes a cached VM, resumes it,
hot-adds vCPUs and memory and proves the guest alive; a request that does not fit the cache
is booted directly; a failure after the VM is taken leaves nothing running; and the same
through `kata-vmcache get --resume` as a user runs it.

Every VM a test gets is stopped by its handle (or, for the CLI, by pid through the harness);
the suite's leak guard fails any test that leaves a QEMU behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmcache.client.rpc import BaseVM, CacheClient
from kata_vmcache.config import Config, load
from kata_vmcache.demo.config import render_config
from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.errors import VMDead
from kata_vmcache.getvm import get_vm
from kata_vmcache.procs import cmdline, pid_alive
from kata_vmcache.shape import VMShape
from kata_vmcache.sync import SyncCacheClient
from kata_vmcache.vm.guest_channel import GuestChannel

from .harness import Daemon, absent, console_run, exited, qmp, run_cli, wait_for

pytestmark = pytest.mark.qemu

MIB = 1024 * 1024


def config_of(daemon: Daemon) -> Config:
    return load(daemon.config)[0]


@pytest.mark.asyncio
async def test_get_vm_resumes_and_hot_adds_cpus_and_memory(
        make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1)
    ready, = daemon.wait_ready(1)
    async with await get_vm(config_of(daemon), cpus=2, memory_mib=512) as vm:
        assert (vm.source, vm.id, vm.pid) == ("cache", ready["id"], ready["pid"])
        assert (vm.vcpus, vm.memory_mib) == (2, 512)
        assert (vm.base.cpu, vm.base.memory) == (1, 256)
        # QEMU's view: a second vCPU, and one 256 MiB DIMM on top of the 256 MiB base.
        assert len(await vm.execute("query-cpus-fast")) == 2
        summary = await vm.execute("query-memory-size-summary")
        assert (summary["base-memory"], summary["plugged-memory"]) == (256 * MIB, 256 * MIB)
        dimm, = await vm.execute("query-memory-devices")
        assert dimm["data"]["size"] == 256 * MIB
        # The guest's view, through its agent and, independently, its console shell.
        info = await vm.info()
        assert info.cpus == 2
        # MemTotal can only exceed the whole 256 MiB of base RAM with the DIMM online.
        assert info.mem_kib > (256 + 200) * 1024
        assert vm.console_path is not None
        out = await console_run(
            vm.console_path,
            'echo "cpus=$(cat /sys/devices/system/cpu/online) '
            'offline=$(cat /sys/devices/system/memory/memory*/state | grep -c offline) '
            'done-$((40 + 2))"', "done-42")
        match = re.search(r"cpus=(\S+) offline=(\d+) done-42", out)
        assert match, out
        assert match.groups() == ("0-1", "0")
        # The liveness probe needs the guest's timers: a paused guest is reported dead.
        await vm.execute("stop")
        assert not await vm.alive(timeout=1.0)
        await vm.resume()
        assert await vm.alive()
        state_dir = vm.state_dir
        assert state_dir is not None
        assert state_dir.is_dir()
    # Leaving the block stopped the VM and removed its state directory.
    assert not pid_alive(ready["pid"])
    assert not state_dir.exists()
    # The daemon let go of it at the hand-off and refills behind it.
    assert ready["id"] not in {r["id"] for r in daemon.wait_ready(1)}


def test_request_that_does_not_fit_is_booted_directly(
        make_daemon: Callable[..., Daemon], demo_guest: DemoGuest, workdir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    daemon = make_daemon(cache_number=1)
    ready, = daemon.wait_ready(1)
    # Another kernel (the same bytes at another path): Kata would not use the cache either.
    kernel = workdir / "other-vmlinuz"
    shutil.copy(demo_guest.kernel, kernel)
    other = workdir / "other.toml"
    other.write_text(render_config(dataclasses.replace(demo_guest, kernel=kernel),
                                   endpoint=daemon.endpoint, state_dir=daemon.state_dir,
                                   cache_number=1, accelerator="tcg"))
    caplog.set_level(logging.INFO, logger="kata_vmcache.getvm")
    # Through the synchronous wrapper, as a script would.
    with SyncCacheClient(daemon.endpoint) as client, \
            client.get_vm(load(other)[0], wait_guest=True) as vm:
        assert vm.source == "direct"
        assert "HypervisorConfig.KernelPath" in vm.reason
        assert str(kernel) in cmdline(vm.pid)
        assert vm.ping() > 0
        # The cache's VM was not touched: still the one ready VM the server owns.
        assert [v.pid for v in client.status().vms] == [ready["pid"]]
        pid, state_dir = vm.pid, vm.state_dir
    said = [r.getMessage() for r in caplog.records if "booting a VM directly" in r.getMessage()]
    assert len(said) == 1
    assert "HypervisorConfig.KernelPath" in said[0]
    assert str(kernel) in said[0]
    assert not pid_alive(pid)
    assert not state_dir.exists()


class InjectingClient(CacheClient):
    """A real client that breaks the VM it has just taken, before get_vm() can use it."""

    def __init__(self, endpoint: Path, inject: Callable[[BaseVM], None]) -> None:
        super().__init__(endpoint)
        self.inject = inject
        self.taken: list[BaseVM] = []

    async def get_base_vm(self, timeout: float = 60.0) -> BaseVM:
        vm = await super().get_base_vm(timeout)
        self.taken.append(vm)
        self.inject(vm)
        return vm


def remove_qmp_socket(vm: BaseVM) -> None:
    vm.qmp_path.unlink()


def kill_qemu(vm: BaseVM) -> None:
    assert vm.pid is not None
    os.kill(vm.pid, signal.SIGKILL)


@pytest.mark.asyncio
@pytest.mark.parametrize("inject", [remove_qmp_socket, kill_qemu])
async def test_failure_after_the_vm_is_taken_leaves_nothing_running(
        make_daemon: Callable[..., Daemon], inject: Callable[[BaseVM], None]) -> None:
    daemon = make_daemon(cache_number=1)
    daemon.wait_ready(1)
    client = InjectingClient(daemon.endpoint, inject)
    async with client:
        with pytest.raises(VMDead) as failed:
            await get_vm(config_of(daemon), client=client, cpus=2)
    taken, = client.taken
    assert taken.id in str(failed.value)
    assert "\n" not in str(failed.value)
    assert taken.pid is not None
    # A SIGKILLed QEMU takes a moment to finish exiting (its memory is torn down after its
    # /proc entry stops naming it, which is what get_vm() saw).
    wait_for(exited(taken.pid), 10, "the taken VM's QEMU to be gone")
    for key in ("StateDir", "VMDir"):
        wait_for(absent(Path(taken.hypervisor[key])), 10, f"the taken VM's {key} to be removed")


def test_cli_get_resume_wait_guest(make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon(cache_number=1)
    ready, = daemon.wait_ready(1)
    # Bad values: one line each, and no VM is spent on them.
    for args, says in [(["--cpus", "0"], "cpus: must be 1"),
                       (["--cpus", "99"], "cpus: must be 1"),
                       (["--memory", "128"], "at least the base VM's 256 MiB"),
                       (["--memory", str(1 << 30)], "memory: must be at most"),
                       (["--guest-timeout", "0"], "--guest-timeout")]:
        bad = daemon.cli("get", "--resume", *args)
        assert bad.returncode == 2, bad
        assert bad.stderr.count("\n") == 1, bad.stderr
        assert says in bad.stderr
    # With only --endpoint (no configuration of ours), the server's Config says how far
    # its VMs can grow: the same requests are refused before a VM is taken.
    for args, says in [(["--cpus", "99"], "cpus: must be 1"),
                       (["--memory", str(1 << 30)], "memory: must be at most ")]:
        bad = run_cli(["get", "--resume", "--endpoint", str(daemon.endpoint), *args])
        assert bad.returncode == 2, bad
        assert bad.stderr.count("\n") == 1, bad.stderr
        assert says in bad.stderr
        assert [r["id"] for r in daemon.records("ready")] == [ready["id"]]
    assert "handed out" not in daemon.log()
    plain = daemon.cli("get", "--cpus", "2")
    assert plain.returncode == 2
    assert "--cpus needs --resume" in plain.stderr
    assert daemon.records("ready")[0]["id"] == ready["id"]

    result = daemon.cli("get", "--resume", "--wait-guest", "--cpus", "2")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    daemon.taken.append(out["hypervisor"])  # stopped by pid when the test ends
    assert set(out) >= {"id", "cpu", "memory", "cpuDelta", "hypervisor"}
    assert (out["id"], out["cpu"], out["memory"]) == (ready["id"], 1, 256)
    assert (out["vcpus"], out["memoryMiB"], out["source"]) == (2, 256, "cache")
    # The CLI has exited and let go of the VM: it runs, its QMP is free, its guest answers.
    h = out["hypervisor"]
    status, = qmp(Path(h["QmpChannelpath"]), "query-status", timeout=5)
    assert status["status"] == "running"

    async def ask_guest() -> tuple[float, int]:
        async with await GuestChannel.connect(Path(h["GuestChannelPath"])) as guest:
            return await guest.ping(), (await guest.info()).cpus
    rtt, cpus = asyncio.run(ask_guest())
    assert rtt > 0
    assert cpus == 2

    # What the server's Config says before a VM is taken is what the VM's own record says
    # after: a request is never refused only once a VM has been spent on it.
    async def shape() -> VMShape | None:
        async with CacheClient(daemon.endpoint) as client:
            return (await client.config_and_shape())[2]
    said = asyncio.run(shape())
    assert said is not None
    assert (said.max_memory_mib, said.memory_slots) == (h["MaxMemory"], h["MemorySlots"])


def test_cli_get_resume_fails_in_one_line_when_the_guest_does_not_answer(
        demo_guest: DemoGuest, workdir: Path) -> None:
    # A guest whose channel never answers: QEMU serves one client per chardev socket, and
    # a second one is accepted by the kernel and then hears nothing. Holding the ready
    # VM's channel is such a guest, as far as the client can tell.
    config = workdir / "configuration.toml"
    config.write_text(render_config(demo_guest, endpoint=workdir / "cache.sock",
                                    state_dir=workdir / "state", cache_number=1,
                                    accelerator="tcg"))
    daemon = Daemon(config, workdir / "cache.sock", workdir / "state").start()
    try:
        ready, = daemon.wait_ready(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder:
            holder.connect(str(daemon.state_dir / "vms" / ready["id"] / "guest.sock"))
            result = daemon.cli("get", "--resume", "--wait-guest", "--guest-timeout", "2")
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert "did not answer within 2 s" in result.stderr
        assert ready["id"] in result.stderr
        assert result.stdout == ""
        # The VM nobody got was stopped, and its directories removed.
        wait_for(lambda: not pid_alive(ready["pid"]), 10, "the VM to be gone")
        assert not (daemon.state_dir / "vms" / ready["id"]).exists()
        assert not Path(ready["vm_dir"]).exists()
    finally:
        daemon.stop()
