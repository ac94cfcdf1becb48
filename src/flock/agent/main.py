"""`flock agent`: wires the node agent's parts together and runs them until SIGTERM.

Start-up order is what makes a restart mid-life lose nothing and leave nothing:

1. load the allocation store (the only record of which addresses are held);
2. start the datastore and wait for its first full view (nothing is removed
   from the kernel before that, or a half-loaded view would look like pods
   had vanished);
3. re-sync the kernel from the store: repair the network of every stored
   attachment whose pod namespace still exists but whose veth, addresses or
   host routes are missing (in place when the veth pair is intact, so the pod
   keeps its interfaces and traffic; rebuilt only when the pair is gone);
   remove veths and host routes of ours that the store does not know;
4. replay the DELs the plugin recorded while the agent was away;
5. run one full reconcile (anycast routes, BGP exports, policy), then start
   serving the plugin's socket.

Logs are JSON lines on stderr (one object per event, with the `extra` fields
of each call), so that a log pipeline can index them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flock.agent import rpc
from flock.agent.datastore.base import Datastore, Snapshot
from flock.agent.datastore.files import FilesDatastore
from flock.agent.metrics import AgentMetrics, Health, MetricsServer
from flock.agent.reconcile import AllocationIndex, IPAddress, IPNetwork, Nexthop, Reconciler
from flock.agent.service import CniService, Datapath
from flock.agent.status import DEFAULT_RUN_DIR, STATUS_SOCKET, serve_status
from flock.apply.datapath import Datapath as KernelDatapath
from flock.apply.datapath import PodNetSpec
from flock.apply.store import AllocationStore
from flock.compile.ipam import Ipam
from flock.model.allocation import Allocation
from flock.model.nodeconfig import NodeConfig, Peer

log = logging.getLogger("flock.agent")

AGENT_SOCKET = "agent.sock"

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, msg, plus every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---- appliers: adapters from the reconciler's parts to the apply/ modules ----------------


class KernelAnycast:
    def __init__(self, service: CniService, datapath: KernelDatapath) -> None:
        self.service = service
        self.datapath = datapath

    async def apply_anycast(
        self, routes: Mapping[IPAddress, frozenset[Nexthop]], *, full: bool = False
    ) -> None:
        desired = {ip: [(nh.via, nh.dev) for nh in sorted(hops)] for ip, hops in routes.items()}
        await self.service.run_kernel(self.datapath.reconcile_anycast, desired, full=full)


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

    def __init__(self, service: CniService, engine: Any) -> None:
        self.service = service
        self.engine = engine
        self._parsed: dict[tuple[str, str], tuple[Mapping[str, Any], Any]] = {}
        self._local: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._empty_applied = False
        self._rejected_applied: dict[tuple[str, str], str] = {}

    def _policies(self, snap: Snapshot) -> tuple[list[Any], dict[tuple[str, str], str]]:
        from flock.model.policy import NetworkPolicy, PolicyError

        good: list[Any] = []
        bad: dict[tuple[str, str], str] = {}
        cache: dict[tuple[str, str], tuple[Mapping[str, Any], Any]] = {}
        for key, obj in snap.network_policies.items():
            hit = self._parsed.get(key)
            if hit is not None and hit[0] is obj:
                cache[key] = hit
            else:
                try:
                    cache[key] = (obj, NetworkPolicy.from_object(obj))
                except PolicyError as e:
                    cache[key] = (obj, str(e))
            parsed = cache[key][1]
            if isinstance(parsed, str):
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
        if not good and self._empty_applied and bad == self._rejected_applied:
            # No NetworkPolicy selects anyone, so no pod is isolated: the ruleset is
            # empty whatever the pods are, and it is already applied (and the engine
            # already reports these rejected policies).
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
        await self.service.run_kernel(self.engine.sync, inputs)
        self._empty_applied = not good
        self._rejected_applied = bad


# ---- start-up re-sync ----------------------------------------------------------------------


def resync_kernel(datapath: Datapath, allocations: Sequence[Allocation]) -> dict[str, int]:
    """Make the kernel agree with the store (blocking; run before serving).

    Repairs attachments whose pod netns exists but whose network is incomplete
    (`setup_pod` fixes an intact veth pair in place and rebuilds only a broken one);
    removes our veths and pod host routes that no allocation accounts for.
    """
    import os

    counts = {"repaired": 0, "veths_removed": 0, "routes_removed": 0, "netns_gone": 0}
    for a in allocations:
        if not a.netns or not os.path.exists(a.netns):
            counts["netns_gone"] += 1  # the runtime's DEL or GC will release it
            continue
        spec = PodNetSpec.from_allocation(a)
        problems = datapath.check_pod(spec)
        if problems:
            log.info(
                "resync: repairing pod network",
                extra={"pod": f"{a.namespace}/{a.pod}", "problems": problems},
            )
            datapath.setup_pod(spec)
            counts["repaired"] += 1
    known = {a.host_ifname for a in allocations}
    for veth in datapath.list_host_veths():
        if veth.name not in known:
            log.info("resync: removing veth no allocation knows", extra={"ifname": veth.name})
            datapath.teardown_pod(container_id="resync", host_ifname=veth.name)
            counts["veths_removed"] += 1
    expected = {(ip, a.host_ifname) for a in allocations for ip in a.all_addresses}
    for r in datapath.list_pod_routes():
        if (r.dst, r.ifname) not in expected:
            log.info("resync: removing stale host route", extra={"dst": str(r.dst)})
            datapath.delete_pod_route(r)
            counts["routes_removed"] += 1
    return counts


# ---- the agent -----------------------------------------------------------------------------


@dataclasses.dataclass
class Options:
    node_name: str
    state_dir: Path
    run_dir: Path
    manifests: Path
    socket: Path
    bird_socket: Path | None = None
    bird_config: Path | None = None
    router_id: ipaddress.IPv4Address | None = None
    metrics_addr: tuple[str, int] | None = None
    policy: bool = True
    pod_wait: float = 5.0


class Agent:
    def __init__(self, opts: Options, datastore: Datastore | None = None) -> None:
        self.opts = opts
        self.metrics = AgentMetrics()
        self.health = Health()
        self.datastore: Datastore = datastore or FilesDatastore(
            opts.manifests, node_name=opts.node_name
        )
        self.store = AllocationStore(opts.state_dir)
        self.datapath = KernelDatapath()
        self.bird: Any = None
        self.policy_engine: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._servers: list[tuple[asyncio.Server, Path]] = []
        self._metrics_server: MetricsServer | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        o = self.opts
        for d in (o.state_dir, o.run_dir):
            d.mkdir(parents=True, exist_ok=True)
        allocations = await asyncio.to_thread(self.store.load)
        ipam = Ipam(allocations)
        log.info("allocation store loaded", extra={"allocations": len(allocations)})
        await self.datastore.start()
        await self.datastore.wait_synced()
        self.reconciler = Reconciler(
            snapshot=self.datastore.snapshot,
            index=AllocationIndex(allocations),
            on_pass=self._after_pass,
        )
        self.service = CniService(
            datastore=self.datastore,
            ipam=ipam,
            store=self.store,
            datapath=self.datapath,
            reconciler=self.reconciler,
            metrics=self.metrics,
            pod_wait=o.pod_wait,
        )
        self.metrics.bind_allocations(self.service.ipam.all)
        self.reconciler.set_appliers(
            anycast=KernelAnycast(self.service, self.datapath),
            exports=self._make_bird(),
            policy=self._make_policy(),
        )
        counts = await self.service.run_kernel(resync_kernel, self.datapath, ipam.all())
        log.info("kernel re-synced from the store", extra=counts)
        self._tasks.append(asyncio.create_task(self.reconciler.run(), name="reconcile"))
        self._tasks.append(asyncio.create_task(self._follow_datastore(), name="datastore-events"))
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
        self._tasks.append(asyncio.create_task(replay, name="deferred-dels"))
        status_path = o.run_dir / STATUS_SOCKET
        self._servers.append((await serve_status(status_path, self.inspect), status_path))
        if o.metrics_addr is not None:
            self._metrics_server = MetricsServer(metrics=self.metrics, health=self.health)
            host, port = await self._metrics_server.start(*o.metrics_addr)
            log.info("metrics listening", extra={"addr": f"{host}:{port}"})
        if self.bird is not None:
            self._tasks.append(asyncio.create_task(self._watch_bird(), name="bird-health"))
        self.health.started = True
        self.health.reason = "ok"
        log.info("agent ready", extra={"node": o.node_name, "socket": str(o.socket)})

    def _after_pass(self, r: Reconciler) -> None:
        m = self.metrics
        m.anycast_routes.set(len(r.desired.anycast_routes))
        m.exports.set(len(r.desired.exports))
        if self.policy_engine is not None and r.stats.policy_sync_seconds:
            m.policy_sync.observe(r.stats.policy_sync_seconds)
        if not r.outcome.ok:
            m.reconcile_failures.inc()

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
        return NftPolicy(self.service, self.policy_engine)

    async def _follow_datastore(self) -> None:
        q = self.datastore.subscribe()
        while True:
            await q.get()
            # Drain the burst: one pass serves all of it.
            while not q.empty():
                q.get_nowait()
            self.reconciler.mark_dirty()

    async def _watch_bird(self) -> None:
        was_up: bool | None = None
        while True:
            try:
                up = bool(await self.bird.check())
            except Exception as e:
                log.warning("BIRD check failed", extra={"error": str(e)})
                up = False
            self.health.bird_up = up
            self.metrics.bird_up.set(1 if up else 0)
            if up != was_up:
                log.info("BIRD is %s", "up" if up else "DOWN")
                if up and was_up is False:
                    self.reconciler.force_resync()
                was_up = up
            if up:
                with contextlib.suppress(Exception):
                    for peer, st in (await self.bird.sessions()).items():
                        self.metrics.bgp_session_up.labels(peer=str(peer)).set(
                            1 if st.established else 0
                        )
            await asyncio.sleep(1.0)

    async def inspect(self) -> dict[str, Any]:
        """Everything `flock status` shows."""
        from flock.apply.store import allocation_to_dict

        d = self.reconciler.desired
        out: dict[str, Any] = {
            "node": self.opts.node_name,
            "uptime_s": round(time.time() - self.started_at, 1),
            "datastore_synced": self.datastore.synced,
            "allocations": [
                allocation_to_dict(a) for a in sorted(self.service.ipam.all(), key=lambda a: a.key)
            ],
            "anycast": {
                str(ip): [{"via": str(h.via), "dev": h.dev} for h in sorted(hops)]
                for ip, hops in sorted(d.anycast_routes.items(), key=lambda kv: str(kv[0]))
            },
            "exports": sorted(str(p) for p in d.exports),
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
        for server, path in self._servers:
            await rpc.close_and_unlink(server, path)
        # Let verbs already running finish: a half-done ADD would only be rolled back.
        if hasattr(self, "service") and not await self.service.drain(10.0):
            log.warning("shutting down with CNI verbs still running; they will be rolled back")
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
        if hasattr(self, "service"):
            self.service.close()
        # Deletes veths that DELs retired but the background reaper has not removed yet.
        await asyncio.to_thread(self.datapath.close)
        self.store.close()


def _metrics_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_args(argv: Sequence[str]) -> tuple[Options, str]:
    p = argparse.ArgumentParser(prog="flock agent", description="run the flock node agent")
    p.add_argument("--node-name", required=True)
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/flock"))
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    p.add_argument("--manifests", type=Path, required=True, help="standalone manifests directory")
    p.add_argument("--socket", type=Path, help="plugin RPC socket (default RUN_DIR/agent.sock)")
    p.add_argument("--bird-socket", type=Path, help="BIRD control socket; omit to run without BGP")
    p.add_argument("--bird-config", type=Path, help="BIRD config file (default RUN_DIR/bird.conf)")
    p.add_argument("--router-id", type=ipaddress.IPv4Address)
    p.add_argument("--metrics-addr", type=_metrics_addr, help="HOST:PORT for /metrics, /healthz")
    p.add_argument("--no-policy", action="store_true", help="do not program NetworkPolicy")
    p.add_argument("--pod-wait", type=float, default=5.0, help="seconds an ADD waits for its pod")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(list(argv))
    opts = Options(
        node_name=a.node_name,
        state_dir=a.state_dir,
        run_dir=a.run_dir,
        manifests=a.manifests,
        socket=a.socket or a.run_dir / AGENT_SOCKET,
        bird_socket=a.bird_socket,
        bird_config=a.bird_config,
        router_id=a.router_id,
        metrics_addr=a.metrics_addr,
        policy=not a.no_policy,
        pod_wait=a.pod_wait,
    )
    return opts, a.log_level


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
    return asyncio.run(run(opts))
