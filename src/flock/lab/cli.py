"""`flock lab ...`: thin verbs over the lab's core API (the containerlab shape).

    flock lab up [TOPOLOGY]          deploy (default topology when none given)
    flock lab status [--json]        inspect: sessions, routes, pods per node
    flock lab graph [-o FILE]        draw it (SVG, and PNG when possible)
    flock lab ready POD true|false   flip a pod's readiness, as a probe would
    flock lab add-pod NAME --node N  create a pod through the real CNI plugin
    flock lab delete-pod POD         delete it (CNI DEL, object removed)
    flock lab exec POD -- CMD...     run a command in a pod's (node's, router's) netns
    flock lab test                   built-in checks, pass/fail table
    flock lab down                   destroy everything the lab made
    flock lab validate [TOPOLOGY]    check a topology file without building it

Every verb but `up` and `validate` finds its lab with `--name`, or the only lab
that is up.
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flock import ANNOTATION_PREFIX
from flock.lab import build, checks, core, inspect, pods, routes
from flock.lab import state as lab_state
from flock.lab.datastore import Kubectl
from flock.lab.topology import DEFAULT_LAB_NAME, PodSpec, TopologyError
from flock.lab.view import render_checks, render_text


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flock lab", description="A real BGP network with flock, in network namespaces."
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if name not in ("up", "validate"):
            sp.add_argument("--name", help="lab name (default: the only lab that is up)")
        return sp

    up = verb("up", "deploy a lab from a topology file (default: the built-in topology)")
    up.add_argument("topology", nargs="?", type=Path, help="topology YAML (see examples/)")
    up.add_argument("--name", help="override the topology's lab name")
    mode = up.add_mutually_exclusive_group()
    mode.add_argument(
        "--standalone",
        dest="standalone",
        action="store_true",
        default=False,
        help="no API server: the agents read a manifests directory (no Go tools needed)",
    )
    mode.add_argument(
        "--kube",
        dest="standalone",
        action="store_false",
        help="cluster objects in a real etcd + kube-apiserver (the default)",
    )

    verb("down", "destroy a lab: namespaces, processes, files (also after a crash)")

    st = verb("status", "BGP sessions, routes the router learned, pods per node")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    gr = verb("graph", "draw the lab (SVG, and PNG where a converter exists)")
    gr.add_argument("-o", "--output", type=Path, help="output file (default: ./<lab>.svg)")

    rd = verb("ready", "set a pod's Ready condition (withdraws/restores its anycast)")
    rd.add_argument("pod", help="pod name or namespace/name")
    rd.add_argument("value", choices=["true", "false"])

    ap = verb("add-pod", "create a pod on a node through the real CNI plugin")
    ap.add_argument("pod", help="pod name or namespace/name")
    ap.add_argument("--node", required=True)
    ap.add_argument("--anycast", help="comma-separated anycast IPs")
    ap.add_argument("--addresses", help="comma-separated operator-supplied IPs")
    ap.add_argument(
        "-a",
        "--annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"annotation (KEY without '/' means {ANNOTATION_PREFIX}KEY)",
    )
    ap.add_argument("-l", "--label", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--not-ready", action="store_true", help="start not Ready")

    dp = verb("delete-pod", "delete a pod (CNI DEL; its routes are withdrawn)")
    dp.add_argument("pod")

    ex = verb("exec", "run a command in the network namespace of a pod, node or the router")
    ex.add_argument("pod", help="pod, node or router name")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    verb("test", "run the built-in checks; exit status 0 only if all pass")

    kc = verb("kubectl", "run kubectl against the lab's API server (as admin)")
    kc.add_argument("args", nargs=argparse.REMAINDER, help="-- KUBECTL ARGS...")

    va = verb("validate", "validate a topology file without creating anything")
    va.add_argument("topology", nargs="?", type=Path)
    return p


def _lab_name(given: str | None) -> str:
    if given:
        return given
    labs = lab_state.running_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        return DEFAULT_LAB_NAME
    raise UsageError(f"several labs are up ({', '.join(labs)}): choose one with --name")


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _pod_from_args(ns: argparse.Namespace) -> PodSpec:
    namespace, _, name = ns.pod.rpartition("/")
    annotations = _pairs(ns.annotation, "--annotation")
    if ns.anycast:
        annotations["anycast"] = ns.anycast
    if ns.addresses:
        annotations["addresses"] = ns.addresses
    return PodSpec.model_validate(
        {
            "name": name,
            "namespace": namespace or "default",
            "node": ns.node,
            "annotations": annotations,
            "labels": _pairs(ns.label, "--label"),
            "ready": not ns.not_ready,
        }
    )


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    ns = parser.parse_args(list(argv))
    if ns.verb is None:
        parser.print_help()
        return 2
    try:
        return int(VERBS[ns.verb](ns))
    except (TopologyError, UsageError, core.LabError) as e:
        print(f"flock lab {ns.verb}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flock lab {ns.verb}: interrupted", file=sys.stderr)
        return 130


def _say(msg: str) -> None:
    print(msg, flush=True)


def _validate(ns: argparse.Namespace) -> int:
    topo = core.load_topology(ns.topology)
    print(f"topology {topo.name}: OK ({len(topo.nodes)} nodes, {len(topo.pods)} pods)")
    return 0


def _up(ns: argparse.Namespace) -> int:
    topo = core.load_topology(ns.topology, name=ns.name)
    print(build.up(topo, progress=_say, standalone=ns.standalone))
    return 0


def _down(ns: argparse.Namespace) -> int:
    print(build.down(_lab_name(ns.name), progress=_say))
    return 0


def _status(ns: argparse.Namespace) -> int:
    st = inspect.status(_lab_name(ns.name))
    print(st.to_json() if ns.json else render_text(st))
    return 0


def _graph(ns: argparse.Namespace) -> int:
    name = _lab_name(ns.name)
    for f in inspect.graph(name, ns.output or Path(f"{name}.svg")):
        print(f"wrote {f}")
    return 0


def _ready(ns: argparse.Namespace) -> int:
    name = _lab_name(ns.name)
    t0 = time.monotonic()
    pods.ready(name, ns.pod, ns.value == "true")
    print(f"pod {ns.pod}: Ready={ns.value}")
    _, learned = routes.converge(name)
    took = time.monotonic() - t0
    pod = core.Lab.open(name).pod(ns.pod)
    for ip in pod.annotation_ips("anycast"):
        prefix = str(ipaddress.ip_network(ip))
        via = ", ".join(sorted(learned.get(prefix, set()))) or "nothing (withdrawn everywhere)"
        print(f"  router: {prefix} via {via}")
    print(f"  (the router's table matched {took * 1000:.0f} ms after the flip)")
    return 0


def _add_pod(ns: argparse.Namespace) -> int:
    rec = pods.add_pod(_lab_name(ns.name), _pod_from_args(ns))
    print(f"pod {rec.namespace}/{rec.name} on {rec.node}: {' '.join(rec.addresses)}")
    return 0


def _delete_pod(ns: argparse.Namespace) -> int:
    pods.delete_pod(_lab_name(ns.name), ns.pod)
    print(f"pod {ns.pod} deleted")
    return 0


def _exec(ns: argparse.Namespace) -> int:
    cmd = list(ns.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("exec needs a command: flock lab exec POD -- CMD ARGS...")
    return pods.exec_in_pod(_lab_name(ns.name), ns.pod, cmd)


def _kubectl(ns: argparse.Namespace) -> int:
    args = list(ns.args)
    if args and args[0] == "--":
        args = args[1:]
    lab = core.Lab.open(_lab_name(ns.name))
    if lab.state.datastore != "kube":
        raise UsageError(f"lab '{lab.name}' runs standalone (no API server): nothing to kubectl")
    kubectl = Kubectl.load(lab.state.dir)
    return subprocess.call(kubectl.argv(*args))


def _test(ns: argparse.Namespace) -> int:
    name = _lab_name(ns.name)
    print(f"running the built-in checks against lab '{name}' ...", flush=True)
    results = checks.run_checks(name)
    print(render_checks(results))
    return 0 if results and all(r.ok for r in results) else 1


VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "up": _up,
    "down": _down,
    "status": _status,
    "graph": _graph,
    "ready": _ready,
    "add-pod": _add_pod,
    "delete-pod": _delete_pod,
    "exec": _exec,
    "test": _test,
    "kubectl": _kubectl,
    "validate": _validate,
}
