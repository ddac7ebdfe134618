"""QMP-level work and the end of a QEMU, written once for every caller.

The daemon (`qemu.QemuProcess`), the client's handed-out VM (`handle.VMHandle`), recovery
of a crashed daemon's VMs (`daemon.recover`), kata-proxy (`proxy.KataProxy`) and the
benchmark all talk to QEMU and stop processes the same way, through this module:

    channel = await StatusChannel.open(path, 2.0, pid=pid)   # query-status only, cheap
    status = await channel.status(1.0)                       # "paused", "running", ...
    channel.close()                                          # synchronous

    client = await open_session(path, "vm-x", timeout=5.0)   # a qemu.qmp session, bounded
    await disconnect(client)                                 # bounded; never raises

    proc = Pidfd.of_pid(pid, check=lambda p: is_vm_qemu(p, vm_id))   # None: not ours
    await stop_process(proc, 3.0, quit=lambda t: ask_quit(client, t), log=log)

**The stop sequence** (`stop_process`, after qemu's python/qemu/machine `_soft_shutdown`
and `_hard_shutdown`):

1. ask it to go: QMP `quit`, given at most QUIT_ANSWER_TIMEOUT to be answered; when there
   is no QMP to ask, or it did not answer, SIGTERM (QEMU's other orderly way out; a
   kata-proxy's only one). `wake=True` sends SIGCONT right after the SIGTERM, for a process
   that may be stopped by a signal (a crashed daemon's orphans): it then handles the
   SIGTERM now instead of hanging until SIGKILL;
2. a bounded wait for its exit, seen through the pidfd;
3. SIGKILL (`kill_process`, also the way to end a QEMU that stopped answering), and a wait
   of KILL_WAIT; a child of ours still there then (stuck in the kernel, D state) is waited
   for, blocking, once more rather than leaked.

Every signal goes through a pidfd, opened before the process is checked to be the one
meant (`Pidfd.of_pid`'s `check`): the pidfd pins that process, so a recycled pid is never
hit. A process is never stopped unless a caller has proven it is its own.

**StatusChannel**: why not a qemu.qmp session for the supervisor's `query-status`, which
every cached VM answers every SUPERVISE_INTERVAL: a check on a session costs about three
times the CPU (its reader and writer tasks), and closing one takes several loop
iterations. A StatusChannel is a non-blocking socket: a check is one send and one receive,
and `close()` is synchronous, so a hand-off frees QEMU's one QMP slot for the receiver
without awaiting anything.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu.qmp import QMPClient

from ..errors import VMDead

__all__ = ["DISCONNECT_TIMEOUT", "KILL_WAIT", "QUIT_ANSWER_TIMEOUT", "Pidfd",
           "StatusChannel", "ask_quit", "disconnect", "kill_process", "open_session",
           "query_status", "stop_process"]

# qemu.qmp logs every message at DEBUG and each failed connection at ERROR; we report
# failures ourselves, with the VM's id and QEMU's own words.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

#: How long closing a qemu.qmp session may take (QEMU gone or hung: it is dropped anyway).
DISCONNECT_TIMEOUT = 2.0
#: How long QMP `quit` may take to be answered before SIGTERM is tried instead.
QUIT_ANSWER_TIMEOUT = 1.0
#: How long a process gets to vanish after SIGKILL.
KILL_WAIT = 5.0


# --- QMP -------------------------------------------------------------------------------


class StatusChannel:
    """A QMP connection of our own to a VM, only for `query-status` (module docstring)."""

    def __init__(self, sock: socket.socket, pid: int | None) -> None:
        self._sock = sock
        self._pid = pid
        self._buffer = b""

    @classmethod
    async def open(cls, path: Path, timeout: float, *, pid: int | None) -> StatusChannel:
        """Connect, read the greeting, negotiate, all within `timeout`. Raises TimeoutError
        (a busy slot accepts the connection but never greets), OSError or ValueError."""
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
        """QEMU's run state, within `timeout`; VMDead when it does not answer."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(
                    self._sock, b'{"execute":"query-status"}\n')
                reply = await self._reply()
        except TimeoutError as exc:
            raise VMDead(f"QEMU {self._pid} did not answer QMP 'query-status' within "
                         f"{timeout:g} s") from exc
        except (OSError, ValueError) as exc:
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
        with contextlib.suppress(RuntimeError, ValueError):
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            loop.remove_writer(self._sock.fileno())
        self._sock.close()


async def query_status(path: Path, timeout: float, *, pid: int | None,
                       connect_timeout: float | None = None,
                       keep: bool = False) -> tuple[str, StatusChannel | None]:
    """One `query-status` on a StatusChannel of its own: QEMU must greet within
    `connect_timeout` and answer within `timeout` (without `connect_timeout`, both within
    `timeout` in all). Returns the status, and the channel when `keep` (else it is
    closed). VMDead when QEMU does not greet (its slot is someone else's), does not
    answer, or is gone."""
    overall = timeout if connect_timeout is None else connect_timeout + timeout
    try:
        async with asyncio.timeout(overall):
            channel = await StatusChannel.open(path, connect_timeout or timeout, pid=pid)
            try:
                status = await channel.status(timeout)
            except BaseException:
                channel.close()
                raise
    except TimeoutError as exc:
        raise VMDead(f"QEMU {pid} did not answer QMP 'query-status' within {overall:g} s"
                     ) from exc
    except (OSError, ValueError) as exc:
        raise VMDead(f"QEMU {pid}: QMP query-status failed ({exc})") from exc
    if keep:
        return status, channel
    channel.close()
    return status, None


async def open_session(path: Path, name: str, timeout: float) -> QMPClient:
    """A qemu.qmp session on QEMU's QMP socket, greeted and negotiated within `timeout`.
    Raises TimeoutError (QEMU hangs, or another client holds its one QMP slot: the kernel
    accepts the connection and nothing is heard), or QMPError/OSError; a half-open
    client is closed first."""
    client = QMPClient(name)
    try:
        async with asyncio.timeout(timeout):
            await client.connect(str(path))
    except BaseException:
        await disconnect(client, 1.0)
        raise
    return client


async def disconnect(client: QMPClient, timeout: float = DISCONNECT_TIMEOUT) -> None:
    """Close a qemu.qmp session within `timeout`, whatever state it is in; never raises
    (but lets a cancellation through)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), timeout)


async def ask_quit(qmp: QMPClient | Path, timeout: float, *, name: str = "quit") -> bool:
    """QMP `quit` within `timeout`, on an open session or on one of its own at that path
    (closed again afterwards): whether QEMU accepted it."""
    own: QMPClient | None = None
    try:
        async with asyncio.timeout(timeout):
            if isinstance(qmp, QMPClient):
                client = qmp
            else:
                client = own = QMPClient(name)
                await own.connect(str(qmp))
            await client.execute("quit")
    except Exception:  # a stop goes on to SIGTERM whatever went wrong here
        return False
    finally:
        if own is not None:
            await disconnect(own, 1.0)
    return True


# --- processes -------------------------------------------------------------------------


class Pidfd:
    """One process seen through a pidfd: its exit is an event on the loop (no polling, no
    SIGCHLD handler to share with asyncio), and a signal reaches the process the pidfd was
    opened on, never one that reused its pid. For a child of ours (`of_child`), the exit
    is also reaped (Popen.poll) before `on_exit` runs.

    `close()` stops watching and closes the descriptor; `exited` keeps what it knew."""

    def __init__(self, pid: int, fd: int, *, child: subprocess.Popen[bytes] | None = None,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.pid = pid
        self._fd: int | None = fd
        self._child = child
        self._on_exit = on_exit
        self.exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    @classmethod
    def of_child(cls, child: subprocess.Popen[bytes], *,
                 on_exit: Callable[[], None] | None = None) -> Pidfd:
        """Our child `child` (which cannot be reaped behind our back, so needs no check)."""
        return cls(child.pid, os.pidfd_open(child.pid), child=child, on_exit=on_exit)

    @classmethod
    def of_pid(cls, pid: int, *, check: Callable[[int], bool],
               on_exit: Callable[[], None] | None = None) -> Pidfd | None:
        """The process at `pid`, if it runs and `check(pid)` proves it is the one meant;
        else None. Opened first, checked second: the pidfd pins the process checked."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # ProcessLookupError, or not ours to see
            return None
        if not check(pid):
            os.close(fd)
            return None
        return cls(pid, fd, on_exit=on_exit)

    @property
    def fd(self) -> int | None:
        """The pidfd, until `close()`."""
        return self._fd

    @property
    def running(self) -> bool:
        """Watched, and not seen to exit."""
        return self._fd is not None and not self.exited.is_set()

    def _readable(self) -> None:
        if self._child is not None and self._child.poll() is None:
            return  # spurious wake-up: the child has not exited
        self._unwatch()  # a pidfd stays readable once the process has exited
        self.exited.set()
        if self._on_exit is not None:
            self._on_exit()

    def _unwatch(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)

    def signal(self, *signals: signal.Signals) -> None:
        """Send `signals` in order; nothing once closed or exited (not an error)."""
        for sig in signals:
            if self._fd is None:
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._fd, sig)

    def status_now(self, *, stopped: bool = False) -> os.waitid_result | None:
        """Its exit (or, with `stopped`, a stop of the whole thread group) even if the loop
        has not dispatched it yet: a waitid on the pidfd that neither blocks nor reaps;
        None while it runs. OSError once the pidfd is closed or the process gone."""
        if self._fd is None:
            raise ProcessLookupError(f"process {self.pid} is no longer watched")
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT | (os.WSTOPPED if stopped else 0)
        return os.waitid(os.P_PIDFD, self._fd, flags)

    async def wait(self, timeout: float | None) -> bool:
        """Whether the process exited within `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout)
        return self.exited.is_set()

    def reap_blocking(self, timeout: float) -> bool:
        """For a child that did not go after SIGKILL (D state): block up to `timeout` for
        it rather than leak it. Whether it was reaped."""
        if self._child is None or self.exited.is_set():
            return self.exited.is_set()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._child.wait(timeout)
            self._readable()
        return self.exited.is_set()

    def close(self) -> None:
        if self._fd is not None:
            self._unwatch()
            os.close(self._fd)
            self._fd = None


async def stop_process(proc: Pidfd, timeout: float, *,
                       quit: Callable[[float], Awaitable[bool]] | None = None,
                       wake: bool = False, log: logging.Logger | None = None,
                       what: str = "QEMU") -> bool:
    """The stop sequence (module docstring): `quit(seconds)` or SIGTERM (+ SIGCONT with
    `wake`), `timeout` to exit, then `kill_process`. With `log`, escalating to SIGKILL is
    a warning. Whether the process has exited."""
    if proc.exited.is_set():
        return True
    asked = quit is not None and await quit(min(timeout, QUIT_ANSWER_TIMEOUT))
    if not asked:
        proc.signal(signal.SIGTERM, *((signal.SIGCONT,) if wake else ()))
    if await proc.wait(timeout):
        return True
    if log is not None:
        log.warning("%s %d ignored %s for %.1f s; killing it", what, proc.pid,
                    "quit" if asked else "SIGTERM", timeout)
    return await kill_process(proc, log=log, what=what)


async def kill_process(proc: Pidfd, *, log: logging.Logger | None = None,
                       what: str = "QEMU") -> bool:
    """SIGKILL and a wait of KILL_WAIT; a child still there is then waited for, blocking,
    once more. With `log`, one that survives is an error. Whether it has exited."""
    if not proc.exited.is_set():
        proc.signal(signal.SIGKILL)
        if not await proc.wait(KILL_WAIT) and not proc.reap_blocking(KILL_WAIT):
            if log is not None:
                log.error("%s %d survived SIGKILL for %.0f s (stuck in the kernel?)", what,
                          proc.pid, KILL_WAIT)
            return False
    return True
