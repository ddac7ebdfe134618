"""kata-vmcache: keeps booted, paused QEMU VMs ready and hands them to Kata Containers."""

__version__ = "0.1.0"
