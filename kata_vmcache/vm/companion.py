"""A process that lives beside a VM's QEMU and goes with it: Kata 1.x's kata-proxy, the
virtiofsd of a virtio-fs VM.

Both are started the way kata-runtime starts them for a factory VM, and their lifetime is
the VM's: the daemon stops them with every VM it stops, and leaves them alone with every
VM it hands out (from then on they are the receiver's). A companion is our child: it runs
in a session of its own (a signal to the daemon's process group never reaches it), writes
its own output to a log in the VM's state directory (never to a pipe of ours: a
companion that outlives the daemon must not die of SIGPIPE), and is always reaped.

Subclasses say what the process is (`what`, `log_name`) and launch it with `_launch()`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from ..errors import LaunchError
from .priority import Level, spawn
from .qmp import Pidfd, stop_process


def stop_handed_out(pid: int, check: Callable[[int], bool]) -> None:
    """What a receiver does with a companion of a VM it took and is done with: SIGTERM,
    if `pid` is still the process `check` says it is (a pid seen through a pidfd)."""
    if pid > 0 and (proc := Pidfd.of_pid(pid, check=check)):
        proc.signal(signal.SIGTERM)
        proc.close()


class Companion:
    """One companion process, owned until its VM is handed out (`release()`)."""

    #: How logs and errors name it ("kata-proxy", "virtiofsd").
    what: ClassVar[str]
    #: Its output, in the VM's own state directory.
    log_name: ClassVar[str]

    def __init__(self, binary: Path, argv: list[str], own_dir: Path, *,
                 log: logging.Logger) -> None:
        self.binary = binary
        self.argv = argv
        self.log = log
        self.log_path = own_dir / self.log_name
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: Pidfd | None = None
        self._exited = asyncio.Event()
        self._released = False
        self._stopping = False
        self._on_exit: list[Callable[[int | None], None]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode if self._proc is not None else None

    def on_exit(self, callback: Callable[[int | None], None]) -> None:
        """Call `callback(returncode)` when it exits while ours and not being stopped."""
        self._on_exit.append(callback)

    def _launch(self, priority: Level, pass_fds: Sequence[int] = ()) -> None:
        """Popen at `priority` (its VM's); LaunchError when it cannot run."""
        with open(self.log_path, "ab") as logfile:
            try:
                self._proc = spawn(self.argv, priority, stdin=subprocess.DEVNULL,
                                   stdout=logfile, stderr=subprocess.STDOUT,
                                   start_new_session=True, close_fds=True,
                                   pass_fds=tuple(pass_fds))
            except OSError as exc:
                raise LaunchError(f"cannot run {self.what} {self.binary}: {exc.strerror}",
                                  argv=self.argv) from exc
        self._pidfd = Pidfd.of_child(self._proc, on_exit=self._reaped)

    def _reaped(self) -> None:
        assert self._proc is not None
        self._close_pidfd()
        self._exited.set()
        if self._released or self._stopping:
            return
        self.log.warning("%s %d exited with %s", self.what, self._proc.pid,
                         self._proc.returncode)
        for callback in self._on_exit:
            callback(self._proc.returncode)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._pidfd.close()

    async def wait(self) -> None:
        """Until it has exited (and been reaped)."""
        await self._exited.wait()

    def last_words(self) -> str:
        """The last line of its log: usually why it exited."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")

    def problem_now(self) -> str | None:
        """Why its VM cannot be handed out because of it, or None (synchronous: a waitid
        on the pidfd, which sees an exit the loop has not dispatched yet)."""
        if (self._proc is None or self._exited.is_set() or self._pidfd is None
                or self._pidfd.fd is None):
            return f"its {self.what} is not running"
        try:
            info = self._pidfd.status_now()
        except OSError as exc:
            return f"its {self.what} is gone ({exc.strerror})"
        return f"its {self.what} has exited" if info is not None else None

    def returncode_now(self) -> int | None:
        """Its exit code if it has exited, even if the loop has not seen it yet (reaps it,
        unlike QemuProcess.exited_now: the pidfd watch then finds it reaped); None while it
        runs."""
        return self._proc.poll() if self._proc is not None else None

    def expect_exit(self) -> None:
        """Its exit from now on is no news (its VM is being stopped, or its QEMU, which
        it serves, has exited): not logged, no callback."""
        self._stopping = True

    def end_with_qemu(self) -> None:
        """Its VM's QEMU has exited, the VM being handed out: SIGTERM, once, even though
        released (a virtiofsd has usually exited already, with QEMU's connection). Reaped
        when it goes, as always; nothing waits for it here."""
        self.expect_exit()
        if self._pidfd is not None:
            self._pidfd.signal(signal.SIGTERM)

    def release(self) -> None:
        """Handed out with its VM: never signalled again (still reaped: it is our child)."""
        self._released = True

    def reclaim(self) -> None:
        """Undo release(): the hand-off was not delivered, it is ours again."""
        self._released = False

    async def stop(self, timeout: float) -> None:
        """SIGTERM, a bounded wait, SIGKILL (qmp.py's stop sequence, with no QMP to ask);
        reaped on return. Nothing for one released with its VM."""
        if self._proc is None or self._released:
            return
        self._stopping = True
        if self._pidfd is not None:
            await stop_process(self._pidfd, timeout, what=self.what)
        self._close_pidfd()
