"""Pure logic of the client: does a request fit the cache (Kata's checkVMConfig), and what
does it come to (vCPUs, memory in whole blocks, within the VM's headroom)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import kata
from kata_vmcache.client.rpc import BaseVM, config_differences, describe_differences
from kata_vmcache.client.sizing import Sizing, base_vcpus, size_request
from kata_vmcache.config import parse
from kata_vmcache.errors import RequestError, UsageError

CONFIG = """
[hypervisor.qemu]
path = "/bin/true"
kernel = "{kernel}"
initrd = "/bin/sh"
default_vcpus = {vcpus}
default_memory = {memory}
[factory]
vm_cache_number = 1
"""


def vm_config(kernel: str = "/bin/true", vcpus: int = 1, memory: int = 256) -> dict[str, Any]:
    config, _ = parse(CONFIG.format(kernel=kernel, vcpus=vcpus, memory=memory))
    return kata.vm_config(config.document, "1.x")


def test_same_configuration_fits() -> None:
    assert config_differences(vm_config(), vm_config()) == []


def test_vcpus_and_memory_do_not_count() -> None:
    # Kata resets NumVCPUs and MemorySize before comparing: a bigger request still fits
    # (it is hot-plugged).
    assert config_differences(vm_config(vcpus=1, memory=256),
                              vm_config(vcpus=2, memory=512)) == []


def test_another_kernel_does_not_fit_and_is_named(tmp_path: Path) -> None:
    a, b = (str((tmp_path / name).resolve()) for name in ("vmlinuz-a", "vmlinuz-b"))
    for kernel in (a, b):
        Path(kernel).write_bytes(b"kernel")
    differences = config_differences(vm_config(kernel=a), vm_config(kernel=b))
    assert differences == [("HypervisorConfig.KernelPath", a, b)]
    said = describe_differences(differences)
    assert said == f'HypervisorConfig.KernelPath (cache "{a}", request "{b}")'


def test_missing_key_counts_as_its_zero_value_as_go_decodes_it() -> None:
    ours = {"HypervisorConfig": {"KernelPath": "/k", "Debug": False, "Extra": ""}}
    theirs = {"HypervisorConfig": {"KernelPath": "/k"}}
    assert config_differences(theirs, ours) == []
    ours["HypervisorConfig"]["Extra"] = "set"
    assert config_differences(theirs, ours) == [("HypervisorConfig.Extra", None, "set")]


def test_type_differences_count() -> None:
    assert config_differences({"A": {"B": 1}}, {"A": {"B": True}}) == [("A.B", 1, True)]


def test_many_differences_are_summarised_on_one_line() -> None:
    differences = [(f"K{i}", i, i + 1) for i in range(5)]
    said = describe_differences(differences)
    assert "\n" not in said
    assert said.endswith("and 2 more: K3, K4")
    long = describe_differences([("K", "a" * 100 + "/tail", "y")])
    assert len(long) < 130
    assert long.startswith('K (cache "aaa')
    assert long.endswith('a/tail", request "y")')
    assert "..." in long


def sized(cpus: int | None, memory: int | None, *, max_memory_mib: int | None = 2048,
          memory_slots: int = 4) -> Sizing:
    """A request against a 1-vCPU, 256 MiB base VM with up to 4 vCPUs."""
    return size_request(cpus, memory, base_cpus=1, base_memory_mib=256, max_cpus=4,
                        max_memory_mib=max_memory_mib, memory_slots=memory_slots)


@pytest.mark.parametrize(("cpus", "memory", "expected"), [
    (None, None, Sizing(1, 256)),
    (4, None, Sizing(4, 256)),
    (None, 512, Sizing(1, 512)),
    # Added memory is rounded up to whole 128 MiB blocks, what the guest can online.
    (2, 300, Sizing(2, 384)),
    (None, 257, Sizing(1, 384)),
    (None, 2048, Sizing(1, 2048)),
])
def test_sizing(cpus: int | None, memory: int | None, expected: Sizing) -> None:
    assert sized(cpus, memory) == expected


@pytest.mark.parametrize(("cpus", "memory", "says"), [
    (0, None, "cpus: must be 1 (the base VM's) to 4 (default_maxvcpus) (got 0)"),
    (5, None, "cpus: must be 1 (the base VM's) to 4 (default_maxvcpus) (got 5)"),
    (None, 128, "memory: must be at least the base VM's 256 MiB (got 128)"),
    (None, 4096, "memory: must be at most 1920 MiB (the VM's maxmem) (got 4096)"),
    # Within the maximum as asked, beyond it once rounded up to whole blocks.
    (None, 1930, "memory: must be at most 1920 MiB (the VM's maxmem) "
                 "(got 1930, 2048 in whole 128 MiB blocks)"),
])
def test_bad_requests_are_one_line(cpus: int | None, memory: int | None, says: str) -> None:
    with pytest.raises(RequestError) as raised:
        sized(cpus, memory, max_memory_mib=1920)
    assert str(raised.value) == says
    assert isinstance(raised.value, UsageError)  # exit code 2 from the CLI


def test_all_problems_at_once() -> None:
    with pytest.raises(RequestError, match=r"^cpus: .*; memory: "):
        sized(0, 1)


def test_no_slot_no_memory_hot_plug() -> None:
    with pytest.raises(RequestError, match="no memory slot"):
        sized(None, 512, memory_slots=0)
    assert sized(2, None, memory_slots=0) == Sizing(2, 256)


def test_unknown_maximum_is_not_checked_before_the_vm_is_taken() -> None:
    assert sized(None, 1 << 20, max_memory_mib=None) == Sizing(1, 1 << 20)


def test_handle_json_adds_what_the_vm_has_now() -> None:
    from kata_vmcache.client.handle import VMHandle

    base = BaseVM("abc", 1, 256, 0, {"ID": "abc", "QmpChannelpath": "/x/qmp.sock"})

    async def make() -> dict[str, Any]:
        handle = VMHandle(base, None, source="direct", reason="does not fit")
        handle.vcpus, handle.memory_mib = 2, 512
        return handle.as_json()

    out = asyncio.run(make())
    assert out == {"id": "abc", "cpu": 1, "memory": 256, "cpuDelta": 0,
                   "proxyPid": 0, "proxyURL": "",
                   "hypervisor": {"ID": "abc", "QmpChannelpath": "/x/qmp.sock"},
                   "vcpus": 2, "memoryMiB": 512, "source": "direct",
                   "reason": "does not fit"}
    assert Path(base.hypervisor["QmpChannelpath"]) == base.qmp_path


def test_base_vcpus_of_either_generations_payload() -> None:
    assert base_vcpus({"NumVCPUs": 3}) == 3  # 1.x
    assert base_vcpus({"NumVCPUsF": 1.5}) == 2  # 3.x: NumVCPUs() rounds up
    assert base_vcpus({"NumVCPUsF": 2.0}) == 2
    assert base_vcpus({}) == 1


def test_vm_shape_round_trips_and_refuses_what_a_server_would_not_send() -> None:
    from kata_vmcache.shape import KEY, VMShape

    shape = VMShape(cpus=1, max_cpus=2, memory_mib=256, max_memory_mib=1280, memory_slots=4)
    (key, text), = shape.metadata()
    assert key == KEY
    assert VMShape.parse(text) == shape
    for bad in (None, "", "[]", "{}", text.replace("256", '"256"'), text.replace("256", "-1"),
                text.replace("256", "true")):
        assert VMShape.parse(bad) is None, bad
