"""IPAM rules: v6 random never subnet-router anycast, v4 lowest free, supplied primaries, GC."""

from __future__ import annotations

import ipaddress
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from flock.apply.store import AllocationStore
from flock.compile.embed import field_value
from flock.compile.ipam import AddressConflictError, Ipam, IpamError, RangeExhaustedError
from flock.model.allocation import Allocation, AttachmentKey
from flock.model.request import (
    EmbedField,
    FamilyRequest,
    IPAddress,
    IPNetwork,
    PodIdentity,
    PodRequest,
)

V6 = ipaddress.IPv6Network("2001:db8:f001::/64")
V4 = ipaddress.IPv4Network("192.0.2.0/24")
ip = ipaddress.ip_address


def req(
    v6: tuple[IPNetwork, ...] | None = (V6,),
    v4: tuple[IPNetwork, ...] | None = (V4,),
    *,
    p6: str | None = None,
    p4: str | None = None,
    extra: tuple[str, ...] = (),
    anycast: tuple[str, ...] = (),
    embed: tuple[EmbedField, ...] = (),
) -> PodRequest:
    return PodRequest(
        v6=FamilyRequest(want=v6 is not None, ranges=v6 or (), primary=ip(p6) if p6 else None),
        v4=FamilyRequest(want=v4 is not None, ranges=v4 or (), primary=ip(p4) if p4 else None),
        embed=embed,
        extra_addresses=tuple(ip(x) for x in extra),
        anycast=tuple(ip(x) for x in anycast),
    )


def key(i: int | str, ifname: str = "eth0") -> AttachmentKey:
    return AttachmentKey(container_id=f"c{i}", ifname=ifname)


def alloc(ipam: Ipam, i: int | str, r: PodRequest, seed: int = 0) -> Allocation:
    return ipam.allocate(key(i), r, namespace="ns", pod=f"p{i}", rng=random.Random(seed))


# ---- IPv4 --------------------------------------------------------------------------


def test_v4_lowest_free_skips_network_address() -> None:
    ipam = Ipam()
    got = [alloc(ipam, i, req(v6=None)).v4 for i in range(3)]
    assert got == [ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")]


def test_v4_released_address_is_reused_lowest_first() -> None:
    ipam = Ipam()
    for i in range(5):
        alloc(ipam, i, req(v6=None))
    ipam.release(key(3))
    ipam.release(key(1))
    assert alloc(ipam, "a", req(v6=None)).v4 == ip("192.0.2.2")
    assert alloc(ipam, "b", req(v6=None)).v4 == ip("192.0.2.4")
    assert alloc(ipam, "c", req(v6=None)).v4 == ip("192.0.2.6")


def test_v4_never_broadcast_and_exhaustion_names_range() -> None:
    n = ipaddress.IPv4Network("192.0.2.0/29")
    ipam = Ipam()
    got = {alloc(ipam, i, req(v6=None, v4=(n,))).v4 for i in range(6)}
    assert got == {ip(f"192.0.2.{i}") for i in range(1, 7)}
    with pytest.raises(RangeExhaustedError, match=r"192\.0\.2\.0/29"):
        alloc(ipam, 99, req(v6=None, v4=(n,)))


@pytest.mark.parametrize(("prefix", "want"), [("/31", 2), ("/32", 1), ("/30", 2)])
def test_v4_small_sub_ranges(prefix: str, want: int) -> None:
    n = ipaddress.IPv4Network("192.0.2.8" + prefix)
    ipam = Ipam()
    got = [alloc(ipam, i, req(v6=None, v4=(n,))).v4 for i in range(want)]
    assert all(a in n for a in got) and len(set(got)) == want
    with pytest.raises(RangeExhaustedError):
        alloc(ipam, 99, req(v6=None, v4=(n,)))


def test_v4_falls_through_to_next_range() -> None:
    a, b = ipaddress.IPv4Network("192.0.2.0/30"), ipaddress.IPv4Network("198.51.100.0/24")
    ipam = Ipam()
    got = [alloc(ipam, i, req(v6=None, v4=(a, b))).v4 for i in range(3)]
    assert got == [ip("192.0.2.1"), ip("192.0.2.2"), ip("198.51.100.1")]


def test_v4_sub_range_and_node_range_share_holders() -> None:
    sub = ipaddress.IPv4Network("192.0.2.0/28")
    ipam = Ipam()
    assert alloc(ipam, 1, req(v6=None, v4=(sub,))).v4 == ip("192.0.2.1")
    assert alloc(ipam, 2, req(v6=None)).v4 == ip("192.0.2.2")
    ipam.release(key(1))
    assert alloc(ipam, 3, req(v6=None)).v4 == ip("192.0.2.1")
    assert alloc(ipam, 4, req(v6=None, v4=(sub,))).v4 == ip("192.0.2.3")


# ---- IPv6 --------------------------------------------------------------------------


def test_v6_random_in_range_and_seeded() -> None:
    a = alloc(Ipam(), 1, req(v4=None), seed=5).v6
    b = alloc(Ipam(), 1, req(v4=None), seed=5).v6
    assert a is not None and a in V6 and a == b


def test_v6_never_subnet_router_anycast() -> None:
    n = ipaddress.IPv6Network("2001:db8::/126")
    ipam = Ipam()
    got = {alloc(ipam, i, req(v4=None, v6=(n,)), seed=i).v6 for i in range(3)}
    assert got == {ip("2001:db8::1"), ip("2001:db8::2"), ip("2001:db8::3")}
    with pytest.raises(RangeExhaustedError, match=r"2001:db8::/126"):
        alloc(ipam, 9, req(v4=None, v6=(n,)))


def test_v6_single_address_range_is_exhausted_from_the_start() -> None:
    with pytest.raises(RangeExhaustedError, match=r"2001:db8::/128"):
        alloc(Ipam(), 1, req(v4=None, v6=(ipaddress.IPv6Network("2001:db8::/128"),)))


def test_v6_collision_redraws() -> None:
    # same seed twice: the second draw collides with the first and must redraw
    ipam = Ipam()
    a = alloc(ipam, 1, req(v4=None), seed=11).v6
    b = alloc(ipam, 2, req(v4=None), seed=11).v6
    assert a != b and b in V6


def test_v6_embedded_fields() -> None:
    ipam = Ipam()
    a = ipam.allocate(
        key(1),
        req(v4=None, embed=("namespace", "pod")),
        namespace="dns",
        pod="coredns-1",
        identity=PodIdentity(namespace="dns", pod="coredns-1"),
        rng=random.Random(0),
    ).v6
    assert a is not None and a in V6
    assert (int(a) >> 48) & 0xFFFF == field_value("dns")
    assert (int(a) >> 32) & 0xFFFF == field_value("coredns-1")


def test_v6_embedded_small_range_exhausts_random_space() -> None:
    n = ipaddress.IPv6Network("2001:db8::/96")  # 16 field bits + 16 random bits
    ipam = Ipam()
    ident = PodIdentity(namespace="a", pod="b")
    r = req(v4=None, v6=(n,), embed=("namespace",))
    seen = set()
    for i in range(200):
        a = ipam.allocate(key(i), r, namespace="a", pod="b", identity=ident, rng=random.Random(1))
        seen.add(a.v6)
    assert len(seen) == 200


def test_v6_embedding_that_cannot_fit_is_an_ipam_error() -> None:
    n = ipaddress.IPv6Network("2001:db8::/112")
    with pytest.raises(IpamError, match="random bits"):
        alloc(Ipam(), 1, req(v4=None, v6=(n,), embed=("pod",)))


# ---- keys, idempotency, release, GC ------------------------------------------------


def test_repeated_add_returns_same_allocation() -> None:
    ipam = Ipam()
    a = alloc(ipam, 1, req(), seed=1)
    b = alloc(ipam, 1, req(), seed=2)
    assert a == b and len(ipam) == 1


def test_key_is_container_and_ifname() -> None:
    ipam = Ipam()
    a = ipam.allocate(key(1, "eth0"), req(v6=None), namespace="ns", pod="p")
    b = ipam.allocate(key(1, "net1"), req(v6=None), namespace="ns", pod="p")
    assert a.v4 != b.v4


def test_pod_identity_stored_beside_key() -> None:
    a = Ipam().allocate(
        key(1),
        req(),
        namespace="ns",
        pod="p",
        pod_uid="u-1",
        netns="/run/netns/x",
        host_ifname="fl1",
    )
    assert (a.namespace, a.pod, a.pod_uid, a.netns, a.host_ifname) == (
        "ns",
        "p",
        "u-1",
        "/run/netns/x",
        "fl1",
    )


def test_release_returns_allocation_and_unknown_is_noop() -> None:
    ipam = Ipam()
    a = alloc(ipam, 1, req())
    assert ipam.release(key(1)) == a
    assert ipam.release(key(1)) is None
    assert ipam.release(key("never")) is None
    assert ipam.get(key(1)) is None and ipam.holder(a.v4) is None  # type: ignore[arg-type]


def test_gc_releases_everything_not_live() -> None:
    ipam = Ipam()
    for i in range(5):
        alloc(ipam, i, req())
    gone = ipam.gc([key(1), key(3), key("unknown")])
    assert sorted(a.key for a in gone) == [key(0), key(2), key(4)]
    assert sorted(a.key for a in ipam.all()) == [key(1), key(3)]
    assert ipam.gc({key(1), key(3)}) == []


# ---- supplied addresses -------------------------------------------------------------


def test_supplied_primaries_recorded_not_from_pool() -> None:
    ipam = Ipam()
    a = alloc(ipam, 1, req(p6="2001:db8:a::5", p4="198.51.100.5"))
    assert (a.v6, a.v4) == (ip("2001:db8:a::5"), ip("198.51.100.5"))
    assert a.v6_supplied and a.v4_supplied
    assert ipam.holder(ip("198.51.100.5")) == key(1)
    # the pool was not consulted
    assert alloc(ipam, 2, req(v6=None)).v4 == ip("192.0.2.1")


def test_supplied_one_family_pool_for_other() -> None:
    a = alloc(Ipam(), 1, req(p4="198.51.100.5"))
    assert a.v4_supplied and not a.v6_supplied and a.v6 in V6


def test_supplied_address_inside_pool_is_skipped_by_pool() -> None:
    ipam = Ipam()
    alloc(ipam, 1, req(v6=None, p4="192.0.2.1"))
    assert alloc(ipam, 2, req(v6=None)).v4 == ip("192.0.2.2")
    ipam.release(key(1))
    assert alloc(ipam, 3, req(v6=None)).v4 == ip("192.0.2.1")


def test_extra_address_inside_pool_not_given_to_the_same_pod() -> None:
    ipam = Ipam()
    a = alloc(ipam, 1, req(v6=None, extra=("192.0.2.1",)))
    assert a.v4 == ip("192.0.2.2") and a.extra_addresses == (ip("192.0.2.1"),)
    assert alloc(ipam, 2, req(v6=None)).v4 == ip("192.0.2.3")


@pytest.mark.parametrize(
    "second",
    [
        req(p4="198.51.100.5"),
        req(p6="2001:db8:a::5"),
        req(extra=("198.51.100.5",)),
        req(p4="198.51.100.6", extra=("2001:db8:a::5",)),
    ],
)
def test_supplied_collision_is_an_error_and_leaks_nothing(second: PodRequest) -> None:
    ipam = Ipam()
    alloc(ipam, 1, req(p6="2001:db8:a::5", p4="198.51.100.5"))
    before = alloc(ipam, "probe", req(v6=None)).v4
    ipam.release(key("probe"))
    with pytest.raises(AddressConflictError, match="already held by container c1"):
        alloc(ipam, 2, second)
    assert ipam.get(key(2)) is None
    # the failed ADD did not consume the lowest free v4
    assert alloc(ipam, "probe2", req(v6=None)).v4 == before


def test_supplied_collision_with_pool_address() -> None:
    ipam = Ipam()
    a = alloc(ipam, 1, req(v6=None))
    with pytest.raises(AddressConflictError, match=str(a.v4)):
        alloc(ipam, 2, req(v6=None, p4=str(a.v4)))


def test_anycast_shared_by_replicas_but_not_with_eth0() -> None:
    ipam = Ipam()
    alloc(ipam, 1, req(anycast=("2001:db8:a::53", "198.51.100.53")))
    alloc(ipam, 2, req(anycast=("2001:db8:a::53", "198.51.100.53")))
    with pytest.raises(AddressConflictError, match="anycast"):
        alloc(ipam, 3, req(p4="198.51.100.53"))
    alloc(ipam, 4, req(p4="198.51.100.4"))
    with pytest.raises(AddressConflictError, match="eth0 address"):
        alloc(ipam, 5, req(anycast=("198.51.100.4",)))
    ipam.release(key(1))
    ipam.release(key(2))
    alloc(ipam, 6, req(p4="198.51.100.53"))


def test_pool_skips_anycast_inside_range() -> None:
    ipam = Ipam()
    alloc(ipam, 1, req(v6=None, anycast=("192.0.2.1",)))
    assert ipam.get(key(1)).v4 == ip("192.0.2.2")  # type: ignore[union-attr]


def test_release_frees_supplied_and_extras() -> None:
    ipam = Ipam()
    alloc(ipam, 1, req(p4="198.51.100.5", extra=("198.51.100.6", "2001:db8:a::6")))
    ipam.release(key(1))
    for x in ("198.51.100.5", "198.51.100.6", "2001:db8:a::6"):
        assert not ipam.in_use(ip(x))
    alloc(ipam, 2, req(p4="198.51.100.6"))


def test_loading_duplicate_addresses_is_an_error() -> None:
    a = Allocation(key=key(1), namespace="n", pod="p", v4=ipaddress.IPv4Address("192.0.2.1"))
    b = Allocation(key=key(2), namespace="n", pod="q", v4=ipaddress.IPv4Address("192.0.2.1"))
    with pytest.raises(AddressConflictError, match=r"192\.0\.2\.1"):
        Ipam([a, b])
    with pytest.raises(AddressConflictError, match="twice"):
        Ipam([a, a])


def test_loaded_state_is_respected_by_the_pool() -> None:
    ipam = Ipam()
    for i in range(10):
        alloc(ipam, i, req(v6=None))
    ipam.release(key(4))
    reloaded = Ipam(ipam.all())
    assert alloc(reloaded, "x", req(v6=None)).v4 == ip("192.0.2.5")
    assert alloc(reloaded, "y", req(v6=None)).v4 == ip("192.0.2.11")


# ---- property: random interleavings ------------------------------------------------

SMALL4 = ipaddress.IPv4Network("192.0.2.0/28")  # 14 usable: exhaustion happens
SUB4 = ipaddress.IPv4Network("192.0.2.0/30")
SMALL6 = ipaddress.IPv6Network("2001:db8::/124")  # 15 usable
SUPPLIED: list[IPAddress] = [
    ip("192.0.2.3"),
    ip("192.0.2.9"),
    ip("198.51.100.1"),
    ip("2001:db8::5"),
    ip("2001:db8:a::1"),
]


class IpamMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ipam = Ipam()
        self.dir = Path(tempfile.mkdtemp(prefix="fc-ipam-"))
        self.store = AllocationStore(self.dir, compact_every=7)
        self.store.load()
        self.n = 0

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        want6=st.booleans(),
        want4=st.booleans(),
        sub=st.booleans(),
        p=st.lists(st.sampled_from(SUPPLIED), max_size=2, unique=True),
        any_=st.lists(st.sampled_from(SUPPLIED), max_size=2, unique=True),
        seed=st.integers(0, 3),
    )
    def allocate(
        self,
        want6: bool,
        want4: bool,
        sub: bool,
        p: list[IPAddress],
        any_: list[IPAddress],
        seed: int,
    ) -> None:
        if not (want6 or want4):
            want6 = True
        p6 = next((str(a) for a in p if a.version == 6), None) if want6 else None
        p4 = next((str(a) for a in p if a.version == 4), None) if want4 else None
        wanted = {6: want6, 4: want4}
        anycast = [a for a in any_ if a not in p and wanted[a.version]]
        r = req(
            v6=(SMALL6,) if want6 else None,
            v4=((SUB4,) if sub else (SMALL4,)) if want4 else None,
            p6=p6,
            p4=p4,
            anycast=tuple(str(a) for a in anycast),
        )
        self.n += 1
        k = key(self.n)
        before = self.lowest_free(SUB4 if sub else SMALL4)
        try:
            a = self.ipam.allocate(k, r, namespace="ns", pod="p", rng=random.Random(seed))
        except IpamError as e:
            event(type(e).__name__)
            return
        self.store.record_put(a)
        if want4 and p4 is None:
            event("v4 from pool")
            assert a.v4 == before

    def lowest_free(self, n: ipaddress.IPv4Network) -> IPAddress | None:
        for h in n.hosts():
            if not self.ipam.in_use(h):
                return h
        return None

    @precondition(lambda self: len(self.ipam) > 0)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        k = data.draw(st.sampled_from(sorted(a.key for a in self.ipam.all())))
        assert self.ipam.release(k) is not None
        self.store.record_delete(k)

    @rule(data=st.data())
    def gc(self, data: st.DataObject) -> None:
        keys = sorted(a.key for a in self.ipam.all())
        live = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
        gone = self.ipam.gc(live)
        self.store.record(delete=[a.key for a in gone])
        assert {a.key for a in self.ipam.all()} == set(live)

    @rule()
    def reload(self) -> None:
        self.store.close()
        self.store = AllocationStore(self.dir, compact_every=7)
        loaded = self.store.load()
        assert sorted(loaded, key=lambda a: a.key) == sorted(self.ipam.all(), key=lambda a: a.key)
        self.ipam = Ipam(loaded)

    @invariant()
    def no_collisions_and_in_range(self) -> None:
        seen: set[IPAddress] = set()
        anycast: set[IPAddress] = set()
        for a in self.ipam.all():
            for x in a.all_addresses:
                assert x not in seen
                seen.add(x)
            anycast.update(a.anycast)
            if a.v6 is not None and not a.v6_supplied:
                assert a.v6 in SMALL6 and a.v6 != SMALL6.network_address
            if a.v4 is not None and not a.v4_supplied:
                assert a.v4 in SMALL4
                assert a.v4 not in (SMALL4.network_address, SMALL4.broadcast_address)
        assert not (seen & anycast)


IpamMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestIpamProperties = IpamMachine.TestCase
