"""The real agent in a node namespace, on the real kube-apiserver (`--kubeconfig`).

One node namespace, attached to the API server's namespace by a veth; BIRD in
the node; the agent started as a DaemonSet would start it, but with a
kubeconfig. The API server is the only source of truth: NodeConfig, Pods and
their status are API objects; the runtime's part (sandbox netns, CNI ADD) is
played by the testbed's plugin calls.

End to end: the NodeConfig renders BIRD's config; a pod's anycast follows its
Ready condition patched at the API server; the agent writes the NodeConfig
status; a pod deleted from the API whose DEL never comes (containerd 2.4 sends
no GC) is released by the leak reconciler once its netns is gone, while a pod
that still exists in the API keeps its addresses even without a netns.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flock.model.nodeconfig import API_VERSION
from flock.testbed import netns
from flock.testbed.bird import BirdDaemon
from flock.testbed.kube import ADMIN, ApiServer
from flock.testbed.node import Pod, TestNode, test_node
from flock.testbed.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "crds" / "nodeconfig.yaml"
WAIT = 60

NODE6 = "2001:db8:ffff::1"
NODE4 = "198.51.100.1"
PEER6 = "2001:db8:ffff::fe"
ANY6 = "2001:db8:a::53"
SPEC: dict[str, Any] = {
    "cidr6": ["2001:db8:f001::/64"],
    "cidr4": ["10.1.0.0/24"],
    "allowedAddresses": [{"cidr": "2001:db8:a::/48", "use": ["anycast"]}],
    "bgp": {"asn": 65101, "peers": [{"address": PEER6, "asn": 65000}]},
}


def ok(
    api: ApiServer, method: str, path: str, body: Any = None, ct: str = "application/json"
) -> Any:
    status, out = api.request(method, path, body, content_type=ct)
    assert status < 300, f"{method} {path}: {status} {out}"
    return out


class Cluster:
    def __init__(self, api: ApiServer, node: TestNode, bird: BirdDaemon, ns: str) -> None:
        self.api, self.node, self.bird, self.ns = api, node, bird, ns

    @property
    def node_name(self) -> str:
        assert self.node.node_name is not None
        return self.node.node_name

    def create_pod(self, name: str, annotations: dict[str, str] | None = None) -> Pod:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"nodeName": self.node_name, "containers": [{"name": "c", "image": "x"}]},
        }
        obj = ok(self.api, "POST", f"/api/v1/namespaces/{self.ns}/pods", body)
        pod = Pod(
            namespace=self.ns,
            name=name,
            uid=obj["metadata"]["uid"],
            netns_name=self.node.new_pod_netns(),
            container_id=secrets.token_hex(16),
        )
        # Registered by container ID, so that the node's destroy() removes every
        # sandbox made here (also an old incarnation's under a reused name).
        self.node.pods[pod.container_id] = pod
        return pod

    def add(self, pod: Pod) -> None:
        pod.result = self.node.cni_add(pod)
        assert pod.result.ok, pod.result.stdout

    def set_ready(self, pod: Pod, ready: bool) -> None:
        patch = {"status": {"conditions": [{"type": "Ready", "status": str(ready)}]}}
        ok(
            self.api,
            "PATCH",
            f"/api/v1/namespaces/{self.ns}/pods/{pod.name}/status",
            patch,
            "application/strategic-merge-patch+json",
        )

    def bird_has(self, prefix: str) -> bool:
        out = netns.run(
            ["birdc", "-s", str(self.bird.socket_path), "show", "route", "for", prefix, "all"],
            netns=self.node.name,
            check=False,
        ).stdout
        return f"{prefix}/128" in out

    def allocations(self) -> list[tuple[str, str]]:
        return sorted((a["namespace"], a["pod"]) for a in self.node.status()["allocations"])

    def nodeconfig_status(self) -> dict[str, Any]:
        obj = ok(self.api, "GET", f"/apis/{API_VERSION}/nodeconfigs/{self.node_name}")
        st: dict[str, Any] = obj.get("status") or {}
        return st


@pytest.fixture
def cluster(apiserver: ApiServer, tmp_path: Path) -> Iterator[Cluster]:
    api = apiserver
    api.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    api.kubectl(
        "wait", "--for=condition=Established", "crd/nodeconfigs.flock.fritzlab.net",
        "--timeout=60s", timeout=90,
    )  # fmt: skip
    suffix = secrets.token_hex(3)
    node_name, ns = f"kn-{suffix}", f"ka-{suffix}"
    kubeconfig = tmp_path / "agent.kubeconfig"
    ok(api, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    nc = {"apiVersion": API_VERSION, "kind": "NodeConfig", "metadata": {"name": node_name}}
    ok(api, "POST", f"/apis/{API_VERSION}/nodeconfigs", {**nc, "spec": SPEC})
    try:
        with test_node(
            "fk",
            v6=f"{NODE6}/64",
            v4=f"{NODE4}/24",
            node_name=node_name,
            datastore_args=["--kubeconfig", str(kubeconfig)],
            log_lines=60,
        ) as node:
            url = api.attach(node.name, api_cidr="203.0.113.1/30", peer_cidr="203.0.113.2/30")
            api.kubeconfig_for(ADMIN, path=kubeconfig, server=url)
            bird = BirdDaemon(netns=node.name, workdir=node.base_dir / "bird")
            bird.start()
            try:
                node.start_agent(
                    "--bird-socket", str(bird.socket_path),
                    "--bird-config", str(bird.config_path),
                    "--router-id", NODE4,
                    "--leak-grace", "2", "--leak-interval", "0.5",
                )  # fmt: skip
                yield Cluster(api, node, bird, ns)
            finally:
                bird.stop()
    finally:
        api.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        api.kubectl("delete", "nodeconfig", node_name, "--ignore-not-found", check=False)


def test_agent_follows_the_api_server(cluster: Cluster) -> None:
    c = cluster
    # NodeConfig -> BIRD config with the peer and our ASN.
    wait_until(
        lambda: c.bird.config_path.read_text(),
        until=lambda text: PEER6 in text and "65101" in text,
        timeout=WAIT,
        what="BIRD config rendered from the NodeConfig",
    )
    st = c.node.status()
    assert st["datastore_synced"] and st["node_config"] == "ok"

    # A pod created at the API, then ADD: anycast exported once Ready.
    web = c.create_pod("web", {"flock.fritzlab.net/anycast": ANY6})
    c.add(web)
    assert not c.bird_has(ANY6), "not Ready yet: not exported"
    c.set_ready(web, True)
    wait_until(lambda: c.bird_has(ANY6), timeout=WAIT, what="anycast exported when Ready")
    c.set_ready(web, False)
    wait_until(lambda: not c.bird_has(ANY6), timeout=WAIT, what="withdrawn on Ready=false")
    c.set_ready(web, True)
    wait_until(lambda: c.bird_has(ANY6), timeout=WAIT, what="exported again")

    # The agent reports on the NodeConfig status.
    status = wait_until(
        c.nodeconfig_status,
        until=lambda s: s.get("pods") == 1 and s.get("exportedAnycast") == 1,
        timeout=WAIT,
        what="NodeConfig status with the pod and its anycast",
    )
    assert status["allocations"]["ipv6"] == 1 and status["bgp"]["sessionsTotal"] == 1
    assert {c_["type"] for c_ in status["conditions"]} == {"Ready", "BGPSessionsEstablished"}

    # A pod that still exists in the API keeps its addresses, even without a netns.
    keep = c.create_pod("keep")
    c.add(keep)
    netns.delete(keep.netns_name)
    # Deleted from the API, sandbox gone, no DEL: the leak reconciler releases it.
    ok(c.api, "DELETE", f"/api/v1/namespaces/{c.ns}/pods/web?gracePeriodSeconds=0")
    netns.delete(web.netns_name)
    wait_until(
        c.allocations,
        until=lambda a: a == [(c.ns, "keep")],
        timeout=WAIT,
        what="the deleted pod's allocation released, the live one kept",
    )
    wait_until(lambda: not c.bird_has(ANY6), timeout=WAIT, what="its anycast withdrawn")
    log = c.node.agent_log.read_text()
    assert "released a leaked allocation" in log


def test_rejected_add_is_one_event_on_the_pod(cluster: Cluster) -> None:
    c = cluster
    bad = c.create_pod("bad", {"flock.fritzlab.net/anycast": "2001:db8:bad::1"})
    for _ in range(3):  # the kubelet retries
        res = c.node.cni_add(bad)
        assert not res.ok

    def events() -> list[dict[str, Any]]:
        out = ok(c.api, "GET", f"/apis/events.k8s.io/v1/namespaces/{c.ns}/events")
        items: list[dict[str, Any]] = out["items"]
        return items

    (ev,) = wait_until(events, until=lambda e: len(e) >= 1, timeout=WAIT, what="the Event")
    assert ev["reason"] == "FlockAddRejected" and ev["type"] == "Warning"
    assert "anycast" in ev["note"] and "2001:db8:bad::1" in ev["note"], ev["note"]
    assert ev["regarding"]["name"] == "bad" and ev["regarding"]["uid"] == bad.uid
    assert len(events()) == 1, "retries fold into the Event's series"


def test_policy_flock_cannot_enforce_is_an_event_on_the_policy(cluster: Cluster) -> None:
    """Fail closed, and say so where the policy's author looks: an Event on the policy."""
    c = cluster
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "bad-block"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            # The API server accepts this ipBlock; flock refuses the leading zero.
            "ingress": [{"from": [{"ipBlock": {"cidr": "010.51.0.0/16"}}]}],
        },
    }
    obj = ok(c.api, "POST", f"/apis/networking.k8s.io/v1/namespaces/{c.ns}/networkpolicies", policy)

    def events() -> list[dict[str, Any]]:
        out = ok(c.api, "GET", f"/apis/events.k8s.io/v1/namespaces/{c.ns}/events")
        return [e for e in out["items"] if e["regarding"].get("kind") == "NetworkPolicy"]

    (ev,) = wait_until(events, until=lambda e: len(e) >= 1, timeout=WAIT, what="the Event")
    assert ev["reason"] == "FlockPolicyRejected" and ev["type"] == "Warning"
    assert (
        ev["regarding"]["name"] == "bad-block" and ev["regarding"]["uid"] == obj["metadata"]["uid"]
    )
    assert "010.51.0.0/16" in ev["note"] and "isolated for Ingress" in ev["note"], ev["note"]
    rejected = c.node.status()["policy"]["rejected_policies"]
    assert f"{c.ns}/bad-block" in rejected, rejected


def test_leak_reconciler_never_releases_a_live_pod_under_churn(cluster: Cluster) -> None:
    """Random churn at the API and the runtime while the reconciler runs every 0.5 s
    with a 2 s grace: a pod in the API keeps its allocation at every step (also with
    its sandbox gone, and when its name was reused); every lost DEL is released."""
    c = cluster
    rng = random.Random(7)
    names = [f"p{i}" for i in range(5)]
    live: dict[str, Pod] = {}

    def held() -> set[tuple[str, str]]:
        return {(a["pod"], a["podUID"]) for a in c.node.status()["allocations"]}

    def api_delete(pod: Pod) -> None:
        ok(c.api, "DELETE", f"/api/v1/namespaces/{c.ns}/pods/{pod.name}?gracePeriodSeconds=0")

    ops: list[str] = []
    for _ in range(40):
        name = rng.choice(names)
        pod = live.get(name)
        if pod is None:
            new = c.create_pod(name)
            c.add(new)
            live[name] = new
            ops.append(f"add {name}")
            continue
        op = rng.choice(["del", "lost-del", "recreate", "sandbox-gone"])
        ops.append(f"{op} {name}")
        if op == "del":  # the normal path: DEL, sandbox removed, pod deleted
            assert c.node.cni_del(pod).ok
            netns.delete(pod.netns_name)
            api_delete(pod)
            del live[name]
        elif op in ("lost-del", "recreate"):  # the DEL never comes
            api_delete(pod)
            netns.delete(pod.netns_name)
            del live[name]
            if op == "recreate":  # same name, new uid, new sandbox
                new = c.create_pod(name)
                c.add(new)
                live[name] = new
        else:  # the sandbox is gone but the pod is still in the API: keep it
            netns.delete(pod.netns_name)
        want = {(p.name, p.uid) for p in live.values()}
        missing = want - held()
        assert not missing, f"released live pods {missing} after {ops}"
    wait_until(
        held,
        until=lambda h: h == {(p.name, p.uid) for p in live.values()},
        timeout=WAIT,
        what=f"exactly the live pods' allocations after {len(ops)} steps",
    )
