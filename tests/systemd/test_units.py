"""The shipped systemd units under a real systemd as PID 1 (issue 25, first part).

Opt-in: these tests run only with KVC_SYSTEMD=1 (`make test-systemd`) and skip otherwise.
CI runs them after the suite (.ci/run), not inside `make test`: the suite's leak guard
reads the host's process table, where this container's QEMUs show, so the two cannot run
side by side on the suite's parallel workers.

The bed (tests/systemd/bed.py) boots a private copy of a cached Debian bookworm rootfs
under systemd-nspawn, with the project installed as `make install` would do it but the way
the DaemonSet's pod runs scripts/install.sh (CHROOT=yes, offline from wheels built from
this tree), so the virtualenv at /opt/kata-vmcache is built by the rootfs's own python3.
The units are the shipped ones, untouched. Two things are the test's:
- /etc/kata-containers/configuration.toml is the demo guest's configuration, its kernel
  and initrd copied into the rootfs, with the shipped file's endpoint
  (/run/kata-containers/cache.sock), state_dir (/run/kata-vmcache) and vm_storage_path;
  the unit finds it by Kata's lookup order, as on a host;
- a drop-in, kata-vmcache.service.d/test.conf, shortens WatchdogSec from 30s to 6s, so a
  watchdog restart fits in a test. Nothing else of the unit is changed.

Verified so far: `systemctl start` returns once READY=1 is sent and the socket serves;
`systemctl status` shows the daemon's STATUS= line; the journal holds its start-up lines;
a VM taken with `kata-vmcache get` survives `systemctl stop` and `systemctl restart`
(KillMode=process), and each time the daemon stopped only the VMs it still owned; a
refused edit makes `systemctl reload` fail with the reason in the journal while the same
daemon keeps serving, and a good edit applies; a SIGSTOPped daemon is killed by the
watchdog and restarted (Restart=on-failure), a taken VM survives, and the new daemon stops
the VMs its predecessor still owned (RuntimeDirectoryPreserve=yes kept their records);
`kata-vmcache destroy` is not restarted; kata-vmcache@a and @b serve side by side and
stopping one leaves the other and both taken VMs alone; under the hardening QEMU boots and
the template factory mounts its tmpfs (in the unit's own mount namespace) and hands out
clones.

Time: ~25 s of set-up (a private copy, wheels and install.sh), ~45 s of tests, plus the
~75 s rootfs build once per machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tree_wheels import build_wheels

from . import bed

REPO = Path(__file__).resolve().parents[2]
UNIT = "kata-vmcache"
ENDPOINT = "/run/kata-containers/cache.sock"

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(os.environ.get("KVC_SYSTEMD") != "1",
                       reason="systemd-as-PID-1 tests are opt-in: KVC_SYSTEMD=1 "
                              "(make test-systemd)"),
    # A booted container and TCG boots inside it: longer than the suite's 120 s default.
    pytest.mark.timeout(300),
]

#: Shortens the shipped 30 s watchdog so a watchdog restart fits in a test; the rest of the
#: unit is as shipped.
DROP_IN = "[Service]\nWatchdogSec=6s\n"


def until(check: Callable[[], Any], timeout: float, what: Callable[[], object],
          interval: float = 0.2) -> Any:
    """Poll `check` (another process's state, seen through systemctl or our CLI: nothing
    to await) until it gives a true value, and return it; fail with `what()` once
    `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what()
        time.sleep(interval)
    return value


def _configure(root: Path) -> None:
    """The demo guest inside the rootfs, and Kata's configuration.toml pointing at it."""
    demo = root / "usr/share/kata-vmcache-demo"
    subprocess.run([str(Path(sys.executable).parent / "kata-vmcache"), "demo-guest",
                    "--cache-number", "1", str(demo)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    generated = demo / "configuration.toml"
    lines = []
    for line in generated.read_text().replace(str(root), "").splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "vm_cache_endpoint":
            line = f'vm_cache_endpoint = "{ENDPOINT}"'
        elif key == "state_dir":
            line = 'state_dir = "/run/kata-vmcache"'
        elif key == "vm_storage_path":
            line = 'vm_storage_path = "/run/vc/vm"'
        lines.append(line)
    generated.unlink()
    config = root / "etc/kata-containers/configuration.toml"
    config.write_text("\n".join(lines) + "\n")
    drop_in = root / f"etc/systemd/system/{UNIT}.service.d/test.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(DROP_IN)


@pytest.fixture(scope="module")
def container() -> Iterator[bed.Container]:
    why = bed.unavailable()
    if why is not None:
        pytest.fail(why)  # KVC_SYSTEMD=1 asked for these tests: never skip silently
    timings = {}
    started = time.monotonic()
    cached = bed.build()
    timings["rootfs (cached, or built)"] = time.monotonic() - started
    work = Path(tempfile.mkdtemp(prefix="run-", dir=bed.CACHE))
    root = work / "root"
    container = None
    try:
        started = time.monotonic()
        subprocess.run(["cp", "-a", "--reflink=auto", str(cached), str(root)], check=True,
                       timeout=300)
        timings["private copy"] = time.monotonic() - started
        started = time.monotonic()
        wheels = build_wheels(work, deps=True)
        # Not this machine's pip settings (PIP_FIND_LINKS...): the wheels are all it needs.
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
               "ROOT": str(root), "CHROOT": "yes", "WHEELS": str(wheels),
               "SOURCE": "kata-vmcache"}
        subprocess.run([str(REPO / "scripts/install.sh")], env=env, check=True, timeout=300)
        _configure(root)
        timings["wheels, install.sh, demo guest"] = time.monotonic() - started
        started = time.monotonic()
        container = bed.boot(root, work / "nspawn.log")
        timings["boot to multi-user"] = time.monotonic() - started
        container.timings.update(timings)
        yield container
    finally:
        if container is not None:
            container.stop()
        shutil.rmtree(work)


def qemus(c: bed.Container) -> dict[int, str]:
    """The container's kata-vmcache QEMUs: pid (as the container numbers it) -> VM name."""
    out = c.run("ps", "-eo", "pid=,args=").stdout
    found = {}
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        words = args.split()
        if words and words[0].rsplit("/", 1)[-1].startswith("qemu-system"):
            names = [w for w in words if w.startswith("sandbox-")]
            if names:
                found[int(pid)] = names[0]
    return found


def status(c: bed.Container, endpoint: str = ENDPOINT) -> dict[str, object]:
    # --endpoint: not the configuration's, which a test may have broken on purpose.
    return dict(json.loads(c.run("/opt/kata-vmcache/bin/kata-vmcache", "status", "--json",
                                 "--endpoint", endpoint).stdout))


def owned_pids(c: bed.Container, endpoint: str = ENDPOINT) -> set[int]:
    vms = status(c, endpoint)["vms"]
    assert isinstance(vms, list)
    return {int(v["pid"]) for v in vms}


def wait_owned(c: bed.Container, endpoint: str = ENDPOINT, timeout: float = 120) -> set[int]:
    """The pids of the cache's ready VMs, once it has one."""
    pids: set[int] = until(lambda: owned_pids(c, endpoint), timeout,
                           lambda: "the cache readied no VM", interval=0.5)
    return pids


def show(c: bed.Container, *props: str, unit: str = UNIT) -> dict[str, str]:
    out = c.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(c: bed.Container) -> str:
    return c.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout


@pytest.fixture
def service(container: bed.Container) -> Iterator[bed.Container]:
    """Each test starts the unit itself; afterwards it is stopped and any VM a test took is
    killed, so no QEMU outlives the test (the suite's leak guard would see it)."""
    yield container
    container.run("systemctl", "stop", UNIT, f"{UNIT}@a", f"{UNIT}@b", check=False)
    for pid in qemus(container):
        container.run("kill", "-KILL", str(pid), check=False)
    container.run("systemctl", "reset-failed", UNIT, check=False)


def test_start_returns_once_ready(service: bed.Container,
                                  report: Callable[[str, object], None]) -> None:
    c = service
    for what, seconds in c.timings.items():
        report(f"systemd bed: {what}", f"{seconds:.1f} s")
    started = time.monotonic()
    c.run("systemctl", "start", UNIT)
    report("systemctl start kata-vmcache", f"{time.monotonic() - started:.2f} s")
    # Type=notify: start returned, so READY=1 came; the socket answers at once.
    state = show(c, "ActiveState", "SubState", "MainPID", "StatusText")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert status(c)["pid"] == int(state["MainPID"])
    assert state["StatusText"], "the daemon sent no STATUS="
    text = c.run("systemctl", "status", "--no-pager", UNIT, check=False).stdout
    assert f'Status: "{state["StatusText"]}"' in text, text
    # The journal holds the start-up lines (stderr is the journal under the unit).
    assert f"serving 1 TCG VMs (1 vCPU, 256 MiB) on {ENDPOINT}" in journal(c), journal(c)


def test_taken_vm_survives_stop_and_restart(service: bed.Container) -> None:
    c = service
    c.run("systemctl", "start", UNIT)
    taken = json.loads(c.run("/opt/kata-vmcache/bin/kata-vmcache", "get",
                             "--timeout", "120").stdout)
    mine = {pid for pid, name in qemus(c).items() if name == f"sandbox-{taken['id']}"}
    assert len(mine) == 1, qemus(c)
    owned = wait_owned(c)
    assert not owned & mine

    c.run("systemctl", "stop", UNIT)
    # KillMode=process: systemd signalled the daemon only; the daemon stopped its own VMs.
    assert set(qemus(c)) == mine, (qemus(c), owned)
    assert show(c, "ActiveState")["ActiveState"] == "inactive"

    c.run("systemctl", "start", UNIT)
    owned = wait_owned(c)
    c.run("systemctl", "restart", UNIT)
    assert set(qemus(c)).isdisjoint(owned), (qemus(c), owned)
    assert mine <= set(qemus(c))
    # The restarted daemon serves, and the VM it was not given is still not its own.
    assert not owned_pids(c) & mine


def test_reload_refuses_a_bad_edit_and_applies_a_good_one(service: bed.Container) -> None:
    c = service
    config = c.root / "etc/kata-containers/configuration.toml"
    good = config.read_text()
    c.run("systemctl", "start", UNIT)
    pid = show(c, "MainPID")["MainPID"]
    try:
        config.write_text(good.replace("vm_cache_number = 1", "vm_cache_number = -1"))
        refused = c.run("systemctl", "reload", UNIT, check=False)
        assert refused.returncode != 0, refused
        assert "factory.vm_cache_number" in journal(c), journal(c)
        # The old settings keep serving, in the same daemon.
        assert show(c, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
        assert status(c)["pid"] == int(pid)

        config.write_text(good.replace("vm_cache_number = 1", "vm_cache_number = 2"))
        c.run("systemctl", "reload", UNIT)
        assert "configuration reloaded" in journal(c), journal(c)
        until(lambda: len(owned_pids(c)) >= 2, 120, lambda: status(c), interval=0.5)
    finally:
        config.write_text(good)


def test_watchdog_restarts_a_stopped_daemon(service: bed.Container,
                                            report: Callable[[str, object], None]) -> None:
    c = service
    c.run("systemctl", "start", UNIT)
    taken = json.loads(c.run("/opt/kata-vmcache/bin/kata-vmcache", "get",
                             "--timeout", "120").stdout)
    mine = {pid for pid, name in qemus(c).items() if name == f"sandbox-{taken['id']}"}
    owned = wait_owned(c)
    old = show(c, "MainPID", "NRestarts")
    c.run("kill", "-STOP", old["MainPID"])
    stopped = time.monotonic()
    # WatchdogSec=6s (the drop-in): systemd sends SIGABRT (with SIGCONT), Restart=on-failure
    # starts a new daemon RestartSec=2s later; it stops the VMs its predecessor still owned.
    def restarted() -> dict[str, str] | None:
        now = show(c, "MainPID", "NRestarts", "ActiveState")
        serving = now["ActiveState"] == "active" and now["MainPID"] not in ("0", old["MainPID"])
        return now if serving else None

    now = until(restarted, 60, lambda: show(c, "MainPID", "NRestarts", "ActiveState"))
    report("SIGSTOP to a new daemon serving", f"{time.monotonic() - stopped:.1f} s")
    assert int(now["NRestarts"]) == int(old["NRestarts"]) + 1
    assert "Watchdog timeout" in journal(c), journal(c)
    assert status(c)["pid"] == int(now["MainPID"])
    # The new daemon's clean-up of the VMs its predecessor owned.
    until(lambda: set(qemus(c)).isdisjoint(owned), 60, lambda: (qemus(c), owned))
    assert mine <= set(qemus(c))


def test_destroy_is_not_restarted(service: bed.Container) -> None:
    c = service
    c.run("systemctl", "start", UNIT)
    before = show(c, "NRestarts")["NRestarts"]
    c.run("/opt/kata-vmcache/bin/kata-vmcache", "destroy")
    # Quit exits 0: Restart=on-failure leaves it stopped. Watched past RestartSec=2s, since
    # what is checked is that nothing happens.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = show(c, "ActiveState", "SubState", "NRestarts")
        assert state["NRestarts"] == before, state
        if state["ActiveState"] != "inactive":
            assert state["ActiveState"] == "deactivating", state
        time.sleep(0.2)  # watching for a restart that must not come
    assert show(c, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    assert qemus(c) == {}


def test_instances_serve_side_by_side(service: bed.Container) -> None:
    c = service
    demo = (c.root / "etc/kata-containers/configuration.toml").read_text()
    endpoints = {}
    for name in ("a", "b"):
        endpoints[name] = f"/run/kata-containers/{name}.sock"
        config = c.root / f"etc/kata-containers/configuration-{name}.toml"
        config.write_text(demo.replace(ENDPOINT, endpoints[name])
                          .replace('state_dir = "/run/kata-vmcache"',
                                   f'state_dir = "/run/kata-vmcache/{name}"')
                          .replace('vm_storage_path = "/run/vc/vm"',
                                   f'vm_storage_path = "/run/vc/{name}"'))
    c.run("systemctl", "start", f"{UNIT}@a", f"{UNIT}@b")
    taken = {}
    for name in ("a", "b"):
        got = json.loads(c.run("/opt/kata-vmcache/bin/kata-vmcache", "--runtime-class", name,
                               "get", "--timeout", "120").stdout)
        taken[name] = {pid for pid, vm in qemus(c).items() if vm == f"sandbox-{got['id']}"}
        assert len(taken[name]) == 1
    owned = {name: wait_owned(c, endpoints[name]) for name in ("a", "b")}
    assert status(c, endpoints["a"])["pid"] != status(c, endpoints["b"])["pid"]

    c.run("systemctl", "stop", f"{UNIT}@a")
    assert show(c, "ActiveState", unit=f"{UNIT}@b")["ActiveState"] == "active"
    left = set(qemus(c))
    assert left.isdisjoint(owned["a"]), (left, owned)
    assert owned["b"] | taken["a"] | taken["b"] <= left, (left, owned, taken)
    assert owned_pids(c, endpoints["b"]) == owned["b"]


def test_template_factory_under_the_hardening(service: bed.Container) -> None:
    c = service
    config = c.root / "etc/kata-containers/configuration.toml"
    demo = config.read_text()
    template = "/run/vc/vm/template"
    try:
        config.write_text(demo.replace(
            "enable_template = false",
            f'enable_template = true\ntemplate_path = "{template}"'))
        c.run("systemctl", "start", UNIT)
        wait_owned(c)
        assert "VM template built" in journal(c), journal(c)
        # The tmpfs is mounted in the unit's own mount namespace (ProtectSystem= gives it
        # one), where its QEMUs, the clones, run.
        pid = show(c, "MainPID")["MainPID"]
        assert c.run("findmnt", "-N", pid, "-no", "FSTYPE", template).stdout.strip() == "tmpfs"
        record = json.loads(c.run("/opt/kata-vmcache/bin/kata-vmcache", "get",
                                  "--timeout", "120").stdout)["hypervisor"]
        assert record["FromTemplate"] is True
        c.run("systemctl", "stop", UNIT)
        assert "unmounted the template tmpfs" in journal(c), journal(c)
    finally:
        config.write_text(demo)
