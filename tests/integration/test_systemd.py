"""Running under systemd, on the real daemon and real QEMU: the notify protocol as systemd
receives it, live reload of configuration.toml, journal-friendly and JSON log lines.

systemd itself cannot run here (it is not PID 1), so the test plays its part: it binds the
AF_UNIX datagram socket named in NOTIFY_SOCKET, reads each message with the sender's
credentials (as systemd does for NotifyAccess=main), sets WATCHDOG_USEC and JOURNAL_STREAM,
and sends SIGHUP/SIGTERM the way ExecReload/ExecStop would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache.client.rpc import CacheClient
from kata_vmcache.procs import pid_alive
from kata_vmcache.service.server import probe_endpoint

from .harness import Daemon, exited, qmp, run_cli, wait_for

pytestmark = pytest.mark.qemu

WATCHDOG_USEC = 3_000_000


@dataclass(frozen=True)
class Message:
    at: float
    pid: int
    fields: dict[str, str]
    #: Did the gRPC socket accept a connection when the message arrived?
    serving: bool


class NotifySocket:
    """systemd's end of the notify protocol, with SO_PASSCRED for the sender's pid."""

    def __init__(self, path: Path, endpoint: Path) -> None:
        self.path = path
        self.endpoint = endpoint
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            serving = "READY" in fields and probe_endpoint(self.endpoint)
            self.messages.append(Message(time.monotonic(), pid, fields, serving))

    def find(self, predicate: Callable[[Message], bool], what: str, *, after: int = 0,
             timeout: float = 90.0) -> int:
        """Index of the first message from `after` on that satisfies `predicate`."""
        def search() -> int | None:
            for i, m in enumerate(self.messages[after:], start=after):
                if predicate(m):
                    return i
            return None
        # wait_for wants a truthy value and index 0 is falsy: wrap the index in a list.
        try:
            found: list[int] = wait_for(lambda: (i := search()) is not None and [i], timeout,
                                        what)
        except AssertionError as exc:  # name what did arrive, as of the timeout
            got = [m.fields for m in self.messages[after:]]
            raise AssertionError(f"{exc} (got {got})") from None
        return found[0]

    def status(self, text: str, *, after: int = 0) -> int:
        return self.find(lambda m: m.fields.get("STATUS") == text, f"STATUS={text}",
                         after=after)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


def config_reply(endpoint: Path) -> dict[str, Any]:
    async def fetch() -> dict[str, Any]:
        async with CacheClient(endpoint) as client:
            return (await client.config())[0]
    return asyncio.run(fetch())


def status_vms(d: Daemon) -> list[dict[str, int]]:
    result = d.cli("status", "--json", "--endpoint", str(d.endpoint))
    assert result.returncode == 0, result.stderr
    vms: list[dict[str, int]] = json.loads(result.stdout)["vms"]
    return vms


def test_notify_protocol_of_the_real_daemon(make_config: Callable[..., Path],
                                            workdir: Path) -> None:
    endpoint = workdir / "cache.sock"
    notify = NotifySocket(workdir / "notify.sock", endpoint)
    d = Daemon(make_config(cache_number=1), endpoint, workdir / "state")
    # The harness sends the daemon's stderr to this file: name it as systemd names the
    # journal stream, and the daemon must log as it would to the journal.
    d.log_path.touch()
    st = d.log_path.stat()
    d.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
             "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    try:
        d.start()
        assert d.proc is not None
        pid = d.proc.pid
        ready = notify.find(lambda m: "READY" in m.fields, "READY=1")
        assert notify.messages[ready].fields["READY"] == "1"
        assert notify.messages[ready].serving, "READY=1 came before the socket served"
        assert all(set(m.fields) == {"WATCHDOG"} for m in notify.messages[:ready])

        # STATUS follows the pool: filled, a hand-off, the refill.
        filled = notify.status("1/1 VMs ready, 0 handed out", after=ready)
        d.get()
        notify.status("1/1 VMs ready, 1 handed out", after=filled)

        # A reload (what ExecReload's SIGHUP does): RELOADING=1 with the monotonic clock,
        # then READY=1 once the new settings are in force.
        edit(d.config, "vm_cache_number = 1", "vm_cache_number = 2")
        mark, before = len(notify.messages), monotonic_usec()
        d.send_signal(signal.SIGHUP)
        reloading = notify.find(lambda m: "RELOADING" in m.fields, "RELOADING=1", after=mark)
        fields = notify.messages[reloading].fields
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= monotonic_usec()
        reloaded = notify.find(lambda m: "READY" in m.fields, "READY=1 after the reload",
                               after=reloading)
        assert notify.messages[reloaded].fields["STATUS"].split(", ")[0] in (
            "1/2 VMs ready", "1/2 VMs ready (1 booting)")
        notify.status("2/2 VMs ready, 1 handed out", after=reloaded)

        # The watchdog: a ping every half of WATCHDOG_USEC; a gap of WATCHDOG_USEC would
        # have had systemd kill the service.
        notify.find(lambda m: sum("WATCHDOG" in x.fields for x in notify.messages) >= 4,
                    "four watchdog pings")
        pings = [m.at for m in notify.messages if "WATCHDOG" in m.fields]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert min(gaps) > 0.9 * WATCHDOG_USEC / 2e6, gaps
        assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

        mark = len(notify.messages)
        assert d.stop() == 0
        stopping = notify.find(lambda m: "STOPPING" in m.fields, "STOPPING=1", after=mark,
                               timeout=5)
        assert not any("READY" in m.fields for m in notify.messages[stopping:])
        # Every message came from the main process (systemd's NotifyAccess=main).
        assert {m.pid for m in notify.messages} == {pid}
    finally:
        d.stop()
        notify.close()

    lines = d.log().splitlines()
    assert lines
    for line in lines:
        # Journal style: "<priority>LEVEL logger: message", the timestamp left to journald.
        prio, _, rest = line.partition(">")
        assert prio in ("<6", "<4", "<3"), line
        assert rest.split()[0] in ("INFO", "WARNING", "ERROR"), line
        assert not rest[:4].isdigit(), line
        assert "\x1b" not in line
    assert any(line.startswith("<6>INFO    reload: configuration reloaded: "
                               "factory.vm_cache_number 1 -> 2") for line in lines)


def test_reload_grows_and_shrinks_without_touching_handed_off_vms(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=2, socket_mode="0600")
    d.wait_ready(2)
    taken = d.get()["hypervisor"]
    d.wait_ready(2)

    edit(d.config, "vm_cache_number = 2", "vm_cache_number = 1")
    edit(d.config, 'socket_mode = "0600"', 'socket_mode = "0660"')
    result = d.cli("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("reload applied: factory.vm_cache_number 2 -> 1; "
                             "vmcache.socket_mode 0600 -> 0660\n")
    assert stat.S_IMODE(d.endpoint.stat().st_mode) == 0o660
    wait_for(lambda: len(status_vms(d)) == 1 and len(d.records("ready")) == 1, 30,
             "the cache to shrink to 1")

    edit(d.config, "vm_cache_number = 1", "vm_cache_number = 3")
    result = d.cli("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reload applied: factory.vm_cache_number 1 -> 3\n"
    d.wait_ready(3)
    wait_for(lambda: len(status_vms(d)) == 3, 30, "Status to list 3 VMs")

    # The VM taken before both reloads is still the taker's: alive, paused, not ours.
    assert pid_alive(taken["Pid"])
    assert taken["Pid"] not in {v["pid"] for v in status_vms(d)}
    status, = qmp(Path(taken["QmpChannelpath"]), "query-status")
    assert status["status"] == "paused"


def test_reload_of_vm_settings_retires_old_vms_and_config_follows(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=2)
    d.wait_ready(2)
    taken = d.get()["hypervisor"]
    old = {r["pid"] for r in d.wait_ready(2)}
    assert config_reply(d.endpoint)["HypervisorConfig"]["MemorySize"] == 256

    edit(d.config, "default_memory = 256", "default_memory = 320")
    result = d.cli("reload")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reload applied: hypervisor.qemu.memory_mib 256 -> 320")
    # From the reply on, Config describes the new VMs.
    assert config_reply(d.endpoint)["HypervisorConfig"]["MemorySize"] == 320

    def refilled() -> bool:
        vms = status_vms(d)
        return (len(vms) == 2 and {v["memory"] for v in vms} == {320}
                and not old & {v["pid"] for v in vms})
    wait_for(refilled, 90, "2 VMs with the new memory size")
    for pid in old:
        wait_for(exited(pid), 10, f"retired QEMU {pid} to stop")
    vm = d.get()
    assert vm["memory"] == 320

    # The VM handed out before the reload keeps its settings and its life.
    assert pid_alive(taken["Pid"])
    size, = qmp(Path(taken["QmpChannelpath"]), "query-memory-size-summary")
    assert size["base-memory"] == 256 * 1024 * 1024


def test_reload_refuses_bad_edits_and_keeps_serving(make_daemon: Callable[..., Daemon],
                                                     workdir: Path) -> None:
    d = make_daemon(cache_number=1, log_format="json")
    vm_pid = d.wait_ready(1)[0]["pid"]
    assert d.proc is not None
    good = d.config.read_text()

    # An invalid edit: every problem logged as an error naming its key; nothing changes.
    edit(d.config, "vm_cache_number = 1", "vm_cache_number = -1")
    edit(d.config, "default_memory = 256", 'default_memory = "lots"')
    mark = len(d.log().splitlines())
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: "still serving with the previous settings" in d.log(), 30,
             "the refusal to be logged")
    errors = [json.loads(line) for line in d.log().splitlines()[mark:]]
    refused = [e["message"] for e in errors if e["level"] == "error"]
    assert any("factory.vm_cache_number: must be >= 0 (got -1" in m for m in refused), refused
    assert any("hypervisor.qemu.default_memory: wrong type" in m for m in refused), refused
    result = d.cli("reload")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("kata-vmcache: reload refused: the configuration "
                                              "has errors; the server keeps its settings")

    # A setting bound at start-up: refused, naming the key and what to do.
    d.config.write_text(good.replace(str(d.endpoint), str(workdir / "other.sock")))
    result = d.cli("reload", "--pid", str(d.proc.pid))
    assert result.returncode == 1
    assert result.stderr == (f"kata-vmcache: reload refused: factory.vm_cache_endpoint "
                             f"{d.endpoint} -> {workdir / 'other.sock'}: cannot change while "
                             "running, restart the service to apply it "
                             "(systemctl restart kata-vmcache)\n")
    # Without --pid the client looks for the server where the edited file says it is.
    result = d.cli("reload")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "pass --pid, or restart it" in result.stderr

    # What the file alone cannot tell is checked as at start: a machine type the
    # configured QEMU does not know is refused, not left to fail every boot.
    d.config.write_text(good.replace('machine_type = "q35"', 'machine_type = "q53"'))
    result = d.cli("reload")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "reload refused: " in result.stderr
    assert "hypervisor.qemu.machine_type: not a machine type" in result.stderr

    # Still serving, with the same VM and the old settings.
    assert [v["pid"] for v in status_vms(d)] == [vm_pid]
    assert config_reply(d.endpoint)["HypervisorConfig"]["MemorySize"] == 256
    d.config.write_text(good)
    result = d.cli("reload")
    assert (result.returncode, result.stdout) == (0, "reload applied: no setting changed\n")

    for line in d.log().splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert set(entry) >= {"time", "level", "logger", "message"}


def test_reload_without_a_server_is_one_line(make_config: Callable[..., Path]) -> None:
    result = run_cli(["--config", str(make_config()), "reload"])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("kata-vmcache: no VM cache server at ")
    assert not os.path.exists(make_config().parent / "state" / "reload.json")
