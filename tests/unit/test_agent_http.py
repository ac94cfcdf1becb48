"""The metrics/health endpoint and the status view, without a kernel."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flock.agent.metrics import AgentMetrics, Health, MetricsServer
from flock.agent.status import query, render, serve_status


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    status = int(raw.split()[1])
    return status, raw.split("\r\n\r\n", 1)[1]


def test_health_follows_bird_and_metrics_are_exposed() -> None:
    async def body() -> None:
        m = AgentMetrics()
        h = Health(bird_configured=True, bird_up=True)
        srv = MetricsServer(metrics=m, health=h)
        _, port = await srv.start("127.0.0.1", 0)
        try:
            assert (await _get(port, "/readyz"))[0] == 503  # still starting
            h.started = True
            assert (await _get(port, "/readyz"))[0] == 200
            assert (await _get(port, "/healthz"))[0] == 200
            h.bird_up = False
            status, text = await _get(port, "/healthz")
            assert status == 503 and "BIRD" in text
            m.observe_op("ADD", "ok", 0.004)
            m.bind_allocations(lambda: [])
            status, text = await _get(port, "/metrics")
            assert status == 200
            assert 'flock_cni_op_seconds_bucket{le="0.005",result="ok",verb="ADD"} 1.0' in text
            assert 'flock_allocations{family="ipv6"} 0.0' in text
            assert (await _get(port, "/nope"))[0] == 404
        finally:
            await srv.close()

    asyncio.run(body())


def test_status_socket_round_trip_and_table(tmp_path: Path) -> None:
    state = {
        "node": "n1",
        "uptime_s": 1.0,
        "datastore_synced": True,
        "node_config": "ok",
        "allocations": [
            {
                "namespace": "dns",
                "pod": "coredns-1",
                "containerID": "0123456789abcdef",
                "hostIfname": "flk0123456789a",
                "v6": "2001:db8::5",
                "v4": None,
                "extraAddresses": [],
                "anycast": ["2001:db8:a::53"],
            }
        ],
        "anycast": {"2001:db8:a::53": [{"via": "2001:db8::5", "dev": "flk0123456789a"}]},
        "exports": ["2001:db8:a::53/128"],
        "bgp": {"bird": "up", "sessions": {"2001:db8::1": {"state": "up", "info": "Established"}}},
        "policy": {
            "syncs": 3,
            "last_duration_s": 0.001,
            "last_error": None,
            "rejected_policies": {"dns/bad-np": "spec.podSelector: operator 'Maybe'"},
            "fail_closed": {"dns/bad-np": ["Egress", "Ingress"]},
        },
        "events": [{"pod": "dns/bad", "reason": "FlockAddRejected", "message": "annotation x"}],
        "reconcile": {"policy_syncs": 1, "policy_updates": 5},
    }

    async def inspect() -> dict[str, object]:
        return state

    async def body() -> dict[str, object]:
        server = await serve_status(tmp_path / "status.sock", inspect)
        try:
            assert (tmp_path / "status.sock").stat().st_mode & 0o777 == 0o600
            return await asyncio.to_thread(query, tmp_path / "status.sock")
        finally:
            server.close()
            await server.wait_closed()

    got = asyncio.run(body())
    assert got == state
    text = render(got)
    assert "dns/coredns-1" in text and "2001:db8:a::53" in text and "via" not in text.split()[0]
    assert "Established" in text and "FlockAddRejected" in text
    assert "REJECTED dns/bad-np, fail closed for Egress+Ingress: spec.podSelector" in text
    assert "fed 5 changes, 1 whole views" in text
