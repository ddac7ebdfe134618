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
then SIGKILL (Kata does not wait); a proxy is our child, so we always reap it
(companion.py).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from ..procs import cmdline, pid_alive
from .companion import Companion, stop_handed_out
from .paths import VMPaths
from .priority import Level


def is_kata_proxy(pid: int, vm_id: str) -> bool:
    """pid is alive and is the kata-proxy of VM vm_id (its `-sandbox <id>` arguments):
    how a recorded pid is told from a recycled one."""
    args = cmdline(pid)
    return pid_alive(pid) and any(a == "-sandbox" and b == vm_id
                                  for a, b in itertools.pairwise(args))


def stop_handed_out_proxy(pid: int, vm_id: str) -> None:
    """Kata's VM.Disconnect for a VM we took: SIGTERM its proxy, if it is still that."""
    stop_handed_out(pid, lambda p: is_kata_proxy(p, vm_id))


class KataProxy(Companion):
    """One kata-proxy process: started before the agent is checked, owned until hand-off."""

    what = "kata-proxy"
    log_name = "proxy.log"

    def __init__(self, binary: Path, vm_id: str, paths: VMPaths, *, debug: bool,
                 log: logging.Logger) -> None:
        self.paths = paths
        argv = [str(binary), "-listen-socket", self.url, "-mux-socket", str(paths.agent),
                "-sandbox", vm_id]
        if debug:
            argv += ["-log", "debug", "-agent-logs-socket", str(paths.console)]
        super().__init__(binary, argv, paths.own, log=log)

    @property
    def url(self) -> str:
        """GrpcVM.proxyURL: where kata-runtime reaches the agent."""
        return f"unix://{self.paths.proxy_socket}"

    def start(self, priority: Level = "normal") -> None:
        """Launch the proxy (it creates its socket itself) at `priority` (its VM's);
        LaunchError when it cannot run."""
        # qemu.go setup() creates <run storage>/<id> for the sandbox's files: the proxy's
        # socket goes there.
        self.paths.sandbox.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._launch(priority)
