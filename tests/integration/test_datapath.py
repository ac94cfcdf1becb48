"""The pod datapath against a real kernel: veths, addresses, routes, anycast, teardown.

Every test builds a node namespace and pod namespaces (conftest), programs them
through `flock.apply.datapath.Datapath` and then looks at the kernel with
iproute2 and real traffic (ping), never with the code under test alone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from flock.apply.datapath import (
    RTPROT_FLOCK,
    Datapath,
    DatapathError,
    PodNetSpec,
    host_veth_name,
)
from flock.testbed import netns

if TYPE_CHECKING:
    from conftest import Node

pytestmark = pytest.mark.root

ip = ipaddress.ip_address
V6 = [ip(f"2001:db8:f001::{i:x}") for i in range(1, 40)]
V4 = [ip(f"192.0.2.{i}") for i in range(1, 40)]


@pytest.fixture
def dp(node: Node) -> Iterator[Datapath]:
    d = Datapath(host_netns=node.path, reap_delay=0.01)
    try:
        yield d
    finally:
        d.close()


def name_of(path: str) -> str:
    return os.path.basename(path)


def sh(ns: str, *args: str) -> str:
    return netns.run(list(args), netns=ns).stdout


def js(ns: str, *args: str) -> Any:
    return json.loads(netns.run(["ip", "-j", *args], netns=ns).stdout or "[]")


def ping(ns: str, target: object, *, within: int = 10) -> bool:
    """One echo request, no retry: the first packet has to make it. `within` seconds to
    answer is a deadline (a loaded machine answered a 1 s one too late), not a bound."""
    res = netns.run(["ping", "-c1", f"-W{within}", str(target)], netns=ns, check=False)
    return res.returncode == 0


def spec(
    cid: str, path: str, *, v6: int | None = None, v4: int | None = None, **kw: Any
) -> PodNetSpec:
    return PodNetSpec(
        container_id=cid,
        netns=path,
        v6=V6[v6] if v6 is not None else None,  # type: ignore[arg-type]
        v4=V4[v4] if v4 is not None else None,  # type: ignore[arg-type]
        **kw,
    )


def our_routes(node: Node) -> list[str]:
    out = []
    for fam in ("-4", "-6"):
        out += sh(node.name, "ip", fam, "route", "show", "proto", str(RTPROT_FLOCK)).splitlines()
    return [line for line in out if not line.startswith("\t")]


def flk_links(node: Node) -> list[str]:
    return [ln["ifname"] for ln in js(node.name, "link", "show") if ln["ifname"].startswith("flk")]


def assert_no_tentative(ns: str, *dev: str) -> None:
    for link in js(ns, "addr", "show", *(("dev", *dev) if dev else ())):
        for a in link.get("addr_info", []):
            assert not a.get("tentative"), f"{a['local']} on {link['ifname']} is tentative"
            assert not a.get("dadfailed"), f"{a['local']} on {link['ifname']} failed DAD"


# -- layout -----------------------------------------------------------------------


def test_dual_stack_layout_and_first_ping(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p1, p2 = pod_netns(), pod_netns()
    s1, s2 = spec("c-one", p1, v6=0, v4=0), spec("c-two", p2, v6=1, v4=1)
    r1 = dp.setup_pod(s1)
    dp.setup_pod(s2)
    a = name_of(p1)
    # The very first packet of each kind makes it (ping -c1), with no settling time.
    assert ping(a, V6[1]) and ping(a, V4[1]), "pod -> pod on one node"
    assert ping(a, node.v6) and ping(a, node.v4), "pod -> node"
    assert ping(node.name, V6[1]) and ping(node.name, V4[1]), "node -> pod"
    assert dp.check_pod(s1) == [] and dp.check_pod(s2) == []

    # Pod side: exactly /128 and /32 on eth0, defaults via the fixed gateways.
    eth0 = js(a, "addr", "show", "dev", "eth0")[0]
    got = {(x["local"], x["prefixlen"]) for x in eth0["addr_info"]}
    assert got == {(str(V6[0]), 128), (str(V4[0]), 32)}
    assert_no_tentative(a)
    r6 = js(a, "-6", "route", "show", "default")
    r4 = js(a, "-4", "route", "show", "default")
    assert r6[0]["gateway"] == "fe80::1" and r6[0]["dev"] == "eth0"
    assert r4[0]["gateway"] == "169.254.1.1" and "onlink" in r4[0]["flags"]
    neigh = {(n["dst"], n["lladdr"], tuple(n["state"])) for n in js(a, "neigh", "show")}
    assert ("fe80::1", r1.host_mac, ("PERMANENT",)) in neigh
    assert ("169.254.1.1", r1.host_mac, ("PERMANENT",)) in neigh

    # Host side: addrgenmode none, only fe80::1/64, proxy ARP, host routes with our proto.
    veth = s1.host_ifname
    assert veth == host_veth_name("c-one") and veth.startswith("flk") and len(veth) <= 15
    detail = js(node.name, "-d", "link", "show", "dev", veth)[0]
    assert detail["inet6_addr_gen_mode"] == "none"
    assert detail["address"] == r1.host_mac
    haddr = js(node.name, "addr", "show", "dev", veth)[0]["addr_info"]
    assert [(x["local"], x["prefixlen"]) for x in haddr] == [("fe80::1", 64)]
    assert_no_tentative(node.name, veth)
    assert sh(node.name, "cat", f"/proc/sys/net/ipv4/conf/{veth}/proxy_arp").strip() == "1"
    assert sh(node.name, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    assert sh(node.name, "cat", "/proc/sys/net/ipv6/conf/all/forwarding").strip() == "1"
    for fam, addr in (("-6", V6[0]), ("-4", V4[0])):
        routes = js(node.name, fam, "route", "show", "to", str(addr), "proto", str(RTPROT_FLOCK))
        assert [r["dev"] for r in routes] == [veth], f"host route for {addr}"

    # The CNI result carries both interfaces, both addresses and the gateways.
    res = r1.to_cni()
    assert res["interfaces"][1] == {"name": "eth0", "mac": r1.pod_mac, "mtu": 1500, "sandbox": p1}
    assert res["ips"] == [
        {"address": f"{V6[0]}/128", "gateway": "fe80::1", "interface": 1},
        {"address": f"{V4[0]}/32", "gateway": "169.254.1.1", "interface": 1},
    ]


def test_proxy_arp_answers_for_the_v4_gateway(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    """With the pre-installed neighbour entries gone, ARP/NDP still resolve the gateways."""
    p = pod_netns()
    dp.setup_pod(spec("c-arp", p, v6=2, v4=2))
    n = name_of(p)
    sh(n, "ip", "neigh", "flush", "dev", "eth0", "nud", "permanent")
    assert js(n, "neigh", "show", "nud", "permanent") == []
    assert ping(n, node.v4) and ping(n, node.v6)
    learned = {x["dst"] for x in js(n, "neigh", "show")}
    assert {"169.254.1.1", "fe80::1"} <= learned


@pytest.mark.parametrize("family", [6, 4])
def test_single_stack(family: int, dp: Datapath, node: Node, pod_netns: Callable[[], str]) -> None:
    p = pod_netns()
    s = spec(f"c-single{family}", p, v6=3 if family == 6 else None, v4=3 if family == 4 else None)
    dp.setup_pod(s)
    n = name_of(p)
    assert dp.check_pod(s) == []
    mine, other = (V6[3], node.v6) if family == 6 else (V4[3], node.v4)
    assert ping(n, other) and ping(node.name, mine)
    # Nothing of the other family: no address on eth0, no default route.
    addrs = js(n, "addr", "show", "dev", "eth0")[0]["addr_info"]
    assert {a["family"] for a in addrs} == {"inet6" if family == 6 else "inet"}
    other_fam = "-4" if family == 6 else "-6"
    assert js(n, other_fam, "route", "show", "default") == []
    assert len(our_routes(node)) == 1


def test_mtu_option(dp: Datapath, node: Node, pod_netns: Callable[[], str]) -> None:
    p = pod_netns()
    s = spec("c-mtu", p, v6=4, v4=4, mtu=1400)
    res = dp.setup_pod(s)
    assert res.mtu == 1400
    assert js(name_of(p), "link", "show", "dev", "eth0")[0]["mtu"] == 1400
    assert js(node.name, "link", "show", "dev", s.host_ifname)[0]["mtu"] == 1400


def test_extra_addresses(dp: Datapath, node: Node, pod_netns: Callable[[], str]) -> None:
    p = pod_netns()
    extra = (ip("2001:db8:beef::7"), ip("203.0.113.7"), ip("2001:db8:beef::8"))
    s = spec("c-extra", p, v6=5, v4=5, extra_addresses=extra)
    res = dp.setup_pod(s)
    n = name_of(p)
    assert dp.check_pod(s) == []
    got = {x["local"] for x in js(n, "addr", "show", "dev", "eth0")[0]["addr_info"]}
    assert got == {str(V6[5]), str(V4[5]), *map(str, extra)}
    assert_no_tentative(n)
    for addr in extra:
        assert ping(node.name, addr), f"node -> extra {addr}"
    # The primary stays the source of the pod's traffic and the first result entries.
    assert [x["address"] for x in res.to_cni()["ips"]][:2] == [f"{V6[5]}/128", f"{V4[5]}/32"]
    assert len(our_routes(node)) == 5


# -- anycast ----------------------------------------------------------------------


def test_anycast_single_and_multipath(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    any6, any4 = ip("2001:db8:aaaa::1"), ip("198.18.0.1")
    pa, pb = pod_netns(), pod_netns()
    sa = spec("c-any-a", pa, v6=6, v4=6, anycast=(any6, any4))
    sb = spec("c-any-b", pb, v6=7, v4=7, anycast=(any6, any4))
    dp.setup_pod(sa)
    dp.setup_pod(sb)
    lo = {x["local"] for x in js(name_of(pa), "addr", "show", "dev", "lo")[0]["addr_info"]}
    assert {str(any6), str(any4)} <= lo
    assert dp.check_pod(sa) == []

    # An unrelated route of another protocol must survive every reconcile.
    sh(node.name, "ip", "route", "add", "198.18.9.0/24", "dev", node.uplink, "proto", "static")

    # One replica: a plain route via the pod's unicast address.
    one = {any6: [(V6[6], sa.host_ifname)], any4: [(V4[6], sa.host_ifname)]}
    change = dp.reconcile_anycast(one)
    assert set(change.added) == {any6, any4}
    r = js(node.name, "route", "show", "to", str(any4), "proto", "70")[0]
    assert r["gateway"] == str(V4[6]) and r["dev"] == sa.host_ifname
    assert ping(node.name, any4) and ping(node.name, any6)
    assert dp.reconcile_anycast(one) == type(change)()  # converged: nothing to do

    # Two replicas: one multipath route per address.
    two = {
        any6: [(V6[6], sa.host_ifname), (V6[7], sb.host_ifname)],
        any4: [(V4[6], sa.host_ifname), (V4[7], sb.host_ifname)],
    }
    change = dp.reconcile_anycast(two)
    assert set(change.replaced) == {any6, any4}
    for fam, dst in (("-4", any4), ("-6", any6)):
        routes = js(node.name, fam, "route", "show", "to", str(dst), "proto", "70")
        assert len(routes) == 1, routes
        hops = {(h["gateway"], h["dev"]) for h in routes[0]["nexthops"]}
        want = {(str(g), d) for g, d in two[dst]}
        assert hops == want
    assert dp.list_anycast_routes() == {
        k: tuple(sorted(v, key=lambda h: (int(h[0]), h[1]))) for k, v in two.items()
    }
    assert ping(node.name, any4) and ping(node.name, any6)

    # Back to one, then none: ours go, the foreign route stays.
    dp.reconcile_anycast({any4: [(V4[7], sb.host_ifname)]})
    r = js(node.name, "route", "show", "to", str(any4), "proto", "70")
    assert [(x["gateway"], x["dev"]) for x in r] == [(str(V4[7]), sb.host_ifname)]
    assert js(node.name, "-6", "route", "show", "to", str(any6), "proto", "70") == []
    change = dp.reconcile_anycast({})
    assert change.removed == (any4,)
    assert dp.list_anycast_routes() == {}
    assert js(node.name, "route", "show", "198.18.9.0/24") != []


def test_teardown_of_one_replica_keeps_the_other_hop(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    """IPv4 drops a whole multipath route when one hop's device is deleted: teardown
    takes that hop out first, so the surviving replica keeps serving."""
    any6, any4 = ip("2001:db8:aaaa::2"), ip("198.18.0.2")
    pa, pb = pod_netns(), pod_netns()
    sa = spec("c-rep-a", pa, v6=8, v4=8, anycast=(any6, any4))
    sb = spec("c-rep-b", pb, v6=9, v4=9, anycast=(any6, any4))
    dp.setup_pod(sa)
    dp.setup_pod(sb)
    dp.reconcile_anycast(
        {
            any6: [(V6[8], sa.host_ifname), (V6[9], sb.host_ifname)],
            any4: [(V4[8], sa.host_ifname), (V4[9], sb.host_ifname)],
        }
    )
    assert dp.teardown_pod(container_id="c-rep-a", wait=True)
    assert dp.list_anycast_routes() == {
        any6: ((V6[9], sb.host_ifname),),
        any4: ((V4[9], sb.host_ifname),),
    }
    assert ping(node.name, any4) and ping(node.name, any6)
    # The last replica going takes the route with it.
    dp.teardown_pod(container_id="c-rep-b")
    assert dp.list_anycast_routes() == {}


# -- teardown, check, rollback ----------------------------------------------------


def test_teardown_is_complete_and_idempotent(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    s = spec("c-del", p, v6=10, v4=10, extra_addresses=(ip("203.0.113.10"),))
    dp.setup_pod(s)
    assert dp.teardown_pod(container_id="c-del") is True
    # At once: the pod is cut off and our routes are gone, whatever the reaper's pace.
    assert our_routes(node) == []
    assert not ping(node.name, V4[10], within=1)  # dropped (a late answer would fail it too)
    assert dp.list_host_veths() == []
    assert dp.teardown_pod(container_id="c-del") is False  # again: success, nothing to do
    dp.reap()
    assert flk_links(node) == []
    assert "eth0" not in {x["ifname"] for x in js(name_of(p), "link", "show")}
    assert dp.teardown_pod(container_id="c-del") is False
    assert dp.teardown_pod(container_id="never-seen") is False


def test_teardown_reaper_deletes_in_background(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    specs = [spec(f"c-bg{i}", pod_netns(), v6=11 + i, v4=11 + i) for i in range(3)]
    for s in specs:
        dp.setup_pod(s)
    for s in specs:
        dp.teardown_pod(container_id=s.container_id)
    retired = dp.list_host_veths(include_retired=True)
    assert all(not v.up for v in retired)
    dp.close()  # stops the reaper after its last batch
    assert flk_links(node) == []


def test_teardown_with_netns_already_gone(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    dp.setup_pod(spec("c-gone", p, v6=15, v4=15))
    netns.delete(name_of(p))
    # The kernel removes the pair with the namespace, asynchronously; either way DEL succeeds.
    dp.teardown_pod(container_id="c-gone", wait=True)
    assert dp.teardown_pod(container_id="c-gone") is False
    assert flk_links(node) == []
    assert our_routes(node) == []


def test_setup_again_replaces_a_leftover(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    s = spec("c-again", p, v6=16, v4=16)
    dp.setup_pod(s)
    dp.setup_pod(s)  # e.g. an ADD retried after an agent crash
    assert dp.check_pod(s) == []
    assert flk_links(node) == [s.host_ifname]
    # And after a teardown whose veth still awaits the reaper, in the same netns.
    dp.teardown_pod(container_id="c-again")
    dp.setup_pod(s)
    assert dp.check_pod(s) == []
    assert ping(node.name, V4[16])


def test_check_reports_what_was_removed_by_hand(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    n = name_of(p)
    s = spec("c-check", p, v6=17, v4=17, anycast=(ip("198.18.0.17"),))
    dp.setup_pod(s)
    assert dp.check_pod(s) == []
    sh(node.name, "ip", "route", "del", f"{V4[17]}/32", "dev", s.host_ifname)
    sh(n, "ip", "-6", "route", "del", "default")
    sh(n, "ip", "addr", "del", "198.18.0.17/32", "dev", "lo")
    problems = dp.check_pod(s)
    assert any(f"host route {V4[17]}/32" in x for x in problems), problems
    assert any("default route via fe80::1" in x for x in problems), problems
    assert any("anycast address 198.18.0.17/32" in x for x in problems), problems
    assert len(problems) == 3, problems
    sh(n, "ip", "link", "set", "eth0", "down")
    assert any("pod eth0 is down" in x for x in dp.check_pod(s))
    dp.teardown_pod(container_id="c-check", wait=True)
    assert any("host veth" in x and "missing" in x for x in dp.check_pod(s))


def test_rollback_on_host_side_failure(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    # Someone else's route for the pod's address makes our host route fail (EEXIST).
    sh(node.name, "ip", "route", "add", f"{V4[18]}/32", "dev", node.uplink, "proto", "static")
    with pytest.raises(DatapathError, match=f"host route {V4[18]}/32"):
        dp.setup_pod(spec("c-rb1", p, v6=18, v4=18))
    assert flk_links(node) == []
    assert our_routes(node) == []
    assert [x["ifname"] for x in js(name_of(p), "link", "show")] == ["lo"]
    assert js(node.name, "route", "show", f"{V4[18]}/32") != []  # theirs untouched


def test_rollback_on_pod_side_failure(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    n = name_of(p)
    sh(n, "ip", "link", "add", "stray0", "type", "veth", "peer", "stray1")
    sh(n, "ip", "link", "set", "stray0", "up")
    # A default route already there makes ours fail (EEXIST) after eth0 got its addresses.
    sh(n, "ip", "-6", "route", "add", "default", "dev", "stray0")
    with pytest.raises(DatapathError, match="default route via fe80::1"):
        dp.setup_pod(spec("c-rb2", p, v6=19, v4=19))
    assert flk_links(node) == []
    assert "eth0" not in {x["ifname"] for x in js(n, "link", "show")}


def test_rollback_when_pod_ifname_is_taken(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    sh(name_of(p), "ip", "link", "add", "eth0", "type", "veth", "peer", "other0")
    with pytest.raises(DatapathError, match="eth0 already exists"):
        dp.setup_pod(spec("c-taken", p, v6=20, v4=20))
    assert flk_links(node) == []
    assert our_routes(node) == []


def test_missing_netns_is_a_clear_error(dp: Datapath, node: Node) -> None:
    with pytest.raises(DatapathError, match="cannot open pod netns /run/netns/fd-nope"):
        dp.setup_pod(spec("c-nons", "/run/netns/fd-nope", v6=21))
    assert flk_links(node) == []


# -- concurrency and listing --------------------------------------------------------


def test_concurrent_setups_and_listing(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    specs = [spec(f"c-par{i}", pod_netns(), v6=22 + i, v4=22 + i) for i in range(16)]
    errors: list[BaseException] = []

    def run(s: PodNetSpec) -> None:
        try:
            dp.setup_pod(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for s in specs:
        assert dp.check_pod(s) == [], s.container_id
    assert ping(name_of(specs[0].netns), V6[22 + 15])
    # A fresh Datapath (an agent restart) lists the same veths and routes: kernel as store.
    with Datapath(host_netns=node.path) as again:
        assert {v.name for v in again.list_host_veths()} == {s.host_ifname for s in specs}
        routes = {(r.dst, r.ifname) for r in again.list_pod_routes()}
        want = {(a, s.host_ifname) for s in specs for a in s.addresses}
        assert routes == want
    for s in specs[:8]:
        dp.teardown_pod(container_id=s.container_id)
    assert {v.name for v in dp.list_host_veths()} == {s.host_ifname for s in specs[8:]}


def test_veths_retired_before_a_crash_are_reaped_after_restart(
    node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    s = spec("c-crash", p, v6=38, v4=38)
    with Datapath(host_netns=node.path) as first:
        first.setup_pod(s)
    # What teardown leaves for the reaper, had the agent died right after it.
    sh(node.name, "ip", "link", "set", s.host_ifname, "down", "group", str(0x666C6B00 | 7))
    with Datapath(host_netns=node.path, reap_delay=0.01) as again:
        assert again.list_host_veths() == []  # retired: not a live attachment
        assert [v.name for v in again.list_host_veths(include_retired=True)] == [s.host_ifname]
    assert flk_links(node) == []


def test_check_reports_gateway_address_and_neighbours(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    s = spec("c-check2", p, v6=37, v4=37)
    res = dp.setup_pod(s)
    sh(node.name, "ip", "addr", "del", "fe80::1/64", "dev", s.host_ifname)
    sh(node.name, "ip", "neigh", "del", str(V4[37]), "dev", s.host_ifname)
    sh(name_of(p), "ip", "neigh", "del", "fe80::1", "dev", "eth0")
    problems = dp.check_pod(s)
    assert sorted(problems) == sorted(
        [
            f"fe80::1/64 missing on host veth {s.host_ifname}",
            f"host neighbour {V4[37]} lladdr {res.pod_mac} on {s.host_ifname} is missing",
            f"pod neighbour fe80::1 lladdr {res.host_mac} on eth0 is missing",
        ]
    )


def test_anycast_single_change_and_changes_behind_its_back(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    any4, any6 = ip("198.18.1.1"), ip("2001:db8:aaaa::11")
    pa, pb = pod_netns(), pod_netns()
    sa = spec("c-set-a", pa, v6=30, v4=30, anycast=(any4, any6))
    sb = spec("c-set-b", pb, v6=31, v4=31, anycast=(any4, any6))
    dp.setup_pod(sa)
    dp.setup_pod(sb)
    # The one-route path: add, widen to multipath, narrow, remove.
    assert dp.set_anycast(any4, [(V4[30], sa.host_ifname)])
    assert dp.set_anycast(any4, [(V4[30], sa.host_ifname), (V4[31], sb.host_ifname)])
    hops = js(node.name, "route", "show", "to", str(any4), "proto", "70")[0]["nexthops"]
    assert {h["dev"] for h in hops} == {sa.host_ifname, sb.host_ifname}
    assert dp.set_anycast(any4, [(V4[31], sb.host_ifname)])
    assert ping(node.name, any4)
    assert not dp.set_anycast(any4, [])
    assert dp.list_anycast_routes() == {}
    assert not dp.set_anycast(any4, [])  # removing what is not there: fine

    want = {any6: [(V6[30], sa.host_ifname), (V6[31], sb.host_ifname)]}
    dp.reconcile_anycast(want)
    # Someone deletes our route by hand: the cached view misses it, a full pass restores it.
    sh(node.name, "ip", "-6", "route", "del", str(any6), "proto", "70")
    dp.reconcile_anycast(want, full=True)
    assert len(dp.list_anycast_routes()[any6]) == 2
    # A veth deleted behind our back: its cached index fails, the retry rereads the kernel.
    sh(node.name, "ip", "link", "del", sa.host_ifname)
    dp.reconcile_anycast({any6: [(V6[30], sa.host_ifname), (V6[31], sb.host_ifname)], any4: []})
    assert dp.list_anycast_routes() == {any6: ((V6[31], sb.host_ifname),)}
    assert ping(node.name, any6)


def test_setup_clears_a_retired_veth_of_an_earlier_agent_holding_the_name(
    node: Node, pod_netns: Callable[[], str]
) -> None:
    p = pod_netns()
    with Datapath(host_netns=node.path) as first:
        old = first.setup_pod(spec("c-old", p, v6=36, v4=36))
    # Retired (down, in a reaper group) but not yet deleted when that agent went away.
    sh(node.name, "ip", "link", "set", old.host_ifname, "down", "group", str(0x666C6B00 | 9))
    with Datapath(host_netns=node.path) as again:
        s = spec("c-new", p, v6=35, v4=35)  # another container id, the same netns and eth0
        again.setup_pod(s)
        assert again.check_pod(s) == []
        assert flk_links(node) == [s.host_ifname]


def test_concurrent_churn_leaves_nothing(node: Node, pod_netns: Callable[[], str]) -> None:
    """16 threads adding and deleting pods while the reaper runs: no error, nothing left."""
    paths = [pod_netns() for _ in range(16)]
    errors: list[BaseException] = []
    with Datapath(host_netns=node.path, reap_delay=0.005) as d:

        def work(t: int) -> None:
            try:
                for round_ in range(4):
                    s = spec(f"c-churn{t}-{round_}", paths[t], v6=t, v4=t)
                    d.setup_pod(s)
                    assert d.check_pod(s) == []
                    d.teardown_pod(container_id=s.container_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert d.list_host_veths() == []
        assert our_routes(node) == []
    assert flk_links(node) == []
