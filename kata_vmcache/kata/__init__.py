"""Kata's own view of our VMs: the `VMConfig` JSON that kata-runtime compares with its own.

kata-runtime, configured with `[factory] vm_cache_number > 0`, does not trust us to boot the
right VM. Its grpccache factory calls our `Config` RPC, unmarshals `GrpcVMConfig.Data` (Go
`encoding/json`) into its `vc.VMConfig`, and on every sandbox start compares it with the
`VMConfig` it derived itself from the same configuration.toml:

    resetHypervisorConfig(&base); resetHypervisorConfig(&new)   // factory.go
    if !utils.DeepCompare(base, new) { fall back to booting its own VM }

Only the fields `resetHypervisorConfig` zeroes may differ (the vCPU count, MemorySize, the
template fields, and in 3.x SharedPath, VMStorePath, RunStorePath; in 1.x also ProxyConfig).
**Every other field matters**: one wrong default, one unresolved symlink, one kernel
parameter in a different order, and Kata silently boots its own VM - the cache then costs
memory and saves nothing, and nothing logs an error. So this package reproduces Kata's
configuration loader field by field, defaults included, instead of copying what we use.

Two generations, two derivations (`Generation`, chosen by `[vmcache] kata_version` or
`detect_generation()`): Kata 1.x (kata-containers/runtime) and Kata 3.x (kata-containers
3.30.0) share the proto and most JSON field names, but derive several of them differently
(docs/kata-config-fields.md lists every field, both derivations and where they come from).
Each payload holds exactly the fields of its generation's structs: Go's decoder ignores
keys it does not know, so a key of the other generation would only mislead a reader.

`resolve()` gives the values the daemon boots a VM with (binary, kernel, vCPUs, memory),
taken from the same derivation as the payload, so that the VM and the `Config` reply can
never disagree.

The package, bottom layer of kata-vmcache (it imports nothing else of ours):

    generation     which Kata reads the file: `Generation`, `detect_generation()`
    defaults       Kata's defaults of both generations and the names it compares verbatim
    host           the host facts Kata's loader reads (CPUs, memory, vCPU limit, vsock)
    go             the file as Go's loader sees it: TOML values into Go types, Go strings
    kernel_params  Kata's kernel parameter list, split and ordered as Kata does
    gen1, gen3     each generation's derivation, field by field, with the Kata sources read
    payload        the face: `hypervisor_config`, `agent_config`, `vm_config`, per generation
    resolved       `resolve()`: the values a VM boots with, read out of the payload
    compare        `reset_for_compare()`: what Kata's factory ignores when it compares

What we cannot reproduce from the file alone, and why it does not matter here: per-pod
annotations and OCI-spec-derived fields (they change the *new* config, so Kata would not
match its own cache either), and `fips=1` on FIPS hosts (same). The 1.x output mirrors
`kata-runtime factory init` (the 1.x CLI loader, builtIn=false): a 1.x shimv2 client derives
LongLiveConn=true and ProxyType "kataBuiltInProxy" and never matched Kata's own cache either.

Pure: no I/O beyond os.path.exists/realpath and the host facts Kata's loader itself reads
(CPU count, memory size, vsock device nodes).
"""

from __future__ import annotations

from .compare import RESET_HYPERVISOR_FIELDS, reset_for_compare
from .defaults import (
    DEFAULT_HYPERVISOR_PATH,
    DEFAULT_HYPERVISOR_PATH_3X,
    DEFAULT_KERNEL_PATH,
    DEFAULT_MEMORY_MIB,
    DEFAULT_PROXY_PATH,
    MIN_HYPERVISOR_MEMORY_MIB,
)
from .generation import GENERATIONS, Generation, detect_generation
from .host import VHOST_VSOCK_DEVICE, host_has_vhost_vsock
from .payload import (
    agent_config,
    default_hypervisor_path,
    hypervisor_config,
    loader_refusals,
    proxy_config,
    vm_config,
)
from .resolved import HypervisorValues, resolve

__all__ = [
    "DEFAULT_HYPERVISOR_PATH", "DEFAULT_HYPERVISOR_PATH_3X", "DEFAULT_KERNEL_PATH",
    "DEFAULT_MEMORY_MIB", "DEFAULT_PROXY_PATH", "GENERATIONS", "MIN_HYPERVISOR_MEMORY_MIB",
    "RESET_HYPERVISOR_FIELDS", "VHOST_VSOCK_DEVICE", "Generation", "HypervisorValues",
    "agent_config", "default_hypervisor_path", "detect_generation", "host_has_vhost_vsock",
    "hypervisor_config", "loader_refusals", "proxy_config", "reset_for_compare", "resolve",
    "vm_config",
]
