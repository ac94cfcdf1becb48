"""KubeDatastore and its informers against the real kube-apiserver.

Each test uses its own node name and namespace (the server is shared by the
session). Writes go through the admin's HTTPS client from a worker thread, so
the datastore's event loop keeps reading its watches meanwhile. The outage
tests hold the pod informer at its backoff sleep (a gate) while the API server
restarts and the writes happen, so the resumed watch meets the situation the
test built, deterministically.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flock.agent.datastore.base import Event, EventType, Kind
from flock.agent.datastore.kube import KubeDatastore
from flock.kube.client import KubeClient
from flock.kube.informer import Informer
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


async def req(
    api: ApiServer, method: str, path: str, body: Any = None, ct: str = "application/json"
) -> Any:
    status, out = await asyncio.to_thread(api.request, method, path, body, content_type=ct)
    assert status < 300, f"{method} {path}: {status} {out}"
    return out


def pod_body(name: str, node: str, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **meta},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "c",
                    "image": "registry.example/app:1",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                }
            ],
        },
    }


def nodeconfig(node: str, asn: int = 65001, cidr6: str = "2001:db8:1::/64") -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "NodeConfig",
        "metadata": {"name": node},
        "spec": {"cidr6": [cidr6], "bgp": {"asn": asn}},
    }


async def set_ready(api: ApiServer, ns: str, name: str, ready: bool) -> None:
    status = "True" if ready else "False"
    patch = {"status": {"conditions": [{"type": "Ready", "status": status}]}}
    await req(
        api,
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        patch,
        "application/strategic-merge-patch+json",
    )


class Env:
    def __init__(self, api: ApiServer) -> None:
        self.api = api
        suffix = secrets.token_hex(3)
        self.node = f"node-{suffix}"
        self.ns = f"t-{suffix}"
        self.ds = KubeDatastore(
            KubeClient.from_kubeconfig(str(api.host_kubeconfig_path)),
            node_name=self.node,
            page_size=7,  # several pages even in a small test
        )
        self.events: asyncio.Queue[Event] = self.ds.subscribe()

    async def pod(self, name: str, node: str | None = None, **meta: Any) -> dict[str, Any]:
        out: dict[str, Any] = await req(
            self.api,
            "POST",
            f"/api/v1/namespaces/{self.ns}/pods",
            pod_body(name, node or self.node, **meta),
        )
        return out

    async def next_event(self, pred: Any, what: str, timeout: float = 20) -> Event:
        deadline = time.monotonic() + timeout
        seen: list[Event] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {what}; saw {seen[-10:]}")
            try:
                ev = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                continue
            seen.append(ev)
            if pred(ev):
                return ev


@contextlib.asynccontextmanager
async def env(api: ApiServer, *, start: bool = True) -> AsyncIterator[Env]:
    e = Env(api)
    await req(api, "POST", "/api/v1/namespaces", {"metadata": {"name": e.ns, "labels": {"t": "1"}}})
    try:
        if start:
            await e.ds.start()
        yield e
    finally:
        await e.ds.close()
        await asyncio.to_thread(
            api.kubectl, "delete", "namespace", e.ns, "--wait=false", check=False
        )
        await asyncio.to_thread(
            api.kubectl, "delete", "nodeconfig", e.node, "--ignore-not-found", check=False
        )


def test_sync_gives_typed_objects_local_full_remote_trimmed(api: ApiServer) -> None:
    async def main() -> None:
        async with env(api, start=False) as e:
            await req(api, "POST", f"/apis/{API_VERSION}/nodeconfigs", nodeconfig(e.node))
            ann = {"flock.fritzlab.net/ipv4": "false"}
            local = await e.pod("local", annotations=ann, labels={"app": "a"})
            for i in range(20):  # more than a page
                await e.pod(f"remote-{i}", node="elsewhere", annotations=ann, labels={"app": "b"})
            np = {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "deny"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
            }
            await req(
                api, "POST", f"/apis/networking.k8s.io/v1/namespaces/{e.ns}/networkpolicies", np
            )
            assert not e.ds.synced and not e.ds.snapshot().synced
            await e.ds.start()
            assert await e.ds.wait_synced(30)
            first = await e.next_event(lambda ev: True, "RESYNC first")
            assert first.type == EventType.RESYNC, "nothing is emitted before the full view"
            snap = e.ds.snapshot()
            assert snap.synced
            assert snap.node_config is not None and snap.node_config.spec.bgp is not None
            assert snap.node_config.spec.bgp.asn == 65001
            p = snap.pod(e.ns, "local")
            assert p is not None
            assert p.uid == local["metadata"]["uid"]
            assert dict(p.annotations) == ann and dict(p.labels) == {"app": "a"}
            assert p.images == ("registry.example/app:1",)
            assert p.container_ports[0].port == 8080 and p.container_ports[0].name == "http"
            assert not p.ready and not p.terminating
            r = snap.pod(e.ns, "remote-3")
            assert r is not None and dict(r.annotations) == {} and r.images == ()
            assert dict(r.labels) == {"app": "b"} and r.container_ports[0].name == "http"
            assert len([k for k in snap.pods if k[0] == e.ns]) == 21
            assert snap.namespaces[e.ns].labels["t"] == "1"
            assert snap.namespaces[e.ns].labels["kubernetes.io/metadata.name"] == e.ns
            assert snap.network_policies[(e.ns, "deny")]["spec"]["policyTypes"] == ["Ingress"]
            assert e.ds.pods.stats.list_pages >= 3

    asyncio.run(main())


def test_ready_flip_and_deletion_reach_subscribers_at_once(api: ApiServer) -> None:
    async def main() -> None:
        async with env(api) as e:
            assert await e.ds.wait_synced(30)
            await e.pod("web", finalizers=["flock.test/hold"])
            await e.next_event(lambda ev: ev.name == "web", "web ADDED")
            lat: list[tuple[float, float]] = []
            for ready in (True, False, True, False):
                arrived: list[float] = []
                q = e.ds.subscribe()  # timestamps the event as the informer emits it

                async def stamp(
                    q: asyncio.Queue[Event] = q, arrived: list[float] = arrived
                ) -> None:
                    while True:
                        ev = await q.get()
                        if ev.kind == Kind.POD and ev.name == "web":
                            arrived.append(time.monotonic())
                            return

                watcher = asyncio.create_task(stamp())
                t0 = time.monotonic()
                await set_ready(api, e.ns, "web", ready)
                t1 = time.monotonic()
                await asyncio.wait_for(watcher, 20)
                e.ds.unsubscribe(q)
                lat.append(((arrived[0] - t0) * 1000, (arrived[0] - t1) * 1000))
                pod = e.ds.snapshot().pod(e.ns, "web")
                assert pod is not None and pod.ready is ready
            print(
                "\nReady flip -> subscriber event, ms (from PATCH sent, from PATCH answered): "
                f"{[(round(a, 1), round(b, 1)) for a, b in lat]}"
            )
            while not e.events.empty():
                e.events.get_nowait()
            await req(api, "DELETE", f"/api/v1/namespaces/{e.ns}/pods/web")
            ev = await e.next_event(lambda ev: ev.name == "web", "deletionTimestamp")
            assert ev.type == EventType.MODIFIED
            pod = e.ds.snapshot().pod(e.ns, "web")
            assert pod is not None and pod.terminating
            await req(
                api,
                "PATCH",
                f"/api/v1/namespaces/{e.ns}/pods/web",
                {"metadata": {"finalizers": None}},
                "application/merge-patch+json",
            )
            # Without a kubelet to confirm, a graceful deletion waits: force it, as the
            # kubelet's final delete does.
            await req(api, "DELETE", f"/api/v1/namespaces/{e.ns}/pods/web?gracePeriodSeconds=0")
            ev = await e.next_event(
                lambda ev: ev.name == "web" and ev.type == EventType.DELETED, "DELETED"
            )
            assert ev.type == EventType.DELETED
            assert e.ds.snapshot().pod(e.ns, "web") is None

    asyncio.run(main())


def test_get_pod_fetches_a_pod_the_cache_has_not_seen(api: ApiServer) -> None:
    async def main() -> None:
        async with env(api, start=False) as e:  # no informer runs: every read is a miss
            created = await e.pod("fresh")
            pod = await e.ds.get_pod(e.ns, "fresh")
            assert pod is not None and pod.uid == created["metadata"]["uid"]
            assert pod.images == ("registry.example/app:1",), "this node's pod comes in full"
            assert await e.ds.get_pod(e.ns, "absent") is None
            assert await e.ds.pod_exists(e.ns, "fresh", created["metadata"]["uid"]) is True
            assert await e.ds.pod_exists(e.ns, "fresh", "another-uid") is False
            assert await e.ds.pod_exists(e.ns, "absent", "x") is False

    asyncio.run(main())


def test_secret_from_kube_system_only_and_rotation_emits_an_event(api: ApiServer) -> None:
    async def main() -> None:
        async with env(api) as e:
            assert await e.ds.wait_synced(30)
            name = f"bgp-{e.node}"

            def secret(pw: str) -> dict[str, Any]:
                return {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": "kube-system"},
                    "data": {"password": base64.b64encode(pw.encode()).decode()},
                }

            await req(api, "POST", "/api/v1/namespaces/kube-system/secrets", secret("one"))
            try:
                assert await e.ds.get_secret("kube-system", name, "password") == "one"
                assert await e.ds.get_secret("kube-system", name, "other") is None
                assert await e.ds.get_secret(e.ns, name, "password") is None
                await req(
                    api, "PUT", f"/api/v1/namespaces/kube-system/secrets/{name}", secret("two")
                )
                ev = await e.next_event(lambda ev: ev.kind == Kind.SECRET, "secret rotated")
                assert (ev.namespace, ev.name, ev.type) == ("kube-system", name, "MODIFIED")
                assert await e.ds.get_secret("kube-system", name, "password") == "two"
            finally:
                await req(api, "DELETE", f"/api/v1/namespaces/kube-system/secrets/{name}")

    asyncio.run(main())


def test_invalid_nodeconfig_keeps_the_last_good_one(api: ApiServer) -> None:
    async def main() -> None:
        async with env(api) as e:
            await req(api, "POST", f"/apis/{API_VERSION}/nodeconfigs", nodeconfig(e.node))
            assert await e.ds.wait_synced(30)
            await wait_until_async(
                lambda: e.ds.snapshot().node_config, timeout=20, what="the NodeConfig"
            )
            # Host bits set: the schema accepts it, the agent does not.
            bad = nodeconfig(e.node, asn=65002, cidr6="2001:db8:1::1/64")
            await req(
                api,
                "PATCH",
                f"/apis/{API_VERSION}/nodeconfigs/{e.node}",
                {"spec": bad["spec"]},
                "application/merge-patch+json",
            )
            await e.next_event(lambda ev: ev.kind == Kind.NODE_CONFIG, "NodeConfig MODIFIED")
            snap = e.ds.snapshot()
            assert snap.node_config is not None and snap.node_config.spec.bgp is not None
            assert snap.node_config.spec.bgp.asn == 65001, "the last good one stays in force"
            assert "cidr6" in snap.node_config_error
            assert (await e.ds.get_node_config()).spec.bgp.asn == 65001  # type: ignore[union-attr]
            await req(api, "DELETE", f"/apis/{API_VERSION}/nodeconfigs/{e.node}")
            await e.next_event(lambda ev: ev.type == EventType.DELETED, "NodeConfig DELETED")
            assert e.ds.snapshot().node_config is None

    asyncio.run(main())


class Gate:
    """Holds an informer at its backoff sleep until released."""

    def __init__(self, inf: Informer[Any]) -> None:
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.inf = inf
        self._orig = inf._sleep

        async def sleep(d: float) -> None:
            self.held.set()
            await self.release.wait()
            inf._sleep = self._orig

        inf._sleep = sleep


@pytest.mark.parametrize("compact", [False, True], ids=["restart", "compaction-410"])
def test_watch_survives_apiserver_restart_without_losing_a_change(
    api: ApiServer, compact: bool
) -> None:
    async def main() -> None:
        async with env(api) as e:
            for n in ("keep", "change", "gone"):
                await e.pod(n)
            assert await e.ds.wait_synced(30)
            await wait_until_async(
                lambda: e.ds.snapshot().pod(e.ns, "gone"), timeout=20, what="pods in the cache"
            )
            inf = e.ds.pods
            lists_before = inf.stats.lists
            gate = Gate(inf)
            await asyncio.to_thread(api.stop_apiserver)
            await asyncio.wait_for(gate.held.wait(), 30)
            await asyncio.to_thread(api.start_apiserver)
            # Changes the held informer cannot see while they happen.
            await set_ready(api, e.ns, "change", True)
            await req(api, "DELETE", f"/api/v1/namespaces/{e.ns}/pods/gone?gracePeriodSeconds=0")
            await e.pod("new")
            if compact:
                await asyncio.to_thread(api.compact_etcd)
                await asyncio.to_thread(api.restart_apiserver)
            keep_before = e.ds.snapshot().pod(e.ns, "keep")
            while not e.events.empty():
                e.events.get_nowait()
            t0 = time.monotonic()
            gate.release.set()
            await wait_until_async(
                lambda: e.ds.snapshot().pods,
                until=lambda pods: (
                    (e.ns, "new") in pods
                    and (e.ns, "gone") not in pods
                    and pods[(e.ns, "change")].ready
                ),
                timeout=60,
                what="the changes made during the outage",
            )
            took = time.monotonic() - t0
            got: list[tuple[str, str]] = []
            while not e.events.empty():
                ev = e.events.get_nowait()
                if ev.kind == Kind.POD and ev.namespace == e.ns:
                    got.append((ev.type, ev.name))
            # A resumed watch also replays the deletionTimestamp step of "gone"; a relist
            # sees only the end state. Nothing twice, nothing for "keep".
            assert len(got) == len(set(got)), got
            assert set(got) - {("MODIFIED", "gone")} == {
                ("ADDED", "new"),
                ("DELETED", "gone"),
                ("MODIFIED", "change"),
            }, got
            assert e.ds.snapshot().pod(e.ns, "keep") is keep_before, "unchanged keeps identity"
            relisted = inf.stats.lists - lists_before
            print(
                f"\n{'compaction' if compact else 'restart'}: caught up in {took * 1000:.0f} ms,"
                f" relists {relisted}, 410s {inf.stats.gone}, errors {inf.stats.errors},"
                f" last list {inf.stats.last_list_items} items in"
                f" {inf.stats.last_list_seconds * 1000:.0f} ms"
            )
            if compact:
                assert relisted == 1 and inf.stats.gone >= 1
            # And the watch is live again.
            await set_ready(api, e.ns, "keep", True)
            await e.next_event(lambda ev: ev.name == "keep", "a change after the outage")

    asyncio.run(main())
