"""Fixtures for tests on real QEMU with the bundled demo guest.

Directories are short (`/tmp/kvc-XXXX`): QEMU's sockets live in them and a Unix socket
path holds at most 107 bytes. Each test gets its own endpoint and state directory.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_vmcache.demo.guest import DemoGuest

from .harness import Daemon


@pytest.fixture(scope="session")
def demo_guest() -> Iterator[DemoGuest]:
    from kata_vmcache.demo.guest import build_demo_guest

    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed (run `make setup`)")
    root = Path(tempfile.mkdtemp(prefix="kvc-guest-"))
    try:
        yield build_demo_guest(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


ConfigFactory = Callable[..., Path]


@pytest.fixture
def make_config(demo_guest: DemoGuest, workdir: Path) -> ConfigFactory:
    from kata_vmcache.demo.config import render_config

    def make(cache_number: int = 2, name: str = "configuration.toml", **ours: object) -> Path:
        path = workdir / name
        path.write_text(render_config(demo_guest, endpoint=workdir / "cache.sock",
                                      state_dir=workdir / "state", cache_number=cache_number,
                                      accelerator="tcg", **ours))
        return path
    return make


@pytest.fixture
def make_daemon(make_config: ConfigFactory, workdir: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def make(cache_number: int = 2, *, debug: bool = False,
             nofile: tuple[int, int] | None = None, **ours: object) -> Daemon:
        d = Daemon(make_config(cache_number, **ours), workdir / "cache.sock", workdir / "state",
                   debug=debug, nofile=nofile)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()
