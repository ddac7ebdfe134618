"""Kata's QEMU command line for a factory VM (vm/spec.py VMSpec, vm/line1.py, vm/line3.py).

Kata 1.x's line is pinned by a golden file written from the first cut of issue 12 (commit
5837bd6, before the 3.x model existed): the 3.x work must leave it byte for byte as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .machine_cases import CASES_1X, IMAGE_BYTES, build, masked

GOLDEN_1X = Path(__file__).parent.parent / "data" / "machine" / "argv-1x.json"


@pytest.mark.parametrize("name", sorted(CASES_1X))
def test_1x_argv_is_unchanged(name: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN_1X.read_text())
    changes, kwargs = CASES_1X[name]
    assert masked(build(changes, kwargs, tmp_path), tmp_path) == golden[name]


def test_golden_file_covers_every_1x_case() -> None:
    assert set(json.loads(GOLDEN_1X.read_text())) == set(CASES_1X)


# --- Kata 3.x (kata-containers 3.30.0) -------------------------------------------------

def line3(tmp: Path, cid: int | None = 7, **changes: Any) -> list[str]:
    """The 3.x line of the reference spec (vsock agent channel) with `changes`."""
    kwargs: dict[str, Any] = {}
    for key in ("memory", "memory_path", "incoming"):
        if key in changes:
            kwargs[key] = changes.pop(key)
    changes.setdefault("agent_channel", "vsock")
    if changes["agent_channel"] == "vsock":
        kwargs["cid"] = cid
    return masked(build(changes, kwargs, tmp, generation="3.x"), tmp)


def options(argv: list[str], flag: str) -> list[str]:
    """The values of every `flag` on the line, in order."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def append(argv: list[str]) -> list[str]:
    (value,) = options(argv, "-append")
    return value.split()


#: The reference spec's 3.x line, written out by hand from govmm's QemuParams (3.30.0
#: src/runtime/pkg/govmm/qemu/qemu.go) in LaunchQemu's order.
REFERENCE_3X = [
    "/usr/bin/qemu-system-x86_64",
    "-name", "sandbox-0123456789ab",
    "-uuid", "4d0f6a3e-8f5b-4c1e-9d1a-2b3c4d5e6f70",
    "-machine", "q35,accel=kvm",
    "-cpu", "host,",
    "-qmp", "unix:path=/run/vc/vm/0123456789ab/qmp.sock,server=on,wait=off",
    "-m", "256M,slots=4,maxmem=26153M",
    "-device", "pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,addr=2,"
               "io-reserve=4k,mem-reserve=1m,pref64-reserve=1m",
    "-device", "virtio-serial-pci,disable-modern=false,id=serial0",
    "-device", "virtconsole,chardev=charconsole0,id=console0",
    "-chardev", "socket,id=charconsole0,path=/run/vc/vm/0123456789ab/console.sock,"
                "server=on,wait=off",
    "-device", "virtio-scsi-pci,id=scsi0,disable-modern=false",
    "-object", "rng-random,id=rng0,filename=/dev/urandom",
    "-device", "virtio-rng-pci,rng=rng0",
    "-device", "vhost-vsock-pci,disable-modern=false,id=vsock-7,guest-cid=7",
    "-device", "virtio-9p-pci,disable-modern=false,fsdev=extra-9p-kataShared,"
               "mount_tag=kataShared",
    "-fsdev", "local,id=extra-9p-kataShared,path=/run/vc/vm/0123456789ab/shared,"
              "security_model=none,multidevs=remap",
    "-rtc", "base=utc,driftfix=slew,clock=host",
    "-global", "kvm-pit.lost_tick_policy=discard",
    "-vga", "none", "-no-user-config", "-nodefaults", "-nographic", "--no-reboot",
    "-object", "memory-backend-ram,id=dimm1,size=256M",
    "-numa", "node,memdev=dimm1",
    "-kernel", "/srv/kata/vmlinuz",
    "-initrd", "/srv/kata/initrd.img",
    "-append", "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 i8042.direct=1 "
               "i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 noreplace-smp reboot=k "
               "cryptomgr.notests net.ifnames=0 pci=lastbus=0 console=hvc0 console=hvc1 "
               "quiet panic=1 nr_cpus=2 selinux=1 scsi_mod.scan=none console=ttyS0 quiet "
               "panic=-1",
    "-pidfile", "/run/vc/vm/0123456789ab/pid",
    "-smp", "1,cores=1,threads=1,sockets=2,maxcpus=2",
    "-S",
]


def test_3x_reference_line(tmp_path: Path) -> None:
    assert line3(tmp_path) == REFERENCE_3X


def test_3x_line_differs_from_1x_where_kata_3_30_does(tmp_path: Path) -> None:
    one = masked(build({"agent_channel": "serial"}, {}, tmp_path), tmp_path)
    three = line3(tmp_path)
    assert "romfile=" in " ".join(one)
    assert "romfile=" not in " ".join(three)
    assert "-no-reboot" in one
    assert "--no-reboot" in three
    assert "iommu=off" in append(one)
    assert "iommu=off" not in append(three)
    assert "agent.use_vsock=false" in append(one)
    assert not [p for p in append(three) if p.startswith("agent.use_vsock")]
    assert options(three, "-machine") == ["q35,accel=kvm"]  # no kernel_irqchip
    assert not [d for d in options(three, "-device") if d.startswith("virtserialport")]


@pytest.mark.parametrize(("machine", "bridge", "serial", "numa"), [
    ("q35", True, "virtio-serial-pci,disable-modern=false,id=serial0",
     ["-numa", "node,memdev=dimm1"]),
    ("microvm", False, "virtio-serial-device,id=serial0",
     ["-machine", "memory-backend=dimm1"]),
])
def test_3x_machine_types(tmp_path: Path, machine: str, bridge: bool, serial: str,
                          numa: list[str]) -> None:
    argv = line3(tmp_path, machine_type=machine)
    assert options(argv, "-machine")[0] == f"{machine},accel=kvm"
    devices = options(argv, "-device")
    assert any(d.startswith("pci-bridge,") for d in devices) is bridge
    assert serial in devices
    i = argv.index("memory-backend-ram,id=dimm1,size=256M")
    assert argv[i + 1:i + 3] == numa
    if machine == "microvm":  # virtio-mmio: no PCI options at all
        assert not [d for d in devices if "disable-modern" in d or "-pci" in d]


def test_3x_refuses_pc(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"q35 and microvm .*'pc'"):
        line3(tmp_path, machine_type="pc")


def test_3x_image_on_nvdimm(tmp_path: Path) -> None:
    argv = line3(tmp_path, initrd=None, image="image")
    assert options(argv, "-machine") == ["q35,accel=kvm,nvdimm=on"]
    assert "-initrd" not in argv
    i = argv.index("nvdimm,id=nv0,memdev=mem0,unarmed=on")
    assert argv[i + 1:i + 3] == [
        "-object", f"memory-backend-file,id=mem0,mem-path=<tmp>/rootfs.img,"
                   f"size={IMAGE_BYTES},readonly=on"]
    params = append(argv)
    root = params.index("root=/dev/pmem0p1")
    # handleImagePath's root parameters, then appendConsole's, then quiet + systemd.
    assert params[root:root + 9] == [
        "root=/dev/pmem0p1", "rootflags=dax,data=ordered,errors=remount-ro", "ro",
        "rootfstype=ext4", "console=hvc0", "console=hvc1", "quiet",
        "systemd.show_status=false", "panic=1"]


def test_3x_image_on_virtio_blk(tmp_path: Path) -> None:
    argv = line3(tmp_path, initrd=None, image="image", disable_image_nvdimm=True)
    assert options(argv, "-machine") == ["q35,accel=kvm"]
    drive = "image-4d0f6a3e8f5b4c1e"  # "image-" + 8 bytes from the VM's UUID
    assert (f"virtio-blk-pci,disable-modern=false,drive={drive},config-wce=off,share-rw=on,"
            f"serial={drive}") in options(argv, "-device")
    assert options(argv, "-drive") == [
        f"id={drive},file=<tmp>/rootfs.img,aio=threads,format=raw,if=none,readonly=on"]
    assert "root=/dev/vda1" in append(argv)
    assert "rootflags=data=ordered,errors=remount-ro" in append(argv)
    # The image comes right after the console, before the SCSI controller.
    devices = options(argv, "-device")
    assert devices.index("virtconsole,chardev=charconsole0,id=console0") + 1 == \
        devices.index(f"virtio-blk-pci,disable-modern=false,drive={drive},config-wce=off,"
                      f"share-rw=on,serial={drive}")


@pytest.mark.parametrize(("rootfs", "flags"), [("xfs", "rootflags=dax ro"),
                                               ("erofs", "rootflags=dax ro")])
def test_3x_rootfs_types(tmp_path: Path, rootfs: str, flags: str) -> None:
    params = " ".join(append(line3(tmp_path, initrd=None, image="image", rootfs_type=rootfs)))
    assert f"root=/dev/pmem0p1 {flags} rootfstype={rootfs}" in params


def test_3x_kernel_verity_params(tmp_path: Path) -> None:
    verity = ("root_hash=abc123,salt=5a17,data_blocks=1024,data_block_size=4096,"
              "hash_block_size=4096")
    params = " ".join(append(line3(tmp_path, initrd=None, image="image",
                                   kernel_verity_params=verity)))
    assert ('dm-mod.create="dm-verity,,,ro,0 8192 verity 1 /dev/pmem0p1 /dev/pmem0p2 4096 '
            '4096 1024 0 sha256 abc123 5a17" root=/dev/dm-0 '
            'rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4') in params


@pytest.mark.parametrize(("verity", "reason"), [
    ("salt=1,data_blocks=1,data_block_size=512,hash_block_size=512", "root_hash"),
    ("root_hash=a,salt=1,data_blocks=1,data_block_size=500,hash_block_size=512",
     "multiple of 512"),
    ("root_hash=a,salt=1,data_blocks=0,data_block_size=512,hash_block_size=512", "non-zero"),
    ("root_hash", "invalid kernel_verity_params entry"),
])
def test_3x_bad_kernel_verity_params_are_refused(tmp_path: Path, verity: str,
                                                 reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        line3(tmp_path, initrd=None, image="image", kernel_verity_params=verity)


@pytest.mark.parametrize("image", [False, True])
def test_3x_debug(tmp_path: Path, image: bool) -> None:
    changes: dict[str, Any] = {"initrd": None, "image": "image"} if image else {}
    params = append(line3(tmp_path, debug=True, **changes))
    expected = ["debug", "systemd.show_status=true", "systemd.log_level=debug"] if image \
        else ["debug"]
    start = params.index("debug")
    assert params[start:start + len(expected) + 1] == [*expected, "panic=1"]
    assert "quiet" not in params[:start]
    # No debug-threads=on: the daemon knows its QEMU by its exact -name.
    assert options(line3(tmp_path, debug=True), "-name") == ["sandbox-0123456789ab"]


@pytest.mark.parametrize(("disable", "param"), [(False, "selinux=1"), (True, "selinux=0")])
def test_3x_guest_selinux(tmp_path: Path, disable: bool, param: str) -> None:
    params = append(line3(tmp_path, disable_guest_selinux=disable))
    assert params[params.index("nr_cpus=2") + 1] == param


@pytest.mark.parametrize("cid", [3, 1234, 0xFFFFFFFE])
def test_3x_vsock_device_carries_the_cid(tmp_path: Path, cid: int) -> None:
    devices = options(line3(tmp_path, cid=cid), "-device")
    vsock = f"vhost-vsock-pci,disable-modern=false,id=vsock-{cid},guest-cid={cid}"
    assert vsock in devices
    # kata_agent.go configure: the vsock device, then the shared directory.
    assert devices.index(vsock) + 1 == len(devices) - 1
    assert devices[-1].startswith("virtio-9p-pci,")


def test_3x_agent_channel(tmp_path: Path) -> None:
    none = options(line3(tmp_path, agent_channel=""), "-device")
    assert not [d for d in none if "vsock" in d or "virtserialport" in d]
    with pytest.raises(ValueError, match="guest CID"):
        line3(tmp_path, cid=None)
    with pytest.raises(ValueError, match="over vsock only"):
        line3(tmp_path, agent_channel="serial")


def test_3x_no_shared_fs(tmp_path: Path) -> None:
    argv = line3(tmp_path, shared_fs="none")
    assert "-fsdev" not in argv
    assert not [d for d in options(argv, "-device") if "9p" in d]


def test_3x_nested_host_uses_legacy_virtio(tmp_path: Path) -> None:
    argv = line3(tmp_path, nested=True, balloon=True)
    modern = [d for d in options(argv, "-device") if "disable-modern" in d]
    assert {d.split(",")[0]: "disable-modern=true" in d for d in modern} == {
        "virtio-serial-pci": True, "virtio-scsi-pci": True, "vhost-vsock-pci": True,
        "virtio-9p-pci": True,
        "virtio-balloon-pci": False,  # CreateVM builds the balloon with DisableModern false
    }


def test_3x_template_memory(tmp_path: Path) -> None:
    memory = Path("/run/vc/vm/template/memory")
    template = line3(tmp_path, memory="template", memory_path=memory)
    assert options(template, "-cpu") == ["host,"]  # 3.x has no vmx=off
    assert "memory-backend-file,id=dimm1,size=256M,mem-path=/run/vc/vm/template/memory," \
           "share=on" in options(template, "-object")
    assert template[-1] == "-S"
    assert "-incoming" not in template
    clone = line3(tmp_path, memory="clone", memory_path=memory)
    assert "memory-backend-file,id=dimm1,size=256M,mem-path=/run/vc/vm/template/memory" \
        in options(clone, "-object")
    # appendIncoming: "-S -incoming defer" after the kernel, before the pid file; once.
    i = clone.index("-incoming")
    assert clone[i - 1:i + 4] == ["-S", "-incoming", "defer", "-pidfile",
                                  "/run/vc/vm/0123456789ab/pid"]
    assert clone.count("-S") == 1
    with pytest.raises(ValueError, match="memory file"):
        line3(tmp_path, memory="template")


@pytest.mark.parametrize(("changes", "backend"), [
    ({"mem_prealloc": True}, "memory-backend-ram,id=dimm1,size=256M,prealloc=on"),
    ({"hugepages": True},
     "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/hugepages"),
    ({"hugepages": True, "vhost_user_store": True},
     "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/hugepages,share=on"),
    ({"file_mem_backend": Path("/dev/shm")},
     "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/shm,share=on"),
    ({"file_mem_backend": Path("/dev/shm"), "hugepages": True},
     "memory-backend-file,id=dimm1,size=256M,mem-path=/dev/hugepages,share=on,prealloc=on"),
])
def test_3x_memory_knobs(tmp_path: Path, changes: dict[str, Any], backend: str) -> None:
    assert backend in options(line3(tmp_path, **changes), "-object")


def test_3x_templating_refuses_file_backed_memory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file backed memory"):
        line3(tmp_path, memory="template", memory_path=Path("/m"),
              file_mem_backend=Path("/dev/shm"))
    with pytest.raises(ValueError, match="enable_hugepages"):
        line3(tmp_path, vhost_user_store=True)


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, "256M,slots=4,maxmem=26153M"),
    ({"memory_offset_mib": 100, "max_memory_mib": 2048}, "256M,slots=4,maxmem=3172M"),
    ({"memory_slots": 0}, "256M,maxmem=26153M"),
    ({"memory_slots": 260}, "256M,slots=4,maxmem=26153M"),  # govmm's uint8
])
def test_3x_memory_topology(tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    assert options(line3(tmp_path, **changes), "-m") == [expected]


@pytest.mark.parametrize("accelerator", ["kvm", "tcg"])
def test_3x_iommu(tmp_path: Path, accelerator: str) -> None:
    argv = line3(tmp_path, iommu=True, accelerator=accelerator,
                 initrd=None, image="image")
    machine = {"kvm": "q35,accel=kvm,kernel_irqchip=split,nvdimm=on",
               "tcg": "q35,accel=tcg,nvdimm=on"}[accelerator]
    assert options(argv, "-machine") == [machine]
    devices = options(argv, "-device")
    iommu = devices.index("intel-iommu,intremap=on,device-iotlb=on,caching-mode=on")
    assert devices[iommu - 1] == "nvdimm,id=nv0,memdev=mem0,unarmed=on"
    assert devices[iommu + 1].startswith("virtio-scsi-pci,")
    params = append(argv)
    assert params[params.index("pci=lastbus=0") + 1:][:3] == [
        "intel_iommu=on", "iommu=pt", "root=/dev/pmem0p1"]
    with pytest.raises(ValueError, match="vIOMMU"):
        line3(tmp_path, iommu=True, machine_type="microvm")


def test_3x_legacy_serial_console(tmp_path: Path) -> None:
    argv = line3(tmp_path, legacy_serial=True, own_serial=True)
    assert options(argv, "-serial") == ["chardev:charconsole0", "chardev:vmcguest"]
    assert not [d for d in options(argv, "-device") if d.startswith(("virtio-serial",
                                                                     "virtconsole"))]
    params = append(argv)
    assert "console=ttyS0" in params[:params.index("quiet")]
    assert "console=hvc0" not in params


def test_3x_own_serial_ports_come_last(tmp_path: Path) -> None:
    argv = line3(tmp_path, own_serial=True)
    assert options(argv, "-serial") == ["chardev:vmcserial0", "chardev:vmcguest"]
    assert argv.index("-smp") < argv.index("-serial")
    assert argv[-1] == "-S"


@pytest.mark.parametrize(("hot", "cold", "expected"), [
    ("no-port", "no-port", []),
    ("bridge-port", "no-port", []),
    ("root-port", "no-port", [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=0,slot=0,multifunction=off",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=0,slot=1,multifunction=off"]),
    ("no-port", "root-port", [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=0,slot=0,multifunction=off",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=0,slot=1,multifunction=off"]),
    ("switch-port", "no-port", [
        "pcie-root-port,id=swrp0,bus=pcie.0,chassis=1,slot=0,multifunction=off",
        "x3130-upstream,id=swup0,bus=swrp0",
        "xio3130-downstream,id=swdp0,bus=swup0,chassis=2,slot=0",
        "xio3130-downstream,id=swdp1,bus=swup0,chassis=2,slot=1",
        "xio3130-downstream,id=swdp2,bus=swup0,chassis=2,slot=2"]),
])
def test_3x_pcie_ports(tmp_path: Path, hot: str, cold: str, expected: list[str]) -> None:
    devices = options(line3(tmp_path, hot_plug_vfio=hot, cold_plug_vfio=cold,
                            pcie_root_port=2, pcie_switch_port=3), "-device")
    ports = [d for d in devices if d.startswith(("pcie-root-port", "x3130", "xio3130"))]
    assert ports == expected
    if expected:  # after the RNG, before the agent's devices
        assert devices[devices.index(expected[0]) - 1] == "virtio-rng-pci,rng=rng0"
        assert devices[devices.index(expected[-1]) + 1].startswith("vhost-vsock-pci,")


def test_3x_optional_devices_and_options(tmp_path: Path) -> None:
    argv = line3(tmp_path, pvpanic=True, balloon=True, iothreads=True, indep_iothreads=2,
                 seccomp_sandbox="on,obsolete=deny", firmware=Path("/fw/OVMF.fd"),
                 pflash=("/fw/a.fd", "/fw/b.fd"), debug=True, extra_monitor="hmp")
    devices = options(argv, "-device")
    assert "virtio-scsi-pci,id=scsi0,disable-modern=false,iothread=iothread-4d0f6a3e8f5b4c1e" \
        in devices
    i = argv.index("pvpanic")
    assert argv[i + 1] == "-no-shutdown"
    assert devices.index("pvpanic") < devices.index(
        "virtio-scsi-pci,id=scsi0,disable-modern=false,iothread=iothread-4d0f6a3e8f5b4c1e")
    balloon = ("virtio-balloon-pci,id=balloon0,deflate-on-oom=on,disable-modern=false,"
               "free-page-reporting=on")
    assert devices[devices.index("virtio-rng-pci,rng=rng0") + 1] == balloon
    assert [o for o in options(argv, "-object") if o.startswith("iothread")] == [
        "iothread,id=iothread-4d0f6a3e8f5b4c1e", "iothread,id=indep_iothread_0",
        "iothread,id=indep_iothread_1"]
    assert options(argv, "-pflash") == ["/fw/a.fd", "/fw/b.fd"]
    assert argv.index("-pflash") < argv.index("-vga")
    assert argv.index("-append") < argv.index("-bios") < argv.index("-pidfile")
    assert options(argv, "-bios") == ["/fw/OVMF.fd"]
    assert argv[argv.index("-pidfile") + 2:argv.index("-pidfile") + 4] == [
        "-sandbox", "on,obsolete=deny"]
    assert options(argv, "-monitor") == [
        "unix:path=/run/vc/vm/0123456789ab/extra-monitor.sock,server=on,wait=off"]
    # Without enable_debug there is no extra monitor (createQmpSocket).
    assert "-monitor" not in line3(tmp_path, extra_monitor="hmp")


def test_3x_iothread_only_for_virtio_scsi(tmp_path: Path) -> None:
    argv = line3(tmp_path, iothreads=True, block_device_driver="virtio-blk")
    assert not [o for o in options(argv, "-object") if o.startswith("iothread")]
    assert not [d for d in options(argv, "-device") if d.startswith("virtio-scsi")]


def test_3x_values_are_escaped(tmp_path: Path) -> None:
    argv = line3(tmp_path, entropy_source="/dev/a,b")
    assert "rng-random,id=rng0,filename=/dev/a,,b" in options(argv, "-object")
