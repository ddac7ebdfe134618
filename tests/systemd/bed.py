"""A systemd test bed: a Debian bookworm rootfs booted under systemd-nspawn, systemd as PID 1.

The rootfs is built once per machine with debootstrap and cached outside the repository,
keyed by its package list (a new package means a new rootfs, never a patched one):

    /var/cache/kata-vmcache-test/rootfs-<sha256 of the package list, 12 hex>

It is built in a temporary directory beside its final name and renamed when debootstrap has
finished, so a killed build leaves no half rootfs under the cached name. `python -m
tests.systemd.bed build` builds it ahead of the tests and prints the time it took.

Each test session boots a private copy (`cp -a --reflink=auto` of the cache, removed at the
end) with `systemd-nspawn -D COPY --keep-unit --register=no -b`: without --keep-unit and
--register=no nspawn asks the host's system bus and machined for a scope and a registration,
and neither is here. Commands run inside through `nsenter` into the container's PID 1
(`systemd-run --machine` needs machined too). Stopping sends SIGRTMIN+3 to the container's
PID 1 (systemd's "halt"), waits for nspawn, and kills nspawn by pid only as a last resort.
nspawn is run without --network-*, so it creates no veth; it shares the host's network, which
pip needs to build the project's virtualenv inside the rootfs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("KVC_SYSTEMD_CACHE", "/var/cache/kata-vmcache-test"))
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
#: What the rootfs holds beyond minbase, and why.
PACKAGES = (
    "systemd",  # PID 1, systemctl, journald
    "systemd-sysv",  # /sbin/init for nspawn -b
    "dbus",  # systemctl talks to PID 1 over the system bus
    "qemu-system-x86",  # the VMs the daemon boots (TCG inside the container)
    "python3",  # 3.11 in bookworm: the virtualenv install.sh builds at /opt/kata-vmcache
    "python3-venv",  # ensurepip for that virtualenv
    "procps",  # ps and pgrep, to read the QEMU pids inside the container
)


def rootfs_path(packages: Sequence[str] = PACKAGES) -> Path:
    key = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()[:12]
    return CACHE / f"rootfs-{key}"


def unavailable() -> str | None:
    """Why the bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "the systemd test bed needs root (debootstrap, systemd-nspawn)"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make system installs it)"
    return None


def build(packages: Sequence[str] = PACKAGES) -> Path:
    """The cached rootfs, built first if missing. Prints the build time on stderr."""
    final = rootfs_path(packages)
    if (final / "usr/lib/systemd/systemd").exists():
        return final
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=CACHE))
    tmp.chmod(0o755)  # the container's /: mkdtemp's 0700 would lock out dbus's user
    started = time.monotonic()
    try:
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
             SUITE, str(tmp), MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "usr/lib/systemd/systemd").exists():
                raise
            shutil.rmtree(tmp)  # another session built it meanwhile: theirs is as good
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"systemd bed: built {final} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return final


#: The environment of commands run inside: the container's own PATH, none of pytest's.
INSIDE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}


@dataclass
class Container:
    """A booted copy of the rootfs: `root` is its / as the host sees it."""

    root: Path
    nspawn: subprocess.Popen[bytes]
    #: The container's PID 1 (systemd) as the host numbers it.
    leader: int
    log: Path
    #: What setting the bed up took, in seconds, for the tests to report.
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
        """Run argv in every namespace of the container's PID 1 (its /, pids, cgroup)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *argv], env=INSIDE_ENV,
            capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode} in the container:\n"
                f"{result.stdout}{result.stderr}")
        return result

    def stop(self, timeout: float = 60) -> None:
        """Halt systemd (SIGRTMIN+3), wait for nspawn; SIGKILL by pid as a last resort."""
        if self.nspawn.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGRTMIN + 3)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in (self.leader, self.nspawn.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.nspawn.wait(10)


def _ns_pid_one_under(parent: int) -> int | None:
    """The descendant of `parent` that is PID 1 of its own pid namespace."""
    todo = [parent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("NSpid:") and line.split()[-1] == "1" \
                        and len(line.split()) > 2:
                    return child
            todo.append(child)
    return None


def boot(root: Path, log: Path, timeout: float = 120) -> Container:
    """Boot `root` under systemd-nspawn and wait for multi-user (running or degraded)."""
    with log.open("wb") as out:
        nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(root), "--keep-unit", "--register=no", "-b",
             "--console=passive", "--quiet"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    leader = None
    while leader is None:
        if nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {nspawn.returncode}: "
                               f"{log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            nspawn.kill()
            nspawn.wait()
            raise RuntimeError("systemd-nspawn started no PID 1")
        leader = _ns_pid_one_under(nspawn.pid)
        # systemctl says "offline" until PID 1 is systemd and listens on its private socket.
        if leader is not None and not Path(f"/proc/{leader}/root/run/systemd/private"
                                           ).exists():
            leader = None
        if leader is None:
            time.sleep(0.1)  # polling for a process to appear; nothing to await
    container = Container(root, nspawn, leader, log)
    try:
        state = container.run("systemctl", "is-system-running", "--wait", check=False,
                              timeout=max(1.0, deadline - time.monotonic()))
        if state.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"the container's systemd is {state.stdout.strip()!r}")
    except BaseException:
        container.stop()
        raise
    return container


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        print(build())
    else:
        sys.exit("usage: python -m tests.systemd.bed build")
