"""The metrics the collector builds from a pool of fake VMs, served over real HTTP on the
loop; the failure classes and histograms it reads; and the Grafana dashboard, whose every
query must name only metrics the daemon exports."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kata_vmcache.config import AutoscaleSettings
from kata_vmcache.errors import UsageError
from kata_vmcache.pool.activity import FAILURE_CLASSES, Histogram, failure_class
from kata_vmcache.pool.autoscale import REASON_KINDS, Autoscaler
from kata_vmcache.pool.cache import VMCache
from kata_vmcache.service.metrics import MetricsServer, registry_for

from .fakes import FakeFactory, until
from .servicer_fakes import hand_off, make_config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kata-vmcache.json"


async def scrape(server: MetricsServer, request: bytes) -> tuple[str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    writer.write_eof()
    reply = (await reader.read()).decode()
    writer.close()
    head, _, body = reply.partition("\r\n\r\n")
    return head, body


def samples(text: str) -> dict[str, float]:
    """'name{label="v"}' -> value, for every sample in an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@pytest.mark.asyncio
async def test_scrape_reads_the_pool(pool: tuple[VMCache, FakeFactory], tmp_path: Path) -> None:
    cache, factory = pool
    await until(cache, lambda: cache.ready_count == 2)
    await hand_off(cache)
    factory.fail_next = 1
    await until(cache, lambda: cache.stats.boot_failures == 1)
    cache.memory_budget_mib = 1024
    server = MetricsServer(registry_for(cache, make_config(tmp_path / "s.sock")))
    await server_start_any(server)
    try:
        head, body = await scrape(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith("HTTP/1.0 200 OK"), head
        assert "text/plain; version=0.0.4" in head
        got = samples(body)
        assert got["kata_vmcache_handoffs_total"] == 1
        assert got["kata_vmcache_target_vms"] == 2
        assert got["kata_vmcache_ready_vms"] == cache.ready_count
        assert got['kata_vmcache_boot_failures_total{reason="other"}'] == 1  # "guest exploded"
        assert got['kata_vmcache_boot_failures_total{reason="not_ready"}'] == 0
        assert got["kata_vmcache_handoff_duration_seconds_count"] == 1
        assert got['kata_vmcache_handoff_duration_seconds_bucket{le="+Inf"}'] == 1
        assert got["kata_vmcache_boot_duration_seconds_count"] == cache.stats.booted
        assert got['kata_vmcache_takebacks_total{outcome="returned"}'] == 0
        assert got["kata_vmcache_vm_memory_bytes"] == 256 * 2**20 * len(cache.owned())
        assert got["process_resident_memory_bytes"] > 0
        assert 'kata_vmcache_build_info{kata_version="3.x"' in body
        assert got["kata_vmcache_memory_budget_bytes"] == 1024 * 2**20

        head, _ = await scrape(server, b"GET / HTTP/1.0\r\n\r\n")
        assert head.startswith("HTTP/1.0 404")
        head, _ = await scrape(server, b"garbage")  # no end of headers: nothing, no crash
        assert head == ""
    finally:
        await server.stop()


async def server_start_any(server: MetricsServer) -> None:
    """Listen on a free loopback port (the address must name a port: ask the kernel for one
    by binding, then hand it over)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await server.start(f"127.0.0.1:{port}")


@pytest.mark.asyncio
async def test_autoscaling_is_in_the_metrics(pool: tuple[VMCache, FakeFactory],
                                             tmp_path: Path) -> None:
    cache, _ = pool
    await until(cache, lambda: cache.ready_count == 2)
    scaler = Autoscaler(cache, AutoscaleSettings(True, 1, 4, 60.0), fixed=2, parallelism=2)
    await hand_off(cache)
    decision = scaler.step()
    assert decision is not None
    assert decision.kind in REASON_KINDS
    server = MetricsServer(registry_for(cache, make_config(tmp_path / "s.sock"), scaler))
    await server_start_any(server)
    try:
        _, body = await scrape(server, b"GET /metrics HTTP/1.0\r\n\r\n")
        got = samples(body)
        assert got["kata_vmcache_autoscale_enabled"] == 1
        assert got[f'kata_vmcache_target_reason{{reason="{decision.kind}"}}'] == 1
        assert sum(v for k, v in got.items()
                   if k.startswith("kata_vmcache_target_reason{")) == 1
        assert got["kata_vmcache_target_vms"] == cache.target == decision.target
        assert got["kata_vmcache_waited_requests_total"] == cache.stats.waited
        assert got["kata_vmcache_target_changes_total"] == scaler.changes
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_an_address_in_use_is_a_one_line_error(
        pool: tuple[VMCache, FakeFactory], tmp_path: Path) -> None:
    cache, _ = pool
    first = MetricsServer(registry_for(cache, make_config(tmp_path / "s.sock")))
    await server_start_any(first)
    try:
        second = MetricsServer(registry_for(cache, make_config(tmp_path / "s.sock")))
        with pytest.raises(UsageError, match=r"^vmcache.metrics_address: cannot listen on "
                                             rf"127.0.0.1:{first.port} \(.+\)$"):
            await second.start(f"127.0.0.1:{first.port}")
    finally:
        await first.stop()


def test_failure_classes() -> None:
    assert failure_class("guest not ready after 60 s under TCG") == "not_ready"
    assert failure_class("QEMU exited before the guest was ready (exit code 1)") == "qemu_exited"
    assert failure_class("cannot run /usr/bin/qemu: No such file") == "launch"
    assert failure_class("cannot write the VM's files: No space left") == "host"
    assert failure_class("internal error: KeyError('x')") == "internal"
    assert failure_class("something new") == "other"
    assert {failure_class(r) for r in ("not ready after", "QEMU exited", "cannot run",
                                       "cannot write", "template", "internal error", "?")
            } == set(FAILURE_CLASSES)


def test_histogram_is_cumulative_in_exposition() -> None:
    h = Histogram()
    for seconds in (0.0005, 0.003, 0.003, 100.0):
        h.observe(seconds)
    assert sum(h.counts) == 4
    assert h.counts[0] == 1
    assert h.counts[-1] == 1
    assert h.sum == pytest.approx(100.0065)


# --- the Grafana dashboard -------------------------------------------------------------------

#: PromQL words that are not metric names.
PROMQL = frozenset("""
    sum rate irate increase avg max min count by without on ignoring group_left group_right
    histogram_quantile and or unless le reason outcome job instance time changes resets
    delta deriv clamp_min clamp_max abs label_replace vector scalar offset bool topk
    """.split())


def exported_names(cache: VMCache, tmp_path: Path) -> set[str]:
    registry = registry_for(cache, make_config(tmp_path / "s.sock"))
    return {name.split("{")[0] for name in samples(generate_latest(registry).decode())}


@pytest.mark.asyncio
async def test_dashboard_queries_name_only_exported_metrics(
        pool: tuple[VMCache, FakeFactory], tmp_path: Path) -> None:
    cache, factory = pool
    await until(cache, lambda: cache.ready_count == 2)
    factory.fail_next = 1  # so that the labelled families have a sample
    await hand_off(cache)  # (and a refill to fail)
    await until(cache, lambda: cache.stats.boot_failures == 1)
    cache.memory_budget_mib = 1024
    exported = exported_names(cache, tmp_path)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    named: set[str] = set()
    for expr in exprs:
        # Drop label matchers, strings and durations: what is left are functions and names.
        bare = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", expr)
        named |= {w for w in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if w not in PROMQL}
    assert named, exprs
    missing = named - exported
    assert not missing, f"dashboard queries name metrics the daemon does not export: {missing}"
    assert any(n.startswith("kata_vmcache_") for n in named)
