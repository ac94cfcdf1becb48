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
import json
import os
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=100)
    ap.add_argument("--policies", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved A/B rounds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (creates network namespaces)")
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
