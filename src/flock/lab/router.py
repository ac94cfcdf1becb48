"""The lab's upstream router: its FRR config, and reading FRR's JSON back into lab terms.

Pure functions only. The config makes FRR behave like the operator's router
in SPEC §8: one eBGP session per node and family, no policy required (the lab
trusts its nodes), and ECMP across anycast replicas. Replicas sit on nodes
with different ASNs, so their AS paths differ; `as-path multipath-relax` is
what lets FRR install them as one multipath route.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from flock.lab.topology import Topology
from flock.lab.view import RouteView, SessionView

MAXIMUM_PATHS = 16


def router_id(topo: Topology) -> str:
    if topo.router.router_id is not None:
        return str(topo.router.router_id)
    v4 = topo.router.address(4)
    return str(v4.ip) if v4 is not None else "10.255.0.1"


def frr_config(topo: Topology, *, log_file: str | None = None) -> str:
    """The whole frr.conf for the lab router (bgpd + zebra read the same file)."""
    r = topo.router
    lines = [
        "frr defaults datacenter",
        f"hostname {r.name}",
    ]
    if log_file:
        lines.append(f"log file {log_file}")
    lines += ["!", f"router bgp {r.asn}", f" bgp router-id {router_id(topo)}"]
    lines += [
        " no bgp ebgp-requires-policy",
        " no bgp default ipv4-unicast",
        " no bgp network import-check",
        " bgp bestpath as-path multipath-relax",
    ]
    per_family: dict[int, list[str]] = {6: [], 4: []}
    for n in topo.nodes:
        for a in n.uplink:
            if r.address(a.version) is None:
                continue
            lines.append(f" neighbor {a.ip} remote-as {n.asn}")
            lines.append(f" neighbor {a.ip} description {n.name}")
            lines.append(f" neighbor {a.ip} timers connect 1")
            per_family[a.version].append(str(a.ip))
    for version, afi in ((6, "ipv6"), (4, "ipv4")):
        if not per_family[version]:
            continue
        lines.append(f" address-family {afi} unicast")
        lines.append(f"  maximum-paths {MAXIMUM_PATHS}")
        for ip in per_family[version]:
            lines.append(f"  neighbor {ip} activate")
        lines.append(" exit-address-family")
    lines += ["exit", "!", ""]
    return "\n".join(lines)


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


def parse_routes(topo: Topology, table: Mapping[str, Any]) -> list[RouteView]:
    """`show ip[v6] route bgp json` -> prefix with its installed (FIB) next hops.

    Uses the route the kernel has (`installed`/`fib` next hops), which is what
    forwarding does, not merely what BGP knows.
    """
    by_addr = node_by_address(topo)
    out = []
    for prefix, entries in table.items():
        hops: list[tuple[str, str]] = []
        for entry in entries:
            if entry.get("protocol") != "bgp" or not entry.get("selected"):
                continue
            for nh in entry.get("nexthops") or []:
                if not nh.get("active", True):
                    continue
                addr = str(nh.get("ip", ""))
                if addr and (addr, by_addr.get(addr, "")) not in hops:
                    hops.append((addr, by_addr.get(addr, "")))
        out.append(RouteView(prefix=prefix, nexthops=sorted(hops), kind=classify(topo, prefix)))
    return sorted(out, key=_route_order)


def _route_order(r: RouteView) -> tuple[int, int, int]:
    kinds = {"node prefix": 0, "anycast": 1, "addresses": 2}
    net = ipaddress.ip_network(r.prefix, strict=False)
    return (kinds.get(r.kind, 3), -net.version, int(net.network_address))
