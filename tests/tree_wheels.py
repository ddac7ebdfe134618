"""Wheels built from this tree, as the DaemonSet's image builds them
(deploy/kubernetes/Containerfile): for the installer's tests and the systemd bed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheels(work: Path, *, deps: bool) -> Path:
    """Our wheel (and, with `deps`, its dependencies') in `work`/wheels, built from a copy
    of the tree without its virtualenv, caches and benches."""
    src = work / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".demo", ".git", "*_cache", ".cache", "build", "*.egg-info", "bench"))
    wheels = work / "wheels"
    options = [] if deps else ["--no-deps", "--no-build-isolation"]
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q",
                           "--disable-pip-version-check", *options, "-w", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"pip wheel exited with {done.returncode}: {done.stderr[-2000:]}")
    return wheels
