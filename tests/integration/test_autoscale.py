"""Autoscaling on the real daemon: a burst of GetBaseVM grows the pool at once, a reload
of max_ready applies live, and the surplus is stopped after `shrink_after` seconds idle.
Small numbers and a short idle period keep it to about half a minute on 2 cores."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from .harness import Daemon, wait_for

pytestmark = pytest.mark.qemu


def test_burst_grows_the_pool_and_idle_shrinks_it(
        make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(cache_number=1, autoscale=True, min_ready=1, max_ready=4,
                    shrink_after=8)
    d.wait_ready(1)
    snap = d.snapshot()
    assert snap["autoscale"] is True
    assert (snap["target"], snap["ready"]) == (1, 1)

    # A burst of three at once with one VM ready: two callers wait, and the pool grows
    # (at once: before they are served, however slow the boots on a loaded host).
    with ThreadPoolExecutor(3) as pool:
        for vm in pool.map(lambda _: d.get(), range(3)):
            assert vm["id"]
    snap = d.snapshot()
    assert 3 <= snap["target"] <= 4, snap  # max_ready = 4
    assert snap["target_reason"], snap
    assert "pool target 1 -> " in d.log()
    # The growth is booted, not only decided.
    wait_for(lambda: (s := d.snapshot())["ready"] + s["booting"] >= 3, 10, "the pool to grow")

    # Reload: max_ready lowered below the target applies at once (bounds win).
    d.config.write_text(d.config.read_text().replace("max_ready = 4", "max_ready = 2"))
    result = d.cli("reload")
    assert result.returncode == 0, result.stderr
    assert "vmcache.max_ready 4 -> 2" in result.stdout
    wait_for(lambda: d.snapshot()["target"] <= 2, 5, "the target to follow max_ready = 2")

    # No more requests: after shrink_after (8 s) without demand, down to min_ready, and
    # the surplus ready VMs are stopped.
    wait_for(lambda: (s := d.snapshot())["target"] == 1 and len(s["vms"]) == 1
             and len(d.records("ready")) == 1, 60, "the pool to shrink to min_ready")
    assert "min_ready" in d.snapshot()["target_reason"]
    assert " -> 1: " in d.log()
    assert "Traceback" not in d.log()
