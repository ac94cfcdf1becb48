"""CNI ADD/DEL latency and churn: flock vs the reference plugins bridge and ptp, in one run.

Both plugins are executed exactly as a runtime executes them: a subprocess with
the CNI_* environment and the network config on stdin, timed from exec to exit
with the result read. Pod namespaces and (for flock) pod manifests are created
before the clock starts, as the runtime and API server would have them.

- flock: a node namespace with the real agent (`flock.testbed.node.TestNode`),
  dual-stack NodeConfig, policy engine on (as deployed).
  flock runs twice: with the native launcher as the entry (`install-cni --python
  --launcher`, what a node runs) and with the Python plugin alone (--python hosts).
- reference: `bridge` and `ptp`, both with `host-local` IPAM and dual-stack
  ranges, each run from inside its own node namespace by a worker process (`ip
  netns exec`), so that the plugins program that namespace and the timing
  excludes `ip netns exec`. ptp waits for IPv6 DAD (~1.8 s per ADD): it gets
  fewer pods (--ptp-pods).

Figures: ADD and DEL p50/p99 over N sequential pods, ADD mean of the first vs
the last 100 pods (flatness), sequential ADD rate, sustained churn (ADD+DEL
pairs per second) sequentially and 16-way concurrent; the ratio of flock to
each reference from the same run, and the load average (the machine is shared).
Then, for flock, where the time goes: the launcher's exec and socket round trip
against a process that answers a canned reply at once, the interpreter alone
and the Python plugin against the same, the agent's RPC round trip for a no-op
verb, the agent's share (the same ADD/DEL sent straight to the socket), and the
kernel work inside the agent's ADD (its own per-ADD timings in the log).

FLOCK_BENCH_PREFIX sets the prefix of the namespaces and temp dirs (default "fab").

Run as root:  .venv/bin/python bench/bench_cni.py [--pods 500] [--ref-pods 500] [--ptp-pods 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from flock.agent import rpc
from flock.cni import plugin
from flock.testbed import netns
from flock.testbed.node import Pod, TestNode, pod_manifest

PREFIX = os.environ.get("FLOCK_BENCH_PREFIX", "fab")  # namespace/temp-dir name prefix
REF_BIN = Path("/usr/lib/cni")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def ms(x: float) -> str:
    return f"{x * 1000:.1f}"


# ---- reference worker (runs inside the reference node namespace) ----------------------------


def ref_config(kind: str, data_dir: str) -> dict[str, Any]:
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": "10.2.0.0/16"}], [{"subnet": "2001:db8:f002::/64"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
        "dataDir": data_dir,
    }
    if kind == "bridge":
        return {
            "cniVersion": "1.0.0",
            "name": "refbr",
            "type": "bridge",
            "bridge": "fabbr0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": ipam,
        }
    return {"cniVersion": "1.0.0", "name": "refnet", "type": "ptp", "ipMasq": False, "ipam": ipam}


def ref_exec(command: str, cid: str, ns_path: str, config: dict[str, Any]) -> tuple[float, bool]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": ns_path,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": str(REF_BIN),
    }
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(REF_BIN / config["type"])],
        input=json.dumps(config).encode(),
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - t0, p.returncode == 0


def reference_worker(kind: str, pods: int, churn: int, churn16: int) -> dict[str, Any]:
    data_dir = tempfile.mkdtemp(prefix=f"{PREFIX}ref-")
    cfg = ref_config(kind, data_dir)
    made: list[str] = []

    def new_ns() -> str:
        name = netns.unique_name(PREFIX + "r", 8)
        netns.create(name)
        made.append(name)
        return name

    try:
        nss = [new_ns() for _ in range(max(pods, 16))]
        cids = [uuid.uuid4().hex for _ in nss[:pods]]
        adds, dels = [], []
        for cid, n in zip(cids, nss, strict=False):
            dt, ok = ref_exec("ADD", cid, netns.path(n), cfg)
            if not ok:
                raise RuntimeError(f"reference {kind} ADD failed")
            adds.append(dt)
        for cid, n in zip(cids, nss, strict=False):
            dt, ok = ref_exec("DEL", cid, netns.path(n), cfg)
            dels.append(dt)

        def cycle(n: str) -> None:
            cid = uuid.uuid4().hex
            ref_exec("ADD", cid, netns.path(n), cfg)
            ref_exec("DEL", cid, netns.path(n), cfg)

        seq_rate = churn_rate(cycle, nss[:1], churn, 1)
        conc_rate = churn_rate(cycle, nss[:16], churn16, 16)
        return {"add": adds, "del": dels, "churn_seq": seq_rate, "churn_16": conc_rate}
    finally:
        for n in made:
            netns.delete(n)
        shutil.rmtree(data_dir, ignore_errors=True)


def churn_rate(cycle: Callable[[str], None], nss: list[str], cycles: int, workers: int) -> float:
    """ADD+DEL pairs per second, `workers` at a time, each on its own pod namespace."""
    if cycles <= 0:
        return float("nan")
    per = max(1, cycles // workers)

    def run(n: str) -> None:
        for _ in range(per):
            cycle(n)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(run, nss[:workers]))
    return per * workers / (time.perf_counter() - t0)


def run_reference(kind: str, pods: int, churn: int, churn16: int) -> dict[str, Any]:
    node = netns.unique_name(PREFIX + "R", 6)
    netns.create(node, forwarding=True)
    try:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                node,
                sys.executable,
                __file__,
                "--reference-worker",
                kind,
                "--ref-pods",
                str(pods),
                "--ref-churn",
                str(churn),
                "--ref-churn16",
                str(churn16),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        netns.delete(node)


# ---- flock -----------------------------------------------------------------------------------


def run_flock(
    pods: int, churn: int, churn16: int, agent_args: list[str], *, launcher: bool
) -> dict[str, Any]:
    node = TestNode.create(PREFIX, launcher=launcher)
    try:
        node.set_node_config({"cidr6": ["2001:db8:f001::/64"], "cidr4": ["10.1.0.0/16"]})
        node.start_agent(*agent_args)
        names = [f"b{i}" for i in range(pods)]
        node.write(
            "bench-pods.yaml",
            *[
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": n, "namespace": "bench", "uid": f"uid-{n}"},
                    "spec": {"nodeName": node.name, "containers": [{"name": "c", "image": "i"}]},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                }
                for n in names + [f"churn{i}" for i in range(16)]
            ],
        )
        bench_pods = [
            Pod("bench", n, f"uid-{n}", node.new_pod_netns(), uuid.uuid4().hex) for n in names
        ]
        for p in bench_pods:
            node.pods[p.name] = p
        adds, dels = [], []
        for p in bench_pods:
            r = node.cni_add(p)
            if not r.ok:
                raise RuntimeError(f"flock ADD failed: {r.stdout}")
            adds.append(r.seconds)
        for p in bench_pods:
            r = node.cni_del(p)
            if not r.ok:
                raise RuntimeError(f"flock DEL failed: {r.stdout}")
            dels.append(r.seconds)

        churn_pods = [
            Pod("bench", f"churn{i}", f"uid-churn{i}", node.new_pod_netns(), "") for i in range(16)
        ]
        for p in churn_pods:
            node.pods[p.name] = p
        by_ns = {p.netns_name: p for p in churn_pods}

        def cycle(ns_name: str) -> None:
            p = by_ns[ns_name]
            p.container_id = uuid.uuid4().hex
            if not node.cni_add(p).ok or not node.cni_del(p).ok:
                raise RuntimeError("flock churn cycle failed")

        seq_rate = churn_rate(cycle, [churn_pods[0].netns_name], churn, 1)
        conc_rate = churn_rate(cycle, [p.netns_name for p in churn_pods], churn16, 16)

        # Where the time goes: the interpreter alone, the plugin's whole ADD against an
        # agent that answers at once (launcher or Python), and the agent alone.
        python_stub = node.bin_dir / "flock.d" / "plugin"
        floor = interpreter_floor(python_stub if launcher else node.plugin, 30)
        instant = plugin_vs_instant_agent(node, bench_pods[0], 30)
        rpc_floor = []
        status = {"command": "STATUS", "config": node.network_config()}
        for _ in range(30):
            t0 = time.perf_counter()
            rpc.call(node.socket, status)
            rpc_floor.append(time.perf_counter() - t0)
            time.sleep(0.005)  # as between pods: the agent is idle when a request comes
        agent_add, agent_del = [], []
        msgs = [
            {
                "command": "ADD",
                "containerID": uuid.uuid4().hex,
                "netns": p.netns_path,
                "ifname": "eth0",
                "args": {"K8S_POD_NAMESPACE": "bench", "K8S_POD_NAME": p.name},
                "config": node.network_config(),
            }
            for p in bench_pods[:30]
        ]
        for msg in msgs:
            t0 = time.perf_counter()
            rep = rpc.call(node.socket, msg)
            agent_add.append(time.perf_counter() - t0)
            assert "result" in rep, rep
        for msg in msgs:
            msg["command"] = "DEL"
            t0 = time.perf_counter()
            rpc.call(node.socket, msg)
            agent_del.append(time.perf_counter() - t0)
        return {
            "add": adds,
            "del": dels,
            "churn_seq": seq_rate,
            "churn_16": conc_rate,
            "interpreter": floor,
            "plugin_instant": instant,
            "kernel": kernel_ms(node.agent_log)[-len(msgs) :],  # the ADDs sent directly
            "rpc_floor": rpc_floor,
            "agent_add": agent_add,
            "agent_del": agent_del,
        }
    finally:
        node.destroy()


def kernel_ms(log_path: Path) -> list[float]:
    """Per ADD, the agent's own "persist+kernel" time (s): veth, addresses, routes and
    the store's durable write, side by side (agent/service.py logs it per ADD)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"ADD"' not in line or '"persist+kernel"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        phases = rec.get("ms") if isinstance(rec, dict) else None
        if isinstance(phases, dict) and isinstance(phases.get("persist+kernel"), int | float):
            out.append(phases["persist+kernel"] / 1000)
    return out


def interpreter_floor(plugin: Path | None, n: int) -> list[float]:
    """Exec of the interpreter the installed plugin runs under, with its flags, doing nothing."""
    assert plugin is not None
    line = plugin.read_text().split("\n", 1)[0]
    argv = line[2:].split() if line.startswith("#!") else [sys.executable, "-I", "-S"]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([*argv, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


INSTANT_AGENT = """
import socket, sys
path = sys.argv[1]
reply = open(path.rpartition("/")[0] + "/reply.json", "rb").read()
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path + ".tmp")
srv.listen(16)
import os
os.rename(path + ".tmp", path)
while True:
    conn, _ = srv.accept()
    while conn.recv(65536):
        pass
    conn.sendall(reply)
    conn.close()
"""


def plugin_vs_instant_agent(node: TestNode, pod: Pod, n: int) -> list[float]:
    """The plugin's ADD, exec to result, against a socket that answers a canned result at
    once: the plugin's own share (interpreter, imports, config, connect, output)."""
    sock_path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}fake-")) / "agent.sock"
    reply = plugin.encode_reply(
        0,
        {
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "flk0123456789a", "mac": "ee:00:00:00:00:01", "mtu": 1500},
                {"name": "eth0", "mac": "0a:00:00:00:00:01", "sandbox": pod.netns_path},
            ],
            "ips": [
                {"interface": 1, "address": "2001:db8::1/128", "gateway": "fe80::1"},
                {"interface": 1, "address": "10.0.0.1/32", "gateway": "169.254.1.1"},
            ],
            "routes": [{"dst": "::/0", "gw": "fe80::1"}, {"dst": "0.0.0.0/0"}],
            "dns": {},
        },
        [],
    )
    # Its own process, so that answering costs no GIL hand-over in this one.
    (sock_path.parent / "reply.json").write_bytes(reply)
    server = subprocess.Popen([sys.executable, "-I", "-S", "-c", INSTANT_AGENT, str(sock_path)])
    deadline = time.monotonic() + 10
    while not sock_path.exists():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the instant agent did not start")
        time.sleep(0.01)
    out = []
    try:
        cfg = node.network_config(agentSocket=str(sock_path))
        for _ in range(n):
            r = node.cni(
                "ADD",
                container_id=uuid.uuid4().hex,
                netns_path=pod.netns_path,
                pod_namespace=pod.namespace,
                pod_name=pod.name,
                config=cfg,
            )
            if not r.ok:
                raise RuntimeError(f"plugin ADD against the instant agent failed: {r.stdout}")
            out.append(r.seconds)
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(sock_path.parent, ignore_errors=True)
    return out


# ---- readiness flip -> anycast route withdrawn --------------------------------------------


def seen(events: list[tuple[float, str]], start: int, want: str) -> bool:
    return any(want in ln for _, ln in events[start:])


def run_readiness(flips: int) -> dict[str, list[float]]:
    """Time from the pod manifest's Ready flip (the rename that publishes it) to the
    kernel's route change, seen by `ip monitor route` in the node namespace."""
    node = TestNode.create(PREFIX)
    mon = None
    try:
        node.set_node_config(
            {
                "cidr6": ["2001:db8:f001::/64"],
                "cidr4": ["10.1.0.0/16"],
                "allowedAddresses": [{"cidr": "2001:db8:a::/48", "use": ["anycast"]}],
            }
        )
        node.start_agent()
        pod = node.add_pod("dns", annotations={"anycast": "2001:db8:a::53"})
        mon = subprocess.Popen(
            ["ip", "netns", "exec", node.name, "ip", "-6", "monitor", "route"],
            stdout=subprocess.PIPE,
            text=True,
        )
        events: list[tuple[float, str]] = []
        cv = threading.Condition()

        def reader() -> None:
            assert mon is not None and mon.stdout is not None
            for line in mon.stdout:
                with cv:
                    events.append((time.perf_counter(), line))
                    cv.notify_all()

        threading.Thread(target=reader, daemon=True).start()
        time.sleep(0.3)
        withdraw: list[float] = []
        restore: list[float] = []
        for i in range(flips * 2):
            ready = i % 2 == 1
            # Prepare the new manifest first; the clock starts at the rename that
            # publishes it (what a writer's commit is).
            obj = pod_manifest(
                "dns",
                node=node.name,
                uid=pod.uid,
                annotations={"flock.fritzlab.net/anycast": "2001:db8:a::53"},
                ready=ready,
            )
            path = node.manifests_dir / "pod-default-dns.yaml"
            tmp = path.with_name(".flip.tmp")
            tmp.write_text(json.dumps(obj))
            with cv:
                n = len(events)
            t0 = time.perf_counter()
            os.replace(tmp, path)
            want = "2001:db8:a::53" if ready else "Deleted 2001:db8:a::53"
            with cv:
                ok = cv.wait_for(functools.partial(seen, events, n, want), 5)
                if not ok:
                    raise RuntimeError("route change not seen within 5 s")
                t1 = next(t for t, ln in events[n:] if want in ln)
            (restore if ready else withdraw).append(t1 - t0)
            time.sleep(0.02)
        return {"withdraw": withdraw, "restore": restore}
    finally:
        if mon is not None:
            mon.terminate()
            mon.wait(5)
        node.destroy()


# ---- report ----------------------------------------------------------------------------------


def summary(r: dict[str, Any]) -> dict[str, float]:
    add, dele = r["add"], r["del"]
    k = min(100, max(1, len(add) // 5))
    return {
        "add_p50": pct(add, 50),
        "add_p99": pct(add, 99),
        "del_p50": pct(dele, 50),
        "del_p99": pct(dele, 99),
        "first": statistics.mean(add[:k]),
        "last": statistics.mean(add[-k:]),
        "add_rate": len(add) / sum(add),
        "churn_seq": r["churn_seq"],
        "churn_16": r["churn_16"],
    }


RATES = ("add_rate", "churn_seq", "churn_16")


def main() -> int:
    load = os.getloadavg()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=500)
    ap.add_argument("--ref-pods", type=int, default=500, help="bridge pods")
    ap.add_argument("--ptp-pods", type=int, default=50, help="ptp pods (each waits for DAD)")
    ap.add_argument("--churn", type=int, default=200, help="flock ADD+DEL cycles (sequential)")
    ap.add_argument("--churn16", type=int, default=400, help="flock cycles, 16-way")
    ap.add_argument("--ref-churn", type=int, default=50)
    ap.add_argument("--ref-churn16", type=int, default=160)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-python", action="store_true", help="skip flock's Python-only plugin")
    ap.add_argument("--flips", type=int, default=0, help="readiness flips to time (0: skip)")
    ap.add_argument("--agent-arg", action="append", default=[], help="extra flock agent flag")
    ap.add_argument("--reference-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.reference_worker:
        print(
            json.dumps(reference_worker(a.reference_worker, a.ref_pods, a.ref_churn, a.ref_churn16))
        )
        return 0
    if os.geteuid() != 0:
        print("bench_cni: needs root (network namespaces)", file=sys.stderr)
        return 1
    runs: dict[str, dict[str, Any]] = {}
    print(f"flock, native launcher: {a.pods} dual-stack pods ...", flush=True)
    runs["flock"] = run_flock(a.pods, a.churn, a.churn16, a.agent_arg, launcher=True)
    if not a.no_python:
        print(f"flock, Python plugin: {a.pods} dual-stack pods ...", flush=True)
        runs["flock/py"] = run_flock(a.pods, a.churn, a.churn16, a.agent_arg, launcher=False)
    if not a.no_reference:
        print(f"bridge + host-local: {a.ref_pods} dual-stack pods ...", flush=True)
        runs["bridge"] = run_reference("bridge", a.ref_pods, a.ref_churn, a.ref_churn16)
        print(f"ptp + host-local: {a.ptp_pods} dual-stack pods (waits for DAD) ...", flush=True)
        runs["ptp"] = run_reference("ptp", a.ptp_pods, max(2, a.ref_churn // 10), 32)
    sums = {k: summary(v) for k, v in runs.items()}
    rows = [
        ("ADD p50 (ms)", "add_p50", ms, "<= 4"),
        ("ADD p99 (ms)", "add_p99", ms, "<= 10"),
        ("DEL p50 (ms)", "del_p50", ms, "<= 4"),
        ("DEL p99 (ms)", "del_p99", ms, ""),
        ("ADD mean, first 100 pods (ms)", "first", ms, "flat"),
        ("ADD mean, last 100 pods (ms)", "last", ms, "flat"),
        ("sequential ADD rate (/s)", "add_rate", lambda x: f"{x:.0f}", ">= 200"),
        ("churn ADD+DEL/s, sequential", "churn_seq", lambda x: f"{x:.1f}", ""),
        ("churn ADD+DEL/s, 16-way", "churn_16", lambda x: f"{x:.1f}", ""),
    ]
    refs = [k for k in ("bridge", "ptp") if k in sums]
    print()
    # "x better": how many times better flock (launcher) is than the reference.
    hdr = f"{'figure':<31}" + "".join(f"{k:>10}" for k in sums)
    hdr += "".join(f"{'vs ' + k:>11}" for k in refs) + "  target"
    print(hdr)
    print("-" * len(hdr))
    for label, key, fmt, target in rows:
        f = sums["flock"][key]
        line = f"{label:<31}" + "".join(f"{fmt(v[key]):>10}" for v in sums.values())
        for k in refs:
            r = sums[k][key]
            ratio = (f / r if key in RATES else r / f) if f and r else float("nan")
            line += f"{ratio:>10.2f}x"
        print(line + f"  {target}")
    print()
    counts = ", ".join(f"{k} {len(v['add'])}" for k, v in runs.items())
    print(
        f"pods: {counts}; load average (1/5/15 min) at start "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, at end {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs; 'vs X': times better than X (flock with the launcher)"
    )
    fl = runs["flock"]
    print("where flock's ADD time goes (p50):")
    rows2 = [
        ("launcher: exec + socket round trip, instant agent", fl["plugin_instant"]),
    ]
    if "flock/py" in runs:
        py = runs["flock/py"]
        rows2 += [
            ("Python plugin: exec + round trip, instant agent", py["plugin_instant"]),
            ("  of which the interpreter alone (-I -S -c pass)", py["interpreter"]),
        ]
    rows2 += [
        ("agent: RPC round trip of a no-op verb (STATUS)", fl["rpc_floor"]),
        ("agent: ADD over the socket, fresh pod netns", fl["agent_add"]),
        ("  of which kernel work + durable write (agent's log)", fl["kernel"]),
        ("agent: DEL over the socket", fl["agent_del"]),
    ]
    for label, xs in rows2:
        print(f"  {label:<56}{ms(pct(xs, 50)):>7} ms")
    if a.flips:
        rd = run_readiness(a.flips)
        w, rv = rd["withdraw"], rd["restore"]
        print()
        print(
            f"readiness flip (manifest renamed into place) -> kernel anycast route, {a.flips} each:"
        )
        print(f"  not Ready -> route deleted   p50 {ms(pct(w, 50))} ms  p99 {ms(pct(w, 99))} ms")
        print(f"  Ready     -> route added     p50 {ms(pct(rv, 50))} ms  p99 {ms(pct(rv, 99))} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
