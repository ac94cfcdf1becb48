"""Verbs interleaved with each other at the worst moment, ordered by barriers in the fake
kernel (never by sleeps), and the agent's own thread discipline.

Each test stops one verb inside the (fake) kernel with a `threading.Event`, runs
another verb to completion meanwhile, then lets the first one go: the
interleavings a review of issue 13 found (GC listing veths around an ADD, CHECK
reading before the lock, GC releasing an ADD in flight), kernel work never on
the event-loop thread, and a verb's rollback that must not wait forever once
the reconcile loop has stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from flock.agent.datastore.files import FilesDatastore
from flock.agent.reconcile import AllocationIndex, Reconciler
from flock.agent.service import CniService
from flock.apply.datapath import HostVeth, PodNetResult, PodNetSpec, PodRoute
from flock.apply.store import AllocationStore
from flock.compile.ipam import Ipam
from flock.model.cni import CniError, CniRequest
from flock.testbed.wait import wait_until_async

T = TypeVar("T")
NODE = "node-a"
WAIT = 10.0  # generous: a barrier that is never reached fails the test, it does not hang it


class Gate:
    """A point in the fake kernel where a verb's thread stops until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.open = threading.Event()

    def pass_through(self) -> None:
        self.reached.set()
        if not self.open.wait(WAIT):
            raise TimeoutError("gate never opened")

    async def wait_reached(self) -> None:
        await wait_until_async(self.reached.is_set, timeout=WAIT, what="a verb at the gate")


class GatedDatapath:
    """A kernel fake whose setup and veth listing can be held at a gate; records the
    thread each call ran on."""

    def __init__(self) -> None:
        self.links: dict[str, PodNetSpec] = {}
        self.lock = threading.Lock()
        self.setup_gate: Gate | None = None
        self.list_gate: Gate | None = None
        self.threads: list[str] = []
        self.torn_down: list[str] = []

    def _note(self) -> None:
        with self.lock:
            self.threads.append(threading.current_thread().name)

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult:
        self._note()
        if self.setup_gate is not None:
            self.setup_gate.pass_through()
        with self.lock:
            self.links[spec.host_ifname] = spec
        return PodNetResult(
            host_ifname=spec.host_ifname, host_mac="ee:00:00:00:00:01", host_index=5,
            pod_ifname=spec.ifname, pod_mac="0a:00:00:00:00:01", pod_index=2,
            sandbox=spec.netns, mtu=1500, addresses=spec.addresses,
        )  # fmt: skip

    def teardown_pod(
        self, *, container_id: str, ifname: str = "eth0", host_ifname: str = ""
    ) -> bool:
        self._note()
        with self.lock:
            self.torn_down.append(host_ifname)
            return self.links.pop(host_ifname, None) is not None

    def check_pod(self, spec: PodNetSpec) -> list[str]:
        self._note()
        with self.lock:
            return [] if spec.host_ifname in self.links else [f"{spec.host_ifname} is missing"]

    def list_host_veths(self) -> list[HostVeth]:
        self._note()
        if self.list_gate is not None:
            self.list_gate.pass_through()
        with self.lock:  # what the kernel has when the dump is taken: after the gate
            return [HostVeth(name=n, index=1, mac="", up=True) for n in self.links]

    def list_pod_routes(self) -> list[PodRoute]:
        with self.lock:
            return [
                PodRoute(dst=ip, ifname=name)
                for name, spec in self.links.items()
                for ip in spec.addresses
            ]

    def delete_pod_route(self, route: PodRoute) -> None:
        pass


def write(path: Path, *docs: Mapping[str, Any]) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(yaml.safe_dump_all([dict(d) for d in docs]))
    tmp.replace(path)


def pod_doc(name: str) -> dict[str, Any]:
    """A Ready pod; `any-<name>` pods carry an anycast address (their ADD awaits a pass)."""
    ann = {"flock.fritzlab.net/anycast": "2001:db8:a::53"} if name.startswith("any-") else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "uid": f"uid-{name}",
            "annotations": ann,
        },
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "i"}]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def req(command: str, cid: str, pod: str = "") -> CniRequest:
    args = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": pod} if pod else {}
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


def gc_req(*live: str) -> CniRequest:
    return CniRequest.from_wire(
        {
            "command": "GC",
            "config": {
                "cniVersion": "1.1.0",
                "name": "flock",
                "cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in live],
            },
        }
    )


Env = tuple[CniService, GatedDatapath, Reconciler, "asyncio.Task[None]"]


def run(tmp_path: Path, pods: list[str], body: Callable[[Env], Awaitable[T]]) -> T:
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(
        manifests / "nc.yaml",
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": NODE},
            "spec": {
                "cidr6": ["2001:db8:f001::/64"],
                "cidr4": ["10.1.0.0/24"],
                "allowedAddresses": [{"cidr": "2001:db8:a::/48", "use": ["anycast"]}],
            },
        },
    )
    write(manifests / "pods.yaml", *[pod_doc(p) for p in pods])

    async def main() -> T:
        ds = FilesDatastore(manifests, node_name=NODE, rescan_interval=3600)
        await ds.start()
        store = AllocationStore(tmp_path / "state")
        ipam = Ipam(store.load())
        dp = GatedDatapath()
        rec = Reconciler(snapshot=ds.snapshot, index=AllocationIndex(ipam.all()))
        svc = CniService(
            datastore=ds, ipam=ipam, store=store, datapath=dp, reconciler=rec, pod_wait=0.5
        )
        svc.ready = True
        task = asyncio.create_task(rec.run())
        try:
            return await asyncio.wait_for(body((svc, dp, rec, task)), 2 * WAIT)
        finally:
            task.cancel()
            await ds.close()
            svc.close()
            store.close()

    return asyncio.run(main())


def test_gc_does_not_remove_the_veth_of_an_add_that_completes_during_its_listing(
    tmp_path: Path,
) -> None:
    """GC must decide which veths are known after the kernel's listing, not before: an
    ADD that completes in between would otherwise lose its veth (and without its lock)."""

    async def body(env: Env) -> None:
        svc, dp, _rec, _task = env
        dp.list_gate = Gate()
        # The runtime listed its attachments before c1's ADD: c1 is not in the list.
        gc = asyncio.create_task(svc.handle(gc_req()))
        await dp.list_gate.wait_reached()
        res = await svc.handle(req("ADD", "c1", "web"))  # completes while GC lists
        dp.list_gate.open.set()
        await gc
        host = res["interfaces"][0]["name"]
        assert host in dp.links, f"GC removed {host} of a live pod: {dp.torn_down}"
        await svc.handle(req("CHECK", "c1", "web"))

    run(tmp_path, ["web"], body)


def test_check_waits_for_an_add_in_flight_on_the_same_container(tmp_path: Path) -> None:
    """CHECK reads the allocation under the container's lock: issued while that
    container's ADD is still resolving its pod, it sees the finished ADD, not
    'unknown container'."""

    async def body(env: Env) -> None:
        svc, _dp, _rec, _task = env
        resolving, resolve = asyncio.Event(), asyncio.Event()
        get_pod = svc.datastore.get_pod

        async def gated_get_pod(namespace: str, name: str) -> Any:
            resolving.set()
            await resolve.wait()
            return await get_pod(namespace, name)

        svc.datastore.get_pod = gated_get_pod  # type: ignore[method-assign]
        add = asyncio.create_task(svc.handle(req("ADD", "c1", "web")))
        await asyncio.wait_for(resolving.wait(), WAIT)
        check = asyncio.create_task(svc.handle(req("CHECK", "c1", "web")))
        await asyncio.sleep(0)  # CHECK runs up to its first wait (not a timing bound)
        resolve.set()
        await add
        await check  # raised CniError(3, 'has no flock allocation') before the fix

    run(tmp_path, ["web"], body)


def test_gc_does_not_release_an_add_in_flight(tmp_path: Path) -> None:
    """The runtime's GC list was taken before an ADD started: that attachment is not
    in it, but GC must not release an allocation an ADD is still making."""

    async def body(env: Env) -> None:
        svc, dp, _rec, _task = env
        dp.setup_gate, dp.list_gate = Gate(), Gate()
        add = asyncio.create_task(svc.handle(req("ADD", "c1", "web")))
        await dp.setup_gate.wait_reached()
        gc = asyncio.create_task(svc.handle(gc_req()))
        # GC lists the kernel's veths after it chose what to release: by then it has
        # decided about c1, while c1's ADD is still in the kernel.
        await dp.list_gate.wait_reached()
        dp.setup_gate.open.set()
        res = await add
        dp.list_gate.open.set()
        await gc
        assert [a.key.container_id for a in svc.ipam.all()] == ["c1"]
        assert res["interfaces"][0]["name"] in dp.links
        await svc.handle(req("CHECK", "c1", "web"))

    run(tmp_path, ["web"], body)


def test_kernel_work_never_runs_on_the_event_loop_thread(tmp_path: Path) -> None:
    """STYLE.md: no setns (no kernel call) on the agent's event loop thread, also when a
    single ADD is in flight."""

    async def body(env: Env) -> None:
        svc, dp, _rec, _task = env
        loop_thread = threading.current_thread().name
        await svc.handle(req("ADD", "c1", "web"))
        await svc.handle(req("CHECK", "c1", "web"))
        await svc.handle(req("DEL", "c1"))
        assert dp.threads and loop_thread not in dp.threads, dp.threads

    run(tmp_path, ["web"], body)


def test_a_verb_does_not_wait_forever_for_a_stopped_reconcile_loop(tmp_path: Path) -> None:
    """Shutdown cancels the reconcile loop; a verb still running (here an ADD whose
    rollback awaits a pass) must finish instead of waiting for a pass that never comes."""

    async def body(env: Env) -> None:
        svc, dp, rec, task = env
        dp.setup_gate = Gate()
        add = asyncio.create_task(svc.handle(req("ADD", "c1", "any-web")))
        await dp.setup_gate.wait_reached()
        task.cancel()  # what Agent.stop does after its drain
        await asyncio.gather(task, return_exceptions=True)
        dp.setup_gate.open.set()
        with contextlib.suppress(CniError):  # refusing the ADD is fine; hanging is not
            await asyncio.wait_for(add, WAIT)
        assert await asyncio.wait_for(rec.sync(), WAIT) is not None

    run(tmp_path, ["any-web"], body)
