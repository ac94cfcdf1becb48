// Command libcni-driver runs a CNI network config list through the real
// libcni, the library containerd and CRI-O use, so that the flock plugin is
// exercised by the runtime's own code: version negotiation, result parsing
// and conversion, the prevResult cache, CHECK/DEL from that cache, GC, STATUS.
//
//	libcni-driver CONFLIST BINDIR CACHEDIR VERB [CONTAINERID NETNS IFNAME CNI_ARGS]
//	libcni-driver CONFLIST BINDIR CACHEDIR GC cid/ifname,cid/ifname
//
// It prints one JSON object: {"ok", "cniVersion" (the negotiated one),
// "result" (ADD, as libcni parsed it), "resultCurrent" (ADD converted by
// libcni to its newest result version), "error": {code, msg, details}}.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
)

type output struct {
	OK            bool            `json:"ok"`
	CNIVersion    string          `json:"cniVersion"`
	Result        json.RawMessage `json:"result,omitempty"`
	ResultCurrent json.RawMessage `json:"resultCurrent,omitempty"`
	Error         *types.Error    `json:"error,omitempty"`
	Supported     []string        `json:"supportedVersions,omitempty"`
}

func fail(out *output, err error) {
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		out.Error = cniErr
	} else {
		out.Error = &types.Error{Code: 0, Msg: err.Error()}
	}
}

func runtimeConf(args []string) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: args[0], NetNS: args[1], IfName: args[2]}
	if len(args) > 3 && args[3] != "" {
		for _, kv := range strings.Split(args[3], ";") {
			k, v, _ := strings.Cut(kv, "=")
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	return rt
}

func main() {
	if len(os.Args) < 5 {
		fmt.Fprintln(os.Stderr, "usage: libcni-driver CONFLIST BINDIR CACHEDIR VERB [ARGS...]")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	cninet := libcni.NewCNIConfigWithCacheDir([]string{os.Args[2]}, os.Args[3], nil)
	ctx := context.Background()
	out := output{CNIVersion: list.CNIVersion}
	verb, rest := os.Args[4], os.Args[5:]
	switch verb {
	case "ADD":
		res, err := cninet.AddNetworkList(ctx, list, runtimeConf(rest))
		if err != nil {
			fail(&out, err)
			break
		}
		out.Result, _ = json.Marshal(res)
		cur, err := types100.NewResultFromResult(res)
		if err != nil {
			fail(&out, err)
			break
		}
		out.ResultCurrent, _ = json.Marshal(cur)
		out.OK = true
	case "CHECK":
		err = cninet.CheckNetworkList(ctx, list, runtimeConf(rest))
	case "DEL":
		err = cninet.DelNetworkList(ctx, list, runtimeConf(rest))
	case "VERSION":
		info, verr := cninet.GetVersionInfo(ctx, list.Plugins[0].Network.Type)
		err = verr
		if info != nil {
			out.Supported = info.SupportedVersions()
		}
	default:
		if !extraVerb(ctx, cninet, list, verb, rest, &err) {
			fmt.Fprintln(os.Stderr, "unknown verb", verb)
			os.Exit(2)
		}
	}
	if verb != "ADD" {
		if err != nil {
			fail(&out, err)
		} else {
			out.OK = true
		}
	}
	_ = json.NewEncoder(os.Stdout).Encode(out)
}
