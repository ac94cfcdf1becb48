"""The agent's policy applier (`flock.agent.appliers.NftPolicy`) feeds the engine changes.

A pass hands the engine only what the datastore's events and the attachment table
say changed (`engine.update`); the whole view (`engine.sync`) only at the first
pass, on RESYNC, on the reconciler's forced passes and after a failure. The key
property: after any sequence of datastore changes, attachment changes, RESYNCs,
forced passes and refused nft transactions, the ruleset the engine holds equals a
fresh compile of the final view, built here independently of the applier.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flock.agent.appliers import NftPolicy
from flock.agent.datastore.base import Event, EventType, Kind, PodKey, Snapshot
from flock.apply.nft import NftError, PolicyEngine
from flock.compile.policy import LocalPod, PolicyChanges, PolicyInputs, Ruleset, compile_inputs
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.pod import ContainerPort, Namespace, Pod
from flock.model.policy import RejectedPolicy, parse_policy

N_PODS = 6
NSS = ("a", "b")
LABELS: tuple[dict[str, str], ...] = (
    {"app": "web"},
    {"app": "db"},
    {"app": "web", "tier": "front"},
    {},
)
SPECS: tuple[dict[str, Any], ...] = (
    {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]},
    {
        "podSelector": {},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
    },
    {
        "podSelector": {"matchLabels": {"app": "db"}},
        "ingress": [
            {
                "from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}],
                "ports": [{"port": "http"}],
            }
        ],
        "egress": [{"to": [{"podSelector": {"matchLabels": {"tier": "front"}}}]}],
        "policyTypes": ["Ingress", "Egress"],
    },
    {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": "nope!"}]}]},
)


class FakeNft:
    """Accepts every transaction except the next `refuse` ones."""

    def __init__(self) -> None:
        self.refuse = 0
        self.runs = 0

    def run(self, script: str) -> str:
        if self.refuse:
            self.refuse -= 1
            raise NftError("refused")
        self.runs += 1
        return ""


async def run_kernel(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return fn(*args, **kw)


def pod_ip(i: int, gen: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:db8:2::{i:x}:{gen:x}")


class World:
    """The datastore (snapshot + event queue) and the attachment table, changed by ops."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.pods: dict[PodKey, Pod] = {}
        self.namespaces: dict[str, Namespace] = {
            n: Namespace.from_object({"metadata": {"name": n, "labels": {"team": "blue"}}})
            for n in NSS
        }
        self.policies: dict[PodKey, dict[str, Any]] = {}
        self.allocs: dict[str, Allocation] = {}
        self.alloc_list: list[Allocation] = []
        self.gen = 0
        for i in range(N_PODS):
            self.set_pod(i, LABELS[(i + 1) % len(LABELS)])

    def key(self, i: int) -> PodKey:
        return (NSS[i % 2], f"p{i}")

    def emit(self, kind: Kind, ns: str, name: str) -> None:
        self.events.put_nowait(Event(kind, EventType.MODIFIED, ns, name))

    def set_pod(self, i: int, labels: dict[str, str] | None) -> None:
        ns, name = self.key(i)
        self.gen += 1
        if labels is None:
            self.pods.pop((ns, name), None)
        else:
            self.pods[(ns, name)] = Pod(
                namespace=ns,
                name=name,
                labels=labels,
                container_ports=(ContainerPort(8080 + i, "TCP", "http"),),
                ips=(pod_ip(i, self.gen),),
            )
        self.emit(Kind.POD, ns, name)

    def set_namespace(self, team: str | None) -> None:
        if team is None:
            self.namespaces.pop("b", None)
        else:
            self.namespaces["b"] = Namespace.from_object(
                {"metadata": {"name": "b", "labels": {"team": team}}}
            )
        self.emit(Kind.NAMESPACE, "", "b")

    def set_policy(self, j: int, spec: int | None) -> None:
        ns, name = NSS[j % 2], f"np{j}"
        if spec is None:
            self.policies.pop((ns, name), None)
        else:
            self.policies[(ns, name)] = {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"namespace": ns, "name": name},
                "spec": SPECS[spec],
            }
        self.emit(Kind.NETWORK_POLICY, ns, name)

    def set_attachment(self, i: int, second: bool, on: bool) -> None:
        """Pod i's attachment (pod 0 may have a second one, e.g. a new sandbox)."""
        ifname = f"{'w' if second else 'v'}{i}"
        if on:
            self.gen += 1
            ns, name = self.key(i)
            self.allocs[ifname] = Allocation(
                key=AttachmentKey(ifname, "eth0"),
                namespace=ns,
                pod=name,
                host_ifname=ifname,
                v6=ipaddress.IPv6Address(f"2001:db8:1::{i:x}:{self.gen:x}"),
                v4=ipaddress.IPv4Address(f"10.1.{i}.{self.gen % 250 + 1}"),
            )
        else:
            self.allocs.pop(ifname, None)
        self.alloc_list = list(self.allocs.values())  # a new list, as the table makes

    def snapshot(self) -> Snapshot:
        return Snapshot(
            node_name="n",
            pods=dict(self.pods),
            namespaces=dict(self.namespaces),
            network_policies=dict(self.policies),
            synced=True,
        )

    def reference(self) -> Ruleset:
        """The ruleset a fresh compile of the final view gives, built without the applier:
        local pods in their allocation-address version (the greatest veth's, if a
        pod has two), the rest as the datastore has them."""
        local: list[LocalPod] = []
        pods = dict(self.pods)
        for ifname in sorted(self.allocs):
            a = self.allocs[ifname]
            src = self.pods.get((a.namespace, a.pod)) or Pod(namespace=a.namespace, name=a.pod)
            lp = LocalPod(replace(src, ips=a.all_addresses), ifname, a.all_addresses)
            local.append(lp)
            pods[(a.namespace, a.pod)] = lp.pod
        parsed = [parse_policy(obj, key) for key, obj in self.policies.items()]
        return compile_inputs(
            PolicyInputs(
                local_pods=local,
                pods=list(pods.values()),
                namespaces=dict(self.namespaces),
                policies=[p for p in parsed if not isinstance(p, RejectedPolicy)],
                rejected={p.key: p for p in parsed if isinstance(p, RejectedPolicy)},
            )
        )


_op = st.one_of(
    st.tuples(st.just("pod"), st.integers(0, N_PODS - 1),
              st.one_of(st.none(), st.sampled_from(range(len(LABELS))))),
    st.tuples(st.just("attach"), st.integers(0, N_PODS - 1), st.booleans()),
    st.tuples(st.just("attach2"), st.just(0), st.booleans()),
    st.tuples(st.just("policy"), st.integers(0, 3),
              st.one_of(st.none(), st.sampled_from(range(len(SPECS))))),
    st.tuples(st.just("ns"), st.just(0), st.sampled_from([None, "red", "blue"])),
    st.tuples(st.just("resync"), st.just(0), st.none()),
    st.tuples(st.just("force"), st.just(0), st.none()),
    st.tuples(st.just("refuse"), st.just(0), st.none()),
    st.tuples(st.just("pass"), st.just(0), st.none()),
)  # fmt: skip


async def _pass(applier: NftPolicy, world: World) -> bool:
    try:
        await applier.apply_policy(world.snapshot(), world.alloc_list)
    except NftError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=25))
def test_any_sequence_of_changes_equals_a_full_compile(ops: list[tuple[Any, ...]]) -> None:
    """After every pass that succeeds, the engine holds what a fresh compile of the
    datastore's and the attachment table's view gives; a refused transaction leaves
    the next pass to repair it."""

    async def main() -> None:
        world = World()
        nft = FakeNft()
        engine = PolicyEngine(nft)
        applier = NftPolicy(run_kernel, engine, world.events)
        # Peer sets from the start (pod selectors, a namespace selector, named ports).
        for j, spec in enumerate((1, 2, 0, 1)):
            world.set_policy(j, spec)
        for i in range(3):
            world.set_attachment(i, False, True)
        assert await _pass(applier, world)
        assert engine.applied == world.reference()
        for kind, i, arg in ops:
            if kind == "pod":
                world.set_pod(i, None if arg is None else LABELS[arg])
            elif kind == "attach":
                world.set_attachment(i, False, arg)
            elif kind == "attach2":
                world.set_attachment(i, True, arg)
            elif kind == "policy":
                world.set_policy(i, arg)
            elif kind == "ns":
                world.set_namespace(arg)
            elif kind == "resync":
                world.events.put_nowait(Event(None, EventType.RESYNC))
            elif kind == "force":
                applier.resync()
            elif kind == "refuse":
                nft.refuse = 2  # the delta, then the whole-table fallback
            elif await _pass(applier, world) and not applier.idle(world.snapshot()):
                assert engine.applied == world.reference()
        nft.refuse = 0
        assert await _pass(applier, world)
        if not applier.idle(world.snapshot()):
            assert engine.applied == world.reference()
        else:  # no policy: the empty ruleset, whatever the pods
            assert not world.policies and not world.reference().chains

    asyncio.run(main())


class SpyEngine(PolicyEngine):
    def __init__(self) -> None:
        super().__init__(FakeNft())
        self.calls: list[tuple[str, Any]] = []

    def sync(self, inputs: PolicyInputs, *, full: bool = False) -> None:
        self.calls.append(("sync", inputs))
        super().sync(inputs, full=full)

    def update(self, changes: PolicyChanges, *, full: bool = False) -> None:
        self.calls.append(("update", changes))
        super().update(changes, full=full)


def test_a_change_goes_in_as_only_that_change() -> None:
    """One pod relabelled, one policy added, one attachment admitted: each pass is an
    `update` naming that object and nothing else (O(change)); the allocation-address
    version of a local pod goes in both as a peer and as a local pod."""

    async def main() -> None:
        world = World()
        engine = SpyEngine()
        applier = NftPolicy(run_kernel, engine, world.events)
        world.set_policy(0, 1)
        world.set_attachment(1, False, True)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert [c[0] for c in engine.calls] == ["sync"]

        engine.calls.clear()
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert engine.calls == []  # nothing changed: the engine is not called

        world.set_pod(2, {"app": "db"})
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        ((how, ch),) = engine.calls
        assert how == "update" and ch == PolicyChanges(
            pods={world.key(2): world.pods[world.key(2)]}
        )

        engine.calls.clear()
        world.set_policy(2, 2)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        ((how, ch),) = engine.calls
        assert how == "update" and set(ch.policies) == {("a", "np2")} and not ch.pods

        engine.calls.clear()
        world.set_attachment(3, False, True)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        ((how, ch),) = engine.calls
        a = world.allocs["v3"]
        assert how == "update" and set(ch.local_pods) == {"v3"} and set(ch.pods) == {world.key(3)}
        assert ch.local_pods["v3"].pod is ch.pods[world.key(3)]
        assert ch.pods[world.key(3)].ips == a.all_addresses  # not the datastore's address
        assert engine.applied == world.reference()

        engine.calls.clear()
        world.events.put_nowait(Event(None, EventType.RESYNC))
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert [c[0] for c in engine.calls] == ["sync"]

    asyncio.run(main())


def test_an_engine_that_lost_its_view_gets_the_whole_view() -> None:
    """`PolicyResyncNeeded` (a compile failed inside the engine, or it never had a view)
    turns the pass into a sync instead of failing it."""

    async def main() -> None:
        world = World()
        engine = SpyEngine()
        applier = NftPolicy(run_kernel, engine, world.events)
        world.set_policy(0, 0)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        engine._lost_view = True  # what a failed compile leaves
        engine.calls.clear()
        world.set_attachment(0, False, True)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert [c[0] for c in engine.calls] == ["update", "sync"]
        assert engine.applied == world.reference()

    asyncio.run(main())


class PickyNft(FakeNft):
    """Refuses every transaction that contains `needle` (rules nft cannot take)."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def run(self, script: str) -> str:
        if self.needle in script:
            raise NftError(f"Error: cannot take {self.needle}")
        return super().run(script)


def _port_policy(world: World, j: int, port: int) -> None:
    ns, name = NSS[j % 2], f"np{j}"
    world.policies[(ns, name)] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]},
    }
    world.emit(Kind.NETWORK_POLICY, ns, name)


def test_a_policy_nft_refuses_is_isolated_fail_closed() -> None:
    """A policy that compiles but whose rules nft refuses is enforced as its
    RejectedPolicy (reported, fail closed for what it selects), found among several
    at the first sync and alone when it arrives as a change; the other policies and
    later changes go in; a fixed version of it is enforced as written."""

    async def main() -> None:
        world = World()
        nft = PickyNft("31337")
        engine = PolicyEngine(nft)
        applier = NftPolicy(run_kernel, engine, world.events)
        for j in range(5):
            _port_policy(world, j, 31337 if j == 3 else 8000 + j)
        for i in range(3):
            world.set_attachment(i, False, True)
        await applier.apply_policy(world.snapshot(), world.alloc_list)  # a sync: bisected
        bad = ("b", "np3")
        assert set(engine.rejected()) == {bad}
        assert "nft refused" in engine.rejected()[bad].reason
        applied = engine.applied
        assert applied is not None and "8004" in str(applied.chains)

        # As a change: only the new policy is a suspect; the pass succeeds.
        _port_policy(world, 6, 31337)
        world.set_attachment(3, False, True)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert set(engine.rejected()) == {bad, ("a", "np6")}
        assert engine.applied is not None and "v3" in engine.applied.ingress

        # Fixed: enforced as written. Later passes keep the stand-in of the bad one.
        _port_policy(world, 3, 9999)
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert set(engine.rejected()) == {("a", "np6")}
        applier.resync()
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert set(engine.rejected()) == {("a", "np6")}
        assert "9999" in str(engine.applied.chains if engine.applied else "")

        # Refused whatever the policies: the pass fails as before (and retries a sync).
        nft.needle = "flock"
        world.set_attachment(4, False, True)
        try:
            await applier.apply_policy(world.snapshot(), world.alloc_list)
        except NftError:
            pass
        else:
            raise AssertionError("a refusal no policy explains must fail the pass")
        nft.needle = "31337"
        await applier.apply_policy(world.snapshot(), world.alloc_list)
        assert engine.applied is not None and "v4" in engine.applied.ingress

    asyncio.run(main())
