"""scripts/install.sh, the installer `make install` and the DaemonSet's pod run, against a
temporary root: it lays the virtualenv, both units and the configuration there, keeps a
configuration Kata already has, and `systemd-analyze verify --root` accepts the units it
wrote (ExecStart resolved inside the root: the virtualenv must be where the units say).

The pod's own path (CHROOT=yes, the host's python3 inside the root) needs a whole OS in the
root and is not run here; the wheel path it takes (WHEELS=, offline) is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tree_wheels import build_wheels

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built from this tree (the image holds it with its dependencies)."""
    return build_wheels(tmp_path_factory.mktemp("wheels"), deps=False)


def install(root: Path, wheels: Path) -> subprocess.CompletedProcess[str]:
    # The base interpreter (not this virtualenv's), as the host's python3 would be.
    base = Path(sys.base_prefix) / "bin" / "python3"
    env = {**os.environ, "ROOT": str(root), "WHEELS": str(wheels), "SOURCE": "kata-vmcache",
           "PYTHON": str(base),
           # Only our wheel is in the directory; its dependencies are the image's business.
           "PIP_ARGS": "--no-deps"}
    return subprocess.run([str(INSTALL)], env=env, capture_output=True, text=True,
                          timeout=180)


def test_installer_lays_a_working_tree_in_a_root(tmp_path: Path, wheels: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = install(root, wheels)
    assert result.returncode == 0, result.stderr
    venv = root / "opt" / "kata-vmcache"
    assert os.access(venv / "bin" / "kata-vmcache", os.X_OK)
    units = root / "etc" / "systemd" / "system"
    for unit in ("kata-vmcache.service", "kata-vmcache@.service"):
        text = (units / unit).read_text()
        assert "ExecStart=/opt/kata-vmcache/bin/kata-vmcache " in text
    config = root / "etc" / "kata-containers" / "configuration.toml"
    assert config.read_text() == (REPO / "etc" / "configuration.toml").read_text()
    assert (venv / "share" / "doc" / "kata-vmcache" / "README.md").is_file()
    # The README's links resolve on the host too: its docs/ pages are installed beside it.
    installed = {p.name for p in (venv / "share" / "doc" / "kata-vmcache" / "docs").glob("*.md")}
    assert installed == {p.name for p in (REPO / "docs").glob("*.md")}

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (scripts/setup-system.sh installs systemd)")
    # The targets the units name (multi-user.target ...), as a host has them.
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system",
                    symlinks=True)
    (units / "kata-vmcache@qemu.service").symlink_to("kata-vmcache@.service")
    verify = subprocess.run([analyze, "verify", f"--root={root}", "kata-vmcache.service",
                             "kata-vmcache@qemu.service"], capture_output=True, text=True,
                            timeout=60)
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    # ... and verify would see a unit whose ExecStart is not in the root.
    (units / "kata-vmcache.service").write_text(
        (units / "kata-vmcache.service").read_text().replace("/opt/kata-vmcache/", "/opt/x/"))
    verify = subprocess.run([analyze, "verify", f"--root={root}", "kata-vmcache.service"],
                            capture_output=True, text=True, timeout=60)
    assert "/opt/x/bin/kata-vmcache is not executable" in verify.stderr

    # Again, on a root whose Kata already has a configuration: it is kept, untouched.
    config.write_text("# Kata's own\n")
    again = install(root, wheels)
    assert again.returncode == 0, again.stderr
    assert "kept Kata's configuration" in again.stderr
    assert config.read_text() == "# Kata's own\n"
