"""`flock lab test`: what flock promises, checked from the router's side.

Sessions and learned routes come from FRR, reachability from pings in the
router's and the pods' namespaces, ECMP from the router kernel's own choice
of next hop per flow, and withdraw/restore from flipping a replica's
readiness and watching the router. Expected address families are derived from
the topology (node defaults and the pods' `ipv6`/`ipv4` annotations), not
from the agent's own annotation parser: an oracle must not be the code under
test.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import subprocess
import time

from flock.lab import router as lab_router
from flock.lab import state as lab_state
from flock.lab.core import ROUTE_TIMEOUT, Lab, LabError, Progress, _quiet
from flock.lab.inspect import agent_view
from flock.lab.pods import ready
from flock.lab.routes import learned, routes_missing, sessions_missing, wait
from flock.lab.state import PodRecord
from flock.lab.topology import (
    PodSpec,
    Topology,
)
from flock.lab.view import CheckResult
from flock.testbed import netns


def _ping(netns_name: str, address: str) -> tuple[bool, str]:
    """One ICMP echo from `netns_name`; (answered, "rtt 0.05 ms" or why not)."""
    fam = "-6" if ":" in address else "-4"
    r = netns.run(
        ["ping", fam, "-n", "-c", "1", "-W", "2", address],
        netns=netns_name,
        check=False,
        timeout=10,
    )
    m = re.search(r"time=([0-9.]+) ms", r.stdout)
    if r.returncode == 0 and m:
        return True, f"rtt {m.group(1)} ms"
    lines = (r.stdout + r.stderr).strip().splitlines()
    return False, lines[-1] if lines else f"ping exited {r.returncode}"


def run_checks(name: str, *, progress: Progress = _quiet) -> list[CheckResult]:
    lab = Lab.open(name)
    results: list[CheckResult] = []

    def record(check: str, ok: bool, detail: str = "") -> None:
        results.append(CheckResult(check, ok, detail))
        progress(f"{'PASS' if ok else 'FAIL'} {check}")

    # 0. every daemon the lab started is alive, and every agent answers
    dead = [
        f"{r.role} (pid {r.ident})"
        for r in lab.state.processes()
        if not lab_state.alive(int(r.ident), r.start_time)
    ]
    silent = []
    for node in lab.topo.nodes:
        if agent_view(lab, node.name, []) is None:
            silent.append(node.name)
    detail = f"{len(lab.state.processes())} processes, {len(lab.topo.nodes)} agents answer"
    if dead or silent:
        detail = "; ".join(
            ([f"dead: {', '.join(dead)}"] if dead else [])
            + ([f"agents not answering: {', '.join(silent)}"] if silent else [])
        )
    record("FRR, BIRDs and agents running", not dead and not silent, detail)

    # 1. sessions
    try:
        missing = sessions_missing(lab)
        n = len(lab_router.parse_summary(lab.topo, lab.vtysh("show bgp summary json")))
        record("BGP sessions Established", missing is None, missing or f"{n} sessions")
    except (LabError, subprocess.SubprocessError, ValueError) as e:
        record("BGP sessions Established", False, str(e))
        return results

    # 2. routes the router learned
    try:
        missing = routes_missing(lab)
        record(
            "router learned node prefixes, Ready anycast, addresses", missing is None, missing or ""
        )
    except (LabError, subprocess.SubprocessError, ValueError) as e:
        record("router learned routes", False, str(e))

    # 2b. every pod got an address of each family it asked for (node default + annotations)
    wrong = []
    for p in lab.topo.pods:
        rec = lab.state.pods.get(p.key)
        got = {ipaddress.ip_address(a).version for a in rec.addresses} if rec else set()
        want = _families(lab.topo, p)
        if got != want:
            wrong.append(f"{p.key} has IPv{sorted(got)} want IPv{sorted(want)}")
    record(
        "every pod has its address families",
        not wrong,
        "; ".join(wrong) or f"{len(lab.topo.pods)} pods",
    )

    # 3. reachability, both families, router -> every pod and pod -> pod across nodes
    #    (a family no pod has, or pods on one node only, has nothing to check)
    for fam in (6, 4):
        targets = [
            (k, a)
            for k, rec in lab.state.pods.items()
            for a in rec.addresses
            if ipaddress.ip_address(a).version == fam
        ]
        if targets:
            failed = [f"{k} {a}" for k, a in targets if not _ping(lab.router_ns, a)[0]]
            record(
                f"IPv{fam}: router reaches every pod",
                not failed,
                f"{len(targets) - len(failed)}/{len(targets)}"
                + (f"; failed: {', '.join(failed)}" if failed else ""),
            )
        pairs = _cross_node_pairs(lab, fam)
        if pairs:
            failed = [f"{a}->{b}" for a, b, addr, ns in pairs if not _ping(ns, addr)[0]]
            record(
                f"IPv{fam}: pod to pod across nodes",
                not failed,
                f"{len(pairs) - len(failed)}/{len(pairs)}"
                + (f"; failed: {', '.join(failed)}" if failed else ""),
            )

    # 4. ECMP and withdraw/restore, per anycast address
    for ip in sorted({ip for p in lab.topo.pods for ip in p.annotation_ips("anycast")}):
        results += _anycast_checks(lab, ip, progress)
    return results


def _families(topo: Topology, pod: PodSpec) -> set[int]:
    """The address families `pod` must have, from the topology alone.

    The pod's `ipv6`/`ipv4` annotation wins; otherwise the node's default,
    which the lab's NodeConfig sets to "on" exactly for the families the node
    has prefixes of. Deliberately not the agent's annotation parser: a check
    that asks the code under test what to expect proves nothing.
    """
    node = topo.node(pod.node)
    out = set()
    for version, cidrs in ((6, node.cidr6), (4, node.cidr4)):
        value = pod.annotations.get(f"flock.fritzlab.net/ipv{version}")
        want = value.strip().lower() == "true" if value is not None else bool(cidrs)
        if want:
            out.add(version)
    return out


def _cross_node_pairs(lab: Lab, fam: int) -> list[tuple[str, str, str, str]]:
    """(src pod, dst pod, dst address, src netns): first pod of each node to the next node's."""
    first: dict[str, PodRecord] = {}
    for rec in lab.state.pods.values():
        if any(ipaddress.ip_address(a).version == fam for a in rec.addresses):
            first.setdefault(rec.node, rec)
    recs = list(first.values())
    out = []
    for i, src in enumerate(recs):
        if len(recs) < 2:
            break
        dst = recs[(i + 1) % len(recs)]
        addr = next(a for a in dst.addresses if ipaddress.ip_address(a).version == fam)
        out.append((f"{src.namespace}/{src.name}", f"{dst.namespace}/{dst.name}", addr, src.netns))
    return out


def _anycast_checks(lab: Lab, ip: str, progress: Progress) -> list[CheckResult]:
    prefix = str(ipaddress.ip_network(ip))
    replicas = [p for p in lab.topo.pods if ip in p.annotation_ips("anycast")]
    ready_nodes = {p.node for p in replicas if p.ready}
    out: list[CheckResult] = []
    have = learned(lab).get(prefix, set())
    out.append(
        CheckResult(
            f"ECMP at router for {prefix}",
            have == ready_nodes and len(ready_nodes) >= 1,
            f"next hops {sorted(have)}; Ready replicas on {sorted(ready_nodes)}",
        )
    )
    ok, detail = _ping(lab.router_ns, ip)
    out.append(CheckResult(f"anycast {ip} answers", ok, detail))
    spread = _fib_spread(lab, ip)
    if len(ready_nodes) > 1:
        out.append(
            CheckResult(
                f"router kernel spreads flows to {ip}",
                set(spread) == ready_nodes,
                "64 flows: " + ", ".join(f"{n} {c}" for n, c in sorted(spread.items())),
            )
        )
    # A replica that is the only Ready one on its node: flipping it must move the router.
    per_node = {n: sum(p.node == n and p.ready for p in replicas) for n in ready_nodes}
    victim = next((p for p in replicas if p.ready and per_node[p.node] == 1), None)
    if victim is None:
        return out
    rest = ready_nodes - {victim.node}
    t0 = time.monotonic()
    ready(lab.name, victim.key, False)
    try:
        wait(
            f"{prefix} withdrawn from {victim.node}",
            ROUTE_TIMEOUT,
            lambda: None if learned(lab).get(prefix, set()) == rest else "still there",
        )
        took = time.monotonic() - t0
        out.append(
            CheckResult(
                f"withdraw {prefix} when {victim.name} is not Ready",
                True,
                f"router next hops {sorted(rest) or 'none'} after {took * 1000:.0f} ms",
            )
        )
    except LabError as e:
        out.append(CheckResult(f"withdraw {prefix} when {victim.name} is not Ready", False, str(e)))
    finally:
        t1 = time.monotonic()
        ready(lab.name, victim.key, True)
    try:
        wait(
            f"{prefix} restored",
            ROUTE_TIMEOUT,
            lambda: None if learned(lab).get(prefix, set()) == ready_nodes else "not yet",
        )
        out.append(
            CheckResult(
                f"restore {prefix} when {victim.name} is Ready again",
                True,
                f"after {(time.monotonic() - t1) * 1000:.0f} ms",
            )
        )
    except LabError as e:
        out.append(
            CheckResult(f"restore {prefix} when {victim.name} is Ready again", False, str(e))
        )
    return out


def _gateway_nodes(lab: Lab) -> dict[str, str]:
    """Node for every address the router's kernel may use as next hop (LAN and link-local)."""
    out = lab_router.node_by_address(lab.topo)
    for n in lab.topo.nodes:
        handle = lab.node(n.name)
        r = netns.run(
            ["ip", "-j", "-6", "addr", "show", "dev", handle.uplink, "scope", "link"],
            netns=handle.name,
            check=False,
        )
        with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
            for info in json.loads(r.stdout)[0]["addr_info"]:
                if "local" in info:  # `ip -j` leaves {} for addresses the filter hid
                    out[str(info["local"])] = n.name
    return out


def _fib_spread(lab: Lab, ip: str) -> dict[str, int]:
    """Node -> how many of 64 different UDP flows to `ip` the router's kernel sends there."""
    fam = "-6" if ":" in ip else "-4"
    nodes = _gateway_nodes(lab)
    spread: dict[str, int] = {}
    for sport in range(40000, 40064):
        r = netns.run(
            ["ip", "-j", fam, "route", "get", ip,
             "ipproto", "udp", "sport", str(sport), "dport", "53"],
            netns=lab.router_ns,
            check=False,
        )  # fmt: skip
        with contextlib.suppress(ValueError, IndexError, KeyError):
            gw = str(json.loads(r.stdout)[0]["gateway"])
            node = nodes.get(gw, gw)
            spread[node] = spread.get(node, 0) + 1
    return spread
