package main

import (
	"context"

	"github.com/containernetworking/cni/libcni"
)

// extraVerb: libcni 1.1 (containerd 1.7) has no GC or STATUS.
func extraVerb(context.Context, *libcni.CNIConfig, *libcni.NetworkConfigList, string, []string, *error) bool {
	return false
}
