"""Prometheus metrics and the health endpoint, served on the agent's metrics port.

Operators watch CNI latency, address use, anycast routes advertised, BGP
session state and policy sync time (SPEC §7); the DaemonSet's liveness and
readiness probes hit `/healthz` and `/readyz`. `/healthz` fails while BIRD is
down, so that the probe notices a dead BIRD sidecar (issue 4 item 5).

The HTTP server is a few lines of asyncio on the agent's own loop: probes and
scrapes are rare and tiny, and health must reflect the loop's own state
(a wedged loop fails its probe instead of answering from another thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flock.model.allocation import Allocation

if TYPE_CHECKING:
    from flock.agent.reconcile import Reconciler

log = logging.getLogger(__name__)

# CNI ops are milliseconds; policy syncs range up to a second.
_OP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_SYNC_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class AgentMetrics:
    """Every metric the agent exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cni_op = Histogram(
            "flock_cni_op_seconds",
            "CNI operation latency inside the agent, by verb and result",
            ["verb", "result"],
            buckets=_OP_BUCKETS,
            registry=r,
        )
        self.allocations = Gauge(
            "flock_allocations", "Addresses held by pods on this node", ["family"], registry=r
        )
        self.anycast_routes = Gauge(
            "flock_anycast_routes_advertised",
            "Anycast addresses routed and exported from this node (Ready replicas only)",
            registry=r,
        )
        self.exports = Gauge(
            "flock_bgp_exports", "Per-pod prefixes in the BGP export set", registry=r
        )
        self.bgp_session_up = Gauge(
            "flock_bgp_session_up",
            "1 when the BGP session to a peer is Established",
            ["peer"],
            registry=r,
        )
        self.bird_up = Gauge(
            "flock_bird_up", "1 when BIRD answers on its control socket", registry=r
        )
        self.policy_sync = Histogram(
            "flock_policy_sync_seconds",
            "Time to bring nftables policy in line",
            buckets=_SYNC_BUCKETS,
            registry=r,
        )
        self.reconcile_failures = Counter(
            "flock_reconcile_failures", "Reconcile passes in which an applier failed", registry=r
        )
        self.resync_failures = Gauge(
            "flock_resync_failures",
            "Attachments (or cleanup steps) the start-up re-sync could not repair",
            registry=r,
        )

    def observe_pass(self, r: Reconciler, *, policy: bool) -> None:
        """After every reconcile pass (`Reconciler(on_pass=...)`): what it computed,
        how long the policy took (when a policy engine runs), whether it failed."""
        self.anycast_routes.set(len(r.desired.anycast_routes))
        self.exports.set(len(r.desired.exports))
        if policy and r.stats.policy_sync_seconds:
            self.policy_sync.observe(r.stats.policy_sync_seconds)
        if not r.outcome.ok:
            self.reconcile_failures.inc()

    def observe_op(self, verb: str, result: str, seconds: float) -> None:
        self.cni_op.labels(verb=verb, result=result).observe(seconds)

    def bind_allocations(self, allocations: Callable[[], Sequence[Allocation]]) -> None:
        """Count allocations per family when scraped (not on every CNI verb)."""

        def count6() -> float:
            return sum(1 for a in allocations() if a.v6 is not None)

        def count4() -> float:
            return sum(1 for a in allocations() if a.v4 is not None)

        self.allocations.labels(family="ipv6").set_function(count6)
        self.allocations.labels(family="ipv4").set_function(count4)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class Health:
    """What the probes report; updated by the agent's loops."""

    started: bool = False
    bird_configured: bool = False  # False: no BIRD to watch (standalone without BGP)
    bird_up: bool = False
    reason: str = "starting"

    def live(self) -> tuple[bool, str]:
        if self.bird_configured and not self.bird_up:
            return False, "BIRD does not answer on its control socket"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, self.reason
        return self.live()


class MetricsServer:
    """GET /metrics, /healthz (alias /livez) and /readyz over plain HTTP/1.0."""

    def __init__(self, *, metrics: AgentMetrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port)
        sock = self._server.sockets[0].getsockname()
        return str(sock[0]), int(sock[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass  # headers are not needed
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, ctype, body = self._route(parts[0] if parts else "", path)
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        except Exception:
            log.exception("metrics request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self.metrics.render()
        if path in ("/healthz", "/livez", "/readyz"):
            ok, why = self.health.ready() if path == "/readyz" else self.health.live()
            return (
                ("200 OK" if ok else "503 Service Unavailable"),
                "text/plain",
                f"{why}\n".encode(),
            )
        return "404 Not Found", "text/plain", b"not found\n"
