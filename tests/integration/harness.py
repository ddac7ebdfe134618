"""Run the real daemon as a user would: `kata-vmcache --config FILE init` in a subprocess,
with real signals, a real socket and real QEMU; and stop whatever a test took, by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kata_vmcache.procs import pid_alive
from kata_vmcache.vm.records import read_records

CLI = [sys.executable, "-m", "kata_vmcache"]
#: Runs a command with RLIMIT_NOFILE set to (argv[1], argv[2]), as a shell with that
#: `ulimit -n` would start it (no preexec_fn: this process has threads).
WITH_NOFILE = ("import os, resource, sys; "
               "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
               "os.execv(sys.argv[3], sys.argv[3:])")


def exited(*pids: int) -> Callable[[], bool]:
    """For wait_for: none of these processes is alive any more."""
    return lambda: not any(pid_alive(pid) for pid in pids)


def absent(path: Path) -> Callable[[], bool]:
    """For wait_for: nothing is at `path` any more."""
    return lambda: not path.exists()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll an observable condition until it holds; fail naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def qmp(path: Path, *commands: str | tuple[str, dict[str, Any]],
        timeout: float = 10.0) -> list[Any]:
    """Synchronous, dependency-free QMP: connect, negotiate, run commands, close."""
    results = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        f = s.makefile("rwb")

        def send(cmd: str, args: dict[str, Any] | None = None) -> Any:
            msg: dict[str, Any] = {"execute": cmd}
            if args:
                msg["arguments"] = args
            f.write(json.dumps(msg).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    if cmd == "quit":
                        return None
                    raise ConnectionError(f"QMP closed during {cmd}")
                reply = json.loads(line)
                if "event" in reply:
                    continue
                if "error" in reply:
                    raise RuntimeError(f"QMP {cmd}: {reply['error']}")
                return reply.get("return")

        greeting = json.loads(f.readline())
        assert "QMP" in greeting
        send("qmp_capabilities")
        for c in commands:
            name, args = (c, None) if isinstance(c, str) else c
            results.append(send(name, args))
    return results


def stop_taken_vm(record: dict[str, Any], timeout: float = 10.0) -> None:
    """What a new owner does with a VM it no longer wants: QMP quit, then kill by pid."""
    pid = record.get("Pid")
    with contextlib.suppress(OSError, RuntimeError, ConnectionError):
        qmp(Path(record["QmpChannelpath"]), "quit", timeout=3)
    if isinstance(pid, int):
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not pid_alive(pid), timeout, f"QEMU {pid} to exit")
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), 5, f"QEMU {pid} to die")
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ours if the daemon exited first (subreaper)
    proxy = record.get("ProxyPid")
    if isinstance(proxy, int) and proxy > 0 and pid_alive(proxy):
        os.kill(proxy, signal.SIGTERM)  # Kata's VM.Disconnect
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not pid_alive(proxy), timeout, f"kata-proxy {proxy} to exit")
        if pid_alive(proxy):
            os.kill(proxy, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(proxy, os.WNOHANG)
    for key in ("StateDir", "VMDir", "SandboxDir"):
        if record.get(key):
            shutil.rmtree(record[key], ignore_errors=True)


async def console_run(path: Path, command: str, marker: str, timeout: float = 15) -> str:
    """Type `command` on the guest's console; return what it printed up to `marker`."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(timeout):
            return (await reader.readuntil(marker.encode())).decode(errors="replace")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class Console:
    """The guest's serial console, through QEMU's chardev socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.2)

    def run(self, command: str, expect: str, timeout: float = 15.0) -> str:
        seen = b""
        self.sock.sendall(command.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while expect.encode() not in seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"console never showed {expect!r}; got {seen[-500:]!r}")
            with contextlib.suppress(TimeoutError):
                seen += self.sock.recv(4096)
        return seen.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()


class Daemon:
    def __init__(self, config: Path, endpoint: Path, state_dir: Path, *,
                 debug: bool = False, nofile: tuple[int, int] | None = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.state_dir = state_dir
        self.debug = debug
        #: The daemon's RLIMIT_NOFILE (soft, hard) when it starts; None: this process's.
        self.nofile = nofile
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = config.parent / "daemon.log"
        self.taken: list[dict[str, Any]] = []
        #: Extra environment for the daemon (NOTIFY_SOCKET, JOURNAL_STREAM, ...).
        self.env: dict[str, str] = {}

    def start(self) -> Daemon:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        debug = ["--debug"] if self.debug else []
        argv = [*CLI, "--config", str(self.config), *debug, "init"]
        if self.nofile is not None:
            argv = [sys.executable, "-c", WITH_NOFILE, *map(str, self.nofile), *argv]
        proc = self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                            text=True, env={**os.environ, **self.env})
        wait_for(lambda: self.serving() or proc.poll() is not None, 30, "the daemon to serve")
        assert proc.poll() is None, f"daemon exited: {self.log()}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def serving(self) -> bool:
        return self.endpoint.exists() and self.cli("status").returncode == 0

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def records(self, state: str | None = None) -> list[dict[str, Any]]:
        return [r for _, r in read_records(self.state_dir) if state is None
                or r.get("state") == state]

    def wait_ready(self, count: int, timeout: float = 90.0) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]]:
            records = self.records("ready")
            return records if len(records) >= count else []
        found: list[dict[str, Any]] = wait_for(ready, timeout, f"{count} ready VMs")
        return found

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=timeout)

    def snapshot(self) -> dict[str, Any]:
        """The pool as `status --json` shows it."""
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        snap: dict[str, Any] = json.loads(result.stdout)["snapshot"]
        return snap

    def get(self) -> dict[str, Any]:
        result = self.cli("get")
        assert result.returncode == 0, result.stderr
        vm: dict[str, Any] = json.loads(result.stdout)
        self.taken.append({**vm["hypervisor"], "ProxyPid": vm.get("proxyPid", 0)})
        return vm

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        for record in self.taken:
            stop_taken_vm(record)
        self.taken.clear()
        with contextlib.suppress(AttributeError):
            self._log.close()
        return code


def write_config(dest: Path, text: str) -> Path:
    dest.write_text(text)
    return dest


def run_cli(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
