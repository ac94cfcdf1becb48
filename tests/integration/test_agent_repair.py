"""A repeated ADD and the start-up re-sync repair a pod's network in place, never rebuild it.

CNI makes ADD for the same container and ifname idempotent (a runtime retries
after a lost reply), and the agent re-syncs the kernel from its store at start.
Both used to delete and recreate the pod's veth, which gives the pod a new
eth0 (new ifindex, addresses gone for a moment) and drops its traffic. Here a
real agent serves real pods while a ping runs between them: the pod's and the
host's interfaces must keep their ifindex, every ping must be answered, and
only the piece that was removed by hand comes back.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from flock.testbed import netns
from flock.testbed.node import Pod, TestNode, test_node

pytestmark = pytest.mark.root

CIDR6 = "2001:db8:f001::/64"
CIDR4 = "10.1.0.0/24"
PING_INTERVAL = 0.01


@pytest.fixture
def rnode() -> Iterator[TestNode]:
    with test_node("fq", v6="2001:db8:ffff::1/64", v4="198.51.100.1/24", log_lines=60) as node:
        node.set_node_config({"cidr6": [CIDR6], "cidr4": [CIDR4]})
        node.start_agent()
        yield node


def pod_ifindex(pod: Pod) -> int:
    rows = json.loads(pod.exec("ip", "-j", "link", "show", "dev", "eth0"))
    return int(rows[0]["ifindex"])


def host_ifindex(node: TestNode, pod: Pod) -> int:
    assert pod.result is not None
    name = pod.result.json["interfaces"][0]["name"]
    rows = json.loads(node.exec("ip", "-j", "link", "show", "dev", name))
    return int(rows[0]["ifindex"])


def has_host_route(node: TestNode, ip: str) -> bool:
    fam = "-6" if ":" in ip else "-4"
    return bool(json.loads(node.exec("ip", "-j", fam, "route", "show", ip) or "[]"))


class Pinger:
    """`ping -c count -i 0.01` from `src` to `dst` in the background; `lost()` when done."""

    def __init__(self, src: Pod, dst: str, count: int) -> None:
        self.count = count
        ping = ["ping", "-n", "-q", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1", dst]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", src.netns_name, *ping],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def running(self) -> bool:
        return self.proc.poll() is None

    def lost(self) -> int:
        out, _ = self.proc.communicate(timeout=self.count * PING_INTERVAL + 30)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out
        sent, received = int(m.group(1)), int(m.group(2))
        assert sent == self.count, out
        return sent - received

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_answered(src: Pod, dst: str) -> None:
    """Wait until `dst` answers one ping (the pod's network is up end to end)."""
    deadline = time.monotonic() + 5
    while True:
        r = netns.run(["ping", "-c", "1", "-W", "1", dst], netns=src.netns_name, check=False)
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{dst} never answered"


def test_repeated_add_returns_the_same_result_and_leaves_the_pod_alone(rnode: TestNode) -> None:
    a = rnode.add_pod("a")
    b = rnode.add_pod("b")
    assert a.result is not None and b.result is not None
    b6, b4 = b.result.ips()
    first = a.result.json
    pod_index, host_index = pod_ifindex(a), host_ifindex(rnode, a)
    wait_answered(a, b4)
    pinger6, pinger4 = Pinger(a, b6, 300), Pinger(a, b4, 300)
    try:
        time.sleep(0.2)
        for _ in range(5):
            for pod in (a, b):
                again = rnode.cni_add(pod)
                assert again.ok, again.stdout
                if pod is a:
                    assert again.json == first
        assert pinger6.running() and pinger4.running(), "the ADDs outlasted the pings"
        assert (pinger6.lost(), pinger4.lost()) == (0, 0)
    finally:
        pinger6.stop()
        pinger4.stop()
    assert (pod_ifindex(a), host_ifindex(rnode, a)) == (pod_index, host_index)
    assert a.global_addrs() == set(a.result.ips())
    assert rnode.cni_check(a).ok and rnode.cni_check(b).ok


def test_repeated_add_puts_back_only_what_is_missing(rnode: TestNode) -> None:
    a = rnode.add_pod("a")
    b = rnode.add_pod("b")
    assert a.result is not None and b.result is not None
    a6, a4 = a.result.ips()
    pod_index, host_index = pod_ifindex(a), host_ifindex(rnode, a)
    rnode.exec("ip", "-6", "route", "del", a6)
    a.exec("ip", "-6", "route", "del", "default")
    assert not rnode.cni_check(a).ok
    wait_answered(b, a4)  # v4 towards the pod still works: its host route is in place
    pinger = Pinger(b, a4, 200)
    try:
        time.sleep(0.2)
        again = rnode.cni_add(a)
        assert again.ok, again.stdout
        assert pinger.running(), "the ADD outlasted the ping"
        assert pinger.lost() == 0
    finally:
        pinger.stop()
    assert again.json == a.result.json
    assert has_host_route(rnode, a6)
    assert rnode.cni_check(a).ok
    assert (pod_ifindex(a), host_ifindex(rnode, a)) == (pod_index, host_index)
    wait_answered(a, b.result.ips()[0])  # v6 from the pod works again


def test_restart_repairs_host_routes_without_rebuilding_the_veth(rnode: TestNode) -> None:
    a = rnode.add_pod("a")
    b = rnode.add_pod("b")
    assert a.result is not None and b.result is not None
    a6, a4 = a.result.ips()
    indexes = {p.name: (pod_ifindex(p), host_ifindex(rnode, p)) for p in (a, b)}
    rnode.stop_agent()
    # While the agent is away one host route of `a` and its host neighbour entry go.
    host_veth = a.result.json["interfaces"][0]["name"]
    rnode.exec("ip", "-6", "route", "del", a6)
    rnode.exec("ip", "-4", "neigh", "del", a4, "dev", host_veth)
    wait_answered(b, a4)
    pinger = Pinger(b, a4, 500)
    try:
        time.sleep(0.2)
        rnode.start_agent()
        assert pinger.running(), "the agent's start outlasted the ping"
        assert pinger.lost() == 0
    finally:
        pinger.stop()
    assert has_host_route(rnode, a6)
    assert rnode.cni_check(a).ok and rnode.cni_check(b).ok
    assert {p.name: (pod_ifindex(p), host_ifindex(rnode, p)) for p in (a, b)} == indexes
    wait_answered(b, a6)
