"""A real Kata 1.x container on a VM cache: the pieces `bench/kata_e2e.py` and the Kata 1.x
integration tests share.

Kata 1.x's own kata-runtime, kata-proxy and kata-shim, and a guest image whose init runs
Kata's agent, are an install of their own: none of them is built or shipped here. Their
paths come from the environment (or the bench's flags):

| variable       | what                                                                 |
|----------------|----------------------------------------------------------------------|
| KATA1_RUNTIME  | kata-runtime 1.x                                                     |
| KATA1_PROXY    | kata-proxy 1.x                                                       |
| KATA1_SHIM     | kata-shim 1.x                                                        |
| KATA1_KERNEL   | the guest kernel                                                     |
| KATA1_INITRD   | an initrd that runs Kata's agent (with the kernel's virtio and 9p    |
|                | modules; fuse and virtiofs too for shared_fs = "virtio-fs")          |
| KATA1_QEMU     | the QEMU kata-runtime runs (default: bench/qemu-tcg.sh, which turns  |
|                | Kata 1.x's KVM command line into a TCG one, for hosts without KVM)   |
| KATA1_VIRTIOFSD| virtiofsd, for shared_fs = "virtio-fs" (default: QEMU's own)         |

What a run does, as a user would: `kata-runtime --kata-config CFG run --bundle B ID` on an
OCI bundle of busybox-static, timed from the call to the container's first output line;
then `kata-runtime delete --force`, and anything still naming the run's id is stopped by
pid. kata-runtime logs to syslog, so the run listens on /dev/log itself when nobody else
does (and stops listening after), and reads each start's phases from kata-runtime's log.
Kata 1.x shares container rootfs through a slave bind mount, which reaches the guest only
below a shared mount, and a cached virtio-fs VM's virtiofsd sees the rootfs mounted in its
VM directory only below one: the sandboxes directory and /run/vc/vm are made shared mounts
for the runs, as a systemd host has them, and restored after.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_vmcache.procs import cmdline, pids

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SANDBOXES = Path("/run/kata-containers/shared/sandboxes")
#: Kata's VM storage (virtcontainers/store RunVMStoragePath): a cached VM's directory.
VM_STORAGE = Path("/run/vc/vm")
MARKER = "hello-from-kata"
#: The container's command: a line to time, then long enough alive to measure its VM.
COMMAND = f"echo {MARKER}; sleep 2"

ENV = {"runtime": "KATA1_RUNTIME", "proxy": "KATA1_PROXY", "shim": "KATA1_SHIM",
       "kernel": "KATA1_KERNEL", "initrd": "KATA1_INITRD", "qemu": "KATA1_QEMU",
       "virtiofsd": "KATA1_VIRTIOFSD"}


@dataclass(frozen=True)
class Tools:
    runtime: Path
    proxy: Path
    shim: Path
    kernel: Path
    initrd: Path
    qemu: Path
    virtiofsd: Path
    busybox: Path


def find_tools(given: dict[str, str | None] | None = None) -> Tools | str:
    """The Kata 1.x install, from `given` (flags) or the environment; or one line saying
    what is missing. virtiofsd is looked up only by the runs that need it."""
    given = given or {}
    defaults = {"qemu": str(HERE / "qemu-tcg.sh"), "virtiofsd": "/usr/lib/qemu/virtiofsd"}
    values: dict[str, Path] = {}
    missing = []
    for name, var in ENV.items():
        value = given.get(name) or os.environ.get(var) or defaults.get(name)
        if name == "virtiofsd":
            values[name] = Path(value or "")
        elif not value:
            missing.append(var)
        elif not Path(value).exists():
            missing.append(f"{var} ({value} does not exist)")
        else:
            values[name] = Path(value).resolve()
    busybox = shutil.which("busybox")
    if busybox is None:
        missing.append("busybox (Debian's busybox-static) for the container's rootfs")
    if missing:
        return "no Kata 1.x install: missing " + ", ".join(missing)
    return Tools(busybox=Path(busybox or ""), **values)


def missing_virtiofsd(tools: Tools) -> str | None:
    if not tools.virtiofsd.is_file():
        return f"no virtiofsd ({ENV['virtiofsd']}; QEMU's own is in qemu-system-common)"
    return None


# configuration and bundle


@dataclass(frozen=True)
class Setup:
    """One Kata 1.x configuration, used by kata-runtime and by whichever cache serves it."""

    cache_number: int = 1
    template: bool = False
    shared_fs: str = "virtio-9p"
    debug: bool = True
    #: kata-vmcache's [vmcache] table (Kata ignores it).
    ours: dict[str, Any] = field(default_factory=dict)


def write_config(path: Path, tools: Tools, setup: Setup, *, endpoint: Path,
                 template_path: Path, state_dir: Path) -> Path:
    """Kata 1.x's configuration-qemu.toml, as its own template lays it out (kata-containers/
    runtime cli/config/configuration-qemu.toml.in), for this guest: q35, 1 vCPU, 256 MiB,
    the agent on a virtio-serial port through a kata-proxy (use_vsock = false: this host
    may have no vhost-vsock), and `setup`'s share and factory."""
    d = "true" if setup.debug else "false"
    fs = ""
    if setup.shared_fs == "virtio-fs":
        fs = (f'virtio_fs_daemon = "{tools.virtiofsd}"\nvirtio_fs_cache_size = 0\n'
              'virtio_fs_cache = "auto"\nvirtio_fs_extra_args = []\n'
              'file_mem_backend = ""\n')
    ours = {"accelerator": "tcg", "ready_probe": "kata-agent", "state_dir": str(state_dir),
            **setup.ours}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ours.items())
    path.write_text(f"""# Written by bench/kata1.py: Kata 1.x on this host.
[hypervisor.qemu]
path = "{tools.qemu}"
kernel = "{tools.kernel}"
initrd = "{tools.initrd}"
machine_type = "q35"
kernel_params = "{'agent.log=debug' if setup.debug else ''}"
machine_accelerators = ""
cpu_features = ""
default_vcpus = 1
default_maxvcpus = 0
default_bridges = 1
default_memory = 256
memory_slots = 4
disable_block_device_use = true
shared_fs = "{setup.shared_fs}"
{fs}block_device_driver = "virtio-scsi"
enable_iothreads = false
use_vsock = false
enable_debug = {d}

[factory]
enable_template = {'true' if setup.template else 'false'}
template_path = "{template_path}"
vm_cache_number = {setup.cache_number}
vm_cache_endpoint = "{endpoint}"

[proxy.kata]
path = "{tools.proxy}"
enable_debug = {d}

[shim.kata]
path = "{tools.shim}"
enable_debug = {d}

[agent.kata]
enable_debug = {d}
kernel_modules = []

[netmon]
enable_netmon = false

[runtime]
enable_debug = {d}
internetworking_model = "tcfilter"
disable_guest_seccomp = true
sandbox_cgroup_only = false
experimental = []

# kata-vmcache's own table (Kata's loader ignores it).
[vmcache]
{lines}
""")
    return path


def make_bundle(bundle: Path, tools: Tools, config: Path, command: str = COMMAND) -> Path:
    """An OCI bundle: a busybox-static rootfs, config.json from `kata-runtime spec`, then
    `sh -c command` without a terminal."""
    shutil.rmtree(bundle, ignore_errors=True)
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(tools.busybox, bin_dir / "busybox")
    for applet in ("sh", "echo", "sleep", "cat", "ls", "mount"):
        (bin_dir / applet).symlink_to("busybox")
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (bundle / "rootfs" / d).mkdir()
    subprocess.run([str(tools.runtime), "--kata-config", str(config), "spec"], cwd=bundle,
                   check=True, capture_output=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["args"] = ["/bin/sh", "-c", command]
    spec["process"]["terminal"] = False
    spec["root"]["readonly"] = False
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle


# the host: syslog and mount propagation


class Syslog:
    """What kata-runtime, kata-proxy and kata-shim log: our own listener on /dev/log while
    nobody else listens there, else the file an existing listener appends to (`file`;
    without one the phases are unknown). `lines()` is what arrived since `mark()`."""

    def __init__(self, file: Path | None = None) -> None:
        self.file = file
        self._own: socket.socket | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._offset = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Syslog:
        from kata_vmcache.factory.host import syslog_listens
        if not syslog_listens():
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/dev/log")  # a stale socket file: nobody listens on it
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind("/dev/log")
            os.chmod("/dev/log", 0o666)
            self._own = sock
            self._thread = threading.Thread(target=self._read, daemon=True, name="syslog")
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._own is not None
        while True:
            try:
                data = self._own.recv(65536)
            except OSError:
                return
            with self._lock:
                self._lines.append(data.rstrip(b"\0\n").decode(errors="replace"))

    def __exit__(self, *exc: object) -> None:
        if self._own is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink("/dev/log")
            self._own.close()

    @property
    def available(self) -> bool:
        return self._own is not None or (self.file is not None and self.file.is_file())

    def mark(self) -> None:
        with self._lock:
            self._lines.clear()
        if self.file is not None and self.file.is_file():
            self._offset = self.file.stat().st_size

    def lines(self) -> list[str]:
        if self._own is not None:
            with self._lock:
                return list(self._lines)
        if self.file is None or not self.file.is_file():
            return []
        with open(self.file, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace").splitlines()


@contextlib.contextmanager
def host_ready() -> Iterator[None]:
    """Shared mounts for the runs where a systemd host has them (its / is shared), and
    /run/netns as it was, after:

    - the sandboxes directory: Kata 1.x exposes container rootfs through slave bind mounts
      of `<sandbox>/mounts`, which reach the guest only below a shared mount;
    - Kata's VM storage (/run/vc/vm): a sandbox on a cached VM has its `mounts` linked to
      `/run/vc/vm/<vm id>/shared` (vm.go assignSandbox), so its rootfs is mounted there. A
      virtio-fs VM's virtiofsd, started with the VM, exports that directory from a mount
      namespace of its own (a slave of the host's): below a private mount the rootfs never
      reaches it, and the guest finds an empty directory (`exec: "/bin/sh": stat /bin/sh:
      no such file or directory`). 9p's QEMU reads the host's namespace and needs neither.
    """
    made = []
    for path in (SANDBOXES, VM_STORAGE):
        path.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mountpoint", "-q", str(path)]).returncode != 0:
            subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
            made.append(path)
            subprocess.run(["mount", "--make-shared", str(path)], check=True)
    netns_was = subprocess.run(["mountpoint", "-q", "/run/netns"]).returncode == 0
    try:
        yield
    finally:
        for path in reversed(made):
            subprocess.run(["umount", str(path)], check=False)
        # kata-runtime (CNI's NewNS) bind-mounts /run/netns onto itself on its first netns.
        if (not netns_was and subprocess.run(["mountpoint", "-q", "/run/netns"]).returncode == 0
                and not os.listdir("/run/netns")):
            subprocess.run(["umount", "/run/netns"], check=False)


# processes


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_table() -> dict[int, tuple[str, float]]:
    """pid -> (command, CPU seconds so far), for every process in /proc."""
    return {pid: (comm(pid), cpu_seconds(pid)) for pid in pids()}


def busiest(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
            count: int = 4, exclude: Collection[int] = ()) -> list[str]:
    """The processes that used the most CPU between two cpu_tables ("comm pid seconds"):
    what a run competed with, or was made of; `exclude`d ones aside."""
    used = sorted(((cpu - before.get(pid, (comm, 0.0))[1], comm, pid)
                   for pid, (comm, cpu) in after.items() if pid not in exclude),
                  reverse=True)
    return [f"{comm} {pid} {cpu:.2f} s" for cpu, comm, pid in used[:count] if cpu >= 0.05]


def parents() -> dict[int, int]:
    """pid -> parent pid, for every process in /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parent[int(entry)] = int(stat[1])
    return parent


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    return [p for p, pp in parents().items() if pp == pid]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def become_subreaper() -> bool:
    """Make this process the child subreaper of everything it starts (Linux
    PR_SET_CHILD_SUBREAPER): what daemonizes (Kata's QEMU) or outlives its parent stays a
    descendant, so `sweep_descendants` finds exactly what this run left, nobody else's."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    return False


def descendants(pid: int) -> list[int]:
    """Every live or zombie process below `pid`, parents before their children."""
    parent = parents()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        below = sorted(p for p, pp in parent.items() if pp in frontier)
        found += below
        frontier = below
    return found


def sweep_descendants() -> list[str]:
    """Stop by pid whatever this process started that still runs (called when nothing it
    started should), reap the zombies among its children, and say what was stopped."""
    left = []
    for pid in descendants(os.getpid()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.append(f"{comm(pid)} {pid} left running: "
                        f"{' '.join(cmdline(pid))[:200]}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for pid in children(os.getpid()):
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return left



def pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def pids_naming(text: str) -> list[int]:
    """Processes whose command line holds `text` (a run's container id: its QEMU, proxy
    and shim), never this one."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in args:
                found.append(int(entry))
    return found


# one container


PHASES = (("get base VM", "msg=\"get base VM\""),
          ("assigned", "msg=\"assign vm to sandbox"),
          ("VM started", "msg=\"VM started\""),
          ("running", "msg=\"Setting container state from ready to running\""))
_TIME = re.compile(r'time="([^"]+)"')
#: kata-runtime's lines of taking a VM from a cache (virtcontainers/factory, vm.go).
TAKEOVER = ('msg="get base VM"', 'msg="assign vm to sandbox')
_PRI = re.compile(r"^<(\d+)>")
_HEADER = re.compile(r"^<\d+>(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d )?")


def _field(line: str, key: str) -> str | None:
    match = re.search(rf'\b{key}="((?:[^"\\]|\\.)*)"', line)
    return match.group(1).replace('\\"', '"').replace("\\n", " ") if match else None


def short(line: str, limit: int = 400) -> str:
    """A syslog line without its priority and date, and for logrus lines (kata-runtime,
    kata-proxy, kata-shim) only the time, msg and error fields."""
    text = _HEADER.sub("", line)
    msg = _field(text, "msg")
    if msg is not None:
        tag = text.split(":", 1)[0]
        moment = _field(text, "time")
        error = _field(text, "error")
        text = (f"{tag}: {moment + ' ' if moment else ''}{msg}"
                f"{f' (error: {error})' if error else ''}")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_error(line: str) -> bool:
    """A syslog line of severity err or worse (its <PRI> % 8 <= 3)."""
    match = _PRI.match(line)
    return match is not None and int(match.group(1)) % 8 <= 3


def _stamp(line: str) -> float | None:
    match = _TIME.search(line)
    if not match:
        return None
    text = match.group(1).rstrip("Z")
    head, _, frac = text.partition(".")
    moment = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.UTC)
    return moment.timestamp() + (float("0." + frac) if frac else 0.0)


def phases(lines: list[str], runtime_pid: int) -> dict[str, float]:
    """Seconds between kata-runtime's log lines of one `run` (its own pid's lines):
    take-over (get base VM -> assigned), assigned -> VM started, VM started -> running.
    Lines missing (no cache: no `get base VM`) leave their phases out."""
    tag = f"kata-runtime[{runtime_pid}]"
    seen: dict[str, float] = {}
    for line in lines:
        if tag not in line:
            continue
        for name, needle in PHASES:
            if name not in seen and needle in line and (t := _stamp(line)) is not None:
                seen[name] = t
    out = {}
    names = [name for name, _ in PHASES]
    for a, b in itertools.pairwise(names):
        if a in seen and b in seen:
            out[f"{a} -> {b}"] = round(seen[b] - seen[a], 3)
    return out


@contextlib.contextmanager
def neighbours(count: int) -> Iterator[list[int]]:
    """`count` CPU-bound processes for the span of the block, each leading a session of its
    own at normal priority: other tenants' sandboxes on a busy host (their pids, yielded).
    Stopped by pid."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                 start_new_session=True) for _ in range(count)]
    try:
        yield [spinner.pid for spinner in spinners]
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def run_container(tools: Tools, config: Path, bundle: Path, cid: str, *,
                  syslog: Syslog | None = None, timeout: float = 90.0,
                  busy: int = 0) -> dict[str, Any]:
    """`kata-runtime run` of one container: seconds to its first output line and to its
    exit, its exit code, the PSS of its VM's QEMU while it runs, the phases of its start,
    and what had to be cleaned up after. `busy` CPU-bound neighbours run beside it until it
    exits."""
    if syslog is not None:
        syslog.mark()
    with neighbours(busy) as spinners:
        result, pid = _run(tools, config, bundle, cid, timeout, spinners)
    if syslog is not None:
        log = syslog.lines()
        result["phases"] = phases(log, pid)
        result["from_cache"] = any(f"kata-runtime[{pid}]" in line
                                   and "assign vm to sandbox" in line for line in log)
        # The evidence: kata-runtime's own lines of the take-over, as it logged them.
        result["takeover_log"] = [short(line) for line in log
                                  if f"kata-runtime[{pid}]" in line
                                  and any(needle in line for needle in TAKEOVER)]
        result["agent_duplicate_stream"] = sum("duplicate stream" in line for line in log)
    result["cleanup"] = cleanup(tools, config, cid)
    return result


def _run(tools: Tools, config: Path, bundle: Path, cid: str, timeout: float,
         spinners: list[int]) -> tuple[dict[str, Any], int]:
    """`kata-runtime run` to its exit, beside `spinners` (left out of the busiest): the
    run's figures, and kata-runtime's pid."""
    cpu_at_start = cpu_table()
    busiest_ones: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen([str(tools.runtime), "--kata-config", str(config), "run",
                             "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    first_output, lines, buffer, pss = None, [], b"", None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = started + timeout
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(line.decode(errors="replace"))
                if first_output is None and MARKER in lines[-1]:
                    first_output = time.monotonic() - started
                    busiest_ones = busiest(cpu_at_start, cpu_table(), exclude=spinners)
                    pss = sandbox_pss(cid)
    try:
        rc: int | str = proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    exited = time.monotonic() - started
    stderr = proc.stderr.read().decode(errors="replace").strip()
    proc.stdout.close()
    proc.stderr.close()
    return {"cid": cid, "rc": rc,
            "t_output_s": None if first_output is None else round(first_output, 3),
            "t_exit_s": round(exited, 3), "stdout": lines[:5], "stderr": stderr[-800:],
            "pss_kib": pss, "busiest_to_output": busiest_ones}, proc.pid


def sandbox_pss(cid: str) -> int | None:
    """PSS of the QEMU a running sandbox is on: its pid file, in the VM directory Kata
    links the sandbox id to (vm.go assignSandbox), or the QEMU named after it."""
    with contextlib.suppress(OSError, ValueError):
        return pss_kib(int((VM_STORAGE / cid / "pid").read_text().strip()))
    for pid in pids_naming(cid):
        if comm(pid).startswith("qemu"):
            return pss_kib(pid)
    return None


def cleanup(tools: Tools, config: Path, cid: str) -> list[str]:
    """Delete the container; stop by pid anything still naming it; remove its leftovers."""
    notes = []
    done = subprocess.run([str(tools.runtime), "--kata-config", str(config), "delete",
                           "--force", cid], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "not" not in done.stderr.lower():
        notes.append(f"delete --force: {done.stderr.strip()[:200]}")
    deadline = time.monotonic() + 5
    while pids_naming(cid) and time.monotonic() < deadline:
        time.sleep(0.25)
    for pid in pids_naming(cid):
        notes.append(f"stopped leftover pid {pid} ({comm(pid)})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if cid in line.split()[4]]
    for mount in sorted(mounts, key=len, reverse=True):
        notes.append(f"unmounted leftover {mount}")
        subprocess.run(["umount", "-l", mount], check=False)
    for path in (Path("/run/vc/sbs") / cid, VM_STORAGE / cid, SANDBOXES / cid,
                 Path("/run/kata-containers/shared/containers") / cid, Path("/run/vc/uuid") / cid):
        if path.exists() or path.is_symlink():
            notes.append(f"removed leftover {path}")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return notes


# the caches


class CacheServer:
    """A VM cache serving `config`: Kata's own (`kata-runtime factory init`) or ours
    (`kata-vmcache init`), started and stopped as their users do."""

    def __init__(self, kind: str, tools: Tools, config: Path, endpoint: Path,
                 log_path: Path) -> None:
        self.kind = kind
        self.tools = tools
        self.config = config
        self.endpoint = endpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        if self.kind == "kata":
            return [str(self.tools.runtime), "--kata-config", str(self.config), "factory", "init"]
        return [sys.executable, "-m", "kata_vmcache", "--config", str(self.config), "init"]

    def launch(self) -> None:
        """Start the server, its output appended to `log_path`; `wait_full` waits for it."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def listening(self) -> bool:
        """Does something accept connections on the endpoint?"""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect(str(self.endpoint))
            except OSError:
                return False
        return True

    def start(self, wanted: int, timeout: float = 120.0) -> float:
        """Start the server and wait until `wanted` VMs are cached; seconds it took."""
        started = time.monotonic()
        self.launch()
        try:
            self.wait_full(wanted, timeout)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def cached(self) -> list[int]:
        """The pids of the cached VMs, from the server's Status (the same RPC for both)."""
        from kata_vmcache.errors import VmcacheError
        from kata_vmcache.sync import SyncCacheClient

        if not self.endpoint.exists():
            return []
        try:
            with SyncCacheClient(self.endpoint, timeout=5.0) as client:
                return [vm.pid for vm in client.status().vms]
        except VmcacheError:
            return []

    def wait_full(self, wanted: int, timeout: float = 120.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} cache server exited with {self.proc.returncode}"
                                   f" (log {self.log_path})")
            pids = self.cached()
            if len(pids) >= wanted:
                return pids
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} cache: {len(pids)} of {wanted} VMs after "
                                   f"{timeout:g} s (log {self.log_path})")
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """Its own shut-down (`factory destroy`, `kata-vmcache destroy`), then the pid; what
        it left running of the VMs it cached (stopped by pid, and reported)."""
        if self.proc is None:
            return []
        cached = self.cached()
        # Its kata-proxies (Kata's and ours are the server's children), for the sweep below:
        # a run that failed after its hand-off may leave its VM's proxy behind.
        proxies = [pid for pid in children(self.proc.pid) if comm(pid) == "kata-proxy"]
        if self.kind == "kata":
            argv = [str(self.tools.runtime), "--kata-config", str(self.config), "factory",
                    "destroy"]
        else:
            argv = [sys.executable, "-m", "kata_vmcache", "--config", str(self.config), "destroy"]
        subprocess.run(argv, capture_output=True, timeout=60, check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        left = []
        for pid in cached:
            if comm(pid).startswith("qemu"):
                left.append(f"cached VM's QEMU {pid} outlived its server")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # a proxy ends once its QEMU's socket closes
        for pid in proxies:
            if comm(pid) == "kata-proxy":
                left.append(f"kata-proxy {pid} outlived its server")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return left
