"""What the file may hold: the keys of each table we read, whose they are, Kata's defaults.

Kata's file has many tables and keys we do not use. Inside the tables we read, Kata's keys
are accepted silently and unknown ones get a warning (a typo in Kata's own tables must not
stop a host); `[vmcache]` is ours alone, and an unknown key there is refused. These sets are
what tells the three apart; every key of `OUR_KEYS` is documented in etc/configuration.toml
(a test reads the shipped file).
"""

from __future__ import annotations

from typing import Final

from .. import kata

#: Our own table: Kata's parser ignores tables it does not know, so kata-runtime never
#: sees it and the same file serves both.
OUR_TABLE: Final = "vmcache"

# Kata defaults (pkg/katautils/config-settings.go.in). The hypervisor's (binary, machine
# type, vCPUs, memory, slots) are the generation's, in kata/: the values come from there.
KATA_DEFAULT_KERNEL: Final = kata.DEFAULT_KERNEL_PATH
KATA_DEFAULT_ENDPOINT: Final = "/var/run/kata-containers/cache.sock"
KATA_DEFAULT_TEMPLATE_PATH: Final = "/run/vc/vm/template"
#: persist/fs RunVMStoragePath(): where kata-runtime looks for a VM's sockets.
KATA_VM_STORAGE_PATH: Final = "/run/vc/vm"

# Keys Kata reads in [hypervisor.qemu] (1.x and 2.x). We use a few; the others are Kata's
# business and must not produce warnings on a stock Kata file.
KATA_QEMU_KEYS: Final = frozenset(
    """
    path kernel initrd image firmware firmware_volume machine_accelerators cpu_features
    kernel_params machine_type default_vcpus default_maxvcpus default_bridges default_memory
    memory_slots memory_offset enable_virtio_mem disable_block_device_use shared_fs
    virtio_fs_daemon valid_virtio_fs_daemon_paths virtio_fs_cache_size virtio_fs_extra_args
    virtio_fs_cache virtio_fs_queue_size block_device_driver block_device_aio
    block_device_cache_set block_device_cache_direct block_device_cache_noflush
    enable_iothreads enable_mem_prealloc enable_hugepages enable_vhost_user_store
    vhost_user_store_path valid_vhost_user_store_paths enable_iommu enable_iommu_platform
    file_mem_backend valid_file_mem_backends pflashes enable_swap enable_debug
    disable_nesting_checks msize_9p disable_image_nvdimm hotplug_vfio_on_root_bus
    pcie_root_port hot_plug_vfio cold_plug_vfio pcie_switch_port disable_vhost_net
    entropy_source valid_entropy_sources guest_hook_path rx_rate_limiter_max_rate
    tx_rate_limiter_max_rate use_vsock valid_hypervisor_paths valid_jailer_paths jailer_path
    ctlpath valid_ctlpaths enable_annotations guest_memory_dump_path guest_memory_dump_paging
    confidential_guest sev_snp_guest enable_guest_swap seccompsandbox disable_selinux
    disable_guest_selinux kernel_verity_params dial_timeout rootfs_type
    disable_seccomp static_sandbox_resource_mgmt sgx_epc_size snp_id_block snp_id_auth
    snp_guest_policy snp_certs_path extra_monitor_socket reclaim_guest_freed_memory
    tdx_quote_generation_service_socket_port indep_iothreads
    block_device_logical_sector_size block_device_physical_sector_size default_maxmemory
    disk_rate_limiter_bw_max_rate disk_rate_limiter_bw_one_time_burst
    disk_rate_limiter_ops_max_rate disk_rate_limiter_ops_one_time_burst
    net_rate_limiter_bw_max_rate net_rate_limiter_bw_one_time_burst
    net_rate_limiter_ops_max_rate net_rate_limiter_ops_one_time_burst enable_numa
    numa_mapping hypervisor_loglevel measurement_algo remote_hypervisor_socket
    remote_hypervisor_timeout rootless use_legacy_serial vhost_user_reconnect_timeout_sec
    """.split()
)
#: Every key of [vmcache]; anything else there is refused with a "did you mean" hint.
OUR_KEYS: Final = frozenset(
    """
    accelerator ready_timeout state_dir boot_parallelism boot_priority stop_timeout ready_probe
    ready_line
    max_memory socket_mode socket_group log_format vm_storage_path guest_agent kata_version
    memory_budget_mib metrics_address autoscale min_ready max_ready shrink_after
    """.split()
)
KATA_FACTORY_KEYS: Final = frozenset(
    {"enable_template", "template_path", "vm_cache_number", "vm_cache_endpoint"}
)
