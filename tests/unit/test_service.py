"""The CNI verbs' ordering and rollback, with the kernel replaced (no root, milliseconds).

Real IPAM, real allocation store (in a temp dir), real manifests datastore and
reconciler; only the datapath is a recording fake that can be told to fail or
to be slow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from flock.agent.datastore.base import Snapshot
from flock.agent.datastore.files import FilesDatastore
from flock.agent.reconcile import AllocationIndex, Reconciler
from flock.agent.service import ERR_ANNOTATION, ERR_DATAPATH, CniService
from flock.apply.datapath import HostVeth, PodNetResult, PodNetSpec, PodRoute
from flock.apply.store import AllocationStore
from flock.compile.ipam import Ipam
from flock.model.allocation import Allocation
from flock.model.cni import ERR_NOT_AVAILABLE, ERR_TRY_AGAIN, CniError, CniRequest
from flock.testbed.wait import wait_until_async

T = TypeVar("T")
NODE = "node-a"


class FakeDatapath:
    def __init__(self) -> None:
        self.links: dict[str, PodNetSpec] = {}
        self.fail_setup = False
        self.setup_delay = 0.0
        # Ordering hooks (barriers, not delays): setups meet at `barrier` (proof that they
        # overlap), then wait until `hold` is set (so a test acts while one is in progress).
        self.barrier: threading.Barrier | None = None
        self.hold: threading.Event | None = None
        self.events: list[str] = []
        self.lock = threading.Lock()

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult:
        with self.lock:
            self.events.append(f"setup-start {spec.container_id}")
        time.sleep(self.setup_delay)
        if self.barrier is not None:
            self.barrier.wait(60)  # BrokenBarrierError: the setups did not overlap
        if self.hold is not None and not self.hold.wait(60):
            raise TimeoutError("setup held for 60 s")
        if self.fail_setup:
            raise OSError("netlink said no")
        with self.lock:
            self.links[spec.host_ifname] = spec
            self.events.append(f"setup-end {spec.container_id}")
        return PodNetResult(
            host_ifname=spec.host_ifname, host_mac="ee:00:00:00:00:01", host_index=5,
            pod_ifname=spec.ifname, pod_mac="0a:00:00:00:00:01", pod_index=2,
            sandbox=spec.netns, mtu=1500, addresses=spec.addresses,
        )  # fmt: skip

    def teardown_pod(
        self, *, container_id: str, ifname: str = "eth0", host_ifname: str = ""
    ) -> bool:
        with self.lock:
            self.events.append(f"teardown {container_id}")
            return self.links.pop(host_ifname, None) is not None

    def check_pod(self, spec: PodNetSpec) -> list[str]:
        return (
            [] if spec.host_ifname in self.links else [f"host veth {spec.host_ifname} is missing"]
        )

    def list_host_veths(self) -> list[HostVeth]:
        return [HostVeth(name=n, index=1, mac="", up=True) for n in self.links]

    def list_pod_routes(self) -> list[PodRoute]:
        # The kernel's host routes follow the veths: one per pod address.
        with self.lock:
            return [
                PodRoute(dst=ip, ifname=name)
                for name, spec in self.links.items()
                for ip in spec.addresses
            ]

    def delete_pod_route(self, route: PodRoute) -> None:
        with self.lock:
            self.events.append(f"delete-route {route.dst}")


class FailingPolicy:
    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        raise RuntimeError("nft refused the ruleset")


class RecordingPolicy:
    """A policy applier that records, in the datapath's event list, which containers
    each applied pass covered ("policy c1,c2"), in order with setup and teardown."""

    def __init__(self, dp: FakeDatapath) -> None:
        self.dp = dp

    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        ids = ",".join(sorted(a.key.container_id for a in allocations))
        with self.dp.lock:
            self.dp.events.append(f"policy {ids}")


def policy_passes(events: list[str]) -> list[tuple[int, set[str]]]:
    """(position, containers covered) of every recorded policy pass."""
    out = []
    for i, e in enumerate(events):
        if e.startswith("policy"):
            out.append((i, set(e.removeprefix("policy").strip().split(",")) - {""}))
    return out


def write(path: Path, *docs: Mapping[str, Any]) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(yaml.safe_dump_all([dict(d) for d in docs]))
    tmp.replace(path)


def pod_doc(name: str, uid: str = "", **ann: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid or f"uid-{name}",
                     "annotations": {f"flock.fritzlab.net/{k}": v for k, v in ann.items()}},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "i"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip


def req(command: str, cid: str, pod: str = "", uid: str = "") -> CniRequest:
    args = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod} if pod else {}
    if uid:
        args["K8S_POD_UID"] = uid
    return CniRequest.from_wire(
        {
            "command": command,
            "containerID": cid,
            "netns": "/run/netns/fake" if command in ("ADD", "CHECK") else "",
            "ifname": "eth0",
            "args": args,
            "config": {"cniVersion": "1.1.0", "name": "flock"},
        }
    )


Env = tuple[CniService, FakeDatapath, AllocationStore, Path]


def run(
    tmp_path: Path,
    body: Callable[[Env], Awaitable[T]],
    *,
    policy: Any = None,
    recording_policy: bool = False,
) -> T:
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(
        manifests / "nc.yaml",
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": NODE},
            "spec": {"cidr6": ["2001:db8:f001::/64"], "cidr4": ["10.1.0.0/24"]},
        },
    )

    async def main() -> T:
        ds = FilesDatastore(manifests, node_name=NODE, rescan_interval=3600)
        await ds.start()
        store = AllocationStore(tmp_path / "state")
        ipam = Ipam(store.load())
        dp = FakeDatapath()
        rec = Reconciler(snapshot=ds.snapshot, index=AllocationIndex(ipam.all()))
        svc = CniService(
            datastore=ds, ipam=ipam, store=store, datapath=dp, reconciler=rec, pod_wait=0.5
        )
        rec.set_appliers(policy=RecordingPolicy(dp) if recording_policy else policy)
        svc.ready = True
        task = asyncio.create_task(rec.run())
        try:
            return await body((svc, dp, store, manifests))
        finally:
            task.cancel()
            await ds.close()
            svc.close()
            store.close()

    return asyncio.run(main())


def test_add_then_del_leaves_nothing(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("web"))
        res = await svc.handle(req("ADD", "c1", "web"))
        assert [ip["address"] for ip in res["ips"]][1] == "10.1.0.1/32"
        assert len(dp.links) == 1 and len(store.allocations()) == 1
        await svc.handle(req("CHECK", "c1", "web"))
        await svc.handle(req("DEL", "c1"))
        await svc.handle(req("DEL", "c1"))  # idempotent
        assert dp.links == {} and store.allocations() == [] and svc.ipam.all() == []

    run(tmp_path, body)


def test_datapath_failure_rolls_back_the_allocation(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("web"))
        dp.fail_setup = True
        with pytest.raises(CniError) as ei:
            await svc.handle(req("ADD", "c1", "web"))
        assert ei.value.code == ERR_DATAPATH and "netlink said no" in ei.value.msg
        assert svc.ipam.all() == [] and store.allocations() == [] and dp.links == {}
        assert "teardown c1" in dp.events
        dp.fail_setup = False
        res = await svc.handle(req("ADD", "c2", "web"))
        assert res["ips"][1]["address"] == "10.1.0.1/32"  # the address was not leaked

    run(tmp_path, body)


def test_policy_failure_fails_the_add_and_undoes_it(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("web"))
        with pytest.raises(CniError) as ei:
            await svc.handle(req("ADD", "c1", "web"))
        assert ei.value.code == ERR_DATAPATH and "unprotected" in ei.value.msg
        assert "nft refused" in ei.value.details
        assert svc.ipam.all() == [] and store.allocations() == [] and dp.links == {}

    run(tmp_path, body, policy=FailingPolicy())


def test_policy_is_in_place_before_the_veth_and_goes_after_it(tmp_path: Path) -> None:
    """SPEC §6: ADD applies the pod's policy before its veth and host routes exist
    (no moment in which its address is routed unprotected); DEL removes the policy
    only after the veth is gone."""

    async def body(env: Env) -> None:
        svc, dp, _, m = env
        write(m / "p.yaml", pod_doc("web"))
        await svc.handle(req("ADD", "c1", "web"))
        setup = dp.events.index("setup-start c1")
        covering = [i for i, ids in policy_passes(dp.events) if "c1" in ids]
        assert covering and covering[0] < setup, dp.events
        await svc.handle(req("DEL", "c1"))
        teardown = dp.events.index("teardown c1")
        passes = policy_passes(dp.events)
        # Still covered by every pass up to the teardown; the pass after it drops it.
        assert all("c1" in ids for i, ids in passes if setup < i < teardown), dp.events
        assert any(i > teardown and "c1" not in ids for i, ids in passes), dp.events
        assert "c1" not in passes[-1][1]

    run(tmp_path, body, recording_policy=True)


def test_a_failed_add_removes_its_policy_before_it_answers(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("web"))
        dp.fail_setup = True
        with pytest.raises(CniError) as ei:
            await svc.handle(req("ADD", "c1", "web"))
        assert ei.value.code == ERR_DATAPATH
        setup = dp.events.index("setup-start c1")
        passes = policy_passes(dp.events)
        assert any(i < setup and "c1" in ids for i, ids in passes), dp.events
        # When the error reaches the runtime, a pass without the pod has been applied.
        assert passes[-1][0] > setup and "c1" not in passes[-1][1], dp.events
        assert svc.ipam.all() == [] and store.allocations() == [] and dp.links == {}

    run(tmp_path, body, recording_policy=True)


def test_malformed_annotation_names_the_key_and_allocates_nothing(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("web", cidr4="10.9.0.0/24"))
        with pytest.raises(CniError) as ei:
            await svc.handle(req("ADD", "c1", "web"))
        assert ei.value.code == ERR_ANNOTATION
        assert "flock.fritzlab.net/cidr4" in ei.value.msg and "10.9.0.0/24" in ei.value.msg
        assert dp.events == [] and store.allocations() == []

    run(tmp_path, body)


def test_add_waits_briefly_for_a_pod_the_datastore_has_not_seen(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, _dp, _store, m = env

        async def later() -> None:
            await asyncio.sleep(0.1)
            write(m / "p.yaml", pod_doc("late", uid="u2"))

        # The wait is generous here (the write lands after 0.1 s plus the datastore's
        # notice, which a loaded machine can stretch past the default 0.5 s).
        svc.pod_wait = 60
        writer = asyncio.create_task(later())
        res = await svc.handle(req("ADD", "c1", "late", uid="u2"))
        await writer
        assert res["ips"]
        # A stale incarnation (uid mismatch) is never used; it ends in "try again".
        svc.pod_wait = 0.5
        with pytest.raises(CniError) as ei:
            await svc.handle(req("ADD", "c2", "late", uid="u3"))
        assert ei.value.code == ERR_TRY_AGAIN and "uid" in ei.value.msg

    run(tmp_path, body)


def test_operations_on_one_container_are_serialised(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, _store, m = env
        write(m / "p.yaml", pod_doc("a"), pod_doc("b"))
        # c1's and c2's kernel work meet at a barrier (they overlap, or both fail after
        # 60 s) and then stay held, so the DEL arrives while c1's ADD is in progress.
        dp.barrier, dp.hold = threading.Barrier(2), threading.Event()
        add = asyncio.create_task(svc.handle(req("ADD", "c1", "a")))
        other = asyncio.create_task(svc.handle(req("ADD", "c2", "b")))
        await wait_until_async(
            lambda: list(dp.events),
            until=lambda ev: {"setup-start c1", "setup-start c2"} <= set(ev),
            timeout=60,
            what="both setups started",
        )
        delete = asyncio.create_task(svc.handle(req("DEL", "c1")))  # waits for c1's ADD
        await asyncio.sleep(0)  # the DEL is in (and must be blocked) before c1 finishes
        dp.hold.set()
        await delete
        await add
        await other
        i_end = dp.events.index("setup-end c1")
        # c1 and c2 overlapped: c2's kernel work began while c1's was still running.
        assert dp.events.index("setup-start c2") < i_end
        assert dp.events.index("teardown c1") > i_end
        assert [a.key.container_id for a in svc.ipam.all()] == ["c2"]

    run(tmp_path, body)


def test_status_reports_a_missing_nodeconfig(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, _dp, _store, m = env
        await svc.handle(req("STATUS", ""))
        (m / "nc.yaml").unlink()
        with pytest.raises(CniError) as ei:
            await svc.handle(req("STATUS", ""))
        assert ei.value.code == ERR_NOT_AVAILABLE and "NodeConfig" in ei.value.msg

    run(tmp_path, body)


def test_gc_releases_unlisted_attachments(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, dp, store, m = env
        write(m / "p.yaml", pod_doc("a"), pod_doc("b"))
        await svc.handle(req("ADD", "c1", "a"))
        await svc.handle(req("ADD", "c2", "b"))
        dp.links["flkstray000000"] = next(iter(dp.links.values()))
        gc = CniRequest.from_wire(
            {
                "command": "GC",
                "config": {
                    "cniVersion": "1.1.0",
                    "name": "flock",
                    "cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}],
                },
            }
        )
        await svc.handle(gc)
        assert [a.key.container_id for a in store.allocations()] == ["c2"]
        assert len(dp.links) == 1

    run(tmp_path, body)


def test_concurrent_adds_share_fsyncs_and_all_are_durable(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, _dp, store, m = env
        write(m / "p.yaml", *[pod_doc(f"p{i}") for i in range(16)])
        calls: list[int] = []
        real = store.record

        def spy(**kw: Any) -> None:
            calls.append(len(list(kw.get("put", ()))) + len(list(kw.get("delete", ()))))
            time.sleep(0.01)  # a slow disk: changes queue up meanwhile
            real(**kw)

        store.record = spy  # type: ignore[method-assign]
        await asyncio.gather(*(svc.handle(req("ADD", f"c{i}", f"p{i}")) for i in range(16)))
        assert sum(calls) == 16 and len(calls) < 16
        await asyncio.gather(*(svc.handle(req("DEL", f"c{i}")) for i in range(0, 16, 2)))
        store.close()  # as if the agent stopped: what is on disk?
        reloaded = AllocationStore(store.state_dir)
        keys = sorted(a.key.container_id for a in reloaded.load())
        reloaded.close()
        assert keys == sorted(f"c{i}" for i in range(1, 16, 2))

    run(tmp_path, body)


def test_check_compares_prev_result_with_what_the_pod_holds(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        svc, _dp, _store, m = env
        write(m / "p.yaml", pod_doc("web"))
        res = await svc.handle(req("ADD", "c1", "web"))

        def check(prev: dict[str, Any]) -> CniRequest:
            msg = req("CHECK", "c1", "web").to_wire()
            msg["config"] = {**msg["config"], "prevResult": prev}
            return CniRequest.from_wire(msg)

        await svc.handle(check({"cniVersion": "1.1.0", **res}))
        wrong = {"ips": [{"address": "10.1.0.99/32"}, *res["ips"][:1]]}
        with pytest.raises(CniError) as ei:
            await svc.handle(check(wrong))
        assert "10.1.0.99" in ei.value.details and "10.1.0.1" in ei.value.details

    run(tmp_path, body)


def test_an_add_completes_while_a_store_compaction_is_in_progress(tmp_path: Path) -> None:
    """The store's compaction (~0.2 s at 100k allocations) is not on the ADD's path: with
    the snapshot write held at a barrier, the next ADD still completes, durably."""

    async def body(env: Env) -> None:
        svc, _dp, store, m = env
        write(m / "p.yaml", *[pod_doc(f"p{i}") for i in range(3)])
        started, release = threading.Event(), threading.Event()
        real = store._write_snapshot_file

        def held(parts: list[bytes], seq: int) -> None:
            started.set()
            release.wait(60)
            real(parts, seq)

        store._write_snapshot_file = held  # type: ignore[method-assign]
        store.compact_every = 2
        try:
            await asyncio.wait_for(svc.handle(req("ADD", "c0", "p0")), 60)
            # The 2nd record starts a compaction; the ADD that made it does not wait for it.
            await asyncio.wait_for(svc.handle(req("ADD", "c1", "p1")), 60)
            assert await asyncio.to_thread(started.wait, 30), "no compaction started"
            res = await asyncio.wait_for(svc.handle(req("ADD", "c2", "p2")), 60)
            assert res["ips"] and not release.is_set()
            assert sorted(a.key.container_id for a in store.allocations()) == ["c0", "c1", "c2"]
        finally:
            release.set()
        await asyncio.to_thread(store.wait_compacted)
        store.close()
        reloaded = AllocationStore(store.state_dir)
        keys = sorted(a.key.container_id for a in reloaded.load())
        reloaded.close()
        assert keys == ["c0", "c1", "c2"]

    run(tmp_path, body)
