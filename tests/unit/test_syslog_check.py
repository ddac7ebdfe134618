"""Kata 1.x's kata-proxy exits at once without a syslog on /dev/log: check-config and the
daemon's start warn when nothing listens there (a real datagram socket stands for one)."""

from __future__ import annotations

import socket
from pathlib import Path

from kata_vmcache.factory.host import syslog_listens


def test_a_listener_is_seen_and_a_stale_socket_is_not(tmp_path: Path) -> None:
    path = tmp_path / "log"
    assert not syslog_listens(str(path))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    try:
        assert syslog_listens(str(path))
    finally:
        listener.close()
    # The socket file is left behind, as by a syslog that died: nobody receives.
    assert path.exists()
    assert not syslog_listens(str(path))
