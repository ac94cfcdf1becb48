"""NetworkPolicy through the real agent: no window between a pod's ADD and its rules.

The policy engine has its own traffic tests (`test_policy_traffic.py`) that call it
directly. These drive it the way a cluster does: the real `flock agent` runs in a
node namespace (`flock.testbed.node.TestNode`, prefix `fw`), NetworkPolicy and Pod
manifests are written into its manifests directory (what the API server would
hold), and the real CNI plugin is executed as a runtime executes it.

Each pod's sandbox gets a TCP echo server (dual-stack, several ports) *before* its
ADD, so the moment the ADD returns the pod would answer if nothing stopped the
traffic. The first probe after the ADD is the assertion: no retry, no wait. A
blocked probe is a connect timeout (nftables drops); a reachable one is a
completed echo; anything else (refused, unreachable) is neither, so a dead echo
server fails both kinds of cell. Once connected, the echo may take long on a
loaded machine: only the connect is timed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from echo import ECHO_SERVER, PROBE

from flock.apply.datapath import host_veth_name
from flock.testbed import netns
from flock.testbed.node import PYTHON, Pod, TestNode, pod_manifest
from flock.testbed.wait import wait_until

pytestmark = pytest.mark.root

PREFIX = "fw"
PORTS = (8080, 9090)
BLOCKED_TIMEOUT = 1.0  # a dropped SYN: no answer within this time (below TCP's 1 s SYN RTO)
ECHO_TIMEOUT = 30.0  # once connected: the echo server may be slow to run, never blocked
WAIT = 60.0  # deadline for the agent to apply a policy change (not an expectation)

SPEC: dict[str, Any] = {"cidr6": ["2001:db8:f0a1::/64"], "cidr4": ["10.61.0.0/24"]}


@dataclass
class Cluster:
    """A node with its agent, plus the echo servers started in pod sandboxes."""

    node: TestNode
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def policy(self, name: str, spec: Mapping[str, Any], *, namespace: str = "default") -> str:
        """Write a NetworkPolicy manifest; returns its file name."""
        fname = f"np-{namespace}-{name}.yaml"
        self.node.write(
            fname,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": namespace},
                "spec": dict(spec),
            },
        )
        return fname

    def remove(self, fname: str) -> None:
        (self.node.manifests_dir / fname).unlink()

    def pod(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        ports: Sequence[Mapping[str, Any]] = (),
        serve: Sequence[int] = PORTS,
    ) -> Pod:
        """Manifest, sandbox, echo server listening in the sandbox, then the plugin's ADD.

        Returns once the ADD has returned (the runtime would start containers now).
        """
        node = self.node
        uid = node.put_pod(name, labels=labels, ports=ports)
        pod = Pod(
            namespace="default",
            name=name,
            uid=uid,
            netns_name=node.new_pod_netns(),
            container_id=uuid.uuid4().hex,
        )
        node.pods[f"default/{name}"] = pod
        if serve:
            self.serve(pod, serve)
        pod.result = node.cni_add(pod)
        assert pod.result.ok, f"ADD {name}: {pod.result.stdout} {pod.result.stderr}"
        return pod

    def serve(self, pod: Pod, ports: Sequence[int]) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", pod.netns_name, PYTHON, "-c", ECHO_SERVER, *map(str, ports)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.servers.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"ready", proc.stderr.read() if proc.stderr else b""

    def stop_servers(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                proc.kill()  # by PID: ip netns exec execs the server in place
            proc.wait(5)
        self.servers.clear()


def addrs(pod: Pod) -> list[str]:
    assert pod.result is not None
    return pod.result.ips()


def probe(
    src: Pod, targets: Sequence[tuple[str, int]], timeout: float = BLOCKED_TIMEOUT
) -> list[str]:
    """One TCP connect (+ echo) from `src` to each target, concurrently; no retry."""
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            src.netns_name,
            PYTHON,
            "-c",
            PROBE,
            str(timeout),
            str(ECHO_TIMEOUT),
        ],
        input=json.dumps([[addr, "tcp", port] for addr, port in targets]).encode(),
        capture_output=True,
        timeout=ECHO_TIMEOUT + 60,
        check=True,
    )
    res = json.loads(out.stdout)
    assert isinstance(res, list)
    return [str(r) for r in res]


def reach(src: Pod, dst: Pod, port: int, timeout: float = BLOCKED_TIMEOUT) -> dict[str, str]:
    """Probe result per destination address (both families)."""
    targets = [(a, port) for a in addrs(dst)]
    return dict(zip([a for a, _ in targets], probe(src, targets, timeout), strict=True))


def all_ok(res: Mapping[str, str]) -> bool:
    return bool(res) and all(v == "ok" for v in res.values())


def all_blocked(res: Mapping[str, str]) -> bool:
    return bool(res) and all(v == "timeout" for v in res.values())


def wait_reach(
    src: Pod, dst: Pod, port: int, until: Callable[[Mapping[str, str]], bool], what: str
) -> None:
    """Probe until `until(result)`: for a policy change the agent applies in the background."""
    wait_until(lambda: reach(src, dst, port), until=until, timeout=WAIT, what=what)


class RulesetMonitor:
    """`nft monitor ruleset` in a namespace, read line by line as events arrive.

    `mark()` adds and deletes a table of its own and waits until the monitor has
    shown that: netlink delivers a namespace's ruleset events in order, so every
    change made before the mark has been read too. The first mark proves the monitor
    is subscribed; a later one returns the events since the previous mark.
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        # `ip netns exec` execs nft in place: the PID is the monitor's own.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "stdbuf", "-oL", "nft", "monitor", "ruleset"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._seen = 0  # lines returned by earlier marks
        self._marks = itertools.count()
        self._reader = threading.Thread(target=self._read, name="nft-monitor", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def mark(self) -> list[str]:
        """Mark the stream; returns the events between the previous mark and this one."""
        table = f"flockmark{next(self._marks)}"
        netns.run(["nft", "add", "table", "inet", table], netns=self.ns)
        netns.run(["nft", "delete", "table", "inet", table], netns=self.ns)
        end = f"delete table inet {table}"
        lines = wait_until(self.lines, until=lambda ls: end in ls, timeout=WAIT, what=end)
        cut = lines.index(end)
        events = [ln for ln in lines[self._seen : cut + 1] if "table inet flockmark" not in ln]
        self._seen = cut + 1
        return events

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)


def table(node: TestNode) -> str:
    return node.exec("nft", "list", "table", "inet", "flock", check=False)


def rejected(node: TestNode) -> dict[str, str]:
    pol = node.status().get("policy") or {}
    return dict(pol.get("rejected_policies") or {})


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A node with its NodeConfig written; the test starts the agent (so it can put
    manifests in place first)."""
    node = TestNode.create(PREFIX, v6="2001:db8:fff1::1/64", v4="198.51.100.61/24")
    c = Cluster(node)
    try:
        node.set_node_config(SPEC)
        yield c
    finally:
        c.stop_servers()
        log = node.log_tail(60)
        node.destroy()
        print(log)


DENY_INGRESS_X = {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"]}


def test_deny_all_ingress_holds_from_the_moment_add_returns(cluster: Cluster) -> None:
    """(a) A pod a deny-all-ingress policy selects is unreachable on the first probe
    after its ADD; an unselected pod added the same way is reachable at once."""
    cluster.policy("deny-x", DENY_INGRESS_X)
    cluster.node.start_agent()
    cli = cluster.pod("cli", labels={"app": "cli"})
    x1 = cluster.pod("x1", labels={"app": "x"})
    first = reach(cli, x1, 8080)
    plain = cluster.pod("plain", labels={"app": "plain"})
    control = reach(cli, plain, 8080)
    assert all_blocked(first), first
    assert all_ok(control), control
    # Only ingress is isolated: x1 itself still connects out.
    assert all_ok(reach(x1, plain, 9090))

    # A policy written while the agent runs, immediately followed by the ADD of a pod
    # it selects (no wait for the agent to notice the file): still no window.
    cluster.policy(
        "deny-y", {"podSelector": {"matchLabels": {"app": "y"}}, "policyTypes": ["Ingress"]}
    )
    y1 = cluster.pod("y1", labels={"app": "y"})
    first_y = reach(cli, y1, 9090)
    assert all_blocked(first_y), first_y
    assert all_ok(reach(plain, cli, 8080))


def test_allowed_client_connects_on_its_first_try(cluster: Cluster) -> None:
    """(b) With an allow-from policy in force, a client added afterwards can connect
    the moment its ADD returns: its addresses are already in the peer sets."""
    cluster.policy(
        "web-from-client",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
        },
    )
    cluster.node.start_agent()
    web = cluster.pod("web", labels={"app": "web"})
    c1 = cluster.pod("c1", labels={"role": "client"}, serve=())
    first = reach(c1, web, 8080)
    assert all_ok(first), first
    ruleset = table(cluster.node)
    for a in addrs(c1):
        assert a in ruleset, f"{a} not in a peer set:\n{ruleset}"
    # The rule's port and peer restrictions hold too.
    assert all_blocked(reach(c1, web, 9090))
    other = cluster.pod("other", labels={"role": "nobody"}, serve=())
    assert all_blocked(reach(other, web, 8080))
    # A second client, added while the first one's connections are live.
    c2 = cluster.pod("c2", labels={"role": "client"}, serve=())
    assert all_ok(reach(c2, web, 8080))


def test_policy_added_and_removed_while_the_agent_runs(cluster: Cluster) -> None:
    """(c) A policy written while the agent runs takes effect within a bounded time;
    removing its manifest restores reachability."""
    cluster.node.start_agent()
    db = cluster.pod("db", labels={"app": "db"})
    cli = cluster.pod("cli", labels={"app": "cli"})
    assert all_ok(reach(cli, db, 8080))
    fname = cluster.policy(
        "deny-db", {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}
    )
    wait_reach(cli, db, 8080, all_blocked, "cli -> db:8080 blocked")
    assert all_blocked(reach(cli, db, 9090))
    assert all_ok(reach(db, cli, 8080))  # cli is not selected
    cluster.remove(fname)
    wait_reach(cli, db, 8080, all_ok, "cli -> db:8080 open")
    assert all_ok(reach(cli, db, 9090))


def test_malformed_policy_is_reported_and_fails_closed(cluster: Cluster) -> None:
    """(d) A policy that does not validate is listed in `flock status` with the
    field that is wrong and fails closed (issue 10, item 4): its podSelector cannot be
    read, so every pod of its namespace is isolated until it is fixed; the good
    policies keep working beside it."""
    cluster.node.start_agent()
    cli = cluster.pod("cli", labels={"app": "cli"})
    x1 = cluster.pod("x1", labels={"app": "x"})
    y = cluster.pod("y", labels={"app": "y"})
    bad_spec = {
        "podSelector": {
            "matchExpressions": [{"key": "app", "operator": "Maybe", "values": ["cli"]}]
        },
        "policyTypes": ["Ingress"],
    }
    # Alone: reported although no valid policy exists, and nothing reaches the
    # namespace's pods.
    cluster.policy("bad", bad_spec)
    wait_until(
        lambda: rejected(cluster.node),
        until=lambda r: "default/bad" in r,
        timeout=WAIT,
        what="bad rejected",
    )
    assert "Maybe" in rejected(cluster.node)["default/bad"]
    wait_reach(x1, cli, 8080, all_blocked, "x1 -> cli:8080 blocked (fail closed)")
    assert all_blocked(reach(x1, y, 8080))
    z = cluster.pod("z", labels={"app": "z"})  # a pod started meanwhile: closed at once
    assert all_blocked(reach(x1, z, 8080))
    # Next to a good one.
    cluster.policy("deny-x", DENY_INGRESS_X)
    x2 = cluster.pod("x2", labels={"app": "x"})
    assert "default/bad" in rejected(cluster.node)
    assert all_blocked(reach(cli, x2, 8080))
    # Fixed: no longer rejected, enforced as written (it selects cli), y open again.
    cluster.policy("bad", {**bad_spec, "podSelector": {"matchLabels": {"app": "cli"}}})
    wait_until(
        lambda: rejected(cluster.node),
        until=lambda r: "default/bad" not in r,
        timeout=WAIT,
        what="bad accepted",
    )
    wait_reach(x1, y, 8080, all_ok, "x1 -> y:8080 open once bad parses")
    assert all_blocked(reach(x1, cli, 8080))
    assert all_blocked(reach(cli, x2, 8080))


def test_named_port_resolves_per_destination_pod(cluster: Cluster) -> None:
    """(e) One named port, two numbers: the agent resolves `http` against each
    destination pod's own container ports, for ingress and for egress."""
    cluster.policy(
        "web-http",
        {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"protocol": "TCP", "port": "http"}]}],
        },
    )
    cluster.node.start_agent()
    cli = cluster.pod("cli", labels={"app": "cli"}, serve=())
    w1 = cluster.pod("w1", labels={"app": "web"}, ports=[{"name": "http", "containerPort": 8080}])
    w2 = cluster.pod(
        "w2",
        labels={"app": "web"},
        ports=[{"name": "http", "containerPort": 9090, "protocol": "TCP"}],
    )
    # w2 was added with the policy in force: right from its first probe.
    assert all_ok(reach(cli, w2, 9090)) and all_blocked(reach(cli, w2, 8080))
    assert all_ok(reach(cli, w1, 8080)) and all_blocked(reach(cli, w1, 9090))

    # Egress by name: cli may only open `http` on whoever declares it.
    cluster.policy(
        "cli-out-http",
        {
            "podSelector": {"matchLabels": {"app": "cli"}},
            "policyTypes": ["Egress"],
            "egress": [{"ports": [{"protocol": "TCP", "port": "http"}]}],
        },
    )
    plain = cluster.pod("plain", labels={"app": "plain"})  # declares no port
    wait_reach(cli, plain, 8080, all_blocked, "cli -> plain:8080 blocked")
    assert all_ok(reach(cli, w1, 8080)) and all_ok(reach(cli, w2, 9090))
    w3 = cluster.pod("w3", labels={"app": "other"}, ports=[{"name": "http", "containerPort": 9090}])
    # w3 is not under the ingress policy; cli's egress allows w3:9090 (its http) only.
    assert all_ok(reach(cli, w3, 9090)) and all_blocked(reach(cli, w3, 8080))


def test_a_failed_add_leaves_the_ruleset_as_it_was(cluster: Cluster) -> None:
    """ADD puts the pod's policy in place before its veth; when the veth cannot be
    built (here: the sandbox is gone), the failed ADD takes its verdict-map entry and
    its addresses in peer sets out again before the error reaches the runtime. DEL
    removes them too."""
    cluster.policy(
        "allow-cli",
        {
            "podSelector": {"matchLabels": {"app": "x"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "cli"}}}]}],
        },
    )
    cluster.node.start_agent()
    x1 = cluster.pod("x1", labels={"app": "x"}, serve=())
    before = table(cluster.node)
    assert host_veth_name(x1.container_id, x1.ifname) in before, before

    node = cluster.node
    uid = node.put_pod("cli", labels={"app": "cli"})
    gone = Pod(
        namespace="default",
        name="cli",
        uid=uid,
        netns_name=f"{PREFIX}-gone-{uuid.uuid4().hex[:6]}",  # never created
        container_id=uuid.uuid4().hex,
    )
    # Watch the table's changes during the failed ADD, between two marks: every event
    # of the ADD is in between (no sleep for the monitor to subscribe or to catch up).
    monitor = RulesetMonitor(node.name)
    try:
        monitor.mark()
        res = node.cni_add(gone)
        events = monitor.mark()
    finally:
        monitor.stop()
    assert not res.ok, res.stdout
    assert json.loads(res.stdout)["code"] == 102, res.stdout
    # The pod's addresses entered the peer set before its veth was attempted (the
    # attempt failed at once), then left it again.
    added = [e for e in events if e.startswith("add element inet flock peer_")]
    removed = [e for e in events if e.startswith("delete element inet flock peer_")]
    assert added and removed, events
    after = table(node)
    assert host_veth_name(gone.container_id, gone.ifname) not in after, after
    assert after == before  # no verdict-map entry, no peer-set element left

    # The address was released: the next pod gets it, and its policy is in place.
    cli = cluster.pod("cli2", labels={"app": "cli"}, serve=())
    now = table(node)
    assert all(a in now for a in addrs(cli)), now  # in x's peer set
    assert node.cni_del(x1).ok
    assert host_veth_name(x1.container_id, x1.ifname) not in table(node)


def normalized_table(node: TestNode) -> tuple[list[str], dict[str, list[str]]]:
    """`nft -j list table inet flock` without handles: sets, maps and chains as a
    sorted list (elements sorted), rules in order per chain."""
    out = json.loads(node.exec("nft", "-j", "list", "table", "inet", "flock"))

    def strip(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k != "handle"}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    objects: list[str] = []
    rules: dict[str, list[str]] = {}
    for item in out["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = strip(body)
        if kind == "rule":
            rules.setdefault(body["chain"], []).append(json.dumps(body, sort_keys=True))
            continue
        if "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        objects.append(json.dumps({kind: body}, sort_keys=True))
    return sorted(objects), rules


def test_ruleset_after_a_sequence_of_changes_equals_a_full_sync(cluster: Cluster) -> None:
    """The agent applies datastore and CNI changes as O(change) updates. After a random
    sequence of them (local pods added, relabelled, deleted; pods of other nodes;
    policies added, changed, removed; a namespace relabelled), the table equals what
    a restarted agent's full sync writes from the same view."""
    import random

    node = cluster.node
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rnd = random.Random(seed)
    labels = [{"app": "web"}, {"app": "db"}, {"app": "web", "tier": "front"}, {"app": "cli"}]
    specs: list[dict[str, Any]] = [
        DENY_INGRESS_X | {"podSelector": {"matchLabels": {"app": "web"}}},
        {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"tier": "front"}}}]}],
        },
        {
            "podSelector": {},
            "ingress": [
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}],
                    "ports": [{"port": "http"}],
                }
            ],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}],
            "policyTypes": ["Ingress", "Egress"],
        },
        {"podSelector": {"matchLabels": {"app": "cli"}}, "ingress": [{"ports": [{"port": "x!"}]}]},
    ]

    def remote(i: int) -> None:
        obj = pod_manifest(
            f"r{i}",
            node="other",
            uid=str(uuid.uuid4()),
            labels=rnd.choice(labels),
            ports=[{"name": "http", "containerPort": 8000 + i}],
        )
        obj["status"]["podIPs"] = [{"ip": f"2001:db8:77::{i}:{rnd.randrange(1, 999)}"}]
        node.write(f"pod-default-r{i}.yaml", obj)

    node.write(
        "ns-default.yaml",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
    )
    cluster.policy("p0", specs[1])
    node.start_agent()
    local: dict[str, Pod] = {}
    for step in range(40):
        what = rnd.choice(["add", "add", "relabel", "del", "remote", "policy", "unpolicy", "ns"])
        if what == "add" or (what in ("relabel", "del") and not local):
            name = f"l{step}"
            local[name] = cluster.pod(
                name, labels=rnd.choice(labels), ports=[{"name": "http", "containerPort": 8080}]
            )
        elif what == "relabel":
            pod = local[rnd.choice(sorted(local))]
            node.put_pod(pod.name, uid=pod.uid, labels=rnd.choice(labels))
        elif what == "del":
            pod = local.pop(rnd.choice(sorted(local)))
            assert node.cni_del(pod).ok
        elif what == "remote":
            remote(rnd.randrange(4))
        elif what == "policy":
            cluster.policy(f"p{rnd.randrange(4)}", rnd.choice(specs))
        elif what == "unpolicy":
            with contextlib.suppress(FileNotFoundError):
                cluster.remove(f"np-default-p{rnd.randrange(4)}.yaml")
        else:
            node.write(
                "ns-default.yaml",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": "default",
                        "labels": {"team": rnd.choice(["red", "blue"])},
                    },
                },
            )
    # The last change: a policy whose name shows in a chain's comment once applied. The
    # applier drains every event up to a pass's start, so all earlier ones are in too.
    marker = cluster.pod("marker", labels={"app": "marker"}, serve=())
    cluster.policy(
        "zz-marker", {"podSelector": {"matchLabels": {"app": "marker"}}, "policyTypes": ["Ingress"]}
    )
    wait_until(lambda: table(node), until=lambda t: "zz-marker" in t, timeout=WAIT, what="marker")
    incremental = normalized_table(node)
    passes = node.status()["reconcile"]
    node.stop_agent()
    node.start_agent()
    assert node.status()["policy"]["full_syncs"] >= 1
    full = normalized_table(node)
    assert incremental[1] == full[1]  # rules, per chain, in order
    assert incremental[0] == full[0]  # chains, sets and maps with their elements
    assert host_veth_name(marker.container_id, marker.ifname) in table(node)
    # The first run fed the engine the changes, not the whole view each time.
    assert passes["policy_updates"] > passes["policy_syncs"], passes
