"""The virtiofsd of a virtio-fs VM, started as the file's Kata generation starts it.

With `shared_fs = "virtio-fs"` the guest reaches the sandbox's files through a
vhost-user-fs device whose backend is a virtiofsd on the host. Kata makes the vhost-user
socket itself, a Unix listener at `<vm storage>/<vm id>/vhost-fs.sock`, and passes it to
virtiofsd as a descriptor (`--fd=N`); QEMU then connects to that path. So the listener is
there before QEMU starts, and no one waits for virtiofsd to create anything.

Contract, per generation:

- Kata 1.x (kata-containers/runtime, virtcontainers/qemu.go `setupVirtiofsd`,
  `virtiofsdArgs`): `<virtio_fs_daemon> --fd=N -o source=<share> -o cache=<virtio_fs_cache>
  --syslog -o no_posix_lock (-d | -f) <virtio_fs_extra_args>` (`-d` with enable_debug);
  QEMU 7.2's own C virtiofsd speaks it.
- Kata 3.x (kata-containers 3.30.0, src/runtime/virtcontainers/virtiofsd.go `args`,
  qemu.go `createVirtiofsDaemon`): `<virtio_fs_daemon> --syslog --cache=<mode>
  --shared-dir=<share> --fd=N <virtio_fs_extra_args> [--xattr]`, with `--xattr` appended
  unless disable_guest_selinux; the cache mode "" is "auto", and only auto, always,
  metadata and never are accepted (`valid`). This is the Rust virtiofsd's syntax.

Where we differ, on purpose:

- the share: Kata exports `getSharePath(<vm id>)` (`/run/kata-containers/shared/
  sandboxes/<vm id>/shared`), a directory nothing creates for a factory VM (Kata 3.x's own
  cache fails on it, "virtiofsd source path is empty"). A sandbox that takes a cached VM
  links its mounts to `<vm storage>/<vm id>/shared` (vm.go `assignSandbox`), the directory
  a cached 9p VM shares: so that is what our virtiofsd exports.
- `--fd=N`: Go's ExtraFiles make Kata's descriptor 3; ours is whatever number the
  listener has (Python cannot renumber a descriptor for a child without running code
  between fork and exec). virtiofsd only reads the number.

virtiofsd exits by itself when QEMU's vhost-user connection closes; Kata 1.x stops the VM
when virtiofsd exits first, and so do we (a VM whose virtiofsd is gone never goes out).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from ..kata import Generation
from ..procs import cmdline, pid_alive
from .companion import Companion, stop_handed_out
from .paths import VMPaths
from .priority import Level

#: virtiofsd.go valid(): the cache modes Kata 3.x passes on.
CACHE_MODES_3X = ("auto", "always", "metadata", "never")
#: How long `virtio_fs_daemon --print-capabilities` may take when the host is checked.
PROBE_TIMEOUT = 5.0


def virtiofsd_argv(binary: Path, generation: Generation, *, fd: int, share: Path,
                   cache: str, debug: bool, extra_args: list[str],
                   guest_selinux: bool) -> list[str]:
    """The generation's command line (module docstring)."""
    if generation == "3.x":
        extra = [*extra_args, *(["--xattr"] if guest_selinux else [])]
        return [str(binary), "--syslog", f"--cache={cache or 'auto'}",
                f"--shared-dir={share}", f"--fd={fd}", *extra]
    return [str(binary), f"--fd={fd}", "-o", f"source={share}", "-o", f"cache={cache}",
            "--syslog", "-o", "no_posix_lock", "-d" if debug else "-f", *extra_args]


def is_virtiofsd(pid: int, share: Path) -> bool:
    """pid is alive and is a virtiofsd exporting `share` (its `source=` or
    `--shared-dir=` argument): how a recorded pid is told from a recycled one."""
    args = cmdline(pid)
    return pid_alive(pid) and (f"source={share}" in args or f"--shared-dir={share}" in args)


def stop_handed_out_virtiofsd(pid: int, share: Path) -> None:
    """Kata 3.x's StopVM for a VM we took: after its QEMU, its virtiofsd (usually gone
    already, with QEMU's connection), if that pid is still it."""
    stop_handed_out(pid, lambda p: is_virtiofsd(p, share))


class Virtiofsd(Companion):
    """One VM's virtiofsd: started before its QEMU, owned until hand-off."""

    what = "virtiofsd"
    log_name = "virtiofsd.log"

    def __init__(self, binary: Path, generation: Generation, paths: VMPaths, *,
                 cache: str, debug: bool, extra_args: list[str], guest_selinux: bool,
                 log: logging.Logger) -> None:
        self.paths = paths
        self._settings: dict[str, Any] = {
            "cache": cache, "debug": debug, "extra_args": extra_args,
            "guest_selinux": guest_selinux}
        self.generation = generation
        # The argv names the listener's descriptor, known once it is made (start()).
        super().__init__(binary, self._argv(binary, fd=-1), paths.own, log=log)

    def _argv(self, binary: Path, *, fd: int) -> list[str]:
        return virtiofsd_argv(binary, self.generation, fd=fd, share=self.paths.shared,
                              **self._settings)

    def start(self, priority: Level = "normal") -> None:
        """Make the share directory and the vhost-user listener, then launch virtiofsd
        on it at `priority` (its VM's); LaunchError when it cannot run. QEMU may connect
        as soon as this returns: the listener queues it until virtiofsd accepts."""
        # Kata's DirMode (0750) for the VM's directory, as QemuProcess makes it later.
        self.paths.dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self.paths.shared.mkdir(mode=0o750, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.paths.vhost_fs))
            listener.listen()
            fd = listener.fileno()
            os.set_inheritable(fd, True)
            self.argv = self._argv(self.binary, fd=fd)
            self._launch(priority, pass_fds=(fd,))
        finally:
            # virtiofsd holds its own copy; ours would keep the socket accepting (queueing
            # QEMU's connection forever) after virtiofsd exited.
            listener.close()


def capabilities(binary: Path) -> dict[str, Any]:
    """`binary --print-capabilities`, which every vhost-user backend answers with a JSON
    object ("type": "fs" for virtiofsd; QEMU's docs/interop/vhost-user.rst, "Backend
    program conventions"). Raises OSError or ValueError naming what went wrong."""
    try:
        done = subprocess.run([str(binary), "--print-capabilities"], capture_output=True,
                              timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ValueError(f"`--print-capabilities` did not answer in {PROBE_TIMEOUT:g} s") \
            from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ValueError(f"`--print-capabilities` exited with {done.returncode}"
                         f"{': ' + said[-1] if said else ''}")
    try:
        answer = json.loads(done.stdout)
    except ValueError as exc:
        raise ValueError("`--print-capabilities` did not print JSON") from exc
    if not isinstance(answer, dict):
        raise ValueError("`--print-capabilities` did not print a JSON object")
    return answer


def help_text(binary: Path) -> str:
    """What `binary --help` prints (both streams): which arguments it takes."""
    try:
        done = subprocess.run([str(binary), "--help"], capture_output=True,
                              timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode(errors="replace")


def receives_mounts(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[bool, str]:
    """Whether mounts made under `path` after a virtiofsd started reach it, and the mount
    point that decides. virtiofsd (QEMU's, `-o sandbox=namespace`, its default) serves
    the share from a mount namespace of its own whose mounts are slaves of ours: it sees
    what is mounted there later (the container root file systems kata-runtime mounts into
    a VM's share once a sandbox takes it) only if our mount propagates, i.e. is shared
    (`shared:N`; systemd makes / so at boot) or a slave of one that is (`master:N`, as in
    a unit with its own mount namespace). A private mount propagates nothing."""
    best, fields = "", ""
    target = str(path.resolve())
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return True, ""  # nothing to judge by: no verdict
    for line in lines:
        parts = line.split()
        if len(parts) < 7 or "-" not in parts[6:]:
            continue
        point = parts[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fields = point, " ".join(parts[6:parts.index("-", 6)])
    return ("shared:" in fields or "master:" in fields), best


def chroot_sandbox(extra_args: list[str]) -> bool:
    """`-o sandbox=chroot` (or --sandbox=chroot): virtiofsd stays in our mount namespace,
    so every mount reaches it."""
    joined = " ".join(extra_args)
    return "sandbox=chroot" in joined


#: What a generation's command line needs the daemon to understand, as its --help says.
ARGUMENTS = {"1.x": ("source=", "--fd"), "3.x": ("--shared-dir", "--cache", "--fd")}
