"""The agent on a real kube-apiserver: readiness to withdraw, scale, API load, ADD cache.

Runs a lab with the Kubernetes datastore (`flock lab up --kube`: etcd and
kube-apiserver in namespaces, FRR, one node with its agent and BIRD) and
measures, printing a table:

1. **Ready=false → withdraw.** The bench patches a replica's Pod status
   Ready=false at the API server (an HTTPS PATCH from a socket inside the API
   server's namespace) and times, from the moment the API server answered:
   (a) the BGP UPDATE withdrawing its anycast /128 on the wire at the router
   (AF_PACKET kernel timestamp), and (b) the route gone from FRR's table
   (zebra's RTM_DELROUTE in the router's namespace). p50/p99 over `--flips`
   flips (each followed by Ready=true and the route back).
2. **Scale.** 10,000 Pods (`--pods`), 1,000 NetworkPolicies and 100
   Namespaces created in the cluster, then the agent restarted: its initial
   sync (start → status `synced`), RSS and CPU seconds after the sync.
3. **API requests per agent per minute at rest**, counted in the API
   server's audit log of the agents' ServiceAccount (the lab writes it).
4. **ADD latency, cache hit vs GET**: CNI ADD through the real plugin of a
   pod the agent's watch has delivered, and the extra a cache miss pays: one
   pod GET as the agent makes it (from the node, with its token).

Run as root after `./scripts/setup` (which builds the Go tools):
`.venv/bin/python bench/bench_kube.py [--flips 200] [--pods 10000]`.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import signal
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_withdraw import Watch, pct
from flock.agent.status import query
from flock.lab import build, control, core, pods
from flock.lab.topology import Topology
from flock.testbed.kube import NetnsDialer

ANYCAST = "fd00:f10c:ff::53"
TOPOLOGY = {
    "name": "kbench",
    "router": {"asn": 65000, "addresses": ["fd00:f10c::1/64", "198.18.0.1/24"]},
    "nodes": [
        {
            "name": "node1",
            "asn": 65001,
            "uplink": ["fd00:f10c::11/64", "198.18.0.11/24"],
            "cidr6": ["fd00:f10c:1::/64"],
            "cidr4": ["198.18.1.0/24"],
            "allowedAddresses": [{"cidr": "fd00:f10c:ff::/64", "use": ["anycast"]}],
        }
    ],
    "pods": [
        {"name": "svc-1", "node": "node1", "labels": {"app": "svc"},
         "annotations": {"anycast": ANYCAST}},
        {"name": "svc-2", "node": "node1", "labels": {"app": "svc"},
         "annotations": {"anycast": ANYCAST}},
    ],
}  # fmt: skip


class Api:
    """HTTPS to the lab's API server from this process (sockets made inside its netns)."""

    def __init__(self, lab: core.Lab) -> None:
        self.dir = next(Path(r.ident) for r in lab.state.resources if r.role == "api server files")
        kubeconfig = json.loads(json.dumps(_yaml(self.dir / "admin.kubeconfig")))
        self.token = kubeconfig["users"][0]["user"]["token"]
        self.ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt"))
        self.dialer = NetnsDialer(f"/run/netns/{control.api_netns(lab.name)}")

    def connection(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection("127.0.0.1", 6443, context=self.ctx, timeout=60)
        conn.sock = self.ctx.wrap_socket(
            self.dialer.connect("127.0.0.1", 6443), server_hostname="127.0.0.1"
        )
        return conn

    def call(
        self,
        conn: http.client.HTTPSConnection,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


@contextmanager
def lab_up() -> Iterator[core.Lab]:
    topo = Topology.model_validate(TOPOLOGY)
    build.down(topo.name)
    print(build.up(topo, progress=lambda m: print(m, flush=True), standalone=False).splitlines()[1])
    try:
        yield core.Lab.open(topo.name)
    finally:
        build.down(topo.name)


def set_ready(api: Api, conn: http.client.HTTPSConnection, lab: core.Lab, pod: str, ready: bool):
    rec = lab.state.pods[f"default/{pod}"]
    status = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "podIPs": [{"ip": a} for a in rec.addresses],
    }
    code, body = api.call(
        conn,
        "PATCH",
        f"/api/v1/namespaces/default/pods/{pod}/status",
        {"metadata": {"uid": rec.uid}, "status": status},
        "application/merge-patch+json",
    )
    if code != 200:
        raise RuntimeError(f"PATCH {pod} status: {code} {body}")


def flips(lab: core.Lab, api: Api, n: int) -> dict[str, list[float]]:
    """Flip svc-1 Ready=false/true `n` times with svc-2 not Ready: the node's only replica."""
    conn = api.connection()
    prefix = f"{ANYCAST}/128"
    node_ip = "fd00:f10c::11"
    set_ready(api, conn, lab, "svc-2", False)
    watch = Watch(lab.router_ns, core.router_port("node1"), node_ip)
    wire: list[float] = []
    fib: list[float] = []
    try:
        for i in range(n):
            time.sleep(0.05)  # let the router settle before the next withdraw
            watch.forget(prefix)
            set_ready(api, conn, lab, "svc-1", False)
            t0 = time.time_ns()  # the API server has answered: the status is stored
            if not watch.wait(lambda: prefix in watch.wire and prefix in watch.fib_del, 30):
                raise RuntimeError(f"flip {i}: {prefix} not withdrawn")
            wire.append((watch.wire[prefix] - t0) / 1e6)
            fib.append((watch.fib_del[prefix] - t0) / 1e6)
            watch.forget(prefix)
            set_ready(api, conn, lab, "svc-1", True)
            if not watch.wait(lambda: prefix in watch.fib_add, 30):
                raise RuntimeError(f"flip {i}: {prefix} not back at the router")
    finally:
        watch.close()
        set_ready(api, conn, lab, "svc-1", True)
        conn.close()
    return {"UPDATE on the wire": wire, "gone from FRR's table": fib}


def populate(api: Api, *, pods: int, policies: int, namespaces: int) -> float:
    """Create the objects with 8 connections in parallel; returns seconds."""
    t0 = time.monotonic()

    def batch(make: Callable[[int], tuple[str, dict[str, Any]]], count: int) -> None:
        def worker(start: int) -> None:
            conn = api.connection()
            for i in range(start, count, 8):
                path, obj = make(i)
                code, body = api.call(conn, "POST", path, obj)
                if code not in (201, 409):
                    raise RuntimeError(f"POST {path}: {code} {body}")
            conn.close()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(8)))

    batch(
        lambda i: ("/api/v1/namespaces", {"metadata": {"name": f"bench-{i}", "labels": {
            "team": f"t{i % 10}"}}}),
        namespaces,
    )  # fmt: skip

    def pod(i: int) -> tuple[str, dict[str, Any]]:
        ns = f"bench-{i % namespaces}"
        return f"/api/v1/namespaces/{ns}/pods", {
            "metadata": {"name": f"p{i}", "labels": {"app": f"a{i % 50}", "tier": f"t{i % 3}"}},
            "spec": {
                "nodeName": f"other-{i % 100}",
                "containers": [{"name": "c", "image": "bench", "ports": [
                    {"name": "http", "containerPort": 8080}]}],
            },
        }  # fmt: skip

    def policy(i: int) -> tuple[str, dict[str, Any]]:
        ns = f"bench-{i % namespaces}"
        return f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", {
            "metadata": {"name": f"np{i}"},
            "spec": {
                "podSelector": {"matchLabels": {"app": f"a{i % 50}"}},
                "ingress": [{"from": [
                    {"podSelector": {"matchLabels": {"tier": f"t{i % 3}"}}},
                    {"namespaceSelector": {"matchLabels": {"team": f"t{i % 10}"}}},
                ], "ports": [{"port": "http"}, {"port": 53, "protocol": "UDP"}]}],
            },
        }  # fmt: skip

    batch(pod, pods)
    batch(policy, policies)
    return time.monotonic() - t0


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MB, CPU seconds) of a process."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


def agent_pid(lab: core.Lab) -> int:
    return next(int(r.ident) for r in lab.state.processes() if r.role == "agent node1")


def restart_agent(lab: core.Lab) -> tuple[float, int]:
    """SIGTERM the agent, start it again; (seconds until its status says synced, new pid)."""
    pid = agent_pid(lab)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    handle = lab.node("node1")
    bird = lab.node_dir("node1") / "bird"
    t0 = time.monotonic()
    new = handle.start_agent(
        "--bird-socket", str(bird / "bird.ctl"), "--bird-config", str(bird / "bird.conf"),
        "--router-id", "198.18.0.11", wait=0,
    )  # fmt: skip
    lab.state.add_process(new, role="agent node1")
    while True:
        try:
            if query(handle.status_socket, timeout=2.0).get("datastore_synced"):
                return time.monotonic() - t0, new
        except (OSError, ValueError):
            pass
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"agent not synced after 300 s:\n{handle.log_tail()}")
        time.sleep(0.05)


def audit_rate(lab: core.Lab, seconds: float) -> tuple[int, dict[str, int]]:
    """Requests the agents' ServiceAccount made during `seconds` of rest, by verb+resource."""
    log = lab.state.dir / "api-audit" / "agents.log"
    start = log.stat().st_size if log.exists() else 0
    time.sleep(seconds + 2)  # the audit batch flushes every second
    seen: dict[str, int] = {}
    with open(log, "rb") as f:
        f.seek(start)
        for line in f:
            ev = json.loads(line)
            if ev.get("stage") not in ("ResponseComplete", "ResponseStarted", "Panic"):
                continue
            if ev.get("stage") == "ResponseComplete" and ev.get("verb") == "watch":
                continue  # counted when it started
            ref = ev.get("objectRef") or {}
            key = f"{ev.get('verb')} {ref.get('resource', ev.get('requestURI'))}"
            seen[key] = seen.get(key, 0) + 1
    return sum(seen.values()), seen


def add_latency(lab: core.Lab, n: int) -> dict[str, list[float]]:
    """ADD with a cache hit, and what a cache miss adds: the pod GET itself.

    "ADD, cache hit": end to end through the real plugin, the pod created and
    delivered by the watch before the ADD. A miss (an ADD that outruns the watch)
    costs one GET more; forcing that race reliably from outside the agent is not
    possible (the watch event and the ADD arrive within a millisecond), so the GET
    is timed directly: the agent's own request, from the node's namespace, over the
    node's link to the API server, with the agent's ServiceAccount token, on a new
    connection each time (as a miss after idle would be).
    """
    from flock.lab.topology import PodSpec

    out: dict[str, list[float]] = {"ADD, cache hit (plugin exec to result)": [],
                                   "pod GET from the node (the miss's extra)": []}  # fmt: skip
    names = []
    for i in range(n):
        spec = PodSpec.model_validate({"name": f"lat-{i}", "node": "node1"})
        lab.topo = lab.topo.with_pod(spec)
        lab.save_topology()
        uid = lab.datastore.create_pod(spec)
        time.sleep(0.3)  # the watch delivers in milliseconds
        out["ADD, cache hit (plugin exec to result)"].append(_timed_add(lab, spec, uid))
        names.append(spec.name)
    kubeconfig = _yaml(lab.node_dir("node1") / "kubeconfig")
    server = kubeconfig["clusters"][0]["cluster"]["server"]
    host = server.split("//")[1].rsplit(":", 1)[0].strip("[]")
    token = kubeconfig["users"][0]["user"]["token"]
    ctx = ssl.create_default_context(cafile=str(Api(lab).dir / "pki" / "ca.crt"))
    dialer = NetnsDialer(lab.node("node1").path)
    for name in names:
        t0 = time.perf_counter()
        conn = http.client.HTTPSConnection(host, 6443, context=ctx, timeout=30)
        conn.sock = ctx.wrap_socket(dialer.connect(host, 6443), server_hostname=host)
        conn.request("GET", f"/api/v1/namespaces/default/pods/{name}",
                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"GET pod {name} as the agent: {resp.status}")
        out["pod GET from the node (the miss's extra)"].append((time.perf_counter() - t0) * 1000)
    dialer.close()
    for name in names:
        pods.delete_pod(lab.name, name)
    return out


def _timed_add(lab: core.Lab, spec: Any, uid: str) -> float:
    from flock.lab.state import PodRecord
    from flock.testbed import netns

    ns = core.pod_netns(lab.name, spec)
    lab.state.add_netns(ns, role=f"pod {spec.key}")
    netns.create(ns)
    rec = PodRecord(namespace=spec.namespace, name=spec.name, node=spec.node, netns=ns,
                    container_id=uid.replace("-", ""), uid=uid)  # fmt: skip
    lab.state.pods[spec.key] = rec
    lab.state.save()
    t0 = time.perf_counter()
    pods.cni(lab, rec, "ADD")
    return (time.perf_counter() - t0) * 1000


def _p50_p99(values: list[float]) -> str:
    if not values:
        return "none measured"
    return f"p50 {statistics.median(values):.1f} ms  p99 {pct(values, 0.99):.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flips", type=int, default=200)
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--policies", type=int, default=1_000)
    ap.add_argument("--namespaces", type=int, default=100)
    ap.add_argument("--rest", type=float, default=60.0, help="seconds of rest to count requests")
    ap.add_argument("--adds", type=int, default=20)
    args = ap.parse_args()
    tempfile.tempdir = None
    with lab_up() as lab:
        api = Api(lab)
        rows: list[tuple[str, str]] = []
        res = flips(lab, api, args.flips)
        for what, values in res.items():
            rows.append((f"Ready=false at API -> {what} (n={len(values)})", _p50_p99(values)))
        lat = add_latency(lab, args.adds)
        for mode, values in lat.items():
            rows.append((f"{mode} (n={len(values)})", _p50_p99(values)))
        took = populate(api, pods=args.pods, policies=args.policies, namespaces=args.namespaces)
        rows.append((f"created {args.pods} pods, {args.policies} policies, "
                     f"{args.namespaces} namespaces", f"{took:.1f} s"))  # fmt: skip
        sync, pid = restart_agent(lab)
        rss, cpu = proc_stats(pid)
        rows.append(("agent restart -> synced (initial list of everything)", f"{sync:.2f} s"))
        rows.append(("agent RSS after sync", f"{rss:.0f} MB"))
        rows.append(("agent CPU from start to synced", f"{cpu:.2f} s"))
        total, by = audit_rate(lab, args.rest)
        per_min = total * 60 / args.rest
        detail = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        rows.append((f"API requests per agent per minute at rest ({args.rest:.0f} s)",
                     f"{per_min:.1f} ({detail})"))  # fmt: skip
        rss2, cpu2 = proc_stats(pid)
        rows.append(("agent RSS / CPU after the rest", f"{rss2:.0f} MB / {cpu2 - cpu:.2f} s"))
    width = max(len(r[0]) for r in rows) + 2
    print()
    for k, v in rows:
        print(f"{k:<{width}}{v}")


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("run as root: the lab creates network namespaces")
    ipaddress.ip_address(ANYCAST)
    main()
