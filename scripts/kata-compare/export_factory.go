// Copied by run.py into Kata's virtcontainers/factory package (of a throw-away export):
// the one unexported function the comparison needs, called as Kata's GetVM calls it.
package factory

import vc "github.com/kata-containers/kata-containers/src/runtime/virtcontainers"

// CheckVMConfigForVmcache is checkVMConfig(base, new): nil when Kata would use the VM.
func CheckVMConfigForVmcache(base, new vc.VMConfig) error { return checkVMConfig(base, new) }
