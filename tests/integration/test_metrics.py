"""Prometheus scrapes a real daemon: Debian's `prometheus`, on a loopback port, with a scrape
configuration for the daemon's `metrics_address`; every assertion goes through Prometheus's
own HTTP query API, not our endpoint. Beside it, what keeps instances apart: a second daemon
is refused the state directory and the metrics port the first one holds.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache.demo.config import render_config
from kata_vmcache.demo.guest import DemoGuest

from .harness import Daemon, run_cli, wait_for

pytestmark = pytest.mark.qemu

HANDOFFS = 'kata_vmcache_handoffs_total{job="kata-vmcache"}'
READY = 'kata_vmcache_ready_vms{job="kata-vmcache"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A Prometheus server of our own, scraping `target` every second."""

    def __init__(self, target: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kvc-prom-"))
        self.port = free_port()
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "kata-vmcache",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = open(self.dir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> float | None:
        """The instant value of `expr`, or None while Prometheus has none (or is starting)."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                body: dict[str, Any] = json.load(reply)
        except OSError:
            return None
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()  # by pid: this Popen's own
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus_for() -> Iterator[Callable[[str], Prometheus]]:
    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed (run `make setup`)")
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        started.append(Prometheus(target))
        return started[-1]

    yield start
    for p in started:
        p.stop()


def test_prometheus_sees_a_handoff_and_the_ready_gauge(
        make_daemon: Callable[..., Daemon], prometheus_for: Callable[[str], Prometheus],
        demo_guest: DemoGuest, workdir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(1, metrics_address=address)
    daemon.wait_ready(1)
    prom = prometheus_for(address)
    wait_for(lambda: prom.query(HANDOFFS) == 0, 60, "Prometheus to scrape the daemon")

    daemon.get()
    wait_for(lambda: prom.query(HANDOFFS) == 1, 30, "the hand-off in Prometheus")

    def ready_matches() -> bool:
        # The cache's own count of ready VMs (Status lists ready VMs only), stable around
        # Prometheus's answer: the refill may finish in between.
        before = len(daemon.cli("status").stdout.splitlines()) - 1
        seen = prom.query(READY)
        after = len(daemon.cli("status").stdout.splitlines()) - 1
        return before == after == 1 and seen == 1
    wait_for(ready_matches, 90, "Prometheus's ready gauge to match the refilled cache")
    assert prom.query('kata_vmcache_target_vms{job="kata-vmcache"}') == 1
    assert prom.query('kata_vmcache_boots_total{job="kata-vmcache"}') == 2
    assert prom.query('kata_vmcache_handoff_duration_seconds_count{job="kata-vmcache"}') == 1

    # Instances never share: the state directory and the metrics port are refused to a
    # second daemon, with a one-line error, before it boots anything.
    def second(state: Path, metrics: str) -> subprocess.CompletedProcess[str]:
        config = workdir / "second.toml"
        config.write_text(render_config(demo_guest, endpoint=workdir / "second.sock",
                                        state_dir=state, cache_number=1,
                                        metrics_address=metrics))
        return run_cli(["--config", str(config), "init"], timeout=60)

    def error(result: subprocess.CompletedProcess[str]) -> str:
        # (the demo file's warnings come first: no vhost-vsock here)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if " WARNING " not in line]
        assert len(errors) == 1, result.stderr
        return errors[0]

    same_state = error(second(workdir / "state", ""))
    assert "another kata-vmcache" in same_state
    assert f"(pid {daemon.pid})" in same_state
    same_port = error(second(workdir / "state2", address))
    assert f"cannot listen on {address}" in same_port
    assert not (workdir / "second.sock").exists()
