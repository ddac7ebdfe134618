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
            # The last line QEMU printed is almost always the reason; keep it on the line.
            last = log_tail.strip().splitlines()[-1] if log_tail.strip() else ""
            if last:
                detail += f": {last}"
        super().__init__(detail)


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


class ServerUnavailable(VmcacheError):
    """No VM cache server answers at the endpoint (client side)."""


class RemoteError(VmcacheError):
    """The server answered a call with an error status (client side)."""


class TemplateError(VmcacheError):
    """The VM template could not be built, saved, restored or cleaned up."""
