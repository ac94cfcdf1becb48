"""What the flock tests read back from the node: the router's table, the node's routes.

Installing flock (deploy/install.yaml, label, NodeConfig) is the harness's own
`KubeNode.install_flock`, shared with bench/bench_node.py.
"""

from __future__ import annotations

from typing import Any

from flock.testbed.kubenode import (
    ANYCAST_CIDR4,
    ANYCAST_CIDR6,
    INSTALL_YAML,
    KubeNode,
    flock_on_kubernetes_missing,
)
from flock.testbed.kubenode import FLOCK_POD_CIDR4 as POD_CIDR4
from flock.testbed.kubenode import FLOCK_POD_CIDR6 as POD_CIDR6

__all__ = [
    "ANYCAST_CIDR4",
    "ANYCAST_CIDR6",
    "INSTALL_YAML",
    "POD_CIDR4",
    "POD_CIDR6",
    "flock_on_kubernetes_missing",
]

ANYCAST6, ANYCAST4 = "fd00:e2e:a::80", "10.246.0.80"


def agent_pods(node: KubeNode) -> list[dict[str, Any]]:
    return node.flock_agent_pods()


def daemonset_name(node: KubeNode) -> str:
    return node.flock_daemonset()


def router_has(node: KubeNode, prefix: str) -> bool:
    """The router's BGP table selected a path to `prefix` (an anycast /128 or /32)."""
    assert node.frr is not None
    version = 6 if ":" in prefix else 4
    return prefix in node.frr.bgp_routes(version)


def node_route_hops(node: KubeNode, ip: str) -> list[str]:
    """The next-hop devices of the node's kernel route to `ip` (empty: no route)."""
    fam = "-6" if ":" in ip else "-4"
    out = node.node_exec(["ip", fam, "-o", "route", "show", "exact", ip], check=False).stdout
    hops = []
    for line in out.splitlines():
        words = line.split()
        hops += [words[i + 1] for i, w in enumerate(words) if w == "dev" and i + 1 < len(words)]
    return hops
