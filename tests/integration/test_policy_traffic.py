"""NetworkPolicy enforced by the real kernel, probed with real connections.

Topology (all namespaces prefixed `fn`, removed afterwards):

    node1 (fnN1…)  ─── router link fd51::/64, 10.51.0.0/30 ───  node2 (fnN2…)
      alpha/web  alpha/cli  beta/cli                        alpha/db  beta/web  ext1  ext2

Pods are wired by flock's own datapath (veth, /128 + /32, proxy-ARP); `ext1` and
`ext2` are wired the same way but are not pods, so to the policy they are outside
addresses (ipBlock targets). Each pod runs a small TCP+UDP server on every probed
port (dual-stack sockets). For each case the policy engine syncs both nodes'
`inet flock` tables, then every endpoint probes every other endpoint on the
case's ports, TCP and UDP, IPv4 and IPv6, and the result is compared with the
case's truth table (a closed-form rule written from the Kubernetes semantics).
A cell is reachable when the echo came back and blocked only when nothing came
back (a drop); a refused connection is neither (a dead echo server must not turn
expected-blocked cells green).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from echo import ECHO_SERVER, PROBE

from flock.apply.datapath import Datapath, PodNetSpec
from flock.apply.nft import NftCli, PolicyEngine, table_text
from flock.compile.policy import LocalPod, PolicyInputs
from flock.model.pod import ContainerPort, Namespace, Pod
from flock.model.policy import AnyPolicy, NetworkPolicy, RejectedPolicy, parse_policy
from flock.testbed import netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "fn"
SERVED = (80, 1500, 2500, 5353, 8080, 8081, 9090)
TIMEOUT = 0.8  # no answer within this: dropped (only a timeout is a blocked cell)
ECHO_TIMEOUT = 30.0  # once connected, the echo may be slow on a loaded machine


@dataclass
class Endpoint:
    name: str
    node: int  # 0 or 1
    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address
    namespace: str | None = None  # Kubernetes namespace; None: not a pod
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[ContainerPort, ...] = ()
    netns: str = ""
    host_ifname: str = ""

    def pod(self) -> Pod:
        assert self.namespace is not None
        return Pod(
            namespace=self.namespace,
            name=self.name.split("/")[-1],
            labels=dict(self.labels),
            container_ports=self.ports,
            ips=(self.v6, self.v4),
        )

    def named(self, name: str, proto: str = "TCP") -> int | None:
        return next((p.port for p in self.ports if p.name == name and p.protocol == proto), None)


def _ep(
    name: str,
    node: int,
    n: int,
    ns: str | None,
    labels: Mapping[str, str] = {},
    ports: Sequence[ContainerPort] = (),
) -> Endpoint:
    base4 = "203.0.113" if ns is None else f"10.51.{node + 1}"
    base6 = "2001:db8:e:" if ns is None else f"fd51:{node + 1}:"
    return Endpoint(
        name=name,
        node=node,
        v4=ipaddress.IPv4Address(f"{base4}.{n}"),
        v6=ipaddress.IPv6Address(f"{base6}:{n}"),
        namespace=ns,
        labels=labels,
        ports=tuple(ports),
    )


def endpoints() -> list[Endpoint]:
    return [
        _ep("alpha/web", 0, 1, "alpha", {"app": "web"},
            [ContainerPort(8080, "TCP", "http"), ContainerPort(5353, "UDP", "dns")]),
        _ep("alpha/cli", 0, 2, "alpha", {"app": "cli"}),
        _ep("beta/cli", 0, 3, "beta", {"app": "cli"}),
        _ep("alpha/db", 1, 4, "alpha", {"app": "db"}, [ContainerPort(9090, "TCP", "http")]),
        _ep("beta/web", 1, 5, "beta", {"app": "web"}, [ContainerPort(8081, "TCP", "http")]),
        _ep("ext1", 1, 10, None),
        _ep("ext2", 1, 11, None),
    ]  # fmt: skip


NAMESPACES = {
    "alpha": Namespace.from_object({"metadata": {"name": "alpha", "labels": {"team": "red"}}}),
    "beta": Namespace.from_object({"metadata": {"name": "beta", "labels": {"team": "blue"}}}),
}


class Cluster:
    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.made: list[str] = []
        self.servers: list[subprocess.Popen[str]] = []
        self.eps = endpoints()
        self.engines: list[PolicyEngine] = []

    def ns(self, tag: str) -> str:
        name = netns.unique_name(f"{PREFIX}{tag}", 8)
        netns.create(name)
        self.made.append(name)
        return name

    def up(self) -> None:
        self.nodes = [self.ns("N1"), self.ns("N2")]
        n1, n2 = self.nodes
        for node in self.nodes:  # no DAD on the router link: usable at once
            netns.sysctl(node, "net.ipv6.conf.default.accept_dad", "0")
        netns.veth(n1, "fnr0", n2, "fnr0")
        for i, node in enumerate(self.nodes):
            netns.add_address(node, "fnr0", f"fd51::{i + 1}/64")
            netns.add_address(node, "fnr0", f"10.51.0.{i + 1}/30")
        # each node routes the other's pods (and node2 the outside hosts) over the link
        netns.run(["ip", "route", "add", "10.51.2.0/24", "via", "10.51.0.2"], netns=n1)
        netns.run(["ip", "route", "add", "203.0.113.0/24", "via", "10.51.0.2"], netns=n1)
        netns.run(["ip", "-6", "route", "add", "fd51:2::/64", "via", "fd51::2"], netns=n1)
        netns.run(["ip", "-6", "route", "add", "2001:db8:e::/64", "via", "fd51::2"], netns=n1)
        netns.run(["ip", "route", "add", "10.51.1.0/24", "via", "10.51.0.1"], netns=n2)
        netns.run(["ip", "-6", "route", "add", "fd51:1::/64", "via", "fd51::1"], netns=n2)
        dps = [Datapath(host_netns=netns.path(n)) for n in self.nodes]
        for i, ep in enumerate(self.eps):
            ep.netns = self.ns("p")
            res = dps[ep.node].setup_pod(
                PodNetSpec(
                    container_id=f"fntest{i}",
                    netns=netns.path(ep.netns),
                    v6=ep.v6,
                    v4=ep.v4,
                )
            )
            ep.host_ifname = res.host_ifname
        for dp in dps:
            dp.close()
        for ep in self.eps:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ep.netns, sys.executable, "-c", ECHO_SERVER]
                + [str(p) for p in SERVED],
                stdout=subprocess.PIPE,
                text=True,
            )
            self.servers.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.engines = [PolicyEngine(NftCli(netns=n)) for n in self.nodes]

    def down(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
        for name in reversed(self.made):
            netns.delete(name)

    def by_name(self, name: str) -> Endpoint:
        return next(e for e in self.eps if e.name == name)

    def inputs(self, node: int, policies: Sequence[AnyPolicy]) -> PolicyInputs:
        pods = [e.pod() for e in self.eps if e.namespace]
        local = [
            LocalPod(e.pod(), e.host_ifname, (e.v6, e.v4))
            for e in self.eps
            if e.namespace and e.node == node
        ]
        return PolicyInputs(local_pods=local, pods=pods, namespaces=NAMESPACES, policies=policies)

    def apply(self, policies: Sequence[AnyPolicy]) -> None:
        for i, eng in enumerate(self.engines):
            eng.sync(self.inputs(i, policies))

    def probe(
        self, src: Endpoint, items: Sequence[tuple[str, str, int]], timeout: float = TIMEOUT
    ) -> list[str]:
        """One try per item: "ok", "timeout" (dropped) or what went wrong (echo.PROBE)."""
        argv = [sys.executable, "-c", PROBE, str(timeout), str(ECHO_TIMEOUT)]
        out = subprocess.run(
            ["ip", "netns", "exec", src.netns, *argv],
            input=json.dumps(items),
            capture_output=True,
            text=True,
            timeout=ECHO_TIMEOUT + 60,
        )
        assert out.returncode == 0, out.stderr
        return [str(x) for x in json.loads(out.stdout)]


Expect = Callable[[Endpoint, Endpoint, str, int], bool]


def check_truth_table(cluster: Cluster, ports: Sequence[int], expect: Expect) -> None:
    jobs: list[tuple[Endpoint, list[tuple[Endpoint, str, str, int]]]] = []
    for src in cluster.eps:
        cells = [
            (dst, str(addr), proto, port)
            for dst in cluster.eps
            if dst is not src
            for addr in (dst.v4, dst.v6)
            for proto in ("tcp", "udp")
            for port in ports
        ]
        jobs.append((src, cells))

    def run(job: tuple[Endpoint, list[tuple[Endpoint, str, str, int]]]) -> list[str]:
        src, cells = job
        got = cluster.probe(src, [(a, p, n) for _, a, p, n in cells])
        # A reply is proof of reachability; a missing one may be a loaded machine.
        # Cells that should pass but did not get one more, slower, chance.
        retry = [i for i, c in enumerate(cells) if got[i] != "ok" and expect(src, c[0], c[2], c[3])]
        if retry:
            again = cluster.probe(src, [cells[i][1:] for i in retry], timeout=3 * TIMEOUT)
            for i, res in zip(retry, again, strict=True):
                got[i] = res
        bad = []
        for (dst, addr, proto, port), res in zip(cells, got, strict=True):
            want = "ok" if expect(src, dst, proto, port) else "timeout"
            if res != want:
                bad.append(
                    f"{src.name} -> {dst.name} [{addr}] {proto}/{port}: got {res}, want {want}"
                )
        return bad

    with ThreadPoolExecutor(max_workers=len(jobs)) as ex:
        mismatches = [m for part in ex.map(run, jobs) for m in part]
    allowed = [expect(s, d, p, n) for s, cells in jobs for d, _, p, n in cells]
    assert any(allowed), "a truth table with nothing allowed proves little"
    assert not mismatches, "\n".join(mismatches)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        c.up()
        yield c
    finally:
        c.down()


@pytest.fixture
def fresh(cluster: Cluster) -> Iterator[Cluster]:
    cluster.apply([])
    yield cluster
    cluster.apply([])


def P(ns: str, name: str, spec: Mapping[str, Any]) -> NetworkPolicy:
    return NetworkPolicy.from_object({"metadata": {"namespace": ns, "name": name}, "spec": spec})


def is_(ep: Endpoint, name: str) -> bool:
    return ep.name == name


# ---------------------------------------------------------------------------
# Cases


def test_no_policy_everyone_reaches_everyone(fresh: Cluster) -> None:
    for node in fresh.nodes:
        text = table_text(NftCli(netns=node)) or ""
        assert "ct state" not in text  # no policy, no conntrack
    check_truth_table(fresh, [80], lambda s, d, p, n: True)


def test_probe_tells_a_drop_from_a_refusal(fresh: Cluster) -> None:
    """Only a drop is a blocked cell: a port nobody listens on is refused (TCP reset,
    ICMP port unreachable for UDP) and the probe says so, so a dead echo server fails
    an expected-blocked cell instead of passing it (the probe once said False to both)."""
    cli, web = fresh.by_name("beta/cli"), fresh.by_name("alpha/web")
    closed = 7  # not in SERVED: nothing listens there
    items = [(str(web.v6), "tcp", closed), (str(web.v4), "udp", closed)]
    assert fresh.probe(cli, items) == ["ConnectionRefusedError"] * 2
    fresh.apply([P("alpha", "deny", {"podSelector": {}})])
    assert fresh.probe(cli, items) == ["timeout"] * 2


def test_deny_all_ingress(fresh: Cluster) -> None:
    fresh.apply([P("alpha", "deny", {"podSelector": {}})])
    check_truth_table(fresh, [80], lambda s, d, p, n: d.namespace != "alpha")


def test_deny_all_egress(fresh: Cluster) -> None:
    fresh.apply([P("beta", "deny", {"podSelector": {}, "policyTypes": ["Egress"]})])
    check_truth_table(fresh, [80], lambda s, d, p, n: s.namespace != "beta")


def test_allow_from_namespace(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "alpha",
                "from-blue",
                {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}
                    ],
                },
            )
        ]
    )
    check_truth_table(
        fresh, [80], lambda s, d, p, n: not is_(d, "alpha/web") or s.namespace == "beta"
    )


def test_allow_from_pod_in_namespace(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "alpha",
                "from-beta-cli",
                {
                    "podSelector": {"matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["db", "web"]}]},
                    "ingress": [
                        {
                            "from": [
                                {
                                    "namespaceSelector": {"matchLabels": {"team": "blue"}},
                                    "podSelector": {"matchLabels": {"app": "cli"}},
                                }
                            ]
                        }
                    ],
                },
            )
        ]
    )  # fmt: skip
    check_truth_table(
        fresh,
        [80],
        lambda s, d, p, n: d.name not in ("alpha/web", "alpha/db") or is_(s, "beta/cli"),
    )


def test_named_port_means_different_numbers_on_different_pods(fresh: Cluster) -> None:
    ports = [{"port": "http"}, {"port": "dns", "protocol": "UDP"}]
    spec = {"podSelector": {}, "ingress": [{"ports": ports}]}
    fresh.apply([P("alpha", "http", spec), P("beta", "http", spec)])

    def expect(s: Endpoint, d: Endpoint, proto: str, port: int) -> bool:
        if d.namespace is None:
            return True
        return port == d.named("http" if proto == "tcp" else "dns", proto.upper())

    check_truth_table(fresh, [5353, 8080, 8081, 9090], expect)


def test_named_port_in_egress_resolves_per_destination(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "alpha",
                "cli-out",
                {
                    "podSelector": {"matchLabels": {"app": "cli"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}],
                },
            )
        ]
    )

    def expect(s: Endpoint, d: Endpoint, proto: str, port: int) -> bool:
        if not is_(s, "alpha/cli"):
            return True
        return d.namespace is not None and proto == "tcp" and port == d.named("http")

    check_truth_table(fresh, [8080, 8081, 9090], expect)


def test_end_port_range(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "beta",
                "range",
                {
                    "podSelector": {},
                    "ingress": [{"ports": [{"protocol": "UDP", "port": 1000, "endPort": 2000}]}],
                },
            )
        ]
    )
    check_truth_table(
        fresh,
        [80, 1500, 2500],
        lambda s, d, p, n: d.namespace != "beta" or (p == "udp" and 1000 <= n <= 2000),
    )


def test_egress_to_ipblock_with_except(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "alpha",
                "out",
                {
                    "podSelector": {"matchLabels": {"app": "cli"}},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {
                            "to": [
                                {"ipBlock": {"cidr": "203.0.113.0/24",
                                             "except": ["203.0.113.11/32"]}},
                                {"ipBlock": {"cidr": "2001:db8:e::/64",
                                             "except": ["2001:db8:e::11/128"]}},
                            ]
                        }
                    ],
                },
            )
        ]
    )  # fmt: skip
    check_truth_table(fresh, [80], lambda s, d, p, n: not is_(s, "alpha/cli") or is_(d, "ext1"))


def test_same_node_checks_sender_egress_and_receiver_ingress(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "alpha",
                "cli-to-web",
                {
                    "podSelector": {"matchLabels": {"app": "cli"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
                },
            ),
            P(
                "alpha",
                "web-80-from-cli",
                {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [
                        {
                            "from": [{"podSelector": {"matchLabels": {"app": "cli"}}}],
                            "ports": [{"port": 80}, {"port": 80, "protocol": "UDP"}],
                        }
                    ],
                },
            ),
        ]
    )

    def expect(s: Endpoint, d: Endpoint, proto: str, port: int) -> bool:
        if is_(s, "alpha/cli") and not is_(d, "alpha/web"):
            return False
        if is_(d, "alpha/web"):
            return is_(s, "alpha/cli") and port == 80
        return True

    check_truth_table(fresh, [80, 8080], expect)


def test_sctp_rules_load_and_do_not_open_tcp_or_udp(fresh: Cluster) -> None:
    fresh.apply(
        [
            P(
                "beta",
                "sctp",
                {"podSelector": {}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}]},
            )
        ]
    )
    text = table_text(NftCli(netns=fresh.nodes[1])) or ""
    assert "sctp dport 80 accept" in text
    check_truth_table(fresh, [80], lambda s, d, p, n: d.namespace != "beta")


# Each line on stdin is a timeout for one request: "ok", "timeout" (dropped: nothing
# came back in time) or the error's name (a reset or refusal is not a drop).
TALKER = textwrap.dedent(
    """
    import socket, sys
    s = socket.create_connection((sys.argv[1], 80), timeout=30)
    for line in sys.stdin:
        s.settimeout(float(line))
        try:
            s.send(b"x"); res = "ok" if s.recv(16) == b"ok:x" else "bad-reply"
        except socket.timeout:
            res = "timeout"
        except OSError as e:
            res = type(e).__name__
        print(res, flush=True)
    """
)


class Talker:
    """A TCP connection from `src` to `dst`:80 kept open; `ask()` sends one request."""

    def __init__(self, src: Endpoint, dst: Endpoint) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", src.netns, sys.executable, "-c", TALKER, str(dst.v6)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, timeout: float = ECHO_TIMEOUT) -> str:
        """One request; `timeout` is how long no answer takes to count as a drop."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{timeout}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)


def test_policy_added_and_removed_while_a_connection_is_open(fresh: Cluster) -> None:
    """A connection opened while a policy allowed it survives a deny being added
    (conntrack: replies and further packets of allowed connections pass); new
    connections are refused; after the deny is removed they work again."""
    web = fresh.by_name("alpha/web")
    cli = fresh.by_name("beta/cli")
    allow = P("alpha", "allow-80", {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})
    deny = P("alpha", "deny", {"podSelector": {}})
    fresh.apply([allow])
    talk = Talker(cli, web)
    try:
        assert talk.ask() == "ok"
        fresh.apply([deny])  # the allow is gone, deny-all remains
        assert talk.ask() == "ok", "an established, allowed connection must survive"
        assert fresh.probe(cli, [(str(web.v6), "tcp", 80), (str(web.v4), "tcp", 80)]) == [
            "timeout",
            "timeout",
        ]
        fresh.apply([])
        assert talk.ask() == "ok"
        assert fresh.probe(cli, [(str(web.v6), "tcp", 80), (str(web.v4), "udp", 80)]) == [
            "ok",
            "ok",
        ]
    finally:
        talk.close()


def test_connection_opened_before_any_policy_is_judged_when_a_deny_arrives(
    fresh: Cluster,
) -> None:
    """With no policy on the node there is no conntrack (no `ct` in our table); a
    connection opened then is first seen by conntrack when a deny arrives, and its
    next packet is judged like a new one: it is dropped."""
    web = fresh.by_name("alpha/web")
    cli = fresh.by_name("beta/cli")
    talk = Talker(cli, web)
    try:
        assert talk.ask() == "ok"
        fresh.apply([P("alpha", "deny", {"podSelector": {}})])
        assert talk.ask(timeout=2.0) == "timeout"
    finally:
        talk.close()


def kernel_table(node: str) -> dict[str, Any]:
    """Our table as the kernel holds it, independent of listing order: sets and maps
    with sorted elements, chains with their rules in order (handles dropped)."""
    out = subprocess.run(
        ["ip", "netns", "exec", node, "nft", "-j", "list", "table", "inet", "flock"],
        capture_output=True,
        text=True,
        check=True,
    )
    objs: dict[str, Any] = {}
    for item in json.loads(out.stdout)["nftables"]:
        for kind, body in item.items():
            if kind in ("set", "map"):
                elems = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
                objs[f"{kind} {body['name']}"] = (body["type"], body.get("flags"), elems)
            elif kind == "chain":
                objs.setdefault(f"chain {body['name']}", [])
            elif kind == "rule":
                objs.setdefault(f"chain {body['chain']}", []).append(
                    json.dumps(body["expr"], sort_keys=True)
                )
    return objs


def test_incremental_updates_equal_a_full_replace(fresh: Cluster) -> None:
    """Walk through several policy sets incrementally; the kernel's table must then
    read back exactly as after a fresh full replace of the final state."""

    def web(*blocks: tuple[str, str]) -> NetworkPolicy:
        peers = [{"ipBlock": {"cidr": c, "except": [e]}} for c, e in blocks]
        return P(
            "alpha",
            "web",
            {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": peers}]},
        )

    deny = P("alpha", "deny", {"podSelector": {}})
    full_before = [eng.status()["full_syncs"] for eng in fresh.engines]
    seq = [
        [deny],
        [deny, web(("10.51.0.0/16", "10.51.1.2/32"))],
        [web(("10.51.0.0/16", "10.51.2.0/24"), ("fd51::/16", "fd51:2::/64"))],
    ]
    for policies in seq:
        fresh.apply(policies)
    incremental = [kernel_table(n) for n in fresh.nodes]
    # every change of this walk went in as an incremental transaction
    assert [eng.status()["full_syncs"] for eng in fresh.engines] == full_before
    for i, eng in enumerate(fresh.engines):
        eng.sync(fresh.inputs(i, seq[-1]), full=True)
    full = [kernel_table(n) for n in fresh.nodes]
    assert incremental == full
    assert all(eng.status()["last_error"] is None for eng in fresh.engines)
    check_truth_table(
        fresh,
        [80],
        lambda s, d, p, n: not is_(d, "alpha/web") or (s.namespace is not None and s.node == 0),
    )


def test_table_removed_behind_our_back_is_restored_by_next_sync(fresh: Cluster) -> None:
    """Someone deletes table inet flock: the next (incremental) transaction is refused
    as a whole, the engine replaces the table in one transaction, policy holds."""
    deny = P("alpha", "deny", {"podSelector": {}})
    fresh.apply([deny])
    before = [eng.status()["full_syncs"] for eng in fresh.engines]
    for node in fresh.nodes:
        subprocess.run(["ip", "netns", "exec", node, "nft", "delete", "table", "inet", "flock"],
                       check=True)  # fmt: skip
    fresh.apply([deny, P("beta", "deny", {"podSelector": {}})])
    assert [eng.status()["full_syncs"] for eng in fresh.engines] == [b + 1 for b in before]
    check_truth_table(fresh, [80], lambda s, d, p, n: d.namespace is None)


def test_refused_transaction_leaves_the_previous_ruleset(fresh: Cluster) -> None:
    """A transaction nft refuses changes nothing in the kernel, and sync raises."""
    from flock.apply.nft import NftError

    class Refusing(NftCli):
        def run(self, script: str) -> str:
            if "add rule" in script:  # any ruleset change: append a command nft rejects
                script += "add rule inet flock nosuchchain drop\n"
            return super().run(script)

    node = fresh.nodes[0]
    engine = PolicyEngine(Refusing(netns=node))
    engine.sync(fresh.inputs(0, []))
    before = kernel_table(node)
    with pytest.raises(NftError):
        engine.sync(fresh.inputs(0, [P("alpha", "deny", {"podSelector": {}})]))
    assert kernel_table(node) == before
    assert "nosuchchain" in (engine.status()["last_error"] or "")


def test_selector_operators_and_union_with_allow_all(fresh: Cluster) -> None:
    """matchExpressions NotIn / Exists / DoesNotExist / In on pods and namespaces, and a
    policy with an empty rule (`{}`: every peer, every port) added to a deny-all:
    allowed traffic is the union of the selecting policies."""
    fresh.apply(
        [
            P("alpha", "deny", {"podSelector": {}}),
            P("alpha", "web-open", {"podSelector": {"matchLabels": {"app": "web"}},
                                    "ingress": [{}]}),
            P(
                "alpha",
                "not-web",
                {
                    "podSelector": {"matchExpressions": [
                        {"key": "app", "operator": "NotIn", "values": ["web"]}]},
                    "ingress": [{"from": [
                        {"namespaceSelector": {"matchExpressions": [
                            {"key": "team", "operator": "NotIn", "values": ["red"]}]},
                         "podSelector": {"matchExpressions": [
                             {"key": "app", "operator": "Exists"}]}},
                        {"podSelector": {"matchExpressions": [
                            {"key": "legacy", "operator": "DoesNotExist"},
                            {"key": "app", "operator": "In", "values": ["web"]}]}},
                    ]}],
                },
            ),
        ]
    )  # fmt: skip

    def expect(s: Endpoint, d: Endpoint, proto: str, port: int) -> bool:
        if d.name in ("alpha/cli", "alpha/db"):
            return s.namespace == "beta" or is_(s, "alpha/web")
        return True

    check_truth_table(fresh, [80], expect)


def test_pod_joining_and_leaving_an_interval_set(fresh: Cluster) -> None:
    """A set mixing ipBlocks (with excepts) and a pod selector is an interval set; a pod
    that starts and stops matching is one element added and deleted in the kernel."""
    web = fresh.by_name("beta/web")
    saved = dict(web.labels)
    pol = P(
        "alpha",
        "mixed",
        {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [
                {"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.11/32"]}},
                {"ipBlock": {"cidr": "2001:db8:e::/64", "except": ["2001:db8:e::11/128"]}},
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}},
            ]}],
        },
    )  # fmt: skip
    db_node = fresh.nodes[fresh.by_name("alpha/db").node]
    full_before = [eng.status()["full_syncs"] for eng in fresh.engines]

    def allowed(*names: str) -> Expect:
        return lambda s, d, p, n: not is_(d, "alpha/db") or s.name in names

    try:
        fresh.apply([pol])
        check_truth_table(fresh, [80], allowed("ext1"))
        web.labels = {**saved, "role": "client"}
        fresh.apply([pol])
        check_truth_table(fresh, [80], allowed("ext1", "beta/web"))
        incremental = kernel_table(db_node)
        sets = [v for k, v in incremental.items() if k.startswith("set peer_")]
        assert sets and all(flags == ["interval"] for _, flags, _ in sets)
        web.labels = saved
        fresh.apply([pol])
        check_truth_table(fresh, [80], allowed("ext1"))
    finally:
        web.labels = saved
    assert [eng.status()["full_syncs"] for eng in fresh.engines] == full_before


def test_policy_that_does_not_parse_isolates_what_it_selects(fresh: Cluster) -> None:
    """Fail closed: an ingress policy for alpha/web whose ipBlock flock cannot read
    (`010.51.0.0/16`, leading zero) drops everything to alpha/web (its selector and
    policyTypes still parse) and touches nobody else; once it parses, it is enforced
    as written."""
    obj: dict[str, Any] = {
        "metadata": {"namespace": "alpha", "name": "web-from"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "010.51.0.0/16"}}]}],
        },
    }
    bad = parse_policy(obj)
    assert isinstance(bad, RejectedPolicy)
    fresh.apply([bad])
    for eng in fresh.engines:
        assert "ipBlock.cidr" in eng.status()["rejected_policies"]["alpha/web-from"]
        assert eng.status()["fail_closed"] == {"alpha/web-from": ["Ingress"]}
    check_truth_table(fresh, [80], lambda s, d, p, n: not is_(d, "alpha/web"))
    obj["spec"]["ingress"] = [
        {"from": [{"ipBlock": {"cidr": "10.51.0.0/16"}}, {"ipBlock": {"cidr": "fd51::/16"}}]}
    ]
    fixed = parse_policy(obj)
    assert isinstance(fixed, NetworkPolicy)
    fresh.apply([fixed])
    assert all(not eng.status()["rejected_policies"] for eng in fresh.engines)
    check_truth_table(
        fresh, [80], lambda s, d, p, n: not is_(d, "alpha/web") or s.namespace is not None
    )
