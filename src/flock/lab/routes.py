"""The router's view of the lab, and waiting for it to match the topology.

What the router learned is read from FRR itself (bgpd's selected paths), so
the lab never takes an agent's word for what it advertises.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import time
from collections.abc import Callable

from flock.lab import router as lab_router
from flock.lab.core import ROUTE_TIMEOUT, SESSION_TIMEOUT, Lab, LabError
from flock.lab.topology import (
    Topology,
)


def wait(what: str, timeout: float, probe: Callable[[], str | None]) -> None:
    """Poll `probe` (None = done, else what is still missing) until done or timeout."""
    deadline = time.monotonic() + timeout
    missing: str | None = "not checked"
    while time.monotonic() < deadline:
        with contextlib.suppress(LabError, subprocess.SubprocessError, ValueError):
            missing = probe()
            if missing is None:
                return
        time.sleep(0.02)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}: {missing}")


def sessions_missing(lab: Lab) -> str | None:
    sessions = lab_router.parse_summary(lab.topo, lab.vtysh("show bgp summary json"))
    down_ = [f"{s.node} {s.family} ({s.state})" for s in sessions if s.state != "Established"]
    return ", ".join(down_) or None


def wait_sessions(lab: Lab) -> None:
    wait("BGP sessions", SESSION_TIMEOUT, lambda: sessions_missing(lab))


def learned(lab: Lab) -> dict[str, set[str]]:
    """Prefix -> nodes whose path the router selected (best or ECMP multipath)."""
    by_addr = lab_router.node_by_address(lab.topo)
    return {
        prefix: {by_addr.get(peer, peer) for peer in peers}
        for prefix, peers in lab.selected_routes().items()
    }


def expected_routes(topo: Topology) -> dict[str, set[str]]:
    """What the router must have learned: node prefixes, Ready anycast, addresses IPs."""
    want: dict[str, set[str]] = {}
    for n in topo.nodes:
        for c in n.cidrs:
            want[str(c)] = {n.name}
    for p in topo.pods:
        for ip in p.annotation_ips("anycast"):
            net = str(ipaddress.ip_network(ip))
            want.setdefault(net, set())
            if p.ready:
                want[net].add(p.node)
        for ip in p.annotation_ips("addresses"):
            want[str(ipaddress.ip_network(ip))] = {p.node}
    return want


def routes_missing(lab: Lab) -> str | None:
    have = learned(lab)
    bad = []
    for prefix, nodes in expected_routes(lab.topo).items():
        got = have.get(prefix, set())
        if got != nodes:
            bad.append(f"{prefix} via {sorted(got) or 'nothing'} (want {sorted(nodes) or 'none'})")
    return "; ".join(bad) or None


def wait_routes(lab: Lab) -> None:
    wait("routes at the router", ROUTE_TIMEOUT, lambda: routes_missing(lab))


# ---------------------------------------------------------------------------------------


def converge(name: str, *, timeout: float = ROUTE_TIMEOUT) -> tuple[float, dict[str, set[str]]]:
    """Wait until the router's routes match the lab's pods and readiness.

    Returns the seconds it took and the router's view (prefix -> nodes).
    """
    lab = Lab.open(name)
    t0 = time.monotonic()
    wait("the router to converge", timeout, lambda: routes_missing(lab))
    return time.monotonic() - t0, learned(lab)
