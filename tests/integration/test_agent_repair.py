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
import threading
import time
from collections.abc import Iterator

import pytest

from flock.testbed import netns
from flock.testbed.node import Pod, TestNode, test_node
from flock.testbed.wait import wait_until

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
    """A continuous `ping -i 0.01` from `src` to `dst`, its answers collected as they come.

    It runs for as long as the operation under test takes, however slow the machine:
    `started()` waits for answers sent before the operation, `finished()` for an
    answer sent after it, and `lost()` lists the unanswered sequence numbers up to
    the last answered one (a fixed `-c count` made the ping a wall-clock budget that
    a loaded machine's ADDs outlasted).
    """

    def __init__(self, src: Pod, dst: str) -> None:
        # -D: each answer line carries its receive time; minus its rtt, its send time.
        ping = ["stdbuf", "-oL", "ping", "-n", "-D", "-i", str(PING_INTERVAL), "-W", "1", dst]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", src.netns_name, *ping],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._lock = threading.Lock()  # the reader thread adds to sent_at while we read it
        self.sent_at: dict[int, float] = {}  # answered icmp_seq -> send time (CLOCK_REALTIME)
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, name="pinger", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            m = ANSWER.search(line)
            if m:
                with self._lock:
                    self.sent_at[int(m["seq"])] = float(m["ts"]) - float(m["rtt"]) / 1000

    def answers(self) -> dict[int, float]:
        with self._lock:
            return dict(self.sent_at)

    def started(self) -> None:
        """Wait until the ping is answered (a few answers: traffic flows before the operation)."""
        wait_until(
            lambda: len(self.answers()), until=lambda n: n >= 5, timeout=60, what="5 answers"
        )

    def finished(self) -> None:
        """Wait for an answer to a ping sent after now (the operation is covered by pings)."""
        now = time.time()
        wait_until(
            lambda: max(self.answers().values(), default=0.0),
            until=lambda last: last > now,
            timeout=60,
            what=f"an answer to a ping sent after {now:.3f}",
        )

    def lost(self) -> list[int]:
        answered = self.answers()
        top = max(answered, default=0)
        return sorted(set(range(1, top + 1)) - set(answered))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(10)


ANSWER = re.compile(
    r"^\[(?P<ts>[0-9.]+)\] \d+ bytes from .*icmp_seq=(?P<seq>\d+) .*time=(?P<rtt>[0-9.]+) ms"
)


def wait_answered(src: Pod, dst: str) -> None:
    """Wait until `dst` answers one ping (the pod's network is up end to end)."""
    wait_until(
        lambda: netns.run(["ping", "-c", "1", "-W", "1", dst], netns=src.netns_name, check=False),
        until=lambda r: r.returncode == 0,
        timeout=60,
        what=f"{dst} to answer a ping",
    )


def test_repeated_add_returns_the_same_result_and_leaves_the_pod_alone(rnode: TestNode) -> None:
    a = rnode.add_pod("a")
    b = rnode.add_pod("b")
    assert a.result is not None and b.result is not None
    b6, b4 = b.result.ips()
    first = a.result.json
    pod_index, host_index = pod_ifindex(a), host_ifindex(rnode, a)
    wait_answered(a, b4)
    pinger6, pinger4 = Pinger(a, b6), Pinger(a, b4)
    try:
        pinger6.started()
        pinger4.started()
        for _ in range(5):
            for pod in (a, b):
                again = rnode.cni_add(pod)
                assert again.ok, again.stdout
                if pod is a:
                    assert again.json == first
        pinger6.finished()
        pinger4.finished()
        assert (pinger6.lost(), pinger4.lost()) == ([], [])
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
    pinger = Pinger(b, a4)
    try:
        pinger.started()
        again = rnode.cni_add(a)
        assert again.ok, again.stdout
        pinger.finished()
        assert pinger.lost() == []
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
    pinger = Pinger(b, a4)
    try:
        pinger.started()
        rnode.start_agent()
        pinger.finished()
        assert pinger.lost() == []
    finally:
        pinger.stop()
    assert has_host_route(rnode, a6)
    assert rnode.cni_check(a).ok and rnode.cni_check(b).ok
    assert {p.name: (pod_ifindex(p), host_ifindex(rnode, p)) for p in (a, b)} == indexes
    wait_answered(b, a6)
