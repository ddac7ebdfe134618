"""The VM's record on disk around a hand-off: the rename that says handed_off, and the record
it replaces, which is held open until the reply is out (vm.py prepare_handed_off_record)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import pytest

from kata_vmcache.vm.owned import VM, VMState
from kata_vmcache.vm.spec import VMSpec

SPEC = VMSpec(qemu=Path("/bin/true"), kernel=Path("/k"), initrd=Path("/i"), image=None,
              machine_type="q35", kernel_params=(), vcpus=1, max_vcpus=2, memory_mib=256,
              memory_slots=4, max_memory_mib=1024, accelerator="tcg")


def ready_vm(tmp_path: Path) -> VM:
    vm = VM(SPEC, state_dir=tmp_path, vm_storage=tmp_path / "vm", log=logging.getLogger("t"))
    vm.claim()
    vm.prepare_handoff()
    vm.transition(VMState.READY)
    vm.prepare_handed_off_record()
    return vm


def state_on_disk(vm: VM) -> str:
    state: str = json.loads(vm.paths.record.read_bytes())["state"]
    return state


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_handoff_rename_replaces_a_held_record_and_frees_it_after(tmp_path: Path) -> None:
    vm = ready_vm(tmp_path)
    held = vm._held_record
    assert held is not None
    assert json.loads(os.pread(held, 4096, 0))["state"] == "ready"

    vm.transition(VMState.HANDED_OFF)

    assert state_on_disk(vm) == "handed_off"
    # Replaced, not freed: the rename only unlinked it.
    assert os.fstat(held).st_nlink == 0
    vm.close_replaced_record()  # no event loop here: closed at once
    assert vm._held_record is None
    assert not is_open(held)


@pytest.mark.asyncio
async def test_close_replaced_record_frees_it_in_a_worker_thread(tmp_path: Path) -> None:
    vm = ready_vm(tmp_path)
    held = vm._held_record
    assert held is not None
    vm.transition(VMState.HANDED_OFF)
    vm.close_replaced_record()
    assert vm._held_record is None
    # Shutting the default executor down waits for the jobs it was given.
    await asyncio.get_running_loop().shutdown_default_executor()
    assert not is_open(held)


@pytest.mark.parametrize("end", ["dies", "is removed"])
def test_a_vm_that_is_not_handed_off_lets_go_of_its_held_record(tmp_path: Path,
                                                                 end: str) -> None:
    vm = ready_vm(tmp_path)
    held = vm._held_record
    assert held is not None
    if end == "dies":
        vm.transition(VMState.DEAD, "QEMU exited")
        assert state_on_disk(vm) == "dead"
    else:
        vm.remove_dirs()
    assert vm._held_record is None
    assert not is_open(held)


def test_a_second_preparation_holds_the_newer_record_only(tmp_path: Path) -> None:
    vm = ready_vm(tmp_path)
    first = vm._held_record
    assert first is not None
    vm.prepare_handed_off_record()  # as a take-back does
    assert vm._held_record is not None
    assert vm._held_record != first
    assert not is_open(first)
    vm.remove_dirs()
