"""Refused before anything boots, in one line naming the key: what the file alone cannot tell
(a machine type the configured QEMU does not know, a state_dir that cannot be ours) and an
endpoint that cannot be listened on. And what is not ours is never changed: an existing
state_dir keeps its mode, shared or not."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Daemon, run_cli

ConfigFactory = Callable[..., Path]

NOBODY = 65534


def edited(config: Path, old: str, new: str) -> Path:
    text = config.read_text()
    assert old in text, old
    config.write_text(text.replace(old, new))
    return config


def with_state_dir(config: Path, state_dir: Path) -> Path:
    return edited(config, f'state_dir = "{config.parent / "state"}"',
                  f'state_dir = "{state_dir}"')


def refused(config: Path, command: str) -> str:
    """Run `command` on `config`; it must fail with one line (exit 2). Returns the line."""
    result = run_cli(["--config", str(config), command], timeout=60)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    # Warnings about the host (the demo file's "no /dev/vhost-vsock") may come first.
    errors = [line for line in result.stderr.splitlines(keepends=True)
              if " WARNING " not in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_machine_type_qemu_does_not_know_is_refused(make_config: ConfigFactory,
                                                      workdir: Path) -> None:
    config = edited(make_config(cache_number=1), 'machine_type = "q35"',
                    'machine_type = "q53"')
    for command in ("check-config", "init"):
        line = refused(config, command)
        assert "hypervisor.qemu.machine_type: not a machine type " in line, line
        assert "(got 'q53'; see `" in line, line
        assert line.endswith("did you mean 'q35'?\n"), line
    # Refused before anything was touched: no socket, no state, no QEMU (the suite's
    # guard would see one).
    assert not (workdir / "cache.sock").exists()
    assert not (workdir / "state").exists()


@pytest.fixture
def shared_dir(workdir: Path, request: pytest.FixtureRequest) -> Path:
    path = workdir / "shared"
    path.mkdir()
    kind = request.param
    if kind == "sticky":
        os.chmod(path, 0o1777)  # like /tmp
    elif kind == "world-writable":
        os.chmod(path, 0o777)
    else:
        os.chown(path, NOBODY, NOBODY)
        os.chmod(path, 0o755)
    return path


@pytest.mark.parametrize("shared_dir", ["sticky", "world-writable", "another user's"],
                         indirect=True)
def test_a_shared_state_dir_is_refused_and_left_as_it_was(
        make_config: ConfigFactory, shared_dir: Path) -> None:
    before = shared_dir.stat()
    config = with_state_dir(make_config(cache_number=1), shared_dir)
    for command in ("check-config", "init"):
        line = refused(config, command)
        assert f"vmcache.state_dir: {shared_dir} " in line, line
        assert "kata-vmcache will not use it or change its mode" in line, line
    after = shared_dir.stat()
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid,
                                                            before.st_gid)
    assert list(shared_dir.iterdir()) == []


def test_a_state_dir_that_is_a_file_is_refused(make_config: ConfigFactory,
                                               workdir: Path) -> None:
    state = workdir / "state-file"
    state.write_text("not a directory")
    line = refused(with_state_dir(make_config(cache_number=1), state), "check-config")
    assert f"vmcache.state_dir: {state} exists and is not a directory" in line, line
    line = refused(with_state_dir(make_config(cache_number=1), state / "below"), "init")
    assert f"vmcache.state_dir: cannot create {state / 'below'}: {state} is not a directory" \
        in line, line


def test_an_existing_state_dir_of_ours_keeps_its_mode(make_config: ConfigFactory,
                                                      workdir: Path) -> None:
    state = workdir / "state"
    state.mkdir(mode=0o750)
    os.chmod(state, 0o750)
    d = Daemon(make_config(cache_number=1), workdir / "cache.sock", state)
    try:
        d.start()
        d.wait_ready(1)
        assert stat.S_IMODE(state.stat().st_mode) == 0o750  # used, never re-moded
    finally:
        d.stop()
    created = workdir / "new" / "state"
    d = Daemon(with_state_dir(make_config(cache_number=1), created),
               workdir / "cache.sock", created)
    try:
        d.start()
        assert stat.S_IMODE(created.stat().st_mode) == 0o700  # made by us: 0700
    finally:
        d.stop()


@contextlib.contextmanager
def read_only_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "kvc-test-ro", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_an_endpoint_that_cannot_be_bound_is_one_line(make_config: ConfigFactory,
                                                      workdir: Path) -> None:
    config = make_config(cache_number=1)
    text = config.read_text()
    in_file = workdir / "a-file" / "cache.sock"
    (workdir / "a-file").write_text("")
    edited(config, str(workdir / "cache.sock"), str(in_file))
    line = refused(config, "init")
    assert line == (f"kata-vmcache: factory.vm_cache_endpoint: cannot listen on {in_file}: "
                    f"{workdir / 'a-file'} is not a directory\n")

    if os.geteuid() != 0:
        pytest.fail("mounting a read-only tmpfs for this test needs root")
    with read_only_tmpfs(workdir / "ro") as ro:
        config.write_text(text.replace(str(workdir / "cache.sock"), str(ro / "cache.sock")))
        line = refused(config, "init")
        assert line == (f"kata-vmcache: factory.vm_cache_endpoint: cannot listen on "
                        f"{ro / 'cache.sock'}: Read-only file system\n")
