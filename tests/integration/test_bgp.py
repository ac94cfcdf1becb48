"""BIRD driven by BirdController, peering with a real FRR router, judged from FRR's own view.

Topology (all namespaces prefixed `fb`, removed afterwards):

    pod ns ── node1 (BIRD) ──┐
                             ├── router (FRR: zebra, bgpd, bfdd)
              node2 (BIRD) ──┘

Each node peers with the router over IPv6 and IPv4 on its uplink. node1's IPv6
session uses a TCP MD5 password read from a file and BFD; node1's sessions use
a 30 s hold time so that BFD's 300 ms detection is clearly distinguishable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from flock.apply.bird import BirdController
from flock.model.nodeconfig import NodeConfig
from flock.testbed import netns
from flock.testbed.bird import BirdDaemon
from flock.testbed.frr import FrrRouter, Neighbor, router_config
from flock.testbed.wait import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("bird") is None or not Path("/usr/lib/frr/bgpd").exists(),
        reason="needs Debian bird2 and frr",
    ),
]

T = TypeVar("T")
N = ipaddress.ip_network
ROUTER_ASN = 65000
ANY6, ANY4 = "2001:db8:a::53/128", "198.51.100.53/32"
PASSWORD = "fl0ck-md5#secret"
HOLD, KEEPALIVE = 30, 10
WAIT = 60.0  # deadline for BGP to converge on a loaded machine (not an expectation)


@dataclass
class NodeEnv:
    index: int
    ns: str
    bird: BirdDaemon
    ctl: BirdController
    config: NodeConfig
    v6: str  # the node's uplink addresses (FRR's neighbour addresses)
    v4: str

    @property
    def cidr6(self) -> str:
        return str(self.config.spec.cidr6[0])

    @property
    def cidr4(self) -> str:
        return str(self.config.spec.cidr4[0])


@dataclass
class Lab:
    loop: asyncio.AbstractEventLoop
    router_ns: str
    router: FrrRouter
    nodes: list[NodeEnv]
    workdir: Path

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def export(self, node: NodeEnv, *prefixes: str) -> None:
        self.run(node.ctl.sync(node.config, {N(p) for p in prefixes}))

    def routes(self, version: int) -> dict[str, set[str]]:
        return self.router.bgp_routes(version)


def node_config(i: int, workdir: Path) -> NodeConfig:
    peer6: dict[str, Any] = {"address": f"2001:db8:{i}::1", "asn": ROUTER_ASN}
    peer4: dict[str, Any] = {"address": f"10.0.{i}.1", "asn": ROUTER_ASN}
    if i == 1:
        pw = workdir / "node1-peer.pw"
        pw.write_text(PASSWORD + "\n")
        peer6 |= {
            "passwordFile": str(pw),
            "bfd": {"minRx": 100, "minTx": 100, "multiplier": 3},
        }
        for p in (peer6, peer4):
            p |= {"holdTime": HOLD, "keepaliveTime": KEEPALIVE}
    return NodeConfig.from_object(
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": f"node{i}"},
            "spec": {
                "cidr6": [f"2001:db8:f00{i}::/64"],
                "cidr4": [f"10.1.{i}.0/24"],
                "allowedAddresses": [{"cidr": "2001:db8:a::/48"}, {"cidr": "198.51.100.0/24"}],
                "bgp": {"asn": 65100 + i, "peers": [peer6, peer4]},
            },
        }
    )


def no_dad(ns: str) -> None:
    """Link-local addresses usable at once: FRR will not open an IPv6 session before."""
    netns.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
    netns.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="fbbgp"))
    os.chmod(workdir, 0o755)
    made: list[str] = []
    birds: list[BirdDaemon] = []
    loop = asyncio.new_event_loop()
    router: FrrRouter | None = None
    ctls: list[BirdController] = []
    try:
        rns = netns.unique_name("fbr", 8)
        netns.create(rns, forwarding=True)
        made.append(rns)
        no_dad(rns)
        nodes: list[NodeEnv] = []
        neighbors: list[Neighbor] = []
        for i in (1, 2):
            ns = netns.unique_name(f"fbn{i}", 8)
            netns.create(ns, forwarding=True)
            made.append(ns)
            no_dad(ns)
            netns.veth(rns, f"r{i}", ns, "up0")
            netns.add_address(rns, f"r{i}", f"2001:db8:{i}::1/64")
            netns.add_address(rns, f"r{i}", f"10.0.{i}.1/24")
            netns.add_address(ns, "up0", f"2001:db8:{i}::2/64")
            netns.add_address(ns, "up0", f"10.0.{i}.2/24")
            netns.run(["ip", "-6", "route", "add", "default", "via", f"2001:db8:{i}::1"], netns=ns)
            netns.run(["ip", "-4", "route", "add", "default", "via", f"10.0.{i}.1"], netns=ns)
            timers = {"keepalive": KEEPALIVE, "hold": HOLD} if i == 1 else {}
            neighbors += [
                Neighbor(
                    ipaddress.ip_address(f"2001:db8:{i}::2"),
                    65100 + i,
                    bfd=i == 1,
                    password=PASSWORD if i == 1 else None,
                    **timers,
                ),
                Neighbor(ipaddress.ip_address(f"10.0.{i}.2"), 65100 + i, **timers),
            ]
        router = FrrRouter(rns, workdir / "router")
        router.start(
            router_config(
                asn=ROUTER_ASN, router_id=ipaddress.IPv4Address("10.0.0.254"), neighbors=neighbors
            )
        )
        # BIRD after FRR: its first connection attempt then finds a listener.
        for i, ns in ((1, made[1]), (2, made[2])):
            bird = BirdDaemon(ns, workdir / f"node{i}")
            bird.start()
            birds.append(bird)
            ctl = BirdController(
                config_path=bird.config_path, socket_path=bird.socket_path, netns=ns
            )
            ctls.append(ctl)
            cfg = node_config(i, workdir)
            nodes.append(NodeEnv(i, ns, bird, ctl, cfg, f"2001:db8:{i}::2", f"10.0.{i}.2"))
        env = Lab(loop, rns, router, nodes, workdir)
        for n in nodes:
            env.export(n)
        yield env
    finally:
        for ctl in ctls:
            loop.run_until_complete(ctl.close())
        loop.close()
        if router is not None:
            router.stop()
        for b in birds:
            b.stop()
        for ns in reversed(made):
            netns.delete(ns)
        shutil.rmtree(workdir, ignore_errors=True)


def all_established(lab: Lab, timeout: float = WAIT) -> None:
    want = {a for n in lab.nodes for a in (n.v6, n.v4)}
    wait_until(
        lab.router.neighbor_states,
        until=lambda s: all(s.get(a) == "Established" for a in want),
        timeout=timeout,
        what="all sessions Established",
    )


def test_sessions_established_and_aggregates_learned(lab: Lab) -> None:
    all_established(lab)
    r6 = wait_until(
        lambda: lab.routes(6), until=lambda r: len(r) >= 2, timeout=WAIT, what="v6 aggregates"
    )
    r4 = wait_until(
        lambda: lab.routes(4), until=lambda r: len(r) >= 2, timeout=WAIT, what="v4 aggregates"
    )
    for n in lab.nodes:
        assert r6[n.cidr6] == {n.v6}
        assert r4[n.cidr4] == {n.v4}
    # Nothing but the aggregates is exported while the export set is empty.
    assert set(r6) == {n.cidr6 for n in lab.nodes}
    assert set(r4) == {n.cidr4 for n in lab.nodes}
    # The controller sees the same sessions.
    for n in lab.nodes:
        sessions = lab.run(n.ctl.sessions())
        peers = {f"2001:db8:{n.index}::1": True, f"10.0.{n.index}.1": True}
        assert {str(a): s.established for a, s in sessions.items()} == peers
    # node1's IPv6 session is up with a TCP MD5 password that came from a file.
    assert "password" in (lab.nodes[0].bird.config_path.read_text())


def test_anycast_from_two_nodes_is_ecmp_and_withdraws_per_node(lab: Lab) -> None:
    all_established(lab)
    n1, n2 = lab.nodes
    for n in lab.nodes:
        lab.export(n, ANY6, ANY4)
    wait_until(
        lambda: lab.routes(6).get(ANY6),
        until=lambda p: p == {n1.v6, n2.v6},
        timeout=WAIT,
        what="v6 ECMP",
    )
    wait_until(
        lambda: lab.routes(4).get(ANY4),
        until=lambda p: p == {n1.v4, n2.v4},
        timeout=WAIT,
        what="v4 ECMP",
    )
    # zebra installed both next hops.
    hops6 = wait_until(
        lambda: lab.router.fib_nexthops(ANY6),
        until=lambda h: len(h) == 2,
        timeout=WAIT,
        what="FIB v6",
    )
    assert {ifname for _, ifname in hops6} == {"r1", "r2"}
    assert lab.router.fib_nexthops(ANY4) == {(n1.v4, "r1"), (n2.v4, "r2")}

    # node1's replica is no longer Ready: the agent's hot path is a delta.
    lab.run(n1.ctl.update(remove={N(ANY6), N(ANY4)}))
    wait_until(
        lambda: lab.routes(6).get(ANY6),
        until=lambda p: p == {n2.v6},
        timeout=WAIT,
        what="one v6 path",
    )
    wait_until(
        lambda: lab.routes(4).get(ANY4),
        until=lambda p: p == {n2.v4},
        timeout=WAIT,
        what="one v4 path",
    )
    lab.export(n2)
    wait_until(lambda: lab.routes(6), until=lambda r: ANY6 not in r, timeout=WAIT, what="v6 gone")
    wait_until(lambda: lab.routes(4), until=lambda r: ANY4 not in r, timeout=WAIT, what="v4 gone")
    assert lab.router.fib_nexthops(ANY6) == set()


def test_outside_aggregate_addresses_learned_as_host_routes(lab: Lab) -> None:
    all_established(lab)
    n1 = lab.nodes[0]
    lab.export(n1, "2001:db8:a::99/128", "198.51.100.99/32", "203.0.113.9/32")
    try:
        wait_until(
            lambda: lab.routes(6).get("2001:db8:a::99/128"),
            until=lambda p: p == {n1.v6},
            timeout=WAIT,
            what="/128",
        )
        wait_until(
            lambda: lab.routes(4).get("198.51.100.99/32"),
            until=lambda p: p == {n1.v4},
            timeout=WAIT,
            what="/32",
        )
        # Not in spec.allowedAddresses: refused by the controller, never seen by FRR.
        assert "203.0.113.9/32" not in lab.routes(4)
    finally:
        lab.export(n1)


def test_node_config_change_applies_without_dropping_sessions(lab: Lab) -> None:
    all_established(lab)
    n2 = lab.nodes[1]

    def dropped() -> dict[str, int]:
        data = lab.router.vtysh_json("show bgp neighbors json", daemon="bgpd") or {}
        return {a: int(data[a]["connectionsDropped"]) for a in (n2.v6, n2.v4)}

    before = dropped()
    extra = {
        "cidr6": [*map(str, n2.config.spec.cidr6), "2001:db8:f0f2::/64"],
        "allowedAddresses": [
            {"cidr": "2001:db8:a::/48"},
            {"cidr": "198.51.100.0/24"},
            {"cidr": "2001:db8:c::/48"},
        ],
    }
    obj = {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "node2"},
        "spec": n2.config.spec.model_dump(mode="json", by_alias=True, exclude_none=True) | extra,
    }
    changed = NodeConfig.from_object(obj)
    try:
        res = lab.run(n2.ctl.sync(changed, {N("2001:db8:c::1/128")}))
        assert res.configured and res.added == 1
        wait_until(
            lambda: lab.routes(6),
            until=lambda r: "2001:db8:f0f2::/64" in r and "2001:db8:c::1/128" in r,
            timeout=WAIT,
            what="new aggregate and newly allowed /128",
        )
        assert dropped() == before
        assert all(lab.router.neighbor_states()[a] == "Established" for a in (n2.v6, n2.v4))
    finally:
        lab.run(n2.ctl.sync(n2.config, set()))
    wait_until(
        lambda: lab.routes(6),
        until=lambda r: "2001:db8:f0f2::/64" not in r,
        timeout=WAIT,
        what="back",
    )
    assert dropped() == before


def test_stray_routes_in_the_export_table_never_reach_the_router(lab: Lab) -> None:
    """The export filter, not only the agent, decides: nothing else can leave."""
    all_established(lab)
    n1 = lab.nodes[0]
    table = str(n1.ctl.options.export_table)
    strays = [
        ["-4", "blackhole", "203.0.113.9/32", "proto", "241"],  # outside the allow-list
        ["-6", "blackhole", "2001:db8:a:1::/64", "proto", "241"],  # not a host route
        ["-6", "blackhole", "2001:db8:a::77/128", "proto", "99"],  # not our protocol
    ]
    for args in strays:
        netns.run(["ip", args[0], "route", "add", *args[1:], "table", table], netns=n1.ns)
    try:
        # A legitimate export after the strays: once FRR has it, BIRD has seen them all.
        lab.export(n1, "2001:db8:a::78/128")
        wait_until(
            lambda: lab.routes(6).get("2001:db8:a::78/128"),
            until=lambda p: bool(p),
            timeout=WAIT,
            what="control",
        )
        r6, r4 = lab.routes(6), lab.routes(4)
        assert "2001:db8:a:1::/64" not in r6 and "2001:db8:a::77/128" not in r6
        assert "203.0.113.9/32" not in r4
    finally:
        for args in strays:
            netns.run(
                ["ip", args[0], "route", "del", *args[1:], "table", table], netns=n1.ns, check=False
            )
        lab.export(n1)


def test_traffic_from_router_reaches_the_anycast_replica(lab: Lab) -> None:
    all_established(lab)
    n1 = lab.nodes[0]
    pod = netns.unique_name("fbp", 8)
    netns.create(pod)
    try:
        netns.veth(n1.ns, "fbpod0", pod, "eth0")
        netns.add_address(n1.ns, "fbpod0", "fd00:99::1/64")
        netns.add_address(n1.ns, "fbpod0", "10.99.0.1/24")
        netns.add_address(pod, "eth0", "fd00:99::2/64")
        netns.add_address(pod, "eth0", "10.99.0.2/24")
        netns.add_address(pod, "lo", ANY6)
        netns.add_address(pod, "lo", ANY4)
        netns.run(["ip", "-6", "route", "add", "default", "via", "fd00:99::1"], netns=pod)
        netns.run(["ip", "-4", "route", "add", "default", "via", "10.99.0.1"], netns=pod)
        netns.run(["ip", "-6", "route", "add", ANY6, "via", "fd00:99::2"], netns=n1.ns)
        netns.run(["ip", "-4", "route", "add", ANY4, "via", "10.99.0.2"], netns=n1.ns)
        lab.export(n1, ANY6, ANY4)
        wait_until(
            lambda: lab.router.fib_nexthops(ANY6),
            until=lambda h: len(h) == 1,
            timeout=WAIT,
            what="FIB v6",
        )
        wait_until(
            lambda: lab.router.fib_nexthops(ANY4),
            until=lambda h: h == {(n1.v4, "r1")},
            timeout=WAIT,
            what="FIB v4",
        )
        for ip in ("2001:db8:a::53", "198.51.100.53"):
            res = netns.run(["ping", "-c", "2", "-W", "10", ip], netns=lab.router_ns, check=False)
            assert res.returncode == 0, res.stdout + res.stderr
        # Withdrawn: the router has no route left, so the same ping fails.
        lab.export(n1)
        wait_until(
            lambda: lab.router.fib_nexthops(ANY6),
            until=lambda h: not h,
            timeout=WAIT,
            what="FIB v6 gone",
        )
        res = netns.run(
            ["ping", "-c", "1", "-W", "1", "2001:db8:a::53"], netns=lab.router_ns, check=False
        )
        assert res.returncode != 0
    finally:
        lab.export(n1)
        netns.delete(pod)
        netns.run(["ip", "link", "del", "fbpod0"], netns=n1.ns, check=False)


def test_bird_killed_and_restarted_gets_its_routes_back(lab: Lab) -> None:
    all_established(lab)
    n2 = lab.nodes[1]
    lab.export(n2, ANY6, ANY4)
    wait_until(
        lambda: lab.routes(6).get(ANY6),
        until=lambda p: p == {n2.v6},
        timeout=WAIT,
        what="anycast from node2",
    )
    assert lab.run(n2.ctl.check())

    n2.bird.kill()
    assert not lab.run(n2.ctl.healthy())
    assert not lab.run(n2.ctl.check())
    wait_until(
        lambda: lab.routes(6),
        until=lambda r: n2.cidr6 not in r,
        timeout=WAIT,
        what="node2 routes gone",
    )
    # The sidecar comes back with its config volume wiped: only the agent can restore it.
    n2.bird.config_path.unlink()
    n2.bird.start()
    assert lab.run(n2.ctl.healthy())
    assert lab.run(n2.ctl.check())  # notices the restart, restores config and exports
    r6 = wait_until(
        lambda: lab.routes(6),
        until=lambda r: r.get(n2.cidr6) == {n2.v6} and r.get(ANY6) == {n2.v6},
        timeout=WAIT,
        what="node2 back",
    )
    assert ANY6 in r6
    wait_until(
        lambda: lab.routes(4).get(ANY4), until=lambda p: p == {n2.v4}, timeout=WAIT, what="v4 back"
    )
    lab.export(n2)
    wait_until(
        lambda: lab.routes(6), until=lambda r: ANY6 not in r, timeout=WAIT, what="withdrawn again"
    )


def neighbor(lab: Lab, addr: str) -> dict[str, Any]:
    """FRR's own view of one BGP neighbour (state, counters, why it last reset)."""
    info = lab.router.vtysh_json(f"show bgp neighbors {addr} json", daemon="bgpd")[addr]
    assert isinstance(info, dict)
    return info


def md5_failures(*namespaces: str) -> int:
    """TCP segments the kernels dropped for a wrong MD5 signature (TcpExt TCPMD5Failure)."""
    total = 0
    for ns in namespaces:
        text = netns.run(["cat", "/proc/net/netstat"], netns=ns).stdout
        names, values = (ln.split()[1:] for ln in text.splitlines() if ln.startswith("TcpExt:"))
        total += int(dict(zip(names, values, strict=True))["TCPMD5Failure"])
    return total


def test_bfd_drops_routes_within_detection_time_not_hold_time(lab: Lab) -> None:
    import time

    all_established(lab)
    n1 = lab.nodes[0]
    wait_until(
        lab.router.bfd_peers, until=lambda p: p.get(n1.v6) == "up", timeout=WAIT, what="BFD up"
    )
    # Cut the uplink without a carrier change: drop everything node1 sends.
    netns.run(["nft", "add", "table", "inet", "fbcut"], netns=n1.ns)
    chain = "{ type filter hook output priority 0; policy drop; }"
    netns.run(["nft", "add", "chain", "inet", "fbcut", "out", chain], netns=n1.ns)
    t0 = time.monotonic()
    try:
        wait_until(
            lambda: lab.routes(6),
            until=lambda r: n1.cidr6 not in r,
            timeout=WAIT,
            what="node1 v6 gone",
        )
        elapsed = time.monotonic() - t0
        print(f"BFD: node1's IPv6 routes gone from FRR {elapsed:.2f}s after the cut")
        # Why FRR dropped the session, in its own words: BFD, not the hold timer (a bound
        # on the elapsed time was a wall-clock bound that a loaded machine can miss).
        # FRR sends Cease with subcode 10, "BFD Down" (RFC 9384), when BFD took it down.
        info = neighbor(lab, n1.v6)
        assert info.get("lastNotificationReason") == "Cease/BFD Down", info
        assert info.get("lastErrorCodeSubcode") == "060A", info
    finally:
        netns.run(["nft", "delete", "table", "inet", "fbcut"], netns=n1.ns, check=False)
    all_established(lab, timeout=90)


def test_wrong_md5_password_keeps_the_session_down(lab: Lab) -> None:
    all_established(lab)
    n1 = lab.nodes[0]
    pw = Path(n1.config.spec.bgp.peers[0].password_file or "")  # type: ignore[union-attr]
    established = neighbor(lab, n1.v6)["connectionsEstablished"]
    failures = md5_failures(lab.router_ns, n1.ns)
    pw.write_text("not-the-password\n")
    try:
        lab.run(n1.ctl.restore())  # re-reads the password, configures: the session restarts
        wait_until(
            lab.router.neighbor_states,
            until=lambda s: s.get(n1.v6) != "Established",
            timeout=WAIT,
            what="session down",
        )
        # Proof that the password is what keeps it down (not "not up yet"): the peers'
        # next connection attempt is dropped by a kernel for its MD5 signature, and FRR
        # has established no session since.
        wait_until(
            lambda: md5_failures(lab.router_ns, n1.ns),
            until=lambda n: n > failures,
            timeout=WAIT,
            what="a TCP segment dropped for its MD5 signature",
        )
        info = neighbor(lab, n1.v6)
        assert info["bgpState"] != "Established", info
        assert info["connectionsEstablished"] == established, info
    finally:
        pw.write_text(PASSWORD + "\n")
        lab.run(n1.ctl.restore())
    all_established(lab, timeout=60)


# ---- the controller against BIRD alone: the export table and BIRD's view follow sync/update.


def _bird_routes(ctl: BirdController, loop: asyncio.AbstractEventLoop) -> dict[int, int]:
    return loop.run_until_complete(ctl.exported_count())


def test_controller_table_follows_sync_update_allow_list_and_agent_restart() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fbctl"))
    ns = netns.unique_name("fbc", 8)
    netns.create(ns)
    loop = asyncio.new_event_loop()
    bird = BirdDaemon(ns, workdir)
    ctl = ctl2 = None
    try:
        bird.start()
        ctl = BirdController(config_path=bird.config_path, socket_path=bird.socket_path, netns=ns)
        cfg = node_config(2, workdir)
        many = {N(f"2001:db8:a::{i:x}/128") for i in range(1, 601)} | {N("198.51.100.7/32")}
        res = loop.run_until_complete(ctl.sync(cfg, many | {N("203.0.113.1/32")}))
        assert res.rejected == [N("203.0.113.1/32")] and res.added == 601 and res.configured
        assert ctl.table.dump() == many
        wait_until(
            lambda: _bird_routes(ctl, loop),
            until=lambda c: c == {6: 600, 4: 1},
            timeout=WAIT,
            what="BIRD learned",
        )

        one = N("2001:db8:a::1/128")
        res = loop.run_until_complete(ctl.update(remove={one}))
        assert res.removed == 1 and not res.configured and one not in ctl.table.dump()
        res = loop.run_until_complete(ctl.update(remove={one}))  # already gone: a no-op
        assert res.removed == 0
        loop.run_until_complete(ctl.update(add={one, N("2001:db8:b::1/128")}))
        assert one in ctl.table.dump() and N("2001:db8:b::1/128") not in ctl.table.dump()

        # The operator narrows the allow-list: what it no longer covers is withdrawn.
        spec = cfg.spec.model_copy(update={"allowed_addresses": cfg.spec.allowed_addresses[:1]})
        narrowed = cfg.model_copy(update={"spec": spec})
        res = loop.run_until_complete(ctl.sync(narrowed, many))
        assert res.rejected == [N("198.51.100.7/32")] and res.configured
        assert ctl.table.dump() == many - {N("198.51.100.7/32")}
        wait_until(
            lambda: _bird_routes(ctl, loop),
            until=lambda c: c == {6: 600, 4: 0},
            timeout=WAIT,
            what="v4 gone",
        )

        # BIRD down while the NodeConfig changes: the table is still updated, and the
        # configure that failed is retried by the next sync.
        from flock.apply.bird import BirdUnavailable

        bird.stop()
        with pytest.raises(BirdUnavailable):
            loop.run_until_complete(ctl.sync(cfg, many))
        assert N("198.51.100.7/32") in ctl.table.dump()
        bird.start()
        res = loop.run_until_complete(ctl.sync(cfg, many))
        assert res.configured and res.added == 0
        res = loop.run_until_complete(ctl.sync(narrowed, many))
        assert res.configured and ctl.table.dump() == many - {N("198.51.100.7/32")}

        # A new agent (restart) with a smaller desired set removes what it no longer wants.
        ctl2 = BirdController(config_path=bird.config_path, socket_path=bird.socket_path, netns=ns)
        keep = {one}
        res = loop.run_until_complete(ctl2.sync(narrowed, keep))
        assert res.removed == 599 and ctl2.table.dump() == keep
        wait_until(
            lambda: _bird_routes(ctl2, loop),
            until=lambda c: c[6] == 1,
            timeout=WAIT,
            what="BIRD follows",
        )
    finally:
        for c in (ctl, ctl2):
            if c is not None:
                loop.run_until_complete(c.close())
        loop.close()
        bird.stop()
        netns.delete(ns)
        shutil.rmtree(workdir, ignore_errors=True)


def test_ipv4_prefixes_ride_the_ipv6_session_when_there_is_no_ipv4_peer() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="fbenh"))
    os.chmod(workdir, 0o755)
    rns, nns = netns.unique_name("fbr", 8), netns.unique_name("fbn", 8)
    made: list[str] = []
    loop = asyncio.new_event_loop()
    router = FrrRouter(rns, workdir / "router")
    bird = BirdDaemon(nns, workdir / "node")
    ctl: BirdController | None = None
    try:
        for ns in (rns, nns):
            netns.create(ns, forwarding=True)
            made.append(ns)
            no_dad(ns)
        netns.veth(rns, "r1", nns, "up0")
        netns.add_address(rns, "r1", "2001:db8:9::1/64")
        netns.add_address(nns, "up0", "2001:db8:9::2/64")
        router.start(
            router_config(
                asn=ROUTER_ASN,
                router_id=ipaddress.IPv4Address("10.0.0.254"),
                neighbors=[
                    Neighbor(ipaddress.ip_address("2001:db8:9::2"), 65109, ipv4_over_ipv6=True)
                ],
            )
        )
        bird.start()
        ctl = BirdController(config_path=bird.config_path, socket_path=bird.socket_path, netns=nns)
        cfg = NodeConfig.from_object(
            {
                "apiVersion": "flock.fritzlab.net/v1alpha1",
                "kind": "NodeConfig",
                "metadata": {"name": "node9"},
                "spec": {
                    "cidr6": ["2001:db8:f009::/64"],
                    "cidr4": ["10.1.9.0/24"],
                    "allowedAddresses": [{"cidr": "198.51.100.0/24"}],
                    "bgp": {"asn": 65109, "peers": [{"address": "2001:db8:9::1", "asn": 65000}]},
                },
            }
        )
        loop.run_until_complete(ctl.sync(cfg, {N(ANY4)}))
        r4 = wait_until(
            lambda: router.bgp_routes(4),
            until=lambda r: r.get("10.1.9.0/24") == {"2001:db8:9::2"} and ANY4 in r,
            timeout=WAIT,
            what="IPv4 over the IPv6 session",
        )
        assert r4[ANY4] == {"2001:db8:9::2"}
        assert router.bgp_routes(6).get("2001:db8:f009::/64") == {"2001:db8:9::2"}
        # zebra installs the IPv4 route via the node's IPv6 next hop on r1.
        hops = wait_until(
            lambda: router.fib_nexthops("10.1.9.0/24"),
            until=lambda h: bool(h),
            timeout=WAIT,
            what="FIB",
        )
        assert {ifname for _, ifname in hops} == {"r1"}
    finally:
        if ctl is not None:
            loop.run_until_complete(ctl.close())
        loop.close()
        router.stop()
        bird.stop()
        for ns in reversed(made):
            netns.delete(ns)
        shutil.rmtree(workdir, ignore_errors=True)
