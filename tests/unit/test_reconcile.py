"""Desired state from (allocations, readiness, NodeConfig), replayed over sequences of states,
and the loop's contract: coalescing, apply-on-change, failures reported and retried."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from flock.agent.datastore.base import PodKey, Snapshot
from flock.agent.reconcile import (
    AllocationIndex,
    Desired,
    IPAddress,
    IPNetwork,
    Nexthop,
    Reconciler,
    compute_desired,
)
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Pod
from flock.testbed.wait import wait_until_async

NODE = NodeConfig.from_object(
    {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "n1"},
        "spec": {"cidr6": ["2001:db8:f001::/64"], "cidr4": ["10.1.0.0/24"]},
    }
)
ANY6 = ipaddress.IPv6Address("2001:db8:a::53")
ANY4 = ipaddress.IPv4Address("192.0.2.53")


def ip6(n: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"2001:db8:f001::{n:x}")


def ip4(n: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(f"10.1.0.{n}")


def alloc(n: int, *, anycast: Sequence[IPAddress] = (ANY6, ANY4), **kw: object) -> Allocation:
    base = Allocation(
        key=AttachmentKey(f"c{n}", "eth0"),
        namespace="dns",
        pod=f"p{n}",
        pod_uid=f"u{n}",
        host_ifname=f"flk{n:011d}",
        v6=ip6(n),
        v4=ip4(n),
        anycast=tuple(anycast),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def pod(n: int, *, ready: bool = True, terminating: bool = False, uid: str | None = None) -> Pod:
    return Pod(
        namespace="dns",
        name=f"p{n}",
        uid=f"u{n}" if uid is None else uid,
        ready=ready,
        terminating=terminating,
    )


def pods(*ps: Pod) -> dict[PodKey, Pod]:
    return {p.key: p for p in ps}


def hops(d: Desired, ip: IPAddress) -> set[IPAddress]:
    return {h.via for h in d.anycast_routes.get(ip, frozenset())}


def host(ip: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def test_replicas_share_one_route_until_the_last_goes() -> None:
    allocs = [alloc(1), alloc(2), alloc(3)]
    # Each step: readiness of p1..p3 -> expected v6 next hops.
    steps: list[tuple[dict[PodKey, Pod], set[int]]] = [
        (pods(pod(1), pod(2), pod(3, ready=False)), {1, 2}),  # p3 not Ready at ADD: withdrawn
        (pods(pod(1, ready=False), pod(2), pod(3, ready=False)), {2}),
        (pods(pod(1, ready=False), pod(2), pod(3)), {2, 3}),
        (pods(pod(1, ready=False), pod(2, terminating=True), pod(3)), {3}),  # terminating
        (pods(pod(1, ready=False), pod(3)), {3}),  # p2 deleted from the datastore
        (pods(pod(1, ready=False), pod(3, ready=False)), set()),
        (pods(pod(1), pod(3, ready=False)), {1}),
    ]
    for readiness, want in steps:
        d = compute_desired(allocs, readiness, NODE)
        assert hops(d, ANY6) == {ip6(n) for n in want}
        assert hops(d, ANY4) == {ip4(n) for n in want}
        if want:
            assert d.exports == {host(ANY6), host(ANY4)}
            assert all(len(h) >= 1 for h in d.anycast_routes.values())
        else:
            assert d.anycast_routes == {} and d.exports == frozenset()


def test_next_hop_is_the_pods_unicast_of_the_same_family_out_its_veth() -> None:
    d = compute_desired([alloc(7)], pods(pod(7)), NODE)
    assert d.anycast_routes[ANY6] == {Nexthop(ip6(7), "flk00000000007")}
    assert d.anycast_routes[ANY4] == {Nexthop(ip4(7), "flk00000000007")}


def test_a_new_incarnation_of_the_pod_is_not_the_allocation_s_pod() -> None:
    d = compute_desired([alloc(1)], pods(pod(1, uid="someone-else")), NODE)
    assert d.anycast_routes == {}
    # No uid recorded on either side: names decide.
    d = compute_desired([alloc(1, pod_uid="")], pods(pod(1, uid="x")), NODE)
    assert hops(d, ANY6) == {ip6(1)}


def test_outside_aggregate_addresses_are_exported_whatever_the_readiness() -> None:
    pub6 = ipaddress.IPv6Address("2001:db8:c::166")
    pub4 = ipaddress.IPv4Address("203.0.113.166")
    extra = ipaddress.IPv6Address("2001:db8:c::167")
    a = alloc(
        1,
        anycast=(),
        v6=pub6,
        v4=pub4,
        v6_supplied=True,
        v4_supplied=True,
        extra_addresses=(extra, ip6(9)),
    )
    for ready in (True, False):
        d = compute_desired([a, alloc(2, anycast=())], pods(pod(1, ready=ready)), NODE)
        assert d.exports == {host(pub6), host(pub4), host(extra)}
        assert d.anycast_routes == {}


def test_without_nodeconfig_nothing_counts_as_aggregated() -> None:
    d = compute_desired([alloc(1, anycast=())], {}, None)
    assert d.exports == {host(ip6(1)), host(ip4(1))}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_property_only_active_replicas_are_routed(
    rows: list[tuple[bool, bool, bool, bool]],
) -> None:
    """For any mix: routed next hops == exactly the allocations whose pod is Ready,
    not terminating and present; the route exists iff some replica is active."""
    allocs = []
    ps = []
    for n, (present, ready, terminating, has_anycast) in enumerate(rows, start=1):
        allocs.append(alloc(n, anycast=(ANY6,) if has_anycast else ()))
        if present:
            ps.append(pod(n, ready=ready, terminating=terminating))
    d = compute_desired(allocs, pods(*ps), NODE)
    active = {
        n
        for n, (present, ready, terminating, has_anycast) in enumerate(rows, start=1)
        if present and ready and not terminating and has_anycast
    }
    assert hops(d, ANY6) == {ip6(n) for n in active}
    assert (ANY6 in d.anycast_routes) == bool(active)
    assert (host(ANY6) in d.exports) == bool(active)
    assert ANY4 not in d.anycast_routes


# ---- the loop -------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.anycast: list[Mapping[IPAddress, frozenset[Nexthop]]] = []
        self.exports: list[frozenset[IPNetwork]] = []
        self.policy = 0
        self.fail_policy = False
        self.fail_exports = 0

    async def apply_anycast(
        self, routes: Mapping[IPAddress, frozenset[Nexthop]], *, full: bool = False
    ) -> None:
        self.anycast.append(routes)

    async def apply_exports(
        self, node: NodeConfig, exports: frozenset[IPNetwork], *, full: bool = False
    ) -> None:
        if self.fail_exports:
            self.fail_exports -= 1
            raise ConnectionError("BIRD is down")
        self.exports.append(exports)

    async def apply_policy(self, snapshot: Snapshot, allocations: Sequence[Allocation]) -> None:
        self.policy += 1
        if self.fail_policy:
            raise RuntimeError("nft refused")


# How long a pass may take before the test gives up: a deadline for a loaded machine,
# not an expectation (a pass of these fakes takes microseconds).
SYNC_DEADLINE = 60.0


def _loop(state: dict[str, object], rec: Recorder) -> Reconciler:
    r = Reconciler(
        snapshot=lambda: Snapshot(node_name="n1", node_config=NODE, pods=state["pods"]),  # type: ignore[arg-type]
        index=AllocationIndex(state["allocs"]),  # type: ignore[arg-type]
        full_resync_interval=3600,
        retry_interval=0.01,
    )
    r.set_appliers(anycast=rec, exports=rec, policy=rec)
    return r


def test_loop_applies_only_what_changed_and_coalesces_bursts() -> None:
    async def body() -> None:
        state: dict[str, object] = {"pods": pods(pod(1)), "allocs": [alloc(1)]}
        rec = Recorder()
        r = _loop(state, rec)
        task = asyncio.create_task(r.run())
        try:
            out = await r.sync(timeout=SYNC_DEADLINE)
            assert out.ok
            assert len(rec.anycast) == 1 and len(rec.exports) == 1
            # An unrelated change (a plain pod): anycast and BIRD untouched, policy synced.
            r.index.put(alloc(2, anycast=()))
            await r.sync(timeout=SYNC_DEADLINE)
            assert len(rec.anycast) == 1 and len(rec.exports) == 1
            assert rec.policy == 2
            # A burst of 50 marks is served by few passes, and the last state wins.
            state["pods"] = pods(pod(1, ready=False))
            for _ in range(50):
                r.mark_dirty()
            await r.sync(timeout=SYNC_DEADLINE)
            assert r.stats.passes <= 5
            assert rec.anycast[-1] == {}
            assert rec.exports[-1] == frozenset()
        finally:
            task.cancel()

    asyncio.run(body())


def test_loop_reports_policy_failure_and_retries_bird() -> None:
    async def body() -> None:
        state: dict[str, object] = {"pods": pods(pod(1)), "allocs": [alloc(1)]}
        rec = Recorder()
        rec.fail_exports = 2
        r = _loop(state, rec)
        task = asyncio.create_task(r.run())
        try:
            out = await r.sync(timeout=SYNC_DEADLINE)
            assert not out.ok and out.policy_ok and "BIRD is down" in out.error
            # Retried on its own until BIRD answers.
            await wait_until_async(
                lambda: list(rec.exports), timeout=SYNC_DEADLINE, what="exports retried"
            )
            assert rec.exports == [frozenset({host(ANY6), host(ANY4)})]
            rec.fail_policy = True
            out = await r.sync(timeout=SYNC_DEADLINE)
            assert not out.policy_ok and "nft refused" in out.error
        finally:
            task.cancel()

    asyncio.run(body())


NODE_WIDE = NodeConfig.from_object(
    {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "n1"},
        "spec": {"cidr6": ["2001:db8:f001::/112"], "cidr4": ["10.1.0.0/28"]},
    }
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "remove", "node"]),
            st.integers(1, 30),
            st.booleans(),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_property_index_equals_full_computation(
    ops: list[tuple[str, int, bool, bool]],
) -> None:
    """The incremental index gives exactly what compute_desired gives over all allocations,
    whatever the sequence of puts, removes and NodeConfig changes (addresses 17..30 fall
    outside the narrow NodeConfig's ranges, so outside-aggregate export is exercised)."""
    index = AllocationIndex()
    live: dict[int, Allocation] = {}
    node: NodeConfig | None = NODE
    index.set_node(node)
    ready = pods(*[pod(n, ready=n % 3 != 0) for n in range(1, 31)])
    for op, n, flag, anycast in ops:
        if op == "put":
            a = alloc(n, anycast=(ANY6,) if anycast else ())
            if flag:
                a = replace(a, extra_addresses=(ipaddress.IPv6Address(f"2001:db8:c::{n:x}"),))
            live[n] = a
            index.put(a)
        elif op == "remove":
            live.pop(n, None)
            index.remove(AttachmentKey(f"c{n}", "eth0"))
        else:
            node = NODE_WIDE if flag else (NODE if anycast else None)
            index.set_node(node)
        got = index.desired(ready)
        want = compute_desired(live.values(), ready, node)
        assert got == want
        assert sorted(index.all(), key=lambda a: a.key) == sorted(
            live.values(), key=lambda a: a.key
        )


def test_a_crashing_pass_releases_its_waiters_and_the_loop_goes_on() -> None:
    async def body() -> None:
        calls = {"n": 0}

        def snapshot() -> Snapshot:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyError("bug")
            return Snapshot(node_name="n1", node_config=NODE, pods=pods(pod(1)))

        rec = Recorder()
        r = Reconciler(snapshot=snapshot, index=AllocationIndex([alloc(1)]), retry_interval=0.01)
        r.set_appliers(anycast=rec)
        task = asyncio.create_task(r.run())
        try:
            first = await r.sync(timeout=SYNC_DEADLINE)
            assert first.ok
            crashed = await r.sync(timeout=SYNC_DEADLINE)
            assert not crashed.ok and "bug" in crashed.error
            again = await r.sync(timeout=SYNC_DEADLINE)
            assert again.ok
        finally:
            task.cancel()

    asyncio.run(body())
