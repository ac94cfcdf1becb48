"""NetworkPolicy → nftables ruleset for one node: pure, so it tests without a kernel.

Shape (table `inet flock`, nothing else is ever touched):

* base chain `forward` (hook forward): `iifname vmap @egress` then `oifname vmap @ingress`.
  The maps hold one entry per *isolated* local pod, keyed by its host veth name
  (known before the veth exists, so rules can be in place before the pod is
  wired), jumping to that pod's chain. A pod that no policy isolates has no entry:
  its packets cost two hash lookups and nothing else.
* per-pod chains `eg_<id>` / `in_<id>`: `ct state established,related` first (so
  conntrack appears only where a policy is in force), then one rule per (policy
  rule, family, protocol), ending in `drop`. The egress chain allows with `return`
  (not `accept`), so a same-node packet that passes the sender's egress is still
  checked against the receiver's ingress by the second vmap.
* peer sets: one named set per distinct (`from`/`to` list, family); pod addresses
  and ipBlocks (with `except` already subtracted) are kept as non-overlapping
  intervals. A rule costs one set lookup whatever the number of pods it names.
* named ports: ingress names resolve per destination pod at compile time (the
  destination is the local pod). Egress names resolve per destination too, through
  a set `np_<name>_<proto>_<fam>` of `address . port` over every pod that declares
  that name. An unknown name matches nothing.

Traffic between a pod and its own node passes through input/output, which we do
not hook: Kubernetes allows it whatever the policy.

`render_full` gives a script that replaces the table atomically; `render_update`
gives the minimal transaction from one compiled state to another (element adds
and deletes, chain flush + refill, map entries), applied atomically by `nft -f`.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flock.model.pod import Namespace, Pod
from flock.model.policy import (
    IPBlock,
    LabelSelector,
    NetworkPolicy,
    Peer,
    PolicyPort,
    Proto,
    Rule,
    namespace_labels,
    valid_port_name,
)

TABLE = "flock"
FAMILY = "inet"
INGRESS_MAP = "ingress"
EGRESS_MAP = "egress"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_FAM_KW = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_PROTO_KW: dict[Proto, str] = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_MAX = {4: (1 << 32) - 1, 6: (1 << 128) - 1}


@dataclass(frozen=True, slots=True)
class LocalPod:
    """A pod on this node: its host-side veth name and its addresses."""

    pod: Pod
    ifname: str
    ips: tuple[IPAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class NftSet:
    name: str
    type: str
    interval: bool
    elements: frozenset[str]


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The compiled state of table `inet flock`; compare two with `render_update`."""

    sets: Mapping[str, NftSet] = field(default_factory=dict)
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    comments: Mapping[str, str] = field(default_factory=dict)
    ingress: Mapping[str, str] = field(default_factory=dict)  # ifname -> chain
    egress: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {
            "sets": len(self.sets),
            "set_elements": sum(len(s.elements) for s in self.sets.values()),
            "chains": len(self.chains),
            "rules": sum(len(r) for r in self.chains.values()),
            "ingress_isolated": len(self.ingress),
            "egress_isolated": len(self.egress),
        }


# ---------------------------------------------------------------------------
# Interval arithmetic for peer sets


def _net_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _subtract(rng: tuple[int, int], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out = [rng]
    for hs, he in sorted(holes):
        nxt: list[tuple[int, int]] = []
        for s, e in out:
            if he < s or hs > e:
                nxt.append((s, e))
                continue
            if s < hs:
                nxt.append((s, hs - 1))
            if he < e:
                nxt.append((he + 1, e))
        out = nxt
    return out


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of ranges, overlapping ones merged (adjacent ones kept apart, so that
    adding or removing one pod address changes one element, not a merged run)."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _render_range(fam: int, s: int, e: int) -> str:
    mk = ipaddress.IPv4Address if fam == 4 else ipaddress.IPv6Address
    if s == e:
        return str(mk(s))
    size = e - s + 1
    if size & (size - 1) == 0 and s % size == 0:
        bits = 32 if fam == 4 else 128
        return f"{mk(s)}/{bits - size.bit_length() + 1}"
    return f"{mk(s)}-{mk(e)}"


# ---------------------------------------------------------------------------
# Selector evaluation with indexes (10,000 pods must compile in well under a second)


class _Index:
    """Pods grouped by namespace and by (namespace, label key, value)."""

    def __init__(self, pods: Sequence[Pod], namespaces: Mapping[str, Namespace]) -> None:
        self.namespaces = namespaces
        self.by_ns: dict[str, list[Pod]] = defaultdict(list)
        self.by_label: dict[tuple[str, str, str], list[Pod]] = defaultdict(list)
        # named ports: (name, proto, fam) -> {"addr . port"}
        self.named: dict[tuple[str, Proto, int], set[str]] = defaultdict(set)
        for p in pods:
            if p.host_network:
                continue  # its addresses are the node's: never a pod peer
            self.by_ns[p.namespace].append(p)
            for k, v in p.labels.items():
                self.by_label[(p.namespace, k, v)].append(p)
            for cp in p.container_ports:
                if cp.name and valid_port_name(cp.name):
                    for ip in p.ips:
                        self.named[(cp.name, cp.protocol, ip.version)].add(f"{ip} . {cp.port}")
        self.ns_names = set(self.by_ns) | set(namespaces)
        self._ns_match: dict[LabelSelector, list[str]] = {}

    def namespaces_matching(self, sel: LabelSelector) -> list[str]:
        hit = self._ns_match.get(sel)
        if hit is None:
            hit = sorted(
                n for n in self.ns_names if sel.matches(namespace_labels(self.namespaces, n))
            )
            self._ns_match[sel] = hit
        return hit

    def pods_in(self, ns: str, sel: LabelSelector | None) -> Iterable[Pod]:
        if sel is None or sel.empty:
            return self.by_ns.get(ns, ())
        if sel.match_labels:
            lists: list[list[Pod]] = [
                self.by_label.get((ns, k, v), []) for k, v in sel.match_labels
            ]
            shortest: list[Pod] = min(lists, key=len)
            cands: Iterable[Pod] = shortest
        else:
            cands = self.by_ns.get(ns, ())
        return [p for p in cands if sel.matches(p.labels)]

    def peer_pods(self, peer: Peer, policy_ns: str) -> Iterable[Pod]:
        if peer.ip_block is not None:
            return ()
        if peer.namespace_selector is None:
            return self.pods_in(policy_ns, peer.pod_selector)
        out: list[Pod] = []
        for ns in self.namespaces_matching(peer.namespace_selector):
            out.extend(self.pods_in(ns, peer.pod_selector))
        return out


# ---------------------------------------------------------------------------
# Canonical names


def _digest(text: str) -> str:
    return hashlib.blake2s(text.encode(), digest_size=6).hexdigest()


def _sel_key(sel: LabelSelector | None) -> str:
    if sel is None:
        return "-"
    ml = ",".join(f"{k}={v}" for k, v in sorted(sel.match_labels))
    me = ";".join(
        f"{r.key} {r.operator} {','.join(sorted(r.values))}"
        for r in sorted(sel.match_expressions, key=lambda r: (r.key, r.operator, sorted(r.values)))
    )
    return f"{{{ml}|{me}}}"


def _block_key(b: IPBlock) -> str:
    return f"{b.cidr}!{','.join(str(e) for e in b.except_)}"


def _peers_key(peers: tuple[Peer, ...], policy_ns: str) -> str:
    parts = sorted(
        f"ip:{_block_key(p.ip_block)}"
        if p.ip_block is not None
        else f"ns:{_sel_key(p.namespace_selector)}/pod:{_sel_key(p.pod_selector)}"
        for p in peers
    )
    ns = (
        policy_ns if any(p.ip_block is None and p.namespace_selector is None for p in peers) else ""
    )
    return f"{ns}#{'|'.join(parts)}"


def pod_chain_id(pod: Pod) -> str:
    return _digest(f"{pod.namespace}/{pod.name}")


# ---------------------------------------------------------------------------
# The compiler


@dataclass(slots=True)
class _Builder:
    index: _Index
    sets: dict[str, NftSet] = field(default_factory=dict)
    _peer_sets: dict[tuple[str, int], str | None] = field(default_factory=dict)

    def peer_set(self, peers: tuple[Peer, ...], policy_ns: str, fam: int) -> str | None:
        """Name of the set holding `peers`' addresses of family `fam`; None if the
        list can never hold an address of that family (ipBlocks of the other family)."""
        key = (_peers_key(peers, policy_ns), fam)
        if key in self._peer_sets:
            return self._peer_sets[key]
        has_selector = any(p.ip_block is None for p in peers)
        blocks = [p.ip_block for p in peers if p.ip_block is not None]
        fam_blocks = [b for b in blocks if b.cidr.version == fam]
        name: str | None
        if not has_selector and not fam_blocks:
            name = None
        else:
            ranges: list[tuple[int, int]] = []
            for b in fam_blocks:
                ranges.extend(_subtract(_net_range(b.cidr), (_net_range(e) for e in b.except_)))
            for peer in peers:
                for pod in self.index.peer_pods(peer, policy_ns):
                    for ip in pod.ips:
                        if ip.version == fam:
                            ranges.append((int(ip), int(ip)))
            interval = bool(fam_blocks)
            elems = frozenset(_render_range(fam, s, e) for s, e in _merge(ranges))
            name = f"peer_{_digest(key[0])}_{fam}"
            self.sets[name] = NftSet(name, _ADDR_TYPE[fam], interval, elems)
        self._peer_sets[key] = name
        return name

    def named_set(self, name: str, proto: Proto, fam: int) -> str:
        set_name = f"np_{name}_{_PROTO_KW[proto]}_{fam}"
        if set_name not in self.sets:
            elems = frozenset(self.index.named.get((name, proto, fam), ()))
            self.sets[set_name] = NftSet(
                set_name, f"{_ADDR_TYPE[fam]} . inet_service", False, elems
            )
        return set_name


def _port_clauses(ports: tuple[PolicyPort, ...], dst: Pod | None) -> list[tuple[Proto, str]] | None:
    """Numeric port matches per protocol, as nft text. None means 'every port and
    protocol'. Named ports resolve against `dst` (ingress: the local pod); with
    dst None they are left out here and handled by `_named_clauses`."""
    if not ports:
        return None
    by_proto: dict[Proto, set[str] | None] = {}
    for pp in ports:
        if pp.port is None:
            by_proto[pp.protocol] = None  # every port of this protocol
            continue
        if isinstance(pp.port, str):
            if dst is None:
                continue
            nums = {
                cp.port
                for cp in dst.container_ports
                if cp.name == pp.port and cp.protocol == pp.protocol
            }
            if not nums:
                continue  # unknown name: matches nothing
            spec = {str(n) for n in nums}
        elif pp.end_port is not None and pp.end_port > pp.port:
            spec = {f"{pp.port}-{pp.end_port}"}
        else:
            spec = {str(pp.port)}
        if pp.protocol in by_proto and by_proto[pp.protocol] is None:
            continue
        cur = by_proto.setdefault(pp.protocol, set())
        assert cur is not None
        cur |= spec
    out: list[tuple[Proto, str]] = []
    for proto in sorted(by_proto):
        spec_set = by_proto[proto]
        kw = _PROTO_KW[proto]
        if spec_set is None:
            out.append((proto, f"meta l4proto {kw}"))
        else:
            items = sorted(spec_set, key=lambda s: int(s.split("-")[0]))
            body = items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"
            out.append((proto, f"{kw} dport {body}"))
    return out


def _rule_lines(b: _Builder, rule: Rule, policy_ns: str, local: Pod, direction: str) -> list[str]:
    verdict = "accept" if direction == "in" else "return"
    addr = "saddr" if direction == "in" else "daddr"
    lines: list[str] = []
    ports = _port_clauses(rule.ports, local if direction == "in" else None)
    named: list[tuple[str, Proto]] = []
    if direction == "out":
        named = sorted({(p.port, p.protocol) for p in rule.ports if isinstance(p.port, str)})
    if ports is not None and not ports and not named:
        return []  # only unknown named ports: this rule matches nothing
    for fam in (4, 6):
        if rule.peers is None:
            peer = ""
        else:
            set_name = b.peer_set(rule.peers, policy_ns, fam)
            if set_name is None:
                continue
            peer = f"{_FAM_KW[fam]} {addr} @{set_name} "
        if ports is None:
            if rule.peers is None:
                lines.append(verdict)
            else:
                lines.append(f"{peer}{verdict}")
        else:
            lines.extend(f"{peer}{clause} {verdict}" for _, clause in ports)
        for name, proto in named:
            ns = b.named_set(name, proto, fam)
            lines.append(f"{peer}{_FAM_KW[fam]} daddr . {_PROTO_KW[proto]} dport @{ns} {verdict}")
    return lines


@dataclass(frozen=True, slots=True)
class PolicyInputs:
    """Everything the compiler needs for one node, as the agent's datastore has it.

    `rejected` carries policies that failed to parse ((namespace, name) -> error),
    only so that they are reported; they are not enforced.
    """

    local_pods: Sequence[LocalPod] = ()
    pods: Sequence[Pod] = ()
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    policies: Sequence[NetworkPolicy] = ()
    rejected: Mapping[tuple[str, str], str] = field(default_factory=dict)


def compile_inputs(inputs: PolicyInputs) -> Ruleset:
    return compile_ruleset(
        local_pods=inputs.local_pods,
        pods=inputs.pods,
        namespaces=inputs.namespaces,
        policies=inputs.policies,
    )


def compile_ruleset(
    *,
    local_pods: Sequence[LocalPod],
    pods: Sequence[Pod],
    namespaces: Mapping[str, Namespace],
    policies: Sequence[NetworkPolicy],
) -> Ruleset:
    """The whole desired ruleset for this node. `pods` is every pod in the cluster
    (with addresses); `local_pods` the ones on this node with their host veths."""
    b = _Builder(index=_Index(pods, namespaces))
    by_ns: dict[str, list[NetworkPolicy]] = defaultdict(list)
    for pol in sorted(policies, key=lambda p: p.key):
        by_ns[pol.namespace].append(pol)
    chains: dict[str, tuple[str, ...]] = {}
    comments: dict[str, str] = {}
    ingress: dict[str, str] = {}
    egress: dict[str, str] = {}
    for lp in sorted(local_pods, key=lambda lp: lp.ifname):
        pod = lp.pod
        if pod.host_network:
            continue
        selecting = [p for p in by_ns.get(pod.namespace, ()) if p.selects(pod)]
        cid = pod_chain_id(pod)
        for direction, ptype, mapping in (("in", "Ingress", ingress), ("out", "Egress", egress)):
            pols = [p for p in selecting if ptype in p.policy_types]
            if not pols:
                continue
            ct = "accept" if direction == "in" else "return"
            lines = [f"ct state established,related {ct}"]
            seen: set[str] = set()
            for pol in pols:
                for rule in pol.ingress if direction == "in" else pol.egress:
                    for line in _rule_lines(b, rule, pol.namespace, pod, direction):
                        if line not in seen:
                            seen.add(line)
                            lines.append(line)
            lines.append("drop")
            name = f"{'in' if direction == 'in' else 'eg'}_{cid}"
            chains[name] = tuple(lines)
            word = "ingress" if direction == "in" else "egress"
            comments[name] = f"{word} {pod.namespace}/{pod.name}"
            mapping[lp.ifname] = name
    return Ruleset(sets=b.sets, chains=chains, comments=comments, ingress=ingress, egress=egress)


# ---------------------------------------------------------------------------
# Rendering


def _q(ifname: str) -> str:
    return '"' + ifname.replace('"', "") + '"'


def _elems(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _set_decl(s: NftSet) -> str:
    flags = " flags interval;" if s.interval else ""
    return f"type {s.type};{flags}"


_BASE = (
    f"chain forward {{ type filter hook forward priority filter; policy accept; "
    f"iifname vmap @{EGRESS_MAP}; oifname vmap @{INGRESS_MAP}; }}"
)


def render_full(rs: Ruleset) -> str:
    """A script that atomically replaces table inet flock with `rs` (and creates it
    if absent). Other tables are never named."""
    out = [
        f"add table {FAMILY} {TABLE}",
        f"delete table {FAMILY} {TABLE}",
        f"add table {FAMILY} {TABLE}",
    ]
    out.extend(_create_lines(rs))
    return "\n".join(out) + "\n"


def _create_lines(rs: Ruleset) -> list[str]:
    t = f"{FAMILY} {TABLE}"
    out: list[str] = []
    for s in sorted(rs.sets.values(), key=lambda s: s.name):
        out.append(f"add set {t} {s.name} {{ {_set_decl(s)} }}")
        if s.elements:
            out.append(f"add element {t} {s.name} {{ {_elems(s.elements)} }}")
    for name in sorted(rs.chains):
        out.extend(_chain_lines(rs, name, new=True))
    for m, entries in ((INGRESS_MAP, rs.ingress), (EGRESS_MAP, rs.egress)):
        out.append(f"add map {t} {m} {{ type ifname : verdict; }}")
        if entries:
            body = ", ".join(f"{_q(k)} : jump {v}" for k, v in sorted(entries.items()))
            out.append(f"add element {t} {m} {{ {body} }}")
    out.append(f"add {_BASE.replace('chain forward', f'chain {t} forward')}")
    return out


def _chain_lines(rs: Ruleset, name: str, *, new: bool) -> list[str]:
    t = f"{FAMILY} {TABLE}"
    out = []
    if new:
        comment = rs.comments.get(name, "").replace('"', "")
        out.append(f'add chain {t} {name} {{ comment "{comment}"; }}')
    else:
        out.append(f"flush chain {t} {name}")
    out.extend(f"add rule {t} {name} {line}" for line in rs.chains[name])
    return out


def render_update(old: Ruleset, new: Ruleset) -> str:
    """The smallest transaction taking the kernel from `old` to `new`; "" if equal.
    Order: new sets and chains, element deltas, chain refills, map entries, then
    removals (so nothing is deleted while a rule still refers to it)."""
    t = f"{FAMILY} {TABLE}"
    out: list[str] = []
    for name in sorted(new.sets.keys() - old.sets.keys()):
        s = new.sets[name]
        out.append(f"add set {t} {name} {{ {_set_decl(s)} }}")
        if s.elements:
            out.append(f"add element {t} {name} {{ {_elems(s.elements)} }}")
    for name in sorted(new.sets.keys() & old.sets.keys()):
        o, n = old.sets[name], new.sets[name]
        if o == n:
            continue
        gone = o.elements - n.elements
        added = n.elements - o.elements
        if gone:
            out.append(f"delete element {t} {name} {{ {_elems(gone)} }}")
        if added:
            out.append(f"add element {t} {name} {{ {_elems(added)} }}")
    for name in sorted(new.chains.keys() - old.chains.keys()):
        out.extend(_chain_lines(new, name, new=True))
    for name in sorted(new.chains.keys() & old.chains.keys()):
        if new.chains[name] != old.chains[name]:
            out.extend(_chain_lines(new, name, new=False))
    for m, o_map, n_map in (
        (INGRESS_MAP, old.ingress, new.ingress),
        (EGRESS_MAP, old.egress, new.egress),
    ):
        gone_keys = sorted(k for k in o_map if n_map.get(k) != o_map[k])
        add_keys = sorted(k for k in n_map if o_map.get(k) != n_map[k])
        if gone_keys:
            out.append(f"delete element {t} {m} {{ {', '.join(_q(k) for k in gone_keys)} }}")
        if add_keys:
            body = ", ".join(f"{_q(k)} : jump {n_map[k]}" for k in add_keys)
            out.append(f"add element {t} {m} {{ {body} }}")
    for name in sorted(old.chains.keys() - new.chains.keys()):
        out.append(f"delete chain {t} {name}")
    for name in sorted(old.sets.keys() - new.sets.keys()):
        out.append(f"delete set {t} {name}")
    return "\n".join(out) + "\n" if out else ""
