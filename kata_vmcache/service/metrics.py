"""Prometheus metrics: `/metrics` on `[vmcache] metrics_address`, read from the cache on scrape.

Every value is read when Prometheus asks, from what the pool already keeps for the Monitor
service (VMCache's counts, CacheStats, CacheActivity's cumulative histograms): a hand-off
does no work for metrics beyond the counter increments it already did. A custom collector
(`CacheCollector`) turns those into metric families, as prometheus_client's docs advise for
values owned by another object ("custom collectors").

The HTTP server runs on the daemon's event loop, not in prometheus_client's own thread:
a scrape then reads the pool between two callbacks, so it sees one consistent state (the
same reason monitor.py's snapshot is synchronous) and never races the loop over a deque
being changed; and the hand-off path is synchronous from reservation to reply, so a scrape
can never land in the middle of one. The cost is one `generate_latest()` on the loop per
scrape (about a millisecond), the same order as a Monitor snapshot.

Names follow Prometheus's conventions: one `kata_vmcache_` prefix, base units (bytes,
seconds), `_total` for counters. Process metrics (`process_*`) are prometheus_client's
standard ones for this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from .. import __version__
from ..config import Config, split_address
from ..errors import UsageError
from ..pool.activity import FAILURE_CLASSES, Histogram
from ..pool.autoscale import REASON_KINDS, Autoscaler
from ..pool.cache import VMCache

log = logging.getLogger(__name__)

PREFIX = "kata_vmcache"
MIB = 1024 * 1024
#: A request line and headers larger than this are not a scrape.
MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0


def memory_budget_bytes(config: Config, cache: VMCache) -> int | None:
    """The memory budget the pool is held to, in bytes ([vmcache] memory_budget_mib, or its
    default); None when the cache has none."""
    del config
    return None if cache.memory_budget_mib is None else cache.memory_budget_mib * MIB


def _histogram(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*h.BOUNDS, float("inf")), h.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


def _resident_bytes(pid: int) -> int:
    """A QEMU's resident memory from /proc/<pid>/statm (0 if it has just exited)."""
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CacheCollector(Collector):
    """The cache's metrics, built from its current state at each scrape."""

    def __init__(self, cache: VMCache, config: Config,
                 autoscaler: Autoscaler | None = None) -> None:
        self.cache = cache
        self.config = config
        self.autoscaler = autoscaler

    def collect(self) -> Iterator[Metric]:
        cache, stats, p = self.cache, self.cache.stats, PREFIX

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{p}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{p}_{name}", doc, value=value)

        yield InfoMetricFamily(f"{p}_build", "kata-vmcache's version and the Kata generation "
                               "its configuration is read as", value={
                                   "version": __version__,
                                   "kata_version": self.config.daemon.kata_version,
                                   "python_version": platform.python_version()})
        yield gauge("ready_vms", "VMs booted, paused and ready to hand out", cache.ready_count)
        yield gauge("booting_vms", "VMs booting for the pool", cache.booting_count)
        yield gauge("target_vms", "VMs the pool keeps ready (vm_cache_number, or fewer if "
                    "the memory budget holds fewer)", cache.target)
        yield gauge("waiting_clients", "Callers waiting for a VM", cache.waiting_clients)
        yield counter("waited_requests", "Callers that found no ready VM and waited for one "
                      "(the pool's misses)", stats.waited)
        scaler = self.autoscaler
        if scaler is not None:
            yield gauge("autoscale_enabled", "1 when the pool sizes itself ([vmcache] "
                        "autoscale), 0 when vm_cache_number is its fixed target",
                        int(scaler.enabled))
            rule = GaugeMetricFamily(f"{p}_target_reason", "Which rule set the target "
                                       "(1 for the current one; status --json says it in "
                                       "words)", labels=["reason"])
            for kind in REASON_KINDS:
                rule.add_metric([kind], int(kind == scaler.kind))
            yield rule
            yield counter("target_changes", "Changes of the target made by autoscaling",
                          scaler.changes)
        yield counter("handoffs", "VMs handed out to a caller", stats.handed_out)
        takebacks = CounterMetricFamily(f"{p}_takebacks", "Hand-offs whose reply was not "
                                        "written, undone: the VM back in the pool, or stopped "
                                        "when it could not be had back", labels=["outcome"])
        takebacks.add_metric(["returned"], stats.taken_back)
        takebacks.add_metric(["stopped"], stats.take_back_stopped)
        yield takebacks
        yield counter("boots", "VMs booted ready for the pool", stats.booted)
        failures = CounterMetricFamily(f"{p}_boot_failures", "VM boots that failed, by class "
                                       "of reason", labels=["reason"])
        for reason in FAILURE_CLASSES:
            failures.add_metric([reason], stats.failure_classes[reason])
        yield failures
        yield counter("vms_died_in_pool", "Ready VMs whose QEMU exited in the pool",
                      stats.died_in_pool)
        yield counter("vms_discarded", "Ready VMs killed for failing a health check",
                      stats.discarded)
        yield _histogram(f"{p}_handoff_duration_seconds", "From a VM request's arrival to "
                         "the VM released to the caller", cache.activity.handoff_histogram)
        yield _histogram(f"{p}_boot_duration_seconds", "From QEMU's start to a ready guest",
                         cache.activity.boot_histogram)
        owned = cache.owned()
        yield gauge("vm_memory_bytes", "Guest memory configured for the VMs the cache owns "
                    "(ready and booting)", sum(vm.spec.memory_mib for vm in owned) * MIB)
        yield gauge("vm_resident_memory_bytes", "Resident memory of the QEMU processes of the "
                    "VMs the cache owns", sum(_resident_bytes(vm.pid) for vm in owned
                                              if vm.pid is not None))
        yield gauge("template_bytes", "Size of the VM template's files (0 without templating)",
                    cache.factory.template_bytes())
        budget = memory_budget_bytes(self.config, cache)
        if budget is not None:
            yield gauge("memory_budget_bytes", "The most guest memory the pool commits",
                        budget)


def registry_for(cache: VMCache, config: Config,
                 autoscaler: Autoscaler | None = None) -> CollectorRegistry:
    """A registry of our own (not prometheus_client's global one): the cache's metrics and
    this process's."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(cache, config, autoscaler))
    ProcessCollector(registry=registry)
    return registry


class MetricsServer:
    """A minimal HTTP/1.0 server on the event loop: `GET /metrics` and nothing else."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, address: str) -> None:
        host, port = split_address(address)
        try:
            self._server = await asyncio.start_server(self._serve, host, port,
                                                      reuse_address=True)
        except OSError as exc:
            raise UsageError(f"vmcache.metrics_address: cannot listen on {address} "
                             f"({exc.strerror or exc})") from None
        log.info("serving Prometheus metrics on http://%s/metrics", address)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            if len(head) > MAX_REQUEST:
                raise ValueError("request too large")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("ascii").split()
            if method not in ("GET", "HEAD"):
                await _reply(writer, 405, b"only GET\n", "text/plain")
            elif path.split("?", 1)[0] != "/metrics":
                await _reply(writer, 404, b"see /metrics\n", "text/plain")
            else:
                # Text format 0.0.4: what every Prometheus 2.x reads (Debian's is 2.42).
                body = generate_latest(self.registry)
                await _reply(writer, 200, b"" if method == "HEAD" else body,
                             CONTENT_TYPE_PLAIN_0_0_4, length=len(body))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, UnicodeDecodeError, ConnectionError):
            pass  # not a scrape, or the scraper went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _reply(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
                 *, length: int | None = None) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n"
            "Connection: close\r\n\r\n")
    writer.write(head.encode("ascii") + body)
    await writer.drain()
