"""Desired state, computed purely, then applied by one loop (Calico felix's shape).

Datastore events (a pod turned Ready, a pod was deleted, the NodeConfig changed)
and CNI verbs (an allocation appeared or went) only *mark the state dirty*. One
loop then computes the whole desired state from three inputs, and nothing else:

- the allocations (the store's view of which attachment holds which address),
- the pods' readiness and termination (the datastore's view),
- this node's NodeConfig (aggregates: what does not need a per-pod route),

and hands each part to its applier, in dependency order: the anycast host
routes in the kernel, then the BGP export set, then the policy state (which
also covers attachments that are policed but not routed: a pod whose veth is
not built yet or already gone, see `flock.agent.attachments`). An
applier is called only when its part changed since it last succeeded (or when
a periodic full resync asks for it), so a burst of events collapses into one
pass and a plain pod's ADD does not touch BIRD at all.

Readiness rules, the reason flock exists (SPEC §5):
- an anycast address is routed and exported only while at least one of its
  pods on this node is Ready and not terminating (a terminating pod is
  withdrawn at once, even while it still serves existing flows);
- several Ready replicas on one node share one multipath route, which stays
  until the last of them goes;
- a pod that is not Ready at ADD starts withdrawn (nothing special: it simply
  is not Ready in the inputs);
- a pod whose datastore record belongs to a different incarnation (uid
  mismatch) counts as not Ready.

`compute_desired` is pure and tested by replaying sequences of states; the
`Reconciler` class is the loop around it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from flock.agent.datastore.base import PodKey, Snapshot
from flock.model import IPAddress as IPAddress
from flock.model import IPNetwork as IPNetwork
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Pod

if TYPE_CHECKING:
    from flock.agent.attachments import Attachments
    from flock.compile.ipam import Ipam

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class Nexthop:
    """One replica's path for an anycast address: via its unicast, out its host veth."""

    via: IPAddress
    dev: str


@dataclass(frozen=True, slots=True)
class Desired:
    # anycast address -> next hops of its Ready replicas on this node (never empty)
    anycast_routes: Mapping[IPAddress, frozenset[Nexthop]] = field(default_factory=dict)
    # per-pod prefixes to export over BGP, beyond the node's aggregates
    exports: frozenset[IPNetwork] = frozenset()
    # pods with an allocation here that are Ready and not terminating
    active: frozenset[PodKey] = frozenset()


def pod_active(alloc: Allocation, pods: Mapping[PodKey, Pod]) -> bool:
    """Whether the pod behind an allocation may advertise its anycast addresses."""
    pod = pods.get((alloc.namespace, alloc.pod))
    if pod is None or not pod.ready or pod.terminating:
        return False
    return not (alloc.pod_uid and pod.uid and pod.uid != alloc.pod_uid)


def _host_prefix(ip: IPAddress) -> IPNetwork:
    if ip.version == 6:
        return ipaddress.IPv6Network((int(ip), 128))
    return ipaddress.IPv4Network((int(ip), 32))


Masks = tuple[tuple[int, int, int], ...]


def _aggregate_masks(node: NodeConfig | None) -> Masks:
    """(version, network as int, netmask as int) per aggregate: integer tests are cheap."""
    if node is None:
        return ()
    nets: list[IPNetwork] = [*node.spec.cidr6, *node.spec.cidr4]
    return tuple((n.version, int(n.network_address), int(n.netmask)) for n in nets)


def _outside_of(alloc: Allocation, masks: Masks) -> tuple[IPNetwork, ...]:
    out = []
    for ip in alloc.all_addresses:
        n, v = int(ip), ip.version
        if not any(v == mv and n & mask == net for mv, net, mask in masks):
            out.append(_host_prefix(ip))
    return tuple(out)


def outside_exports(allocations: Iterable[Allocation], node: NodeConfig | None) -> set[IPNetwork]:
    """Host prefixes of eth0 addresses outside the node's aggregates. Pure.

    Exported per pod, Ready or not: they are the pod's only route in from the
    upstream. Depends only on allocations and NodeConfig, so the loop caches it.
    """
    masks = _aggregate_masks(node)
    out: set[IPNetwork] = set()
    for alloc in allocations:
        out.update(_outside_of(alloc, masks))
    return out


def anycast_routes(
    allocations: Iterable[Allocation], pods: Mapping[PodKey, Pod]
) -> tuple[dict[IPAddress, frozenset[Nexthop]], frozenset[PodKey]]:
    """Routes for the anycast addresses of active pods, and which pods those are. Pure."""
    routes: dict[IPAddress, set[Nexthop]] = {}
    active: set[PodKey] = set()
    for alloc in allocations:
        if not alloc.anycast or not alloc.host_ifname or not pod_active(alloc, pods):
            continue
        active.add((alloc.namespace, alloc.pod))
        for ip in alloc.anycast:
            via = alloc.v6 if ip.version == 6 else alloc.v4
            if via is None:
                continue  # the annotation parser rejects this; never route without a return path
            routes.setdefault(ip, set()).add(Nexthop(via=via, dev=alloc.host_ifname))
    return {ip: frozenset(nh) for ip, nh in routes.items()}, frozenset(active)


def combine(
    outside: Iterable[IPNetwork],
    routes: dict[IPAddress, frozenset[Nexthop]],
    active: frozenset[PodKey],
) -> Desired:
    exports = set(outside)
    exports.update(_host_prefix(ip) for ip in routes)
    return Desired(anycast_routes=routes, exports=frozenset(exports), active=active)


def compute_desired(
    allocations: Iterable[Allocation],
    pods: Mapping[PodKey, Pod],
    node: NodeConfig | None,
) -> Desired:
    """The anycast routes and export set that these inputs call for. Pure."""
    allocs = list(allocations)
    routes, active = anycast_routes(allocs, pods)
    return combine(outside_exports(allocs, node), routes, active)


class AllocationIndex:
    """The allocations the desired state is computed from, indexed so a pass is cheap.

    The CNI service `put`s an allocation once its network is built and `remove`s
    it when a DEL starts (so it is withdrawn before its veth goes). A pass then
    costs O(anycast allocations + outside-aggregate addresses), not O(pods):
    with 10,000 pods a readiness flip must not wait for a scan of all of them.
    Results equal `compute_desired` over `all()` (the unit tests check it).
    """

    def __init__(self, allocations: Iterable[Allocation] = ()) -> None:
        self._by_key: dict[AttachmentKey, Allocation] = {}
        self._anycast: dict[AttachmentKey, Allocation] = {}
        self._contrib: dict[AttachmentKey, tuple[IPNetwork, ...]] = {}
        self._outside: Counter[IPNetwork] = Counter()
        self._masks: Masks = ()
        self._list: list[Allocation] | None = None
        self.version = 0
        for a in allocations:
            self.put(a)

    @property
    def masks(self) -> Masks:
        return self._masks

    def set_node(self, node: NodeConfig | None) -> None:
        masks = _aggregate_masks(node)
        if masks == self._masks:
            return
        self._masks = masks
        self._contrib.clear()
        self._outside.clear()
        for key, a in self._by_key.items():
            self._count(key, a)
        self.version += 1

    def _count(self, key: AttachmentKey, alloc: Allocation) -> None:
        contrib = _outside_of(alloc, self._masks)
        if contrib:
            self._contrib[key] = contrib
            self._outside.update(contrib)

    def put(self, alloc: Allocation) -> None:
        self.remove(alloc.key)
        self._by_key[alloc.key] = alloc
        if alloc.anycast:
            self._anycast[alloc.key] = alloc
        self._count(alloc.key, alloc)
        self._list = None
        self.version += 1

    def remove(self, key: AttachmentKey) -> Allocation | None:
        alloc = self._by_key.pop(key, None)
        if alloc is None:
            return None
        self._anycast.pop(key, None)
        contrib = self._contrib.pop(key, ())
        if contrib:
            self._outside.subtract(contrib)
            for p in contrib:
                if self._outside[p] <= 0:
                    del self._outside[p]
        self._list = None
        self.version += 1
        return alloc

    def all(self) -> list[Allocation]:
        if self._list is None:
            self._list = list(self._by_key.values())
        return self._list

    def __contains__(self, key: AttachmentKey) -> bool:
        return key in self._by_key

    def desired(self, pods: Mapping[PodKey, Pod]) -> Desired:
        routes, active = anycast_routes(self._anycast.values(), pods)
        return combine(self._outside.keys(), routes, active)


# ---- the loop -----------------------------------------------------------------------


class AnycastApplier(Protocol):
    async def apply_anycast(
        self, routes: Mapping[IPAddress, frozenset[Nexthop]], *, full: bool = False
    ) -> None:
        """Make the node's anycast host routes exactly `routes` (ours only); `full`
        re-reads the kernel instead of trusting what was applied last."""


class ExportApplier(Protocol):
    async def apply_exports(
        self, node: NodeConfig, exports: frozenset[IPNetwork], *, full: bool = False
    ) -> None:
        """Make BIRD export the node's aggregates plus exactly `exports`.

        `full`: re-check everything (start-up, periodic resync, after a failure)
        rather than trusting what was applied last.
        """


class PolicyApplier(Protocol):
    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        """Make the node's policy state match the datastore's policies and pods.

        An applier that works from change events may also have `resync()`: the
        loop calls it before a forced pass (start, periodic, after a failure)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the latest pass went, as a CNI verb waiting on it needs to know."""

    ok: bool = True
    policy_ok: bool = True
    error: str = ""


@dataclass
class ReconcileStats:
    passes: int = 0
    failures: int = 0
    last_error: str = ""
    last_pass_seconds: float = 0.0
    policy_sync_seconds: float = 0.0
    # How the policy applier fed the engine: whole views, and changes only.
    policy_syncs: int = 0
    policy_updates: int = 0


class Reconciler:
    """Runs `compute_desired` and the appliers whenever something is marked dirty.

    `sync()` is what a CNI ADD/DEL awaits: it returns once a pass that started
    after the call has completed, so the pod's routes, exports and policy are in
    place. Passes never overlap; requests arriving during a pass coalesce into
    the next one.
    """

    def __init__(
        self,
        *,
        snapshot: Callable[[], Snapshot],
        index: AllocationIndex,
        anycast: AnycastApplier | None = None,
        exports: ExportApplier | None = None,
        policy: PolicyApplier | None = None,
        full_resync_interval: float = 60.0,
        retry_interval: float = 1.0,
        on_pass: Callable[[Reconciler], None] | None = None,
        attachments: Attachments | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.index = index
        # The attachment table (`adopt`); None in tests that drive the index alone.
        self.attachments = attachments
        self._anycast = anycast
        self._exports = exports
        self._policy = policy
        self._full_resync_interval = full_resync_interval
        self._retry_interval = retry_interval
        self._on_pass = on_pass
        self._requested = 0
        self._done = 0
        self._wake = asyncio.Event()
        self._cond = asyncio.Condition()
        self._applied_routes: Mapping[IPAddress, frozenset[Nexthop]] | None = None
        self._applied_exports: tuple[NodeConfig, frozenset[IPNetwork]] | None = None
        self._force = True
        self._last_full = 0.0
        self._stopped = False
        self.desired = Desired()
        self.outcome = Outcome()
        self.stats = ReconcileStats()

    def set_appliers(
        self,
        *,
        anycast: AnycastApplier | None = None,
        exports: ExportApplier | None = None,
        policy: PolicyApplier | None = None,
    ) -> None:
        """Attach the appliers (they may need objects built after the reconciler)."""
        self._anycast, self._exports, self._policy = anycast, exports, policy
        self.force_resync()

    def affects(self, alloc: Allocation) -> bool:
        """Whether a pass could apply anything for this allocation (else an ADD need not
        wait for one): it has anycast or outside-aggregate addresses, or policies exist."""
        return self.affects_routes(alloc) or self.policy_active()

    def affects_routes(self, alloc: Allocation) -> bool:
        """Whether the allocation adds anycast routes or BGP exports (these need its veth)."""
        return bool(alloc.anycast or _outside_of(alloc, self.index.masks))

    def policy_active(self) -> bool:
        """Whether a pod appearing or going could change the policy state: a policy
        applier is attached and it is not idle (no policy exists, empty ruleset applied)."""
        if self._policy is None:
            return False
        idle = getattr(self._policy, "idle", None)
        return not (idle is not None and idle(self._snapshot()))

    def adopt(self, ipam: Ipam) -> Attachments:
        """Own the attachment table built from `ipam` (the allocations loaded at start)."""
        from flock.agent.attachments import Attachments

        self.attachments = Attachments(ipam, self.index)
        return self.attachments

    def policy_allocations(self) -> Sequence[Allocation]:
        """What the policy applier is given: every attachment the policy covers (admitted,
        wired or withdrawing: see `flock.agent.attachments`)."""
        if self.attachments is None:
            return self.index.all()
        return self.attachments.policy_allocations()

    def mark_dirty(self) -> int:
        """Ask for a pass; returns the request number `wait_for` can wait on."""
        self._requested += 1
        self._wake.set()
        return self._requested

    def force_resync(self) -> None:
        """Next pass re-applies every part, changed or not (e.g. BIRD restarted)."""
        self._force = True
        self.mark_dirty()

    async def wait_for(self, request: int, timeout: float | None = None) -> Outcome:
        """Wait until a pass covering `request` has run; its outcome.

        Once the loop has stopped (agent shutdown) no pass will come: a waiter gets
        a failed outcome at once instead of waiting forever.
        """
        async with self._cond:
            await asyncio.wait_for(
                self._cond.wait_for(lambda: self._done >= request or self._stopped), timeout
            )
            if self._done < request:
                return Outcome(ok=False, policy_ok=False, error="the reconcile loop has stopped")
            return self.outcome

    async def sync(self, timeout: float | None = None) -> Outcome:
        return await self.wait_for(self.mark_dirty(), timeout)

    async def run(self, *, max_passes: int | None = None) -> None:
        """The loop; `max_passes` bounds it for tests. When it ends (also by
        cancellation), every waiter is released (`wait_for`)."""
        self._stopped = False
        try:
            await self._loop(max_passes)
        finally:
            self._stopped = True
            # The lock is free unless a waiter is between its checks (never across an
            # await), so this does not suspend a cancelled task.
            async with self._cond:
                self._cond.notify_all()

    async def _loop(self, max_passes: int | None) -> None:
        passes = 0
        while max_passes is None or passes < max_passes:
            try:
                await asyncio.wait_for(self._wake.wait(), self._full_resync_interval)
            except TimeoutError:
                self._force = True
            self._wake.clear()
            target = self._requested
            try:
                ok = await self.run_once()
            except Exception as e:  # a bug must not leave CNI verbs waiting forever
                log.exception("reconcile pass crashed; will retry")
                self.stats.failures += 1
                self.stats.last_error = f"pass: {e}"
                self.outcome = Outcome(ok=False, policy_ok=False, error=self.stats.last_error)
                ok = False
            passes += 1
            if self._on_pass is not None:
                try:
                    self._on_pass(self)
                except Exception:
                    log.exception("reconcile: the after-pass hook failed")
            async with self._cond:
                # A failed pass still releases its waiters: an ADD must not hang on
                # BIRD being down. The failure is logged and retried.
                self._done = max(self._done, target)
                self._cond.notify_all()
            if not ok:
                await asyncio.sleep(self._retry_interval)
                self._force = True
                self._wake.set()

    async def run_once(self) -> bool:
        """One pass: compute, then apply what changed. False if an applier failed."""
        start = time.perf_counter()
        now = time.monotonic()
        force = self._force or now - self._last_full > self._full_resync_interval
        self._force = False
        if force:
            self._last_full = now
        snap = self._snapshot()
        self.index.set_node(snap.node_config)
        desired = self.index.desired(snap.pods)
        self.desired = desired
        ok = True
        routes = desired.anycast_routes
        if self._anycast is not None and (force or routes != self._applied_routes):
            if await self._apply("anycast", self._anycast.apply_anycast(routes, full=force)):
                self._applied_routes = routes
            else:
                ok = False
        node = snap.node_config
        if self._exports is not None and node is not None:
            want = (node, desired.exports)
            if force or want != self._applied_exports:
                if await self._apply(
                    "exports", self._exports.apply_exports(node, desired.exports, full=force)
                ):
                    self._applied_exports = want
                else:
                    ok = False
        policy_ok = True
        if self._policy is not None:
            t0 = time.perf_counter()
            if force:
                resync = getattr(self._policy, "resync", None)
                if resync is not None:
                    resync()  # the whole view, not only what events named
            allocs = self.policy_allocations()
            # Read again: the applier takes the datastore's events up to now with it
            # (the one read above is from before the anycast and BIRD awaits).
            snap = self._snapshot()
            policy_ok = await self._apply("policy", self._policy.apply_policy(snap, allocs))
            self.stats.policy_sync_seconds = time.perf_counter() - t0
            self.stats.policy_syncs = getattr(self._policy, "syncs", 0)
            self.stats.policy_updates = getattr(self._policy, "updates", 0)
        ok = ok and policy_ok
        self.stats.passes += 1
        self.stats.last_pass_seconds = time.perf_counter() - start
        if not ok:
            self.stats.failures += 1
        self.outcome = Outcome(
            ok=ok, policy_ok=policy_ok, error="" if ok else self.stats.last_error
        )
        return ok

    async def _apply(self, part: str, coro: Awaitable[None]) -> bool:
        try:
            await coro
        except Exception as e:
            self.stats.last_error = f"{part}: {e}"
            log.exception("reconcile: applying %s failed; will retry", part)
            return False
        return True
