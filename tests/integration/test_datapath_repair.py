"""`Datapath.setup_pod` on an attachment that exists: repair in place, rebuild only a broken pair.

The agent calls setup_pod again for a repeated ADD and from its start-up
re-sync. For an intact veth pair it must put back only what is missing (the
interfaces keep their ifindex); a pair that is not intact (being deleted, or
its pod end gone) is rebuilt as before.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from flock.apply.datapath import Datapath, PodNetSpec
from flock.testbed import netns

if TYPE_CHECKING:
    from conftest import Node

pytestmark = pytest.mark.root

V6 = ipaddress.IPv6Address("2001:db8:f001::a")
V4 = ipaddress.IPv4Address("192.0.2.10")
ANY6 = ipaddress.IPv6Address("2001:db8:a::53")


@pytest.fixture
def ns_prefix() -> str:
    return "fq"


@pytest.fixture
def dp(node: Node) -> Iterator[Datapath]:
    d = Datapath(host_netns=node.path, reap_delay=0.01)
    try:
        yield d
    finally:
        d.close()


def link(ns: str, dev: str) -> dict[str, Any]:
    rows = json.loads(netns.run(["ip", "-j", "link", "show", "dev", dev], netns=ns).stdout)
    return rows[0]  # type: ignore[no-any-return]


def ns_name(path: str) -> str:
    return path.rsplit("/", 1)[1]


def pod_spec(path: str, **kw: Any) -> PodNetSpec:
    return PodNetSpec(container_id="c-repair", netns=path, v6=V6, v4=V4, **kw)


def test_setup_twice_keeps_the_pair(dp: Datapath, node: Node, pod_netns: Callable[[], str]) -> None:
    s = pod_spec(pod_netns(), anycast=(ANY6,))
    first = dp.setup_pod(s)
    again = dp.setup_pod(s)
    assert again == first
    assert link(ns_name(s.netns), "eth0")["ifindex"] == first.pod_index
    assert link(node.name, s.host_ifname)["ifindex"] == first.host_index
    assert dp.check_pod(s) == []


def test_missing_pieces_come_back_on_both_sides(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    s = pod_spec(pod_netns(), anycast=(ANY6,))
    first = dp.setup_pod(s)
    pod = ns_name(s.netns)
    netns.run(["ip", "-6", "route", "del", str(V6)], netns=node.name)
    netns.run(["ip", "-4", "neigh", "del", str(V4), "dev", s.host_ifname], netns=node.name)
    netns.run(["ip", "addr", "del", f"{V4}/32", "dev", "eth0"], netns=pod)
    netns.run(["ip", "addr", "del", f"{ANY6}/128", "dev", "lo"], netns=pod)
    netns.run(["ip", "link", "set", s.host_ifname, "down"], netns=node.name)
    assert len(dp.check_pod(s)) >= 4
    again = dp.setup_pod(s)
    assert (again.host_index, again.pod_index) == (first.host_index, first.pod_index)
    assert dp.check_pod(s) == []
    assert link(pod, "eth0")["ifindex"] == first.pod_index


def test_a_pair_being_deleted_is_rebuilt(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    s = pod_spec(pod_netns())
    dp.setup_pod(s)
    dp.teardown_pod(container_id=s.container_id)  # retired: down, waiting for the reaper
    again = dp.setup_pod(s)
    assert dp.check_pod(s) == []
    assert link(node.name, s.host_ifname)["ifindex"] == again.host_index
    assert link(ns_name(s.netns), "eth0")["ifindex"] == again.pod_index


def test_a_foreign_eth0_in_the_pod_is_not_taken_over(
    dp: Datapath, node: Node, pod_netns: Callable[[], str]
) -> None:
    s = pod_spec(pod_netns())
    pod = ns_name(s.netns)
    netns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "fqother"], netns=pod)
    with pytest.raises(Exception, match="eth0 already exists"):
        dp.setup_pod(s)
    assert "fqother" in link(pod, "eth0").get("link", "")  # still the foreign pair
    assert dp.list_host_veths() == []
