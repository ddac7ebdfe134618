"""The core daemon on real QEMU: fill, Status, hand-off, refill, stop, endpoint rules.

Everything goes through the CLI a user runs (`kata-vmcache --config FILE ...`) or a real
QMP/console socket; nothing in the daemon is faked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmcache.procs import cmdline, pid_alive

from .harness import CLI, Console, Daemon, exited, qmp, run_cli, stop_taken_vm, wait_for

pytestmark = pytest.mark.qemu


def test_cache_fills_and_status_lists_live_qemu(daemon: Daemon) -> None:
    ready = daemon.wait_ready(2)
    # The first screen of `make run` (the demo guest's file): nothing to act on, no warning.
    assert " WARNING " not in daemon.log(), daemon.log()
    result = daemon.cli("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"VM cache server pid = {daemon.pid}"
    vm_lines = lines[1:]
    assert len(vm_lines) == 2
    pids = set()
    for line in vm_lines:
        prefix, _, number = line.partition(" Cpu = ")[0].rpartition(" ")
        assert prefix == "VM pid =", line
        assert line.endswith(" Cpu = 1 Memory = 256MiB"), line
        pids.add(int(number))
    assert pids == {r["pid"] for r in ready}
    for pid in pids:
        assert pid_alive(pid)
        assert "qemu-system-x86_64" in cmdline(pid)[0]
    as_json = json.loads(daemon.cli("status", "--json").stdout)
    assert as_json["pid"] == daemon.pid
    assert {v["pid"] for v in as_json["vms"]} == pids


def test_get_hands_out_a_paused_vm_that_runs_after_cont(daemon: Daemon) -> None:
    daemon.wait_ready(2)
    vm = daemon.get()
    assert set(vm) >= {"id", "cpu", "memory", "cpuDelta", "hypervisor"}
    assert (vm["cpu"], vm["memory"], vm["cpuDelta"]) == (1, 256, 0)
    h = vm["hypervisor"]
    assert h["ID"] == vm["id"]
    assert h["QemuSMP"]["CPUs"] == 1
    assert h["QemuSMP"]["MaxCPUs"] >= 1
    assert set(h["State"]) >= {"Bridges", "HotpluggedVCPUs", "HotpluggedMemory", "UUID"}
    # The daemon closed its QMP session before replying: a new client gets in at once.
    status, = qmp(Path(h["QmpChannelpath"]), "query-status", timeout=5)
    assert status["status"] == "paused"
    console = Console(Path(h["ConsolePath"]))
    try:
        qmp(Path(h["QmpChannelpath"]), "cont")
        console.run("echo kvc-$((6*7))", "kvc-42")
    finally:
        console.close()
    # The VM is the caller's now: it is not in Status any more.
    st = json.loads(daemon.cli("status", "--json").stdout)
    assert h["Pid"] not in {v["pid"] for v in st["vms"]}


def test_cache_refills_after_get(daemon: Daemon) -> None:
    daemon.wait_ready(2)
    first = daemon.get()
    second = daemon.get()
    assert first["id"] != second["id"]
    ready = daemon.wait_ready(2)
    assert {r["id"] for r in ready}.isdisjoint({first["id"], second["id"]})
    assert "handed out" in daemon.log()


def test_get_on_empty_cache_waits_for_the_next_vm(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=1)
    d.wait_ready(1)
    d.get()
    started = time.monotonic()
    vm = d.get()  # the refill is still booting: this waits for it
    assert time.monotonic() - started > 0.5
    assert vm["hypervisor"]["Pid"]


def test_destroy_stops_owned_vms_but_not_handed_off_ones(daemon: Daemon) -> None:
    daemon.wait_ready(2)
    taken = daemon.get()
    owned = [r["pid"] for r in daemon.wait_ready(2)]
    started = time.monotonic()
    result = daemon.cli("destroy")
    assert result.returncode == 0, result.stderr
    assert daemon.wait(5) == 0
    assert time.monotonic() - started < 5
    assert not daemon.endpoint.exists()
    for pid in owned:
        wait_for(exited(pid), 5, f"owned QEMU {pid} to stop")
    assert pid_alive(taken["hypervisor"]["Pid"])
    status, = qmp(Path(taken["hypervisor"]["QmpChannelpath"]), "query-status")
    assert status["status"] == "paused"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(make_daemon: Callable[..., Daemon], sig: int) -> None:
    d = make_daemon(cache_number=1)
    owned = [r["pid"] for r in d.wait_ready(1)]
    started = time.monotonic()
    d.send_signal(sig)
    assert d.wait(5) == 0
    assert time.monotonic() - started < 5
    assert not d.endpoint.exists()
    assert not any(pid_alive(p) for p in owned)
    assert d.records() == []  # owned VMs' state directories are gone too


def test_socket_mode_is_0600(daemon: Daemon) -> None:
    mode = stat.S_IMODE(daemon.endpoint.stat().st_mode)
    assert mode == 0o600, oct(mode)
    state_mode = stat.S_IMODE(daemon.state_dir.stat().st_mode)
    assert state_mode == 0o700, oct(state_mode)


def test_second_daemon_on_same_endpoint_is_refused(daemon: Daemon) -> None:
    result = daemon.cli("init", timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"kata-vmcache: a server is already answering on {daemon.endpoint} "
                         "(stop it with 'kata-vmcache destroy')")
    assert "Traceback" not in result.stderr
    assert daemon.cli("status").returncode == 0  # the first one is untouched


def test_stale_socket_is_replaced(make_config: Callable[..., Path], workdir: Path) -> None:
    endpoint = workdir / "cache.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(endpoint))
    stale.close()  # the file stays, nobody listens: what a crashed server leaves
    assert endpoint.exists()
    d = Daemon(make_config(cache_number=1), endpoint, workdir / "state")
    try:
        d.start()
        assert d.cli("status").returncode == 0
        assert "replacing stale socket" in d.log()
    finally:
        d.stop()


def test_cli_errors_are_one_line(make_config: Callable[..., Path], workdir: Path) -> None:
    config = make_config()
    result = run_cli(["--config", str(config), "status"])
    assert result.returncode == 1
    assert result.stderr == (f"kata-vmcache: no VM cache server at {workdir / 'cache.sock'} "
                             "(is 'kata-vmcache init' running?)\n")
    bad = workdir / "bad.toml"
    bad.write_text(config.read_text().replace("vm_cache_number = 2", "vm_cache_number = -1"))
    result = run_cli(["--config", str(bad), "check-config"])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "factory.vm_cache_number: must be >= 0 (got -1" in result.stderr
    result = run_cli(["--config", str(workdir / "nope.toml"), "init"])
    assert result.returncode == 2
    assert result.stderr == f"kata-vmcache: {workdir / 'nope.toml'}: no such file\n"


def test_check_config_prints_resolved_settings(make_config: Callable[..., Path]) -> None:
    result = run_cli(["--config", str(make_config()), "check-config"])
    assert result.returncode == 0, result.stderr
    pairs = (line.split(" = ", 1) for line in result.stdout.splitlines()[1:])
    settings = {key.strip(): value for key, value in pairs}
    assert settings["factory.vm_cache_number"] == "2"
    assert settings["vmcache.accelerator"] == "tcg"
    assert settings["hypervisor.qemu.memory_mib"] == "256"


def test_a_reader_that_goes_away_gets_no_traceback(make_config: Callable[..., Path]) -> None:
    """`check-config | head`: the pipe closes under the writer; it stops quietly, with
    the shell's code for a command SIGPIPE ended."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written
    try:
        result = subprocess.run([*CLI, "--config", str(make_config()), "check-config"],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


def test_taken_vm_outlives_the_daemon(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=1)
    d.wait_ready(1)
    taken = d.get()
    # This test stops it itself, after the daemon.
    d.taken = [t for t in d.taken if t["ID"] != taken["id"]]
    assert d.stop() == 0
    pid = taken["hypervisor"]["Pid"]
    assert pid_alive(pid)
    stop_taken_vm(taken["hypervisor"])
    assert not pid_alive(pid)
    assert os.path.exists(taken["hypervisor"]["StateDir"]) is False


def test_config_rpc_carries_katas_json(daemon: Daemon) -> None:
    """Config answers with Kata's VMConfig JSON derived from the same file, as kata-runtime
    compares it: the demo file is a 3.x file (no [proxy.*] table), so 3.x's payload."""
    import asyncio
    import tomllib

    from kata_vmcache import kata
    from kata_vmcache.client.rpc import CacheClient

    async def fetch() -> tuple[dict[str, object], dict[str, object]]:
        async with CacheClient(daemon.endpoint) as client:
            return await client.config()

    data, agent = asyncio.run(fetch())
    expected = kata.vm_config(tomllib.loads(daemon.config.read_text()), "3.x")
    assert data == json.loads(json.dumps(expected))
    assert agent == data["AgentConfig"]
    assert data["AgentConfig"]["LongLiveConn"] is True
    hv = data["HypervisorConfig"]
    assert isinstance(hv, dict)
    assert hv["NumVCPUsF"] == 1.0
    assert hv["MemorySize"] == 256
    assert hv["HypervisorMachineType"] == "q35"
    assert hv["SharedFS"] == "virtio-9p"
    assert Path(hv["InitrdPath"]).is_file()


def test_readiness_timeout_names_the_accelerator(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=1, ready_timeout=1)  # the least allowed; TCG needs more
    wait_for(lambda: "guest not ready after 1 s under TCG" in d.log(), 30,
             "the readiness timeout to be logged")
    assert "raise ready_timeout" in d.log()
    assert d.cli("status").returncode == 0  # the daemon keeps serving while boots fail
    assert d.records("ready") == []


def test_endpoint_parent_directory_is_created(make_config: Callable[..., Path],
                                              workdir: Path) -> None:
    endpoint = workdir / "run" / "kata" / "cache.sock"
    config = make_config(cache_number=1)
    config.write_text(config.read_text().replace(str(workdir / "cache.sock"), str(endpoint)))
    d = Daemon(config, endpoint, workdir / "state")
    try:
        d.start()
        assert stat.S_ISSOCK(endpoint.stat().st_mode)
    finally:
        d.stop()
