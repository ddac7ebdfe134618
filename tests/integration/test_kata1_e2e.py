"""Real Kata 1.x containers on our VMs: Kata's own kata-runtime, agent (in the guest),
kata-proxy and kata-shim start a container whose VM comes from a kata-vmcache daemon, cold
booted, cloned from a template, and sharing files over virtio-fs, as `make bench-kata`
measures it (bench/kata1.py is the shared harness). Needs an installed Kata 1.x
(bench/kata1.py names the variables; KATA1_VIRTIOFS_INITRD an agent initrd with the
virtio-fs modules) and root; skipped with the reason otherwise (CI has no Kata 1.x)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import kata1  # bench/kata1.py

TOOLS = kata1.find_tools()

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(isinstance(TOOLS, str), reason=str(TOOLS)),
    pytest.mark.skipif(os.geteuid() != 0, reason="kata-runtime 1.x needs root"),
    pytest.mark.timeout(300),
]


@pytest.fixture
def host() -> Iterator[kata1.Syslog]:
    with kata1.Syslog() as syslog, kata1.host_ready():
        yield syslog


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kt-", dir="/run"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def counters(config: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-m", "kata_vmcache", "--config", str(config),
                           "status", "--json"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout)["snapshot"]["counters"]
    return result


@pytest.mark.parametrize(("template", "shared_fs"), [
    (False, "virtio-9p"), (True, "virtio-9p"), (False, "virtio-fs")],
    ids=["cold", "template", "virtio-fs"])
def test_a_kata1_container_starts_on_a_cached_vm(host: kata1.Syslog, work: Path,
                                                 template: bool, shared_fs: str) -> None:
    assert isinstance(TOOLS, kata1.Tools)
    tools = TOOLS
    if shared_fs == "virtio-fs":
        # The guest needs the kernel's fuse and virtiofs modules: an initrd of its own
        # (../shared/kata1-e2e: EXTRA_MODULES="fuse virtiofs" build-initrd.sh).
        initrd = os.environ.get("KATA1_VIRTIOFS_INITRD", "")
        if not Path(initrd).is_file():
            pytest.skip("KATA1_VIRTIOFS_INITRD names no agent initrd with virtio-fs modules")
        tools = dataclasses.replace(TOOLS, initrd=Path(initrd))
        if (missing := kata1.missing_virtiofsd(tools)) is not None:
            pytest.skip(missing)
    setup = kata1.Setup(cache_number=1, template=template, shared_fs=shared_fs)
    config = kata1.write_config(work / "configuration.toml", tools, setup,
                                endpoint=work / "cache.sock", template_path=work / "template",
                                state_dir=work / "state")
    bundle = kata1.make_bundle(work / "bundle", tools, config)
    server = kata1.CacheServer("vmcache", tools, config, work / "cache.sock",
                               work / "server.log")
    server.start(1)
    try:
        result = kata1.run_container(tools, config, bundle,
                                     f"kt-{os.getpid()}-{template:d}{shared_fs[-2:]}",
                                     syslog=host)
        seen = counters(config)
    finally:
        left = server.stop()
    log = (work / "server.log").read_text()
    assert result["rc"] == 0, (result, log[-2000:])
    assert kata1.MARKER in result["stdout"][0]
    # The sandbox ran on our VM: the daemon handed one out, kata-runtime says it assigned it.
    assert seen["handed_out"] == 1
    assert seen["boot_failures"] == 0, log[-2000:]
    if host.available:
        assert result["from_cache"], result
        # A template saved inside the agent's session makes every clone restart it.
        assert result["agent_duplicate_stream"] == 0
    assert left == []
    assert result["cleanup"] == []
    if template:
        assert "the template's agent listens again" in log
