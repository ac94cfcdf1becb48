"""The lab's upstream router: its FRR config, and reading FRR's JSON back into lab terms.

Pure functions only. The router is FRR
(`flock.testbed.frr`): one eBGP session per node and family, and ECMP across
anycast replicas. This module maps FRR's answers (peer addresses) back to the
lab's node names and tells node prefixes, anycast and `addresses` routes apart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from flock.lab.topology import Topology
from flock.lab.view import RouteView, SessionView
from flock.testbed.frr import Neighbor


def neighbors(topo: Topology) -> list[Neighbor]:
    """One FRR neighbour per node and family the router speaks."""
    return [
        Neighbor(address=a.ip, asn=n.asn)
        for n in topo.nodes
        for a in n.uplink
        if topo.router.address(a.version) is not None
    ]


def connect_retry(topo: Topology, seconds: int = 1) -> list[str]:
    """FRR config lines: retry each node's session every `seconds`.

    BIRD waits its `connect delay time` (5 s) before its own first attempt, so
    a router that retries quickly brings sessions up ~1 s after the agents
    configure BIRD, instead of up to 5 s.
    """
    lines = [f"router bgp {topo.router.asn}"]
    lines += [f" neighbor {n.address} timers connect {seconds}" for n in neighbors(topo)]
    return [*lines, "exit", "!"]


def router_id(topo: Topology) -> str:
    if topo.router.router_id is not None:
        return str(topo.router.router_id)
    v4 = topo.router.address(4)
    return str(v4.ip) if v4 is not None else "10.255.0.1"


def node_by_address(topo: Topology) -> dict[str, str]:
    """Node name for each node LAN address (what FRR reports as peer / next hop)."""
    out = {}
    for n in topo.nodes:
        for a in n.uplink:
            out[str(a.ip)] = n.name
    return out


def parse_summary(topo: Topology, summary: Mapping[str, Any]) -> list[SessionView]:
    """`show bgp summary json` (all families) -> one SessionView per configured peer."""
    by_addr = node_by_address(topo)
    seen: dict[str, SessionView] = {}
    for afi_key, family in (("ipv6Unicast", "ipv6"), ("ipv4Unicast", "ipv4")):
        afi = summary.get(afi_key) or {}
        for addr, peer in (afi.get("peers") or {}).items():
            seen[addr] = SessionView(
                node=by_addr.get(addr, "?"),
                peer=addr,
                family=family,
                state=str(peer.get("state", "?")),
                prefixes_received=int(peer.get("pfxRcd", peer.get("prefixReceivedCount", 0)) or 0),
                uptime=str(peer.get("peerUptime", "")),
            )
    out = []
    for n in topo.nodes:
        for a in n.uplink:
            if topo.router.address(a.version) is None:
                continue
            family = "ipv6" if a.version == 6 else "ipv4"
            out.append(
                seen.get(
                    str(a.ip),
                    SessionView(node=n.name, peer=str(a.ip), family=family, state="(none)"),
                )
            )
    return out


def classify(topo: Topology, prefix: str) -> str:
    net = ipaddress.ip_network(prefix, strict=False)
    for n in topo.nodes:
        if net in n.cidrs:
            return "node prefix"
    for n in topo.nodes:
        for entry in n.allowed_addresses:
            if entry.cidr.version == net.version and net.subnet_of(entry.cidr):  # type: ignore[arg-type]
                return _claim_kind(topo, net)
    return "pod"


def _claim_kind(topo: Topology, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    ip = str(net.network_address)
    for p in topo.pods:
        if ip in p.annotation_ips("anycast"):
            return "anycast"
        if ip in p.annotation_ips("addresses"):
            return "addresses"
    return "claimed"


def parse_routes(topo: Topology, selected: Mapping[str, set[str]]) -> list[RouteView]:
    """bgpd's selected paths (prefix -> peers whose path is best or multipath) -> RouteViews.

    Next hops are named by the session they came from (the node's LAN address),
    which identifies the node even where the kernel's IPv6 next hop is the
    node's link-local address.
    """
    by_addr = node_by_address(topo)
    out = [
        RouteView(
            prefix=prefix,
            nexthops=sorted((peer, by_addr.get(peer, "")) for peer in peers),
            kind=classify(topo, prefix),
        )
        for prefix, peers in selected.items()
    ]
    return sorted(out, key=route_order)


def route_order(r: RouteView) -> tuple[int, int, int]:
    kinds = {"node prefix": 0, "anycast": 1, "addresses": 2}
    net = ipaddress.ip_network(r.prefix, strict=False)
    return (kinds.get(r.kind, 3), -net.version, int(net.network_address))
