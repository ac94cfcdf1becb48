"""The compiler's named nft sets, kept element by element with a journal.

Every set counts how many contributions each element has (two pods may share an
address; a pod may be selected through two peers), so an element enters the
kernel when its count goes 0 -> 1 and leaves when it goes 1 -> 0. Those
transitions are journalled while the set is in the kernel; `take` hands them out
as the next transaction's element adds and deletes, so a change costs the
elements it touches, never the size of the set.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable, Mapping

from flock.model.pod import Pod
from flock.model.policy import Peer

PodKey = tuple[str, str]
ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}


def net_range(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def subtract(rng: tuple[int, int], holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
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


def merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
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


def ntop(fam: int, packed: bytes) -> str:
    """Address text, as `str(ipaddress…)` gives it but several times faster (libc)."""
    return socket.inet_ntop(socket.AF_INET if fam == 4 else socket.AF_INET6, packed)


def text(fam: int, value: int) -> str:
    return ntop(fam, value.to_bytes(4 if fam == 4 else 16, "big"))


def render_range(fam: int, s: int, e: int) -> str:
    if s == e:
        return text(fam, s)
    size = e - s + 1
    if size & (size - 1) == 0 and s % size == 0:
        bits = 32 if fam == 4 else 128
        return f"{text(fam, s)}/{bits - size.bit_length() + 1}"
    return f"{text(fam, s)}-{text(fam, e)}"


class SetState:
    """One named set: elements with contribution counts, and the journal of element
    changes since the last transaction (kept only while the set is in the kernel:
    a set that is not is written whole when it appears)."""

    __slots__ = ("applied", "dirty", "elems", "interval", "journal", "name", "type", "uses")

    def __init__(self, name: str, type_: str, interval: bool, dirty: set[SetState]) -> None:
        self.name = name
        self.type = type_
        self.interval = interval
        self.elems: dict[str, int] = {}
        self.journal: dict[str, bool] = {}  # element -> True added / False removed
        self.uses = 0  # chains in the ruleset that refer to it
        self.applied = False  # in the kernel as of the last transaction handed out
        self.dirty = dirty  # the compiler's set of sets to look at in the next `take`

    def inc(self, elem: str) -> None:
        n = self.elems.get(elem, 0)
        self.elems[elem] = n + 1
        if not n and self.applied:
            self._note(elem, True)

    def dec(self, elem: str) -> None:
        n = self.elems[elem] - 1
        if n:
            self.elems[elem] = n
        else:
            del self.elems[elem]
            if self.applied:
                self._note(elem, False)

    def _note(self, elem: str, added: bool) -> None:
        # Counts alternate 0 -> 1 -> 0, so a second note on an element undoes the first.
        if self.journal.pop(elem, None) is None:
            self.journal[elem] = added
        self.dirty.add(self)

    def use(self, delta: int) -> None:
        self.uses += delta
        self.dirty.add(self)


class PodInfo:
    """What the compiler needs from one pod, computed once per pod object: its
    addresses as (int, text) per family."""

    __slots__ = ("addrs", "pod")

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        a4: list[tuple[int, str]] = []
        a6: list[tuple[int, str]] = []
        for ip in pod.ips:
            if isinstance(ip, ipaddress.IPv4Address):
                a4.append((int(ip), socket.inet_ntop(socket.AF_INET, ip.packed)))
            else:
                a6.append((int(ip), socket.inet_ntop(socket.AF_INET6, ip.packed)))
        self.addrs: dict[int, tuple[tuple[int, str], ...]] = {4: tuple(a4), 6: tuple(a6)}

    def named(self, name: str, proto: str, fam: int) -> list[str]:
        """`address . port` elements of this pod for the named port (name, proto)."""
        out: list[str] = []
        for cp in self.pod.container_ports:
            if cp.name == name and cp.protocol == proto:
                for _, t in self.addrs[fam]:
                    elem = f"{t} . {cp.port}"
                    if elem not in out:
                        out.append(elem)
        return out


class PeerSet(SetState):
    """The addresses of one `from`/`to` list, for one family: a hash set of pod
    addresses, or, when the list has an ipBlock, an interval set of the blocks
    (`except` subtracted, overlaps merged) plus the pod addresses outside them."""

    __slots__ = ("ends", "fam", "members", "peers", "policy_ns", "starts")

    def __init__(
        self, name: str, peers: tuple[Peer, ...], policy_ns: str, fam: int, dirty: set[SetState]
    ) -> None:
        blocks = [
            p.ip_block for p in peers if p.ip_block is not None and p.ip_block.cidr.version == fam
        ]
        super().__init__(name, ADDR_TYPE[fam], bool(blocks), dirty)
        self.peers = peers
        self.policy_ns = policy_ns
        self.fam = fam
        ranges: list[tuple[int, int]] = []
        for b in blocks:
            ranges.extend(subtract(net_range(b.cidr), (net_range(e) for e in b.except_)))
        merged = merge(ranges)
        self.starts = [s for s, _ in merged]
        self.ends = [e for _, e in merged]
        for s, e in merged:
            self.inc(render_range(fam, s, e))
        # pod -> the elements it contributes
        self.members: dict[PodKey, tuple[str, ...]] = {}

    def selects(self, pod: Pod, ns_labels: Mapping[str, str]) -> bool:
        return any(p.selects_pod(pod, ns_labels, self.policy_ns) for p in self.peers)

    def contribution(self, info: PodInfo) -> tuple[str, ...]:
        addrs = info.addrs[self.fam]
        if not self.interval:
            return tuple(t for _, t in addrs)
        out = []
        for v, t in addrs:
            i = bisect_right(self.starts, v) - 1
            if i < 0 or v > self.ends[i]:  # outside every block: an element of its own
                out.append(t)
        return tuple(out)

    def put(self, key: PodKey, elems: tuple[str, ...] | None) -> None:
        """Make `elems` the contribution of pod `key` (None: it contributes nothing)."""
        old = self.members.get(key)
        if old == elems:
            return
        if old is not None:
            del self.members[key]
            for e in old:
                self.dec(e)
        if elems:
            self.members[key] = elems
            for e in elems:
                self.inc(e)

    def update(self, key: PodKey, info: PodInfo | None, ns_labels: Mapping[str, str]) -> None:
        if info is not None and info.addrs[self.fam] and self.selects(info.pod, ns_labels):
            self.put(key, self.contribution(info) or None)
        else:
            self.put(key, None)
