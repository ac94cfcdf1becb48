"""The node's anycast host routes: `<anycast> via <pod> dev <veth>`, one (multipath) route
per address, with the routes last applied and the veth indexes cached.

A readiness flip must not cost a dump of every route: the cache makes a
reconcile O(changes). It is kept honest by falling back to the kernel's own
view whenever a request fails (a veth deleted behind our back, a route someone
removed), and by the agent's periodic full pass. Its own lock: it never waits
for pod setups or the reaper, and they never wait for it, except teardown
taking a retired veth's hops out (`drop_hops`).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable, Mapping, Sequence

from flock.apply import rtnl
from flock.apply.nlsock import NetlinkError, RtnlSocket
from flock.apply.podplan import (
    RTPROT_FLOCK,
    AnycastChange,
    DatapathError,
    Hops,
    IPAddress,
    anycast_route_delete,
    anycast_route_request,
    plan_anycast,
    route_hops,
)
from flock.apply.reaper import is_retired
from flock.apply.rtnl import Request

log = logging.getLogger(__name__)


class AnycastRoutes:
    """Our anycast routes in one host namespace; `host()` gives this thread's socket."""

    def __init__(self, host: Callable[[], RtnlSocket]) -> None:
        self._host = host
        self._lock = threading.Lock()  # a whole reconcile, set or hop removal
        # Our anycast routes as last applied (dst -> hops); None = read the kernel.
        self._have: dict[IPAddress, Hops] | None = None
        # Host veth name -> ifindex, learnt at setup and from link dumps; an index
        # gone stale (a veth deleted behind our back) shows up as a failed request,
        # which drops the caches and retries from the kernel's own view.
        self._index_lock = threading.Lock()
        self._ifindex: dict[str, int] = {}

    def remember(self, name: str, index: int) -> None:
        """A veth was set up with this ifindex."""
        with self._index_lock:
            self._ifindex[name] = index

    def forget(self, name: str) -> None:
        """A veth is being removed."""
        with self._index_lock:
            self._ifindex.pop(name, None)

    def reconcile(
        self,
        desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]],
        *,
        full: bool = False,
    ) -> AnycastChange:
        """Make our anycast host routes exactly `desired`: ip -> [(via pod unicast, veth)].

        One route per anycast IP; several hops make it one multipath route. Our
        routes not desired are removed; routes of other protocols are never
        touched. Hops whose veth is missing or retired are skipped (the pod is
        going away); an IP left with no hop is removed.

        Cost is O(changes): the routes last applied and veth indexes are cached.
        `full=True` (the agent's periodic resync) reads the kernel first. When a
        request fails, the caches are dropped and the whole reconcile runs once
        more from the kernel's view; a second failure raises DatapathError
        listing every failed change.
        """
        for dst, hops in desired.items():
            for gw, _ifname in hops:
                if gw.version != dst.version:
                    raise ValueError(f"anycast {dst}: next hop {gw} is of the other family")
        with self._lock:
            host = self._host()
            if not full and self._have is not None:
                change, errors = self._apply(host, desired, refresh=False)
                if not errors:
                    return change
                log.info("anycast reconcile from cache failed, rereading the kernel: %s", errors)
            change, errors = self._apply(host, desired, refresh=True)
            if errors:
                raise DatapathError("; ".join(str(e) for e in errors))
            return change

    def set_route(self, dst: IPAddress, hops: Sequence[tuple[IPAddress, str]]) -> bool:
        """One anycast IP's route, now: `hops` [(via pod unicast, veth)], none = no route.

        The O(1) path for a single readiness change (one request), next to the
        whole-set `reconcile_anycast`. Returns False when no hop's veth exists
        (then the route is removed).
        """
        for gw, _ifname in hops:
            if gw.version != dst.version:
                raise ValueError(f"anycast {dst}: next hop {gw} is of the other family")
        with self._lock:
            host = self._host()
            for attempt in (0, 1):
                index = self._indexes(host, {ifn for _gw, ifn in hops}, refresh=attempt == 1)
                resolved = frozenset((gw, index[ifn]) for gw, ifn in hops if ifn in index)
                if resolved:
                    req = anycast_route_request(dst, list(resolved), replace=True)
                else:
                    req = anycast_route_delete(dst)
                errors = [
                    e for e in host.batch([req]) if not (e.errno == errno.ESRCH and not resolved)
                ]
                if not errors:
                    if self._have is not None:
                        if resolved:
                            self._have[dst] = resolved
                        else:
                            self._have.pop(dst, None)
                    return bool(resolved)
                self._have = None
            raise DatapathError(str(errors[0]))

    def _apply(
        self,
        host: RtnlSocket,
        desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]],
        *,
        refresh: bool,
    ) -> tuple[AnycastChange, list[NetlinkError]]:
        if refresh or self._have is None:
            self._have = self._read(host)
        names = {ifname for hops in desired.values() for _gw, ifname in hops}
        index = self._indexes(host, names, refresh=refresh)
        want: dict[IPAddress, Hops] = {}
        for dst, hops in desired.items():
            resolved = frozenset((gw, index[ifn]) for gw, ifn in hops if ifn in index)
            if resolved:
                want[dst] = resolved
        reqs, change = plan_anycast(want, self._have)
        errors = [
            e for e in host.batch(reqs) if not (e.errno == errno.ESRCH and "delete" in e.what)
        ]
        self._have = None if errors else want
        return change, errors

    def _read(self, host: RtnlSocket) -> dict[IPAddress, Hops]:
        return {
            r.dst: route_hops(r)
            for fam in (socket.AF_INET6, socket.AF_INET)
            for r in host.routes(fam, proto=RTPROT_FLOCK)
            if r.proto == RTPROT_FLOCK
            and r.table == rtnl.RT_TABLE_MAIN
            and r.dst is not None
            and (r.gateway is not None or r.multipath)
        }

    def _indexes(self, host: RtnlSocket, names: set[str], *, refresh: bool) -> dict[str, int]:
        """ifindex of each live (not retired) host link in `names`; absent ones are left out."""
        with self._index_lock:
            missing = refresh or any(n not in self._ifindex for n in names)
        if missing:
            fresh = {ln.name: ln.index for ln in host.links() if not is_retired(ln.group)}
            with self._index_lock:
                self._ifindex = fresh
        with self._index_lock:
            return {n: self._ifindex[n] for n in names if n in self._ifindex}

    def drop_hops(self, host: RtnlSocket, index: int) -> None:
        """Take hops through link `index` out of our anycast routes (kernel-filtered dump)."""
        with self._lock:
            reqs: list[Request] = []
            changed: dict[IPAddress, Hops | None] = {}
            for fam in (socket.AF_INET6, socket.AF_INET):
                for r in host.routes(fam, proto=RTPROT_FLOCK, oif=index):
                    if r.dst is None or r.table != rtnl.RT_TABLE_MAIN:
                        continue
                    if r.gateway is None and not r.multipath:
                        continue  # a pod route: went with the link going down
                    left = [(gw, oif) for gw, oif in route_hops(r) if oif != index and gw]
                    if left:
                        reqs.append(anycast_route_request(r.dst, left, replace=True))
                        changed[r.dst] = frozenset(left)
                    else:
                        reqs.append(anycast_route_delete(r.dst))
                        changed[r.dst] = None
            errors = [e for e in host.batch(reqs) if e.errno != errno.ESRCH]
            if errors:
                self._have = None
                raise errors[0]
            if self._have is not None:
                for dst, hops in changed.items():
                    if hops is None:
                        self._have.pop(dst, None)
                    else:
                        self._have[dst] = hops

    @staticmethod
    def listing(
        routes: list[rtnl.Route], names: dict[int, str]
    ) -> dict[IPAddress, tuple[tuple[IPAddress, str], ...]]:
        """Our anycast routes among `routes` (ours, proto 70): dst -> sorted (via, veth name)."""
        out: dict[IPAddress, tuple[tuple[IPAddress, str], ...]] = {}
        for r in routes:
            if r.dst is None or (r.gateway is None and not r.multipath):
                continue
            hops = sorted(
                ((gw, names.get(idx, f"#{idx}")) for gw, idx in route_hops(r) if gw is not None),
                key=lambda h: (int(h[0]), h[1]),
            )
            out[r.dst] = tuple(hops)
        return out
