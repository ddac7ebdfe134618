"""One QEMU process and, while we own it, its QMP session.

`spec.VMSpec` is everything that makes two VMs interchangeable (what Kata compares), and
turns into Kata's QEMU argument list; `paths.VMPaths` is where one VM's sockets and files
live; `QemuProcess` owns the process (the QMP conversation and the stop sequence it uses
are qmp.py's, shared with every other caller):

    async with QemuProcess(spec.argv(vm_id, uuid, paths), paths, log=log) as qemu:
        await qemu.execute("cont")
        ...                         # leaving the block stops QEMU unless it was released

Run state (`RunState`, `QemuProcess.state`), after qemu's python/qemu/machine (launch, soft
shutdown, hard shutdown, cleanup):

    NEW ─start()─> STARTING ─QMP greets─> SESSION ─idle()─> IDLE ─release_idle()─> RELEASED
                                            │  <─execute()──┘                      │ │
                                            └─────────────release()────────────────┘ │
                                                 IDLE <──────────reclaim()───────────┘
    STARTING, SESSION, IDLE ─stop() or kill()─> STOPPING       (kill() also from RELEASED)
    STARTING .. STOPPING ─QEMU exits, is reaped─> EXITED

- NEW -> STARTING: `start()` runs QEMU from an argument list (never a shell) in a session
  of its own, so a terminal's Ctrl-C reaches the daemon but not the VMs, and a handed-off
  VM outlives us. QEMU starts with `-S` (CPUs stopped) and the QMP connection is made
  before the guest runs. If QEMU exits first, `LaunchError` carries the exit code and the
  tail of its log.
- SESSION: ours, with a qemu.qmp session (`qmp`) open: booting, templating.
- IDLE: ours, no session (`idle()`): QEMU's one QMP slot is free for whoever takes the VM,
  so a hand-off has no session to tear down. It is watched over a `qmp.StatusChannel`
  instead, which `probe_status()` asks for the run state, cheaply enough to do every
  second for every cached VM (a probe in flight is `probing`: an operation on an IDLE
  process, not a state of its own, which a hand-off waits for). `execute()` opens a
  session again on demand (SESSION).
- RELEASED: given away (`release()`, or `release_idle()` at no cost in the hand-off): QMP
  belongs to the receiver; we still reap the process when it exits (it is our child), but
  never signal it again, and its exit is not reported to `on_exit`. `reclaim()` undoes a
  release whose hand-off reply never reached its receiver: it asks `query-status` on a
  StatusChannel it keeps, so the process is IDLE again and the caller has its status
  from the same connection.
- STOPPING: `stop()` (QMP `quit`, or SIGTERM with no session; a bounded wait; SIGKILL:
  `qmp.stop_process`) or
  `kill()` (SIGKILL at once, for a QEMU that stopped answering, or a released one that
  cannot be reclaimed: the caller has decided). Both always reap and are idempotent.
- EXITED: QEMU exited and was reaped; every handle on it is closed.

Asking for a transition the table does not allow raises `VMStateError` naming the current
and the required states. `problem_now()` answers "has it exited, or is it stopped?"
synchronously (a waitid on the pidfd and a /proc read), for the hand-off path, which must
not wait on anything.

The process is watched with a pidfd on the event loop (`qmp.Pidfd`): exit is noticed at
once, with no polling and no SIGCHLD handler to share with asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from qemu.qmp import ExecuteError, QMPClient, QMPError

from ..errors import LaunchError, VMDead, VMStateError
from ..procs import cmdline, pid_alive
from .paths import VMPaths, qemu_name
from .priority import Level, spawn
from .qmp import (
    KILL_WAIT,
    Pidfd,
    StatusChannel,
    ask_quit,
    disconnect,
    kill_process,
    open_session,
    query_status,
    stop_process,
)

__all__ = ["QemuProcess", "RunState", "is_vm_qemu"]

LOG_TAIL_BYTES = 4096
#: Opening the status channel of a VM that just booted: its QMP was answering a moment ago.
IDLE_CONNECT_TIMEOUT = 2.0
#: Taking back a released VM: its QMP slot must greet within this (else it is not ours).
RECLAIM_CONNECT_TIMEOUT = 2.0


def is_vm_qemu(pid: int, vm_id: str) -> bool:
    """pid is alive and is the QEMU of VM vm_id (guards against pid reuse)."""
    return pid_alive(pid) and qemu_name(vm_id) in cmdline(pid)


class RunState(enum.Enum):
    """Where a `QemuProcess` is in its life (module docstring)."""

    NEW = "new"
    STARTING = "starting"
    SESSION = "session"
    IDLE = "idle"
    RELEASED = "released"
    STOPPING = "stopping"
    EXITED = "exited"


_S = RunState
_ALLOWED: dict[RunState, frozenset[RunState]] = {
    _S.NEW: frozenset({_S.STARTING}),
    _S.STARTING: frozenset({_S.SESSION, _S.STOPPING, _S.EXITED}),
    _S.SESSION: frozenset({_S.IDLE, _S.RELEASED, _S.STOPPING, _S.EXITED}),
    _S.IDLE: frozenset({_S.SESSION, _S.RELEASED, _S.STOPPING, _S.EXITED}),
    _S.RELEASED: frozenset({_S.IDLE, _S.STOPPING, _S.EXITED}),
    _S.STOPPING: frozenset({_S.EXITED}),
    _S.EXITED: frozenset(),
}
#: States in which the process is ours to use (QMP) and to stop.
_OURS = frozenset({_S.STARTING, _S.SESSION, _S.IDLE})


class QemuProcess:
    """Owns one QEMU process: launch, QMP session, exit watch, shutdown."""

    def __init__(self, argv: Sequence[str], paths: VMPaths, *, log: logging.Logger,
                 on_exit: Callable[[int], None] | None = None) -> None:
        self.argv = list(argv)
        self.paths = paths
        self.log = log
        self._on_exit = on_exit
        self._state = RunState.NEW
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: Pidfd | None = None
        self._exited = asyncio.Event()
        #: The dead session's disconnect, started when QEMU exits, awaited by `_forget()`.
        self._closing: asyncio.Future[None] | None = None
        self._session_lock = asyncio.Lock()
        self._status_channel: StatusChannel | None = None
        self._stat_path = ""
        self._end_callbacks: list[Callable[[], None]] = []
        #: A probe_status() in flight, so a hand-off can wait for its verdict.
        self.probing: asyncio.Future[str] | None = None
        #: The qemu.qmp session, in SESSION (None in every other state).
        self.qmp: QMPClient | None = None
        #: The CPU priority QEMU is launched at (priority.py); set before start().
        self.priority: Level = "normal"

    def __repr__(self) -> str:
        return f"<QemuProcess pid={self.pid} {self._state.value}>"

    @property
    def state(self) -> RunState:
        return self._state

    def _enter(self, new: RunState) -> None:
        if new not in _ALLOWED[self._state]:
            wanted = " or ".join(sorted(s.value for s, nxt in _ALLOWED.items() if new in nxt))
            raise VMStateError(f"QEMU {self.pid} is {self._state.value}; going to "
                               f"{new.value} needs it to be {wanted}")
        self._state = new

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
        """Given away and still running (RELEASED)."""
        return self._state is RunState.RELEASED

    async def __aenter__(self) -> QemuProcess:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._state is not RunState.RELEASED:
            await self.stop()

    async def start(self, timeout: float = 10.0) -> None:
        """Launch QEMU (CPUs stopped) and connect QMP; raise LaunchError on failure."""
        self._enter(RunState.STARTING)
        self.paths.own.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Kata's DirMode (0750) for its VM directory; the shared directory must exist
        # before QEMU starts (its 9p device exports it).
        self.paths.shared.mkdir(mode=0o750, parents=True, exist_ok=True)
        with open(self.paths.log, "wb") as logfile:
            try:
                self._proc = spawn(self.argv, self.priority, stdin=subprocess.DEVNULL,
                                   stdout=logfile, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True)
            except OSError as exc:
                self._state = RunState.EXITED  # nothing ran
                raise LaunchError(f"cannot run {self.argv[0]}: {exc.strerror}",
                                  argv=self.argv) from exc
        self._pidfd = Pidfd.of_child(self._proc, on_exit=self._reaped)
        self._stat_path = f"/proc/{self._proc.pid}/stat"
        try:
            self.qmp = await self._connect_qmp(timeout)
            self._enter(RunState.SESSION)
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
                await disconnect(client, 1.0)
                raise LaunchError(f"no QMP on {self.paths.qmp} after {timeout:g} s",
                                  argv=self.argv, log_tail=self.log_tail()) from last_error
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), 0.01)

    def _reaped(self) -> None:
        """QEMU exited and was reaped (the pidfd's `on_exit`)."""
        assert self._proc is not None
        was = self._state
        self._state = RunState.EXITED
        self._close_pidfd()
        self._close_status_channel()
        self._exited.set()
        if self.qmp is not None and self._closing is None:
            # Close the dead session now: qemu.qmp's reader failed with EOF, and unless
            # someone disconnects, asyncio logs that failure as never retrieved.
            client, self.qmp = self.qmp, None
            self._closing = asyncio.ensure_future(disconnect(client))
        if self._on_exit is not None and was is not RunState.RELEASED:
            self._on_exit(self._proc.returncode)
        for callback in self._end_callbacks:
            callback()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once QEMU has exited and been reaped, whoever owned it then
        (unlike `on_exit`, also for a released process: we are still its parent)."""
        self._end_callbacks.append(callback)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._pidfd.close()

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
        """One QMP command, bounded in time; VMDead when QEMU is gone or silent, or not ours
        to talk to (released, being stopped). In IDLE it opens a session first."""
        if self._state not in (RunState.SESSION, RunState.IDLE) or not self.running:
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
        """Give the process away (SESSION or IDLE -> RELEASED): close our QMP session and
        status channel, never signal it again (we still reap it)."""
        if self._state is RunState.RELEASED:
            return
        self._enter(RunState.RELEASED)
        self._close_status_channel()
        await self._disconnect_qmp()

    async def reclaim(self, timeout: float = 1.0) -> str:
        """Take back a released process (RELEASED -> IDLE) and say what state QEMU is in
        ("paused", ...), all on one connection: a StatusChannel whose QMP slot must greet
        within RECLAIM_CONNECT_TIMEOUT (else someone else holds it: then it is not ours)
        and answer `query-status` within `timeout`. The channel stays open, as for every
        IDLE process. VMDead when QEMU is gone or does not answer; the process then stays
        released (the caller decides: `kill()`)."""
        if self._state is not RunState.RELEASED or not self.running:
            raise VMDead(f"QEMU {self.pid} is not running" if not self.running else
                         f"QEMU {self.pid} is {self._state.value}, not released")
        status, channel = await query_status(self.paths.qmp, timeout, pid=self.pid,
                                             connect_timeout=RECLAIM_CONNECT_TIMEOUT,
                                             keep=True)
        assert channel is not None
        if self._state is not RunState.RELEASED:  # it exited while we asked
            channel.close()
            raise VMDead(f"QEMU {self.pid} is not running")
        self._enter(RunState.IDLE)
        self._status_channel = channel
        return status

    async def _open_session(self, timeout: float) -> None:
        async with self._session_lock:
            if self.qmp is not None:
                return
            self._close_status_channel()  # QEMU serves one QMP client at a time
            try:
                client = await open_session(self.paths.qmp, self.paths.dir.name, timeout)
            except (TimeoutError, OSError, QMPError) as exc:
                raise VMDead(f"QEMU {self.pid}: cannot connect to QMP "
                             f"({exc or type(exc).__name__})") from exc
            if self._state is not RunState.IDLE:  # it exited, or was stopped, meanwhile
                await disconnect(client)
                raise VMDead(f"QEMU {self.pid} is not running")
            self.qmp = client
            self._enter(RunState.SESSION)

    async def idle(self) -> None:
        """SESSION -> IDLE: close our QMP session, keep the process, watch it over a
        StatusChannel (module docstring). If the channel cannot be opened, checks fall back
        to a connection each. Nothing to do in any other state."""
        async with self._session_lock:
            if self._state is RunState.SESSION:
                self._enter(RunState.IDLE)
                await self._disconnect_qmp()
            if self._state is not RunState.IDLE or self._status_channel is not None:
                return
            try:
                channel = await StatusChannel.open(self.paths.qmp, IDLE_CONNECT_TIMEOUT,
                                                   pid=self.pid)
            except (OSError, ValueError, TimeoutError) as exc:
                self.log.debug("no status channel to QEMU %s (%s)", self.pid, exc)
                return
            if self._state is RunState.IDLE and self._status_channel is None:
                self._status_channel = channel
            else:  # it exited, or was released or stopped, while the channel opened
                channel.close()

    def _close_status_channel(self) -> None:
        if self._status_channel is not None:
            self._status_channel.close()
            self._status_channel = None

    def release_idle(self) -> None:
        """`release()` for an IDLE process (no session open): nothing to await, so a
        hand-off does it between receiving the request and writing the reply at no cost."""
        if self._state is not RunState.IDLE:
            raise VMStateError(f"QEMU {self.pid} is {self._state.value}; a release without "
                               "awaiting needs it to be idle")
        self._enter(RunState.RELEASED)
        # Closed right after the reply is on its way, not before: closing wakes QEMU, which
        # costs the hand-off ~0.05 ms, and a receiver that connects first only waits in the
        # socket's backlog for the moment it takes QEMU to see our close. No probe can
        # start on it meanwhile (probe_status refuses a released process).
        channel, self._status_channel = self._status_channel, None
        if channel is not None:
            asyncio.get_running_loop().call_soon(channel.close)

    def exited_now(self) -> bool:
        """Whether QEMU has exited, even if the loop has not run our exit callback yet (a
        waitid on the pidfd, without reaping)."""
        if self._exited.is_set() or self._pidfd is None or self._pidfd.fd is None:
            return self._proc is not None
        try:
            return self._pidfd.status_now() is not None
        except OSError:
            return True

    def problem_now(self) -> str | None:
        """Why the process cannot be handed out right now, or None: it exited (even if the
        loop has not run our exit callback yet), or a signal stopped it (SIGSTOP: it would
        not answer its new owner). A waitid on the pidfd, which reports an exit, or a stop
        of the whole thread group, without reaping (WNOWAIT); and the main thread's state
        in /proc, which shows a stop before every thread of a busy QEMU has stopped. A
        QEMU alive but stuck otherwise (a deadlock) is the supervisor's to find: asking
        QMP here would put a round trip on every hand-off."""
        if (self._proc is None or self._exited.is_set() or self._pidfd is None
                or self._pidfd.fd is None):
            return "QEMU is not running"
        try:
            info = self._pidfd.status_now(stopped=True)
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
        """QEMU's run state ("paused", "running", ...) of an IDLE process (a pooled VM),
        asked within `timeout` over its StatusChannel (or, if that could not be opened,
        one of its own); VMDead when it does not answer, or is not IDLE. This runs every
        SUPERVISE_INTERVAL for every cached VM."""
        if self._state is not RunState.IDLE or not self.running:
            raise VMDead(f"QEMU {self.pid} is not running" if not self.running else
                         f"QEMU {self.pid} is {self._state.value}: only an idle one is probed")
        channel = self._status_channel
        probe = self.probing = asyncio.ensure_future(
            channel.status(timeout) if channel is not None
            else self._status_once(timeout))
        try:
            return await probe
        finally:
            self.probing = None

    async def _status_once(self, timeout: float) -> str:
        status, _ = await query_status(self.paths.qmp, timeout, pid=self.pid)
        return status

    async def kill(self) -> None:
        """SIGKILL now and reap: for a QEMU that stopped answering, where `quit` would only
        add a wait, and for a released one whose hand-off failed and cannot be reclaimed.
        Unlike `stop()` it acts on a released process: the caller has decided."""
        if self._proc is None:
            return
        if self._state is not RunState.EXITED:
            if self._state is not RunState.STOPPING:
                self._enter(RunState.STOPPING)
            assert self._pidfd is not None
            await kill_process(self._pidfd, log=self.log)
        await self._forget()

    async def _forget(self) -> None:
        """Drop every handle on a process that has exited: channel, session, pidfd."""
        self._close_status_channel()
        await self._disconnect_qmp()
        if self._closing is not None:
            await self._closing
        self._close_pidfd()

    async def _disconnect_qmp(self) -> None:
        if self.qmp is not None:
            client, self.qmp = self.qmp, None
            await disconnect(client)

    async def wait(self, timeout: float | None = None) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
        return self.returncode

    async def stop(self, timeout: float = 3.0) -> None:
        """QMP quit (SIGTERM without a session), bounded wait, SIGKILL (`qmp.stop_process`);
        reaped on return. A no-op for a released process, and once stopped."""
        if self._proc is None or self._state is RunState.RELEASED:
            return
        if self._state in _OURS:
            self._enter(RunState.STOPPING)
            qmp = self.qmp
            assert self._pidfd is not None
            await stop_process(
                self._pidfd, timeout, log=self.log,
                quit=None if qmp is None else lambda seconds: ask_quit(qmp, seconds))
        elif (self._state is RunState.STOPPING and self._pidfd is not None
              and not await self._pidfd.wait(timeout + 2 * KILL_WAIT)):
            # Another stop() or kill() is under way: its outcome is ours, as long as it may
            # take; past that, the last step of the sequence.
            await kill_process(self._pidfd, log=self.log)
        await self._forget()
