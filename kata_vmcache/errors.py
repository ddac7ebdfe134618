"""The errors kata-vmcache raises on purpose.

Everything we raise derives from `VmcacheError`, so entry points (the CLI, the gRPC
servicer) can catch exactly our errors: they print or send one line a person can act on,
and let anything else surface as the bug it is. Each error carries `exit_code`: 2 for
usage and configuration problems, 1 for everything else (the convention of most Unix
tools, and what the CLI returns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class VmcacheError(Exception):
    """Root of every error kata-vmcache raises deliberately."""

    exit_code = 1


class UsageError(VmcacheError):
    """The command line asks for something that cannot be done."""

    exit_code = 2


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a configuration file, located as precisely as we can."""

    key: str
    message: str
    path: Path | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        return f"{where}{self.key}: {self.message}" if self.key else f"{where}{self.message}"


class ConfigError(VmcacheError):
    """The configuration cannot be used; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class LaunchError(VmcacheError):
    """QEMU could not be started, or exited before its guest was ready."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.log_tail = log_tail
        detail = message
        if returncode is not None:
            detail += f" (exit code {returncode})"
        if log_tail:
            reason = qemu_reason(log_tail)
            if reason:
                detail += f": {reason}"
        super().__init__(detail)


def qemu_reason(log_tail: str) -> str:
    """The line of QEMU's output that says why it stopped: its last error line (QEMU
    prefixes errors with its program name, and may add a hint after them, such as "Use
    -machine help to list supported machines"), else its last line."""
    lines = [line.strip() for line in log_tail.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("qemu"):
            return line
    return lines[-1] if lines else ""


class GuestNotReady(LaunchError):
    """QEMU runs but the guest did not signal readiness in time."""


class VMStateError(VmcacheError):
    """An operation was asked of a VM in a state that does not allow it."""


class VMDead(VMStateError):
    """The VM's QEMU exited or stopped answering."""


class CacheClosed(VmcacheError):
    """The cache is shutting down and hands out nothing more."""


class EndpointInUse(VmcacheError):
    """Another live server answers on the endpoint we were asked to serve."""


class EndpointUnusable(VmcacheError):
    """The configured endpoint cannot be listened on (its directory cannot be made, the
    socket cannot be bound): a configuration problem, reported in one line at start."""

    exit_code = 2


class ServerUnavailable(VmcacheError):
    """No VM cache server answers at the endpoint (client side)."""


class RemoteError(VmcacheError):
    """The server answered a call with an error status (client side)."""


class RequestError(UsageError):
    """A client asked for a VM that cannot be had: fewer vCPUs or less memory than the base
    VM, or more than its hot-plug ceiling (client side; nothing was taken)."""


class GuestUnresponsive(VmcacheError):
    """The guest did not answer the liveness probe in time (client side): it hangs, or its
    clock is frozen."""


class HotplugError(VmcacheError):
    """QEMU or the guest did not take a hot-plugged vCPU or DIMM (client side)."""


class TemplateError(VmcacheError):
    """The VM template could not be built, saved, restored or cleaned up."""


class QemuUnusable(VmcacheError):
    """The configured QEMU could not tell its machine types (factory/host.py)."""


class DemoGuestError(VmcacheError):
    """The demo guest cannot be built from what this host has installed (demo/guest.py)."""


class GuestTimeout(VmcacheError, TimeoutError):
    """The guest did not answer (or did not become ready) in time (guest_channel.py). A
    TimeoutError too, so that code bounding a guest's answer catches it as one."""


class GuestError(VmcacheError):
    """The guest answered a command with an error (`err ...`; guest_channel.py)."""


class TtrpcError(VmcacheError):
    """A ttrpc server answered the call with a non-OK status (ttrpc.py). `code_name` is
    the gRPC name of `code` (ttrpc's statuses are gRPC's)."""

    def __init__(self, code: int, message: str, code_name: str = "") -> None:
        self.code = code
        self.code_name = code_name or f"code {code}"
        self.message = message
        super().__init__(f"{self.code_name}: {message}" if message else self.code_name)


class TtrpcProtocolError(VmcacheError):
    """The peer broke ttrpc's framing; the connection cannot be used any more (ttrpc.py)."""


class ServerGone(RemoteError):
    """The server ended the Monitor stream or stopped answering (snapshot.py)."""


class NoMonitor(RemoteError):
    """The server has no Monitor service (e.g. Kata's own VMCache server; snapshot.py)."""
