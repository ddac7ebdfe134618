"""The cached VM is a Kata VM, on real QEMU: Kata's devices, Kata's paths, Kata 1.x's
kata-proxy per VM and the agent's health check as readiness.

No kata-agent or kata-proxy can be installed here, so the proxy is a stand-in executable
that keeps Kata's launch contract: it is started with kata_proxy.go's arguments, must reach
the VM's agent channel (QEMU's kata.sock) on `-mux-socket`, and serves on `-listen-socket`
the agent's gRPC health service, built from the agent's proto (protos/agent_health.proto)
- what a real proxy relays from a real agent. Everything else is real: the daemon, QEMU
with Kata's device model, the demo guest, the sockets, the signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kata_vmcache.demo.config import render_config
from kata_vmcache.demo.guest import DemoGuest
from kata_vmcache.procs import cmdline, pid_alive
from kata_vmcache.proto import agent_health_pb2, agent_health_pb2_grpc

from .harness import CLI, Daemon, qmp, wait_for

pytestmark = pytest.mark.qemu

STAND_IN = '''\
"""kata-proxy stand-in for tests: Kata 1.x's launch contract, the agent's health service."""
import asyncio, json, os, signal, socket, sys
from pathlib import Path

import grpc
from kata_vmcache.proto import agent_health_pb2, agent_health_pb2_grpc

args = sys.argv[1:]
opts = {k: v for k, v in zip(args[::2], args[1::2])}
record = Path(__file__).parent / f"proxy-{opts['-sandbox']}.json"
facts = {"argv": sys.argv, "pid": os.getpid(), "events": []}

def save(event):
    facts["events"].append(event)
    record.write_text(json.dumps(facts))

# A real proxy multiplexes the agent's channel: it must be QEMU's socket, there now.
mux = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
mux.connect(opts["-mux-socket"])
save("mux connected")

class Health(agent_health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return agent_health_pb2.HealthCheckResponse(
            status=agent_health_pb2.HealthCheckResponse.SERVING)

async def main():
    server = grpc.aio.server()
    agent_health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    assert opts["-listen-socket"].startswith("unix://")
    server.add_insecure_port(opts["-listen-socket"].replace("unix://", "unix:", 1))
    await server.start()
    save("serving")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    save("SIGTERM")
    await server.stop(0)

asyncio.run(main())
'''


def stand_in_proxy(workdir: Path) -> Path:
    path = workdir / "kata-proxy"
    path.write_text(f"#!{sys.executable}\n{STAND_IN}")
    path.chmod(0o755)
    return path


def proxy_facts(workdir: Path, vm_id: str) -> dict[str, Any]:
    path = workdir / f"proxy-{vm_id}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def one_x_config(demo_guest: DemoGuest, workdir: Path, proxy: Path | None, *,
                 cache_number: int = 2) -> Path:
    """The demo guest in a Kata 1.x file ([proxy.kata]) whose guest "has an agent": the
    stand-in answers for it."""
    text = render_config(demo_guest, endpoint=workdir / "cache.sock",
                         state_dir=workdir / "state", cache_number=cache_number,
                         guest_agent="kata", ready_probe="kata-agent")
    proxy_path = proxy if proxy is not None else workdir / "no-such-kata-proxy"
    text = text.replace("[agent.kata]", f'[proxy.kata]\npath = "{proxy_path}"\n\n'
                                        "[shim.kata]\n\n[agent.kata]")
    path = workdir / "configuration.toml"
    path.write_text(text)
    return path


async def health_check(url: str) -> str:
    async with grpc.aio.insecure_channel(url) as channel:
        reply = await agent_health_pb2_grpc.HealthStub(channel).Check(
            agent_health_pb2.CheckRequest(), timeout=5)
    return agent_health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_cached_vm_has_kata_devices_paths_and_a_proxy_and_hand_off_leaves_them(
        demo_guest: DemoGuest, workdir: Path) -> None:
    proxy = stand_in_proxy(workdir)
    config = one_x_config(demo_guest, workdir, proxy)
    daemon = Daemon(config, workdir / "cache.sock", workdir / "state").start()
    taken: dict[str, Any] = {}
    try:
        ready = daemon.wait_ready(2)
        assert daemon.log().count("the agent answered its health check (SERVING)") >= 2
        vm_root, sbs = workdir / "vm", workdir / "sbs"
        for record in ready:
            vm_id, pid = record["id"], record["pid"]
            vm_dir = vm_root / vm_id
            # Kata's names, where kata-runtime looks for them.
            for name in ("qmp.sock", "console.sock", "kata.sock"):
                assert (vm_dir / name).is_socket(), name
            assert (vm_dir / "shared").is_dir()
            assert (vm_dir / "pid").read_text().strip() == str(pid)
            assert record["vm_dir"] == str(vm_dir)
            argv = cmdline(pid)
            assert argv[argv.index("-name") + 1] == f"sandbox-{vm_id}"
            line = " ".join(argv)
            assert ("virtserialport,chardev=charch0,id=channel0,name=agent.channel.0 "
                    f"-chardev socket,id=charch0,path={vm_dir}/kata.sock") in line
            assert "mount_tag=kataShared" in line
            assert f"path={vm_dir}/shared,security_model=none,multidevs=remap" in line
            # kata_proxy.go's arguments, exactly.
            facts = proxy_facts(workdir, vm_id)
            assert facts["argv"][1:] == [
                "-listen-socket", f"unix://{sbs}/{vm_id}/proxy.sock",
                "-mux-socket", f"{vm_dir}/kata.sock", "-sandbox", vm_id]
            assert facts["events"][:2] == ["mux connected", "serving"]
            assert record["proxy_pid"] == facts["pid"]
            # QEMU and proxy each in a session of their own, as Kata starts them.
            assert os.getsid(pid) == pid
            assert os.getsid(facts["pid"]) == facts["pid"]

        taken = daemon.get()
        vm_id, hypervisor = taken["id"], taken["hypervisor"]
        facts = proxy_facts(workdir, vm_id)
        assert taken["proxyPid"] == facts["pid"]
        assert taken["proxyURL"] == f"unix://{sbs}/{vm_id}/proxy.sock"
        assert hypervisor["QmpChannelpath"] == str(vm_root / vm_id / "qmp.sock")
        assert hypervisor["State"]["Bridges"] == [{"Devices": {}, "ID": "pci-bridge-0",
                                                   "Addr": 2, "Type": "pci",
                                                   "MaxCapacity": 30}]
        # The receiver reaches the agent through the proxy, as kata-runtime's first call
        # after `cont` (ReseedRNG) does.
        assert asyncio.run(health_check(taken["proxyURL"])) == "SERVING"

        other, = (r for r in ready if r["id"] != vm_id)
        other_proxy = proxy_facts(workdir, other["id"])["pid"]
        daemon.send_signal(signal.SIGTERM)  # the daemon only: stop() would stop `taken` too
        assert daemon.wait(15) == 0
        # The VM still in the pool: QEMU and its proxy stopped, every directory gone.
        assert not pid_alive(other["pid"])
        assert not pid_alive(other_proxy)
        assert proxy_facts(workdir, other["id"])["events"][-1] == "SIGTERM"
        for path in (vm_root / other["id"], sbs / other["id"],
                     daemon.state_dir / "vms" / other["id"]):
            assert not path.exists(), path
        # The VM handed out: the client's. QEMU, proxy, Kata's directory all left alone.
        assert pid_alive(hypervisor["Pid"])
        assert pid_alive(taken["proxyPid"])
        assert "SIGTERM" not in proxy_facts(workdir, vm_id)["events"]
        assert (vm_root / vm_id / "kata.sock").is_socket()
        assert (sbs / vm_id / "proxy.sock").is_socket()
        assert asyncio.run(health_check(taken["proxyURL"])) == "SERVING"
    finally:
        daemon.stop()  # stops what the test took: QEMU by QMP quit, the proxy by SIGTERM


def test_a_handed_out_vms_files_go_when_its_qemu_exits_never_before(
        make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    daemon = make_daemon(cache_number=1)
    daemon.wait_ready(1)
    taken = daemon.get()["hypervisor"]
    vm_dir, own = Path(taken["VMDir"]), Path(taken["StateDir"])
    # A refill and a hand-off later, the taken VM's files are still there.
    daemon.wait_ready(1)
    daemon.get()
    assert (vm_dir / "qmp.sock").is_socket()
    assert own.is_dir()
    # Its client crashes and its QEMU goes (Kata's own stop would remove the directory
    # itself): the daemon, still QEMU's parent, removes what is left.
    qmp(Path(taken["QmpChannelpath"]), "quit")
    wait_for(lambda: not vm_dir.exists() and not own.exists(), 10,
             "the exited VM's directories to be removed")
    assert f"handed-out VM's QEMU {taken['Pid']} has exited" in daemon.log()


def test_a_missing_kata_proxy_is_one_line_at_start(demo_guest: DemoGuest,
                                                    workdir: Path) -> None:
    config = one_x_config(demo_guest, workdir, None)
    for command in ("init", "check-config"):
        result = subprocess.run([*CLI, "--config", str(config), command], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1, result.stderr
        assert "proxy.kata.path: no kata-proxy at" in result.stderr
        assert "no-such-kata-proxy" in result.stderr
    assert not (workdir / "cache.sock").exists()
    assert not (workdir / "vm").exists()


def test_a_kata_proxy_that_exits_fails_its_boot_at_once(
        demo_guest: DemoGuest, workdir: Path, make_daemon: Callable[..., Daemon]) -> None:
    """Kata 1.x's proxy exits 1 at once without a syslog on /dev/log: the boot fails then,
    with the proxy's own last line, not at ready_timeout (60 s here); no QEMU is left."""
    proxy = workdir / "kata-proxy"
    proxy.write_text('#!/bin/sh\necho \'level=fatal msg="unable to setup logger" '
                     'error="Unix syslog delivery error"\'\nexit 1\n')
    proxy.chmod(0o755)
    config = one_x_config(demo_guest, workdir, proxy, cache_number=1)
    daemon = Daemon(config, workdir / "cache.sock", workdir / "state")
    try:
        daemon.start()
        line = wait_for(lambda: next((x for x in daemon.log().splitlines()
                                      if "VM boot failed" in x), None),
                        20, "the first failed boot")
        assert "kata-proxy exited with 1 before the agent answered" in line
        assert 'unable to setup logger' in line
        assert daemon.serving()
    finally:
        daemon.stop()
    assert not [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if str(workdir) in " ".join(cmdline(pid))]


def test_check_config_names_generation_paths_and_agent_channel(
        demo_guest: DemoGuest, workdir: Path) -> None:
    proxy = stand_in_proxy(workdir)
    config = one_x_config(demo_guest, workdir, proxy)
    result = subprocess.run([*CLI, "--config", str(config), "check-config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {key.strip(): value for key, _, value in (line.partition(" = ") for line in
                                                    result.stdout.splitlines())}
    assert rows["vmcache.kata_version"] == "1.x (detected: [proxy.kata] present)"
    assert rows["kata.vm_directory"].startswith(f"{workdir}/vm/<vm id>/")
    assert rows["kata.agent_channel"] == (
        f"virtio-serial port agent.channel.0 on {workdir}/vm/<vm id>/kata.sock, through "
        f"kata-proxy {proxy} listening on {workdir}/sbs/<vm id>/proxy.sock")
    assert rows["kata.readiness"].startswith("the agent's health check")


def test_a_handed_out_vms_proxy_goes_with_its_qemu(demo_guest: DemoGuest,
                                                   workdir: Path) -> None:
    """A receiver that stops a taken VM's QEMU but not its kata-proxy (Kata 1.x's
    vm.Stop() does that): the daemon, still the proxy's parent, ends it with the VM."""
    config = one_x_config(demo_guest, workdir, stand_in_proxy(workdir), cache_number=1)
    daemon = Daemon(config, workdir / "cache.sock", workdir / "state").start()
    try:
        daemon.wait_ready(1)
        taken = daemon.get()
        hypervisor, proxy = taken["hypervisor"], taken["proxyPid"]
        assert pid_alive(proxy)
        qmp(Path(hypervisor["QmpChannelpath"]), "quit")
        wait_for(lambda: not pid_alive(proxy), 10, "the taken VM's kata-proxy to end")
        assert proxy_facts(workdir, taken["id"])["events"][-1] == "SIGTERM"
        assert not (workdir / "sbs" / taken["id"]).exists()
        daemon.taken.clear()  # nothing of it is left to stop
    finally:
        daemon.stop()
