"""The manifests datastore: typed objects, events, bad input skipped, the ADD race closed."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from flock.agent.datastore.base import Datastore, EventType, Kind, NodeConfigUnavailable
from flock.agent.datastore.files import FilesDatastore
from flock.testbed.wait import wait_until_async

T = TypeVar("T")

NODE = "node-a"


def nodeconfig(name: str = NODE, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": spec or {"cidr6": ["2001:db8:f001::/64"], "cidr4": ["192.0.2.0/24"]},
    }


def pod(name: str, *, ns: str = "default", ready: bool = True, **ann: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "annotations": ann},
        "spec": {
            "nodeName": NODE,
            "containers": [
                {"name": "c", "image": "img", "ports": [{"containerPort": 53, "name": "dns"}]}
            ],
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def write(path: Path, *docs: dict[str, Any]) -> None:
    """Atomic write, as a careful operator (or kubectl-like tool) would."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs)))
    os.replace(tmp, path)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def test_satisfies_protocol(tmp_path: Path) -> None:
    assert isinstance(FilesDatastore(tmp_path, node_name=NODE), Datastore)


def test_multi_document_file_gives_typed_objects(tmp_path: Path) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bgp", "namespace": "kube-system"},
        "data": {"password": base64.b64encode(b"s3cret").decode()},
    }
    ns = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "dns", "labels": {"a": "b"}},
    }
    np = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "dns"},
        "spec": {"podSelector": {}},
    }
    other_node = nodeconfig("node-b", cidr6=["not-a-cidr"])  # not ours: not validated
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    write(tmp_path / "all.yaml", nodeconfig(), pod("p1", ns="dns", ready=False), ns, np, secret)
    write(tmp_path / "more.yml", other_node, deploy, {"kind": "List", "items": [pod("p2")]})

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE)
        await ds.start()
        try:
            assert ds.synced
            snap = ds.snapshot()
            nc = snap.require_node_config()
            assert nc.spec.cidr6 == (ipaddress.IPv6Network("2001:db8:f001::/64"),)
            p1 = snap.pod("dns", "p1")
            assert p1 is not None and not p1.ready and p1.uid == "uid-p1"
            assert p1.container_ports[0].name == "dns"
            assert snap.pod("default", "p2") is not None
            assert snap.namespaces["dns"].labels["a"] == "b"
            assert snap.network_policies[("dns", "deny")]["spec"] == {"podSelector": {}}
            assert await ds.get_secret("kube-system", "bgp", "password") == "s3cret"
            assert await ds.get_secret("kube-system", "bgp", "nope") is None
        finally:
            await ds.close()

    run(body)


async def _next_event(q: asyncio.Queue[Any], timeout: float = 60.0) -> Any:
    """The next event; `timeout` is a deadline for a loaded machine, not an expectation."""
    return await asyncio.wait_for(q.get(), timeout)


def test_watch_delivers_readiness_flip_as_event(tmp_path: Path) -> None:
    write(tmp_path / "nc.yaml", nodeconfig())
    write(tmp_path / "p.yaml", pod("web", ready=True))

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600)
        await ds.start()
        q = ds.subscribe()
        try:
            write(tmp_path / "p.yaml", pod("web", ready=False))
            ev = await _next_event(q)
            assert (ev.kind, ev.type, ev.namespace, ev.name) == (
                Kind.POD,
                EventType.MODIFIED,
                "default",
                "web",
            )
            p = ds.snapshot().pod("default", "web")
            assert p is not None and not p.ready
            # Non-atomic, in-place write (truncate + write + close) is seen too.
            (tmp_path / "p.yaml").write_text(yaml.safe_dump(pod("web", ready=True)))
            ev = await _next_event(q)
            assert ev.type is EventType.MODIFIED
            p = ds.snapshot().pod("default", "web")
            assert p is not None and p.ready
            # Deleting the file deletes the pod.
            (tmp_path / "p.yaml").unlink()
            ev = await _next_event(q)
            assert (ev.kind, ev.type) == (Kind.POD, EventType.DELETED)
            assert ds.snapshot().pod("default", "web") is None
        finally:
            await ds.close()

    run(body)


def test_get_pod_reads_through_before_the_watch_delivers(tmp_path: Path) -> None:
    """The ADD race: manifest written, ADD arrives before the loop saw the event."""
    write(tmp_path / "nc.yaml", nodeconfig())

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600)
        await ds.start()
        try:
            # No await between the write and get_pod: the event loop cannot have run.
            write(tmp_path / "new.yaml", pod("fresh", **{"flock.fritzlab.net/ipv4": "false"}))
            p = await ds.get_pod("default", "fresh")
            assert p is not None
            assert p.annotations == {"flock.fritzlab.net/ipv4": "false"}
            # Changed annotations are never served stale either.
            write(tmp_path / "new.yaml", pod("fresh", **{"flock.fritzlab.net/ipv4": "true"}))
            p = await ds.get_pod("default", "fresh")
            assert p is not None and p.annotations["flock.fritzlab.net/ipv4"] == "true"
            assert await ds.get_pod("default", "absent") is None
        finally:
            await ds.close()

    run(body)


def test_get_pod_reads_through_without_inotify(tmp_path: Path) -> None:
    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600, use_inotify=False)
        await ds.start()
        try:
            write(tmp_path / "new.yaml", pod("fresh"))
            assert await ds.get_pod("default", "fresh") is not None
        finally:
            await ds.close()

    run(body)


def test_bad_manifests_are_logged_with_file_and_reason_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "good.yaml", nodeconfig(), pod("ok"))
    (tmp_path / "broken.yaml").write_text("kind: Pod\nmetadata: {name: [unclosed\n")
    write(tmp_path / "partial.yaml", pod("fine"), {"apiVersion": "v1", "kind": "Pod"})
    (tmp_path / "notes.txt").write_text("ignored: entirely")

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE)
        with caplog.at_level(logging.WARNING):
            await ds.start()
        try:
            snap = ds.snapshot()
            assert set(snap.pods) == {("default", "ok"), ("default", "fine")}
            recs = [r for r in caplog.records if "broken.yaml" in str(getattr(r, "file", ""))]
            assert recs and getattr(recs[0], "reason", "")
            recs = [r for r in caplog.records if "partial.yaml" in str(getattr(r, "file", ""))]
            assert recs and "metadata.name" in recs[0].reason
            assert recs[0].document == "1"
        finally:
            await ds.close()

    run(body)


def test_torn_write_keeps_previous_content(tmp_path: Path) -> None:
    write(tmp_path / "p.yaml", pod("web"))

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600)
        await ds.start()
        try:
            (tmp_path / "p.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: [")
            ds.drain()
            assert ds.snapshot().pod("default", "web") is not None
            assert str(tmp_path / "p.yaml") in ds.file_errors
        finally:
            await ds.close()

    run(body)


def test_node_config_missing_or_invalid_is_explained(tmp_path: Path) -> None:
    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600)
        await ds.start()
        try:
            with pytest.raises(NodeConfigUnavailable, match="no NodeConfig named 'node-a'"):
                await ds.get_node_config()
            write(tmp_path / "nc.yaml", nodeconfig(cidr6=["2001:db8::/129"]))
            with pytest.raises(NodeConfigUnavailable, match=r"nc\.yaml.*spec\.cidr6"):
                await ds.get_node_config()
            write(tmp_path / "nc.yaml", nodeconfig())
            assert (await ds.get_node_config()).name == NODE
        finally:
            await ds.close()

    run(body)


def test_object_moving_between_files_is_not_lost(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", pod("web"))

    async def body() -> None:
        ds = FilesDatastore(tmp_path, node_name=NODE, rescan_interval=3600)
        await ds.start()
        try:
            write(tmp_path / "b.yaml", pod("web", ready=False))
            (tmp_path / "a.yaml").unlink()
            ds.drain()
            p = ds.snapshot().pod("default", "web")
            assert p is not None and not p.ready
        finally:
            await ds.close()

    run(body)


def test_directory_created_late_or_replaced_is_watched_again(tmp_path: Path) -> None:
    d = tmp_path / "later"

    async def body() -> None:
        ds = FilesDatastore(d, node_name=NODE, rescan_interval=3600)
        await ds.start()
        q = ds.subscribe()
        try:
            assert ds.snapshot().pods == {}
            d.mkdir()
            write(d / "p.yaml", pod("web"))
            ev = await _next_event(q)  # found by polling, then the watch is armed
            assert (ev.kind, ev.name) == (Kind.POD, "web")
            await wait_until_async(lambda: ds.watching, timeout=60, what="the watch armed")
            # The directory is replaced wholesale (e.g. a ConfigMap-style swap).
            (d / "p.yaml").unlink()
            d.rmdir()
            ev = await _next_event(q)
            assert ev.type is EventType.DELETED
            d.mkdir()
            write(d / "p.yaml", pod("web", ready=False))
            ev = await _next_event(q)
            assert ev.type is EventType.ADDED
            p = ds.snapshot().pod("default", "web")
            assert p is not None and not p.ready
        finally:
            await ds.close()

    run(body)
