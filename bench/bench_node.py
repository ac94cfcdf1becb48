"""Pod creation -> Ready on a real node: flock vs ptp + host-local, in one run.

What a user waits for when a Deployment scales: the API object created, the
scheduler binds it, the kubelet asks containerd for a sandbox, containerd runs
the CNI plugin, the container starts, the readiness probe passes. Both CNIs run
on the same harness (flock.testbed.kubenode: etcd, kube-apiserver, containerd
2.4, kubelet 1.34, controller-manager, scheduler, kube-proxy in namespaces), one
node after the other, with the same pods (the test image, an HTTP readiness
probe every second), so the difference is the CNI:

- `ptp`: Debian's containernetworking-plugins ptp + host-local, both families;
- `flock`: flock installed from deploy/install.yaml (DaemonSet, NodeConfig,
  peering with FRR), when the agent can run on the API (else the row says why).

Per node: N pods created by one `kubectl apply`; a `kubectl get pods --watch`
started before it timestamps, per pod, the first event with a pod IP and the
first with Ready=True (seconds from the apply). containerd's own CNI timer is
read from its debug log ("begin cni setup" -> "cni result" per sandbox, the span
its network_plugin_operations_duration_seconds metric covers). CPU time from the
node's cpuacct cgroup (kubelet, containerd, shims, pods, control plane daemons
started by the harness; not etcd/kube-apiserver) and flock's DaemonSet pod alone.
Printed, not asserted.

    .venv/bin/python bench/bench_node.py [--pods 50] [--only ptp|flock] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flock.testbed.kubenode import (  # noqa: E402
    TEST_IMAGE,
    KubeNode,
    flock_on_kubernetes_missing,
)
from flock.testbed.tools import tool_path  # noqa: E402

TEMPLATE = (
    '{.metadata.name}{" "}{.status.podIP}{" "}'
    '{.status.conditions[?(@.type=="Ready")].status}{"\\n"}'
)


def pods_manifest(n: int, prefix: str) -> str:
    items = []
    for i in range(n):
        items.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{prefix}-{i:03d}", "labels": {"bench": prefix}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [
                        {
                            "name": "app",
                            "image": TEST_IMAGE,
                            "imagePullPolicy": "Never",
                            "readinessProbe": {
                                "httpGet": {"path": "/ready", "port": 8080},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            }
        )
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})


class Watch:
    """`kubectl get pods --watch`: first time (monotonic) each pod had an IP / was Ready."""

    def __init__(self, node: KubeNode, selector: str) -> None:
        self.ip: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        cmd = [
            "nsenter", f"--net={node.netns_path}", str(tool_path("kubectl")),
            f"--kubeconfig={node.api.kubeconfig_path}",
            f"--cache-dir={node.dir / 'kubectl-cache'}",
            "get", "pods", "-l", selector, "--watch", "-o", f"jsonpath={TEMPLATE}",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            words = line.split()
            if not words:
                continue
            name = words[0]
            if len(words) >= 2 and words[1] and name not in self.ip:
                self.ip[name] = now
            if words[-1] == "True" and name not in self.ready:
                self.ready[name] = now

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def measure(node: KubeNode, n: int, label: str) -> dict[str, Any]:
    prefix = f"b{label}"
    watch = Watch(node, f"bench={prefix}")
    time.sleep(1.0)  # the watch's initial list is done before the pods exist
    cni_before = set(node.containerd_cni_timings())
    agents = [p["metadata"]["uid"] for p in node.flock_agent_pods()]
    cpu0 = node.cpu_seconds()
    agent0 = sum(node.pod_cpu_seconds(u) for u in agents)
    t0 = time.monotonic()
    node.kubectl("apply", "-f", "-", input=pods_manifest(n, prefix))
    deadline = t0 + 600
    while len(watch.ready) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    cpu = node.cpu_seconds() - cpu0
    agent_cpu = sum(node.pod_cpu_seconds(u) for u in agents) - agent0
    watch.close()
    ready = [t - t0 for t in watch.ready.values()]
    ips = [t - t0 for t in watch.ip.values()]
    cni = [v for k, v in node.containerd_cni_timings().items() if k not in cni_before]
    node.kubectl("delete", "pods", "-l", f"bench={prefix}", "--wait=true", timeout=600)
    return {
        "pods": n,
        "ready": len(ready),
        "ip_p50": pct(ips, 0.5),
        "ready_p50": pct(ready, 0.5),
        "ready_p90": pct(ready, 0.9),
        "all_ready": max(ready) if ready else float("nan"),
        "cni_n": len(cni),
        "cni_p50_ms": pct(cni, 0.5) * 1000,
        "cni_p99_ms": pct(cni, 0.99) * 1000,
        "cni_mean_ms": statistics.fmean(cni) * 1000 if cni else float("nan"),
        # Until the last pod was Ready: every node daemon, shim and pod; and flock's pod.
        "node_cpu_s": cpu,
        "agent_cpu_s": agent_cpu if agents else None,
    }


def run_ptp(n: int) -> dict[str, Any]:
    node = KubeNode(prefix="fkb", containerd_log_level="debug")
    with node:
        node.use_reference_cni()
        node.wait_node_ready()
        out = measure(node, n, "ptp")
        out["node_up_s"] = node.timings["node_up"]
    return out


def run_flock(n: int) -> dict[str, Any]:
    node = KubeNode(
        prefix="fkb",
        router=True,
        images=("pause", "test", "flock"),
        containerd_log_level="debug",
    )
    with node:
        node.install_flock()
        out = measure(node, n, "flock")
        out["node_up_s"] = node.timings["node_up"]
        out["flock_node_ready_s"] = node.timings["flock_node_ready"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=50)
    ap.add_argument("--only", choices=("ptp", "flock"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    results: dict[str, Any] = {}
    if a.only in (None, "ptp"):
        print(f"ptp + host-local: {a.pods} pods ...", flush=True)
        results["ptp"] = run_ptp(a.pods)
    if a.only in (None, "flock"):
        reason = flock_on_kubernetes_missing()
        if reason:
            print(f"flock: not measured: {reason}", flush=True)
            results["flock"] = {"skipped": reason}
        else:
            print(f"flock: {a.pods} pods ...", flush=True)
            results["flock"] = run_flock(a.pods)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    rows = [
        ("node up (s)", "node_up_s", "{:.1f}"),
        ("pods Ready", "ready", "{:d}"),
        ("pod IP seen p50 (s)", "ip_p50", "{:.2f}"),
        ("Ready p50 (s)", "ready_p50", "{:.2f}"),
        ("Ready p90 (s)", "ready_p90", "{:.2f}"),
        ("all Ready (s)", "all_ready", "{:.2f}"),
        ("containerd CNI setups timed", "cni_n", "{:d}"),
        ("containerd CNI p50 (ms)", "cni_p50_ms", "{:.1f}"),
        ("containerd CNI p99 (ms)", "cni_p99_ms", "{:.1f}"),
        ("containerd CNI mean (ms)", "cni_mean_ms", "{:.1f}"),
        ("node CPU until all Ready (s)", "node_cpu_s", "{:.1f}"),
        ("  of it flock's pod (s)", "agent_cpu_s", "{:.1f}"),
    ]
    cols = [k for k in ("ptp", "flock") if k in results]
    print(f"\n{'figure':<30}" + "".join(f"{c:>16}" for c in cols))
    for label, key, fmt in rows:
        cells = []
        for c in cols:
            v = results[c].get(key)
            cells.append(f"{fmt.format(v) if v is not None else '-':>16}")
        print(f"{label:<30}" + "".join(cells))
    for c in cols:
        if "skipped" in results[c]:
            print(f"{c}: {results[c]['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
