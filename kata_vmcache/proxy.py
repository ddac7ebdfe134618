"""Kata 1.x's kata-proxy, one per VM, started as kata-runtime starts it for a factory VM.

With Kata 1.x and `use_vsock = false`, the agent in the guest serves gRPC over a yamux
session on the virtio-serial port `agent.channel.0`, which QEMU exposes on `kata.sock`.
kata-runtime never speaks yamux itself: a kata-proxy per VM does, and listens on a Unix
socket of its own. A factory VM is handed over with that proxy running: `GrpcVM.proxyPid`
and `GrpcVM.proxyURL` are its pid and `unix://` URL, and kata-runtime's first call after
`cont` (`ReseedRNG`) goes through it.

Contract (kata-containers/runtime 1.13.0-alpha0, virtcontainers/vm.go `setupProxy`,
kata_proxy.go `kataProxy.start`/`stop`, proxy.go `defaultProxyURL`):

    <[proxy.kata] path> -listen-socket unix://<run storage>/<vm id>/proxy.sock
                        -mux-socket <vm storage>/<vm id>/kata.sock -sandbox <vm id>
                        [-log debug -agent-logs-socket <vm storage>/<vm id>/console.sock]

in a session of its own (Setsid); stopped with SIGTERM. The daemon stops a VM's proxy with
every VM it stops, and leaves it alone with every VM it hands out: from then on the proxy
is the receiver's, which stops it (`VM.Disconnect`). We bound the wait for SIGTERM and
then SIGKILL (Kata does not wait); a proxy is our child, so we always reap it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import subprocess
from pathlib import Path

from .errors import LaunchError
from .machine import VMPaths
from .priority import Level, launching
from .procs import cmdline, pid_alive
from .qmp import Pidfd, stop_process


def is_kata_proxy(pid: int, vm_id: str) -> bool:
    """pid is alive and is the kata-proxy of VM vm_id (its `-sandbox <id>` arguments):
    how a recorded pid is told from a recycled one."""
    args = cmdline(pid)
    return pid_alive(pid) and any(a == "-sandbox" and b == vm_id
                                  for a, b in itertools.pairwise(args))


def stop_handed_out_proxy(pid: int, vm_id: str) -> None:
    """Kata's VM.Disconnect for a VM we took: SIGTERM its proxy, if it is still that."""
    if pid > 0 and (proc := Pidfd.of_pid(pid, check=lambda p: is_kata_proxy(p, vm_id))):
        proc.signal(signal.SIGTERM)
        proc.close()


class KataProxy:
    """One kata-proxy process: started before the agent is checked, owned until hand-off."""

    def __init__(self, binary: Path, vm_id: str, paths: VMPaths, *, debug: bool,
                 log: logging.Logger) -> None:
        self.binary = binary
        self.paths = paths
        self.log = log
        self.argv = [str(binary), "-listen-socket", self.url, "-mux-socket", str(paths.agent),
                     "-sandbox", vm_id]
        if debug:
            self.argv += ["-log", "debug", "-agent-logs-socket", str(paths.console)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: Pidfd | None = None
        self._exited = asyncio.Event()
        self._released = False
        self._stopping = False

    @property
    def url(self) -> str:
        """GrpcVM.proxyURL: where kata-runtime reaches the agent."""
        return f"unix://{self.paths.proxy_socket}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    def start(self, priority: Level = "normal") -> None:
        """Launch the proxy (it creates its socket itself) at `priority` (its VM's);
        LaunchError when it cannot run."""
        # qemu.go setup() creates <run storage>/<id> for the sandbox's files: the proxy's
        # socket goes there.
        self.paths.sandbox.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(self.paths.own / "proxy.log", "ab") as logfile, launching(priority):
            try:
                self._proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=logfile,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise LaunchError(f"cannot run kata-proxy {self.binary}: {exc.strerror}",
                                  argv=self.argv) from exc
        self._pidfd = Pidfd.of_child(self._proc, on_exit=self._reaped)

    def _reaped(self) -> None:
        assert self._proc is not None
        self._close_pidfd()
        self._exited.set()
        if not (self._released or self._stopping):
            self.log.warning("kata-proxy %d exited with %s", self._proc.pid,
                             self._proc.returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._pidfd.close()

    async def wait(self) -> None:
        """Until the proxy has exited (and been reaped)."""
        await self._exited.wait()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def last_words(self) -> str:
        """The proxy's last log line (why it exited, e.g. `unable to setup logger`: Kata
        1.x's proxy needs a syslog listening on /dev/log)."""
        try:
            lines = (self.paths.own / "proxy.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def problem_now(self) -> str | None:
        """Why the VM cannot be handed out because of its proxy, or None (synchronous)."""
        pidfd = self._pidfd.fd if self._pidfd is not None else None
        if self._proc is None or self._exited.is_set() or pidfd is None:
            return "its kata-proxy is not running"
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except OSError as exc:
            return f"its kata-proxy is gone ({exc.strerror})"
        return "its kata-proxy has exited" if info is not None else None

    def release(self) -> None:
        """Handed out with its VM: never signalled again (still reaped: it is our child)."""
        self._released = True

    def reclaim(self) -> None:
        """Undo release(): the hand-off was not delivered, the proxy is ours again."""
        self._released = False

    async def stop(self, timeout: float) -> None:
        """SIGTERM (Kata's kataProxy.stop), a bounded wait, SIGKILL (qmp.py's stop sequence,
        with no QMP to ask); reaped on return."""
        if self._proc is None or self._released:
            return
        self._stopping = True
        if self._pidfd is not None:
            await stop_process(self._pidfd, timeout, what="kata-proxy")
        self._close_pidfd()
