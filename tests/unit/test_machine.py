"""Kata's QEMU command line for a factory VM (machine.VMSpec).

Kata 1.x's line is pinned by a golden file written from the first cut of issue 12 (commit
5837bd6, before the 3.x model existed): the 3.x work must leave it byte for byte as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from machine_cases import CASES_1X, build, masked

GOLDEN_1X = Path(__file__).parent.parent / "data" / "machine" / "argv-1x.json"


@pytest.mark.parametrize("name", sorted(CASES_1X))
def test_1x_argv_is_unchanged(name: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN_1X.read_text())
    changes, kwargs = CASES_1X[name]
    assert masked(build(changes, kwargs, tmp_path), tmp_path) == golden[name]


def test_golden_file_covers_every_1x_case() -> None:
    assert set(json.loads(GOLDEN_1X.read_text())) == set(CASES_1X)
