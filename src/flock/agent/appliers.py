"""Adapters from the reconciler's three parts to the apply/ modules that do the work.

The reconciler computes desired state and calls `apply_anycast`,
`apply_exports` and `apply_policy` (its `AnycastApplier`, `ExportApplier`,
`PolicyApplier` protocols); these classes translate that into calls on the
kernel datapath, the BIRD controller and the nftables policy engine. Blocking
calls go through the agent's kernel thread pool (`run_kernel`), never the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from flock.agent.datastore.base import Snapshot
from flock.agent.reconcile import IPAddress, IPNetwork, Nexthop
from flock.apply.datapath import Datapath as KernelDatapath
from flock.model.allocation import Allocation
from flock.model.nodeconfig import NodeConfig

T = TypeVar("T")
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
    """Feeds the policy engine the pods on this node (with their host veths) and the rest."""

    def __init__(self, run_kernel: RunKernel, engine: Any) -> None:
        self.run_kernel = run_kernel
        self.engine = engine
        self._parsed: dict[tuple[str, str], tuple[Mapping[str, Any], Any]] = {}
        self._local: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._empty_applied = False

    def _policies(self, snap: Snapshot) -> tuple[list[Any], dict[tuple[str, str], Any]]:
        from flock.model.policy import RejectedPolicy, parse_policy

        good: list[Any] = []
        bad: dict[tuple[str, str], Any] = {}  # -> RejectedPolicy: enforced fail-closed
        cache: dict[tuple[str, str], tuple[Mapping[str, Any], Any]] = {}
        for key, obj in snap.network_policies.items():
            hit = self._parsed.get(key)
            if hit is not None and hit[0] is obj:
                cache[key] = hit
            else:
                cache[key] = (obj, parse_policy(obj, key))
            parsed = cache[key][1]
            if isinstance(parsed, RejectedPolicy):
                bad[key] = parsed
            else:
                good.append(parsed)
        self._parsed = cache
        return good, bad

    def idle(self, snapshot: Snapshot) -> bool:
        """No policy exists and the (empty) ruleset is applied: new pods change nothing."""
        return self._empty_applied and not snapshot.network_policies

    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        from flock.compile.policy import LocalPod, PolicyInputs
        from flock.model.pod import Pod

        good, bad = self._policies(snapshot)
        if not good and not bad and self._empty_applied:
            # No NetworkPolicy selects anyone, so no pod is isolated: the ruleset is
            # empty whatever the pods are, and it is already applied. (A policy that
            # does not parse isolates what it may select: never empty.)
            return
        pods = dict(snapshot.pods)
        local = []
        cache: dict[tuple[str, str, str], tuple[Pod | None, Any]] = {}
        for a in allocations:
            key = (a.namespace, a.pod, a.host_ifname)
            src = pods.get((a.namespace, a.pod))
            hit = self._local.get(key)
            # Same objects for unchanged pods: the policy compiler reuses work by identity.
            if hit is not None and hit[0] is src and hit[1].ips == a.all_addresses:
                lp = hit[1]
            else:
                pod = dataclasses.replace(
                    src or Pod(namespace=a.namespace, name=a.pod), ips=a.all_addresses
                )
                lp = LocalPod(pod=pod, ifname=a.host_ifname, ips=a.all_addresses)
            cache[key] = (src, lp)
            pods[(a.namespace, a.pod)] = lp.pod
            local.append(lp)
        self._local = cache
        inputs = PolicyInputs(
            local_pods=local,
            pods=list(pods.values()),
            namespaces=snapshot.namespaces,
            policies=good,
            rejected=bad,
        )
        await self.run_kernel(self.engine.sync, inputs)
        self._empty_applied = not good and not bad
