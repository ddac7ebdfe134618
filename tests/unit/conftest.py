"""Fixtures several unit modules share (the suite-wide guards are tests/conftest.py's).

- `short_tmp`: a directory short enough for Unix sockets (a socket's path holds 107 bytes,
  and pytest's tmp_path can be longer).
- `peer`: a fake QMP peer (qmp_peer.py) listening in it.
- `pool`: a running pool of `pool_size` fake VMs (fakes.py); a module that wants another
  size overrides `pool_size`, one that wants more of the pool overrides `pool` and asks
  for this one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from kata_vmcache.pool.cache import VMCache

from .fakes import FakeFactory, fake_pool
from .qmp_peer import FakeQMP


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def peer(short_tmp: Path) -> AsyncIterator[FakeQMP]:
    async with FakeQMP(short_tmp / "peer.sock") as fake:
        yield fake


@pytest.fixture
def pool_size() -> int:
    return 2


@pytest_asyncio.fixture
async def pool(tmp_path: Path, pool_size: int) -> AsyncIterator[tuple[VMCache, FakeFactory]]:
    async with fake_pool(tmp_path, pool_size) as pool:
        yield pool
