"""The Kubernetes datastore at scale: initial sync, relist and memory with 10,000 pods.

Starts its own etcd + kube-apiserver (`flock.testbed.kube.ApiServer`), creates
`--namespaces` Namespaces, `--pods` Pods spread over them (labels, annotations,
a named port, an owner reference, as a Deployment's pods have; 1 in 100 on the
measured node) and `--policies` NetworkPolicies, then in a fresh interpreter:

- imports the whole agent (`flock.agent.main`) and reads its RSS (the baseline);
- starts `KubeDatastore` with the admin kubeconfig and times the initial sync
  (start -> synced: four paginated lists);
- reads the RSS again (VmRSS, after a gc), and the informers' figures;
- times a relist of the pod collection with nothing changed (what a 410 costs;
  0 changes must be delivered) and, with the pod watch stopped, one after
  `--churn` pods were relabelled (exactly `--churn` changes must be delivered).

Printed, not asserted. Run as root: `.venv/bin/python bench/bench_kube_informer.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flock.testbed.kube import ApiServer

CRD = Path(__file__).resolve().parents[1] / "deploy" / "crds" / "nodeconfig.yaml"

CHILD = r"""
import asyncio, gc, json, sys, time

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

t = time.perf_counter()
import flock.agent.main  # the whole agent, as deployed
from flock.agent.logs import setup_logging
setup_logging("warning")
from flock.agent.datastore.kube import KubeDatastore
from flock.kube.client import KubeClient
out = {"import_s": time.perf_counter() - t, "rss_baseline_mb": rss()}

async def main(kubeconfig, node):
    ds = KubeDatastore(KubeClient.from_kubeconfig(kubeconfig), node_name=node)
    t0 = time.perf_counter()
    await ds.start()
    await ds.wait_synced()
    out["sync_s"] = time.perf_counter() - t0
    snap = ds.snapshot()
    out["pods"] = len(snap.pods)
    out["namespaces"] = len(snap.namespaces)
    out["policies"] = len(snap.network_policies)
    out["pages"] = ds.pods.stats.list_pages
    gc.collect()
    out["rss_synced_mb"] = rss()
    t0 = time.perf_counter()
    await ds.pods._relist()
    out["relist_s"] = time.perf_counter() - t0
    out["relist_changes"] = ds.pods.stats.last_list_changes
    # Stop the pod watch, so the parent's changes reach us only through the relist.
    (task,) = [t for t in ds._tasks if t.get_name() == "informer-pods"]
    task.cancel()
    print("READY", flush=True)
    sys.stdin.readline()  # the parent modifies pods meanwhile
    t0 = time.perf_counter()
    await ds.pods._relist()
    out["relist_churn_s"] = time.perf_counter() - t0
    out["relist_churn_changes"] = ds.pods.stats.last_list_changes
    gc.collect()
    out["rss_end_mb"] = rss()
    await ds.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
print(json.dumps(out), flush=True)
"""


def pod(i: int, ns: str, node: str) -> dict[str, object]:
    app = f"app-{i % 50}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{app}-{i}",
            "namespace": ns,
            "labels": {"app": app, "pod-template-hash": "7d4b9c8f5", "tier": "web"},
            "annotations": {"flock.fritzlab.net/ipv4": "true", "example.com/build": str(i)},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7d4b9c8f5",
                    "uid": f"00000000-0000-0000-0000-{i:012d}",
                    "controller": True,
                }
            ],
        },
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": "web",
                    "image": "registry.example/web:1.27",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                }
            ],
        },
    }


def policy(i: int, ns: str) -> dict[str, object]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"allow-{i}", "namespace": ns},
        "spec": {
            "podSelector": {"matchLabels": {"app": f"app-{i % 50}"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"tier": "web"}}}],
                    "ports": [{"port": "http"}],
                }
            ],
        },
    }


def create_all(api: ApiServer, kind: str, objs: list[dict[str, object]], workers: int) -> float:
    """kubectl create in `workers` parallel batches; returns seconds."""
    t0 = time.perf_counter()
    chunks = [objs[i::workers] for i in range(workers)]

    def run(chunk: list[dict[str, object]]) -> None:
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": chunk})
        api.kubectl("create", "-f", "-", "-o", "name", input=doc, timeout=1800)

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(run, chunks))
    print(f"created {len(objs)} {kind} in {time.perf_counter() - t0:.1f} s", flush=True)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--policies", type=int, default=1_000)
    p.add_argument("--churn", type=int, default=500)
    p.add_argument("--workers", type=int, default=4)
    a = p.parse_args()
    node = "bench-node"
    with ApiServer(prefix="fkbi") as api:
        api.kubectl("apply", "--server-side", "-f", str(CRD))
        api.kubectl("wait", "--for=condition=Established", "crd/nodeconfigs.flock.fritzlab.net")
        nss = [f"ns-{i}" for i in range(a.namespaces)]
        create_all(
            api, "namespaces", [{"apiVersion": "v1", "kind": "Namespace",
                                 "metadata": {"name": n}} for n in nss], 1,
        )  # fmt: skip
        pods = [
            pod(i, nss[i % len(nss)], node if i % 100 == 0 else f"node-{i % 97}")
            for i in range(a.pods)
        ]
        create_all(api, "pods", pods, a.workers)
        create_all(api, "policies", [policy(i, nss[i % len(nss)]) for i in range(a.policies)], 2)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(api.host_kubeconfig_path), node],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "READY", line
        # Churn: label changes on some pods (what a rollout's relabel looks like).
        patch = '{"metadata":{"labels":{"tier":"changed"}}}'
        for i in range(0, min(a.churn, a.pods)):
            ns, name = pods[i]["metadata"]["namespace"], pods[i]["metadata"]["name"]  # type: ignore[index]
            api.request(
                "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", patch.encode(),
                content_type="application/merge-patch+json",
            )  # fmt: skip
        child.stdin.write("\n")
        child.stdin.flush()
        out = json.loads(child.stdout.readline())
        child.wait(60)
        rss = api.rss()
    print()
    print(f"{'agent import (all of flock.agent)':44s} {out['import_s'] * 1000:8.0f} ms")
    print(f"{'RSS after import':44s} {out['rss_baseline_mb']:8.1f} MB")
    print(
        f"{'initial sync':44s} {out['sync_s']:8.2f} s  ({out['pods']} pods, "
        f"{out['namespaces']} ns, {out['policies']} policies; {out['pages']} pod pages)"
    )
    print(f"{'RSS synced':44s} {out['rss_synced_mb']:8.1f} MB")
    print(
        f"{'relist pods, nothing changed':44s} {out['relist_s']:8.2f} s  "
        f"({out['relist_changes']} changes delivered)"
    )
    print(
        f"{f'relist pods after {a.churn} label changes':44s} {out['relist_churn_s']:8.2f} s  "
        f"({out['relist_churn_changes']} changes delivered)"
    )
    print(f"{'RSS at the end':44s} {out['rss_end_mb']:8.1f} MB")
    print(f"{'etcd / kube-apiserver RSS':44s} {rss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
