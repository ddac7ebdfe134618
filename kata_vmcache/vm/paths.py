"""Where a VM's files live, and the names that identify it: `VMPaths` (Kata's directory
of the VM, the daemon's own, and the sandbox directory where Kata 1.x's kata-proxy
listens), `sandbox_storage`, `qemu_name` (the `-name` a VM's QEMU is known by) and `VM_ID`
(what an id may be).

Kata looks for a factory VM's sockets where its own runtime would have put them, so the
names here are Kata's (each says which Go function it follows); the daemon's own files
(record, QEMU log, our serial sockets) live apart, under the state directory, so that a
VM handed out leaves nothing of ours in what is now the client's directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: What a VM id may be: it becomes a directory name and part of socket paths.
VM_ID = re.compile(r"[0-9a-f]{12}")


@dataclass(frozen=True)
class VMPaths:
    """Where one VM's files live.

    `dir` is Kata's: `<vm_storage_path>/<id>`, named as kata-runtime names them, because
    it looks for them there (`NewVMFromGrpc`, `VM.assignSandbox` links a sandbox to this
    directory and to its `shared` subdirectory). Once a VM is handed out, this directory is
    the client's. `own` is the daemon's (`<state_dir>/vms/<id>`: record, QEMU log, the
    sockets of our own devices). `sandbox` is where Kata 1.x's kata-proxy listens
    (`<run storage path>/<id>/proxy.sock`, kata_proxy.go `defaultProxyURL`).
    """

    dir: Path
    own: Path
    sandbox: Path

    @classmethod
    def for_vm(cls, vm_id: str, *, vm_storage: Path, state_dir: Path) -> VMPaths:
        return cls(dir=vm_storage / vm_id, own=state_dir / "vms" / vm_id,
                   sandbox=sandbox_storage(vm_storage) / vm_id)

    # Kata's (qemu.go qmpSocket, consoleSocket; hypervisor.go defaultSocketName;
    # createSandbox PidFile; vm.go buildVMSharePath)
    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.sock"

    @property
    def agent(self) -> Path:
        return self.dir / "kata.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "pid"

    @property
    def shared(self) -> Path:
        return self.dir / "shared"

    @property
    def vhost_fs(self) -> Path:
        """virtiofsd's vhost-user socket (qemu.go vhostFSSocketPath: in the run storage
        path's VM directory, 1.x and 3.x alike)."""
        return self.dir / "vhost-fs.sock"

    @property
    def proxy_socket(self) -> Path:
        return self.sandbox / "proxy.sock"

    # ours
    @property
    def log(self) -> Path:
        return self.own / "qemu.log"

    @property
    def record(self) -> Path:
        return self.own / "vm.json"

    @property
    def serial(self) -> Path:
        """ttyS0 of a guest that uses our serial ports (the demo guest's console)."""
        return self.own / "serial.sock"

    @property
    def guest(self) -> Path:
        """ttyS1 of a guest that uses our serial ports: its ready line and our channel."""
        return self.own / "guest.sock"


def sandbox_storage(vm_storage: Path) -> Path:
    """Kata keeps VMs in `<root>/vm` and sandboxes in `<root>/sbs` (persist/fs: root
    `/run/vc`); a moved VM storage path moves both."""
    return vm_storage.parent / "sbs"


def qemu_name(vm_id: str) -> str:
    """The `-name` a VM's QEMU runs with, as Kata names it: how a pid is known to be that
    VM's QEMU."""
    return f"sandbox-{vm_id}"

