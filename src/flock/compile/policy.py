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
* peer sets: one named set per distinct (`from`/`to` list, family): a hash set of pod
  addresses, or, when the list has an ipBlock, an interval set of non-overlapping
  ranges (`except` already subtracted; pod addresses inside a block absorbed). A rule
  costs one set lookup whatever the number of pods it names.
* named ports: ingress names resolve per destination pod at compile time (the
  destination is the local pod). Egress names resolve per destination too, through
  a set `np_<name>_<proto>_<fam>` of `address . port` over every pod that declares
  that name. An unknown name matches nothing.

Traffic between a pod and its own node passes through input/output, which we do
not hook: Kubernetes allows it whatever the policy.

`PolicyCompiler.compile` is pure in its result (a fresh compiler gives the same
ruleset) but keeps indexes between calls, so that one changed pod or policy costs
work in proportion to the change. `render_full` gives a script that replaces the
table atomically; `render_update` gives the minimal transaction from one compiled
state to another (element adds and deletes, chain flush + refill, map entries),
applied atomically by `nft -f`.
"""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import re
import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from flock.model import IPAddress
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

_FAM_KW = {4: "ip", 6: "ip6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_PROTO_KW: dict[Proto, str] = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]")


@dataclass(frozen=True, slots=True)
class LocalPod:
    """A pod on this node: its host-side veth name and its addresses."""

    pod: Pod
    ifname: str
    ips: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        # The name goes into nft text: accept only what Linux and our datapath use.
        if not _IFNAME.match(self.ifname):
            raise ValueError(
                f"LocalPod {self.pod.namespace}/{self.pod.name}: bad interface name {self.ifname!r}"
            )


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


def _ntop(fam: int, packed: bytes) -> str:
    """Address text, as `str(ipaddress…)` gives it but several times faster (libc)."""
    return socket.inet_ntop(socket.AF_INET if fam == 4 else socket.AF_INET6, packed)


def _text(fam: int, value: int) -> str:
    return _ntop(fam, value.to_bytes(4 if fam == 4 else 16, "big"))


def _render_range(fam: int, s: int, e: int) -> str:
    if s == e:
        return _text(fam, s)
    size = e - s + 1
    if size & (size - 1) == 0 and s % size == 0:
        bits = 32 if fam == 4 else 128
        return f"{_text(fam, s)}/{bits - size.bit_length() + 1}"
    return f"{_text(fam, s)}-{_text(fam, e)}"


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


# ---------------------------------------------------------------------------
# Incremental state: pods indexed, peer sets kept up to date element by element


PodKey = tuple[str, str]


_NAME_OK: dict[str, bool] = {}


def _port_name_ok(name: str) -> bool:
    """valid_port_name, memoised: a cluster uses a handful of port names."""
    ok = _NAME_OK.get(name)
    if ok is None:
        ok = valid_port_name(name)
        if len(_NAME_OK) < 4096:
            _NAME_OK[name] = ok
    return ok


class _PodInfo:
    """What the compiler needs from one pod, computed once per pod object."""

    __slots__ = ("addrs", "gen", "named", "pod")

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.gen = 0  # the compile round that last saw this pod
        # family -> [(int, text)]
        self.addrs: dict[int, list[tuple[int, str]]] = {4: [], 6: []}
        for ip in pod.ips:
            value = int(ip)
            self.addrs[ip.version].append((value, _text(ip.version, value)))
        # (name, proto, fam) -> {"addr . port"}
        self.named: dict[tuple[str, Proto, int], set[str]] = {}
        for cp in pod.container_ports:
            if cp.name and _port_name_ok(cp.name):
                for fam, lst in self.addrs.items():
                    for _, text in lst:
                        self.named.setdefault((cp.name, cp.protocol, fam), set()).add(
                            f"{text} . {cp.port}"
                        )


class _PeerSet:
    """One named nft set: the addresses of a `from`/`to` list, for one family."""

    __slots__ = (
        "_nft",
        "blocks",
        "counts",
        "fam",
        "interval",
        "members",
        "name",
        "peers",
        "policy_ns",
    )

    def __init__(self, name: str, peers: tuple[Peer, ...], policy_ns: str, fam: int) -> None:
        self.name = name
        self.peers = peers
        self.policy_ns = policy_ns
        self.fam = fam
        blocks = [
            p.ip_block for p in peers if p.ip_block is not None and p.ip_block.cidr.version == fam
        ]
        self.interval = bool(blocks)
        self.blocks: list[tuple[int, int]] = []
        for b in blocks:
            self.blocks.extend(_subtract(_net_range(b.cidr), (_net_range(e) for e in b.except_)))
        self.members: dict[PodKey, list[tuple[int, str]]] = {}
        # address text -> number of member pods holding it (hash sets only)
        self.counts: dict[str, int] = {}
        self._nft: NftSet | None = None  # None: to be recomputed

    def selects(self, info: _PodInfo, ns_labels: Mapping[str, str]) -> bool:
        return any(p.selects_pod(info.pod, ns_labels, self.policy_ns) for p in self.peers)

    def add(self, key: PodKey, addrs: list[tuple[int, str]]) -> None:
        self.members[key] = addrs
        for _, t in addrs:
            self.counts[t] = self.counts.get(t, 0) + 1
        self._nft = None

    def remove(self, key: PodKey) -> None:
        for _, t in self.members.pop(key):
            self.counts[t] -= 1
            if not self.counts[t]:
                del self.counts[t]
        self._nft = None

    def update(self, key: PodKey, info: _PodInfo | None, ns_labels: Mapping[str, str]) -> None:
        addrs = info.addrs[self.fam] if info is not None else None
        if info is not None and addrs and self.selects(info, ns_labels):
            old = self.members.get(key)
            if old != addrs:
                if old is not None:
                    self.remove(key)
                self.add(key, addrs)
        elif key in self.members:
            self.remove(key)

    def reset(self) -> None:
        self.members.clear()
        self.counts.clear()
        self._nft = None

    def nft(self) -> NftSet:
        if self._nft is None:
            if self.interval:
                ranges = list(self.blocks)
                ranges.extend((i, i) for lst in self.members.values() for i, _ in lst)
                elems = frozenset(_render_range(self.fam, s, e) for s, e in _merge(ranges))
            else:
                elems = frozenset(self.counts)
            self._nft = NftSet(self.name, _ADDR_TYPE[self.fam], self.interval, elems)
        return self._nft


class PolicyCompiler:
    """Compiles `PolicyInputs` to a `Ruleset`, reusing work from its previous call.

    The result is always exactly what a fresh compiler would produce (the unit tests
    replay state sequences to check this); only the cost differs. Pods are compared
    by identity, so a datastore that hands back the same frozen `Pod` object for an
    unchanged pod makes a one-pod change cost one pod's worth of work: the pod is
    re-indexed and checked against each live peer set, and only the chains of local
    pods whose pod object or selecting policies changed are rebuilt.
    """

    def __init__(self) -> None:
        self._ns_labels: dict[str, Mapping[str, str]] = {}
        self._gen = 0
        self._ns_policies: dict[str, tuple[NetworkPolicy, ...]] = {}
        self._locals: dict[str, _LocalOut] = {}  # by host veth name
        self._out_chains: dict[str, tuple[str, ...]] = {}
        self._out_comments: dict[str, str] = {}
        self._out_ingress: dict[str, str] = {}
        self._out_egress: dict[str, str] = {}
        self._uses: dict[str, int] = {}  # set name -> number of chains using it
        self._by_id: dict[int, _PodInfo] = {}  # id(pod object) -> info, for the fast path
        self._infos: dict[PodKey, _PodInfo] = {}
        self._by_ns: dict[str, dict[PodKey, _PodInfo]] = defaultdict(dict)
        self._by_label: dict[tuple[str, str, str], dict[PodKey, _PodInfo]] = defaultdict(dict)
        self._named: dict[tuple[str, Proto, int], dict[str, int]] = defaultdict(dict)
        self._named_cache: dict[tuple[str, Proto, int], frozenset[str]] = {}
        self._peer_sets: dict[str, _PeerSet] = {}
        self._peer_names: dict[tuple[int, int], tuple[tuple[Peer, ...], str | None]] = {}

    # -- pods and namespaces ---------------------------------------------------

    def _labels_of(self, ns: str) -> Mapping[str, str]:
        return self._ns_labels.get(ns) or {"kubernetes.io/metadata.name": ns}

    def _set_namespaces(self, namespaces: Mapping[str, Namespace]) -> None:
        labels: dict[str, Mapping[str, str]] = {
            n: dict(namespace_labels(namespaces, n)) for n in namespaces
        }
        if labels != self._ns_labels:
            self._ns_labels = labels
            for ps in self._peer_sets.values():  # selections may all change: rebuild
                ps.reset()
                self._fill(ps)

    def _fill(self, ps: _PeerSet) -> None:
        """Add every pod `ps` selects, using the namespace and label indexes."""
        for peer in ps.peers:
            if peer.ip_block is not None:
                continue
            if peer.namespace_selector is None:
                namespaces = [ps.policy_ns]
            else:
                sel = peer.namespace_selector
                namespaces = [n for n in self._by_ns if sel.matches(self._labels_of(n))]
            psel = peer.pod_selector
            for ns in namespaces:
                cands: Mapping[PodKey, _PodInfo]
                if psel is not None and psel.match_labels:
                    postings = [self._by_label.get((ns, k, v), {}) for k, v in psel.match_labels]
                    cands = min(postings, key=len)
                else:
                    cands = self._by_ns.get(ns, {})
                for key, info in cands.items():
                    if key in ps.members or not info.addrs[ps.fam]:
                        continue
                    if psel is None or psel.matches(info.pod.labels):
                        ps.add(key, info.addrs[ps.fam])

    def _index(self, key: PodKey, old: _PodInfo | None, new: _PodInfo | None) -> None:
        if old is not None:  # empty index entries are dropped: labels churn with rollouts
            self._by_id.pop(id(old.pod), None)
            ns_pods = self._by_ns[key[0]]
            del ns_pods[key]
            if not ns_pods:
                del self._by_ns[key[0]]
            for k, v in old.pod.labels.items():
                posting = self._by_label[(key[0], k, v)]
                del posting[key]
                if not posting:
                    del self._by_label[(key[0], k, v)]
            for nk, elems in old.named.items():
                counts = self._named[nk]
                for e in elems:
                    counts[e] -= 1
                    if not counts[e]:
                        del counts[e]
                if not counts:
                    del self._named[nk]
                self._named_cache.pop(nk, None)
        if new is not None:
            self._by_id[id(new.pod)] = new
            self._by_ns[key[0]][key] = new
            for k, v in new.pod.labels.items():
                self._by_label[(key[0], k, v)][key] = new
            for nk, elems in new.named.items():
                counts = self._named[nk]
                for e in elems:
                    counts[e] = counts.get(e, 0) + 1
                self._named_cache.pop(nk, None)
            self._infos[key] = new
        else:
            self._infos.pop(key, None)
        nl = self._labels_of(key[0])
        for ps in self._peer_sets.values():
            ps.update(key, new, nl)

    def _set_pods(self, pods: Sequence[Pod]) -> None:
        infos = self._infos
        self._gen += 1
        gen = self._gen
        before = len(infos)
        unchanged = 0
        by_id = self._by_id
        for p in pods:
            hit = by_id.get(id(p))
            if hit is not None and hit.pod is p:  # the same object as last time
                hit.gen = gen
                unchanged += 1
                continue
            if p.host_network:
                continue  # its addresses are the node's: never a pod peer
            key = (p.namespace, p.name)
            old = infos.get(key)
            if old is not None and old.pod is p:
                old.gen = gen
                unchanged += 1
            else:
                info = _PodInfo(p)
                info.gen = gen
                self._index(key, old, info)
                if old is not None:
                    unchanged += 1  # replaced, not added
        if unchanged < before:  # some pods are gone: the ones this round did not see
            for key in [k for k, info in infos.items() if info.gen != gen]:
                self._index(key, infos[key], None)

    # -- sets --------------------------------------------------------------------

    def _peer_set(self, peers: tuple[Peer, ...], policy_ns: str, fam: int) -> str | None:
        """Name of the set holding `peers`' addresses of family `fam`; None if the
        list can never hold an address of that family (ipBlocks of the other family)."""
        hit = self._peer_names.get((id(peers), fam))
        if hit is not None and hit[0] is peers:
            return hit[1]
        if not any(p.ip_block is None or p.ip_block.cidr.version == fam for p in peers):
            name = None
        else:
            name = f"peer_{_digest(_peers_key(peers, policy_ns))}_{fam}"
            if name not in self._peer_sets:
                ps = _PeerSet(name, peers, policy_ns, fam)
                self._fill(ps)
                self._peer_sets[name] = ps
        self._peer_names[(id(peers), fam)] = (peers, name)
        return name

    def _named_elements(self, nk: tuple[str, Proto, int]) -> frozenset[str]:
        hit = self._named_cache.get(nk)
        if hit is None:
            hit = frozenset(self._named.get(nk, ()))
            self._named_cache[nk] = hit
        return hit

    # -- chains --------------------------------------------------------------------

    def _rule_lines(
        self, rule: Rule, policy_ns: str, local: Pod, direction: str, uses: set[str]
    ) -> list[str]:
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
                set_name = self._peer_set(rule.peers, policy_ns, fam)
                if set_name is None:
                    continue
                uses.add(set_name)
                peer = f"{_FAM_KW[fam]} {addr} @{set_name} "
            if ports is None:
                lines.append(f"{peer}{verdict}")
            else:
                lines.extend(f"{peer}{clause} {verdict}" for _, clause in ports)
            for name, proto in named:
                set_name = f"np_{name}_{_PROTO_KW[proto]}_{fam}"
                uses.add(set_name)
                lines.append(
                    f"{peer}{_FAM_KW[fam]} daddr . {_PROTO_KW[proto]} dport @{set_name} {verdict}"
                )
        return lines

    def _chain(self, pod: Pod, pols: tuple[NetworkPolicy, ...], direction: str) -> _Chain:
        ct = "accept" if direction == "in" else "return"
        lines = [f"ct state established,related {ct}"]
        seen: set[str] = set()
        uses: set[str] = set()
        for pol in pols:
            for rule in pol.ingress if direction == "in" else pol.egress:
                for line in self._rule_lines(rule, pol.namespace, pod, direction, uses):
                    if line not in seen:
                        seen.add(line)
                        lines.append(line)
        lines.append("drop")
        return _Chain(tuple(lines), frozenset(uses))

    def _local_out(
        self, lp: LocalPod, ns_pols: tuple[NetworkPolicy, ...], old: _LocalOut | None
    ) -> _LocalOut:
        pod = lp.pod
        selecting = [p for p in ns_pols if p.selects(pod)]
        cid = _digest(f"{pod.namespace}/{pod.name}/{lp.ifname}")
        made: list[_PodChain] = []
        for direction, ptype in (("in", "Ingress"), ("out", "Egress")):
            pols = tuple(p for p in selecting if ptype in p.policy_types)
            if not pols:
                continue
            prev = next((c for c in old.chains if c.direction == direction), None) if old else None
            if (
                prev is not None
                and old is not None
                and old.pod is pod
                and len(prev.policies) == len(pols)
                and all(a is b for a, b in zip(prev.policies, pols, strict=True))
            ):
                made.append(prev)
                continue
            word = "ingress" if direction == "in" else "egress"
            made.append(
                _PodChain(
                    direction=direction,
                    name=f"{'in' if direction == 'in' else 'eg'}_{cid}",
                    comment=f"{word} {pod.namespace}/{pod.name}",
                    policies=pols,
                    chain=self._chain(pod, pols, direction),
                )
            )
        return _LocalOut(pod, lp.ifname, tuple(made))

    def _install(self, out: _LocalOut) -> None:
        for c in out.chains:
            self._out_chains[c.name] = c.chain.lines
            self._out_comments[c.name] = c.comment
            (self._out_ingress if c.direction == "in" else self._out_egress)[out.ifname] = c.name
            for u in c.chain.uses:
                self._uses[u] = self._uses.get(u, 0) + 1

    def _retract(self, out: _LocalOut) -> None:
        for c in out.chains:
            del self._out_chains[c.name]
            del self._out_comments[c.name]
            del (self._out_ingress if c.direction == "in" else self._out_egress)[out.ifname]
            for u in c.chain.uses:
                self._uses[u] -= 1
                if not self._uses[u]:
                    del self._uses[u]

    # -- the whole ruleset -------------------------------------------------------------

    def compile(self, inputs: PolicyInputs) -> Ruleset:
        # A first compile allocates ~10 small objects per pod; with 10,000 pods the
        # cyclic GC would rescan the growing heap many times over (4x the run time).
        # Nothing here makes reference cycles, so it is paused for the call.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._compile(inputs)
        finally:
            if was_enabled:
                gc.enable()

    def _compile(self, inputs: PolicyInputs) -> Ruleset:
        self._set_namespaces(inputs.namespaces)
        self._set_pods(inputs.pods)
        grouped: dict[str, list[NetworkPolicy]] = defaultdict(list)
        for pol in sorted(inputs.policies, key=lambda p: p.key):
            grouped[pol.namespace].append(pol)
        by_ns = {ns: tuple(pols) for ns, pols in grouped.items()}
        prev = self._ns_policies
        same_ns: dict[str, bool] = {}

        def unchanged(ns: str) -> bool:
            hit = same_ns.get(ns)
            if hit is None:
                old, new = prev.get(ns, ()), by_ns.get(ns, ())
                hit = len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))
                same_ns[ns] = hit
            return hit

        # Local pods: only those whose pod object, veth or namespace policies changed
        # are recompiled; the output dicts are patched in place.
        outs: dict[str, _LocalOut] = {}
        for lp in inputs.local_pods:
            pod = lp.pod
            if pod.host_network or lp.ifname in outs:
                continue  # no veth of ours / a duplicate entry: the first one wins
            old = self._locals.get(lp.ifname)
            if old is not None and old.pod is pod and unchanged(pod.namespace):
                outs[lp.ifname] = old
                continue
            out = self._local_out(lp, by_ns.get(pod.namespace, ()), old)
            if old is not None:
                self._retract(old)
            self._install(out)
            outs[lp.ifname] = out
        for ifname, old in self._locals.items():
            if ifname not in outs:
                self._retract(old)
        self._locals = outs
        self._ns_policies = by_ns
        uses = self._uses
        sets: dict[str, NftSet] = {}
        for name in uses:
            ps = self._peer_sets.get(name)
            if ps is not None:
                sets[name] = ps.nft()
            else:
                _, pname, proto_kw, fam = name.split("_")
                proto = next(p for p, kw in _PROTO_KW.items() if kw == proto_kw)
                nk = (pname, proto, int(fam))
                sets[name] = NftSet(
                    name, f"{_ADDR_TYPE[int(fam)]} . inet_service", False, self._named_elements(nk)
                )
        # forget peer sets no chain uses any more
        for name in [n for n in self._peer_sets if n not in uses]:
            del self._peer_sets[name]
        self._peer_names = {k: v for k, v in self._peer_names.items() if v[1] in uses}
        return Ruleset(
            sets=sets,
            chains=dict(self._out_chains),
            comments=dict(self._out_comments),
            ingress=dict(self._out_ingress),
            egress=dict(self._out_egress),
        )


@dataclass(frozen=True, slots=True)
class _Chain:
    lines: tuple[str, ...]
    uses: frozenset[str]


@dataclass(frozen=True, slots=True)
class _PodChain:
    direction: str  # "in" | "out"
    name: str
    comment: str
    policies: tuple[NetworkPolicy, ...]  # the selecting policies it was built from
    chain: _Chain


@dataclass(frozen=True, slots=True)
class _LocalOut:
    """What one local pod contributes to the ruleset."""

    pod: Pod
    ifname: str
    chains: tuple[_PodChain, ...]


def _port_clauses(ports: tuple[PolicyPort, ...], dst: Pod | None) -> list[tuple[Proto, str]] | None:
    """Numeric port matches per protocol, as nft text. None means 'every port and
    protocol'. Named ports resolve against `dst` (ingress: the local pod); with
    dst None (egress) they are left out here and matched through `np_*` sets."""
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
    """Compile from scratch (a fresh `PolicyCompiler`)."""
    return PolicyCompiler().compile(inputs)


def compile_ruleset(
    *,
    local_pods: Sequence[LocalPod],
    pods: Sequence[Pod],
    namespaces: Mapping[str, Namespace],
    policies: Sequence[NetworkPolicy],
) -> Ruleset:
    """The whole desired ruleset for this node. `pods` is every pod in the cluster
    (with addresses); `local_pods` the ones on this node with their host veths."""
    return compile_inputs(
        PolicyInputs(local_pods=local_pods, pods=pods, namespaces=namespaces, policies=policies)
    )


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
        comment = _COMMENT_UNSAFE.sub("", rs.comments.get(name, ""))
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
        if o is n or o == n:
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
