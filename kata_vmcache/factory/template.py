"""Clone VMs from a saved template VM (Kata's `template` factory, `enable_template`).

The template is built once, lazily, by the first `boot()`:

1. `template_path` gets a tmpfs of its own (mounted by us unless it already is a tmpfs
   mount point; a marker file records that we mounted it, so a restarted daemon knows).
2. The template VM boots with its RAM in `template_path/memory`, mapped shared
   (`memory-backend-file,share=on`), so the file holds the guest's memory.
3. Once the guest is ready it is paused, its device state is saved with QMP `migrate`
   and the `x-ignore-shared` capability (RAM stays in the file, only devices go to
   `template_path/state`), and the template QEMU is stopped at once, never resumed.
4. `settings.json` beside them records what the template was built from; a template is
   reused only when that record matches the current settings, otherwise it is rebuilt.

A clone maps the same file private (`share=off`: copy-on-write, so clones share the
template's pages until they write them), starts with `-incoming defer` and restores the
state with `migrate-incoming`. It stays paused, except for one check before it enters the
cache: resume, a ping the guest answers only after sleeping on its own timers, pause. A
clone whose timers do not run is never handed out.

Why the template is never resumed after the save (docs/templating.md): the RAM file
is shared, so a template that runs on moves the guest's memory (its timekeeping, its timer
queues) past the saved device state (the clock, the LAPIC timer). A clone then restores a
clock that is behind what its memory believes, and every timer-driven thing in the guest
waits until the clock catches up: about as long as the template ran on. Interrupts still
work, which is what makes the symptom look like "frozen timers".

Every clone starts with the template's wall clock and random pool: whoever resumes one
(the hand-off record says `FromTemplate`) should call `freshen()` for the demo guest,
which sets the guest's clock and mixes host entropy into its pool over the agent port.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import GuestNotReady, TemplateError
from ..vm.devices import AGENT_PORT_ID
from ..vm.guest_channel import SEED_BYTES, GuestChannel
from ..vm.owned import VM, VMState
from ..vm.priority import Level
from ..vm.spec import Accelerator, VMSpec
from .direct import DirectFactory, abandon, booted

log = logging.getLogger(__name__)

MEMORY_FILE = "memory"
STATE_FILE = "state"
SETTINGS_FILE = "settings.json"
#: Present in a tmpfs we mounted ourselves: unmount it on shutdown, even after a restart.
MOUNT_MARKER = ".kata-vmcache-mounted"
#: Present while template_path holds a template we made: only then do we delete files.
OWNER_MARKER = ".kata-vmcache-template"
MOUNT_SOURCE = "kata-vmcache-template"
#: Room on the tmpfs beyond the guest's RAM, for the device state (a few hundred KiB).
TMPFS_HEADROOM_MIB = 64
#: Bumped when the way a template is built changes: old templates are then rebuilt.
TEMPLATE_FORMAT = 1
#: The clone check's guest-side sleep: any sleep needs running timers.
CHECK_SLEEP_MS = 10
#: Kata's templateWaitForAgent (template.go): the agent's time to listen again after the
#: factory disconnects, where nothing tells us when it does (vsock).
TEMPLATE_WAIT_FOR_AGENT = 2.0
#: How long the agent gets to open its port again once its proxy has gone: it takes about
#: 0.9 s here, most of it QEMU's one-second throttle of VSERPORT_CHANGE events.
AGENT_REOPEN_TIMEOUT = 5.0
#: Template VMs booted in a row before the build fails (each one whose agent did not
#: listen again is discarded).
TEMPLATE_ATTEMPTS = 3


class AgentNotListening(TemplateError):
    """The template VM's agent did not listen again after its proxy stopped."""


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_fstype(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The file system type of the mount whose mount point is exactly `path`, or None."""
    target = os.path.realpath(path)
    found = None
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == target:
            found = right.split()[0]  # the last one listed is the one on top
    return found


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        said = out.decode(errors="replace").strip().splitlines()
        raise TemplateError(f"{' '.join(argv)} failed (exit code {proc.returncode})"
                            + (f": {said[-1]}" if said else ""))


async def freshen(agent: Path, *, timeout: float = 10.0) -> None:
    """Give a resumed clone of the demo guest the host's time and fresh entropy."""
    async with await GuestChannel.connect(agent, timeout=timeout) as channel:
        await channel.set_time(time.time(), timeout=timeout)
        await channel.seed(os.urandom(SEED_BYTES), timeout=timeout)


class TemplateFactory:
    """A factory (see `factory/__init__.py`) whose VMs are clones of one template VM."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.direct = DirectFactory(config)
        self.path = config.factory.template_path
        self.memory = self.path / MEMORY_FILE
        self.state = self.path / STATE_FILE
        self.settings_file = self.path / SETTINGS_FILE
        self._lock = asyncio.Lock()
        self._built: str | None = None  # the settings digest of the template on disk
        self._made_dir = False
        #: How the template came to be, for logs and tests: "built" or "reused".
        self.origin = ""
        self.build_seconds: float | None = None

    # what the daemon and the servicer read

    @property
    def accelerator(self) -> str:
        return self.direct.accelerator

    @property
    def spec(self) -> VMSpec:
        return self.direct.spec

    def use_accelerator(self, accelerator: Accelerator) -> None:
        self.direct.use_accelerator(accelerator)

    def template_bytes(self) -> int:
        """Memory the template occupies on its tmpfs (pages the guest touched) + state."""
        total = 0
        for f in (self.memory, self.state):
            with contextlib.suppress(OSError):
                total += f.stat().st_blocks * 512
        return total

    def status_metadata(self) -> list[tuple[str, str]]:
        """Templating on, and the template's size (Kata's GrpcStatus has no field for it)."""
        return [("x-kata-vmcache-template", "on"),
                ("x-kata-vmcache-template-bytes", str(self.template_bytes()))]

    # settings

    def settings(self) -> dict[str, Any]:
        """What a template depends on: a clone must match it exactly."""
        spec = {k: (str(v) if isinstance(v, Path) else v)
                for k, v in dataclasses.asdict(self.direct.spec).items()}
        files = {}
        for f in (self.direct.spec.qemu, self.direct.spec.kernel, self.direct.spec.initrd,
                  self.direct.spec.image):
            if f is not None:
                with contextlib.suppress(OSError):
                    st = os.stat(f)
                    files[str(f)] = [st.st_size, st.st_mtime_ns]
        return {"format": TEMPLATE_FORMAT, "spec": spec, "files": files,
                "ready_line": self.config.daemon.ready_line}

    def digest(self) -> str:
        text = json.dumps(self.settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _stored_digest(self) -> str | None:
        try:
            stored = json.loads(self.settings_file.read_text())
        except (OSError, ValueError):
            return None
        if not (self.memory.is_file() and self.state.is_file()):
            return None
        digest = stored.get("digest") if isinstance(stored, dict) else None
        return digest if isinstance(digest, str) else None

    # the template

    async def ensure_template(self, priority: Level = "normal") -> None:
        """Reuse the template on disk if it matches the settings, else build it (at
        `priority`: the clone's that needs it)."""
        async with self._lock:
            digest = self.digest()
            if self._built == digest:
                return
            await self._mount(fresh=False)
            if self._stored_digest() == digest:
                log.info("reusing the VM template in %s (same settings)", self.path)
                self._built, self.origin = digest, "reused"
                return
            if self.settings_file.exists():
                log.info("the VM template in %s was built from other settings; rebuilding",
                         self.path)
                await self._mount(fresh=True)  # the guest's memory size may have changed
            await self._build(digest, priority)

    async def _mount(self, *, fresh: bool) -> None:
        """A tmpfs on template_path; `fresh`: replace one we mounted (sized for the old
        settings) by a new one."""
        if not self.path.exists():
            self.path.mkdir(mode=0o700, parents=True)
            self._made_dir = True
        if fresh:
            await self._unmount()
        if mount_fstype(self.path) == "tmpfs":
            return
        size = self.direct.spec.memory_mib + TMPFS_HEADROOM_MIB
        await _run("mount", "-t", "tmpfs", "-o", f"mode=0700,size={size}m", MOUNT_SOURCE,
                   str(self.path))
        (self.path / MOUNT_MARKER).touch()
        log.info("mounted a %d MiB tmpfs on %s for the VM template", size, self.path)

    async def _unmount(self) -> None:
        """Unmount the tmpfs on template_path if we mounted it (the marker says so)."""
        marker = self.path / MOUNT_MARKER
        if not marker.exists() or mount_fstype(self.path) != "tmpfs":
            return
        marker.unlink()
        # Lazy: handed-off clones still map the memory file; the kernel frees the tmpfs
        # when the last of them exits.
        await _run("umount", "--lazy", str(self.path))
        log.info("unmounted the template tmpfs on %s", self.path)

    def _claim(self) -> None:
        """Make template_path ours; refuse to delete a template someone else made (Kata's
        own factory keeps `memory` and `state` under the same default path)."""
        owner = self.path / OWNER_MARKER
        if not owner.exists() and (self.memory.exists() or self.state.exists()):
            raise TemplateError(f"factory.template_path: {self.path} holds a VM template "
                                f"kata-vmcache did not make (no {OWNER_MARKER}); remove it "
                                "or choose another template_path")
        self._remove_files()
        owner.touch()

    def _remove_files(self) -> None:
        """Delete our template files; only ours (the owner marker says so)."""
        owner = self.path / OWNER_MARKER
        if not owner.exists():
            return
        for f in (self.settings_file, self.memory, self.state,
                  self.state.with_suffix(".tmp"), owner):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    async def _build(self, digest: str, priority: Level) -> None:
        started = time.monotonic()
        for attempt in range(1, TEMPLATE_ATTEMPTS + 1):
            try:
                await self._build_once(priority)
                break
            except AgentNotListening as exc:
                if attempt == TEMPLATE_ATTEMPTS:
                    raise TemplateError(f"{exc} ({attempt} template VMs in a row)") from None
                log.warning("%s; booting another template VM (attempt %d of %d)", exc,
                            attempt + 1, TEMPLATE_ATTEMPTS)
        self.settings_file.write_text(json.dumps({"digest": digest,
                                                  "settings": self.settings()}, indent=1))
        self._built, self.origin = digest, "built"
        self.build_seconds = time.monotonic() - started
        log.info("VM template built in %.2f s (state %d bytes)", self.build_seconds,
                 self.state.stat().st_size)

    async def _build_once(self, priority: Level) -> None:
        """Boot one template VM, release its agent, save it; on failure nothing is left."""
        self._claim()
        spec = self.direct.spec
        # Kata's BootToBeTemplate: its RAM is the shared file the clones map.
        vm = self.direct.create(memory="template", memory_path=self.memory)
        vm.priority = priority
        vm.log.info("booting the template VM (%d MiB in %s)", spec.memory_mib, self.memory)
        # Ready and still running (stopped and removed on failure): paused now, a kata-proxy
        # that stops would go unseen by the agent (_release_agent).
        await self.direct.boot(vm, pause=False)
        try:
            await self._release_agent(vm)
            tmp = self.state.with_suffix(".tmp")
            await self._set_capabilities(vm)
            await self._migrate(vm, "migrate", f"exec:cat > {shlex.quote(str(tmp))}")
            tmp.replace(self.state)
        except BaseException:
            self._remove_files()  # a half-saved template must not be reused
            raise
        finally:
            # Never `cont` the template: its RAM is the clones' RAM (module docstring).
            await vm.stop(self.config.daemon.stop_timeout)
            if vm.state is VMState.READY:
                vm.transition(VMState.DEAD, "template saved")
            vm.remove_dirs()

    async def _release_agent(self, vm: VM) -> None:
        """End our session with the template's agent and let it listen again before the save,
        as Kata's createTemplateVM does (kata-containers/runtime, virtcontainers/factory/
        template/template.go: `vm.Disconnect()`, then `templateWaitForAgent`, then pause and
        save). Saved inside a session, every clone would restore it: the first request
        through a clone's new kata-proxy then meets `yamux: duplicate stream declared` and
        the agent restarts its gRPC server, seconds the clone's user waits for.

        With a kata-proxy (Kata 1.x, serial channel) we wait for what Kata sleeps 2 s for.
        The proxy is stopped while the guest runs, as Kata's is, and the guest has not been
        paused since its agent answered: a host side that closed while the guest was paused
        went unseen by the agent after `cont` (QEMU 7.2, TCG), and so did one that closed
        right after a `cont`. The agent reads EOF on its port, ends its yamux session, closes
        the port and opens it again to wait for the next host (kata-containers/agent
        agent.go `startGRPC`, channel.go `serialChannel`). QEMU reports the port's state in
        VSERPORT_CHANGE events, at most one a second per port (a close and a reopen within
        the second come as the latest state): the port reported open after the proxy has
        gone is the agent listening again.

        About one time in five here the reopening races the close (`open /dev/vport0p1:
        device or resource busy`) and the agent's gRPC loop gives up for good. Kata's own
        factory saves such a template after its 2 s, and every clone of it fails; we see no
        reopening, save nothing, and boot another template VM (`AgentNotListening`,
        TEMPLATE_ATTEMPTS). A guest without an agent holds no session; over vsock there is
        no such signal, so Kata's own wait. Returns with the template paused."""
        if self.config.daemon.ready_probe != "kata-agent":
            await vm.process.execute("stop")
            return
        if vm.proxy is None:
            await asyncio.sleep(TEMPLATE_WAIT_FOR_AGENT)
            await vm.process.execute("stop")
            return
        qmp = vm.process.qmp
        if qmp is None:
            raise TemplateError(f"VM {vm.id}: no QMP session to follow its agent's port")
        timeout = AGENT_REOPEN_TIMEOUT
        with qmp.listener("VSERPORT_CHANGE") as events:
            started = time.monotonic()
            await vm.proxy.stop(self.config.daemon.stop_timeout)
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        data = (await events.get()).get("data")
                        if (isinstance(data, dict) and data.get("id") == AGENT_PORT_ID
                                and data.get("open")):
                            break
            except TimeoutError:
                raise AgentNotListening(
                    f"template VM {vm.id}: its agent did not open its port again within "
                    f"{timeout:g} s of its kata-proxy's exit (Kata 1.x's agent sometimes "
                    "fails to: 'Failed to setup agent grpc channel: device or resource busy', "
                    "then serves nobody); it is not saved, its clones would be dead") from None
            await vm.process.execute("stop")
        vm.log.info("the template's agent listens again %.0f ms after its proxy stopped",
                    (time.monotonic() - started) * 1000)

    async def _set_capabilities(self, vm: VM) -> None:
        await vm.process.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},  # MIGRATION events: no polling
        ]})

    async def _migrate(self, vm: VM, command: str, uri: str) -> None:
        qmp = vm.process.qmp
        if qmp is None:
            raise TemplateError(f"VM {vm.id}: no QMP session for {command}")
        timeout = self.config.daemon.ready_timeout
        with qmp.listener("MIGRATION") as events:
            await vm.process.execute(command, {"uri": uri})
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        data = (await events.get()).get("data")
                        status = data.get("status") if isinstance(data, dict) else None
                        if status == "completed":
                            return
                        if status in ("failed", "cancelled"):
                            break
            except TimeoutError:
                status = f"not done after {timeout:g} s"
        detail = ""
        with contextlib.suppress(Exception):
            info = await vm.process.execute("query-migrate")
            if isinstance(info, dict) and info.get("error-desc"):
                detail = f": {info['error-desc']}"
        raise TemplateError(f"VM {vm.id}: {command} {status}{detail}")

    # clones (the Factory interface)

    def create(self) -> VM:
        # Kata's BootFromTemplate: the file mapped private, device state from the template.
        return self.direct.create(template=str(self.path), memory="clone",
                                  memory_path=self.memory)

    async def boot(self, vm: VM) -> None:
        """booting -> ready: restore from the template, check the timers, stay paused."""
        vm.require(VMState.BOOTING)
        try:
            await self.ensure_template(vm.priority)
        except BaseException as exc:
            vm.transition(VMState.FAILED, str(exc) or type(exc).__name__)
            raise
        started = time.monotonic()
        try:
            vm.claim()
            await vm.process.start()
            vm.write_record()
            await self._set_capabilities(vm)
            await self._migrate(vm, "migrate-incoming", f"exec:cat {shlex.quote(str(self.state))}")
            self.direct.start_proxy(vm)  # Kata's NewVM starts a clone's proxy too
            await self._check_clone(vm)
            booted(vm, started)
        except BaseException as exc:
            await abandon(vm, exc, self.config.daemon.stop_timeout)
            raise

    async def _check_clone(self, vm: VM) -> None:
        """Resume, ask the guest something that needs its timers, pause: a clone with frozen
        timers fails. The demo guest: a ping it answers after sleeping. A Kata guest: the
        agent's health check (Kata itself checks no clone; we will not cache one unasked)."""
        timeout = self.config.daemon.ready_timeout
        if self.config.daemon.ready_probe == "kata-agent":
            probe = self.direct.probe_for(vm)
            await probe.attach(vm.paths)
            try:
                await vm.process.execute("cont")
                # Its QEMU or kata-proxy exiting fails the check at once (LaunchError).
                await self.direct.wait_ready(vm, probe, timeout)
            except GuestNotReady as exc:
                raise GuestNotReady(f"clone {vm.id} restored from the template in {self.path}: "
                                    f"the agent did not answer within {timeout:g} s, so it is "
                                    "not cached", argv=vm.process.argv) from exc
            finally:
                await probe.close()
            await vm.process.execute("stop")
            return
        async with await GuestChannel.connect(vm.paths.guest) as channel:
            await vm.process.execute("cont")
            try:
                await channel.ping(timeout, guest_sleep_ms=CHECK_SLEEP_MS)
            except (TimeoutError, ConnectionError) as exc:
                raise GuestNotReady(
                    f"clone {vm.id} restored from the template in {self.path} does not "
                    f"answer a timer-based ping within {timeout:g} s: its timers do not "
                    f"run, so it is not cached ({exc})", argv=vm.process.argv) from exc
            # On failure there is nothing to pause: boot() stops the clone.
            await vm.process.execute("stop")

    async def close(self) -> None:
        """Remove the template files, and the tmpfs if we mounted it (daemon shutdown)."""
        async with self._lock:
            self._built = None
            self._remove_files()
            try:
                await self._unmount()
            except TemplateError as exc:
                log.error("cannot unmount the template tmpfs: %s", exc)
            if self._made_dir:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
