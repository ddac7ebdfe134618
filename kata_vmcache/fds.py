"""File descriptors: the daemon's open-file limit, and what it does when they run out.

Every gRPC connection holds a descriptor, and so does each cached VM (its pidfd, its QMP
status channel). A daemon started by hand inherits the shell's soft limit, usually 1024,
although the hard limit allows far more: like Go programs since Go 1.19 (os package,
`rlimit.go`), the daemon raises its soft RLIMIT_NOFILE to the hard limit at start
(`raise_open_file_limit`). QEMU raises its own limit the same way at start, so the VMs need
nothing from us. Under systemd the unit sets LimitNOFILE itself.

When descriptors do run out (the hard limit reached, or the system's file table full),
grpc stops accepting connections and retries every second (new clients wait in the
socket's backlog; connections already open are served), and VM boots fail and back off.
`DescriptorWatch` notices it, logs one warning for the whole episode and one line when it
is over, and then tells the pool to retry its boots at once. grpc's own log line for every
retry is silenced with the rest of grpc's core logging (`daemon.serve`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from collections.abc import Callable

log = logging.getLogger(__name__)

#: How often the watch looks.
WATCH_INTERVAL = 1.0
#: An episode is over when this many descriptors are free again (or an eighth of the limit,
#: when that is less): one free descriptor would be taken by the next queued connection.
RECOVERED_FREE = 64

EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        # Linux never reports an infinite RLIMIT_NOFILE; nothing to do either way.
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft, soft
    log.info("raised the open-file limit from %d to %d (the hard limit)", soft, hard)
    return soft, hard


def out_of_descriptors(exc: BaseException) -> bool:
    """True for the errors of a process (EMFILE) or system (ENFILE) out of descriptors."""
    return isinstance(exc, OSError) and exc.errno in EXHAUSTED_ERRNOS


def caused_by_exhaustion(exc: BaseException) -> bool:
    """True when running out of descriptors is `exc` or what caused it (a LaunchError
    wraps the OSError of the QEMU that could not be started)."""
    seen: BaseException | None = exc
    while seen is not None:
        if out_of_descriptors(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def exhausted() -> bool:
    """True when this process cannot open one more file right now."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if out_of_descriptors(exc):
            return True
        raise
    os.close(fd)
    return False


def in_use() -> int | None:
    """Descriptors open in this process, or None when that cannot be counted now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except OSError:
        return None


class DescriptorWatch:
    """Looks every `interval` whether the process can open a file. One warning when it
    cannot (an episode starts), one line when enough are free again, then `on_recovered()`
    (the pool retries its boots at once instead of waiting out its backoff)."""

    def __init__(self, on_recovered: Callable[[], None], *,
                 interval: float = WATCH_INTERVAL) -> None:
        self.on_recovered = on_recovered
        self.interval = interval
        self.short = False
        self.episodes = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if exhausted():
            if not self.short:
                self.short, self.episodes = True, self.episodes + 1
                log.warning("out of file descriptors (the limit is %d): new connections wait "
                            "and VM boots fail until some are closed; connections already "
                            "open are still served", limit)
            return
        if not self.short:
            return
        count = in_use()
        if count is None or limit - count < min(RECOVERED_FREE, limit // 8):
            return
        self.short = False
        log.info("file descriptors are available again (%d of %d in use)", count, limit)
        self.on_recovered()
