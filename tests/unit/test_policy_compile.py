"""NetworkPolicy parsing and compilation, checked against Kubernetes' semantics.

The compiled ruleset is run by a small evaluator of the nft subset the compiler
emits (vmap by interface, set lookups, port matches, verdicts), and its verdicts
are compared with an independent oracle written straight from the Kubernetes
rules. No kernel; the same ruleset is exercised with real packets in
tests/integration/test_policy_traffic.py.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flock.apply.nft import NftError, PolicyEngine, PolicyResyncNeeded
from flock.compile.policy import (
    LocalPod,
    NftSet,
    PolicyChanges,
    PolicyCompiler,
    PolicyInputs,
    Ruleset,
    compile_inputs,
    render_delta,
    render_full,
    render_update,
)
from flock.model.pod import ContainerPort, Namespace, Pod
from flock.model.policy import (
    AnyPolicy,
    NetworkPolicy,
    PolicyError,
    RejectedPolicy,
    Rule,
    namespace_labels,
    parse_policies,
    parse_policy,
)

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# ---------------------------------------------------------------------------
# An evaluator for the nft subset the compiler emits


def _in_element(elem: str, value: str) -> bool:
    if " . " in elem:
        return elem == value
    addr = ipaddress.ip_address(value)
    if "-" in elem:
        lo, hi = (ipaddress.ip_address(x) for x in elem.split("-"))
        return lo.version == addr.version and lo <= addr <= hi  # type: ignore[operator]
    net = ipaddress.ip_network(elem, strict=False)
    return addr in net


@dataclass(frozen=True)
class Packet:
    src: IP
    dst: IP
    proto: str  # tcp/udp/sctp/icmp
    dport: int
    iif: str = "uplink"
    oif: str = "uplink"
    established: bool = False


def _port_ok(spec: str, port: int) -> bool:
    spec = spec.strip()
    if spec.startswith("{"):
        return any(_port_ok(s, port) for s in spec.strip("{} ").split(","))
    if "-" in spec:
        lo, hi = spec.split("-")
        return int(lo) <= port <= int(hi)
    return int(spec) == port


_TOKEN = re.compile(
    r"(ip6?) (saddr|daddr) @(\S+)"
    r"|(ip6?) daddr \. (tcp|udp|sctp) dport @(\S+)"
    r"|(tcp|udp|sctp) dport (\{[^}]*\}|\S+)"
    r"|meta l4proto (\w+)"
    r"|ct state established,related"
    r"|(accept|return|drop)"
)


def _run_chain(rs: Ruleset, chain: str, pkt: Packet) -> str:
    fam = "ip" if pkt.src.version == 4 else "ip6"
    for line in rs.chains[chain]:
        pos = 0
        ok = True
        verdict = ""
        while pos < len(line):
            m = _TOKEN.match(line, pos)
            assert m is not None, f"evaluator cannot parse {line[pos:]!r} in {line!r}"
            pos = m.end() + 1
            if m.group(1):
                addr = pkt.src if m.group(2) == "saddr" else pkt.dst
                ok &= m.group(1) == fam and any(
                    _in_element(e, str(addr)) for e in rs.sets[m.group(3)].elements
                )
            elif m.group(4):
                key = f"{pkt.dst} . {pkt.dport}"
                ok &= (
                    m.group(4) == fam
                    and pkt.proto == m.group(5)
                    and key in rs.sets[m.group(6)].elements
                )
            elif m.group(7):
                ok &= pkt.proto == m.group(7) and _port_ok(m.group(8), pkt.dport)
            elif m.group(9):
                ok &= pkt.proto == m.group(9)
            elif m.group(0).startswith("ct state"):
                ok &= pkt.established
            else:
                verdict = m.group(10)
        if ok:
            return verdict
    return "return"


def forward(rs: Ruleset, pkt: Packet) -> bool:
    """What the forward hook does to `pkt`: True if it passes."""
    if pkt.iif in rs.egress:
        verdict = _run_chain(rs, rs.egress[pkt.iif], pkt)
        if verdict != "return":  # accept or drop ends the base chain
            return verdict == "accept"
    return not (pkt.oif in rs.ingress and _run_chain(rs, rs.ingress[pkt.oif], pkt) == "drop")


# ---------------------------------------------------------------------------
# The oracle: Kubernetes' rules, written directly


def _peer_ok(rule: Rule, pol: AnyPolicy, ip: IP, peer_pod: Pod | None, nss: Any) -> bool:
    if rule.peers is None:
        return True
    for peer in rule.peers:
        if peer.ip_block is not None:
            b = peer.ip_block
            if (
                ip.version == b.cidr.version
                and ip in b.cidr
                and not any(ip in e for e in b.except_)
            ):
                return True
        elif peer_pod is not None and peer.selects_pod(
            peer_pod, namespace_labels(nss, peer_pod.namespace), pol.namespace
        ):
            return True
    return False


def _port_ok_k8s(rule: Rule, proto: str, port: int, dst_pod: Pod | None) -> bool:
    if not rule.ports:
        return True
    for pp in rule.ports:
        if pp.protocol.lower() != proto:
            continue
        if pp.port is None:
            return True
        if isinstance(pp.port, str):
            if dst_pod is not None and any(
                cp.name == pp.port and cp.protocol.lower() == proto and cp.port == port
                for cp in dst_pod.container_ports
            ):
                return True
        elif pp.port <= port <= (pp.end_port or pp.port):
            return True
    return False


def oracle(
    policies: Sequence[AnyPolicy],
    nss: Mapping[str, Namespace],
    src: Pod | None,
    src_ip: IP,
    dst: Pod | None,
    dst_ip: IP,
    proto: str,
    port: int,
    local: set[tuple[str, str]],
) -> bool:
    if src is not None and src.key in local:
        sel = [p for p in policies if p.selects(src) and "Egress" in p.policy_types]
        if sel and not any(
            _peer_ok(r, p, dst_ip, dst, nss) and _port_ok_k8s(r, proto, port, dst)
            for p in sel
            for r in p.egress
        ):
            return False
    if dst is not None and dst.key in local:
        sel = [p for p in policies if p.selects(dst) and "Ingress" in p.policy_types]
        if sel and not any(
            _peer_ok(r, p, src_ip, src, nss) and _port_ok_k8s(r, proto, port, dst)
            for p in sel
            for r in p.ingress
        ):
            return False
    return True


# ---------------------------------------------------------------------------
# Fixtures


def pol(ns: str, name: str, spec: Mapping[str, Any]) -> NetworkPolicy:
    return NetworkPolicy.from_object(
        {"kind": "NetworkPolicy", "metadata": {"namespace": ns, "name": name}, "spec": spec}
    )


def mkpod(
    ns: str, name: str, n: int, labels: Mapping[str, str], ports: Sequence[ContainerPort] = ()
) -> Pod:
    return Pod(
        namespace=ns,
        name=name,
        labels=dict(labels),
        container_ports=tuple(ports),
        ips=(ipaddress.ip_address(f"10.1.0.{n}"), ipaddress.ip_address(f"fd00::{n:x}")),
    )


NSS = {
    "a": Namespace.from_object({"metadata": {"name": "a", "labels": {"team": "red"}}}),
    "b": Namespace.from_object({"metadata": {"name": "b", "labels": {"team": "blue"}}}),
}
WEB = ContainerPort(8080, "TCP", "http")
PODS = [
    mkpod("a", "web", 1, {"app": "web"}, [WEB, ContainerPort(53, "UDP", "dns")]),
    mkpod(
        "a",
        "db",
        2,
        {"app": "db", "tier": "back"},
        [ContainerPort(5432, "TCP", "http"), ContainerPort(5353, "TCP", "dns")],
    ),
    mkpod("a", "cli", 3, {"app": "cli"}),
    mkpod("b", "web", 4, {"app": "web"}, [ContainerPort(9090, "TCP", "http")]),
    mkpod("b", "cli", 5, {"app": "cli"}),
]
EXTERNAL = [ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::7")]


def ifname(p: Pod) -> str:
    return f"v{p.namespace}{p.name}"


def check_all(policies: Sequence[AnyPolicy], local: Sequence[Pod] = tuple(PODS)) -> int:
    """Compare evaluator and oracle for every (src, dst, family, proto, port). Returns
    the number of allowed cases so tests can also assert something was allowed."""
    lps = [LocalPod(p, ifname(p), p.ips) for p in local]
    rs = compile_inputs(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=policies))
    local_keys = {p.key for p in local}
    endpoints: list[tuple[Pod | None, int]] = [(p, i) for p in PODS for i in (0, 1)]
    endpoints += [(None, i) for i in (0, 1)]
    allowed = 0
    for src, fi in endpoints:
        for dst, fj in endpoints:
            if fi != fj or src is dst or (src is None and dst is None):
                continue
            s_ip = src.ips[fi] if src else EXTERNAL[fi]
            d_ip = dst.ips[fj] if dst else EXTERNAL[fj]
            for proto, port in (
                ("tcp", 8080), ("tcp", 9090), ("tcp", 5432), ("udp", 53),
                ("tcp", 80), ("sctp", 80), ("udp", 1500), ("icmp", 0),
                ("udp", 5353), ("tcp", 5353),
            ):  # fmt: skip
                pkt = Packet(
                    s_ip,
                    d_ip,
                    proto,
                    port,
                    iif=ifname(src) if src and src.key in local_keys else "uplink",
                    oif=ifname(dst) if dst and dst.key in local_keys else "uplink",
                )
                want = oracle(policies, NSS, src, s_ip, dst, d_ip, proto, port, local_keys)
                got = forward(rs, pkt)
                assert got == want, (
                    f"{src and src.key}->{dst and dst.key} {d_ip} {proto}/{port}: "
                    f"compiled {got}, Kubernetes {want}\n{render_full(rs)}"
                )
                allowed += got
    return allowed


# ---------------------------------------------------------------------------
# Parsing


def test_implicit_policy_types() -> None:
    assert pol("a", "p", {"podSelector": {}}).policy_types == {"Ingress"}
    assert pol("a", "p", {"podSelector": {}, "egress": [{}]}).policy_types == {"Ingress", "Egress"}
    p = pol("a", "p", {"podSelector": {}, "policyTypes": ["Egress"]})
    assert p.policy_types == {"Egress"}


def test_empty_from_means_all_peers() -> None:
    p = pol("a", "p", {"podSelector": {}, "ingress": [{"from": []}, {}]})
    assert all(r.peers is None for r in p.ingress)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Foo"}]}}, "operator"),
        ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}, "non-empty"),
        (
            {
                "podSelector": {
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            },
            "must be empty",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]},
            "ingress[0].from[0].ipBlock.cidr",
        ),
        (
            {
                "ingress": [
                    {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}
                ]
            },
            "not inside",
        ),
        (
            {"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
            "cannot be combined",
        ),
        ({"ingress": [{"from": [{}]}]}, "must set one of"),
        ({"ingress": [{"ports": [{"port": 0}]}]}, "outside 1..65535"),
        ({"ingress": [{"ports": [{"port": "Bad_Name"}]}]}, "port name"),
        ({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}, "requires a numeric port"),
        ({"ingress": [{"ports": [{"port": 100, "endPort": 90}]}]}, "endPort"),
        ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "protocol"),
        ({"policyTypes": ["Sideways"]}, "policyTypes[0]"),
        ({"podSelector": {}, "bogus": 1}, "unknown field"),
    ],
)
def test_bad_policies_name_the_field(spec: dict[str, Any], needle: str) -> None:
    spec = {"podSelector": {}, **spec}
    with pytest.raises(PolicyError, match=re.escape(needle)):
        pol("a", "bad", spec)


def test_parse_policies_reports_bad_and_keeps_good() -> None:
    good, bad = parse_policies(
        [
            {"metadata": {"namespace": "a", "name": "ok"}, "spec": {"podSelector": {}}},
            {"metadata": {"namespace": "a", "name": "nope"}, "spec": {"policyTypes": ["X"]}},
        ]
    )
    assert [p.name for p in good] == ["ok"]
    assert list(bad) == [("a", "nope")] and "policyTypes" in bad[("a", "nope")]


def test_selector_operators() -> None:
    p = pol(
        "a",
        "p",
        {
            "podSelector": {
                "matchLabels": {"app": "db"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["back", "mid"]},
                    {"key": "env", "operator": "NotIn", "values": ["prod"]},
                    {"key": "tier", "operator": "Exists"},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ],
            }
        },
    )
    sel = p.pod_selector
    assert sel.matches({"app": "db", "tier": "back"})
    assert sel.matches({"app": "db", "tier": "mid", "env": "dev"})
    assert not sel.matches({"app": "db", "tier": "back", "env": "prod"})
    assert not sel.matches({"app": "db", "tier": "front"})
    assert not sel.matches({"app": "db"})
    assert not sel.matches({"app": "db", "tier": "back", "legacy": ""})


# ---------------------------------------------------------------------------
# Semantics, case by case (each compared with the oracle on every flow)


def test_no_policy_allows_everything_and_has_no_conntrack() -> None:
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(p, ifname(p)) for p in PODS], pods=PODS, namespaces=NSS)
    )
    assert not rs.chains and not rs.ingress and not rs.egress
    assert "ct " not in render_full(rs)
    check_all([])


def test_deny_all_ingress() -> None:
    p = pol("a", "deny", {"podSelector": {}})
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[p])
    )
    assert rs.chains[rs.ingress["v"]][-1] == "drop"
    assert forward(rs, Packet(PODS[3].ips[0], PODS[0].ips[0], "tcp", 8080, oif="v")) is False
    assert forward(
        rs, Packet(PODS[3].ips[0], PODS[0].ips[0], "tcp", 8080, oif="v", established=True)
    )
    check_all([p])


def test_deny_all_egress() -> None:
    assert check_all([pol("b", "deny", {"podSelector": {}, "policyTypes": ["Egress"]})]) > 0


def test_allow_from_namespace() -> None:
    check_all(
        [
            pol(
                "a",
                "p",
                {
                    "podSelector": {"matchLabels": {"app": "web"}},
                    "ingress": [
                        {"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}
                    ],
                },
            )
        ]
    )


def test_allow_from_pod_in_namespace_both_selectors() -> None:
    both = pol(
        "a",
        "p",
        {
            "podSelector": {},
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
    rs = compile_inputs(
        PolicyInputs(
            local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[both]
        )
    )
    assert forward(rs, Packet(PODS[4].ips[0], PODS[0].ips[0], "tcp", 1, oif="v"))  # b/cli
    assert not forward(rs, Packet(PODS[3].ips[0], PODS[0].ips[0], "tcp", 1, oif="v"))  # b/web
    assert not forward(rs, Packet(PODS[2].ips[0], PODS[0].ips[0], "tcp", 1, oif="v"))  # a/cli
    check_all([both])


def test_named_port_resolves_per_destination_pod() -> None:
    p = pol("a", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})
    q = pol("b", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "http"}]}]})
    rs = compile_inputs(
        PolicyInputs(
            local_pods=[LocalPod(x, ifname(x)) for x in PODS],
            pods=PODS,
            namespaces=NSS,
            policies=[p, q],
        )
    )
    assert "tcp dport 8080 accept" in rs.chains[rs.ingress["vaweb"]]
    assert "tcp dport 5432 accept" in rs.chains[rs.ingress["vadb"]]
    assert "tcp dport 9090 accept" in rs.chains[rs.ingress["vbweb"]]
    # a/cli declares no "http": the rule matches nothing, the pod is only isolated.
    assert rs.chains[rs.ingress["vacli"]] == ("ct state established,related accept", "drop")
    check_all([p, q])


def test_named_port_egress_uses_destination_ports() -> None:
    p = pol(
        "a",
        "p",
        {
            "podSelector": {"matchLabels": {"app": "cli"}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [{"namespaceSelector": {}}],
                    "ports": [{"port": "http"}, {"port": "dns", "protocol": "UDP"}],
                }
            ],
        },
    )
    check_all([p])


def test_unknown_named_port_matches_nothing() -> None:
    p = pol("a", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "nosuch"}]}]})
    assert check_all([p], local=PODS[:3]) > 0  # only cross-namespace / other flows allowed
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[p])
    )
    assert rs.chains[rs.ingress["v"]] == ("ct state established,related accept", "drop")


def test_end_port_range_and_protocols() -> None:
    p = pol(
        "a",
        "p",
        {"podSelector": {}, "ingress": [{"ports": [
            {"port": 1000, "endPort": 2000, "protocol": "UDP"},
            {"protocol": "SCTP"},
            {"port": 80, "protocol": "TCP"},
        ]}]},
    )  # fmt: skip
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[p])
    )
    assert "udp dport 1000-2000 accept" in rs.chains[rs.ingress["v"]]
    assert "meta l4proto sctp accept" in rs.chains[rs.ingress["v"]]
    check_all([p])


def test_egress_ipblock_with_except() -> None:
    p = pol(
        "a",
        "p",
        {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [
            {"ipBlock": {"cidr": "10.1.0.0/24", "except": ["10.1.0.2/32", "10.1.0.4/31"]}},
            {"ipBlock": {"cidr": "2001:db8::/32"}},
        ]}]},
    )  # fmt: skip
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[p])
    )
    v4 = next(s for s in rs.sets.values() if s.type == "ipv4_addr")
    assert v4.interval and v4.elements == {"10.1.0.0/31", "10.1.0.3", "10.1.0.6-10.1.0.255"}
    check_all([p])


def test_union_of_policies_and_same_node_both_directions() -> None:
    eg = pol(
        "a",
        "eg",
        {
            "podSelector": {"matchLabels": {"app": "cli"}},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}]}],
        },
    )
    ing1 = pol(
        "a",
        "i1",
        {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 80}]}]},
    )
    ing2 = pol(
        "a",
        "i2",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
        },
    )
    lps = [LocalPod(x, ifname(x), x.ips) for x in PODS]
    rs = compile_inputs(
        PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[eg, ing1, ing2])
    )
    cli, web, db = PODS[2], PODS[0], PODS[1]
    assert forward(rs, Packet(cli.ips[0], web.ips[0], "tcp", 5, iif="vacli", oif="vaweb"))
    assert not forward(rs, Packet(cli.ips[0], db.ips[0], "tcp", 5, iif="vacli", oif="vadb"))
    assert not forward(rs, Packet(db.ips[0], web.ips[0], "tcp", 5, iif="vadb", oif="vaweb"))
    assert forward(rs, Packet(db.ips[0], web.ips[0], "tcp", 80, iif="vadb", oif="vaweb"))
    check_all([eg, ing1, ing2])


# ---------------------------------------------------------------------------
# Properties


_labels = st.dictionaries(
    st.sampled_from(["app", "tier"]), st.sampled_from(["web", "db", "x"]), max_size=2
)
_sel = st.builds(
    lambda ml, ex: {"matchLabels": ml, "matchExpressions": ex},
    _labels,
    st.lists(
        st.one_of(
            st.builds(
                lambda k: {"key": k, "operator": "Exists"}, st.sampled_from(["app", "tier", "team"])
            ),
            st.builds(
                lambda k: {"key": k, "operator": "DoesNotExist"}, st.sampled_from(["app", "tier"])
            ),
            st.builds(
                lambda k, v, op: {"key": k, "operator": op, "values": v},
                st.sampled_from(["app", "tier", "team"]),
                st.lists(st.sampled_from(["web", "db", "red", "blue"]), min_size=1, max_size=2),
                st.sampled_from(["In", "NotIn"]),
            ),
        ),
        max_size=2,
    ),
)
_peer = st.one_of(
    st.builds(lambda s: {"podSelector": s}, _sel),
    st.builds(lambda s: {"namespaceSelector": s}, _sel),
    st.builds(lambda a, b: {"podSelector": a, "namespaceSelector": b}, _sel, _sel),
    st.sampled_from(
        [
            {"ipBlock": {"cidr": "10.1.0.0/29", "except": ["10.1.0.2/31"]}},
            {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.1.0.4/32"]}},
            {"ipBlock": {"cidr": "fd00::/120", "except": ["fd00::1/128"]}},
            {"ipBlock": {"cidr": "192.0.2.0/24"}},
        ]
    ),
)
_port = st.one_of(
    st.builds(lambda p: {"port": p}, st.sampled_from([80, 8080, 9090, 5432])),
    st.builds(lambda p: {"port": p, "protocol": "UDP"}, st.sampled_from([53, "dns"])),
    st.sampled_from(
        [{"port": "http"}, {"port": 1000, "endPort": 2000, "protocol": "UDP"}, {"protocol": "SCTP"}]
    ),
)
_rule = st.fixed_dictionaries(
    {}, optional={"from": st.lists(_peer, max_size=2), "ports": st.lists(_port, max_size=2)}
)
_spec = st.fixed_dictionaries(
    {"podSelector": _sel},
    optional={
        "ingress": st.lists(_rule, max_size=2),
        "egress": st.lists(
            _rule.map(lambda r: {("to" if k == "from" else k): v for k, v in r.items()}), max_size=2
        ),
        "policyTypes": st.sampled_from([["Ingress"], ["Egress"], ["Ingress", "Egress"]]),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(st.tuples(st.sampled_from(["a", "b"]), _spec), min_size=1, max_size=3))
def test_compiled_ruleset_equals_kubernetes_semantics(
    specs: list[tuple[str, dict[str, Any]]],
) -> None:
    check_all([pol(ns, f"p{i}", s) for i, (ns, s) in enumerate(specs)], local=PODS[::2])


def _apply_update(old: Ruleset, new: Ruleset) -> Ruleset:
    """Replay render_update's element and chain commands on a copy of `old`."""
    return _replay(old, render_update(old, new), new)


def _replay(old: Ruleset, script: str, new: Ruleset) -> Ruleset:
    """Interpret an incremental nft script's commands on a copy of `old` (set
    declarations are taken from `new` or `old`: the script's types are not parsed)."""
    sets = {k: set(v.elements) for k, v in old.sets.items()}
    chains = {k: list(v) for k, v in old.chains.items()}
    maps = {"ingress": dict(old.ingress), "egress": dict(old.egress)}
    for line in script.splitlines():
        words = line.split()
        verb, obj = words[0], words[1]
        name = words[4] if len(words) > 4 else ""
        body = line[line.find("{") + 1 : line.rfind("}")].strip() if "{" in line else ""
        items = [x.strip() for x in body.split(",")] if body else []
        if obj == "set" and verb == "add":
            sets[name] = set()
        elif obj == "set":
            del sets[name]
        elif obj == "element" and name in maps:
            for it in items:
                if verb == "add":
                    k, _, v = it.partition(" : jump ")
                    maps[name][k.strip('"')] = v
                else:
                    del maps[name][it.strip('"')]
        elif obj == "element":
            (sets[name].update if verb == "add" else sets[name].difference_update)(items)
        elif (obj == "chain" and verb == "add") or (obj == "chain" and verb == "flush"):
            chains[name] = []
        elif obj == "chain":
            del chains[name]
        elif obj == "rule":
            chains[name].append(line.split(f" {name} ", 1)[1])

    def decl(k: str) -> NftSet:
        return new.sets[k] if k in new.sets else old.sets[k]

    return Ruleset(
        sets={k: NftSet(k, decl(k).type, decl(k).interval, frozenset(v)) for k, v in sets.items()},
        chains={k: tuple(v) for k, v in chains.items()},
        ingress=maps["ingress"],
        egress=maps["egress"],
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.lists(st.tuples(st.sampled_from(["a", "b"]), _spec), max_size=3),
    after=st.lists(st.tuples(st.sampled_from(["a", "b"]), _spec), max_size=3),
    drop_pod=st.integers(0, len(PODS)),
)
def test_incremental_update_reaches_the_new_state(
    before: list[tuple[str, dict[str, Any]]], after: list[tuple[str, dict[str, Any]]], drop_pod: int
) -> None:
    lps = [LocalPod(p, ifname(p), p.ips) for p in PODS[::2]]
    old = compile_inputs(
        PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS,
                     policies=[pol(ns, f"p{i}", s) for i, (ns, s) in enumerate(before)])
    )  # fmt: skip
    pods = [p for i, p in enumerate(PODS) if i != drop_pod]
    new = compile_inputs(
        PolicyInputs(local_pods=[lp for lp in lps if lp.pod in pods], pods=pods, namespaces=NSS,
                     policies=[pol(ns, f"q{i}", s) for i, (ns, s) in enumerate(after)])
    )  # fmt: skip
    got = _apply_update(old, new)
    assert {k: v.elements for k, v in got.sets.items()} == {
        k: v.elements for k, v in new.sets.items()
    }
    assert dict(got.chains) == dict(new.chains)
    assert dict(got.ingress) == dict(new.ingress) and dict(got.egress) == dict(new.egress)
    assert render_update(new, new) == ""


def test_one_new_peer_pod_is_one_element() -> None:
    p = pol(
        "a",
        "p",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
        },
    )
    lps = [LocalPod(PODS[0], "v", PODS[0].ips)]
    old = compile_inputs(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[p]))
    extra = mkpod("a", "cli2", 9, {"app": "cli"})
    new = compile_inputs(
        PolicyInputs(local_pods=lps, pods=[*PODS, extra], namespaces=NSS, policies=[p])
    )
    lines = render_update(old, new).splitlines()
    assert sorted(lines) == sorted(
        [
            f"add element inet flock {n} {{ {ip} }}"
            for n, ip in (
                (next(k for k in new.sets if k.endswith("_4")), "10.1.0.9"),
                (next(k for k in new.sets if k.endswith("_6")), "fd00::9"),
            )
        ]
    )


def test_same_node_egress_allow_does_not_skip_receiver_ingress() -> None:
    eg = pol("a", "eg", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]})
    deny = pol("a", "deny", {"podSelector": {"matchLabels": {"app": "web"}}})
    lps = [LocalPod(x, ifname(x), x.ips) for x in PODS]
    rs = compile_inputs(
        PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[eg, deny])
    )
    cli, web = PODS[2], PODS[0]
    assert not forward(rs, Packet(cli.ips[0], web.ips[0], "tcp", 80, iif="vacli", oif="vaweb"))
    assert forward(rs, Packet(cli.ips[0], PODS[1].ips[0], "tcp", 80, iif="vacli", oif="vadb"))
    check_all([eg, deny])


def test_named_port_protocol_must_match() -> None:
    # a/db names TCP 5353 "dns"; a policy for UDP "dns" must not open it.
    p = pol(
        "a", "p", {"podSelector": {}, "ingress": [{"ports": [{"port": "dns", "protocol": "UDP"}]}]}
    )
    lps = [LocalPod(PODS[1], "v", PODS[1].ips)]
    rs = compile_inputs(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[p]))
    assert rs.chains[rs.ingress["v"]] == ("ct state established,related accept", "drop")
    check_all([p])


_pod_change = st.tuples(
    st.integers(0, len(PODS) - 1),
    st.one_of(st.none(), _labels),  # None: pod deleted, else relabelled
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(st.sampled_from(["a", "b"]), _spec), min_size=1, max_size=3),
    steps=st.lists(
        st.tuples(
            st.lists(st.booleans(), min_size=3, max_size=3),  # which policies exist
            st.lists(_pod_change, max_size=3),
            st.booleans(),  # relabel namespace b
        ),
        min_size=2,
        max_size=5,
    ),
)
def test_reused_compiler_equals_fresh_compile(
    specs: list[tuple[str, dict[str, Any]]],
    steps: list[tuple[list[bool], list[tuple[int, Any]], bool]],
) -> None:
    """The incremental compiler, fed a sequence of states (pods relabelled, deleted
    and added, policies toggled, a namespace relabelled), gives exactly what a fresh
    compile of each state gives."""
    compiler = PolicyCompiler()
    policies = [pol(ns, f"p{i}", s) for i, (ns, s) in enumerate(specs)]
    pods = list(PODS)
    for present, pod_changes, relabel in steps:
        for idx, labels in pod_changes:
            if labels is None:
                pods[idx] = mkpod(PODS[idx].namespace, f"new{idx}", 40 + idx, {"app": "web"})
            else:
                pods[idx] = replace(pods[idx], labels=labels)
        nss = dict(NSS)
        if relabel:
            nss["b"] = Namespace.from_object({"metadata": {"name": "b", "labels": {"team": "red"}}})
        inputs = PolicyInputs(
            local_pods=[LocalPod(p, ifname(p), p.ips) for p in pods[::2]],
            pods=pods,
            namespaces=nss,
            policies=[p for p, on in zip(policies, present, strict=False) if on],
        )
        assert compiler.compile(inputs) == compile_inputs(inputs)


def test_reused_compiler_drops_named_ports_of_deleted_pods() -> None:
    p = pol(
        "a",
        "p",
        {
            "podSelector": {"matchLabels": {"app": "cli"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "http"}]}],
        },
    )
    lps = [LocalPod(PODS[2], "v", PODS[2].ips)]
    compiler = PolicyCompiler()
    first = compiler.compile(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[p]))
    assert "10.1.0.1 . 8080" in first.sets["np_http_tcp_4"].elements
    rest = PolicyInputs(local_pods=lps, pods=PODS[1:], namespaces=NSS, policies=[p])
    second = compiler.compile(rest)
    assert "10.1.0.1 . 8080" not in second.sets["np_http_tcp_4"].elements
    assert second == compile_inputs(rest)


def test_interface_names_cannot_inject_nft_text() -> None:
    with pytest.raises(ValueError, match="bad interface name"):
        LocalPod(PODS[0], 'x" ; flush ruleset ; "')


class RecordingNft:
    """An nft stand-in that records transactions and refuses the ones it is told to."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.refuse: Callable[[str], bool] = lambda script: False

    def run(self, script: str) -> str:
        if self.refuse(script):
            raise NftError("refused")
        self.scripts.append(script)
        return ""


def test_engine_full_then_incremental_then_fallback_and_failure() -> None:
    nft = RecordingNft()
    engine = PolicyEngine(nft)
    lps = [LocalPod(PODS[0], "v", PODS[0].ips)]
    deny = pol(
        "a",
        "deny",
        {
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
        },
    )
    engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS))
    assert nft.scripts[-1].startswith("add table inet flock\ndelete table inet flock\n")
    engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS))
    assert len(nft.scripts) == 1  # nothing changed: no transaction at all
    engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[deny]))
    assert "delete table" not in nft.scripts[-1] and "jump in_" in nft.scripts[-1]
    # an incremental transaction refused: one full replace instead
    nft.refuse = lambda script: "delete table" not in script
    no_cli = [p for p in PODS if p.name != "cli"]
    engine.sync(PolicyInputs(local_pods=lps, pods=no_cli, namespaces=NSS, policies=[deny]))
    assert "delete table" in nft.scripts[-1]
    assert engine.status()["full_syncs"] == 2 and engine.status()["last_error"] is None
    # everything refused: sync raises, the error is reported, the engine no longer
    # claims to know the kernel's state, and the next sync replaces the table
    nft.refuse = lambda script: True
    with pytest.raises(NftError):
        engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS))
    assert engine.applied is None
    assert engine.status()["last_error"] == "apply: refused"
    nft.refuse = lambda script: False
    engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS))
    assert "delete table" in nft.scripts[-1] and engine.status()["full_syncs"] == 3
    assert engine.applied == compile_inputs(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS))
    # a rejected policy given only by its reason is reported and fails closed on its
    # whole namespace (what it selects is unknown), in both directions
    engine.sync(
        PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, rejected={("a", "x"): "bad"})
    )
    assert engine.status()["rejected_policies"] == {"a/x": "bad"}
    assert engine.status()["fail_closed"] == {"a/x": ["Egress", "Ingress"]}
    assert engine.status()["ingress_isolated"] == engine.status()["egress_isolated"] == 1


def test_except_equal_to_cidr_matches_nothing() -> None:
    p = pol(
        "a",
        "p",
        {"podSelector": {}, "ingress": [{"from": [
            {"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.0/24"]}}]}]},
    )  # fmt: skip
    assert check_all([p]) > 0
    rs = compile_inputs(
        PolicyInputs(local_pods=[LocalPod(PODS[0], "v")], pods=PODS, namespaces=NSS, policies=[p])
    )
    assert not forward(rs, Packet(EXTERNAL[0], PODS[0].ips[0], "tcp", 80, oif="v"))


def test_compiler_indexes_do_not_grow_with_label_churn() -> None:
    """Rollouts give pods fresh label values (pod-template-hash): the indexes of a
    long-lived compiler must shrink back when those pods go."""
    compiler = PolicyCompiler()
    p = pol("a", "p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]})

    def state(extra: list[Pod]) -> PolicyInputs:
        return PolicyInputs(
            local_pods=[LocalPod(PODS[0], "v", PODS[0].ips)],
            pods=[*PODS, *extra],
            namespaces=NSS,
            policies=[p],
        )

    baseline = compiler.compile(state([]))
    sizes = (len(compiler._infos), len(compiler._by_ns), len(compiler._named))
    for round_ in range(3):
        extra = [
            mkpod("a", f"r{round_}x{i}", 100 + i, {"hash": f"h{round_}"}, [WEB]) for i in range(5)
        ]
        assert compiler.compile(state(extra)) != baseline
    assert compiler.compile(state([])) == baseline
    assert (len(compiler._infos), len(compiler._by_ns), len(compiler._named)) == sizes


# ---------------------------------------------------------------------------
# Changes one at a time: PolicyCompiler.apply / take_delta, PolicyEngine.update

# The pod universe of the change sequences: PODS, a pod sharing web's addresses
# in namespace b (two pods, one address: element counts), a pod with no address,
# a hostNetwork pod (never a peer, never compiled).
EXTRA = [
    replace(mkpod("b", "twin", 1, {"app": "db"}, [ContainerPort(7070, "TCP", "http")])),
    Pod(namespace="a", name="noip", labels={"app": "web"}),
    replace(mkpod("a", "host", 20, {"app": "web"}), host_network=True),
]
UNIVERSE = [*PODS, *EXTRA]

_op = st.one_of(
    # pod i: deleted (None), relabelled (labels), or back to its original (True)
    st.tuples(st.just("pod"), st.integers(0, len(UNIVERSE) - 1),
              st.one_of(st.none(), _labels, st.just(True))),
    # pod i on this node or not
    st.tuples(st.just("local"), st.integers(0, len(UNIVERSE) - 1), st.booleans()),
    # policy slot i: gone, a spec, or a spec that failed to parse (its stand-in)
    st.tuples(st.just("policy"), st.integers(0, 3),
              st.one_of(st.none(), st.tuples(st.sampled_from(["a", "b"]), _spec, st.booleans()))),
    # namespace b: labels, or gone
    st.tuples(st.just("ns"), st.just("b"),
              st.one_of(st.none(), st.sampled_from([{"team": "red"}, {"team": "blue"}, {}]))),
)  # fmt: skip


class _World:
    """The cluster as a sequence of changes leaves it, as full inputs and as changes."""

    def __init__(self) -> None:
        self.pods: dict[int, Pod] = dict(enumerate(UNIVERSE))
        self.local: set[int] = {0, 2, 6}
        self.lps: dict[int, LocalPod] = {}
        self.policies: dict[int, AnyPolicy] = {}
        self.nss: dict[str, Namespace] = dict(NSS)

    def lp(self, i: int) -> LocalPod:
        pod = self.pods[i]
        hit = self.lps.get(i)
        if hit is None or hit.pod is not pod:
            hit = self.lps[i] = LocalPod(pod, f"v{i}", pod.ips)
        return hit

    def inputs(self) -> PolicyInputs:
        good = [p for p in self.policies.values() if isinstance(p, NetworkPolicy)]
        bad = {p.key: p for p in self.policies.values() if isinstance(p, RejectedPolicy)}
        return PolicyInputs(
            local_pods=[self.lp(i) for i in sorted(self.local) if i in self.pods],
            pods=list(self.pods.values()),
            namespaces=dict(self.nss),
            policies=good,
            rejected=bad,
        )

    def change(self, op: tuple[Any, ...]) -> PolicyChanges:
        kind, i, arg = op
        if kind == "pod":
            base = UNIVERSE[i]
            old = self.pods.get(i)
            if arg is None:
                self.pods.pop(i, None)
            else:
                self.pods[i] = base if arg is True else replace(base, labels=arg)
            new = self.pods.get(i)
            locals_: dict[str, LocalPod | None] = {}
            if i in self.local and (old is not None or new is not None):
                locals_[f"v{i}"] = self.lp(i) if new is not None else None
            return PolicyChanges(pods={base.key: new}, local_pods=locals_)
        if kind == "local":
            (self.local.add if arg else self.local.discard)(i)
            if i not in self.pods:
                return PolicyChanges()
            return PolicyChanges(local_pods={f"v{i}": self.lp(i) if arg else None})
        if kind == "policy":
            old_pol = self.policies.pop(i, None)
            gone: dict[tuple[str, str], AnyPolicy | None] = {}
            if old_pol is not None:
                gone[old_pol.key] = None
            if arg is not None:
                ns, spec, broken = arg
                obj = {"metadata": {"namespace": ns, "name": f"p{i}"}, "spec": spec}
                new_pol: AnyPolicy = (
                    RejectedPolicy.from_object(obj, "broken") if broken else parse_policy(obj)
                )
                self.policies[i] = new_pol
                gone[new_pol.key] = new_pol
            return PolicyChanges(policies=gone)
        if arg is None:
            self.nss.pop(i, None)
            return PolicyChanges(namespaces={i: None})
        ns_obj = Namespace.from_object({"metadata": {"name": i, "labels": arg}})
        self.nss[i] = ns_obj
        return PolicyChanges(namespaces={i: ns_obj})


def _same_state(got: Ruleset, want: Ruleset) -> None:
    assert {k: v.elements for k, v in got.sets.items()} == {
        k: v.elements for k, v in want.sets.items()
    }
    assert dict(got.chains) == dict(want.chains)
    assert dict(got.ingress) == dict(want.ingress) and dict(got.egress) == dict(want.egress)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(st.lists(_op, min_size=1, max_size=4), st.sampled_from(["apply", "load"])),
        min_size=1,
        max_size=8,
    )
)
def test_changes_in_any_order_equal_a_fresh_compile(
    steps: list[tuple[list[tuple[Any, ...]], str]],
) -> None:
    """The key property of the incremental compiler: after any sequence of pod,
    local-pod, policy (valid or rejected) and namespace changes, given one by one
    (`apply`) or as whole views (`load`), its state equals a fresh compile of the
    final view, and the deltas it handed out, replayed as nft commands from the
    first state, reach that state."""
    world = _World()
    compiler = PolicyCompiler()
    kernel = compiler.compile(world.inputs())
    assert kernel == compile_inputs(world.inputs())
    for ops, how in steps:
        batch = [world.change(op) for op in ops]
        if how == "apply":
            for ch in batch:
                compiler.apply(ch)
        else:
            compiler.load(world.inputs())
        before = kernel
        delta = compiler.take_delta()
        kernel = compiler.ruleset()
        fresh = compile_inputs(world.inputs())
        assert kernel == fresh
        _same_state(_replay(before, render_delta(delta), kernel), kernel)
        assert compiler.summary() == kernel.summary()
        assert not compiler.take_delta()  # nothing left over
    assert set(compiler.rejected()) == {
        p.key for p in world.policies.values() if isinstance(p, RejectedPolicy)
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), _spec, st.booleans()), min_size=1, max_size=3
    )
)
def test_rejected_policies_isolate_and_allow_nothing(
    specs: list[tuple[str, dict[str, Any], bool]],
) -> None:
    """A policy that failed to parse acts as a policy with its selector and
    policyTypes and no rules: the pods it selects are isolated in its directions
    and get only what the valid policies selecting them allow (Kubernetes' rules,
    by the oracle)."""
    policies = []
    for i, (ns, spec, broken) in enumerate(specs):
        obj = {"metadata": {"namespace": ns, "name": f"p{i}"}, "spec": spec}
        policies.append(RejectedPolicy.from_object(obj, "broken") if broken else parse_policy(obj))
    check_all(policies, local=PODS[::2])


def test_bad_ipblock_policy_fails_closed_on_what_it_selects() -> None:
    web_bad: dict[str, Any] = {
        "metadata": {"namespace": "a", "name": "web-bad"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "010.1.0.0/16"}}]}],
        },
    }
    bad = parse_policy(web_bad)
    assert isinstance(bad, RejectedPolicy) and "ipBlock.cidr" in bad.reason
    assert bad.policy_types == {"Ingress"} and bad.pod_selector is not None
    lps = [LocalPod(x, ifname(x), x.ips) for x in PODS]
    rs = compile_inputs(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[bad]))
    web, cli, db = PODS[0], PODS[2], PODS[1]
    # web: nothing comes in, its own egress is untouched; the others are not isolated
    assert set(rs.ingress) == {"vaweb"} and not rs.egress
    assert not forward(rs, Packet(cli.ips[0], web.ips[0], "tcp", 8080, iif="vacli", oif="vaweb"))
    assert forward(rs, Packet(web.ips[0], db.ips[0], "tcp", 5432, iif="vaweb", oif="vadb"))
    assert forward(rs, Packet(cli.ips[0], db.ips[0], "tcp", 5432, iif="vacli", oif="vadb"))
    # a valid policy beside it still allows what it allows
    cli_sel = {"podSelector": {"matchLabels": {"app": "cli"}}}
    allow = pol("a", "allow-cli", {"podSelector": {"matchLabels": {"app": "web"}},
                                   "ingress": [{"from": [cli_sel]}]})  # fmt: skip
    check_all([bad, allow])
    # fixed: the same key now parses, and only what it says holds
    fixed = parse_policy({**web_bad, "spec": {**web_bad["spec"], "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}]}})  # fmt: skip
    assert isinstance(fixed, NetworkPolicy)
    check_all([fixed])


def test_rejected_policy_reads_what_it_can() -> None:
    def rej(spec: Any) -> RejectedPolicy:
        got = parse_policy({"metadata": {"namespace": "a", "name": "x"}, "spec": spec})
        assert isinstance(got, RejectedPolicy)
        return got

    bad_rule = {"ingress": [{"from": [{"ipBlock": {"cidr": "nope"}}]}]}
    # an unreadable podSelector: the whole namespace
    r = rej({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]}})
    assert r.pod_selector is None and r.policy_types == {"Ingress"}
    assert r.selects(PODS[2]) and not r.selects(PODS[4])  # a/cli yes, b/cli no
    # policyTypes as declared, else Kubernetes' default, else both
    assert rej({"podSelector": {}, "policyTypes": ["Egress"], **bad_rule}).policy_types == {
        "Egress"
    }
    assert rej({"podSelector": {}, "egress": [{}], **bad_rule}).policy_types == {
        "Ingress",
        "Egress",
    }
    assert rej({"podSelector": {}, "policyTypes": ["Sideways"]}).policy_types == {
        "Ingress",
        "Egress",
    }
    assert rej({"podSelector": {}, "unknownField": 1}).policy_types == {"Ingress"}
    # metadata unreadable: the key the caller knows it by
    assert "all pods of its namespace are isolated for Ingress (" in r.message
    r3 = RejectedPolicy.from_object(
        {"metadata": {"namespace": "a", "name": "x", "uid": "u-1"}, "spec": {"podSelector": {}}},
        "spec.x: unknown field",
    )
    assert r3.uid == "u-1" and r3.message.startswith(
        "flock cannot enforce this NetworkPolicy: spec.x: unknown field; until it is fixed, "
        "the pods it selects are isolated for Ingress (only what other policies allow passes)"
    )
    r2 = RejectedPolicy.from_object({"metadata": 7}, "bad", ("ns1", "p"))
    assert r2.key == ("ns1", "p") and r2.pod_selector is not None and r2.pod_selector.empty


def test_engine_update_applies_only_the_change() -> None:
    nft = RecordingNft()
    engine = PolicyEngine(nft)
    web_only = pol(
        "a",
        "p",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
        },
    )
    lps = [LocalPod(PODS[0], "v", PODS[0].ips)]
    engine.sync(PolicyInputs(local_pods=lps, pods=PODS, namespaces=NSS, policies=[web_only]))
    extra = mkpod("a", "cli2", 9, {"app": "cli"})
    engine.update(PolicyChanges(pods={extra.key: extra}))
    assert sorted(nft.scripts[-1].splitlines()) == sorted(
        f"add element inet flock {n} {{ {ip} }}"
        for n, ip in (
            (next(k for k in engine.applied.sets if k.endswith("_4")), "10.1.0.9"),  # type: ignore[union-attr]
            (next(k for k in engine.applied.sets if k.endswith("_6")), "fd00::9"),  # type: ignore[union-attr]
        )
    )
    n = len(nft.scripts)
    engine.update(PolicyChanges(pods={("a", "nobody"): None}))  # nothing to do: no transaction
    assert len(nft.scripts) == n
    # a rejected policy through update: reported, its pods isolated
    bad = RejectedPolicy("a", "bad", "spec.x: unknown field", None, frozenset({"Egress"}))
    engine.update(PolicyChanges(policies={bad.key: bad}))
    st_ = engine.status()
    assert st_["rejected_policies"] == {"a/bad": "spec.x: unknown field"}
    assert st_["fail_closed"] == {"a/bad": ["Egress"]} and st_["egress_isolated"] == 1
    assert engine.rejected() == {bad.key: bad}
    engine.update(PolicyChanges(policies={bad.key: None}))
    assert engine.status()["rejected_policies"] == {} and engine.status()["egress_isolated"] == 0
    assert engine.status()["full_syncs"] == 1
    all_in = PolicyInputs(local_pods=lps, pods=[*PODS, extra], namespaces=NSS, policies=[web_only])
    assert engine.applied == compile_inputs(all_in)


def test_engine_update_after_a_failed_compile_needs_the_whole_view(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = PolicyEngine(RecordingNft())
    inputs = PolicyInputs(local_pods=[LocalPod(PODS[0], "v", PODS[0].ips)], pods=PODS,
                          namespaces=NSS)  # fmt: skip
    with pytest.raises(PolicyResyncNeeded):  # no whole view yet: a partial cluster
        engine.update(PolicyChanges())
    engine.sync(inputs)

    def boom(self: PolicyCompiler, changes: PolicyChanges) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(PolicyCompiler, "apply", boom)
    with pytest.raises(RuntimeError):
        engine.update(PolicyChanges())
    monkeypatch.undo()
    with pytest.raises(PolicyResyncNeeded):
        engine.update(PolicyChanges())
    engine.sync(inputs)  # the whole view again: a full replace, then updates work
    assert engine.status()["full_syncs"] == 2 and engine.status()["last_error"] is None
    engine.update(PolicyChanges())


def test_pods_alike_share_one_chain() -> None:
    """Local pods selected by the same policies (and declaring the same ports, for
    ingress) jump to one chain: rules grow with distinct policy sets, not pods."""
    deny = pol("a", "deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    pods = [mkpod("a", f"w{i}", 100 + i, {"app": "web"}, [WEB]) for i in range(20)]
    lps = [LocalPod(p, f"w{i}", p.ips) for i, p in enumerate(pods)]
    rs = compile_inputs(PolicyInputs(local_pods=lps, pods=pods, namespaces=NSS, policies=[deny]))
    assert len(rs.chains) == 2 and len(rs.ingress) == len(rs.egress) == 20
    assert rs.comments[rs.ingress["w0"]] == "ingress a: deny"
