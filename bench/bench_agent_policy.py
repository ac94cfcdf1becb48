"""What NetworkPolicy adds to a pod's ADD, measured through the real agent and plugin.

A pod's ADD returns only after the nftables rules that apply to it are in place
(docs/policy.md, "No window without policy"), so with policies in force every ADD
waits for a policy sync; with none it does not wait at all. This measures the
difference end to end: a node namespace with the real agent
(`flock.testbed.node.TestNode`), the real plugin executed as a runtime executes
it, 100 dual-stack pods added one after the other, timed from exec to exit.

Scenarios, run interleaved (A, B, A, B, ...) on a fresh node each time so that
machine noise spreads over both:

- none: no NetworkPolicy.
- 50 policies: 50 policies in 5 namespaces (podSelector, namespaceSelector, both,
  named ports, endPort, ipBlock with except, egress), written before the agent
  starts; every pod is selected by at least one, so every ADD adds a verdict
  chain, map entries and peer-set elements.

Pod namespaces and manifests exist before the clock starts (the runtime and the
API server would have them). Besides the plugin's wall time, the agent's own log
line for each ADD gives the reconcile share (the wait for the policy sync).

Run as root:  .venv/bin/python bench/bench_agent_policy.py [--pods 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from flock.testbed.node import Pod, TestNode

PREFIX = os.environ.get("FLOCK_BENCH_PREFIX", "fwb")
NAMESPACES = [f"team{i}" for i in range(5)]
SPEC: dict[str, Any] = {"cidr6": ["2001:db8:f0b1::/64"], "cidr4": ["10.62.0.0/22"]}


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def policy(i: int) -> dict[str, Any]:
    """The i-th of the synthetic policies: one of ten shapes, in namespace team(i%5)."""
    ns = NAMESPACES[i % len(NAMESPACES)]
    sel = {"matchLabels": {"app": f"svc{i % 10}"}}
    shape = i % 10
    spec: dict[str, Any] = {"podSelector": sel}
    if shape == 0:
        spec["policyTypes"] = ["Ingress"]  # deny all ingress
    elif shape == 1:
        spec["ingress"] = [
            {"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}], "ports": [{"port": 80}]}
        ]
    elif shape == 2:
        spec["ingress"] = [
            {"from": [{"namespaceSelector": {"matchLabels": {"team": f"t{(i + 1) % 5}"}}}]}
        ]
    elif shape == 3:
        spec["ingress"] = [
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"team": "t0"}},
                        "podSelector": {
                            "matchExpressions": [
                                {"key": "tier", "operator": "In", "values": ["front", "mid"]}
                            ]
                        },
                    }
                ],
                "ports": [{"port": "http", "protocol": "TCP"}],
            }
        ]
    elif shape == 4:
        spec["ingress"] = [
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.62.0.0/24"]}}]},
            {"from": [{"ipBlock": {"cidr": "2001:db8::/32", "except": ["2001:db8:f0b1::/64"]}}]},
        ]
    elif shape == 5:
        spec["ingress"] = [{"ports": [{"port": 8000, "endPort": 8100, "protocol": "TCP"}]}]
    elif shape == 6:
        spec["policyTypes"] = ["Egress"]
        spec["egress"] = [
            {"to": [{"podSelector": {"matchLabels": {"tier": "back"}}}], "ports": [{"port": 5432}]},
            {"ports": [{"port": 53, "protocol": "UDP"}]},
        ]
    elif shape == 7:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["ingress"] = [{"from": [{"podSelector": {}}]}]
        spec["egress"] = [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "http"}]}]
    elif shape == 8:
        spec["ingress"] = [
            {
                "from": [
                    {
                        "podSelector": {
                            "matchExpressions": [
                                {"key": "tier", "operator": "NotIn", "values": ["back"]}
                            ]
                        }
                    }
                ]
            }
        ]
    else:
        spec["ingress"] = [
            {"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"tier": "mid"}}}]}
        ]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"np{i}", "namespace": ns},
        "spec": spec,
    }


def run_scenario(n_policies: int, n_pods: int) -> dict[str, Any]:
    """A fresh node with `n_policies` in force; ADD `n_pods` pods; timings in seconds."""
    node = TestNode.create(PREFIX, v6="2001:db8:fff2::1/64", v4="198.51.100.62/24")
    try:
        node.set_node_config(SPEC)
        for i, ns in enumerate(NAMESPACES):
            node.write(
                f"ns-{ns}.yaml",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": ns, "labels": {"team": f"t{i}"}},
                },
            )
        for i in range(n_policies):
            node.write(f"np-{i}.yaml", policy(i))
        node.start_agent()
        pods: list[Pod] = []
        for k in range(n_pods):
            ns, name = NAMESPACES[k % len(NAMESPACES)], f"p{k}"
            uid = node.put_pod(
                name,
                namespace=ns,
                labels={"app": f"svc{k % 10}", "tier": ("front", "mid", "back")[k % 3]},
                ports=[{"name": "http", "containerPort": 8080 + k % 3}],
            )
            pod = Pod(ns, name, uid, node.new_pod_netns(), uuid.uuid4().hex)
            node.pods[f"{ns}/{name}"] = pod
            pods.append(pod)
        time.sleep(0.5)  # let the agent take in the manifests, as it would have long before
        adds: list[float] = []
        for pod in pods:
            res = node.cni_add(pod)
            if not res.ok:
                raise RuntimeError(f"ADD {pod.namespace}/{pod.name}: {res.stdout}")
            adds.append(res.seconds)
        reconcile: list[float] = []
        kernel: list[float] = []
        for line in node.agent_log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "ADD" and isinstance(rec.get("ms"), dict):
                # The policy sync runs before the veth since ADD puts policy first
                # ("policy"); "reconcile" is what follows the veth (anycast, exports).
                ms = rec["ms"]
                reconcile.append((float(ms["reconcile"]) + float(ms.get("policy", 0))) / 1000)
                kernel.append(float(rec["ms"]["persist+kernel"]) / 1000)
        pol = node.status().get("policy") or {}
        return {
            "add": adds,
            "reconcile": reconcile,
            "kernel": kernel,
            "chains": pol.get("chains"),
            "elements": pol.get("set_elements"),
            "rejected": len(pol.get("rejected_policies") or {}),
        }
    finally:
        node.destroy()


# ---------------------------------------------------------------------------
# --scale: one change through the agent's reconcile loop at 10,000 pods x 1,000 policies


class ScaleStore:
    """The datastore as the reconcile loop sees it: a snapshot rebuilt (dicts copied)
    after each change, as both datastores do, and one event per changed object."""

    def __init__(self, pods: list[Any], namespaces: dict[str, Any], policies: list[Any]) -> None:
        from flock.agent.datastore.base import Event

        self.pods = {p.key: p for p in pods}
        self.namespaces = namespaces
        self.policies = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in policies}
        self.queues: list[asyncio.Queue[Event]] = []
        self._snap: Any = None
        from flock.model.nodeconfig import API_VERSION, KIND, NodeConfig

        # Aggregates that hold every pod address (no per-pod BGP export, as on a node).
        self.node_config = NodeConfig.from_object(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": "n"},
                "spec": {"cidr6": ["fd10::/16"], "cidr4": ["10.0.0.0/8"]},
            }
        )

    def subscribe(self) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.queues.append(q)
        return q

    def snapshot(self) -> Any:
        from flock.agent.datastore.base import Snapshot

        if self._snap is None:
            self._snap = Snapshot(
                node_name="n",
                node_config=self.node_config,
                pods=self.pods.copy(),
                namespaces=self.namespaces.copy(),
                network_policies=self.policies.copy(),
                synced=True,
            )
        return self._snap

    def _emit(self, kind: Any, ns: str, name: str) -> None:
        from flock.agent.datastore.base import Event, EventType

        self._snap = None
        for q in self.queues:
            q.put_nowait(Event(kind, EventType.MODIFIED, ns, name))

    def set_pod(self, key: tuple[str, str], pod: Any) -> None:
        from flock.agent.datastore.base import Kind

        if pod is None:
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod
        self._emit(Kind.POD, *key)

    def set_policy(self, key: tuple[str, str], obj: Any) -> None:
        from flock.agent.datastore.base import Kind

        self.policies[key] = obj
        self._emit(Kind.NETWORK_POLICY, *key)


async def scale_run(n_pods: int, n_pol: int, n_local: int, repeat: int, how: str) -> dict[str, Any]:
    """Inside a node namespace: the reconcile loop with the policy applier `how`
    ("update": this tree's NftPolicy; "old:PATH": the NftPolicy of another appliers.py,
    e.g. the one before O(change) updates) over libnftables; each change is timed from
    the datastore's change to `Reconciler.sync()` returning, as an ADD waits."""
    import concurrent.futures
    import dataclasses
    import importlib.util
    import ipaddress
    import random
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_policy as bp
    from flock.agent.appliers import NftPolicy
    from flock.agent.reconcile import AllocationIndex, Reconciler
    from flock.apply.nft import NftLib, PolicyEngine, delete_table
    from flock.model.allocation import Allocation, AttachmentKey
    from flock.model.policy import NetworkPolicy

    applier_cls: Any = NftPolicy
    if how.startswith("old:"):
        spec = importlib.util.spec_from_file_location("old_appliers", how[4:])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        applier_cls = mod.NftPolicy
    rnd = random.Random(1)
    pods = bp.make_pods(n_pods, rnd)
    objs = [bp.policy_object(i, rnd) for i in range(n_pol)]
    store = ScaleStore(pods, bp.make_namespaces(), objs)
    index = AllocationIndex()

    def alloc(pod: Any, i: int) -> Allocation:
        v6 = next(a for a in pod.ips if a.version == 6)
        v4 = next(a for a in pod.ips if a.version == 4)
        return Allocation(
            key=AttachmentKey(f"c{i:011x}", "eth0"),
            namespace=pod.namespace,
            pod=pod.name,
            host_ifname=f"flk{i:011x}",
            v6=ipaddress.IPv6Address(v6),
            v4=ipaddress.IPv4Address(v4),
        )

    step = max(1, n_pods // n_local)
    local = pods[::step][:n_local]
    for i, p in enumerate(local):
        index.put(alloc(p, i))
    nft = NftLib()
    delete_table(nft)
    engine = PolicyEngine(nft)
    pool = concurrent.futures.ThreadPoolExecutor(4)

    async def run_kernel(fn: Any, *a: Any, **kw: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, lambda: fn(*a, **kw))

    events = store.subscribe() if how == "update" else None
    applier = applier_cls(run_kernel, engine, events) if events else applier_cls(run_kernel, engine)
    rec = Reconciler(snapshot=store.snapshot, index=index, policy=applier)
    task = asyncio.create_task(rec.run())
    t0 = time.perf_counter()
    assert (await rec.sync()).policy_ok
    out: dict[str, Any] = {"first sync": [time.perf_counter() - t0], "how": how}

    parts: dict[str, list[float]] = {}

    async def timed(change: Any) -> float:
        before = engine.status()["syncs"]
        t = time.perf_counter()
        change()
        outcome = await rec.sync()
        dt = time.perf_counter() - t
        assert outcome.policy_ok, outcome.error
        st = engine.status()
        if st["syncs"] != before:  # the engine's own share: compile, and nft
            parts.setdefault("compile", []).append(st["last_compile_s"])
            parts.setdefault("nft", []).append(st["last_apply_s"])
        return dt

    target = local[0]
    newpod = bp.make_pods(n_pods + 1, random.Random(7))[-1]
    other = next(a for a in bp.APPS if a != target.labels["app"])
    relabelled = dataclasses.replace(target, labels={**target.labels, "app": other})
    k = next(i for i, o in enumerate(objs) if NetworkPolicy.from_object(o).selects(target))
    pol0 = objs[k]
    key0 = (pol0["metadata"]["namespace"], pol0["metadata"]["name"])
    changed = {
        "metadata": pol0["metadata"],
        "spec": {
            "podSelector": {"matchLabels": {"app": bp.APPS[1]}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}]}],
        },
    }
    # A pod of another node labelled like one that is in a peer set: it joins that set.
    applied = engine.applied
    assert applied is not None
    by_ip = {str(ip): p for p in pods for ip in p.ips}
    member = next(
        by_ip[str(e)]
        for name, st in sorted(applied.sets.items())
        if name.startswith("peer_")
        for e in st.elements
        if str(e) in by_ip
    )
    twin = dataclasses.replace(member, name="newremote", ips=newpod.ips)
    newlocal = dataclasses.replace(target, name="newlocal", ips=newpod.ips)
    store.set_pod(newlocal.key, newlocal)  # the API server has it before the ADD
    assert (await rec.sync()).policy_ok
    new_alloc = alloc(newlocal, n_local + 1)
    cases = {
        # A pass with nothing to do: the loop's own floor (wake-ups, the pass, notify).
        "no change (the loop's floor)": (lambda: None, lambda: None),
        "remote pod added / deleted": (
            lambda: store.set_pod(newpod.key, newpod),
            lambda: store.set_pod(newpod.key, None),
        ),
        "remote pod in peer sets added / deleted": (
            lambda: store.set_pod(twin.key, twin),
            lambda: store.set_pod(twin.key, None),
        ),
        "local pod relabelled / back": (
            lambda: store.set_pod(target.key, relabelled),
            lambda: store.set_pod(target.key, target),
        ),
        "policy changed / back": (
            lambda: store.set_policy(key0, changed),
            lambda: store.set_policy(key0, dict(pol0)),
        ),
        "local pod ADD / DEL": (
            lambda: index.put(new_alloc),
            lambda: index.remove(new_alloc.key),
        ),
    }
    for name, (fwd, back) in cases.items():
        ts: list[float] = []
        parts.clear()
        for _ in range(repeat):
            ts.append(await timed(fwd))
            ts.append(await timed(back))
        out[name] = ts
        for part, xs in parts.items():
            out[f"  {name}: engine {part}"] = xs
    out["syncs/updates"] = [getattr(applier, "syncs", -1), getattr(applier, "updates", -1)]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    delete_table(nft)
    pool.shutdown()
    return out


def scale_in_netns(args: list[str]) -> dict[str, Any]:
    from flock.testbed import netns

    name = netns.unique_name("fwbs", 8)
    netns.create(name)
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, __file__, "--scale-inner", *args],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        return dict(json.loads(out.stdout.splitlines()[-1]))
    finally:
        netns.delete(name)


def scale_main(args: argparse.Namespace) -> None:
    """Interleaved rounds of the applier before O(change) updates (`--old`, an
    appliers.py) and this tree's; medians per change kind."""
    hows = ["update"] + ([f"old:{args.old}"] if args.old else [])
    got: dict[str, dict[str, list[float]]] = {h: {} for h in hows}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for how in hows if r % 2 == 0 else list(reversed(hows)):
            inner = [str(args.scale_pods), str(args.scale_policies), str(args.scale_local)]
            res = scale_in_netns([*inner, str(args.repeat), how])
            loads.append(os.getloadavg()[0])
            for k, v in res.items():
                if isinstance(v, list) and k != "syncs/updates":
                    got[how].setdefault(k, []).extend(v)
            got[how]["syncs/updates"] = res["syncs/updates"]
    print(
        f"\none change through the agent's reconcile loop (datastore change -> sync() "
        f"returns), {args.scale_pods} pods x {args.scale_policies} policies, "
        f"{args.scale_local} local, libnftables, {args.rounds} interleaved rounds x "
        f"{args.repeat} x 2 directions; load average {min(loads):.1f}-{max(loads):.1f}; "
        "target <= 5 ms per single-pod or single-policy change"
    )
    print(f"| change | {' | '.join(h.split(':')[0] + ' p50 (p90)' for h in hows)} |")
    print("|---|" + "---|" * len(hows))
    for k in got[hows[0]]:
        if k == "syncs/updates":
            continue
        cells = [
            f"{statistics.median(got[h][k]) * 1e3:.2f} ms ({pct(got[h][k], 90) * 1e3:.2f})"
            if got[h].get(k)
            else "-"
            for h in hows
        ]
        print(f"| {k} | {' | '.join(cells)} |")
    for h in hows:
        print(f"{h.split(':')[0]}: applier syncs/updates {got[h]['syncs/updates']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--policies", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds")
    ap.add_argument("--repeat", type=int, default=10, help="--scale: changes per kind per round")
    ap.add_argument("--scale", action="store_true", help="one change at 10k pods x 1k policies")
    ap.add_argument("--scale-pods", type=int, default=10_000)
    ap.add_argument("--scale-policies", type=int, default=1_000)
    ap.add_argument("--scale-local", type=int, default=110)
    ap.add_argument("--old", default="", help="--scale: an appliers.py to compare against")
    ap.add_argument("--scale-inner", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.scale_inner:
        n_pods, n_pol, n_local, rep, how = args.scale_inner
        res = asyncio.run(scale_run(int(n_pods), int(n_pol), int(n_local), int(rep), how))
        print(json.dumps(res))
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
    if args.scale:
        scale_main(args)
        return
    scenarios = {"none": 0, f"{args.policies} policies": args.policies}
    got: dict[str, dict[str, list[float]]] = {
        k: {"add": [], "reconcile": [], "kernel": []} for k in scenarios
    }
    extra: dict[str, Any] = {}
    for r in range(args.rounds):
        order = list(scenarios.items())
        if r % 2:
            order.reverse()
        for label, n in order:
            res = run_scenario(n, args.pods)
            got[label]["add"] += res["add"]
            got[label]["reconcile"] += res["reconcile"]
            got[label]["kernel"] += res["kernel"]
            extra[label] = res
            print(
                f"  round {r + 1} {label:<13} ADD p50 {pct(res['add'], 50) * 1000:6.1f} ms",
                flush=True,
            )
    load = os.getloadavg()[0]
    print(
        f"\nADD latency through agent + plugin, {args.pods} dual-stack pods x {args.rounds} rounds "
        f"(interleaved, fresh node each), load average {load:.1f}\n"
    )
    print(
        f"| {'scenario':<13} | ADD p50 | ADD p99 | ADD mean | agent reconcile p50 | p99 "
        "| agent veth+routes p50 | chains | set elements |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base50 = pct(got["none"]["add"], 50)
    base99 = pct(got["none"]["add"], 99)
    for label in scenarios:
        a, rc, kn = got[label]["add"], got[label]["reconcile"], got[label]["kernel"]
        print(
            f"| {label:<13} | {pct(a, 50) * 1000:.1f} ms | {pct(a, 99) * 1000:.1f} ms "
            f"| {statistics.mean(a) * 1000:.1f} ms | {pct(rc, 50) * 1000:.2f} ms "
            f"| {pct(rc, 99) * 1000:.2f} ms | {pct(kn, 50) * 1000:.2f} ms "
            f"| {extra[label]['chains']} | {extra[label]['elements']} |"
        )
    label = f"{args.policies} policies"
    rc0, rc1 = got["none"]["reconcile"], got[label]["reconcile"]
    print(
        "\nadded by policy, plugin wall time: "
        f"p50 {(pct(got[label]['add'], 50) - base50) * 1000:+.1f}"
        f" ms, p99 {(pct(got[label]['add'], 99) - base99) * 1000:+.1f} ms; inside the agent "
        f"(the wait for the policy sync): p50 {(pct(rc1, 50) - pct(rc0, 50)) * 1000:+.2f} ms, "
        f"p99 {(pct(rc1, 99) - pct(rc0, 99)) * 1000:+.2f} ms"
    )
    if extra[label]["rejected"]:
        print(f"WARNING: {extra[label]['rejected']} policies rejected")


if __name__ == "__main__":
    main()
