"""The suite's guard against leaked asyncio tasks (tests/conftest.py) fails a test that
leaves one pending, and passes one that ends what it starts: run on two tiny test files
with the suite's own conftest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

LEAKY = """
import asyncio
import pytest

@pytest.mark.asyncio
async def test_leaks() -> None:
    asyncio.get_running_loop().create_task(asyncio.Event().wait(), name="forgotten")

@pytest.mark.asyncio
async def test_tidy() -> None:
    task = asyncio.get_running_loop().create_task(asyncio.Event().wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

@pytest.mark.asyncio
async def test_finishes_soon() -> None:
    # Done within a few loop turns (a call_soon's worth of bookkeeping): not a leak.
    async def brief() -> None:
        await asyncio.sleep(0)
    asyncio.get_running_loop().create_task(brief())
"""


def test_a_pending_task_fails_the_test(pytester: pytest.Pytester) -> None:
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_leaky=LEAKY)
    # (textual's snapshot plugin cannot share a process with the suite's own run)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p",
                                          "no:textual-snapshot", "-o", "asyncio_mode=strict",
                                          "-o", "asyncio_default_fixture_loop_scope=function")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*test left asyncio tasks pending: ['forgotten (*"])
    errors = [line for line in result.outlines if line.startswith("ERROR")]
    error, = errors
    assert "test_leaks" in error
