"""systemd/kata-vmcache.service: what issue 5 requires of it, and `systemd-analyze verify`.

verify exits 0 on an unknown key (it only prints a warning), so any output fails the test;
a unit with a typo proves that the check can fail. The unit's ExecStart points at the
installed virtualenv (/opt/kata-vmcache), which verify requires to exist: the copy under
test points at this interpreter's kata-vmcache instead, and nothing else changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "kata-vmcache.service"
INSTALLED = "/opt/kata-vmcache/bin/kata-vmcache"


def parse(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_unit_has_what_the_service_needs() -> None:
    service = parse(UNIT.read_text())["Service"]
    one = {k: v[-1] for k, v in service.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{INSTALLED} init"
    # ExecReload signals the main process with SIGHUP (through `reload`, which waits).
    assert one["ExecReload"] == f"{INSTALLED} reload --pid $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"]
    # The socket's and the state's directories; kept, as handed-off VMs still use them.
    assert one["RuntimeDirectory"].split() == ["kata-vmcache", "kata-containers"]
    assert one["RuntimeDirectoryPreserve"] == "yes"
    # Handed-off VMs stay in the cgroup and must survive `systemctl stop`.
    assert one["KillMode"] == "process"
    # QEMU needs /dev/kvm and executable memory for TCG.
    for forbidden in ("PrivateDevices", "DevicePolicy", "MemoryDenyWriteExecute",
                      "PrivateTmp", "ProtectClock"):
        assert forbidden not in service, forbidden
    # Every directive is explained by a comment above it (or in the group it belongs to).
    lines = UNIT.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#") and i and not lines[i - 1].strip():
            pytest.fail(f"line {i + 1} ({line}) starts a group without a comment")


def verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (scripts/setup-system.sh installs systemd)")
    exe = Path(sys.executable).parent / "kata-vmcache"
    assert os.access(exe, os.X_OK), f"{exe}: install the package (make venv)"
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED, str(exe)))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(tmp_path, UNIT.read_text())
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    result = verify(tmp_path, UNIT.read_text().replace("WatchdogSec=", "WatchDogSec="))
    assert "Unknown key 'WatchDogSec'" in result.stdout + result.stderr


# --- kata-vmcache@.service: one instance per Kata runtime class ---------------------------

TEMPLATE = UNIT.parent / "kata-vmcache@.service"


def test_template_is_the_plain_unit_but_for_the_file_it_reads() -> None:
    plain = parse(UNIT.read_text())
    template = parse(TEMPLATE.read_text())
    exe = INSTALLED
    assert template["Service"].pop("ExecStart") == [f"{exe} --runtime-class %i init"]
    assert template["Service"].pop("ExecReload") == [
        f"{exe} --runtime-class %i reload --pid $MAINPID"]
    assert "%i" in template["Unit"].pop("Description")[0]
    for section in ("Service", "Unit"):
        plain[section] = {k: v for k, v in plain[section].items()
                          if k not in ("ExecStart", "ExecReload", "Description")}
    # Everything else (hardening, KillMode, watchdog ...) must not drift between the two.
    assert template == plain


def test_template_instance_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "kata-vmcache"
    (tmp_path / TEMPLATE.name).write_text(TEMPLATE.read_text().replace(INSTALLED, str(exe)))
    # An instance name, so that %i is expanded as `systemctl start kata-vmcache@qemu` would.
    (tmp_path / "kata-vmcache@qemu.service").symlink_to(TEMPLATE.name)
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is missing (scripts/setup-system.sh installs systemd)")
    result = subprocess.run([analyze, "verify", str(tmp_path / "kata-vmcache@qemu.service")],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    # ... and it can fail: a typo is reported.
    (tmp_path / TEMPLATE.name).write_text(TEMPLATE.read_text().replace(
        INSTALLED, str(exe)).replace("KillMode=", "KilMode="))
    result = subprocess.run([analyze, "verify", str(tmp_path / "kata-vmcache@qemu.service")],
                            capture_output=True, text=True, timeout=60)
    assert "KilMode" in result.stderr
