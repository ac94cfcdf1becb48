"""Adapters from the reconciler's three parts to the apply/ modules that do the work.

The reconciler computes desired state and calls `apply_anycast`,
`apply_exports` and `apply_policy` (its `AnycastApplier`, `ExportApplier`,
`PolicyApplier` protocols); these classes translate that into calls on the
kernel datapath, the BIRD controller and the nftables policy engine. Blocking
calls go through the agent's kernel thread pool (`run_kernel`), never the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from flock.agent.datastore.base import Event, EventType, Kind, PodKey, Snapshot
from flock.agent.reconcile import IPAddress, IPNetwork, Nexthop
from flock.apply.datapath import Datapath as KernelDatapath
from flock.model.allocation import Allocation
from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Pod

T = TypeVar("T")
log = logging.getLogger(__name__)
RunKernel = Callable[..., Awaitable[Any]]


class KernelAnycast:
    """The node's anycast host routes, through the datapath (O(changes) per pass)."""

    def __init__(self, run_kernel: RunKernel, datapath: KernelDatapath) -> None:
        self.run_kernel = run_kernel
        self.datapath = datapath

    async def apply_anycast(
        self, routes: Mapping[IPAddress, frozenset[Nexthop]], *, full: bool = False
    ) -> None:
        desired = {ip: [(nh.via, nh.dev) for nh in sorted(hops)] for ip, hops in routes.items()}
        await self.run_kernel(self.datapath.reconcile_anycast, desired, full=full)


class BirdExports:
    """Full `sync` when the NodeConfig changed or a resync is due; otherwise the delta
    through `update`, BIRD's hot path (a withdraw is one kernel-table delete)."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self._last: tuple[NodeConfig, frozenset[IPNetwork]] | None = None

    async def apply_exports(
        self, node: NodeConfig, exports: frozenset[IPNetwork], *, full: bool = False
    ) -> None:
        last = self._last
        self._last = None  # unknown until this call succeeds
        if full or last is None or last[0] != node:
            await self.controller.sync(node, exports)
        else:
            await self.controller.update(add=exports - last[1], remove=last[1] - exports)
        self._last = (node, exports)


class NftPolicy:
    """Feeds the policy engine the pods on this node (with their host veths) and the rest,
    change by change.

    A pass hands the engine only what changed since the previous one, as one
    `PolicyChanges` (`engine.update`: O(change), SPEC §9's 5 ms at 10,000 pods x
    1,000 policies; the whole view through `engine.sync` costs a diff of every
    object, 2-3 ms, and more under load). What changed comes from two places:

    - the datastore's events (`events`, its own subscription, drained at the start
      of a pass, in the same step as the snapshot is read, so that every change the
      snapshot holds has had its event taken): a Pod, Namespace or NetworkPolicy
      named by one is re-read from the snapshot;
    - the attachment table: the policed allocations are diffed by identity against
      the previous pass (O(local pods), only when the table's list changed). A local
      pod goes in as its allocation-address version, in `pods` and `local_pods`.

    The whole view goes in (`engine.sync`) at the first pass, on a RESYNC event,
    when the engine says it lost the view (`PolicyResyncNeeded`), after a failed
    pass, and on the reconciler's periodic full pass (`resync`). Without an event
    queue (tests driving the applier alone) every pass is a sync.
    """

    def __init__(
        self, run_kernel: RunKernel, engine: Any, events: asyncio.Queue[Event] | None = None
    ) -> None:
        self.run_kernel = run_kernel
        self.engine = engine
        self.events = events
        # What the engine was last given: policies by key (raw object, parsed), the
        # policed allocations by host veth and the LocalPod built from each (with
        # the snapshot pod it was built from), the veths of each pod.
        self._parsed: dict[PodKey, tuple[Mapping[str, Any], Any]] = {}
        self._allocs: dict[str, Allocation] = {}
        self._local: dict[str, tuple[Pod | None, Any]] = {}
        self._by_pod: dict[PodKey, set[str]] = {}
        self._allocs_seen: Sequence[Allocation] | None = None
        self._dirty_pods: set[PodKey] = set()
        self._dirty_ns: set[str] = set()
        self._dirty_pols: set[PodKey] = set()
        self._need_sync = True
        self._empty_applied = False
        self.syncs = 0
        self.updates = 0

    def resync(self) -> None:
        """The next pass gives the engine the whole view (periodic full pass, failures)."""
        self._need_sync = True

    def _drain(self) -> None:
        q = self.events
        if q is None:
            self._need_sync = True
            return
        while not q.empty():
            ev = q.get_nowait()
            if ev.type is EventType.RESYNC or ev.kind is None:
                self._need_sync = True
            elif ev.kind is Kind.POD:
                self._dirty_pods.add((ev.namespace, ev.name))
            elif ev.kind is Kind.NAMESPACE:
                self._dirty_ns.add(ev.name or ev.namespace)
            elif ev.kind is Kind.NETWORK_POLICY:
                self._dirty_pols.add((ev.namespace, ev.name))
        if self._need_sync:  # the sync covers them all
            self._dirty_pods.clear()
            self._dirty_ns.clear()
            self._dirty_pols.clear()

    def _parse(self, key: PodKey, obj: Mapping[str, Any]) -> Any:
        from flock.model.policy import parse_policy

        hit = self._parsed.get(key)
        if hit is not None and hit[0] is obj:
            return hit[1]
        parsed = parse_policy(obj, key)
        self._parsed[key] = (obj, parsed)
        return parsed

    def _local_pod(self, a: Allocation, snap: Snapshot) -> Any:
        """The LocalPod of a policed allocation: its pod as the snapshot has it (or a
        bare one: an ADD can come before the watch delivers the pod), with the
        allocation's addresses. The same object while neither changed: the
        compiler reuses work by identity."""
        from flock.compile.policy import LocalPod

        src = snap.pods.get((a.namespace, a.pod))
        hit = self._local.get(a.host_ifname)
        if hit is not None and hit[0] is src and self._allocs.get(a.host_ifname) is a:
            return hit[1]
        pod = dataclasses.replace(
            src or Pod(namespace=a.namespace, name=a.pod), ips=a.all_addresses
        )
        lp = LocalPod(pod=pod, ifname=a.host_ifname, ips=a.all_addresses)
        self._local[a.host_ifname] = (src, lp)
        return lp

    def _pod_entry(self, key: PodKey, snap: Snapshot) -> Pod | None:
        """The pod the engine sees as a peer: a local one in its allocation-address
        version (the greatest veth name if it has several attachments, so that a
        sync and any sequence of updates agree), else the snapshot's."""
        ifnames = self._by_pod.get(key)
        if ifnames:
            lp = self._local[max(ifnames)][1]
            return lp.pod  # type: ignore[no-any-return]
        return snap.pods.get(key)

    def _put_alloc(self, ifname: str, a: Allocation | None) -> None:
        old = self._allocs.pop(ifname, None)
        if old is not None:
            okey = (old.namespace, old.pod)
            on = self._by_pod.get(okey)
            if on is not None:
                on.discard(ifname)
                if not on:
                    del self._by_pod[okey]
        if old is not a:
            self._local.pop(ifname, None)  # built from the old allocation's addresses
        if a is not None:
            self._allocs[ifname] = a
            self._by_pod.setdefault((a.namespace, a.pod), set()).add(ifname)

    def idle(self, snapshot: Snapshot) -> bool:
        """No policy exists and the (empty) ruleset is applied: new pods change nothing."""
        return self._empty_applied and not snapshot.network_policies

    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        self._drain()
        if self._empty_applied and not snapshot.network_policies and not self._dirty_pols:
            # No NetworkPolicy selects anyone, so no pod is isolated: the ruleset is
            # empty whatever the pods are, and it is already applied. (A policy that
            # does not parse isolates what it may select: never empty.) What changed
            # meanwhile goes in with the whole view once a policy appears.
            self._need_sync = True
            self._dirty_pods.clear()
            self._dirty_ns.clear()
            return
        from flock.apply.nft import NftError, PolicyResyncNeeded

        changed: Sequence[PodKey] = ()
        try:
            try:
                if self._need_sync:
                    await self._sync(snapshot, allocations)
                else:
                    changes = self._changes(snapshot, allocations)
                    if changes is not None:
                        changed = list(changes.policies)
                        try:
                            await self.run_kernel(self.engine.update, changes)
                            self.updates += 1
                        except PolicyResyncNeeded:
                            changed = ()
                            await self._sync(snapshot, allocations)
            except NftError as exc:
                if not await self._isolate(exc, changed):
                    raise
        except BaseException:
            self._need_sync = True  # what the engine holds is unknown: the whole view next
            self._empty_applied = False
            raise
        self._empty_applied = not self._parsed

    async def _isolate(self, exc: Exception, changed: Sequence[PodKey]) -> bool:
        """nft refused a transaction: find the policies whose rules it refuses and
        enforce each as its `RejectedPolicy` (fail closed for the pods it may select,
        reported like a policy that does not parse) instead of failing every change.

        Suspects: the policies this pass changed, else every valid one. All of them
        go in as stand-ins first (if nft still refuses, the cause is elsewhere:
        False, the pass fails as before); then they are put back in halves, and a
        half that is refused again is split, down to single policies. One bad policy
        among n costs about 2 log2(n) transactions, each a whole-table replace (the
        kernel's copy is unknown after a refusal): seconds at 1,000 policies, and
        only when nft refuses. The stand-in is kept for that object; a new version
        of the policy is tried again."""
        from flock.apply.nft import NftError
        from flock.compile.policy import PolicyChanges
        from flock.model.policy import RejectedPolicy

        good = [k for k, (_, p) in self._parsed.items() if not isinstance(p, RejectedPolicy)]
        suspects = sorted(set(changed) & set(good)) or sorted(good)
        if not suspects:
            return False
        reason = f"nft refused the rules compiled from it: {exc}"[:300]
        orig = {k: self._parsed[k][1] for k in suspects}
        stand = {k: RejectedPolicy.from_object(self._parsed[k][0], reason, k) for k in suspects}

        async def put(pols: Mapping[PodKey, Any]) -> None:
            await self.run_kernel(self.engine.update, PolicyChanges(policies=pols))

        try:
            await put(stand)
        except NftError:
            log.error("nft refuses the policy ruleset even without the suspect policies")
            return False

        async def restore(group: list[PodKey]) -> list[PodKey]:
            try:
                await put({k: orig[k] for k in group})
                return []
            except NftError:
                await put({k: stand[k] for k in group})
                if len(group) == 1:
                    return group
                mid = len(group) // 2
                return await restore(group[:mid]) + await restore(group[mid:])

        for key in await restore(suspects):
            self._parsed[key] = (self._parsed[key][0], stand[key])
            log.warning("NetworkPolicy %s/%s: nft refused its rules; enforced fail-closed", *key)
        self.updates += 1
        return True

    async def _sync(self, snap: Snapshot, allocations: Sequence[Allocation]) -> None:
        from flock.compile.policy import PolicyInputs
        from flock.model.policy import RejectedPolicy

        self._need_sync = False
        self._dirty_pods.clear()
        self._dirty_ns.clear()
        self._dirty_pols.clear()
        good: list[Any] = []
        bad: dict[PodKey, Any] = {}  # -> RejectedPolicy: enforced fail-closed
        old_parsed, self._parsed = self._parsed, {}
        for key, obj in snap.network_policies.items():
            hit = old_parsed.get(key)
            if hit is not None and hit[0] is obj:
                self._parsed[key] = hit  # parsed once per object, not per sync
            parsed = self._parse(key, obj)
            if isinstance(parsed, RejectedPolicy):
                bad[key] = parsed
            else:
                good.append(parsed)
        old_local, old_allocs = self._local, self._allocs
        self._allocs, self._by_pod = {}, {}
        self._local = {}
        local: dict[str, Any] = {}
        for a in allocations:
            self._put_alloc(a.host_ifname, a)
            # Same objects for unchanged pods: the policy compiler reuses work by identity.
            if old_allocs.get(a.host_ifname) is a and a.host_ifname in old_local:
                self._local[a.host_ifname] = old_local[a.host_ifname]
            local[a.host_ifname] = self._local_pod(a, snap)
        self._allocs_seen = allocations
        pods = dict(snap.pods)
        for key in self._by_pod:
            entry = self._pod_entry(key, snap)
            assert entry is not None
            pods[key] = entry
        inputs = PolicyInputs(
            local_pods=list(local.values()),
            pods=list(pods.values()),
            namespaces=snap.namespaces,
            policies=good,
            rejected=bad,
        )
        await self.run_kernel(self.engine.sync, inputs)
        self.syncs += 1

    def _changes(self, snap: Snapshot, allocations: Sequence[Allocation]) -> Any:
        """What changed since the engine's view, re-read from `snap`; None if nothing."""
        from flock.compile.policy import PolicyChanges

        pods_touched = self._dirty_pods
        self._dirty_pods = set()
        local: dict[str, Any] = {}
        if allocations is not self._allocs_seen:
            cur = {a.host_ifname: a for a in allocations}
            changed = [i for i, a in self._allocs.items() if cur.get(i) is not a]
            changed += [i for i, a in cur.items() if self._allocs.get(i) is not a]
            for ifname in changed:
                old = self._allocs.get(ifname)
                if old is not None:
                    pods_touched.add((old.namespace, old.pod))
                a = cur.get(ifname)
                self._put_alloc(ifname, a)
                if a is not None:
                    pods_touched.add((a.namespace, a.pod))
                    local[ifname] = self._local_pod(a, snap)
                else:
                    local[ifname] = None
            self._allocs_seen = allocations
        for key in pods_touched:
            for ifname in self._by_pod.get(key, ()):
                local[ifname] = self._local_pod(self._allocs[ifname], snap)
        pods = {key: self._pod_entry(key, snap) for key in pods_touched}
        namespaces = {name: snap.namespaces.get(name) for name in self._dirty_ns}
        self._dirty_ns = set()
        policies: dict[PodKey, Any] = {}
        for key in self._dirty_pols:
            obj = snap.network_policies.get(key)
            if obj is None:
                if self._parsed.pop(key, None) is not None:
                    policies[key] = None
            else:
                hit = self._parsed.get(key)
                if hit is None or hit[0] is not obj:
                    policies[key] = self._parse(key, obj)
        self._dirty_pols = set()
        if not (pods or local or namespaces or policies):
            return None
        return PolicyChanges(pods=pods, local_pods=local, namespaces=namespaces, policies=policies)
