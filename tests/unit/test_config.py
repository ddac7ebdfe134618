"""Configuration: the shipped file loads, Kata's defaults apply, every bad input is named.

Bad inputs live one per file in tests/data/config/bad/, each with its expected message on
the first line (`# expect: ...`); @QEMU@, @KERNEL@ and @INITRD@ are replaced with real files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kata_vmcache import config as cfg
from kata_vmcache import kata
from kata_vmcache.errors import ConfigError
from kata_vmcache.kata import host

DATA = Path(__file__).parent.parent / "data" / "config"
BAD = sorted((DATA / "bad").glob("*.toml"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def assets(tmp_path: Path) -> dict[str, Path]:
    qemu = tmp_path / "qemu"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd")
    return {"QEMU": qemu, "KERNEL": kernel, "INITRD": initrd}


def materialise(src: Path, dest_dir: Path, assets: dict[str, Path]) -> Path:
    text = src.read_text()
    for name, path in assets.items():
        text = text.replace(f"@{name}@", str(path))
    dest = dest_dir / src.name
    dest.write_text(text)
    return dest


def test_good_file_resolves_kata_defaults(tmp_path: Path, assets: dict[str, Path]) -> None:
    config, warnings = cfg.load(materialise(DATA / "good.toml", tmp_path, assets))
    h = config.hypervisor
    assert h.path == assets["QEMU"]
    assert h.initrd == assets["INITRD"]
    assert h.image is None
    assert h.machine_type == "q35"
    assert h.kernel_params == ("console=ttyS0", "quiet")
    assert (h.vcpus, h.memory_mib, h.memory_slots) == (1, 256, 4)
    assert h.max_vcpus == kata.resolve({}, "3.x").max_vcpus  # 0 means the host's CPUs
    assert config.daemon.kata_version == "3.x"  # no [proxy.*] or [shim.*] table
    assert config.factory.vm_cache_number == 2
    assert config.factory.vm_cache_endpoint == Path("/run/kata-test/cache.sock")
    assert config.factory.template_path == Path(cfg.KATA_DEFAULT_TEMPLATE_PATH)
    assert config.daemon.accelerator == "tcg"
    assert config.daemon.socket_mode == 0o600
    assert warnings == []  # Kata keys we ignore are not warned about


def test_kata_defaults_when_keys_are_absent(tmp_path: Path, assets: dict[str, Path]) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    config, _ = cfg.parse(text)
    assert config.hypervisor.machine_type == "q35"  # Kata 3.x's default
    assert config.hypervisor.memory_mib == 2048
    assert config.hypervisor.memory_slots == 10
    assert config.hypervisor.vcpus == 1
    assert config.factory.vm_cache_number == 0
    assert config.factory.vm_cache_endpoint == Path("/var/run/kata-containers/cache.sock")
    assert config.daemon == cfg.DaemonSettings(
        kata_version_origin="detected: no [proxy.*] or [shim.*] table")
    # A 1.x file (it has a [proxy.kata] table): 1.x's default machine type.
    config, _ = cfg.parse(text + '[proxy.kata]\npath = "/usr/libexec/kata-proxy"\n')
    assert config.hypervisor.machine_type == "pc"
    assert (config.daemon.kata_version, config.daemon.kata_version_origin) == (
        "1.x", "detected: [proxy.kata] present")


@pytest.mark.parametrize("version", kata.GENERATIONS)
def test_vcpus_clamped_like_kata(assets: dict[str, Path], version: kata.Generation,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # One CPU count for both fields and both the VM and the Config reply: the generation's.
    monkeypatch.setattr(host, "_go_num_cpu", lambda: 3)
    monkeypatch.setattr(host, "_host_cpus_3x", lambda: 3)
    base = (f'[vmcache]\nkata_version = "{version}"\n[hypervisor.qemu]\n'
            f'path = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    assert cfg.parse(base + "default_vcpus = -1\n")[0].hypervisor.vcpus == 3
    assert cfg.parse(base + "default_vcpus = 999\n")[0].hypervisor.vcpus == 3
    assert cfg.parse(base + "default_maxvcpus = 999\n")[0].hypervisor.max_vcpus == 3


def test_kata_version_set_detected_or_refused(assets: dict[str, Path]) -> None:
    base = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n[shim.kata]\n')
    daemon = cfg.parse(base)[0].daemon
    assert (daemon.kata_version, daemon.kata_version_origin) == (
        "1.x", "detected: [shim.kata] present")
    daemon = cfg.parse(base + '[vmcache]\nkata_version = "3.x"\n')[0].daemon
    assert (daemon.kata_version, daemon.kata_version_origin) == ("3.x", "set in [vmcache]")
    with pytest.raises(ConfigError, match=r'vmcache.kata_version: not a valid choice '
                                          r'\(got \'2.x\', expected "1.x" or "3.x"\)'):
        cfg.parse(base + '[vmcache]\nkata_version = "2.x"\n')


def test_unset_path_is_the_generations_default(assets: dict[str, Path],
                                               tmp_path: Path) -> None:
    base = (f'[hypervisor.qemu]\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    # 1.x's loader defaults to qemu-lite, which no current distribution ships: refused.
    with pytest.raises(ConfigError) as info:
        cfg.parse(base + '[vmcache]\nkata_version = "1.x"\n')
    assert str(info.value) == (
        "hypervisor.qemu.path: no such file (got '/usr/bin/qemu-lite-system-x86_64') "
        "(Kata 1.x's default, which its loader refuses when missing; set it)")
    # 3.x's default is the binary the daemon then runs, and the Config reply names.
    if not Path(kata.DEFAULT_HYPERVISOR_PATH_3X).exists():
        pytest.skip("no /usr/bin/qemu-system-x86_64 on this host")
    config = cfg.parse(base + '[vmcache]\nkata_version = "3.x"\n')[0]
    assert config.hypervisor.path == Path(kata.DEFAULT_HYPERVISOR_PATH_3X).resolve()
    assert config.kata_vm_config()["HypervisorConfig"]["HypervisorPath"] == str(
        config.hypervisor.path)


def test_memory_under_katas_floor_boots_katas_default(assets: dict[str, Path]) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\nshared_fs = "virtio-9p"\ndefault_memory = 128\n')
    config, warnings = cfg.parse(text)
    assert config.hypervisor.memory_mib == 2048
    assert config.kata_vm_config()["HypervisorConfig"]["MemorySize"] == 2048
    assert [str(w) for w in warnings] == [
        "hypervisor.qemu.default_memory: under Kata's minimum of 256 MiB (got 128): "
        "Kata 3.x, and so kata-vmcache, boots 2048 MiB"]


def test_what_3x_refuses_is_said(assets: dict[str, Path]) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    _, warnings = cfg.parse(text)
    assert [str(w) for w in warnings] == [
        "hypervisor.qemu.shared_fs: Kata 3.x's loader refuses this file: virtio-fs (its "
        "default) needs virtio_fs_daemon, which is not set; set shared_fs = \"virtio-9p\" or "
        "virtio_fs_daemon"]
    assert cfg.parse(text + '[proxy.kata]\n')[1] == []  # 1.x's default is virtio-9p


def test_symlinked_assets_resolve_to_real_paths(tmp_path: Path,
                                                assets: dict[str, Path]) -> None:
    link = tmp_path / "kernel-link"
    link.symlink_to(assets["KERNEL"])
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{link}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    assert cfg.parse(text)[0].hypervisor.kernel == assets["KERNEL"]


@pytest.mark.parametrize("src", BAD, ids=[p.stem for p in BAD])
def test_bad_input_is_named(src: Path, tmp_path: Path, assets: dict[str, Path]) -> None:
    if src.stem == "maxvcpus_below_vcpus" and kata.resolve({}, "3.x").max_vcpus < 2:
        pytest.skip("needs a host with 2 CPUs or more")
    expected = src.read_text().splitlines()[0].removeprefix("# expect: ")
    for name, path in assets.items():
        expected = expected.replace(f"@{name}@", str(path))
    path = materialise(src, tmp_path, assets)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    text = str(info.value)
    assert expected in text
    assert info.value.exit_code == 2
    # each problem names the file, and the line when the key is in it
    for problem in info.value.problems:
        assert problem.path == path


def test_problem_lines_point_at_the_key(tmp_path: Path, assets: dict[str, Path]) -> None:
    path = materialise(DATA / "bad" / "cache_number_negative.toml", tmp_path, assets)
    with pytest.raises(ConfigError) as info:
        cfg.load(path)
    (problem,) = info.value.problems
    line = path.read_text().splitlines()[problem.line - 1] if problem.line else ""
    assert line.startswith("vm_cache_number")
    assert str(problem).startswith(f"{path}:{problem.line}: factory.vm_cache_number:")


def test_all_problems_reported_at_once(tmp_path: Path, assets: dict[str, Path]) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "/nope"\n'
            f'initrd = "{assets["INITRD"]}"\ndefault_memory = -1\n'
            '[factory]\nvm_cache_number = -3\n[vmcache]\naccelerator = "xen"\n')
    with pytest.raises(ConfigError) as info:
        cfg.parse(text)
    keys = [p.key for p in info.value.problems]
    assert keys == ["hypervisor.qemu.kernel", "hypervisor.qemu.default_memory",
                    "factory.vm_cache_number", "vmcache.accelerator"]


def test_unknown_key_in_kata_table_warns(assets: dict[str, Path]) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\nshared_fs = "virtio-9p"\ndefault_memroy = 512\n')
    _, warnings = cfg.parse(text)
    assert [str(w) for w in warnings] == [
        "hypervisor.qemu.default_memroy: unknown key, ignored; did you mean 'default_memory'?"]
    assert warnings[0].line == 6


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path}/absent.toml: no such file"):
        cfg.load(tmp_path / "absent.toml")


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        cfg.load(tmp_path)


def test_shipped_configuration_is_valid(tmp_path: Path, assets: dict[str, Path]) -> None:
    """etc/configuration.toml documents every [vmcache] key and loads once its guest
    assets (which only a Kata host has) point at files that exist."""
    text = (ROOT / "etc" / "configuration.toml").read_text()
    text = text.replace("/usr/share/kata-containers/vmlinuz.container", str(assets["KERNEL"]))
    text = text.replace("/usr/share/kata-containers/kata-containers.img", str(assets["INITRD"]))
    if not Path("/usr/bin/qemu-system-x86_64").exists():
        text = text.replace("/usr/bin/qemu-system-x86_64", str(assets["QEMU"]))
    path = tmp_path / "configuration.toml"
    path.write_text(text)
    config, warnings = cfg.load(path)
    assert warnings == []
    assert config.factory.vm_cache_number == 2
    for key in cfg.OUR_KEYS:
        assert f"\n{key} = " in text, f"[vmcache] {key} is not documented in the shipped file"


def test_lookup_order_without_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first, second = tmp_path / "etc.toml", tmp_path / "share.toml"
    monkeypatch.setattr("kata_vmcache.config.loader.DEFAULT_CONFIG_PATHS", (first, second))
    with pytest.raises(ConfigError, match="no configuration file found"):
        cfg.find_config(None)
    second.write_text("")
    assert cfg.find_config(None) == second
    first.write_text("")
    assert cfg.find_config(None) == first


def test_unreadable_file(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = tmp_path / "c.toml"
    path.write_text("")
    path.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        cfg.load(path)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(("extra", "version", "origin"), [
    ("", "3.x", "detected: no [proxy.*] or [shim.*] table"),
    ("[proxy.kata]\npath = \"/usr/libexec/kata-containers/kata-proxy\"\n", "1.x",
     "detected: [proxy.kata] present"),
    ("[shim.kata]\n", "1.x", "detected: [shim.kata] present"),
    ("[proxy.kata]\n[vmcache]\nkata_version = \"3.x\"\n", "3.x", "set in [vmcache]"),
])
def test_the_kata_generation_is_detected_or_set(assets: dict[str, Path], extra: str,
                                                version: str, origin: str) -> None:
    text = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n{extra}')
    config, _ = cfg.parse(text)
    assert (config.daemon.kata_version, config.daemon.kata_version_origin) == (version, origin)


def test_the_probe_follows_the_guest_agent(assets: dict[str, Path]) -> None:
    base = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n[vmcache]\n')
    assert cfg.parse(base)[0].daemon.ready_probe == "kata-agent"
    config, _ = cfg.parse(base + 'guest_agent = "none"\n')
    assert (config.daemon.guest_agent, config.daemon.ready_probe) == ("none", "serial")


def test_kata_integers_fit_the_go_type_of_the_files_generation(
        assets: dict[str, Path]) -> None:
    base = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\n')
    kata_1x = "[proxy.kata]\n"  # a 1.x file (kata_version detected)
    # uint64 in Kata 3.x, uint32 in 1.x: a 3.x file may hold it, a 1.x one may not.
    cfg.parse(base + f"memory_offset = {2**33}\n")
    with pytest.raises(ConfigError, match=r"memory_offset: out of range for Kata's loader "
                                          r"\(got 8589934592, expected 0 to 4294967295: "
                                          r"uint32 in Kata 1.x\)"):
        cfg.parse(base + f"memory_offset = {2**33}\n" + kata_1x)
    # float32 in 3.x: any integer loads (and is clamped to the host's CPUs); int32 in 1.x.
    vcpus = cfg.parse(base + f"default_vcpus = {2**40}\n")[0].hypervisor.vcpus
    assert vcpus == host._host_cpus_3x()
    with pytest.raises(ConfigError, match=r"default_vcpus: out of range .*int32 in Kata 1.x"):
        cfg.parse(base + f"default_vcpus = {2**40}\n" + kata_1x)
    # A key Kata 1.x does not have is its loader's to ignore.
    cfg.parse(base + "default_maxmemory = -1\n" + kata_1x)
    cfg.parse(base + f"default_memory = {2**32 - 1}\n")  # the largest uint32
    with pytest.raises(ConfigError, match=r"default_memory: out of range for Kata's loader"):
        cfg.parse(base + f"default_memory = {2**32}\n")
    # A key with a check of its own gets one problem, not two.
    with pytest.raises(ConfigError) as info:
        cfg.parse(base + "default_memory = -5\n")
    assert [p.key for p in info.value.problems] == ["hypervisor.qemu.default_memory"]


def test_memory_budget(assets: dict[str, Path]) -> None:
    base = (f'[hypervisor.qemu]\npath = "{assets["QEMU"]}"\nkernel = "{assets["KERNEL"]}"\n'
            f'initrd = "{assets["INITRD"]}"\ndefault_memory = 256\n')
    # Default: half of the host's MemTotal.
    config = cfg.parse(base + "[factory]\nvm_cache_number = 2\n")[0]
    assert config.memory_budget_mib == cfg.host_memory_mib() // 2
    assert dict(cfg.describe(config))["vmcache.memory_budget_mib"] == (
        f"{cfg.host_memory_mib() // 2} (half of the host's MemTotal)")
    # vm_cache_number VMs that would not fit: fewer are kept, and the note says why.
    config = cfg.parse(base + "[factory]\nvm_cache_number = 5\n"
                              "[vmcache]\nmemory_budget_mib = 600\n")[0]
    assert config.cache_target == 2
    assert config.budget_note() == ("keeping 2 VMs ready, not vm_cache_number = 5: "
                                    "memory_budget_mib = 600 holds 2 of 256 MiB (5 would "
                                    "need 1280 MiB)")
    assert cfg.parse(base + "[factory]\nvm_cache_number = 2\n"
                            "[vmcache]\nmemory_budget_mib = 600\n")[0].budget_note() == ""
    # A budget smaller than one VM is an error, when there is a cache to fill.
    with pytest.raises(ConfigError) as info:
        cfg.parse(base + "[factory]\nvm_cache_number = 1\n[vmcache]\nmemory_budget_mib = 100\n")
    assert [str(p) for p in info.value.problems] == [
        "vmcache.memory_budget_mib: smaller than one VM (got 100 MiB; "
        "hypervisor.qemu.default_memory is 256 MiB)"]
    cfg.parse(base + "[vmcache]\nmemory_budget_mib = 100\n")  # no cache: nothing to hold
    with pytest.raises(ConfigError, match=r"memory_budget_mib: must be >= 0 MiB \(got -1\)"):
        cfg.parse(base + "[vmcache]\nmemory_budget_mib = -1\n")


def test_runtime_class_file_in_katas_lookup_order(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    etc.mkdir()
    usr.mkdir()
    monkeypatch.setattr("kata_vmcache.config.loader.DEFAULT_CONFIG_PATHS",
                        (etc / "configuration.toml", usr / "configuration.toml"))
    with pytest.raises(ConfigError, match="no configuration file for runtime class 'qemu'"):
        cfg.find_class_config("qemu")
    (usr / "configuration-qemu.toml").write_text("")
    assert cfg.find_class_config("qemu") == usr / "configuration-qemu.toml"
    (etc / "configuration-qemu.toml").write_text("")
    assert cfg.find_class_config("qemu") == etc / "configuration-qemu.toml"
    with pytest.raises(ConfigError, match="not a runtime class name"):
        cfg.find_class_config("../qemu")
