"""Memory admission on the real daemon: vm_cache_number VMs that would need more guest memory
than [vmcache] memory_budget_mib are not all booted; check-config, the start-up log and
`status --json` say how many are kept and why, and a reload moves the target both ways."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Daemon, run_cli, wait_for

pytestmark = pytest.mark.qemu

NOTE = ("keeping 2 VMs ready, not vm_cache_number = 3: memory_budget_mib = 600 holds 2 of "
        "256 MiB (3 would need 768 MiB)")


def test_vm_cache_number_is_held_to_what_the_budget_holds(
        make_config: Callable[..., Path], make_daemon: Callable[..., Daemon]) -> None:
    config = make_config(cache_number=3, memory_budget_mib=600)
    checked = run_cli(["--config", str(config), "check-config"])
    assert checked.returncode == 0, checked.stderr
    assert f"# {NOTE}\n" in checked.stdout
    assert "vmcache.memory_budget_mib" in checked.stdout

    d = make_daemon(cache_number=3, memory_budget_mib=600)
    d.wait_ready(2)
    assert NOTE in d.log()
    snap = d.snapshot()
    assert (snap["target"], snap["vm_cache_number"], snap["memory_budget_mib"]) == (2, 3, 600)
    wait_for(lambda: d.snapshot()["memory_committed_mib"] == 512, 10, "512 MiB committed")
    assert len(d.records()) == 2  # no third VM, not even booting
    assert d.snapshot()["booting"] == 0

    # Reload: a larger budget lets the third VM boot; a smaller one stops the surplus.
    d.config.write_text(d.config.read_text().replace("memory_budget_mib = 600",
                                                     "memory_budget_mib = 800"))
    result = d.cli("reload")
    assert (result.returncode, result.stdout) == (
        0, "reload applied: vmcache.memory_budget_mib 600 -> 800\n"), result.stderr
    d.wait_ready(3)
    assert d.snapshot()["target"] == 3
    d.config.write_text(d.config.read_text().replace("memory_budget_mib = 800",
                                                     "memory_budget_mib = 300"))
    assert d.cli("reload").returncode == 0
    wait_for(lambda: len(d.records()) == 1 and d.snapshot()["memory_committed_mib"] == 256,
             30, "the pool to shrink to one VM")
    assert d.snapshot()["target"] == 1
    assert ("keeping 1 VM ready, not vm_cache_number = 3: memory_budget_mib = 300 holds 1 of "
            "256 MiB (3 would need 768 MiB)") in d.log()

    # A budget smaller than one VM is refused, by a reload as at start.
    d.config.write_text(d.config.read_text().replace("memory_budget_mib = 300",
                                                     "memory_budget_mib = 100"))
    result = d.cli("reload")
    assert result.returncode == 2, result
    assert "vmcache.memory_budget_mib: smaller than one VM (got 100 MiB" in result.stderr
    assert "Traceback" not in d.log()
