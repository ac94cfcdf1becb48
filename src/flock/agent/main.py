"""`flock agent`: wires the node agent's parts together and runs them until SIGTERM.

Start-up order is what makes a restart mid-life lose nothing and leave nothing:

1. load the allocation store (the only record of which addresses are held);
2. start the datastore and wait for its first full view (nothing is removed
   from the kernel before that, or a half-loaded view would look like pods
   had vanished);
3. re-sync the kernel from the store (`flock.agent.startup`): repair the
   network of every stored attachment whose pod namespace still exists but
   whose veth, addresses or host routes are missing; remove veths and host
   routes of ours that the store does not know. One pod that cannot be
   repaired is counted and shown, and does not stop the agent;
4. replay the DELs the plugin recorded while the agent was away;
5. run one full reconcile (anycast routes, BGP exports, policy), then start
   serving the plugin's socket.

Shutdown (SIGTERM): stop accepting, give running verbs `--drain-timeout`
seconds, then stop the loops and exit, also when a verb is stuck in the
kernel (its thread is abandoned: the process exits without waiting for it).

The pieces live beside this file: `options` (argparse), `logs` (JSON lines),
`appliers` (reconciler -> apply/), `startup` (re-sync, named tasks),
`birdwatch`, `status`, `metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flock.agent import rpc
from flock.agent.appliers import BirdExports, KernelAnycast, NftPolicy
from flock.agent.birdwatch import watch_bird
from flock.agent.datastore.base import Datastore
from flock.agent.datastore.files import FilesDatastore
from flock.agent.logs import JsonFormatter, setup_logging
from flock.agent.metrics import AgentMetrics, Health, MetricsServer
from flock.agent.options import AGENT_SOCKET, Options, parse_args
from flock.agent.policy_events import RejectedPolicyEvents
from flock.agent.reconcile import AllocationIndex, Reconciler
from flock.agent.service import CniService
from flock.agent.startup import ResyncReport, resync_kernel, spawn
from flock.agent.status import STATUS_SOCKET, serve_status
from flock.apply.datapath import Datapath as KernelDatapath
from flock.apply.store import AllocationStore
from flock.compile.ipam import Ipam
from flock.model.nodeconfig import Peer

__all__ = ["AGENT_SOCKET", "Agent", "JsonFormatter", "Options", "main", "parse_args", "run"]

log = logging.getLogger("flock.agent")


def make_datastore(opts: Options) -> Datastore:
    """The source of pods, policies and the NodeConfig, chosen by the flags."""
    if opts.kubernetes or opts.kubeconfig is not None:
        from flock.agent.datastore.kube import KubeDatastore
        from flock.kube.client import KubeClient

        path = None if opts.kubernetes else str(opts.kubeconfig)
        # Without policy the agent needs only its own node's pods.
        return KubeDatastore(
            KubeClient.from_kubeconfig(path), node_name=opts.node_name, cluster_pods=opts.policy
        )
    assert opts.manifests is not None
    return FilesDatastore(opts.manifests, node_name=opts.node_name)


class Agent:
    def __init__(self, opts: Options, datastore: Datastore | None = None) -> None:
        self.opts = opts
        self.metrics = AgentMetrics()
        self.health = Health()
        self.datastore: Datastore = datastore or make_datastore(opts)
        self.store = AllocationStore(opts.state_dir)
        self.datapath = KernelDatapath()
        self.bird: Any = None
        self.policy_engine: Any = None
        self.resync = ResyncReport()
        self.policy_events = RejectedPolicyEvents()
        self._tasks: list[asyncio.Task[Any]] = []
        self._event_tasks: list[asyncio.Task[Any]] = []
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._metrics_server: MetricsServer | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        o = self.opts
        for d in (o.state_dir, o.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        allocations = await asyncio.to_thread(self.store.load)
        log.info("allocation store loaded", extra={"allocations": len(allocations)})
        await self.datastore.start()
        await self.datastore.wait_synced()
        self.reconciler = Reconciler(
            snapshot=self.datastore.snapshot,
            index=AllocationIndex(),
            on_pass=self._after_pass,
        )
        self.service = CniService(
            datastore=self.datastore,
            ipam=Ipam(allocations),
            store=self.store,
            datapath=self.datapath,
            reconciler=self.reconciler,
            metrics=self.metrics,
            pod_wait=o.pod_wait,
        )
        self.metrics.bind_allocations(self.service.allocations)
        self.reconciler.set_appliers(
            anycast=KernelAnycast(self.service.run_kernel, self.datapath),
            exports=self._make_bird(),
            policy=self._make_policy(),
        )
        self.resync = await self.service.run_kernel(
            resync_kernel, self.datapath, self.service.allocations()
        )
        self.metrics.resync_failures.set(len(self.resync.failures))
        log.info("kernel re-synced from the store", extra=self.resync.counts())
        spawn(self.reconciler.run(), name="reconcile", tasks=self._tasks)
        spawn(self._follow_datastore(), name="datastore-events", tasks=self._tasks)
        self.service.ready = True
        replayed = await rpc.replay_deferred_dels(o.state_dir, self.service.handle)
        if replayed:
            log.info("replayed deferred DELs", extra={"count": replayed})
        outcome = await self.reconciler.sync()
        if not outcome.ok:
            log.warning("first reconcile incomplete", extra={"error": outcome.error})
        server = await rpc.serve(o.socket, self.service.handle)
        self._servers.append((server, o.socket))
        # DELs a plugin recorded while this agent was starting (after the replay above).
        replay = rpc.replay_deferred_dels_forever(o.state_dir, self.service.handle)
        spawn(replay, name="deferred-dels", tasks=self._tasks)
        status_path = o.run_dir / STATUS_SOCKET
        self._servers.append((await serve_status(status_path, self.inspect), status_path))
        if o.metrics_addr is not None:
            self._metrics_server = MetricsServer(metrics=self.metrics, health=self.health)
            host, port = await self._metrics_server.start(*o.metrics_addr)
            log.info("metrics listening", extra={"addr": f"{host}:{port}"})
        if self.bird is not None:
            watch = watch_bird(
                self.bird,
                health=self.health,
                metrics=self.metrics,
                on_back=self.reconciler.force_resync,
            )
            spawn(watch, name="bird-health", tasks=self._tasks)
        self.health.started = True
        self.health.reason = "ok"
        self._start_kube_loops()
        log.info("agent ready", extra={"node": o.node_name, "socket": str(o.socket)})

    def _after_pass(self, result: Any) -> None:
        """After every reconcile pass: metrics, and Events on newly rejected policies."""
        self.metrics.observe_pass(result, policy=self.policy_engine is not None)
        if self.policy_engine is None:
            return
        for event in self.policy_events.observe(self.policy_engine.rejected()):
            log.warning(
                "NetworkPolicy %s/%s rejected: %s", event.namespace, event.name, event.message
            )
            spawn(
                self.datastore.record_event(event),
                name=f"event {event.namespace}/{event.name}",
                tasks=self._event_tasks,
            )
        self._event_tasks = [t for t in self._event_tasks if not t.done()]

    def _start_kube_loops(self) -> None:
        """NodeConfig status and leak reconciliation: only with the Kubernetes datastore."""
        from flock.agent.datastore.kube import KubeDatastore

        if not isinstance(self.datastore, KubeDatastore):
            return
        from flock.agent.kubeloops import LeakReconciler, report_status_forever
        from flock.kube.status import NodeStatusWriter

        writer = NodeStatusWriter(self.datastore.client, self.opts.node_name)
        spawn(report_status_forever(self, writer), name="nodeconfig-status", tasks=self._tasks)
        self.leaks = LeakReconciler(self, self.datastore, grace=self.opts.leak_grace)
        leaks = self.leaks.run_forever(interval=self.opts.leak_interval)
        spawn(leaks, name="leak-reconcile", tasks=self._tasks)

    def _make_bird(self) -> BirdExports | None:
        o = self.opts
        if o.bird_socket is None:
            return None
        from flock.apply.bird import BirdController, read_password_file

        async def password(peer: Peer) -> str:
            ref = peer.password_secret_ref
            if ref is None:
                return await read_password_file(peer)
            value = await self.datastore.get_secret(ref.namespace, ref.name, ref.key)
            if value is None:
                raise LookupError(
                    f"BGP password for peer {peer.address}: Secret {ref.namespace}/{ref.name} "
                    f"has no key {ref.key!r}"
                )
            return value

        self.bird = BirdController(
            config_path=o.bird_config or (o.run_dir / "bird.conf"),
            socket_path=o.bird_socket,
            router_id=o.router_id,
            resolve_password=password,
        )
        self.health.bird_configured = True
        return BirdExports(self.bird)

    def _make_policy(self) -> NftPolicy | None:
        if not self.opts.policy:
            return None
        from flock.apply.nft import NftCli, NftError, NftLib, PolicyEngine

        nft: Any
        try:
            nft = NftLib()
        except (OSError, NftError) as e:
            log.warning("libnftables unavailable, using the nft binary", extra={"error": str(e)})
            nft = NftCli()
        self.policy_engine = PolicyEngine(nft)
        # Its own subscription: it drains the events at each pass (O(change) updates).
        events = self.datastore.subscribe()
        return NftPolicy(self.service.run_kernel, self.policy_engine, events)

    async def _follow_datastore(self) -> None:
        q = self.datastore.subscribe()
        while True:
            await q.get()
            # Drain the burst: one pass serves all of it.
            while not q.empty():
                q.get_nowait()
            self.reconciler.mark_dirty()

    async def inspect(self) -> dict[str, Any]:
        """Everything `flock status` shows."""
        from flock.apply.store import allocation_to_dict

        d = self.reconciler.desired
        out: dict[str, Any] = {
            "node": self.opts.node_name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "datastore_synced": self.datastore.synced,
            "allocations": [
                allocation_to_dict(a)
                for a in sorted(self.service.allocations(), key=lambda a: a.key)
            ],
            "anycast": {
                str(ip): [{"via": str(h.via), "dev": h.dev} for h in sorted(hops)]
                for ip, hops in sorted(d.anycast_routes.items(), key=lambda kv: str(kv[0]))
            },
            "exports": sorted(str(p) for p in d.exports),
            "attachments": self.service.table.counts(),
            "resync": self.resync.to_status(),
            "reconcile": dataclasses.asdict(self.reconciler.stats),
            "bgp": None,
            "policy": self.policy_engine.status() if self.policy_engine is not None else None,
        }
        snap = self.datastore.snapshot()
        out["node_config"] = "ok" if snap.node_config is not None else snap.node_config_error
        out["events"] = [
            {"pod": f"{e.namespace}/{e.name}", "reason": e.reason, "message": e.message}
            for e in getattr(self.datastore, "events", [])[-20:]
        ]
        if self.bird is not None:
            try:
                sessions = await self.bird.sessions()
                out["bgp"] = {
                    "bird": "up",
                    "sessions": {
                        str(peer): {"state": st.state, "info": st.info, "up": st.established}
                        for peer, st in sessions.items()
                    },
                }
            except Exception as e:
                out["bgp"] = {"bird": f"down: {e}", "sessions": {}}
        return out

    async def stop(self) -> None:
        """Stop serving, let running verbs finish (up to the drain time), stop the loops.

        A verb still running after the drain time is cancelled (its undo steps run
        as far as they can without the loops); a kernel call that is stuck stays
        stuck in its thread, which `main` does not wait for.
        """
        for server, path in self._servers:
            await rpc.close_and_unlink(server, path)
        service = getattr(self, "service", None)
        drained = service is None or await service.drain(self.opts.drain_timeout)
        if not drained:
            log.warning(
                "shutting down with CNI verbs still running after %gs",
                self.opts.drain_timeout,
                extra={"inflight": service.inflight if service else 0},
            )
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._metrics_server is not None:
            await self._metrics_server.close()
        if self.bird is not None:
            with contextlib.suppress(Exception):
                await self.bird.close()
        await self.datastore.close()
        if service is not None:
            service.close(wait=drained)
        # Deletes veths that DELs retired but the background reaper has not removed yet.
        await asyncio.to_thread(self.datapath.close)
        self.store.close()


async def run(opts: Options) -> int:
    agent = Agent(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except Exception:
        log.exception("agent failed to start")
        await agent.stop()
        return 1
    await stop.wait()
    log.info("shutting down (pods keep their network; state is on disk)")
    await agent.stop()
    return 0


def main(argv: Sequence[str]) -> int:
    opts, level = parse_args(argv)
    setup_logging(level)
    code = asyncio.run(run(opts))
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    for t in stuck:
        t.join(0.5)  # idle pool threads are on their way out
    stuck = [t for t in stuck if t.is_alive()]
    if stuck:
        # A kernel call that never returned (the drain time ran out): the interpreter
        # would join its thread at exit and hang until SIGKILL. State is on disk.
        log.warning(
            "exiting with threads stuck in the kernel", extra={"threads": [t.name for t in stuck]}
        )
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code
