"""The incremental NetworkPolicy compiler: changes in, nft deltas out.

The compiler holds the cluster as it last saw it (pods indexed by namespace and
label, policies by namespace, the local pods with their veths) and the ruleset
compiled from it, and is told about changes one object at a time (`set_pod`,
`set_policy`, `set_namespace`, `set_local`, or `apply(PolicyChanges)`), or given a
whole view (`load(PolicyInputs)`) which it diffs by object identity. Each change
costs what it touches:

* a pod: its index entries, its named-port elements, and a membership check
  against each peer set (element deltas for the sets it enters or leaves);
* a policy: the local pods of its namespace are re-selected; a pod whose
  selecting policies are the same objects keeps its chain;
* a local pod: its own chains and map entries;
* a namespace's labels: the pods of that namespace against the peer sets that
  have a namespaceSelector.

Chains are content-addressed (`in_<digest>` / `eg_<digest>` of comment and rules),
so pods selected by the same policies share one chain, a chain never changes in
place, and a full compile and any sequence of incremental ones name everything
the same. `take_delta()` hands out what changed since the previous call as one
`Delta` (set element adds/deletes, new and removed chains and sets, map entries);
`ruleset()` gives the whole state. The unit property tests check that any
sequence of changes leaves `ruleset()` equal to a fresh compile of the final view,
and that the deltas replayed on the first state give it.
"""

from __future__ import annotations

import gc
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from flock.compile.policy.render import EGRESS_MAP, INGRESS_MAP, ChainDef, Delta, NftSet, Ruleset
from flock.compile.policy.sets import ADDR_TYPE, PeerSet, PodInfo, PodKey, SetState
from flock.model import IPAddress
from flock.model.pod import Namespace, Pod
from flock.model.policy import (
    AnyPolicy,
    IPBlock,
    LabelSelector,
    Peer,
    PolicyPort,
    Proto,
    RejectedPolicy,
    Rule,
)

_FAM_KW = {4: "ip", 6: "ip6"}
_PROTO_KW: dict[str, str] = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
_IFNAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,15}$")
_NS_NAME_LABEL = "kubernetes.io/metadata.name"
_COMMENT_MAX = 120  # nft keeps comments up to 128 bytes


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
class PolicyInputs:
    """Everything the compiler needs for one node, as the agent's datastore has it.

    `pods` is every pod of the cluster (keys unique), `local_pods` the ones on this
    node with their host veths. `rejected` holds the policies that did not parse,
    (namespace, name) -> `RejectedPolicy` (or just the reason): they allow nothing
    but still isolate what they may select (fail closed). With only a reason the
    compiler cannot tell what the policy selects, so it isolates its whole
    namespace in both directions.
    """

    local_pods: Sequence[LocalPod] = ()
    pods: Sequence[Pod] = ()
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    policies: Sequence[AnyPolicy] = ()
    rejected: Mapping[tuple[str, str], str | RejectedPolicy] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyChanges:
    """Changed objects since the previous update; None deletes. Keys: pods and
    policies by (namespace, name), namespaces by name, local pods by host veth.
    A policy that did not parse is given as its `RejectedPolicy` (fail closed)."""

    pods: Mapping[PodKey, Pod | None] = field(default_factory=dict)
    local_pods: Mapping[str, LocalPod | None] = field(default_factory=dict)
    namespaces: Mapping[str, Namespace | None] = field(default_factory=dict)
    policies: Mapping[PodKey, AnyPolicy | None] = field(default_factory=dict)


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


def _ns_labels(name: str, ns: Namespace | None) -> Mapping[str, str]:
    """A namespace's labels; Kubernetes always sets its name label."""
    if ns is None:
        return {_NS_NAME_LABEL: name}
    if _NS_NAME_LABEL in ns.labels:
        return ns.labels
    return {**ns.labels, _NS_NAME_LABEL: name}


class _Chain:
    """One per-pod policy chain, shared by every local pod that compiles to it."""

    __slots__ = ("applied", "comment", "lines", "name", "refs", "uses")

    def __init__(self, name: str, comment: str, lines: tuple[str, ...], uses: tuple[SetState, ...]):
        self.name = name
        self.comment = comment
        self.lines = lines
        self.uses = uses
        self.refs = 0  # map entries that jump to it
        self.applied = False


class _Local:
    """What one local pod is compiled to."""

    __slots__ = ("chains", "lp", "pols")

    def __init__(self, lp: LocalPod) -> None:
        self.lp = lp
        # direction -> (selecting policies, chain)
        self.pols: dict[str, tuple[AnyPolicy, ...]] = {}
        self.chains: dict[str, _Chain] = {}


class PolicyCompiler:
    """Compiles the cluster's NetworkPolicy for one node, change by change.

    The result never depends on the order or grouping of changes: `ruleset()` is
    always what a fresh compiler given the final view would produce.
    """

    def __init__(self) -> None:
        self._dirty_sets: set[SetState] = set()
        self._dirty_chains: set[_Chain] = set()
        self._dirty_maps: dict[tuple[str, str], str | None] = {}  # -> value in the kernel
        self._maps: dict[str, dict[str, str]] = {INGRESS_MAP: {}, EGRESS_MAP: {}}
        self._namespaces: dict[str, Namespace] = {}
        self._infos: dict[PodKey, PodInfo] = {}
        self._by_ns: dict[str, dict[PodKey, PodInfo]] = {}
        self._named: dict[tuple[str, str, int], SetState] = {}
        self._peer_sets: dict[str, PeerSet] = {}
        # Which peer sets a pod of a namespace can be in: those whose peers have a
        # namespaceSelector (any namespace), and those of pod selectors in that
        # namespace. ipBlock-only sets hold no pods and are in neither.
        self._sets_any_ns: set[PeerSet] = set()
        self._sets_in_ns: dict[str, set[PeerSet]] = {}
        self._peer_names: dict[tuple[int, int], tuple[tuple[Peer, ...], str | None]] = {}
        self._seen_pods: dict[int, Pod] | None = {}  # load()'s previous view, by id
        self._policies: dict[PodKey, AnyPolicy] = {}
        self._pols_by_ns: dict[str, dict[str, AnyPolicy]] = {}
        self._ns_pols: dict[str, tuple[AnyPolicy, ...]] = {}
        self._str_rejects: dict[PodKey, RejectedPolicy] = {}
        self._local_pods: dict[str, LocalPod] = {}  # by veth: what should be compiled
        self._locals: dict[str, _Local] = {}  # by veth: what is compiled
        self._locals_by_ns: dict[str, set[str]] = {}
        self._stale: set[str] = set()  # veths to recompile
        self._chains: dict[str, _Chain] = {}
        self._sel_memo: dict[int, tuple[tuple[Peer, ...], list[tuple[PodKey, PodInfo]]]] = {}
        self._memo: dict[tuple[object, ...], tuple[tuple[AnyPolicy, ...], _Chain]] = {}

    # -- changes ---------------------------------------------------------------------

    def apply(self, changes: PolicyChanges) -> None:
        with _no_gc():
            self._apply(changes)

    def _apply(self, changes: PolicyChanges) -> None:
        if changes.pods:
            self._seen_pods = None  # load()'s view is no longer the compiler's
        for name, ns in changes.namespaces.items():
            self.set_namespace(name, ns)
        for key, pod in changes.pods.items():
            self.set_pod(key, pod)
        for key, pol in changes.policies.items():
            self.set_policy(key, pol)
        for ifname, lp in changes.local_pods.items():
            self.set_local(ifname, lp)

    def set_namespace(self, name: str, ns: Namespace | None) -> None:
        old = self._namespaces.get(name)
        if old is ns:
            return
        before = _ns_labels(name, old)
        if ns is None:
            del self._namespaces[name]
        else:
            self._namespaces[name] = ns
        after = _ns_labels(name, ns)
        if before == after:
            return
        pods = self._by_ns.get(name, {})
        for ps in self._sets_any_ns:
            for key, info in pods.items():
                ps.update(key, info, after)

    def set_pod(self, key: PodKey, pod: Pod | None) -> None:
        """A pod of the cluster (a peer); None: deleted. hostNetwork pods are never
        peers (their addresses are the node's)."""
        if pod is not None and pod.host_network:
            pod = None
        old = self._infos.get(key)
        if old is None and pod is None:
            return
        if old is not None and old.pod is pod:
            return
        self._index(key, old, PodInfo(pod) if pod is not None else None)

    def set_policy(self, key: PodKey, pol: AnyPolicy | None) -> None:
        old = self._policies.get(key)
        if old is pol or (old is not None and pol is not None and old == pol):
            return
        ns, name = key
        by_name = self._pols_by_ns.setdefault(ns, {})
        if pol is None:
            del self._policies[key]
            del by_name[name]
        else:
            self._policies[key] = pol
            by_name[name] = pol
        if by_name:
            self._ns_pols[ns] = tuple(by_name[n] for n in sorted(by_name))
        else:
            del self._pols_by_ns[ns]
            self._ns_pols.pop(ns, None)
        # Only the local pods the old or the new policy selects can change: the others
        # keep their selecting policies (the same objects, in the same order).
        for ifname in self._locals_by_ns.get(ns, ()):
            pod = self._local_pods[ifname].pod
            if (old is not None and old.selects(pod)) or (pol is not None and pol.selects(pod)):
                self._stale.add(ifname)

    def set_local(self, ifname: str, lp: LocalPod | None) -> None:
        """A pod on this node, by its host veth; None: gone."""
        if lp is not None and lp.pod.host_network:
            lp = None  # no veth of ours
        old = self._local_pods.get(ifname)
        if old is lp:
            return
        if old is not None:
            on = self._locals_by_ns[old.pod.namespace]
            on.discard(ifname)
            if not on:
                del self._locals_by_ns[old.pod.namespace]
        if lp is None:
            del self._local_pods[ifname]
        else:
            self._local_pods[ifname] = lp
            self._locals_by_ns.setdefault(lp.pod.namespace, set()).add(ifname)
        self._stale.add(ifname)

    def load(self, inputs: PolicyInputs) -> None:
        """Make the compiler's view equal to `inputs`, touching only what differs.
        Objects are compared by identity first: a datastore that hands back the same
        frozen objects for unchanged pods and policies makes this cost a pass of
        dictionary lookups plus the work of what changed."""
        with _no_gc():
            self._load(inputs)

    def _load(self, inputs: PolicyInputs) -> None:
        seen_ns = inputs.namespaces
        for name, ns in seen_ns.items():
            if self._namespaces.get(name) is not ns:
                self.set_namespace(name, ns)
        if len(self._namespaces) != len(seen_ns):
            for name in [n for n in self._namespaces if n not in seen_ns]:
                self.set_namespace(name, None)

        # Pods: by object identity against the previous view (C-speed set operations
        # over ids; `_seen_pods` holds the objects, so their ids stay theirs).
        cur = dict(zip(map(id, inputs.pods), inputs.pods, strict=True))
        seen = self._seen_pods
        if seen is None:  # changes came through apply(): compare every pod by key
            for p in inputs.pods:
                self.set_pod((p.namespace, p.name), p)
            live = set(map(_pod_key, inputs.pods))
            for key in [k for k in self._infos if k not in live]:
                self.set_pod(key, None)
        elif cur.keys() != seen.keys():
            gone = [seen[i] for i in seen.keys() - cur.keys()]
            for p in (cur[i] for i in cur.keys() - seen.keys()):
                self.set_pod((p.namespace, p.name), p)
            for p in gone:
                info = self._infos.get((p.namespace, p.name))
                if info is not None and info.pod is p:  # not replaced by a new object
                    self.set_pod((p.namespace, p.name), None)
        self._seen_pods = cur

        pols: dict[PodKey, AnyPolicy] = dict(
            zip(map(_policy_key, inputs.policies), inputs.policies, strict=True)
        )
        for key, why in inputs.rejected.items():
            if isinstance(why, str):
                hit_r = self._str_rejects.get(key)
                if hit_r is None or hit_r.reason != why:
                    hit_r = RejectedPolicy(namespace=key[0], name=key[1], reason=why)
                    self._str_rejects[key] = hit_r
                pols[key] = hit_r
            else:
                pols[key] = why
        for key in [k for k in self._str_rejects if k not in inputs.rejected]:
            del self._str_rejects[key]
        for key, pol in pols.items():
            if self._policies.get(key) is not pol:
                self.set_policy(key, pol)
        if len(self._policies) != len(pols):
            for key in [k for k in self._policies if k not in pols]:
                self.set_policy(key, None)

        # Local pods by veth; with duplicate entries the first one wins.
        lps = inputs.local_pods
        want = dict(zip(map(_ifname, reversed(lps)), reversed(lps), strict=True))
        have = self._local_pods
        for ifname, lp in want.items():
            if have.get(ifname) is not lp:
                self.set_local(ifname, lp)
        for ifname in have.keys() - want.keys():
            self.set_local(ifname, None)

    # -- results -----------------------------------------------------------------------

    def compile(self, inputs: PolicyInputs) -> Ruleset:
        """The whole ruleset for `inputs` (as `load` then `ruleset`), leaving the
        compiler ready for changes from there."""
        # A first compile allocates ~10 small objects per pod; with 10,000 pods the
        # cyclic GC would rescan the growing heap many times over (4x the run time).
        # Nothing here makes reference cycles, so it is paused for the call.
        with _no_gc():
            self.load(inputs)
            self.take_delta()
            return self.ruleset()

    def take_delta(self) -> Delta:
        """What changed since the previous call, as one transaction."""
        with _no_gc():
            self._settle()
            return self._take()

    def ruleset(self) -> Ruleset:
        """The whole current state."""
        self._settle()
        sets = {
            s.name: NftSet(s.name, s.type, s.interval, frozenset(s.elems))
            for s in self._all_sets()
            if s.uses > 0
        }
        live = [c for c in self._chains.values() if c.refs > 0]
        return Ruleset(
            sets=sets,
            chains={c.name: c.lines for c in live},
            comments={c.name: c.comment for c in live},
            ingress=dict(self._maps[INGRESS_MAP]),
            egress=dict(self._maps[EGRESS_MAP]),
        )

    def summary(self) -> dict[str, int]:
        """Ruleset counts (as `Ruleset.summary`), without building the ruleset."""
        self._settle()
        live_sets = [s for s in self._all_sets() if s.uses > 0]
        live = [c for c in self._chains.values() if c.refs > 0]
        return {
            "sets": len(live_sets),
            "set_elements": sum(len(s.elems) for s in live_sets),
            "chains": len(live),
            "rules": sum(len(c.lines) for c in live),
            "ingress_isolated": len(self._maps[INGRESS_MAP]),
            "egress_isolated": len(self._maps[EGRESS_MAP]),
        }

    def rejected(self) -> dict[PodKey, RejectedPolicy]:
        """The policies in force only as fail-closed stand-ins, with their reasons."""
        return {k: p for k, p in self._policies.items() if isinstance(p, RejectedPolicy)}

    def _all_sets(self) -> list[SetState]:
        return [*self._peer_sets.values(), *self._named.values()]

    def _take(self) -> Delta:
        new_chains: list[ChainDef] = []
        del_chains: list[str] = []
        for ch in sorted(self._dirty_chains, key=lambda c: c.name):
            if ch.refs > 0:
                if not ch.applied:
                    new_chains.append(ChainDef(ch.name, ch.comment, ch.lines))
                    ch.applied = True
            else:
                if ch.applied:
                    del_chains.append(ch.name)
                    ch.applied = False
                if self._chains.get(ch.name) is ch:
                    del self._chains[ch.name]
        self._dirty_chains.clear()
        self._memo.clear()

        map_del: list[tuple[str, str]] = []
        map_add: list[tuple[str, str, str]] = []
        for (m, ifname), was in sorted(self._dirty_maps.items()):
            now = self._maps[m].get(ifname)
            if now != was:
                if was is not None:
                    map_del.append((m, ifname))
                if now is not None:
                    map_add.append((m, ifname, now))
        self._dirty_maps.clear()

        new_sets: list[NftSet] = []
        adds: list[tuple[str, tuple[str, ...]]] = []
        dels: list[tuple[str, tuple[str, ...]]] = []
        gone: list[str] = []
        dropped_peer = False
        for s in sorted(self._dirty_sets, key=lambda s: s.name):
            if s.uses > 0:
                if not s.applied:
                    new_sets.append(NftSet(s.name, s.type, s.interval, frozenset(s.elems)))
                    s.applied = True
                elif s.journal:
                    a = tuple(sorted(e for e, added in s.journal.items() if added))
                    d = tuple(sorted(e for e, added in s.journal.items() if not added))
                    if a:
                        adds.append((s.name, a))
                    if d:
                        dels.append((s.name, d))
                s.journal.clear()
                continue
            if s.applied:
                gone.append(s.name)
                s.applied = False
            s.journal.clear()
            if isinstance(s, PeerSet):
                if self._peer_sets.get(s.name) is s:
                    del self._peer_sets[s.name]
                    self._sets_any_ns.discard(s)
                    in_ns = self._sets_in_ns.get(s.policy_ns)
                    if in_ns is not None:
                        in_ns.discard(s)
                        if not in_ns:
                            del self._sets_in_ns[s.policy_ns]
                    dropped_peer = True
            else:  # refilled from the pods if a rule needs it again
                self._named = {k: v for k, v in self._named.items() if v is not s}
        self._dirty_sets.clear()
        if dropped_peer:
            self._peer_names.clear()  # a cache of names: it must not keep old peers alive
        return Delta(
            new_sets=tuple(new_sets),
            del_elements=tuple(dels),
            add_elements=tuple(adds),
            new_chains=tuple(new_chains),
            map_del=tuple(map_del),
            map_add=tuple(map_add),
            del_chains=tuple(del_chains),
            del_sets=tuple(gone),
        )

    # -- pods --------------------------------------------------------------------------

    def _labels_of(self, ns: str) -> Mapping[str, str]:
        return _ns_labels(ns, self._namespaces.get(ns))

    def _named_set(self, nk: tuple[str, str, int]) -> SetState:
        """The `address . port` set of a named port: made (and filled from every pod)
        when a rule first needs it, kept up to date by `_index` from then on."""
        s = self._named.get(nk)
        if s is None:
            name, proto, fam = nk
            s = SetState(
                f"np_{name}_{_PROTO_KW[proto]}_{fam}",
                f"{ADDR_TYPE[fam]} . inet_service",
                False,
                self._dirty_sets,
            )
            for info in self._infos.values():
                if info.pod.container_ports:
                    for e in info.named(name, proto, fam):
                        s.inc(e)
            self._named[nk] = s
            self._dirty_sets.add(s)
        return s

    def _index(self, key: PodKey, old: PodInfo | None, new: PodInfo | None) -> None:
        ns = key[0]
        if old is not None:  # empty index entries are dropped: namespaces come and go
            ns_pods = self._by_ns[ns]
            del ns_pods[key]
            if not ns_pods:
                del self._by_ns[ns]
        if new is not None:
            self._by_ns.setdefault(ns, {})[key] = new
            self._infos[key] = new
        else:
            del self._infos[key]
        for (name, proto, fam), s in self._named.items():
            if old is not None and old.pod.container_ports:
                for e in old.named(name, proto, fam):
                    s.dec(e)
            if new is not None and new.pod.container_ports:
                for e in new.named(name, proto, fam):
                    s.inc(e)
        labels = self._labels_of(ns)
        for ps in self._sets_any_ns:
            ps.update(key, new, labels)
        for ps in self._sets_in_ns.get(ns, ()):
            ps.update(key, new, labels)

    def _fill(self, ps: PeerSet) -> None:
        """Add every pod `ps` selects."""
        for key, info in self._selected(ps.peers, ps.policy_ns):
            if info.addrs[ps.fam]:
                ps.put(key, ps.contribution(info) or None)

    def _selected(self, peers: tuple[Peer, ...], policy_ns: str) -> list[tuple[PodKey, PodInfo]]:
        """The pods a `from`/`to` list selects, scanning only the namespaces its peers
        select; kept until the next `take` (the two families' sets ask alike)."""
        hit = self._sel_memo.get(id(peers))
        if hit is not None and hit[0] is peers:
            return hit[1]
        out: dict[PodKey, PodInfo] = {}
        for peer in peers:
            if peer.ip_block is not None:
                continue
            if peer.namespace_selector is None:
                namespaces = [policy_ns]
            else:
                sel = peer.namespace_selector
                namespaces = [n for n in self._by_ns if sel.matches(self._labels_of(n))]
            psel = peer.pod_selector
            for ns in namespaces:
                pods = self._by_ns.get(ns, {})
                if psel is None or psel.empty:
                    out.update(pods)
                else:
                    match = psel.matches
                    out.update((k, i) for k, i in pods.items() if match(i.pod.labels))
        found = list(out.items())
        self._sel_memo[id(peers)] = (peers, found)
        return found

    def _peer_set(self, peers: tuple[Peer, ...], policy_ns: str, fam: int) -> PeerSet | None:
        """The set holding `peers`' addresses of family `fam`; None if the list can
        never hold an address of that family (ipBlocks of the other family only)."""
        hit = self._peer_names.get((id(peers), fam))
        if hit is not None and hit[0] is peers:
            name = hit[1]
        else:
            if not any(p.ip_block is None or p.ip_block.cidr.version == fam for p in peers):
                name = None
            else:
                name = f"peer_{_digest(_peers_key(peers, policy_ns))}_{fam}"
            self._peer_names[(id(peers), fam)] = (peers, name)
        if name is None:
            return None
        ps = self._peer_sets.get(name)
        if ps is None:
            ps = PeerSet(name, peers, policy_ns, fam, self._dirty_sets)
            self._fill(ps)
            self._peer_sets[name] = ps
            self._dirty_sets.add(ps)
            if any(p.namespace_selector is not None for p in peers):
                self._sets_any_ns.add(ps)
            elif any(p.ip_block is None for p in peers):
                self._sets_in_ns.setdefault(policy_ns, set()).add(ps)
        return ps

    # -- local pods and their chains ---------------------------------------------------

    def _settle(self) -> None:
        """Recompile the local pods that changes marked stale."""
        stale, self._stale = self._stale, set()
        for ifname in sorted(stale):
            self._refresh(ifname)
        self._sel_memo.clear()  # pods may change before the next settle

    def _set_map(self, m: str, ifname: str, chain: str | None) -> None:
        entries = self._maps[m]
        cur = entries.get(ifname)
        if cur == chain:
            return
        self._dirty_maps.setdefault((m, ifname), cur)
        if chain is None:
            del entries[ifname]
        else:
            entries[ifname] = chain

    def _ref(self, ch: _Chain) -> None:
        ch.refs += 1
        if ch.refs == 1:
            for s in ch.uses:
                s.use(1)
            self._dirty_chains.add(ch)

    def _unref(self, ch: _Chain) -> None:
        ch.refs -= 1
        if not ch.refs:
            for s in ch.uses:
                s.use(-1)
            self._dirty_chains.add(ch)

    def _refresh(self, ifname: str) -> None:
        lp = self._local_pods.get(ifname)
        cur = self._locals.get(ifname)
        if lp is None:
            if cur is not None:
                for old_ch in cur.chains.values():
                    self._unref(old_ch)
                del self._locals[ifname]
            self._set_map(INGRESS_MAP, ifname, None)
            self._set_map(EGRESS_MAP, ifname, None)
            return
        pod = lp.pod
        selecting = [p for p in self._ns_pols.get(pod.namespace, ()) if p.selects(pod)]
        new = _Local(lp)
        for direction, ptype, m in (("in", "Ingress", INGRESS_MAP), ("out", "Egress", EGRESS_MAP)):
            pols = tuple(p for p in selecting if ptype in p.policy_types)
            prev = cur.chains.get(direction) if cur is not None else None
            ch: _Chain | None = None
            if pols:
                if (
                    cur is not None
                    and prev is not None
                    and cur.lp.pod is pod
                    and _same(cur.pols[direction], pols)
                ):
                    ch = prev
                else:
                    ch = self._chain_for(pod, pols, direction)
                new.pols[direction] = pols
                new.chains[direction] = ch
            if ch is not prev:
                if ch is not None:
                    self._ref(ch)
                if prev is not None:
                    self._unref(prev)
            self._set_map(m, ifname, ch.name if ch is not None else None)
        self._locals[ifname] = new

    def _chain_for(self, pod: Pod, pols: tuple[AnyPolicy, ...], direction: str) -> _Chain:
        # Ingress rules resolve named ports against the pod itself; egress rules do
        # not depend on the pod at all. Pods alike share the work and the chain.
        sig = pod.container_ports if direction == "in" else ()
        mkey = (direction, tuple(map(id, pols)), sig)
        hit = self._memo.get(mkey)
        if hit is not None and _same(hit[0], pols):
            return hit[1]
        lines, uses = self._chain_lines(pod, pols, direction)
        word = "ingress" if direction == "in" else "egress"
        names = " ".join(
            f"{p.name} rejected" if isinstance(p, RejectedPolicy) else p.name for p in pols
        )
        comment = f"{word} {pod.namespace}: {names}"
        if len(comment) > _COMMENT_MAX:
            comment = comment[: _COMMENT_MAX - 4] + " ..."
        body = "\n".join((comment, *lines))
        name = f"{'in' if direction == 'in' else 'eg'}_{_digest(body)}"
        ch = self._chains.get(name)
        if ch is None:
            ch = _Chain(name, comment, lines, uses)
            self._chains[name] = ch
            self._dirty_chains.add(ch)  # collected by the next take if never used
        self._memo[mkey] = (pols, ch)
        return ch

    def _chain_lines(
        self, pod: Pod, pols: tuple[AnyPolicy, ...], direction: str
    ) -> tuple[tuple[str, ...], tuple[SetState, ...]]:
        ct = "accept" if direction == "in" else "return"
        lines = [f"ct state established,related {ct}"]
        seen: set[str] = set()
        uses: dict[str, SetState] = {}
        for pol in pols:
            for rule in pol.ingress if direction == "in" else pol.egress:
                for line in self._rule_lines(rule, pol.namespace, pod, direction, uses):
                    if line not in seen:
                        seen.add(line)
                        lines.append(line)
        lines.append("drop")
        return tuple(lines), tuple(uses[n] for n in sorted(uses))

    def _rule_lines(
        self, rule: Rule, policy_ns: str, local: Pod, direction: str, uses: dict[str, SetState]
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
        # A peer that selects every pod of the cluster adds nothing to a named-port
        # match: the `np_*` set holds only pod addresses already. Leaving it out
        # spares the kernel a set of every pod address.
        every_pod = rule.peers is not None and any(
            p.ip_block is None
            and p.namespace_selector is not None
            and p.namespace_selector.empty
            and (p.pod_selector is None or p.pod_selector.empty)
            for p in rule.peers
        )
        for fam in (4, 6):
            peer = ""
            if rule.peers is not None and (ports is None or ports or not every_pod):
                ps = self._peer_set(rule.peers, policy_ns, fam)
                if ps is None:
                    continue
                uses[ps.name] = ps
                peer = f"{_FAM_KW[fam]} {addr} @{ps.name} "
            if ports is None:
                lines.append(f"{peer}{verdict}")
            else:
                lines.extend(f"{peer}{clause} {verdict}" for _, clause in ports)
            for name, proto in named:
                ns_set = self._named_set((name, proto, fam))
                uses[ns_set.name] = ns_set
                match = f"{_FAM_KW[fam]} daddr . {_PROTO_KW[proto]} dport @{ns_set.name}"
                lines.append(f"{'' if every_pod else peer}{match} {verdict}")
        return lines


_pod_key = attrgetter("namespace", "name")
_policy_key = attrgetter("key")
_ifname = attrgetter("ifname")


def _same(a: tuple[AnyPolicy, ...], b: tuple[AnyPolicy, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class _no_gc:
    """Pause the cyclic GC for a block (re-entrant: restores what it found)."""

    __slots__ = ("was",)

    def __enter__(self) -> None:
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            gc.enable()


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


def compile_inputs(inputs: PolicyInputs) -> Ruleset:
    """Compile from scratch (a fresh `PolicyCompiler`)."""
    return PolicyCompiler().compile(inputs)


def compile_ruleset(
    *,
    local_pods: Sequence[LocalPod],
    pods: Sequence[Pod],
    namespaces: Mapping[str, Namespace],
    policies: Sequence[AnyPolicy],
) -> Ruleset:
    """The whole desired ruleset for this node. `pods` is every pod in the cluster
    (with addresses); `local_pods` the ones on this node with their host veths."""
    return compile_inputs(
        PolicyInputs(local_pods=local_pods, pods=pods, namespaces=namespaces, policies=policies)
    )
