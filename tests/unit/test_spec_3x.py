"""A Kata 3.x file becomes a 3.x VMSpec (factory/direct.py spec_from_config), and what
Kata 3.30.0 would refuse, or what we cannot build like it, is a one-line config problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_vmcache import config as cfg
from kata_vmcache.errors import ConfigError
from kata_vmcache.factory.spec import check_kata3, spec_from_config
from kata_vmcache.kata import host

HOST_MEMORY_MIB = 16384


@pytest.fixture(autouse=True)
def pinned_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "_host_memory_mib", lambda: HOST_MEMORY_MIB)


def write(tmp: Path, qemu: str = "", *, vmcache: str = "", factory: str = "",
          tables: str = "") -> cfg.Config:
    for name in ("qemu", "vmlinuz", "initrd.img"):
        (tmp / name).write_bytes(b"x")
    (tmp / "qemu").chmod(0o755)
    path = tmp / "configuration.toml"
    machine = "" if "machine_type" in qemu else 'machine_type = "q35"'
    if "shared_fs" not in qemu:  # 3.x's default, virtio-fs, is refused
        machine += '\nshared_fs = "virtio-9p"'
    agent = "" if "guest_agent" in vmcache else 'guest_agent = "none"\nready_probe = "serial"'
    path.write_text(f"""
[hypervisor.qemu]
path = "{tmp}/qemu"
kernel = "{tmp}/vmlinuz"
initrd = "{tmp}/initrd.img"
{machine}
kernel_params = "console=ttyS0"
default_memory = 256
{qemu}

[factory]
vm_cache_number = 1
vm_cache_endpoint = "{tmp}/cache.sock"
{factory}

[vmcache]
accelerator = "tcg"
state_dir = "{tmp}/state"
vm_storage_path = "{tmp}/vm"
{agent}
{vmcache}
{tables}
""")
    return cfg.load(path)[0]


def test_a_3x_file_fills_the_3x_fields(tmp_path: Path) -> None:
    config = write(tmp_path, """
disable_guest_selinux = true
enable_iommu = true
use_legacy_serial = true
hot_plug_vfio = "root-port"
pcie_root_port = 40
pcie_switch_port = 2
default_maxmemory = 4096
memory_offset = 64
rootfs_type = "xfs"
enable_mem_prealloc = true
file_mem_backend = "/nonexistent/dir"
guest_memory_dump_path = "/var/crash"
reclaim_guest_freed_memory = true
enable_iothreads = true
indep_iothreads = 2
seccompsandbox = "on,obsolete=deny"
extra_monitor_socket = "qmp"
pflashes = ["/fw/a.fd"]
""")
    assert config.daemon.kata_version == "3.x"
    spec = spec_from_config(config, "tcg")
    assert spec.generation == "3.x"
    got = {key: getattr(spec, key) for key in (
        "disable_guest_selinux", "iommu", "legacy_serial", "hot_plug_vfio", "cold_plug_vfio",
        "pcie_root_port", "pcie_switch_port", "max_memory_mib", "memory_offset_mib",
        "rootfs_type", "mem_prealloc", "file_mem_backend", "pvpanic", "balloon", "iothreads",
        "indep_iothreads", "seccomp_sandbox", "extra_monitor", "pflash", "shared_fs")}
    assert got == {
        "disable_guest_selinux": True, "iommu": True, "legacy_serial": True,
        "hot_plug_vfio": "root-port", "cold_plug_vfio": "no-port",
        "pcie_root_port": 16,  # config.go pcieRootPort(): capped at 16
        "pcie_switch_port": 2,
        "max_memory_mib": 4096, "memory_offset_mib": 64, "rootfs_type": "xfs",
        "mem_prealloc": True,
        "file_mem_backend": None,  # a missing directory: Kata logs it and uses RAM
        "pvpanic": True, "balloon": True, "iothreads": True, "indep_iothreads": 2,
        "seccomp_sandbox": "on,obsolete=deny", "extra_monitor": "qmp",
        "pflash": ("/fw/a.fd",), "shared_fs": "virtio-9p",
    }


def test_3x_defaults(tmp_path: Path) -> None:
    spec = spec_from_config(write(tmp_path), "tcg")
    assert spec.disable_guest_selinux is False  # the loader reads the key as written
    assert spec.max_memory_mib == HOST_MEMORY_MIB  # default_maxmemory: the host's memory
    assert (spec.balloon, spec.pvpanic, spec.indep_iothreads, spec.file_mem_backend) == (
        False, False, 0, None)
    assert "selinux=1" in spec.kernel_command_line().split()


def test_vmcache_max_memory_wins_over_default_maxmemory(tmp_path: Path) -> None:
    spec = spec_from_config(write(tmp_path, "default_maxmemory = 4096",
                                  vmcache="max_memory = 2048"), "tcg")
    assert spec.max_memory_mib == 2048


def test_existing_file_mem_backend_is_used(tmp_path: Path) -> None:
    spec = spec_from_config(write(tmp_path, f'file_mem_backend = "{tmp_path}"'), "tcg")
    assert spec.file_mem_backend == tmp_path


def test_a_1x_file_keeps_the_1x_spec(tmp_path: Path) -> None:
    """The 3.x-only keys change nothing in a 1.x VM (the 1.x line is pinned elsewhere)."""
    keys = 'disable_guest_selinux = true\nreclaim_guest_freed_memory = true\n' \
           'hot_plug_vfio = "root-port"\npcie_root_port = 2'
    with_keys = spec_from_config(write(tmp_path, keys, vmcache='kata_version = "1.x"'),
                                 "tcg")
    without = spec_from_config(write(tmp_path, "pcie_root_port = 2",
                                     vmcache='kata_version = "1.x"'), "tcg")
    assert with_keys.generation == "1.x"
    assert with_keys == without


@pytest.mark.parametrize(("qemu", "factory", "key", "message"), [
    ('machine_type = "pc"', "", "hypervisor.qemu.machine_type",
     "Kata 3.x builds only q35 and microvm VMs on amd64 (got 'pc'"),
    ("confidential_guest = true", "", "hypervisor.qemu.confidential_guest",
     "not supported by kata-vmcache"),
    ('machine_type = "microvm"\nenable_iommu = true', "", "hypervisor.qemu.enable_iommu",
     "machine type 'microvm' has no vIOMMU"),
    ("enable_hugepages = true", "enable_template = true", "hypervisor.qemu.enable_hugepages",
     "VM templating does not work with hugepages"),
    ("enable_vhost_user_store = true", "", "hypervisor.qemu.enable_vhost_user_store",
     "needs enable_hugepages = true"),
    ('extra_monitor_socket = "telnet"', "", "hypervisor.qemu.extra_monitor_socket",
     "got 'telnet'; expected one of hmp, qmp, qmp-pretty"),
    ('shared_fs = "virtio-fs-nydus"\nvirtio_fs_daemon = "/usr/libexec/virtiofsd"', "",
     "hypervisor.qemu.shared_fs", "virtio-fs-nydus needs a nydusd per VM"),
])
def test_what_3x_refuses_is_a_config_problem(tmp_path: Path, qemu: str, factory: str,
                                             key: str, message: str) -> None:
    config = write(tmp_path, qemu, factory=factory)
    problems = check_kata3(config)
    assert [(p.key, message in p.message) for p in problems] == [(key, True)]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        spec_from_config(config, "tcg")


@pytest.mark.parametrize(("qemu", "key"), [
    ('rootfs_type = "btrfs"', "hypervisor.qemu.rootfs_type"),
    ('kernel_verity_params = "root_hash=a"', "hypervisor.qemu.kernel_verity_params"),
])
def test_image_root_problems(tmp_path: Path, qemu: str, key: str) -> None:
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * 4096)
    path = write(tmp_path, qemu).source
    assert path is not None
    path.write_text(path.read_text().replace(f'initrd = "{tmp_path}/initrd.img"',
                                             f'image = "{image}"'))
    config = cfg.load(path)[0]
    assert [p.key for p in check_kata3(config)] == [key]


def test_a_good_3x_file_has_no_problem(tmp_path: Path) -> None:
    assert check_kata3(write(tmp_path, 'machine_type = "microvm"')) == []


def test_3x_agent_readiness_is_a_ttrpc_check_on_vsock(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3.x guest with Kata's agent is asked over ttrpc on its vsock port 1024; a 1.x
    guest on vsock keeps the gRPC check."""
    from kata_vmcache.factory import direct, spec
    from kata_vmcache.vm.probe import KataAgentProbe, KataTtrpcProbe
    from kata_vmcache.vm.ttrpc import VsockAddress

    monkeypatch.setattr(spec, "host_has_vsock", lambda: True)
    monkeypatch.setattr(host, "_host_supports_vsock", lambda: True)
    factory = direct.DirectFactory(write(tmp_path, vmcache='guest_agent = "kata"\n'
                                                          'ready_probe = "kata-agent"'))
    assert factory.spec.agent_channel == "vsock"
    vm = factory.create()
    probe = factory.probe_for(vm)
    assert isinstance(probe, KataTtrpcProbe)
    assert vm.cid is not None
    assert probe.address == VsockAddress(vm.cid, 1024)
    assert f"guest-cid={vm.cid}" in " ".join(vm.process.argv)

    one = direct.DirectFactory(write(tmp_path, "use_vsock = true",
                                     vmcache='kata_version = "1.x"\nguest_agent = "kata"\n'
                                             'ready_probe = "kata-agent"',
                                     tables="[agent.kata]"))
    vm1 = one.create()
    probe1 = one.probe_for(vm1)
    assert isinstance(probe1, KataAgentProbe)
    assert probe1.url == f"vsock:{vm1.cid}:1024"
