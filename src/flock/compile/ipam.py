"""Per-node IPAM: which addresses each attachment holds, decided purely in memory.

Each node owns its prefixes, so there is no cross-node coordination; this class
is the whole allocator. It does no I/O: the agent persists each decision with
`flock.apply.store.AllocationStore` before acting on it. The rules:

* Attachments are keyed by (container id, interface name), as CNI requires;
  a repeated ADD for a key returns the allocation it already has.
* IPv6: a random address in the range (or an ip-algo embedded one), redrawn on
  collision; never the subnet-router anycast address (all host bits zero).
* IPv4: the lowest free address in the range; never the network or broadcast
  address of a range (for a /31 or /32 sub-range every address is usable).
* Addresses supplied by the `addresses` annotation are recorded (so DEL, GC and
  status see them) but never drawn from the pool; a supplied address that another
  attachment already holds, on eth0 or as anycast, is an error. Anycast addresses
  may be shared by replicas, but never with anyone's eth0 address.
* An exhausted range is an error naming the range.

It stays fast with 100,000 live allocations: IPv4 lowest-free uses, per range, a
high-water mark plus a min-heap of freed offsets below it (O(log n) per
operation); every membership test is a dict lookup.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

from flock.compile.embed import EmbedError, Layout, layout
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.request import IPAddress, IPNetwork, PodIdentity, PodRequest

# Random probes before a v6 range is searched exhaustively (small ranges) or
# declared full (ranges too large to search).
_V6_PROBES = 64
_V6_SCAN_LIMIT = 1 << 20


class IpamError(ValueError):
    """An allocation that cannot be made; the message says which address or range."""


class RangeExhaustedError(IpamError):
    """No free address in any of the ranges the pod may use."""


class AddressConflictError(IpamError):
    """A supplied address is already held by another attachment."""


@dataclass(slots=True)
class _V4Pool:
    """Lowest-free search state for one IPv4 range.

    Invariant: every free, usable offset below `hwm` is in `freed` (which may also
    hold stale offsets that have since been taken; they are skipped when popped).
    """

    net: ipaddress.IPv4Network
    first: int
    last: int
    hwm: int
    freed: list[int] = field(default_factory=list)


def _v4_bounds(net: ipaddress.IPv4Network) -> tuple[int, int]:
    base = int(net.network_address)
    if net.prefixlen >= 31:
        return base, base + net.num_addresses - 1
    return base + 1, base + net.num_addresses - 2


class Ipam:
    """All allocations of one node, with the indexes that keep allocate/release cheap."""

    def __init__(self, allocations: Iterable[Allocation] = ()) -> None:
        self._by_key: dict[AttachmentKey, Allocation] = {}
        # eth0 addresses (primaries and extras) -> holder
        self._owner: dict[IPAddress, AttachmentKey] = {}
        # anycast address -> number of attachments that carry it
        self._anycast: dict[IPAddress, int] = {}
        self._v4_pools: dict[ipaddress.IPv4Network, _V4Pool] = {}
        for a in allocations:
            self._check_unheld(a, loading=True)
            self._commit(a)

    # ---- queries ---------------------------------------------------------------

    def get(self, key: AttachmentKey) -> Allocation | None:
        return self._by_key.get(key)

    def all(self) -> list[Allocation]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def holder(self, ip: IPAddress) -> AttachmentKey | None:
        """Which attachment has `ip` on its eth0, if any."""
        return self._owner.get(ip)

    def in_use(self, ip: IPAddress) -> bool:
        return ip in self._owner or ip in self._anycast

    # ---- changes ---------------------------------------------------------------

    def allocate(
        self,
        key: AttachmentKey,
        request: PodRequest,
        *,
        namespace: str,
        pod: str,
        pod_uid: str = "",
        identity: PodIdentity | None = None,
        netns: str = "",
        host_ifname: str = "",
        rng: random.Random | None = None,
    ) -> Allocation:
        """Addresses for one attachment; the same allocation again for a known key."""
        existing = self._by_key.get(key)
        if existing is not None:
            return existing
        rng = rng if rng is not None else random.Random()
        identity = identity if identity is not None else PodIdentity(namespace=namespace, pod=pod)

        p6, p4 = request.v6.primary, request.v4.primary
        assert p6 is None or isinstance(p6, ipaddress.IPv6Address)
        assert p4 is None or isinstance(p4, ipaddress.IPv4Address)
        alloc = Allocation(
            key=key,
            namespace=namespace,
            pod=pod,
            pod_uid=pod_uid,
            netns=netns,
            host_ifname=host_ifname,
            v6=p6 if request.v6.want else None,
            v4=p4 if request.v4.want else None,
            v6_supplied=request.v6.want and p6 is not None,
            v4_supplied=request.v4.want and p4 is not None,
            extra_addresses=request.extra_addresses,
            anycast=request.anycast,
        )
        # Check the supplied addresses before drawing: nothing may fail after a draw,
        # or a popped IPv4 offset would be lost to the lowest-free search.
        self._check_unheld(alloc, loading=False)
        own = frozenset(alloc.all_addresses) | frozenset(alloc.anycast)
        if request.v6.want and p6 is None:
            v6 = self._draw_v6(request.v6.ranges, request, identity, rng, own)
            alloc = replace(alloc, v6=v6)
        if request.v4.want and p4 is None:
            alloc = replace(alloc, v4=self._draw_v4(request.v4.ranges, own))
        self._commit(alloc)
        return alloc

    def release(self, key: AttachmentKey) -> Allocation | None:
        """Forget an attachment; an unknown key is a no-op (DEL is idempotent)."""
        alloc = self._by_key.pop(key, None)
        if alloc is None:
            return None
        for ip in alloc.all_addresses:
            if self._owner.get(ip) == key:
                del self._owner[ip]
                if isinstance(ip, ipaddress.IPv4Address):
                    self._v4_freed(ip)
        for ip in alloc.anycast:
            n = self._anycast.get(ip, 0) - 1
            if n > 0:
                self._anycast[ip] = n
            else:
                self._anycast.pop(ip, None)
                if isinstance(ip, ipaddress.IPv4Address):
                    self._v4_freed(ip)
        return alloc

    def gc(self, live_keys: Collection[AttachmentKey]) -> list[Allocation]:
        """Release every attachment the runtime no longer lists; return what was released."""
        live = live_keys if isinstance(live_keys, set | frozenset) else set(live_keys)
        dead = [k for k in self._by_key if k not in live]
        released: list[Allocation] = []
        for k in dead:
            a = self.release(k)
            if a is not None:
                released.append(a)
        return released

    # ---- internals -------------------------------------------------------------

    def _check_unheld(self, alloc: Allocation, *, loading: bool) -> None:
        what = "stored allocation" if loading else "address"
        if loading and alloc.key in self._by_key:
            raise AddressConflictError(f"attachment {_show(alloc.key)} is stored twice")
        for ip in alloc.all_addresses:
            holder = self._owner.get(ip)
            if holder is not None:
                raise AddressConflictError(
                    f"{what} {ip} for {alloc.namespace}/{alloc.pod} ({_show(alloc.key)}) is "
                    f"already held by {_show(holder)}"
                )
            if ip in self._anycast:
                raise AddressConflictError(
                    f"{what} {ip} for {alloc.namespace}/{alloc.pod} ({_show(alloc.key)}) is "
                    "already in use as an anycast address"
                )
        for ip in alloc.anycast:
            holder = self._owner.get(ip)
            if holder is not None:
                raise AddressConflictError(
                    f"anycast {ip} for {alloc.namespace}/{alloc.pod} ({_show(alloc.key)}) is "
                    f"already the eth0 address of {_show(holder)}"
                )

    def _commit(self, alloc: Allocation) -> None:
        self._by_key[alloc.key] = alloc
        for ip in alloc.all_addresses:
            self._owner[ip] = alloc.key
        for ip in alloc.anycast:
            self._anycast[ip] = self._anycast.get(ip, 0) + 1

    def _draw_v6(
        self,
        ranges: tuple[IPNetwork, ...],
        request: PodRequest,
        identity: PodIdentity,
        rng: random.Random,
        own: frozenset[IPAddress],
    ) -> ipaddress.IPv6Address:
        if not ranges:
            raise IpamError("IPv6 wanted but no IPv6 range to allocate from")
        for net in ranges:
            assert isinstance(net, ipaddress.IPv6Network)
            try:
                lay = layout(net, request.embed, identity) if request.embed else None
            except EmbedError as e:
                raise IpamError(str(e)) from e
            ip = self._draw_v6_in(net, lay, rng, own)
            if ip is not None:
                return ip
        shown = ", ".join(str(r) for r in ranges)
        extra = f" for ip-algo {','.join(request.embed)}" if request.embed else ""
        raise RangeExhaustedError(f"IPv6 range exhausted{extra}: no free address in {shown}")

    def _draw_v6_in(
        self,
        net: ipaddress.IPv6Network,
        lay: Layout | None,
        rng: random.Random,
        own: frozenset[IPAddress],
    ) -> ipaddress.IPv6Address | None:
        base = int(net.network_address)
        host_bits = 128 - net.prefixlen
        bits = lay.random_bits if lay is not None else host_bits

        def candidate(r: int) -> ipaddress.IPv6Address:
            return lay.compose(r) if lay is not None else ipaddress.IPv6Address(base | r)

        def usable(ip: ipaddress.IPv6Address) -> bool:
            return int(ip) != base and ip not in own and not self.in_use(ip)

        for _ in range(_V6_PROBES):
            ip = candidate(rng.getrandbits(bits) if bits else 0)
            if usable(ip):
                return ip
        space = 1 << bits
        if space > _V6_SCAN_LIMIT:
            return None
        start = rng.randrange(space)
        for i in range(space):
            ip = candidate((start + i) % space)
            if usable(ip):
                return ip
        return None

    def _draw_v4(
        self, ranges: tuple[IPNetwork, ...], own: frozenset[IPAddress]
    ) -> ipaddress.IPv4Address:
        if not ranges:
            raise IpamError("IPv4 wanted but no IPv4 range to allocate from")
        for net in ranges:
            assert isinstance(net, ipaddress.IPv4Network)
            pool = self._v4_pools.get(net)
            if pool is None:
                first, last = _v4_bounds(net)
                pool = _V4Pool(net=net, first=first, last=last, hwm=first)
                self._v4_pools[net] = pool
            ip = self._lowest_free(pool, own)
            if ip is not None:
                return ip
        shown = ", ".join(str(r) for r in ranges)
        raise RangeExhaustedError(f"IPv4 range exhausted: no free address in {shown}")

    def _lowest_free(
        self, pool: _V4Pool, own: frozenset[IPAddress]
    ) -> ipaddress.IPv4Address | None:
        skipped: list[int] = []  # free but this pod's own supplied address: keep for later
        found: ipaddress.IPv4Address | None = None
        while pool.freed:
            n = heapq.heappop(pool.freed)
            ip = ipaddress.IPv4Address(n)
            if ip in own:
                skipped.append(n)
            elif not self.in_use(ip):
                found = ip
                break
        while found is None and pool.hwm <= pool.last:
            ip = ipaddress.IPv4Address(pool.hwm)
            pool.hwm += 1
            if ip in own:
                skipped.append(int(ip))
            elif not self.in_use(ip):
                found = ip
        for n in skipped:
            heapq.heappush(pool.freed, n)
        return found

    def _v4_freed(self, ip: ipaddress.IPv4Address) -> None:
        n = int(ip)
        for pool in self._v4_pools.values():
            if pool.first <= n < pool.hwm:
                heapq.heappush(pool.freed, n)


def _show(key: AttachmentKey) -> str:
    return f"container {key.container_id[:12]} {key.ifname}"
