"""NetworkPolicy at scale: sync times, forwarding cost, memory (SPEC §9).

Figures:
* full sync (compile + one atomic nft transaction) for 10,000 pods and 1,000
  policies, for a node holding 110 pods (Kubernetes' default max) and, as a stress
  case, 1,000 pods;
* one-object changes (a remote pod added, a local pod added, a local pod relabelled,
  a policy changed, a pod deleted), each applied two ways: `sync` (the whole view,
  which the engine diffs by object identity) and `update` (only the change, as
  `PolicyChanges`), with the compile / nft split of each;
* nft via `nft -f -` (fork/exec) vs libnftables in-process;
* iperf3 TCP throughput between two pod namespaces through a node namespace with
  a 200-policy ruleset (both pods isolated both ways) vs no table at all. On a
  shared 2-CPU machine one 2 s run varies by +-25%, and adjacent runs are not
  correlated, so the figure comes from many runs: blocks of the three conditions
  in rotating order, a warm-up run, slow start omitted, and the ratio reported as
  a median with a bootstrap 95% CI (`--iperf-runs`, `--iperf-affinity`,
  `--iperf-nice`; pinning to 0,1 or 1,1 and nice -10 were tried and made the spread
  no smaller here, so the default runs unpinned as before);
* RSS of this process holding the 10k/1k state and its compiled ruleset.

Run as root: `.venv/bin/python bench/bench_policy.py` (namespaces prefixed `fnb`,
removed at exit). The script re-executes itself inside a node namespace for the
nft measurements so libnftables talks to that namespace, never the host's.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from flock.apply.nft import Nft, NftCli, NftLib, PolicyEngine, delete_table
from flock.compile.policy import (
    LocalPod,
    PolicyChanges,
    PolicyInputs,
    compile_inputs,
    render_full,
)
from flock.model.pod import ContainerPort, Namespace, Pod
from flock.model.policy import NetworkPolicy
from flock.testbed import netns

N_NS = 50
APPS = [f"app{i}" for i in range(20)]
TEAMS = ["red", "blue", "green", "gold"]


def rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else float("nan")


def make_pods(n: int, rnd: random.Random) -> list[Pod]:
    pods = []
    for i in range(n):
        ns = f"ns{i % N_NS}"
        app = APPS[(i // N_NS) % len(APPS)]
        hi, lo = divmod(i + 1, 250)
        pods.append(
            Pod(
                namespace=ns,
                name=f"pod{i}",
                labels={"app": app, "tier": rnd.choice(["front", "back", "data"]), "idx": str(i)},
                container_ports=(
                    ContainerPort(8000 + APPS.index(app), "TCP", "http"),
                    ContainerPort(9100, "TCP", "metrics"),
                ),
                ips=(
                    ipaddress.IPv6Address(f"fd10::{hi:x}:{lo:x}"),
                    ipaddress.IPv4Address(f"10.{100 + hi // 250}.{hi % 250}.{lo + 1}"),
                ),
            )
        )
    return pods


def make_namespaces() -> dict[str, Namespace]:
    return {
        f"ns{i}": Namespace.from_object(
            {"metadata": {"name": f"ns{i}", "labels": {"team": TEAMS[i % len(TEAMS)]}}}
        )
        for i in range(N_NS)
    }


def make_policy(i: int, rnd: random.Random) -> NetworkPolicy:
    return NetworkPolicy.from_object(policy_object(i, rnd))


def policy_object(i: int, rnd: random.Random) -> dict[str, Any]:
    """The i-th synthetic policy as the API server holds it (bench_agent_policy too)."""
    ns = f"ns{i % N_NS}"
    app = APPS[(i // N_NS) % len(APPS)]
    other = rnd.choice(APPS)
    kind = i % 5
    ingress: list[dict[str, Any]]
    if kind == 0:
        ingress = [{"from": [{"podSelector": {"matchLabels": {"app": other}}}],
                    "ports": [{"port": "http"}]}]  # fmt: skip
    elif kind == 1:
        team = {"matchLabels": {"team": rnd.choice(TEAMS)}}
        ports = [{"port": 8000 + i % 20}, {"port": 9100, "protocol": "TCP"}]
        ingress = [{"from": [{"namespaceSelector": team}], "ports": ports}]
    elif kind == 2:
        team = {"matchLabels": {"team": rnd.choice(TEAMS)}}
        tier = {"key": "tier", "operator": "In", "values": ["front", "back"]}
        ingress = [{"from": [{"namespaceSelector": team,
                              "podSelector": {"matchExpressions": [tier]}}]}]  # fmt: skip
    elif kind == 3:
        ex4, ex6 = f"10.{100 + i % 50}.0.0/16", f"fd10::{i:x}:0/112"
        ingress = [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [ex4]}},
                             {"ipBlock": {"cidr": "fd00::/8", "except": [ex6]}}],
                    "ports": [{"port": 30000, "endPort": 30100, "protocol": "UDP"}]}]  # fmt: skip
    else:
        ingress = []
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"app": app}}, "ingress": ingress}
    if i % 4 == 0:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [
            {"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]},
            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}],
             "ports": [{"port": 53, "protocol": "UDP"}]},
        ]  # fmt: skip
    return {"metadata": {"namespace": ns, "name": f"pol{i}"}, "spec": spec}


def state(n_pods: int, n_pol: int, n_local: int, seed: int = 1) -> PolicyInputs:
    rnd = random.Random(seed)
    pods = make_pods(n_pods, rnd)
    step = max(1, n_pods // n_local)
    local = [LocalPod(p, f"flk{i:011x}", p.ips) for i, p in enumerate(pods[::step][:n_local])]
    return PolicyInputs(
        local_pods=local,
        pods=pods,
        namespaces=make_namespaces(),
        policies=[make_policy(i, rnd) for i in range(n_pol)],
    )


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


Change = tuple[str, PolicyInputs, PolicyChanges, PolicyChanges]


def changes(base: PolicyInputs) -> list[Change]:
    """One-object changes from `base`: each with its successor state (for `sync`)
    and the change there and back (for `update`)."""
    rnd = random.Random(7)
    n = len(base.pods)
    newpod = make_pods(n + 1, rnd)[-1]
    # a new pod on this node, selected by the same policies as an existing local one
    local_new = replace(base.local_pods[0].pod, name="newlocal", ips=newpod.ips)
    lp_new = LocalPod(local_new, "flknewlocal0", local_new.ips)
    target = base.local_pods[0].pod
    k = next(i for i, p in enumerate(base.policies) if p.selects(target))
    pol0 = base.policies[k]
    changed = NetworkPolicy.from_object(
        {"metadata": {"namespace": pol0.namespace, "name": pol0.name},
         "spec": {"podSelector": {"matchLabels": {"app": APPS[1]}},
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}]}]}}
    )  # fmt: skip
    # a local pod relabelled (another app: other policies select it, other peer sets
    # hold it)
    lp0 = base.local_pods[0]
    other = next(a for a in APPS if a != target.labels["app"])
    relabelled = replace(target, labels={**target.labels, "app": other})
    lp_rel = LocalPod(relabelled, lp0.ifname, lp0.ips)
    gone = base.pods[1]
    return [
        (
            "add remote pod",
            replace(base, pods=[*base.pods, newpod]),
            PolicyChanges(pods={newpod.key: newpod}),
            PolicyChanges(pods={newpod.key: None}),
        ),
        (
            "add local pod",
            replace(base, pods=[*base.pods, local_new], local_pods=[*base.local_pods, lp_new]),
            PolicyChanges(pods={local_new.key: local_new}, local_pods={lp_new.ifname: lp_new}),
            PolicyChanges(pods={local_new.key: None}, local_pods={lp_new.ifname: None}),
        ),
        (
            "relabel local pod",
            replace(
                base,
                pods=[relabelled if p is target else p for p in base.pods],
                local_pods=[lp_rel, *base.local_pods[1:]],
            ),
            PolicyChanges(pods={target.key: relabelled}, local_pods={lp0.ifname: lp_rel}),
            PolicyChanges(pods={target.key: target}, local_pods={lp0.ifname: lp0}),
        ),
        (
            "change one policy",
            replace(base, policies=[*base.policies[:k], changed, *base.policies[k + 1 :]]),
            PolicyChanges(policies={pol0.key: changed}),
            PolicyChanges(policies={pol0.key: pol0}),
        ),
        (
            "delete one pod",
            replace(base, pods=[base.pods[0], *base.pods[2:]]),
            PolicyChanges(pods={gone.key: None}),
            PolicyChanges(pods={gone.key: gone}),
        ),
    ]


def bench_sync(
    n_local: int, nft_kind: str, repeat: int, n_pods: int = 10_000, n_pol: int = 1_000
) -> dict[str, Any]:
    """Runs inside a node namespace (see main). Times are lists of seconds."""
    gc.collect()
    base = state(n_pods, n_pol, n_local)
    nft: Nft = NftLib() if nft_kind == "lib" else NftCli()
    delete_table(nft)
    out: dict[str, Any] = {"local_pods": n_local, "nft": nft_kind, "pods": n_pods, "pol": n_pol}
    rs = compile_inputs(base)
    out["counts"] = rs.summary()
    out["script_kb"] = len(render_full(rs)) // 1024
    del rs
    full: list[float] = []
    full_parts: list[tuple[float, float]] = []
    for _ in range(repeat):
        eng = PolicyEngine(nft)  # a fresh agent: compile from nothing, replace the table
        full.append(timed(lambda e=eng: e.sync(base)))  # type: ignore[misc]
        st = eng.status()
        full_parts.append((st["last_compile_s"], st["last_apply_s"]))
        del eng
    out["times"] = {"full sync": full}
    out["parts"] = {"full sync": full_parts}
    eng = PolicyEngine(nft)
    eng.sync(base)
    gc.collect()
    out["rss_mb"] = rss_mb()  # holding the state and its applied ruleset, nothing else
    for name, nxt, fwd, back in changes(base):
        for how in ("sync", "update"):
            ts: list[float] = []
            parts: list[tuple[float, float]] = []
            for _ in range(repeat):
                if how == "sync":
                    ts.append(timed(lambda n=nxt: eng.sync(n)))  # type: ignore[misc]
                else:
                    ts.append(timed(lambda c=fwd: eng.update(c)))  # type: ignore[misc]
                st = eng.status()
                parts.append((st["last_compile_s"], st["last_apply_s"]))
                if how == "sync":
                    eng.sync(base)
                else:
                    eng.update(back)
            out["times"][f"{name} ({how})"] = ts
            out["parts"][f"{name} ({how})"] = parts
    out["full_syncs"] = eng.status()["full_syncs"]  # 1: every change went in incrementally
    delete_table(nft)
    return out


# ---------------------------------------------------------------------------
# iperf3 through a node with 200 policies


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (the middle half of the runs)."""
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def median_ci(
    xs: Sequence[float], level: float = 0.95, resamples: int = 4000
) -> tuple[float, float]:
    """Bootstrap confidence interval of the median (fixed seed: the same runs give the
    same interval)."""
    rnd = random.Random(7)
    meds = sorted(statistics.median(rnd.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def ratio_of_medians_ci(
    blocks: Sequence[tuple[float, float]], level: float = 0.95, resamples: int = 4000
) -> tuple[float, float]:
    """Bootstrap CI of median(a) / median(b) over (a, b) blocks, resampling whole blocks."""
    rnd = random.Random(11)
    vals = []
    for _ in range(resamples):
        pick = rnd.choices(blocks, k=len(blocks))
        vals.append(statistics.median(a for a, _ in pick) / statistics.median(b for _, b in pick))
    vals.sort()
    return vals[int((1 - level) / 2 * resamples)], vals[
        min(resamples - 1, int((1 + level) / 2 * resamples))
    ]


def bench_iperf(
    seconds: int, runs: int, *, affinity: str = "", omit: int = 1, nice: int = 0
) -> dict[str, Any]:
    """TCP throughput pod -> node -> pod with no table, conntrack only, 200 policies.

    The same stream and ruleset as always; what makes the figure robust is how it is
    sampled: `runs` blocks of the three conditions back to back in rotating order, a
    warm-up run first, iperf3's first `omit` seconds (slow start) left out, client and
    server pinned to CPUs (`affinity`, iperf3 `-A client,server`) so that the scheduler
    does not move them between runs, and the figure taken as the median of the
    per-block ratios, reported with their spread. `nice` < 0 raises iperf3's CPU
    share against other work on a shared machine (the main source of noise).
    """
    from flock.apply.datapath import Datapath, PodNetSpec

    made: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []

    def mk(tag: str) -> str:
        name = netns.unique_name(f"fnb{tag}", 8)
        netns.create(name)
        made.append(name)
        return name

    try:
        node = mk("N")
        srv, cli = mk("s"), mk("c")
        dp = Datapath(host_netns=netns.path(node))
        pods = []
        for i, (ns_name, ip4, ip6) in enumerate(
            [(srv, "10.77.0.1", "fd77::1"), (cli, "10.77.0.2", "fd77::2")]
        ):
            res = dp.setup_pod(
                PodNetSpec(
                    container_id=f"fnbench{i}",
                    netns=netns.path(ns_name),
                    v4=ipaddress.IPv4Address(ip4),
                    v6=ipaddress.IPv6Address(ip6),
                )
            )
            pod = Pod(
                namespace="bench",
                name=f"p{i}",
                labels={"app": "iperf", "role": "server" if i == 0 else "client"},
                container_ports=(ContainerPort(5201, "TCP", "iperf"),),
                ips=(ipaddress.IPv6Address(ip6), ipaddress.IPv4Address(ip4)),
            )
            pods.append(LocalPod(pod, res.host_ifname, pod.ips))
        dp.close()
        rnd = random.Random(3)
        remote = make_pods(2000, rnd)
        policies = []
        for i in range(199):  # 199 that match other ports / peers, both directions
            policies.append(
                NetworkPolicy.from_object(
                    {"metadata": {"namespace": "bench", "name": f"p{i}"},
                     "spec": {"podSelector": {"matchLabels": {"app": "iperf"}},
                              "policyTypes": ["Ingress", "Egress"],
                              "ingress": [{"from": [{"namespaceSelector": {
                                              "matchLabels": {"team": TEAMS[i % 4]}}}],
                                           "ports": [{"port": 10000 + i}]}],
                              "egress": [{"to": [{"ipBlock": {"cidr": f"10.{i}.0.0/16"}}],
                                          "ports": [{"port": 20000 + i}]}]}}
                )
            )  # fmt: skip
        policies.append(
            NetworkPolicy.from_object(
                {"metadata": {"namespace": "bench", "name": "allow-iperf"},
                 "spec": {"podSelector": {"matchLabels": {"app": "iperf"}},
                          "policyTypes": ["Ingress", "Egress"],
                          "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "iperf"}}}],
                                       "ports": [{"port": "iperf"}]}],
                          "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "iperf"}}}],
                                      "ports": [{"port": "iperf"}]}]}}
            )
        )  # fmt: skip
        inputs = PolicyInputs(
            local_pods=pods,
            pods=[lp.pod for lp in pods] + remote,
            namespaces={**make_namespaces(), "bench": Namespace(name="bench")},
            policies=policies,
        )
        engine = PolicyEngine(NftCli(netns=node))
        prio = ["nice", "-n", str(nice)] if nice else []
        server = subprocess.Popen(
            ["ip", "netns", "exec", srv, *prio, "iperf3", "-s", "-B", "10.77.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(server)
        time.sleep(0.5)

        def run_iperf() -> float:
            cmd = ["ip", "netns", "exec", cli, *prio, "iperf3", "-c", "10.77.0.1", "-J"]
            cmd += ["-t", str(seconds), "-O", str(omit)]
            if affinity:
                cmd += ["-A", affinity]
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + omit + 30, check=True
            )
            return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9

        ct_only = NftCli(netns=node)  # reference: conntrack alone, no policy rules

        def set_state(cond: str) -> None:
            """Put the node's nftables in the state `cond` names (outside the timed run)."""
            engine.remove()
            ct_only.run("add table inet fnbct\ndelete table inet fnbct\n")
            if cond == "conntrack only":
                ct_only.run(
                    "add table inet fnbct\n"
                    "add chain inet fnbct fw { type filter hook forward priority 0; }\n"
                    "add rule inet fnbct fw ct state established,related accept\n"
                )
            elif cond == "200 policies":
                engine.sync(inputs, full=True)

        conds = ["none", "conntrack only", "200 policies"]
        results: dict[str, list[float]] = {c: [] for c in conds}
        blocks: list[dict[str, float]] = []
        rules = 0
        set_state("none")
        run_iperf()  # warm-up (caches, page allocator, CPU frequency), not counted
        for k in range(runs):
            # One block = each condition once, back to back, so that the ratio within a
            # block compares runs seconds apart. The order rotates and reverses from
            # block to block (a Latin square with its mirror), so slow drift of the
            # machine's load does not favour whichever condition runs first or last.
            order = conds[k % 3 :] + conds[: k % 3]
            if (k // 3) % 2:
                order.reverse()
            block: dict[str, float] = {}
            for cond in order:
                set_state(cond)
                if cond == "200 policies":
                    rules = engine.status()["rules"]
                block[cond] = run_iperf()
                results[cond].append(block[cond])
            blocks.append(block)
        set_state("none")
        ratios = [b["200 policies"] / b["none"] for b in blocks]
        ct_ratios = [b["conntrack only"] / b["none"] for b in blocks]
        med = {k: statistics.median(v) for k, v in results.items()}
        return {
            "gbps": med,
            "runs": results,
            "ratio": med["200 policies"] / med["none"],
            "pair_ratio": statistics.median(ratios),
            "pair_ratios": ratios,
            "ct_pair_ratio": statistics.median(ct_ratios),
            "rules_on_node": rules,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=5)
        for name in reversed(made):
            netns.delete(name)


# ---------------------------------------------------------------------------


def in_netns(args: Sequence[str]) -> dict[str, Any]:
    """Run this script's `--inner` mode inside a fresh namespace; return its JSON."""
    name = netns.unique_name("fnbN", 8)
    netns.create(name)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--inner", *args],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return dict(json.loads(out.stdout))
    finally:
        netns.delete(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--inner", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--iperf-seconds", type=int, default=2)
    ap.add_argument("--iperf-runs", type=int, default=24, help="blocks of the three conditions")
    ap.add_argument("--iperf-omit", type=int, default=1, help="seconds of slow start left out")
    ap.add_argument("--iperf-nice", type=int, default=0, help="nice value for iperf3 (e.g. -10)")
    ap.add_argument(
        "--iperf-affinity",
        default="none",
        help="iperf3 -A client,server CPUs (e.g. 1,1); 'auto': 0,1 on 2+ CPUs; 'none': unpinned",
    )
    ap.add_argument("--skip-iperf", action="store_true")
    ap.add_argument("--skip-sync", action="store_true")
    ap.add_argument(
        "--only",
        default="",
        help="sync cases to run, e.g. 1000:lib,110:cli (local pods:nft); default all",
    )
    args = ap.parse_args()
    if args.inner:
        local, kind, rep, n_pods, n_pol = args.inner
        print(json.dumps(bench_sync(int(local), kind, int(rep), int(n_pods), int(n_pol))))
        return
    if os.geteuid() != 0:
        sys.exit("bench_policy: needs root (creates network namespaces)")
    rows = []
    cases = [(10_000, 1_000, local, kind) for local in (110, 1000) for kind in ("cli", "lib")]
    cases.append((500, 50, 20, "lib"))  # a small cluster, for the ADD latency a typical node sees
    only = {tuple(c.split(":")) for c in args.only.split(",") if c}
    for pods, pols, local, kind in () if args.skip_sync else cases:
        if not only or (str(local), kind) in only:
            rows.append(in_netns([str(local), kind, str(args.repeat), str(pods), str(pols)]))
    if rows:
        load = os.getloadavg()
        print(
            f"NetworkPolicy sync; median (min) of {args.repeat} "
            "runs; "
            f"load average {load[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(
            "targets (10k x 1k, 1000 local): full <= 400 ms, one pod or policy change <= 5 ms, "
            "RSS < 150 MB; (sync): the whole view diffed by identity, (update): the changes only"
        )
        for r in rows:
            c = r["counts"]
            print(
                f"\n{r['pods']} pods x {r['pol']} policies, {r['local_pods']} on this node, "
                f"nft via {r['nft']}: {c['sets']} sets, "
                f"{c['set_elements']} elements, {c['chains']} chains, {c['rules']} rules "
                f"({r['script_kb']} KB script); RSS {r['rss_mb']:.0f} MB; "
                f"incremental fallbacks to full: {r['full_syncs'] - 1}"
            )
            for name, ts in r["times"].items():
                comp = statistics.median(p[0] for p in r["parts"][name])
                appl = statistics.median(p[1] for p in r["parts"][name])
                print(
                    f"  {name:<27} {statistics.median(ts) * 1e3:7.1f} ms ({min(ts) * 1e3:6.1f})"
                    f"   = compile {comp * 1e3:6.1f} + nft {appl * 1e3:6.1f}"
                )
        print("\n(RSS: the whole process holding the 10k-pod/1k-policy state and its ruleset)")
    if not args.skip_iperf:
        affinity = args.iperf_affinity if args.iperf_affinity != "none" else ""
        if affinity == "auto":
            affinity = "0,1" if (os.cpu_count() or 1) >= 2 else ""
        load0 = os.getloadavg()[0]
        ip = bench_iperf(
            args.iperf_seconds,
            args.iperf_runs,
            affinity=affinity,
            omit=args.iperf_omit,
            nice=args.iperf_nice,
        )
        load1 = os.getloadavg()[0]
        print(
            f"\niperf3 TCP pod->node->pod: {args.iperf_runs} blocks x 3 conditions (rotating "
            f"order), {args.iperf_seconds}s each after {args.iperf_omit}s omitted, "
            f"CPU affinity {affinity or 'none'}, nice {args.iperf_nice}, "
            f"load average {load0:.1f} -> {load1:.1f}; "
            f"200 policies = {ip['rules_on_node']} rules on the node, both pods isolated "
            "both ways, the allowing rule last"
        )
        print(
            f"  {'condition':<16} {'median':>8} {'min':>7} {'q1':>7} {'q3':>7} {'max':>7}  Gbit/s"
        )
        for cond, xs in ip["runs"].items():
            q1, q3 = quartiles(xs)
            print(
                f"  {cond:<16} {statistics.median(xs):8.2f} {min(xs):7.2f} {q1:7.2f} "
                f"{q3:7.2f} {max(xs):7.2f}"
            )
        r = ip["pair_ratios"]
        q1, q3 = quartiles(r)
        lo, hi = median_ci(r)
        rlo, rhi = ratio_of_medians_ci(
            list(zip(ip["runs"]["200 policies"], ip["runs"]["none"], strict=True))
        )
        print(
            f"  200 policies / none: ratio of medians {ip['ratio'] * 100:.1f}% "
            f"(95% CI {rlo * 100:.1f}-{rhi * 100:.1f}%); per block: median "
            f"{ip['pair_ratio'] * 100:.1f}% (95% CI {lo * 100:.1f}-{hi * 100:.1f}%, "
            f"middle half {q1 * 100:.1f}-{q3 * 100:.1f}%, all {min(r) * 100:.1f}-"
            f"{max(r) * 100:.1f}%); conntrack only / none per block "
            f"{ip['ct_pair_ratio'] * 100:.1f}%; target >= 90%"
        )
        print("  per block:", [round(x * 100, 1) for x in r])


if __name__ == "__main__":
    main()
