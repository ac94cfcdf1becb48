"""The compiled ruleset as values, and the nft scripts that put it in the kernel.

`Ruleset` is the whole state of table `inet flock` (what a full replace writes and
what tests compare); `Delta` is one transaction's worth of change, as the
incremental compiler hands it out. Both render to nft text: `render_full` replaces
the table atomically, `render_delta` applies a change, `render_update` computes
the change between two rulesets (for callers that hold two snapshots).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

TABLE = "flock"
FAMILY = "inet"
INGRESS_MAP = "ingress"
EGRESS_MAP = "egress"
_T = f"{FAMILY} {TABLE}"
COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_./ -]")


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


@dataclass(frozen=True, slots=True)
class ChainDef:
    name: str
    comment: str
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Delta:
    """One transaction: from the state the previous delta left to the current one.

    Applied in this order, so that nothing is referred to before it exists or
    deleted while something still refers to it: new sets (whole), element deletes
    and adds, new chains, map entries removed then added, chains deleted, sets
    deleted. Chains never change in place (a chain's name is a digest of its
    content), so there is no flush.
    """

    new_sets: tuple[NftSet, ...] = ()
    del_elements: tuple[tuple[str, tuple[str, ...]], ...] = ()
    add_elements: tuple[tuple[str, tuple[str, ...]], ...] = ()
    new_chains: tuple[ChainDef, ...] = ()
    map_del: tuple[tuple[str, str], ...] = ()  # (map, ifname)
    map_add: tuple[tuple[str, str, str], ...] = ()  # (map, ifname, chain)
    del_chains: tuple[str, ...] = ()
    del_sets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.new_sets
            or self.del_elements
            or self.add_elements
            or self.new_chains
            or self.map_del
            or self.map_add
            or self.del_chains
            or self.del_sets
        )


def q(ifname: str) -> str:
    return '"' + ifname.replace('"', "") + '"'


def _elems(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _set_decl(s: NftSet) -> str:
    flags = " flags interval;" if s.interval else ""
    return f"type {s.type};{flags}"


def _add_set(s: NftSet) -> list[str]:
    out = [f"add set {_T} {s.name} {{ {_set_decl(s)} }}"]
    if s.elements:
        out.append(f"add element {_T} {s.name} {{ {_elems(s.elements)} }}")
    return out


def _add_chain(name: str, comment: str, lines: Iterable[str]) -> list[str]:
    comment = COMMENT_UNSAFE.sub("", comment)
    out = [f'add chain {_T} {name} {{ comment "{comment}"; }}']
    out.extend(f"add rule {_T} {name} {line}" for line in lines)
    return out


_BASE = (
    f"add chain {_T} forward {{ type filter hook forward priority filter; policy accept; "
    f"iifname vmap @{EGRESS_MAP}; oifname vmap @{INGRESS_MAP}; }}"
)


def render_full(rs: Ruleset) -> str:
    """A script that atomically replaces table inet flock with `rs` (and creates it
    if absent). Other tables are never named."""
    out = [f"add table {_T}", f"delete table {_T}", f"add table {_T}"]
    for s in sorted(rs.sets.values(), key=lambda s: s.name):
        out.extend(_add_set(s))
    for name in sorted(rs.chains):
        out.extend(_add_chain(name, rs.comments.get(name, ""), rs.chains[name]))
    for m, entries in ((INGRESS_MAP, rs.ingress), (EGRESS_MAP, rs.egress)):
        out.append(f"add map {_T} {m} {{ type ifname : verdict; }}")
        if entries:
            body = ", ".join(f"{q(k)} : jump {v}" for k, v in sorted(entries.items()))
            out.append(f"add element {_T} {m} {{ {body} }}")
    out.append(_BASE)
    return "\n".join(out) + "\n"


def render_delta(d: Delta) -> str:
    """The transaction `d` as an nft script; "" if it changes nothing."""
    out: list[str] = []
    for s in d.new_sets:
        out.extend(_add_set(s))
    for name, elems in d.del_elements:
        out.append(f"delete element {_T} {name} {{ {_elems(elems)} }}")
    for name, elems in d.add_elements:
        out.append(f"add element {_T} {name} {{ {_elems(elems)} }}")
    for c in d.new_chains:
        out.extend(_add_chain(c.name, c.comment, c.lines))
    by_map: dict[str, list[str]] = {}
    for m, ifname in d.map_del:
        by_map.setdefault(m, []).append(q(ifname))
    for m, keys in sorted(by_map.items()):
        out.append(f"delete element {_T} {m} {{ {', '.join(sorted(keys))} }}")
    by_map = {}
    for m, ifname, chain in d.map_add:
        by_map.setdefault(m, []).append(f"{q(ifname)} : jump {chain}")
    for m, entries in sorted(by_map.items()):
        out.append(f"add element {_T} {m} {{ {', '.join(sorted(entries))} }}")
    out.extend(f"delete chain {_T} {name}" for name in d.del_chains)
    out.extend(f"delete set {_T} {name}" for name in d.del_sets)
    return "\n".join(out) + "\n" if out else ""


def _diff(old: Ruleset, new: Ruleset) -> tuple[Delta, list[str]]:
    """The change from `old` to `new` (cost: the size of both), and the chains whose
    content changed under the same name."""
    added, gone = [], []
    for name in sorted(new.sets.keys() & old.sets.keys()):
        o, n = old.sets[name], new.sets[name]
        if o is n or o == n:
            continue
        if (o.type, o.interval) != (n.type, n.interval):
            raise ValueError(f"set {name} changed type")
        if o.elements - n.elements:
            gone.append((name, tuple(sorted(o.elements - n.elements))))
        if n.elements - o.elements:
            added.append((name, tuple(sorted(n.elements - o.elements))))
    chains_changed = sorted(
        n for n in new.chains.keys() & old.chains.keys() if new.chains[n] != old.chains[n]
    )
    map_del: list[tuple[str, str]] = []
    map_add: list[tuple[str, str, str]] = []
    for m, o_map, n_map in (
        (INGRESS_MAP, old.ingress, new.ingress),
        (EGRESS_MAP, old.egress, new.egress),
    ):
        map_del.extend((m, k) for k in sorted(o_map) if n_map.get(k) != o_map[k])
        map_add.extend((m, k, n_map[k]) for k in sorted(n_map) if o_map.get(k) != n_map[k])
    return Delta(
        new_sets=tuple(new.sets[n] for n in sorted(new.sets.keys() - old.sets.keys())),
        del_elements=tuple(gone),
        add_elements=tuple(added),
        new_chains=tuple(
            ChainDef(n, new.comments.get(n, ""), new.chains[n])
            for n in sorted(new.chains.keys() - old.chains.keys())
        ),
        map_del=tuple(map_del),
        map_add=tuple(map_add),
        del_chains=tuple(sorted(old.chains.keys() - new.chains.keys())),
        del_sets=tuple(sorted(old.sets.keys() - new.sets.keys())),
    ), chains_changed


def render_update(old: Ruleset, new: Ruleset) -> str:
    """The smallest transaction taking the kernel from `old` to `new`; "" if equal.
    A chain whose content changed under the same name (only rulesets not made by
    the content-addressed compiler have those) is flushed and refilled after the
    new sets and chains exist and before map entries move and removals."""
    delta, changed = _diff(old, new)
    if not changed:
        return render_delta(delta)
    first = replace(delta, map_del=(), map_add=(), del_chains=(), del_sets=())
    then = Delta(
        map_del=delta.map_del,
        map_add=delta.map_add,
        del_chains=delta.del_chains,
        del_sets=delta.del_sets,
    )
    refill: list[str] = []
    for name in changed:
        refill.append(f"flush chain {_T} {name}")
        refill.extend(f"add rule {_T} {name} {line}" for line in new.chains[name])
    return render_delta(first) + "\n".join(refill) + "\n" + render_delta(then)
