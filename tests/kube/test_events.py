"""Events on pods and the NodeConfig status, written to the real kube-apiserver.

Events: a kubelet retrying a rejected ADD every few seconds must leave one Event
whose series counts the repeats, not one object per attempt. Status: the agent's
report lands in the status subresource (strict field validation), kubectl's
printer columns show it, and an unchanged report is not written again.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest

from flock.agent.datastore.base import PodEvent
from flock.kube.client import ApiError, KubeClient
from flock.kube.events import EventRecorder
from flock.kube.status import NodeStatusReport, NodeStatusWriter, PeerState
from flock.model.nodeconfig import API_VERSION
from flock.testbed.kube import ApiServer
from flock.testbed.wait import wait_until_async

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "crds" / "nodeconfig.yaml"


@pytest.fixture(scope="module")
def api(apiserver: ApiServer) -> ApiServer:
    apiserver.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    apiserver.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/nodeconfigs.flock.fritzlab.net",
        "--timeout=60s",
        timeout=90,
    )
    return apiserver


def client(api: ApiServer) -> KubeClient:
    return KubeClient.from_kubeconfig(str(api.host_kubeconfig_path))


async def events_in(api: ApiServer, ns: str) -> list[dict[str, Any]]:
    status, body = await asyncio.to_thread(
        api.request, "GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events"
    )
    assert status == 200, body
    items: list[dict[str, Any]] = body["items"]
    return items


def test_repeated_rejection_is_one_event_with_a_series(api: ApiServer) -> None:
    ns = f"ev-{secrets.token_hex(3)}"
    api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})

    async def main() -> None:
        rec = EventRecorder(client(api), component="flock-agent", host="n1", flush_interval=0.3)
        rec.start()
        try:
            note = (
                "annotation flock.fritzlab.net/anycast: 198.51.100.7 is outside the "
                "NodeConfig's allowedAddresses"
            )
            ev = PodEvent(ns, "web", "FlockAddRejected", note, uid="u-1")
            for _ in range(25):  # a kubelet retrying
                rec.record(ev)
            await rec.drained()
            items = await events_in(api, ns)
            assert len(items) == 1, items
            e = items[0]
            assert e["reason"] == "FlockAddRejected" and e["note"] == note
            assert e["type"] == "Warning"
            assert e["regarding"] == {
                "apiVersion": "v1",
                "kind": "Pod",
                "namespace": ns,
                "name": "web",
                "uid": "u-1",
            }
            assert e["reportingController"] == "flock.fritzlab.net/agent"
            # The repeats arrive as one series patch, within the flush interval.
            found = await wait_until_async(
                lambda: events_in(api, ns),
                until=lambda it: len(it) == 1 and (it[0].get("series") or {}).get("count") == 25,
                timeout=20,
                what="the series count",
            )
            assert found[0]["series"]["lastObservedTime"]
            assert rec.stats.created == 1 and rec.stats.aggregated == 24
            assert rec.stats.patched == 1, "25 occurrences, one create and one patch"
            # Another reason (or another pod incarnation) is another Event.
            rec.record(PodEvent(ns, "web", "FlockAddRejected", note, uid="u-2"))
            rec.record(PodEvent(ns, "web", "FlockRangeExhausted", "no free IPv4", uid="u-1"))
            # An Event about a NetworkPolicy (one flock cannot compile).
            rec.record(
                PodEvent(
                    ns, "deny-all", "FlockPolicyRejected", "spec.ingress[0]: bad port",
                    kind="NetworkPolicy", api_version="networking.k8s.io/v1",
                )
            )  # fmt: skip
            await rec.drained()
            items = await events_in(api, ns)
            assert len(items) == 4
            (np,) = [i for i in items if i["regarding"]["kind"] == "NetworkPolicy"]
            assert np["regarding"]["apiVersion"] == "networking.k8s.io/v1"
            assert rec.stats.errors == 0, rec.stats.last_error
        finally:
            await rec.close()
            await rec.client.close()

    try:
        asyncio.run(main())
    finally:
        api.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_event_after_the_window_is_a_new_event(api: ApiServer) -> None:
    ns = f"ev-{secrets.token_hex(3)}"
    api.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    now = [1000.0]

    async def main() -> None:
        rec = EventRecorder(
            client(api), component="flock-agent", host="n1", window=60, clock=lambda: now[0]
        )
        rec.start()
        try:
            ev = PodEvent(ns, "web", "FlockAddRejected", "bad annotation", uid="u")
            rec.record(ev)
            await rec.drained()
            now[0] += 61
            rec.record(ev)
            await rec.drained()
            assert len(await events_in(api, ns)) == 2
        finally:
            await rec.close()
            await rec.client.close()

    try:
        asyncio.run(main())
    finally:
        api.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_nodeconfig_status_and_printer_columns(api: ApiServer) -> None:
    node = f"st-{secrets.token_hex(3)}"
    nc = {
        "apiVersion": API_VERSION,
        "kind": "NodeConfig",
        "metadata": {"name": node},
        "spec": {
            "cidr6": ["2001:db8:5::/64"],
            "bgp": {"asn": 65010, "peers": [{"address": "192.0.2.1", "asn": 65000}]},
        },
    }
    status, body = api.request("POST", f"/apis/{API_VERSION}/nodeconfigs", nc)
    assert status == 201, body

    async def main() -> None:
        c = client(api)
        writer = NodeStatusWriter(c, node)
        try:
            report = NodeStatusReport(
                ready=True,
                reason="AgentReady",
                message="serving CNI",
                agent_version="0.1.0",
                peers=(
                    PeerState("192.0.2.1", 65000, "Established"),
                    PeerState("2001:db8::1", 65000, "Active", info="Connection refused"),
                ),
                allocations={"ipv6": 7, "ipv4": 3},
                pods=7,
                exported_anycast=2,
                observed_generation=1,
            )
            assert await writer.write(report)
            assert await writer.write(report)
            assert writer.writes == 1, "an unchanged report is not written again"
            _, obj = await asyncio.to_thread(
                api.request, "GET", f"/apis/{API_VERSION}/nodeconfigs/{node}"
            )
            st = obj["status"]
            assert st["bgp"]["sessions"] == "1/2" and st["pods"] == 7
            assert st["allocations"] == {"ipv4": 3, "ipv6": 7}
            assert st["exportedAnycast"] == 2 and st["agentVersion"] == "0.1.0"
            conds = {c["type"]: c for c in st["conditions"]}
            assert conds["Ready"]["status"] == "True"
            assert conds["BGPSessionsEstablished"]["status"] == "False"
            assert "2001:db8::1 Active" in conds["BGPSessionsEstablished"]["message"]
            assert obj["spec"]["bgp"]["asn"] == 65010, "status writes never touch spec"
            out = (
                await asyncio.to_thread(api.kubectl, "get", "nodeconfig", node, "--no-headers")
            ).stdout.split()
            # NAME ASN SESSIONS PODS READY AGE
            assert out[:5] == [node, "65010", "1/2", "7", "True"], out
            # Strict field validation: a field the schema does not know is refused.
            with pytest.raises(ApiError) as err:
                await c.request(
                    "PATCH",
                    writer.path,
                    params={"fieldValidation": "Strict"},
                    body={"status": {"bogus": 1}},
                    content_type="application/merge-patch+json",
                )
            assert "bogus" in str(err.value)
            # A status write cannot change spec (the subresource ignores it).
            await c.request(
                "PATCH",
                writer.path,
                body={"spec": {"bgp": {"asn": 65099}}},
                content_type="application/merge-patch+json",
            )
            _, obj = await asyncio.to_thread(
                api.request, "GET", f"/apis/{API_VERSION}/nodeconfigs/{node}"
            )
            assert obj["spec"]["bgp"]["asn"] == 65010
            # No NodeConfig: the writer says so and does not raise.
            other = NodeStatusWriter(c, f"absent-{node}")
            assert not await other.write(report) and "404" in other.last_error
        finally:
            await c.close()

    try:
        asyncio.run(main())
    finally:
        api.kubectl("delete", "nodeconfig", node, "--ignore-not-found", check=False)
