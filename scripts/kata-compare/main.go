// vmcache-compare: Kata 3.x's own verdict on a Config payload of kata-vmcache.
//
// Built inside an export of kata-containers' src/runtime (run.py does that, offline, from
// Kata's vendored modules), so everything below is Kata's code: its configuration loader
// (katautils.LoadConfiguration), GrpcToVMConfig (how its grpccache client decodes our
// Config reply), VMConfig.Valid (which GetVM runs on its own config before comparing) and
// its factory's checkVMConfig (exported for us by export_factory.go).
//
//	vmcache-compare CONFIG DATA.json AGENT.json
//
// prints one JSON object: {"match": bool, "kata": <Kata's VMConfig>} or {"error": "..."}.
// VMCACHE_VSOCK_DEVICE replaces utils.VHostVSockDevicePath (the variable Kata's own tests
// set), for hosts without /dev/vhost-vsock, where 3.x's QEMU loader refuses every file.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/kata-containers/kata-containers/src/runtime/pkg/katautils"
	pb "github.com/kata-containers/kata-containers/src/runtime/protocols/cache"
	vc "github.com/kata-containers/kata-containers/src/runtime/virtcontainers"
	"github.com/kata-containers/kata-containers/src/runtime/virtcontainers/factory"
	"github.com/kata-containers/kata-containers/src/runtime/virtcontainers/utils"
)

func fail(stage string, err error) {
	out, _ := json.Marshal(map[string]string{"error": stage + ": " + err.Error()})
	fmt.Println(string(out))
	os.Exit(0)
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: vmcache-compare CONFIG DATA.json AGENT.json")
		os.Exit(2)
	}
	if device := os.Getenv("VMCACHE_VSOCK_DEVICE"); device != "" {
		utils.VHostVSockDevicePath = device
	}
	_, runtimeConfig, err := katautils.LoadConfiguration(os.Args[1], true)
	if err != nil {
		fail("Kata's loader refuses the file", err)
	}
	data, err := os.ReadFile(os.Args[2])
	if err != nil {
		fail("read", err)
	}
	agent, err := os.ReadFile(os.Args[3])
	if err != nil {
		fail("read", err)
	}
	base, err := vc.GrpcToVMConfig(&pb.GrpcVMConfig{Data: data, AgentConfig: agent})
	if err != nil {
		fail("GrpcToVMConfig refuses the payload", err)
	}
	// As katautils.HandleFactory and Sandbox.startVM build it, then GetVM's Valid().
	own := vc.VMConfig{
		HypervisorType:   runtimeConfig.HypervisorType,
		HypervisorConfig: runtimeConfig.HypervisorConfig,
		AgentConfig:      runtimeConfig.AgentConfig,
	}
	if err := own.Valid(); err != nil {
		fail("VMConfig.Valid", err)
	}
	match := factory.CheckVMConfigForVmcache(*base, own) == nil
	out, err := json.Marshal(map[string]interface{}{"match": match, "kata": own})
	if err != nil {
		fail("marshal", err)
	}
	fmt.Println(string(out))
}
