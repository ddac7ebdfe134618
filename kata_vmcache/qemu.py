"""One QEMU process and, while we own it, its QMP session.

`machine.VMSpec` is everything that makes two VMs interchangeable (what Kata compares), and
turns into Kata's QEMU argument list; `machine.VMPaths` is where one VM's sockets and files
live; `QemuProcess` owns the process:

    async with QemuProcess(spec.argv(vm_id, uuid, paths), paths, log=log) as qemu:
        await qemu.qmp.execute("cont")
        ...                         # leaving the block stops QEMU unless it was released

Lifecycle (after qemu's python/qemu/machine: launch, soft shutdown, hard shutdown, cleanup):

- `start()` runs QEMU from an argument list (never a shell) in a session of its own, so a
  terminal's Ctrl-C reaches the daemon but not the VMs, and a handed-off VM outlives us.
  QEMU starts with `-S` (CPUs stopped) and the QMP connection is made before the guest runs.
  If QEMU exits first, `LaunchError` carries the exit code and the tail of its log.
- `stop()` is QMP `quit`, a bounded wait, then SIGKILL; always reaps; idempotent.
- `release()` closes our QMP session and stops watching for ownership purposes: after a
  hand-off QEMU's single QMP slot belongs to the receiver. We still reap the process when
  it exits (it is our child), but never signal it again.
- `reclaim()` undoes a release whose hand-off reply never reached its receiver: it
  reconnects QMP, and the process is ours again.
- `kill()` is for a QEMU that stopped answering: SIGKILL at once, no `quit` to wait for.
- `idle()` closes the QMP session of a process we keep (a VM waiting in the cache): QEMU's
  one QMP slot is then free for whoever takes the VM, so a hand-off has no session to tear
  down; it watches the process over a `StatusChannel` instead, which `probe_status()`
  asks for the run state, cheaply enough to do every second for every cached VM.
  `execute()` opens a session again on demand (taking back an undelivered VM).
- `problem_now()` answers "has it exited, or is it stopped?" synchronously (a waitid on
  the pidfd and a /proc read), for the hand-off path, which must not wait on anything.

The process is watched with a pidfd on the event loop: exit is noticed at once, with no
polling and no SIGCHLD handler to share with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from qemu.qmp import ExecuteError, QMPClient, QMPError

from .errors import LaunchError, VMDead
from .machine import VMPaths, VMSpec, opt_value, qemu_name
from .procs import cmdline, pid_alive

__all__ = ["QemuProcess", "StatusChannel", "VMPaths", "VMSpec", "is_vm_qemu", "opt_value",
           "qemu_name"]

# qemu.qmp logs every message at DEBUG and each failed connection at ERROR; we report
# failures ourselves, with the VM's id and QEMU's own words.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

LOG_TAIL_BYTES = 4096
#: Opening the status channel of a VM that just booted: its QMP was answering a moment ago.
IDLE_CONNECT_TIMEOUT = 2.0


def is_vm_qemu(pid: int, vm_id: str) -> bool:
    """pid is alive and is the QEMU of VM vm_id (guards against pid reuse)."""
    return pid_alive(pid) and qemu_name(vm_id) in cmdline(pid)


class StatusChannel:
    """A QMP connection of our own to a VM waiting in the cache, only for `query-status`.

    Why not a qemu.qmp session: a check on it costs about three times the CPU (its reader
    and writer tasks), every VM is checked every SUPERVISE_INTERVAL, and closing it takes
    several loop iterations. This one is a non-blocking socket: a check is one send and
    one receive, and `close()` is synchronous, so a hand-off frees QEMU's one QMP slot for
    the receiver without awaiting anything."""

    def __init__(self, sock: socket.socket, pid: int | None) -> None:
        self._sock = sock
        self._pid = pid
        self._buffer = b""

    @classmethod
    async def open(cls, path: Path, timeout: float, *, pid: int | None) -> StatusChannel:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        channel = cls(sock, pid)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, str(path))
                await channel._reply(greeting=True)
                await loop.sock_sendall(sock, b'{"execute":"qmp_capabilities"}\n')
                await channel._reply()
        except BaseException:
            sock.close()
            raise
        return channel

    async def status(self, timeout: float) -> str:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(
                    self._sock, b'{"execute":"query-status"}\n')
                reply = await self._reply()
        except TimeoutError as exc:
            raise VMDead(f"QEMU {self._pid} did not answer QMP 'query-status' within "
                         f"{timeout:g} s") from exc
        except OSError as exc:
            raise VMDead(f"QEMU {self._pid}: QMP query-status failed ({exc})") from exc
        status = reply.get("return")
        if not isinstance(status, dict):
            raise VMDead(f"QEMU {self._pid}: query-status answered {reply}")
        return str(status.get("status"))

    async def _reply(self, *, greeting: bool = False) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise OSError(f"not a QMP message: {line[:80]!r}")
                if greeting or "return" in message or "error" in message:
                    return message  # anything else is an event: not ours to answer
                continue
            chunk = await loop.sock_recv(self._sock, 4096)
            if not chunk:
                raise OSError("QEMU closed the connection")
            self._buffer += chunk

    def close(self) -> None:
        # Unregister first: a receive still pending must not leave our fd number in the
        # selector, where a socket opened later under the same number would meet it.
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            loop.remove_writer(self._sock.fileno())
        self._sock.close()


async def _qmp_status(path: Path, timeout: float, *, pid: int | None) -> str:
    """One short QMP conversation on a `StatusChannel` of its own, all within `timeout`
    (a pooled VM whose channel could not be opened)."""
    try:
        async with asyncio.timeout(timeout):
            channel = await StatusChannel.open(path, timeout, pid=pid)
            try:
                return await channel.status(timeout)
            finally:
                channel.close()
    except TimeoutError as exc:
        raise VMDead(f"QEMU {pid} did not answer QMP 'query-status' within {timeout:g} s"
                     ) from exc
    except (OSError, ValueError) as exc:
        raise VMDead(f"QEMU {pid}: QMP query-status failed ({exc})") from exc


class QemuProcess:
    """Owns one QEMU process: launch, QMP session, exit watch, shutdown."""

    def __init__(self, argv: Sequence[str], paths: VMPaths, *, log: logging.Logger,
                 on_exit: Callable[[int], None] | None = None) -> None:
        self.argv = list(argv)
        self.paths = paths
        self.log = log
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._exited = asyncio.Event()
        self._released = False
        self._closing: asyncio.Future[None] | None = None
        self._session_lock = asyncio.Lock()
        self._status_channel: StatusChannel | None = None
        self._stat_path = ""
        self._end_callbacks: list[Callable[[], None]] = []
        #: A probe_status() in flight, so a hand-off can wait for the QMP slot to be free.
        self.probing: asyncio.Future[str] | None = None
        self.qmp: QMPClient | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    @property
    def released(self) -> bool:
        return self._released

    async def __aenter__(self) -> QemuProcess:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._released:
            await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        """Launch QEMU (CPUs stopped) and connect QMP; raise LaunchError on failure."""
        loop = asyncio.get_running_loop()
        self.paths.own.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Kata's DirMode (0750) for its VM directory; the shared directory must exist
        # before QEMU starts (its 9p device exports it).
        self.paths.shared.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(self.paths.log, "wb") as logfile:
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise LaunchError(f"cannot run {self.argv[0]}: {exc.strerror}",
                                  argv=self.argv) from exc
        self._pidfd = os.pidfd_open(self._proc.pid)
        self._stat_path = f"/proc/{self._proc.pid}/stat"
        loop.add_reader(self._pidfd, self._reap)
        try:
            self.qmp = await self._connect_qmp(timeout)
        except BaseException:
            await self.stop()
            raise

    async def _connect_qmp(self, timeout: float) -> QMPClient:
        deadline = time.monotonic() + timeout
        client = QMPClient(self.paths.dir.name)
        last_error: Exception | None = None
        while True:
            if self._exited.is_set():
                raise LaunchError("QEMU exited during start-up", argv=self.argv,
                                  returncode=self.returncode, log_tail=self.log_tail())
            # QEMU creates the socket a few ms after exec; connecting earlier only produces
            # errors to throw away. Other failures are retried until QEMU exits (its log
            # then says why) or the deadline passes.
            if self.paths.qmp.exists():
                try:
                    await client.connect(str(self.paths.qmp))
                    return client
                except Exception as exc:
                    last_error = exc
            if time.monotonic() > deadline:
                raise LaunchError(f"no QMP on {self.paths.qmp} after {timeout:g} s",
                                  argv=self.argv, log_tail=self.log_tail()) from last_error
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 0.01)

    def _reap(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is None:
            return  # spurious wake-up
        self._close_pidfd()
        self._close_status_channel()
        self._exited.set()
        if self.qmp is not None and self._closing is None:
            # Close the dead session now: qemu.qmp's reader failed with EOF, and unless
            # someone disconnects, asyncio logs that failure as never retrieved.
            self._closing = asyncio.ensure_future(self._disconnect_qmp())
        if self._on_exit is not None and not self._released:
            self._on_exit(self._proc.returncode)
        for callback in self._end_callbacks:
            callback()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once QEMU has exited and been reaped, whoever owned it then
        (unlike `on_exit`, also for a released process: we are still its parent)."""
        self._end_callbacks.append(callback)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def log_tail(self) -> str:
        try:
            with open(self.paths.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    async def execute(self, command: str, arguments: dict[str, object] | None = None,
                      *, timeout: float = 5.0) -> object:
        """One QMP command, bounded in time; VMDead when QEMU is gone or silent."""
        if self._released or not self.running:
            raise VMDead(f"QEMU {self.pid} is not running")
        if self.qmp is None:
            await self._open_session(timeout)
        assert self.qmp is not None
        try:
            return await asyncio.wait_for(self.qmp.execute(command, arguments), timeout)
        except TimeoutError as exc:
            raise VMDead(f"QEMU {self.pid} did not answer QMP {command!r} "
                         f"within {timeout:g} s") from exc
        except (ConnectionError, EOFError) as exc:
            raise VMDead(f"QEMU {self.pid} closed QMP during {command!r}") from exc
        except ExecuteError:
            raise  # QEMU answered with an error: it is alive, the command failed
        except QMPError as exc:
            raise VMDead(f"QEMU {self.pid} lost its QMP session during {command!r} "
                         f"({type(exc).__name__})") from exc

    async def release(self) -> None:
        """Give the process away: close QMP, never signal it again (we still reap it)."""
        self._released = True
        await self._disconnect_qmp()

    async def reclaim(self, timeout: float = 2.0) -> None:
        """Take back a released process: reconnect QMP. Raises VMDead when QEMU is gone or
        its QMP slot does not answer (someone else holds it: then it is not ours)."""
        if not self._released:
            return
        if not self.running:
            raise VMDead(f"QEMU {self.pid} is not running")
        await self._open_session(timeout)
        self._released = False
        if self._exited.is_set() and self._on_exit is not None:
            self._on_exit(self.returncode or 0)  # it died while released: report it now

    async def _open_session(self, timeout: float) -> None:
        async with self._session_lock:
            if self.qmp is not None:
                return
            self._close_status_channel()  # QEMU serves one QMP client at a time
            client = QMPClient(self.paths.dir.name)
            try:
                # A busy slot accepts the connection but never greets: bound the wait.
                await asyncio.wait_for(client.connect(str(self.paths.qmp)), timeout)
            except (TimeoutError, OSError, QMPError) as exc:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 1.0)
                raise VMDead(f"QEMU {self.pid}: cannot connect to QMP "
                             f"({exc or type(exc).__name__})") from exc
            self.qmp = client

    async def idle(self) -> None:
        """Close our QMP session, keep the process, watch it over a `StatusChannel` (see
        the module's docstring). If the channel cannot be opened, checks fall back to a
        connection each."""
        async with self._session_lock:
            await self._disconnect_qmp()
            if self._status_channel is None and self.running and not self._released:
                try:
                    self._status_channel = await StatusChannel.open(
                        self.paths.qmp, IDLE_CONNECT_TIMEOUT, pid=self.pid)
                except (OSError, ValueError, TimeoutError) as exc:
                    self.log.debug("no status channel to QEMU %s (%s)", self.pid, exc)

    def _close_status_channel(self) -> None:
        if self._status_channel is not None:
            self._status_channel.close()
            self._status_channel = None

    def release_idle(self) -> None:
        """`release()` for a process with no session open: nothing to await, so a hand-off
        does it between receiving the request and writing the reply at no cost."""
        assert self.qmp is None, "release_idle() with a QMP session open"
        self._released = True
        # Closed right after the reply is on its way, not before: closing wakes QEMU, which
        # costs the hand-off ~0.05 ms, and a receiver that connects first only waits in the
        # socket's backlog for the moment it takes QEMU to see our close. No probe can
        # start on it meanwhile (probe_status refuses a released process).
        channel, self._status_channel = self._status_channel, None
        if channel is not None:
            asyncio.get_running_loop().call_soon(channel.close)

    def problem_now(self) -> str | None:
        """Why the process cannot be handed out right now, or None: it exited (even if the
        loop has not run our exit callback yet), or a signal stopped it (SIGSTOP: it would
        not answer its new owner). A waitid on the pidfd, which reports an exit, or a stop
        of the whole thread group, without reaping (WNOWAIT); and the main thread's state
        in /proc, which shows a stop before every thread of a busy QEMU has stopped. A
        QEMU alive but stuck otherwise (a deadlock) is the supervisor's to find: asking
        QMP here would put a round trip on every hand-off."""
        if self._proc is None or self._exited.is_set() or self._pidfd is None:
            return "QEMU is not running"
        try:
            info = os.waitid(os.P_PIDFD, self._pidfd,
                             os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
            if info is None:
                fd = os.open(self._stat_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    state = os.read(fd, 512).rpartition(b")")[2].split(maxsplit=1)[0]
                finally:
                    os.close(fd)
        except OSError as exc:
            return f"QEMU is gone ({exc.strerror})"
        if info is not None:
            return ("QEMU is stopped by a signal" if info.si_code == os.CLD_STOPPED
                    else "QEMU has exited")
        if state in (b"T", b"t"):
            return "QEMU is stopped by a signal"
        if state in (b"Z", b"X"):
            return "QEMU has exited"
        return None

    async def probe_status(self, timeout: float) -> str:
        """QEMU's run state ("paused", "running", ...) of a pooled VM (one that is `idle()`),
        asked within `timeout` over its `StatusChannel` (or, if that could not be opened,
        one of its own); VMDead when it does not answer. This runs every
        SUPERVISE_INTERVAL for every cached VM."""
        if self._released or not self.running:
            raise VMDead(f"QEMU {self.pid} is not running")
        channel = self._status_channel
        probe = self.probing = asyncio.ensure_future(
            channel.status(timeout) if channel is not None
            else _qmp_status(self.paths.qmp, timeout, pid=self.pid))
        try:
            return await probe
        finally:
            self.probing = None

    async def kill(self) -> None:
        """SIGKILL now and reap: for a QEMU that stopped answering, where `quit` would only
        add a wait, and for a released one whose hand-off failed and cannot be reclaimed.
        Unlike `stop()` it acts on a released process: the caller has decided."""
        if self._proc is None:
            return
        if not self._exited.is_set():
            await self._sigkill()
        await self._forget()

    async def _sigkill(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGKILL)
        await self.wait(5.0)
        if not self._exited.is_set():  # only in D state; block briefly rather than leak
            self._proc.wait(5.0)
            self._reap()

    async def _forget(self) -> None:
        """Drop every handle on a process that has exited: channel, session, pidfd."""
        self._close_status_channel()
        await self._disconnect_qmp()
        self._close_pidfd()

    async def _disconnect_qmp(self) -> None:
        if self.qmp is not None:
            client, self.qmp = self.qmp, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    async def wait(self, timeout: float | None = None) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self.returncode

    async def stop(self, timeout: float = 3.0) -> None:
        """QMP quit, bounded wait, SIGKILL; reaped on return. No-op once stopped."""
        if self._proc is None or self._released:
            return
        if not self._exited.is_set():
            asked = False
            if self.qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.qmp.execute("quit"), min(timeout, 1.0))
                    asked = True
            if not asked:
                # No QMP (still starting, or it stopped answering): SIGTERM is QEMU's
                # other orderly way out.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._proc.pid, signal.SIGTERM)
            await self.wait(timeout)
        if not self._exited.is_set():
            self.log.warning("QEMU %d ignored quit for %.1f s; killing it", self._proc.pid,
                             timeout)
            await self._sigkill()
        await self._forget()
