"""The bundled demo guest: the host's kernel and a busybox initramfs whose /init (`init`)
signals readiness on a serial port and answers a small agent protocol, so that `make run`,
`make test` and `make bench` boot real VMs on any Debian host (guest.py says how).

- `guest.py`: building it (`build_demo_guest`), its stamp, the `demo-guest` command;
- `kernel.py`: the host kernel it boots, and that kernel's virtio-fs modules;
- `initramfs.py`: what the archive holds; `cpio.py`: the archive writer;
- `config.py`: its configuration.toml (a Kata file plus our [vmcache] table).
"""
