"""The hand-off record (handoff.py): one record per VM, made when it becomes ready, whose
message is Kata's GrpcVM byte for byte, and which the client decodes back to itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kata_vmcache.client.rpc import BaseVM
from kata_vmcache.errors import VMStateError
from kata_vmcache.proto import cache_pb2
from kata_vmcache.vm.handoff import HandOff
from kata_vmcache.vm.owned import VM, VMState

from .fakes import SPEC


class Proxy:
    pid = 4242
    url = "unix:///run/vc/sbs/x/proxy.sock"


def make_vm(tmp_path: Path) -> VM:
    return VM(SPEC, state_dir=tmp_path, vm_storage=tmp_path / "vm",
              log=logging.getLogger("test_handoff"))


def test_the_message_is_kata_grpcvm_with_compact_json(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    vm.proxy = Proxy()
    vm.prepare_handoff()
    # What the servicer sent before there was one record type: GrpcVM built field by
    # field from the VM, its JSON compact.
    expected = cache_pb2.GrpcVM(
        id=vm.id, cpu=SPEC.vcpus, memory=SPEC.memory_mib, cpuDelta=0,
        hypervisor=json.dumps(vm.hypervisor_record(), separators=(",", ":")).encode(),
        proxyPid=4242, proxyURL=Proxy.url)
    wire = vm.handoff.message.SerializeToString()
    assert wire == expected.SerializeToString()
    assert vm.handoff.message is vm.handoff.message  # made once


def test_the_client_decodes_the_same_record(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    vm.prepare_handoff()
    wire = vm.handoff.message.SerializeToString()
    decoded = HandOff.from_message(cache_pb2.GrpcVM.FromString(wire))
    assert decoded == vm.handoff
    assert BaseVM is HandOff
    assert decoded.qmp_path == vm.paths.qmp
    assert (decoded.proxy_pid, decoded.proxy_url) == (0, "")
    assert decoded.as_json()["hypervisor"]["QmpChannelpath"] == str(vm.paths.qmp)


def test_no_vm_is_ready_without_its_record(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    vm.claim()
    with pytest.raises(VMStateError, match="hand-off record"):
        vm.transition(VMState.READY)
    with pytest.raises(VMStateError, match="no hand-off record"):
        _ = vm.handoff
    assert vm.state is VMState.BOOTING
