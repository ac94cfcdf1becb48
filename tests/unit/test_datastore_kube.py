"""KubeDatastore's contract on fake collections (the real-server tests are in tests/kube).

The informers' sources are replaced by `FakeCollection`s, so the protocol's
promises can be checked fast and exactly: nothing is emitted and `synced` is
false until every informer has listed, then one RESYNC; each change is one
event; an invalid NodeConfig keeps the last good one; `get_pod` falls back to
one GET for a pod the cache does not have, and does not GET again at once for
one that does not exist.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2

from flock.agent.datastore.base import Event, EventType, Kind
from flock.agent.datastore.kube import KubeDatastore, NodeConfigValue
from flock.kube.client import KubeClient
from flock.kube.fake import FakeCollection
from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Namespace, Pod
from flock.testbed.wait import wait_until_async


def nodeconfig(asn: int) -> NodeConfig:
    return NodeConfig.from_object(
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": "me"},
            "spec": {"cidr6": ["2001:db8::/64"], "bgp": {"asn": asn}},
        }
    )


class Fakes:
    def __init__(self) -> None:
        self.pods: FakeCollection[Pod] = FakeCollection()
        self.ncs: FakeCollection[NodeConfigValue] = FakeCollection()
        self.nss: FakeCollection[Namespace] = FakeCollection()
        self.nps: FakeCollection[dict[str, Any]] = FakeCollection()
        client = KubeClient(httpx2.AsyncClient(base_url="http://127.0.0.1:9"))
        self.ds = KubeDatastore(client, node_name="me")
        ds: Any = self.ds
        ds.pods.source = ds._pod_source = self.pods
        ds.node_configs.source = ds._nc_source = self.ncs
        ds.namespaces.source = self.nss
        ds.network_policies.source = self.nps
        self.events: asyncio.Queue[Event] = self.ds.subscribe()

    def drain(self) -> list[Event]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


def test_synced_after_every_first_list_then_one_event_per_change() -> None:
    async def main() -> None:
        f = Fakes()
        f.pods.create("a", "web", Pod("a", "web", uid="u1", node_name="me"))
        f.ncs.create("", "me", (nodeconfig(65001), ""))
        f.nps.fail_next = 3  # one collection is slow to list
        await f.ds.start()
        try:
            await wait_until_async(
                lambda: f.ds.pods.synced and f.ds.node_configs.synced,
                timeout=10,
                what="two informers listed",
            )
            assert not f.ds.synced and not f.ds.snapshot().synced
            assert f.drain() == [], "nothing before the full view"
            assert await f.ds.wait_synced(10)
            assert f.drain() == [Event(None, EventType.RESYNC)]
            snap = f.ds.snapshot()
            assert snap.synced and snap.pod("a", "web") is not None
            assert snap.node_config == nodeconfig(65001)

            f.pods.modify("a", "web", Pod("a", "web", uid="u1", node_name="me", ready=True))
            ev = await asyncio.wait_for(f.events.get(), 10)
            assert ev == Event(Kind.POD, EventType.MODIFIED, "a", "web")
            pod = f.ds.snapshot().pod("a", "web")
            assert pod is not None and pod.ready
            f.nss.create("", "team", Namespace("team", {"x": "1"}))
            ev = await asyncio.wait_for(f.events.get(), 10)
            assert ev == Event(Kind.NAMESPACE, EventType.ADDED, "", "team")
            assert f.ds.snapshot().namespaces["team"].labels == {"x": "1"}
        finally:
            await f.ds.close()

    asyncio.run(main())


def test_invalid_nodeconfig_keeps_the_last_good_one_and_says_why() -> None:
    async def main() -> None:
        f = Fakes()
        f.ncs.create("", "me", (nodeconfig(65001), ""))
        await f.ds.start()
        try:
            assert await f.ds.wait_synced(10)
            f.ncs.modify("", "me", (None, "NodeConfig me: spec.cidr6[0]: host bits set"))
            await wait_until_async(
                lambda: f.ds.snapshot().node_config_error, timeout=10, what="the error"
            )
            snap = f.ds.snapshot()
            assert snap.node_config == nodeconfig(65001)
            assert "host bits" in snap.node_config_error
            assert await f.ds.get_node_config() == nodeconfig(65001)
            f.ncs.modify("", "me", (nodeconfig(65002), ""))
            await wait_until_async(
                lambda: f.ds.snapshot().node_config,
                until=lambda nc: nc == nodeconfig(65002),
                timeout=10,
                what="the fixed NodeConfig",
            )
            assert f.ds.snapshot().node_config_error == ""
        finally:
            await f.ds.close()

    asyncio.run(main())


def test_get_pod_falls_back_to_one_get() -> None:
    async def main() -> None:
        f = Fakes()
        # Not started: the cache is empty, as for a pod the watch has not delivered.
        item = f.pods.create("a", "new", Pod("a", "new", uid="u7", node_name="me"))
        got = await f.ds.get_pod("a", "new")
        assert got is item.value and f.pods.counters.gets == 1
        assert await f.ds.get_pod("a", "absent") is None
        assert await f.ds.get_pod("a", "absent") is None
        assert f.pods.counters.gets == 2, "a 404 is remembered briefly (the service polls)"
        assert await f.ds.pod_exists("a", "new", item.uid) is True
        assert await f.ds.pod_exists("a", "new", "other") is False
        f.pods.fail_next = 1
        assert await f.ds.pod_exists("a", "gone", "u1") is None, "API down: cannot say"
        await f.ds.close()

    asyncio.run(main())
