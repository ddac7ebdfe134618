"""One derivation: over a matrix of files (tests/data/kata-matrix) and both Kata generations,
the `Config` reply is that generation's payload, and the VM the daemon would boot from the
same file (QEMU's binary, `-m`, `-smp`) is the VM the reply describes.

The VM is read from the QEMU command line `factory.direct.spec_from_config` builds, so a
difference between what we boot and what we tell Kata fails here. Host facts are pinned
so that the expected values are exact; Kata's own loader checks the same files' payloads
(scripts/kata-compare/run.py).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kata_vmcache import config as cfg
from kata_vmcache import kata
from kata_vmcache.errors import ConfigError
from kata_vmcache.factory.spec import spec_from_config
from kata_vmcache.kata import host
from kata_vmcache.service.server import config_reply
from kata_vmcache.vm.paths import VMPaths

MATRIX = sorted((Path(__file__).parent.parent / "data" / "kata-matrix").glob("*.toml"))
HOST_CPUS = 4
HOST_MEMORY_MIB = 8192


@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_go_num_cpu", lambda: HOST_CPUS)
    monkeypatch.setattr(host, "_host_cpus_3x", lambda: HOST_CPUS)
    monkeypatch.setattr(host, "_host_memory_mib", lambda: HOST_MEMORY_MIB)
    monkeypatch.setattr(host, "_host_supports_vsock", lambda: False)


@pytest.fixture
def assets(tmp_path: Path) -> dict[str, Path]:
    files = {"QEMU": tmp_path / "qemu", "KERNEL": tmp_path / "vmlinuz",
             "INITRD": tmp_path / "initrd.img", "IMAGE": tmp_path / "rootfs.img"}
    files["QEMU"].write_text("#!/bin/sh\n")
    files["QEMU"].chmod(0o755)
    for name in ("KERNEL", "INITRD", "IMAGE"):
        files[name].write_bytes(b"x" * 4096)
    return files


def generations(path: Path) -> tuple[kata.Generation, ...]:
    first = path.read_text().splitlines()[0]
    return ("3.x",) if first == "# only: 3.x" else kata.GENERATIONS


CASES = [(p, g) for p in MATRIX for g in generations(p)]


def materialise(src: Path, assets: dict[str, Path], generation: str, dest: Path, *,
                bootable: bool = False) -> str:
    """The matrix file with real assets. `bootable`: with shared_fs = "virtio-9p" where the
    file leaves it to 3.x's default, virtio-fs, which kata-vmcache refuses to boot (it
    runs no virtiofsd); sizes and binary, what the boot test compares, do not depend on it."""
    text = src.read_text()
    if bootable and "shared_fs" not in tomllib.loads(text)["hypervisor"]["qemu"]:
        text = text.replace("[hypervisor.qemu]\n", '[hypervisor.qemu]\nshared_fs = "virtio-9p"\n')
    for name, path in assets.items():
        text = text.replace(f"@{name}@", str(path))
    text += f'\n[vmcache]\nkata_version = "{generation}"\n'
    dest.write_text(text)
    return text


def booted(config: cfg.Config, tmp_path: Path) -> dict[str, Any]:
    """Binary, memory and vCPUs of the QEMU command line the daemon would run."""
    paths = VMPaths.for_vm("0123456789ab", vm_storage=tmp_path / "vm",
                           state_dir=tmp_path / "state")
    argv = spec_from_config(config, "tcg").argv("0123456789ab",
                                                 "00000000-0000-0000-0000-000000000000",
                                                 paths, cid=3)
    memory = argv[argv.index("-m") + 1]
    smp = argv[argv.index("-smp") + 1]
    max_cpus = re.search(r"maxcpus=(\d+)", smp)
    assert max_cpus is not None, smp
    mib = re.fullmatch(r"(\d+)M?(,.*)?", memory)
    assert mib is not None, memory
    return {"binary": argv[0], "memory": int(mib[1]),
            "vcpus": int(smp.split(",")[0]), "max_vcpus": int(max_cpus[1])}


@pytest.mark.parametrize(("src", "generation"), CASES,
                         ids=[f"{p.stem}-{g}" for p, g in CASES])
def test_the_vm_booted_is_the_vm_the_config_reply_describes(
        src: Path, generation: kata.Generation, assets: dict[str, Path],
        tmp_path: Path) -> None:
    path = tmp_path / src.name
    text = materialise(src, assets, generation, path, bootable=True)
    config, _ = cfg.load(path)
    assert config.daemon.kata_version == generation

    reply = config_reply(config)
    data = json.loads(reply.Data)
    doc = tomllib.loads(text)
    assert data == json.loads(json.dumps(kata.vm_config(doc, generation)))
    assert json.loads(reply.AgentConfig) == data["AgentConfig"]
    h = data["HypervisorConfig"]

    vm = booted(config, tmp_path)
    vcpus = h["NumVCPUs"] if generation == "1.x" else math.ceil(h["NumVCPUsF"])
    assert vm == {"binary": h["HypervisorPath"], "memory": h["MemorySize"], "vcpus": vcpus,
                  "max_vcpus": h["DefaultMaxVCPUs"]}
    assert (config.hypervisor.memory_slots, config.hypervisor.machine_type) == (
        h["MemSlots"], h["HypervisorMachineType"])
    assert str(config.hypervisor.kernel) == h["KernelPath"]


#: What the matrix files resolve to (host: HOST_CPUS CPUs), per generation where they differ.
EXPECTED = {
    # file: (vcpus, max_vcpus, memory, slots, machine type 1.x, 3.x)
    "defaults": (1, HOST_CPUS, 2048, 10, "pc", "q35"),
    "unset": (1, HOST_CPUS, 2048, 10, "pc", "q35"),
    "explicit": (2, 2, 1024, 8, "q35", "q35"),
    "small": (HOST_CPUS, HOST_CPUS, 2048, 2, "pc", "q35"),  # 128 MiB is under the floor
    "image": (1, HOST_CPUS, 512, 10, "microvm", "microvm"),
    "fractional": (2, 2, 2048, 10, "", "q35"),  # 1.5 vCPUs boot 2
    "virtio-fs": (1, HOST_CPUS, 2048, 10, "pc", "q35"),
}


@pytest.mark.parametrize(("src", "generation"), CASES,
                         ids=[f"{p.stem}-{g}" for p, g in CASES])
def test_matrix_values(src: Path, generation: kata.Generation, assets: dict[str, Path],
                       tmp_path: Path) -> None:
    path = tmp_path / src.name
    materialise(src, assets, generation, path)
    h = cfg.load(path)[0].hypervisor
    vcpus, max_vcpus, memory, slots, machine_1x, machine_3x = EXPECTED[src.stem]
    assert (h.vcpus, h.max_vcpus, h.memory_mib, h.memory_slots) == (
        vcpus, max_vcpus, memory, slots)
    assert h.machine_type == (machine_3x if generation == "3.x" else machine_1x)
    assert h.path == assets["QEMU"]


def test_the_matrix_covers_every_file() -> None:
    assert {p.stem for p in MATRIX} == set(EXPECTED)


def test_1x_refuses_a_fraction_of_a_vcpu(assets: dict[str, Path], tmp_path: Path) -> None:
    src = next(p for p in MATRIX if p.stem == "fractional")
    path = tmp_path / src.name
    materialise(src, assets, "1.x", path)
    with pytest.raises(ConfigError, match="default_vcpus: wrong type"):
        cfg.load(path)
