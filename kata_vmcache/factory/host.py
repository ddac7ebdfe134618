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

Every problem is a `ConfigProblem` naming the key, as the file's own problems are.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import pwd
import stat
import subprocess
from pathlib import Path

from ..config import Config, problem_in
from ..errors import ConfigError, ConfigProblem, QemuUnusable

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


def require(config: Config) -> None:
    """Raise ConfigError with every problem `check()` finds."""
    problems = check(config)
    if problems:
        raise ConfigError(problems)


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
