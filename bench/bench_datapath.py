"""Kernel-only cost of the pod datapath: setup_pod / teardown_pod for many dual-stack pods.

Runs as root in namespaces it creates (prefix `fdb`) and removes. Prints:
  1. sequential setup of N dual-stack pods: p50/p99/max, and p50 per quarter
     (flat as pods accumulate?);
  2. teardown of all N (the DEL path: retire + anycast-hop repair) and the
     batched reaper delete of the retired veths; synchronous delete for a few;
  3. check_pod, and anycast route reconcile (1000 IPs, multipath) and one change;
  4. churn: setup of a new pod while older ones are torn down and reaped in
     the background;
  5. why the transport is hand-rolled: opening a netlink socket in a pod netns
     and one request, pyroute2's API vs ours.

Usage: sudo .venv/bin/python bench/bench_datapath.py [--pods 200]
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import time
from collections.abc import Callable, Sequence

from flock.apply import rtnl
from flock.apply.datapath import REAP_BATCH, Datapath, PodNetSpec
from flock.apply.nlsock import Request, RtnlSocket
from flock.testbed import netns

PREFIX = "fdb"


def pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def row(label: str, ms: Sequence[float]) -> str:
    return (
        f"{label:<44} {len(ms):>5} {pct(ms, 50):>8.3f} {pct(ms, 99):>8.3f} "
        f"{max(ms):>8.3f} {statistics.fmean(ms):>8.3f}"
    )


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def make_pods(count: int, start: int) -> tuple[list[str], list[PodNetSpec]]:
    names, specs = [], []
    for i in range(start, start + count):
        name = netns.unique_name(f"{PREFIX}p", 8)
        netns.create(name)
        names.append(name)
        specs.append(
            PodNetSpec(
                container_id=f"bench-{i}",
                netns=netns.path(name),
                v6=ipaddress.IPv6Address(f"2001:db8:f001::{i + 1:x}"),
                v4=ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.64.0.0")) + i + 1),
            )
        )
    return names, specs


def _dellink(ns_path: str | None, name: str, node: str) -> None:
    with RtnlSocket(ns_path or netns.path(node)) as sock:
        sock.call(Request(rtnl.RTM_DELLINK, 0, rtnl.link_by_name(name), f"delete {name}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=200)
    args = ap.parse_args()
    n = args.pods
    made: list[str] = []
    node = netns.unique_name(f"{PREFIX}n", 8)
    try:
        netns.create(node, forwarding=True)
        made.append(node)
        names, specs = make_pods(n, 0)
        made += names
        dp = Datapath(host_netns=netns.path(node), reap_delay=0.05)
        dp.ensure_forwarding()
        header = f"{'':<44} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'mean ms':>8}"
        print(f"pod datapath, kernel only, {n} dual-stack pods, one node namespace")
        print(header)

        setup = [timed(lambda s=s: dp.setup_pod(s)) for s in specs]  # type: ignore[misc]
        print(row(f"setup_pod, sequential, {n} pods", setup))
        q = max(1, n // 4)
        for k in range(0, n, q):
            print(row(f"  pods {k + 1}-{min(n, k + q)}", setup[k : k + q]))

        checks = [timed(lambda s=s: dp.check_pod(s)) for s in specs[:: max(1, n // 20)]]
        print(row(f"check_pod with {n} pods on the node", checks))

        # Anycast: 1000 IPs over the pods, 1-3 replicas each (multipath).
        base = int(ipaddress.IPv4Address("198.18.0.0"))
        desired = {
            ipaddress.IPv4Address(base + j): [
                (specs[(j + k) % n].v4, specs[(j + k) % n].host_ifname) for k in range(1 + j % 3)
            ]
            for j in range(1000)
        }
        print(
            row(
                "reconcile_anycast: 1000 routes from none",
                [timed(lambda: dp.reconcile_anycast(desired))],
            )
        )  # type: ignore[arg-type]
        print(
            row(
                "  again, nothing changed",
                [timed(lambda: dp.reconcile_anycast(desired)) for _ in range(5)],
            )
        )  # type: ignore[arg-type]
        print(
            row(
                "  full=True (reread the kernel)",
                [timed(lambda: dp.reconcile_anycast(desired, full=True)) for _ in range(3)],
            )
        )  # type: ignore[arg-type]
        first = next(iter(desired))
        one = [
            timed(lambda: dp.set_anycast(first, [])),
            timed(lambda: dp.set_anycast(first, desired[first])),
        ]  # type: ignore[arg-type]
        one += [timed(lambda: dp.set_anycast(first, [])) for _ in range(10)]
        print(row("set_anycast: one withdraw / add", one))
        dp.reconcile_anycast({})

        dp.reap_delay = 3600.0  # hold the reaper so the DEL path is measured alone
        teardown = [timed(lambda s=s: dp.teardown_pod(container_id=s.container_id)) for s in specs]
        print(row(f"teardown_pod (retire; reaper deletes later), {n}", teardown))
        reap = timed(dp.reap)
        groups = -(-n // REAP_BATCH)
        print(row(f"  reap(): delete {n} retired veths, {groups} groups", [reap]))
        dp.close()

        dp = Datapath(host_netns=netns.path(node), reap_delay=0.05)
        few = specs[:20]
        for s in few:
            dp.setup_pod(s)
        sync = [
            timed(lambda s=s: dp.teardown_pod(container_id=s.container_id, wait=True)) for s in few
        ]  # type: ignore[misc]
        print(row("teardown_pod(wait=True): delete now, 20", sync))

        # The alternatives to retire-and-reap, for the record: delete one end now.
        for s in few[:10]:
            dp.setup_pod(s)
        host_side = [timed(lambda s=s: _dellink(None, s.host_ifname, node)) for s in few[:10]]  # type: ignore[misc]
        print(row("  alternative: RTM_DELLINK host end, 10", host_side))
        for s in few[:10]:
            dp.setup_pod(s)
        pod_side = [timed(lambda s=s: _dellink(s.netns, s.ifname, node)) for s in few[:10]]  # type: ignore[misc]
        print(row("  alternative: RTM_DELLINK pod end, 10", pod_side))

        # Churn: keep 50 pods alive; each step adds one and removes the oldest.
        for s in specs[:50]:
            dp.setup_pod(s)
        add, dele = [], []
        live = list(specs[:50])
        for s in specs[50:]:
            add.append(timed(lambda s=s: dp.setup_pod(s)))  # type: ignore[misc]
            old = live.pop(0)
            dele.append(timed(lambda o=old: dp.teardown_pod(container_id=o.container_id)))  # type: ignore[misc]
            live.append(s)
        if add:
            print(row(f"churn: setup_pod with reaper running, {len(add)}", add))
            print(row(f"churn: teardown_pod, {len(dele)}", dele))
        t0 = time.perf_counter()
        for s in live:
            dp.teardown_pod(container_id=s.container_id)
        dp.close()
        print(row("  close(): last reap", [(time.perf_counter() - t0) * 1e3]))

        # Transport: pyroute2's netns socket (forks a child) and request vs ours.
        from pyroute2 import IPRoute

        pod = specs[0].netns
        ours_open = [timed(lambda: RtnlSocket(pod).close()) for _ in range(20)]
        p2_open = [timed(lambda: IPRoute(netns=pod).close()) for _ in range(5)]
        print(row("open netlink socket in pod netns: ours (setns)", ours_open))
        print(row("  pyroute2 IPRoute(netns=...) (fork)", p2_open))
        with RtnlSocket(pod) as sock, IPRoute(netns=pod) as ipr:
            ours_req = [timed(lambda: sock.get_link("lo")) for _ in range(200)]
            p2_req = [timed(lambda: ipr.link("get", index=1)) for _ in range(200)]
        print(row("one request (get link): ours", ours_req))
        print(row("  pyroute2 IPRoute.link('get')", p2_req))
    finally:
        for name in reversed(made):
            netns.delete(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
