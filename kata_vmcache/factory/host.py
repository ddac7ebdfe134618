"""What the configuration file alone cannot tell, checked against this host before anything
boots: at `check-config`, at start (`daemon.serve`) and at every reload.

- `hypervisor.qemu.machine_type` must be a machine the configured QEMU knows. QEMU is asked
  once (`qemu -machine help`; the answer is kept while the binary is unchanged): a wrong
  name would otherwise fail every boot, one backoff after another.
- `vmcache.state_dir` must be a directory that is ours, or one we can create. An existing
  directory is used as it is and never re-moded: one that is shared (sticky or writable by
  everyone, like /tmp) or belongs to another user is refused, with the suggestion of a
  directory of its own inside it. One that does not exist is created with mode 0700
  (`claim_state_dir`), and only that one is chmod-ed, since we made it.
- What the configured VM needs of the host (`check_host`): its agent channel (vsock for
  3.x), its kata-proxy, and for virtio-fs a virtiofsd that takes the generation's
  arguments, shared guest RAM and QEMU's DAX window (`check_shared_fs`). `require` runs
  both parts; `serve()` runs only the first, `init` having run `require`.

Every problem is a `ConfigProblem` naming the key, as the file's own problems are.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import pwd
import socket
import stat
import subprocess
from pathlib import Path
from typing import Literal

from .. import kata
from ..config import Config, problem_in
from ..errors import ConfigError, ConfigProblem, QemuUnusable
from ..vm.devices import TEMPLATING_REFUSED
from ..vm.virtiofsd import ARGUMENTS as VIRTIOFSD_ARGUMENTS
from ..vm.virtiofsd import (
    CACHE_MODES_3X,
    capabilities,
    chroot_sandbox,
    help_text,
    receives_mounts,
)
from .spec import (
    FALLBACK_FILE_BACKED_MEM,
    VHOST_VSOCK,
    VIRTIO_FS,
    check_kata3,
    file_backed_memory,
    host_has_vsock,
    proxy_path,
    qemu_table,
)

#: How long QEMU may take to list its machines (it starts no VM for that).
MACHINE_HELP_TIMEOUT = 10.0
MACHINES_HEADER = "Supported machines are:"


def check(config: Config) -> list[ConfigProblem]:
    """Every problem of `config` on this host; empty when it can be used."""
    problems = []
    h = config.hypervisor
    try:
        machines = machine_types(h.path)
    except QemuUnusable as exc:
        problems.append(problem_in(config, "hypervisor.qemu.path", str(exc)))
    else:
        if h.machine_type not in machines:
            close = difflib.get_close_matches(h.machine_type, sorted(machines), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(problem_in(
                config, "hypervisor.qemu.machine_type",
                f"not a machine type {h.path} knows (got {h.machine_type!r}; see "
                f"`{h.path} -machine help`){hint}"))
    problems += [problem_in(config, "vmcache.state_dir", message)
                 for message in state_dir_problems(config.daemon.state_dir)]
    return problems


def require(config: Config, *, vm_needs: bool = True) -> list[ConfigProblem]:
    """Everything this host must have for `config`, as check-config, the start and every
    reload check it: ConfigError naming each missing piece (what the file alone cannot
    tell first: QEMU's machine types, the state directory; then what the VM needs: its
    agent channel, kata-proxy, virtiofsd, ...), else the warnings. `vm_needs=False` checks
    the first part only (the daemon's start, after `init` checked the rest: those probes
    run subprocesses, once is enough)."""
    problems = check(config)
    if problems:
        raise ConfigError(problems)
    return check_host(config) if vm_needs else []


# --- QEMU's machine types ------------------------------------------------------------------

def machine_types(qemu: Path) -> frozenset[str]:
    """The machine types (and aliases) `qemu` knows; QemuUnusable when it cannot say."""
    try:
        st = qemu.stat()
    except OSError as exc:
        raise QemuUnusable(f"cannot run {qemu}: {exc.strerror}") from None
    return _machine_types(str(qemu), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _machine_types(qemu: str, mtime_ns: int, size: int) -> frozenset[str]:
    """Asked once per binary (path, mtime and size), for reloads."""
    command = f"`{qemu} -machine help`"
    try:
        done = subprocess.run([qemu, "-machine", "help"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace",
                              timeout=MACHINE_HELP_TIMEOUT,
                              env={**os.environ, "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise QemuUnusable(f"{command} did not answer within "
                           f"{MACHINE_HELP_TIMEOUT:g} s") from None
    except OSError as exc:
        raise QemuUnusable(f"cannot run {qemu}: {exc.strerror}") from None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or MACHINES_HEADER not in lines:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise QemuUnusable(f"not a QEMU that lists its machine types ({command} exited with "
                           f"{done.returncode}" + (f": {said[-1]}" if said else "") + ")")
    names = (line.split(maxsplit=1)[0] for line in lines[lines.index(MACHINES_HEADER) + 1:]
             if line.strip())
    return frozenset(names)


# --- the state directory -------------------------------------------------------------------

def state_dir_problems(path: Path) -> list[str]:
    """Why `path` cannot be our state directory (empty when it can): an existing one must be
    a directory of ours that nobody else may write to; a missing one must be creatable."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return _creatable(path)
    except OSError as exc:
        return [f"cannot use {path}: {exc.strerror}"]
    return _ours(path, st)


def _ours(path: Path, st: os.stat_result) -> list[str]:
    if not stat.S_ISDIR(st.st_mode):
        return [f"{path} exists and is not a directory"]
    uid = os.geteuid()
    with contextlib.suppress(OSError):
        link = path.lstat()
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (uid, 0):
            # Someone else's link could point us anywhere (the /tmp symlink attack).
            return [f"{path} is a symbolic link that belongs to {_user(link.st_uid)}: "
                    "kata-vmcache will not follow it"]
    mode = stat.S_IMODE(st.st_mode)
    own = path / "kata-vmcache"
    if st.st_uid != uid:
        return [f"{path} belongs to {_user(st.st_uid)}, not to this daemon's user "
                f"({_user(uid)}): kata-vmcache will not use it or change its mode; set "
                f"state_dir to a directory of this user's, e.g. one it creates"]
    shared = [why for bit, why in ((stat.S_ISVTX, "sticky"),
                                   (stat.S_IWOTH, "writable by everyone")) if mode & bit]
    if shared:
        return [f"{path} is a shared directory (mode {mode:04o}: {', '.join(shared)}): "
                f"kata-vmcache will not use it or change its mode; set state_dir to a "
                f"directory of its own, e.g. {own} (created with mode 0700)"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"{path} is not writable by {_user(uid)}"]
    return []


def _creatable(path: Path) -> list[str]:
    parent = path.parent
    while True:
        try:
            st = parent.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            parent = parent.parent
        except OSError as exc:
            return [f"cannot create {path}: {parent}: {exc.strerror}"]
    if not stat.S_ISDIR(st.st_mode):
        return [f"cannot create {path}: {parent} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"cannot create {path}: {parent} is not writable by {_user(os.geteuid())}"]
    return []


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def claim_state_dir(config: Config) -> None:
    """Make the state directory ready for the daemon: create it with mode 0700 when it does
    not exist; an existing one is checked again (it may have changed since `check()`, or
    been made by someone else just now) and used as it is, never re-moded."""
    path = config.daemon.state_dir
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError([problem_in(config, "vmcache.state_dir",
                                      f"cannot create {path}: {exc.strerror}")]) from None
    else:
        os.chmod(path, 0o700)  # ours: made just now; the umask must not decide its mode
    try:
        problems = _ours(path, path.stat())
    except OSError as exc:
        problems = [f"cannot use {path}: {exc.strerror}"]
    if problems:
        raise ConfigError([problem_in(config, "vmcache.state_dir", p) for p in problems])


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accelerator(setting: str) -> Literal["kvm", "tcg"]:
    if setting == "kvm":
        return "kvm"
    if setting == "tcg":
        return "tcg"
    return "kvm" if kvm_usable() else "tcg"


def check_host(config: Config) -> list[ConfigProblem]:
    """What this host must have for the configured Kata VM, checked before anything boots
    (`init`, `check-config` and every reload): raises ConfigError naming each missing piece, returns
    warnings. Not part of config.load(): a file is valid or not on any host."""
    problems: list[ConfigProblem] = []
    warnings: list[ConfigProblem] = []
    d = config.daemon
    source = config.source
    problems += check_shared_fs(config)
    # A guest without an agent needs no vsock: that its VMs get none is no warning (it
    # asks nothing of its reader); check-config's kata.agent_channel line says so.
    if d.kata_version == "3.x" and not host_has_vsock() and d.guest_agent == "kata":
        problems.append(ConfigProblem(
            "vmcache.guest_agent", f"Kata 3.x reaches its agent over vsock, and this host "
            f"has no {VHOST_VSOCK} (load the vhost_vsock module; got guest_agent = "
            '"kata")', source))
    if d.kata_version == "3.x":
        # Once per key: shared_fs or a virtio-fs key may be named above already.
        named = {p.key for p in problems}
        problems += [p for p in check_kata3(config) if p.key not in named]
    proxy = proxy_path(config)
    if proxy is not None and not (proxy.is_file() and os.access(proxy, os.X_OK)):
        problems.append(ConfigProblem(
            "proxy.kata.path", f"no kata-proxy at {str(proxy)!r}: Kata 1.x with use_vsock = "
            "false reaches the agent only through a kata-proxy per VM (install Kata 1.x's "
            'kata-proxy, or set [vmcache] guest_agent = "none" for a guest without an agent)',
            source))
    elif proxy is not None and not syslog_listens():
        warnings.append(ConfigProblem(
            "proxy.kata.path", "nothing listens on /dev/log: Kata 1.x's kata-proxy logs to "
            "syslog and exits at once without it, so no VM can boot until a syslog (journald) "
            "listens there", source))
    if problems:
        raise ConfigError(problems)
    return warnings


def check_shared_fs(config: Config) -> list[ConfigProblem]:
    """What sharing files with the guest needs of the file and of this host: templating
    refused with shared memory (as Kata refuses it), and for virtio-fs a virtiofsd that
    takes the generation's arguments, shared guest RAM, and a QEMU with the DAX window a
    cache size asks for."""
    generation = config.daemon.kata_version
    hv = config.kata_hypervisor
    problems: list[ConfigProblem] = []

    def problem(key: str, message: str) -> None:
        problems.append(ConfigProblem(key, message, config.source))

    shared_fs = hv["SharedFS"]
    virtio_fs = shared_fs == VIRTIO_FS
    if config.factory.enable_template and (virtio_fs or hv["FileBackedMemRootDir"]):
        why = 'shared_fs = "virtio-fs"' if virtio_fs else "file_mem_backend set"
        where = "createSandbox" if generation == "1.x" else "CreateVM"
        problem("factory.enable_template", f"{TEMPLATING_REFUSED} (Kata {generation}'s "
                f"qemu.go {where}, with {why}): set enable_template = false")
    if not virtio_fs:
        return problems
    origin = "" if "shared_fs" in qemu_table(config) else f" (Kata {generation}'s default)"
    daemon = hv["VirtioFSDaemon"]
    if not daemon:
        problem("hypervisor.qemu.virtio_fs_daemon", f'not set, and shared_fs = "virtio-fs"'
                f"{origin} needs one (Kata's loader refuses the file too; QEMU's own "
                "virtiofsd is /usr/lib/qemu/virtiofsd in Debian's qemu-system-common)")
    else:
        said = virtiofsd_problem(Path(daemon), generation)
        if said:
            problem("hypervisor.qemu.virtio_fs_daemon", said)
    if daemon and not syslog_listens():
        problem("hypervisor.qemu.virtio_fs_daemon", "nothing listens on /dev/log: Kata "
                "starts virtiofsd with --syslog, and QEMU's virtiofsd then exits as soon as "
                "QEMU connects (start a syslog daemon, such as journald)")
    storage = config.daemon.vm_storage_path
    receives, mountpoint = receives_mounts(storage)
    if not receives and not chroot_sandbox(list(hv["VirtioFSExtraArgs"] or ())):
        problem("vmcache.vm_storage_path", f"{storage} is on a private mount ({mountpoint}): "
                "what kata-runtime mounts into a VM's share once a sandbox takes it (the "
                "container's root file system) never reaches that VM's virtiofsd, which "
                "serves the share from a mount namespace of its own; make it shared (`mount "
                f"--make-rshared {mountpoint}`, as systemd hosts have it) or add \"-o\", "
                '"sandbox=chroot" to virtio_fs_extra_args')
    cache = hv["VirtioFSCache"]
    modes = CACHE_MODES_3X if generation == "3.x" else CACHE_MODES_1X
    if cache not in modes:
        problem("hypervisor.qemu.virtio_fs_cache", f"got {cache!r}; Kata {generation}'s "
                f"virtiofsd takes {', '.join(modes)}")
    if file_backed_memory(hv) is None:
        root = hv["FileBackedMemRootDir"] or FALLBACK_FILE_BACKED_MEM
        problem("hypervisor.qemu.file_mem_backend", f"virtio-fs needs the guest RAM in "
                f"shared memory, under file_mem_backend or {FALLBACK_FILE_BACKED_MEM}, and "
                f"{root!r} is not a directory (Kata would boot the VM with private RAM, "
                "which vhost-user cannot map)")
    size = hv["VirtioFSCacheSize"]
    if size and not qemu_device_has(config.hypervisor.path, "vhost-user-fs-pci", "cache-size"):
        problem("hypervisor.qemu.virtio_fs_cache_size", f"got {size}: QEMU "
                f"{config.hypervisor.path} has no DAX window for virtio-fs (its "
                "vhost-user-fs-pci has no cache-size property); set 0")
    return problems


#: The cache modes each generation's virtiofsd takes: 1.x's configuration documents
#: none, auto and always (QEMU's C virtiofsd), 3.x's virtiofsd.go valid() the rest.
CACHE_MODES_1X = ("none", "auto", "always")


def virtiofsd_problem(daemon: Path, generation: kata.Generation) -> str | None:
    """Why `daemon` cannot be the VMs' virtiofsd, or None: it must run, be a vhost-user
    fs backend, and take the arguments the generation starts it with."""
    if not (daemon.is_file() and os.access(daemon, os.X_OK)):
        return (f"no virtiofsd at {str(daemon)!r} (QEMU's own is /usr/lib/qemu/virtiofsd in "
                "Debian's qemu-system-common)")
    try:
        kind = capabilities(daemon).get("type")
    except (OSError, ValueError) as exc:
        return f"{str(daemon)!r} is not a working virtiofsd: {exc}"
    if kind != "fs":
        return (f"{str(daemon)!r} is a vhost-user backend of type {kind!r}, not a virtiofsd "
                '(type "fs")')
    text = help_text(daemon)
    missing = [arg for arg in VIRTIOFSD_ARGUMENTS[generation] if arg not in text]
    if missing:
        hint = ("Kata 3.x starts the Rust virtiofsd (--shared-dir, --cache); QEMU's own C "
                "virtiofsd takes 1.x's -o source=" if generation == "3.x" else
                "Kata 1.x starts virtiofsd with -o source= and --fd, as QEMU's own C "
                "virtiofsd takes them")
        return (f"{str(daemon)!r} does not take Kata {generation}'s arguments "
                f"({', '.join(missing)} not in its --help; {hint})")
    return None


def qemu_device_has(qemu: Path, device: str, prop: str) -> bool:
    """Whether QEMU's `device` has the property `prop` (`-device <device>,help`)."""
    try:
        done = subprocess.run([str(qemu), "-device", f"{device},help"], capture_output=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return f"{prop}=" in done.stdout.decode(errors="replace")


def syslog_listens(path: str = "/dev/log") -> bool:
    """Whether a syslog daemon receives datagrams on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True
