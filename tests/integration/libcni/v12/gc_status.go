package main

import (
	"context"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

// extraVerb runs the CNI 1.1 verbs (libcni 1.2 and later).
func extraVerb(ctx context.Context, c *libcni.CNIConfig, list *libcni.NetworkConfigList,
	verb string, rest []string, err *error) bool {
	switch verb {
	case "GC":
		args := &libcni.GCArgs{}
		if len(rest) > 0 && rest[0] != "" {
			for _, a := range strings.Split(rest[0], ",") {
				cid, ifname, _ := strings.Cut(a, "/")
				args.ValidAttachments = append(args.ValidAttachments,
					types.GCAttachment{ContainerID: cid, IfName: ifname})
			}
		}
		*err = c.GCNetworkList(ctx, list, args)
	case "STATUS":
		*err = c.GetStatusNetworkList(ctx, list)
	default:
		return false
	}
	return true
}
