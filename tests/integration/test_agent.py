"""The real agent in a node namespace, driven through the real plugin, as a runtime drives it.

Every test builds its own node (`flock.testbed.node.TestNode`, prefix `fa`),
starts `flock agent` inside it, creates pod namespaces, and runs the plugin
subprocess with CNI env + stdin. Assertions read the kernel (ip/ping inside the
namespaces), the plugin's output and the agent's status socket.
"""

from __future__ import annotations

import ipaddress
import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from flock.compile.embed import field_value
from flock.testbed import netns
from flock.testbed.node import Pod, TestNode, test_node
from flock.testbed.wait import wait_until

pytestmark = pytest.mark.root

CIDR6 = "2001:db8:f001::/64"
CIDR4 = "10.1.0.0/24"
NODE6 = "2001:db8:ffff::1"
NODE4 = "198.51.100.1"
ANY6 = "2001:db8:a::53"
ANY4 = "192.0.2.53"
PUB6 = "2001:db8:c::166"
PUB4 = "203.0.113.166"

SPEC: dict[str, Any] = {
    "cidr6": [CIDR6],
    "cidr4": [CIDR4],
    "allowedAddresses": [
        {"cidr": "2001:db8:a::/48", "use": ["anycast"]},
        {"cidr": "192.0.2.0/24", "use": ["anycast"]},
        {"cidr": "2001:db8:c::/48", "use": ["addresses"]},
        {"cidr": "203.0.113.0/24", "use": ["addresses"]},
    ],
}


@pytest.fixture
def fnode() -> Iterator[TestNode]:
    with test_node("fa", v6=f"{NODE6}/64", v4=f"{NODE4}/24", log_lines=60) as node:
        node.set_node_config(SPEC)
        node.start_agent()
        yield node


def ping(pod: Pod | TestNode, dst: str) -> bool:
    args = ["ping", "-c", "1", "-W", "10", dst]  # one packet; 10 s: a deadline, not a bound
    if isinstance(pod, Pod):
        r = netns.run(args, netns=pod.netns_name, check=False)
    else:
        r = netns.run(args, netns=pod.name, check=False)
    return r.returncode == 0


def veths(node: TestNode) -> set[str]:
    out = node.exec("ip", "-j", "link", "show", "type", "veth")
    return {ln["ifname"] for ln in json.loads(out or "[]") if ln["ifname"].startswith("flk")}


def host_routes(node: TestNode) -> set[tuple[str, str]]:
    """Our (proto 70) host routes without gateway: (dst, dev)."""
    out: set[tuple[str, str]] = set()
    for fam in ("-6", "-4"):
        rows = json.loads(node.exec("ip", "-j", fam, "route", "show", "proto", "70") or "[]")
        for r in rows:
            if "gateway" not in r and "nexthops" not in r:
                out.add((r["dst"], r["dev"]))
    return out


def anycast_hops(node: TestNode, ip: str) -> set[str]:
    """Next-hop gateways of our route to `ip` (empty when there is none)."""
    fam = "-6" if ":" in ip else "-4"
    rows = json.loads(node.exec("ip", "-j", fam, "route", "show", ip, "proto", "70") or "[]")
    hops: set[str] = set()
    for r in rows:
        if "gateway" in r:
            hops.add(r["gateway"])
        for nh in r.get("nexthops", []):
            hops.add(nh["gateway"])
    return hops


# How long to wait for the agent to converge: a deadline for a loaded CI machine, not an
# expectation (the agent usually takes milliseconds).
WAIT = 60.0


# ---- families, ranges, ip-algo ----------------------------------------------------------


def test_dual_stack_pods_ping_each_other_and_the_node(fnode: TestNode) -> None:
    a = fnode.add_pod("a")
    b = fnode.add_pod("b")
    assert a.result is not None and b.result is not None
    res = a.result.json
    assert res["cniVersion"] == "1.1.0"
    assert res["interfaces"][1]["sandbox"] == a.netns_path
    a6, a4 = a.result.ips()
    b6, b4 = b.result.ips()
    assert ipaddress.ip_address(a6) in ipaddress.ip_network(CIDR6)
    assert ipaddress.ip_address(a4) in ipaddress.ip_network(CIDR4)
    assert {r["dst"] for r in res["routes"]} == {"::/0", "0.0.0.0/0"}
    assert a.global_addrs() == {a6, a4}
    # No address is left tentative, so the first ping goes through at once.
    assert "tentative" not in a.exec("ip", "-6", "addr", "show", "dev", "eth0")
    for src, dst in ((a, b6), (a, b4), (b, a6), (b, a4), (a, NODE6), (a, NODE4)):
        assert ping(src, dst), f"{src.name} -> {dst}"
    assert ping(fnode, a6) and ping(fnode, a4)


def test_v6_only_and_v4_only_pods(fnode: TestNode) -> None:
    six = fnode.add_pod("six", annotations={"ipv4": "false"})
    four = fnode.add_pod("four", annotations={"ipv6": "False "})
    assert six.result is not None and four.result is not None
    (s6,) = six.result.ips()
    (f4,) = four.result.ips()
    assert ipaddress.ip_address(s6).version == 6 and ipaddress.ip_address(f4).version == 4
    assert six.global_addrs() == {s6}
    assert four.global_addrs() == {f4}
    assert "default" not in six.exec("ip", "-4", "route")
    assert "default" not in four.exec("ip", "-6", "route")
    assert ping(six, NODE6) and ping(four, NODE4)


def test_node_default_v6_only(fnode: TestNode) -> None:
    fnode.set_node_config({**SPEC, "defaults": {"ipv4": False}})
    p = fnode.add_pod("p")
    assert p.result is not None
    assert [ipaddress.ip_address(x).version for x in p.result.ips()] == [6]


def test_sub_ranges(fnode: TestNode) -> None:
    p = fnode.add_pod(
        "sub", annotations={"cidr6": "2001:db8:f001::ab00/120", "cidr4": "10.1.0.128/28"}
    )
    assert p.result is not None
    v6, v4 = p.result.ips()
    assert ipaddress.ip_address(v6) in ipaddress.ip_network("2001:db8:f001::ab00/120")
    assert ipaddress.ip_address(v4) in ipaddress.ip_network("10.1.0.128/28")
    assert ping(p, NODE6) and ping(p, NODE4)


def test_ip_algo_embeds_namespace_and_pod(fnode: TestNode) -> None:
    ann = {"ip-algo": "namespace,pod"}
    p1 = fnode.add_pod("alpha", namespace="dns", annotations=ann)
    p2 = fnode.add_pod("beta", namespace="dns", annotations=ann)
    assert p1.result is not None and p2.result is not None
    h1 = ipaddress.IPv6Address(p1.result.ips()[0]).exploded.split(":")
    h2 = ipaddress.IPv6Address(p2.result.ips()[0]).exploded.split(":")
    assert h1[4] == h2[4] == f"{field_value('dns'):04x}"
    assert h1[5] == f"{field_value('alpha'):04x}" and h2[5] == f"{field_value('beta'):04x}"
    assert ping(p1, p2.result.ips()[0])


# ---- addresses and anycast ----------------------------------------------------------------


def test_addresses_replace_ipam(fnode: TestNode) -> None:
    p = fnode.add_pod("plex", annotations={"addresses": f"{PUB6}, {PUB4}, 2001:db8:c::167"})
    assert p.result is not None
    assert p.result.ips() == [PUB6, PUB4, "2001:db8:c::167"]
    assert p.global_addrs() == {PUB6, PUB4, "2001:db8:c::167"}
    assert (f"{PUB6}", p.result.json["interfaces"][0]["name"]) in {
        (d.split("/")[0], dev) for d, dev in host_routes(fnode)
    }
    assert ping(fnode, PUB6) and ping(fnode, PUB4)
    # Outside the aggregates: exported per pod, Ready or not.
    exports = set(fnode.status()["exports"])
    assert {f"{PUB6}/128", f"{PUB4}/32", "2001:db8:c::167/128"} <= exports


def test_anycast_follows_readiness_with_one_multipath_route(fnode: TestNode) -> None:
    ann = {"anycast": f"{ANY6},{ANY4}"}
    r1 = fnode.add_pod("dns-1", annotations=ann, ready=True)
    r2 = fnode.add_pod("dns-2", annotations=ann, ready=True)
    late = fnode.add_pod("dns-3", annotations=ann, ready=False)
    assert r1.result and r2.result and late.result
    u1, u2, u3 = (p.result.ips() for p in (r1, r2, late))  # type: ignore[union-attr]
    wait_until(
        lambda: anycast_hops(fnode, ANY6),
        until=lambda h: h == {u1[0], u2[0]},
        timeout=WAIT,
        what="2 v6 hops",
    )
    wait_until(
        lambda: anycast_hops(fnode, ANY4),
        until=lambda h: h == {u1[1], u2[1]},
        timeout=WAIT,
        what="2 v4 hops",
    )
    assert ANY6 in r1.exec("ip", "-6", "addr", "show", "dev", "lo")
    assert ping(fnode, ANY6) and ping(fnode, ANY4)
    wait_until(
        lambda: set(fnode.status()["exports"]),
        until=lambda e: {f"{ANY6}/128", f"{ANY4}/32"} <= e,
        timeout=WAIT,
        what="both anycast exports",
    )

    def hops(ip: str, want: set[str], what: str) -> None:
        wait_until(
            lambda: anycast_hops(fnode, ip), until=lambda h: h == want, timeout=WAIT, what=what
        )

    fnode.set_ready(r1, False)
    hops(ANY6, {u2[0]}, "r1's v6 hop gone")
    hops(ANY4, {u2[1]}, "r1's v4 hop gone")
    fnode.set_ready(late, True)
    hops(ANY6, {u2[0], u3[0]}, "late's v6 hop")
    # Terminating counts as gone (no delay is asserted), even while still Ready.
    fnode.set_ready(r2, True, terminating=True)
    hops(ANY6, {u3[0]}, "r2's v6 hop gone")
    fnode.delete_pod(late)
    hops(ANY6, set(), "no v6 hop")
    hops(ANY4, set(), "no v4 hop")
    # The status follows the kernel (one reconcile pass): awaited, not checked once.
    st = wait_until(
        fnode.status,
        until=lambda st: st["anycast"] == {} and f"{ANY6}/128" not in st["exports"],
        timeout=WAIT,
        what="no anycast in status",
    )
    assert st["anycast"] == {}


# ---- DEL, CHECK, GC -----------------------------------------------------------------------


def test_del_is_idempotent(fnode: TestNode) -> None:
    p = fnode.add_pod("p")
    assert fnode.cni_del(p).ok
    # The kernel finishes unregistering a deleted veth asynchronously.
    wait_until(lambda: veths(fnode), until=lambda v: v == set(), timeout=WAIT, what="no veth")
    assert fnode.cni_del(p).ok  # again
    netns.delete(p.netns_name)
    assert fnode.cni_del(p).ok  # netns gone
    ghost = Pod("default", "ghost", "u", "faghostns", "0123456789abcdef")
    assert fnode.cni_del(ghost).ok  # never heard of it
    assert fnode.status()["allocations"] == []
    # The address is free again.
    q = fnode.add_pod("q")
    assert q.result is not None and q.result.ips()[1] == p.result.ips()[1]  # type: ignore[union-attr]


def test_check_reports_a_route_deleted_by_hand(fnode: TestNode) -> None:
    p = fnode.add_pod("p")
    assert p.result is not None
    assert fnode.cni_check(p).ok
    v6 = p.result.ips()[0]
    fnode.exec("ip", "-6", "route", "del", v6)
    res = fnode.cni_check(p)
    assert not res.ok
    err = res.json
    assert v6 in err["msg"] + err["details"] and "route" in err["msg"]


def test_gc_releases_what_the_runtime_no_longer_lists(fnode: TestNode) -> None:
    keep = fnode.add_pod("keep")
    gone1 = fnode.add_pod("gone1")
    gone2 = fnode.add_pod("gone2")
    # A veth of ours that no allocation knows (e.g. left by a crash before persisting).
    fnode.exec("ip", "link", "add", "flkdeadbeef000", "type", "veth", "peer", "name", "faxpeer")
    # And a host route of ours (proto 70) towards the kept pod that no allocation has.
    keep_if = keep.result.json["interfaces"][0]["name"]  # type: ignore[union-attr]
    fnode.exec("ip", "-6", "route", "add", "2001:db8:f001::dead/128", "dev", keep_if, "proto", "70")
    res = fnode.cni_gc([keep])
    assert res.ok, res.stdout
    assert "2001:db8:f001::dead" not in fnode.exec("ip", "-6", "route", "show", "proto", "70")
    st = fnode.status()
    assert [a["pod"] for a in st["allocations"]] == ["keep"]
    keep_veth = keep.result.json["interfaces"][0]["name"]  # type: ignore[union-attr]
    wait_until(lambda: veths(fnode), until=lambda v: v == {keep_veth}, timeout=WAIT, what="1 veth")
    assert ping(keep, NODE6)
    for p in (gone1, gone2):
        assert "eth0" not in p.exec("ip", "link")


# ---- restarts -----------------------------------------------------------------------------


def test_agent_restart_with_pods_alive(fnode: TestNode) -> None:
    a = fnode.add_pod("a", annotations={"anycast": ANY6})
    b = fnode.add_pod("b")
    before = fnode.status()["allocations"]
    fnode.stop_agent()
    # While the agent is away: a host route disappears, a stray veth of ours appears.
    fnode.exec("ip", "-4", "route", "del", b.result.ips()[1])  # type: ignore[union-attr]
    fnode.exec("ip", "link", "add", "flkstray000000", "type", "veth", "peer", "name", "faypeer")
    fnode.start_agent()
    assert fnode.status()["allocations"] == before
    assert fnode.cni_check(a).ok and fnode.cni_check(b).ok
    wait_until(
        lambda: veths(fnode),
        until=lambda v: "flkstray000000" not in v,
        timeout=WAIT,
        what="no stray",
    )
    assert ping(a, b.result.ips()[1])  # type: ignore[union-attr]
    assert anycast_hops(fnode, ANY6) == {a.result.ips()[0]}  # type: ignore[union-attr]
    c = fnode.add_pod("c")
    assert c.result is not None
    held = {ip for x in fnode.status()["allocations"] for ip in (x["v6"], x["v4"])}
    assert len(held) == 6


# ---- bad input, concurrency, crashes ------------------------------------------------------


def test_malformed_annotation_fails_only_that_pod(fnode: TestNode) -> None:
    good = fnode.add_pod("good")
    before = veths(fnode)
    bad = fnode.add_pod("bad", annotations={"ipv4": "yes"}, check=False)
    assert bad.result is not None and not bad.result.ok
    err = bad.result.json
    assert "flock.fritzlab.net/ipv4" in err["msg"] and "yes" in err["msg"]
    worse = fnode.add_pod("worse", annotations={"anycast": "2001:db8:a::1,not-an-ip"}, check=False)
    assert worse.result is not None and "not-an-ip" in worse.result.json["msg"]
    denied = fnode.add_pod("denied", annotations={"anycast": "2001:db8:dead::1"}, check=False)
    assert denied.result is not None and "allowedAddresses" in denied.result.json["msg"]
    wait_until(
        lambda: veths(fnode), until=lambda v: v == before, timeout=WAIT, what="veths as before"
    )
    st = fnode.status()
    assert [a["pod"] for a in st["allocations"]] == ["good"]
    # The rejection is recorded against the pod (a Kubernetes Event with the API server).
    ev = [e for e in st["events"] if e["pod"] == "default/bad"]
    assert ev and ev[0]["reason"] == "FlockAddRejected"
    assert "flock.fritzlab.net/ipv4" in ev[0]["message"]
    after = fnode.add_pod("after")
    assert ping(after, good.result.ips()[0])  # type: ignore[union-attr]


def test_sixteen_concurrent_adds(fnode: TestNode) -> None:
    names = [f"c{i}" for i in range(16)]
    with ThreadPoolExecutor(16) as ex:
        pods = list(ex.map(lambda n: fnode.add_pod(n, check=False), names))
    for p in pods:
        assert p.result is not None and p.result.ok, p.result
    ips = [ip for p in pods for ip in p.result.ips()]  # type: ignore[union-attr]
    assert len(ips) == len(set(ips)) == 32
    assert len(veths(fnode)) == 16
    assert ping(pods[0], pods[15].result.ips()[0])  # type: ignore[union-attr]


def test_status_cli_and_metrics(fnode: TestNode) -> None:
    fnode.stop_agent()
    port = random.randint(20000, 60000)
    fnode.start_agent("--metrics-addr", f"127.0.0.1:{port}")
    p = fnode.add_pod("web", annotations={"anycast": ANY6})
    out = subprocess.run(
        [str(fnode.agent_command()[0]), "status", "--run-dir", str(fnode.run_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "default/web" in out and ANY6 in out
    js = json.loads(
        subprocess.run(
            [fnode.agent_command()[0], "status", "--run-dir", str(fnode.run_dir), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert js["allocations"][0]["containerID"] == p.container_id
    fetch = (
        "import urllib.request,sys;r=urllib.request.urlopen(sys.argv[1]);"
        "print(r.status);print(r.read().decode())"
    )
    # The metrics listener opens just after the status socket start_agent waited for.
    metrics = wait_until(
        lambda: fnode.exec("python3", "-c", fetch, f"http://127.0.0.1:{port}/metrics"),
        timeout=WAIT,
        what="the metrics endpoint",
        ignore=(subprocess.CalledProcessError,),
    )
    assert 'flock_cni_op_seconds_count{result="ok",verb="ADD"} 1.0' in metrics
    assert 'flock_allocations{family="ipv6"} 1.0' in metrics
    health = fnode.exec("python3", "-c", fetch, f"http://127.0.0.1:{port}/healthz")
    assert health.startswith("200")


@pytest.mark.slow
def test_sigkill_at_random_moments_during_500_operations(fnode: TestNode) -> None:
    rng = random.Random(20261129)
    live: list[Pod] = []
    pending_del: list[Pod] = []  # a runtime retries DEL until it succeeds
    seq = 0
    kills = 0
    ops = 0
    for n in range(40):
        fnode.put_pod(f"k{n}")

    def kill_soon(delay: float) -> None:
        time.sleep(delay)  # a random moment of the operation, not an ordering
        if fnode.agent is not None:
            fnode.agent.send_signal(signal.SIGKILL)

    while ops < 500:
        ops += 1
        killer = None
        if ops % 20 == 0:
            # Drawn here: rng is only used by this thread, so the sequence is the seed's.
            killer = threading.Thread(target=kill_soon, args=(rng.uniform(0.0, 0.03),))
            killer.start()
        if (len(live) < 12 and rng.random() < 0.6) or not live:
            seq += 1
            name = f"k{rng.randrange(40)}"
            if any(p.name == name for p in live + pending_del):
                name = f"k{seq % 40}"
            pod = Pod(
                "default", name, "", fnode.new_pod_netns(), f"c{seq:06d}{rng.randrange(1 << 30):x}"
            )
            fnode.pods[f"{seq}"] = pod
            res = fnode.cni_add(pod)
            if res.ok:
                live.append(pod)
            else:
                pending_del.append(pod)  # runtime: a failed ADD is followed by DEL
        else:
            pod = live.pop(rng.randrange(len(live)))
            if not fnode.cni_del(pod).ok:
                pending_del.append(pod)
            else:
                netns.delete(pod.netns_name)
        if killer is not None:
            killer.join()
            fnode.stop_agent(timeout=5)
            kills += 1
            fnode.start_agent()
        # The runtime retries the DELs that failed.
        for pod in list(pending_del):
            if fnode.cni_del(pod).ok:
                pending_del.remove(pod)
                netns.delete(pod.netns_name)
    assert kills == 25
    assert not pending_del or all(fnode.cni_del(p).ok for p in pending_del)
    assert fnode.cni_gc(live).ok
    st = fnode.status()
    held = [(a["containerID"], a["v6"], a["v4"]) for a in st["allocations"]]
    assert sorted(c for c, _, _ in held) == sorted(p.container_id for p in live)
    addrs = [ip for _, v6, v4 in held for ip in (v6, v4)]
    assert len(addrs) == len(set(addrs)), "an address is held twice"
    want = {a["hostIfname"] for a in st["allocations"]}
    wait_until(lambda: veths(fnode), until=lambda v: v == want, timeout=WAIT, what="veths")
    want_routes = {
        (f"{ip}", a["hostIfname"]) for a in st["allocations"] for ip in (a["v6"], a["v4"])
    }
    assert {(d.split("/")[0], dev) for d, dev in host_routes(fnode)} == want_routes
    for p in live:
        assert fnode.cni_check(p).ok


# ---- with a real BIRD ----------------------------------------------------------------------


def test_bird_exports_follow_readiness_and_health_fails_while_bird_is_down(
    fnode: TestNode,
) -> None:
    from flock.testbed.bird import BirdDaemon

    spec = {
        **SPEC,
        "bgp": {"asn": 65101, "peers": [{"address": "2001:db8:ffff::fe", "asn": 65000}]},
    }
    fnode.set_node_config(spec)
    bird = BirdDaemon(netns=fnode.name, workdir=fnode.base_dir / "bird")
    bird.start()
    try:
        fnode.stop_agent()
        port = random.randint(20000, 60000)
        fnode.start_agent(
            "--bird-socket", str(bird.socket_path),
            "--bird-config", str(bird.config_path),
            "--router-id", "198.51.100.1",
            "--metrics-addr", f"127.0.0.1:{port}",
        )  # fmt: skip

        def bird_has(prefix: str) -> bool:
            out = netns.run(
                ["birdc", "-s", str(bird.socket_path), "show", "route", "for", prefix, "all"],
                netns=fnode.name,
                check=False,
            ).stdout
            return f"{prefix}/128" in out or f"{prefix}/32" in out

        def health() -> str:
            fetch = (
                "import urllib.request,urllib.error,sys\n"
                "try: print(urllib.request.urlopen(sys.argv[1]).status)\n"
                "except urllib.error.HTTPError as e: print(e.code)"
            )
            return fnode.exec("python3", "-c", fetch, f"http://127.0.0.1:{port}/healthz").strip()

        def healthz(code: str) -> None:
            wait_until(health, until=lambda h: h == code, timeout=WAIT, what=f"healthz {code}")

        def exported(v6: bool, v4: bool, what: str) -> None:
            wait_until(
                lambda: (bird_has(ANY6), bird_has(ANY4)),
                until=lambda got: got == (v6, v4),
                timeout=WAIT,
                what=what,
            )

        healthz("200")
        pod = fnode.add_pod("dns", annotations={"anycast": f"{ANY6},{ANY4}"})
        exported(True, True, "both anycast routes in BIRD")
        st = fnode.status()
        assert st["bgp"]["bird"] == "up" and "2001:db8:ffff::fe" in st["bgp"]["sessions"]
        fnode.set_ready(pod, False)
        exported(False, False, "both withdrawn")
        fnode.set_ready(pod, True)
        exported(True, True, "both back")

        bird.kill()
        healthz("503")
        bird.start()  # same config file: the agent's
        healthz("200")
        exported(True, True, "both in the restarted BIRD")
    finally:
        bird.stop()


def test_del_while_the_agent_is_down_is_replayed_at_start(fnode: TestNode) -> None:
    p = fnode.add_pod("p")
    keep = fnode.add_pod("keep")
    fnode.stop_agent()
    res = fnode.cni_del(p)  # the plugin records it and reports success
    assert res.ok, res.stdout
    fnode.start_agent()
    st = fnode.status()
    assert [a["pod"] for a in st["allocations"]] == ["keep"]
    veth = p.result.json["interfaces"][0]["name"]  # type: ignore[union-attr]
    wait_until(lambda: veths(fnode), until=lambda v: veth not in v, timeout=WAIT, what="no veth")
    assert fnode.cni_check(keep).ok
