"""Undoing a hand-off whose reply was not written (the caller cancelled, its client went
away, or it stopped reading): the VM comes back to the pool, or is stopped.

Owns: `take_back()`, run in the background (`VMCache.take_back_later()`), and
`TAKE_BACK_CHECK_TIMEOUT`.

Invariants:
- only a VM whose reply provably never reached its client comes back (server.py decides:
  no OK status was sent); its state goes handed_off -> ready (`VM.take_back`), the one way
  back the state machine has;
- a VM that comes back holds no QMP session (like every pooled VM) and has its handed-off
  record written ahead again;
- a VM that cannot be had back (it does not answer, or is not paused) is stopped: nobody
  received it, so nobody else may have it, and stopping is the only way not to leak it.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import VmcacheError, VMDead
from ..vm.owned import VM, VMState
from .handout import HandOut
from .state import Pool

log = logging.getLogger(__name__)

#: Taking back a VM whose hand-off reply was not written: it must answer QMP, paused.
TAKE_BACK_CHECK_TIMEOUT = 1.0


async def take_back(pool: Pool, handout: HandOut, vm: VM, why: str) -> None:
    if vm.state is VMState.READY and not vm.process.released:
        # Reserved, never given: still ours in every way.
        log.warning("VM %s back in the pool: %s", vm.id, why)
        pool.stats.taken_back += 1
        handout.put_back(vm)
        return
    try:
        vm.require(VMState.HANDED_OFF)
        status = await vm.reclaim(TAKE_BACK_CHECK_TIMEOUT)  # idle again, if it answers
        if status != "paused":
            raise VMDead(f"it is not paused any more (status {status})")
    except VmcacheError as exc:
        # Nobody received it, so nobody else may have it: stopping is the only way not
        # to leak it.
        log.warning("VM %s: %s; it cannot be taken back (%s), stopping it", vm.id, why, exc)
        pool.stats.take_back_stopped += 1
        await pool.kill(vm)
        return
    vm.take_back(why)
    await asyncio.to_thread(vm.prepare_handed_off_record)
    log.warning("VM %s back in the pool: %s", vm.id, why)
    pool.stats.taken_back += 1
    handout.put_back(vm)
