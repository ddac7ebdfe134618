"""systemd's notify protocol: what the daemon tells the service manager, and when.

    notifier = Notifier.from_environ()      # a no-op when NOTIFY_SOCKET is unset
    notifier.ready("0/2 VMs ready")          # READY=1, once the socket serves
    notifier.status("2/2 VMs ready, 14 handed out")
    notifier.reloading() ... notifier.ready()  # around a configuration reload
    notifier.stopping()                     # STOPPING=1, first thing on shut-down

Messages are datagrams on the AF_UNIX socket systemd names in NOTIFY_SOCKET (sdnotify sends
them). They are sent from the event loop and never block it: the socket is non-blocking, and
a message that cannot be sent is dropped with one warning, as sd_notify(3) itself would.

The watchdog (`WatchdogSec=` in the unit): systemd sets WATCHDOG_USEC, and `watchdog()` sends
WATCHDOG=1 every half of it *from the event loop*, so a loop that is stuck stops the pings
and systemd restarts the service. WATCHDOG_PID, when set, must be our pid (sd_watchdog_enabled
semantics). The three variables are removed from our environment once read, so QEMU (our
child) never inherits them.

Reloads: RELOADING=1 carries MONOTONIC_USEC (CLOCK_MONOTONIC), which systemd >= 253 requires
for Type=notify-reload; systemd 252 (Debian bookworm) ignores the extra field. The unit uses
Type=notify there, with ExecReload running `kata-vmcache reload` (see systemd/).

The status line (`status_line`) is what `systemctl status` shows: ready/target, booting,
handed out, and the last boot error while boots fail. `publish_status` keeps it current by
waiting for the pool's changes, not by polling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import MutableMapping
from typing import Protocol

import sdnotify

log = logging.getLogger(__name__)

ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
#: systemd shows the status in one line of `systemctl status`; keep ours readable there.
STATUS_MAX = 200


class Notifier:
    """Sends sd_notify messages; every method is a no-op when not under a notify service."""

    def __init__(self, socket_path: str | None, *, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path
        #: Seconds between WATCHDOG=1 pings (half the watchdog timeout), or None.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None
        self._sd: sdnotify.SystemdNotifier | None = None
        self._warned = False
        if socket_path:
            previous = os.environ.get("NOTIFY_SOCKET")
            # sdnotify reads the address from the environment; give it ours, then restore.
            os.environ["NOTIFY_SOCKET"] = socket_path
            try:
                self._sd = sdnotify.SystemdNotifier(debug=True)
                self._sd.socket.setblocking(False)
            except (OSError, TypeError, IndexError) as exc:
                log.warning("cannot reach systemd's notify socket %s (%s); not notifying",
                            socket_path, exc)
                self._sd = None
            finally:
                if previous is None:
                    del os.environ["NOTIFY_SOCKET"]
                else:
                    os.environ["NOTIFY_SOCKET"] = previous

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for, from NOTIFY_SOCKET/WATCHDOG_USEC/WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        socket_path = env.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_usec = int(usec)
        for key in ENV_KEYS:
            env.pop(key, None)
        return cls(socket_path, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def send(self, *fields: str) -> None:
        if self._sd is None:
            return
        try:
            self._sd.notify("\n".join(fields) + "\n")
        except OSError as exc:
            # Dropped, like sd_notify does; say so once so a broken socket is not silent.
            if not self._warned:
                self._warned = True
                log.warning("systemd notify message dropped (%s)", exc)

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *self._status_field(status))

    def reloading(self, status: str | None = "reloading configuration") -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_field(status))

    def stopping(self, status: str | None = "stopping") -> None:
        self.send("STOPPING=1", *self._status_field(status))

    def status(self, text: str) -> None:
        self.send(*self._status_field(text))

    def ping(self) -> None:
        self.send("WATCHDOG=1")

    async def watchdog(self) -> None:
        """Ping every watchdog_interval seconds, forever (cancel to stop); returns at once
        when systemd asked for no watchdog."""
        if self._sd is None or self.watchdog_interval is None:
            return
        while True:
            self.ping()
            await asyncio.sleep(self.watchdog_interval)

    @staticmethod
    def _status_field(text: str | None) -> list[str]:
        if text is None:
            return []
        # One line: a newline would start a new field of the protocol.
        line = re.sub(r"\s+", " ", text).strip()
        if len(line) > STATUS_MAX:
            line = line[:STATUS_MAX - 3] + "..."
        # sdnotify encodes latin-1; anything else becomes '?' rather than a lost message.
        return [f"STATUS={line.encode('latin-1', 'replace').decode('latin-1')}"]


class _Counts(Protocol):
    @property
    def handed_out(self) -> int: ...
    @property
    def last_error(self) -> str: ...


class PoolView(Protocol):
    """What the status line reads from the cache (a VMCache)."""

    @property
    def target(self) -> int: ...
    @property
    def ready_count(self) -> int: ...
    @property
    def booting_count(self) -> int: ...
    @property
    def stats(self) -> _Counts: ...

    async def wait_changed(self) -> None: ...


def status_line(pool: PoolView) -> str:
    """`2/2 VMs ready, 14 handed out`, plus what is booting and why boots fail."""
    line = f"{pool.ready_count}/{pool.target} VMs ready"
    if pool.booting_count:
        line += f" ({pool.booting_count} booting)"
    line += f", {pool.stats.handed_out} handed out"
    if pool.stats.last_error:
        line += f"; boots failing: {pool.stats.last_error}"
    return line


async def publish_status(notifier: Notifier, pool: PoolView, *, sent: str = "") -> None:
    """Keep STATUS= current: one message per change of the line, woken by the pool.
    `sent` is the line systemd already has (with READY=1)."""
    if not notifier.enabled:
        return
    last = sent
    while True:
        line = status_line(pool)
        if line != last:
            notifier.status(line)
            last = line
        await pool.wait_changed()
