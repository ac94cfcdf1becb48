"""The agent's two loops that exist only on the Kubernetes datastore.

- **Status**: every `interval` seconds the agent's state (ready, BGP sessions
  per peer, allocations per family, pods, exported anycast, version) is handed
  to `NodeStatusWriter`, which writes the NodeConfig's status subresource only
  when something changed.
- **Leaks**: containerd 2.4 never sends CNI GC or CHECK, so an allocation whose
  DEL was lost would hold its addresses (and anycast export) forever. Every
  `interval` seconds the pure decision (`flock.compile.leaks.leaked`) picks the
  allocations whose pod incarnation has been gone from the synced view for
  `grace` seconds and whose netns no longer exists; each is confirmed against
  the API (cache, then GET: `KubeDatastore.pod_exists`) and released through
  the service's own DEL path (veth, routes, exports, policy, store). An API that
  cannot be asked releases nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import flock
from flock.agent.datastore.kube import KubeDatastore
from flock.compile.leaks import LeakDecision, leaked
from flock.kube.status import NodeStatusReport, NodeStatusWriter, PeerState

if TYPE_CHECKING:
    from flock.agent.main import Agent

log = logging.getLogger(__name__)


async def status_report(agent: Agent) -> NodeStatusReport:
    """What the agent is doing now, as the NodeConfig status says it."""
    snap = agent.datastore.snapshot()
    ready, reason = agent.health.ready()
    why = "AgentReady" if ready else "AgentNotReady"
    if snap.node_config is None:
        ready, why, reason = False, "NodeConfigUnavailable", snap.node_config_error
    elif snap.node_config_error:
        why, reason = (
            "NodeConfigInvalid",
            f"last good NodeConfig in force; {snap.node_config_error}",
        )
    peers: list[PeerState] = []
    bgp = snap.node_config.spec.bgp if snap.node_config is not None else None
    if bgp is not None:
        sessions = {}
        if agent.bird is not None:
            try:
                sessions = await agent.bird.sessions()
            except Exception as e:
                log.debug("BIRD sessions unavailable", extra={"error": str(e)})
        for p in bgp.peers:
            st = sessions.get(p.address)
            state = "Unknown" if st is None else ("Established" if st.established else st.state)
            info = "" if st is None else st.info
            peers.append(PeerState(str(p.address), p.asn, state, info[:1024]))
    allocs = agent.service.allocations()
    return NodeStatusReport(
        ready=ready,
        reason=why,
        message=reason,
        agent_version=flock.__version__,
        peers=tuple(peers),
        allocations={
            "ipv6": sum(1 for a in allocs if a.v6 is not None),
            "ipv4": sum(1 for a in allocs if a.v4 is not None),
        },
        pods=len({(a.namespace, a.pod) for a in allocs}),
        exported_anycast=len(agent.reconciler.desired.anycast_routes),
    )


async def report_status_forever(
    agent: Agent, writer: NodeStatusWriter, *, interval: float = 5.0
) -> None:
    while True:
        try:
            await writer.write(await status_report(agent))
        except Exception:
            log.exception("status report failed")
        await asyncio.sleep(interval)


class LeakReconciler:
    """Finds and releases leaked allocations; `run_once` is one pass (tests call it)."""

    def __init__(
        self,
        agent: Agent,
        datastore: KubeDatastore,
        *,
        grace: float = 60.0,
        netns_exists: Callable[[str], bool] = os.path.exists,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.datastore = datastore
        self.grace = grace
        self.netns_exists = netns_exists
        self.clock = clock
        self.state = LeakDecision()
        self.released = 0

    async def run_once(self) -> int:
        if not self.datastore.synced:
            return 0
        live = {k: p.uid for k, p in self.datastore.snapshot().pods.items()}
        service = self.agent.service
        self.state = leaked(
            service.allocations(),
            live,
            self.netns_exists,
            self.clock(),
            self.grace,
            self.state.missing_since,
        )
        done = 0
        for alloc in self.state.release:
            exists = await self.datastore.pod_exists(alloc.namespace, alloc.pod, alloc.pod_uid)
            if exists is not False:
                continue  # alive after all (the cache lagged), or the API cannot say
            # The service's GC path: releases only if the attachment is still this one.
            if await service._delete_key(alloc.key, only=alloc):
                done += 1
                log.warning(
                    "released a leaked allocation (pod gone, netns gone, no DEL came)",
                    extra={
                        "pod": f"{alloc.namespace}/{alloc.pod}",
                        "uid": alloc.pod_uid,
                        "container": alloc.key.container_id[:12],
                    },
                )
        self.released += done
        return done

    async def run_forever(self, *, interval: float = 30.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("leak reconcile pass failed")
