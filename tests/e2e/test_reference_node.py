"""The harness proven with the reference plugins (ptp + host-local): a real node works.

If these fail, the node (kubelet, containerd, kube-proxy, the namespaces around
them) is broken, not flock; the flock tests rely on the same harness.
"""

from __future__ import annotations

import secrets

from e2e_helpers import (
    deployment,
    is_ready,
    node_http,
    pod,
    pod_http,
    pod_ips,
    pods,
    service,
    set_ready_file,
    summary,
    wait_gone,
    wait_ready,
)

from flock.testbed.kubenode import KubeNode
from flock.testbed.wait import wait_until


def _name(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


def test_pod_with_http_readiness_probe_turns_ready_and_follows_its_probe(
    ptp_node: KubeNode,
) -> None:
    name = _name("probe")
    ptp_node.apply([pod(name)])
    try:
        (p,) = wait_ready(ptp_node, f"app={name}", 1)
        ips = pod_ips(p)
        assert {":" in ip for ip in ips} == {True, False}, ips
        # The kubelet's prober reaches the pod over ptp's host routes; so does the node.
        for ip in ips:
            assert node_http(ptp_node, ip) == name
        set_ready_file(ptp_node, name, False)
        wait_until(
            lambda: pods(ptp_node, f"app={name}"),
            until=lambda items: not is_ready(items[0]),
            timeout=60,
            what=f"{name} not Ready after its probe file was removed",
        )
        set_ready_file(ptp_node, name, True)
        wait_ready(ptp_node, f"app={name}", 1)
    finally:
        ptp_node.kubectl("delete", "pod", name, "--wait=false")
    wait_gone(ptp_node, f"app={name}")


def test_dual_stack_cluster_ip_service_through_kube_proxy_nftables(ptp_node: KubeNode) -> None:
    name = _name("svc")
    ptp_node.apply([deployment(name, replicas=2), service(name, selector={"app": name})])
    client = _name("client")
    ptp_node.apply([pod(client)])
    try:
        backends = {p["metadata"]["name"] for p in wait_ready(ptp_node, f"app={name}", 2)}
        wait_ready(ptp_node, f"app={client}", 1)
        svc = ptp_node.get_json("service", name)
        cluster_ips = svc["spec"]["clusterIPs"]
        assert {":" in ip for ip in cluster_ips} == {True, False}, cluster_ips
        for ip in cluster_ips:
            # From the node (kube-proxy's output chains) and from a pod (prerouting).
            wait_until(
                lambda ip=ip: node_http(ptp_node, ip, port=80),
                until=lambda body: body in backends,
                timeout=60,
                what=f"the node reaching a backend of {name} at {ip}",
            )
            wait_until(
                lambda ip=ip: pod_http(ptp_node, client, ip, port=80),
                until=lambda body: body in backends,
                timeout=60,
                what=f"pod {client} reaching a backend of {name} at {ip}",
            )
        tables = ptp_node.node_exec(["nft", "list", "tables"]).stdout
        assert "ip kube-proxy" in tables and "ip6 kube-proxy" in tables, tables
    finally:
        ptp_node.kubectl("delete", "deployment", name, "--wait=false")
        ptp_node.kubectl("delete", "service", name, "--wait=false")
        ptp_node.kubectl("delete", "pod", client, "--wait=false")
    wait_gone(ptp_node, f"app={name}")
    wait_gone(ptp_node, f"app={client}")
    assert summary(pods(ptp_node, f"app={name}")) == []


def test_node_reboot_brings_every_pod_back(ptp_node: KubeNode) -> None:
    """The harness's reboot: containerd, kubelet, shims and pods killed, pod netns gone.

    Runs last in this file: the node restarts under the other tests' feet.
    """
    name = _name("boot")
    ptp_node.apply([deployment(name, replicas=3)])
    try:
        before = {p["metadata"]["uid"]: pod_ips(p) for p in wait_ready(ptp_node, f"app={name}", 3)}
        ptp_node.reboot()
        wait_until(ptp_node.node_ready, timeout=180, what="node Ready after the reboot")

        def answers() -> list[tuple[str, list[str]]]:
            out = []
            for p in pods(ptp_node, f"app={name}"):
                if not is_ready(p):
                    return [(p["metadata"]["name"], ["not Ready"])]
                out.append((p["metadata"]["name"], [node_http(ptp_node, ip) for ip in pod_ips(p)]))
            return out

        seen = wait_until(
            answers,
            until=lambda a: len(a) == 3 and all(bodies == [n, n] for n, bodies in a),
            timeout=180,
            what="every pod Ready and answering on both addresses after the reboot",
        )
        # Same pods (the kubelet recreated their sandboxes), new network namespaces.
        after = {p["metadata"]["uid"] for p in pods(ptp_node, f"app={name}")}
        assert after == set(before), (before, seen)
    finally:
        ptp_node.kubectl("delete", "deployment", name, "--wait=false")
    wait_gone(ptp_node, f"app={name}")
