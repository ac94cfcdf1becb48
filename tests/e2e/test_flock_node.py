"""flock as a cluster runs it: its DaemonSet on a real kubelet + containerd, driven by the API.

The node is set up once per session (`flock_node`: deploy/install.yaml applied,
node labelled, NodeConfig applied, FRR peering). Every test makes its own
objects through kubectl and watches the outcome where a user would: the API
(pod status, Events), the router's BGP table, the node's kernel routes and
real traffic from the node, the router and other pods.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from e2e_flock import (
    ANYCAST4,
    ANYCAST6,
    POD_CIDR4,
    POD_CIDR6,
    agent_pods,
    daemonset_name,
    node_route_hops,
    router_has,
)
from e2e_helpers import (
    deployment,
    events_for,
    is_ready,
    node_http,
    pod,
    pod_http,
    pod_ips,
    pods,
    service,
    set_ready_file,
    wait_gone,
    wait_ready,
)

from flock.testbed.kubenode import KubeNode
from flock.testbed.wait import wait_until

ANYCAST = f"{ANYCAST6}, {ANYCAST4}"
ANNOTATION = "flock.fritzlab.net/anycast"


def _name(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


def _in_pod_cidrs(ip: str) -> bool:
    cidr = POD_CIDR6 if ":" in ip else POD_CIDR4
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def _pod_host_routes(node: KubeNode) -> set[str]:
    """The node's host routes into its pod prefixes: one per live pod address, no more."""
    out: set[str] = set()
    for fam, cidr in (("-4", POD_CIDR4), ("-6", POD_CIDR6)):
        text = node.node_exec(["ip", fam, "-o", "route", "show", "root", cidr]).stdout
        for line in text.splitlines():
            dst = line.split()[0].split("/")[0]
            if dst != cidr.split("/")[0]:
                out.add(dst)
    return out


def _status(node: KubeNode) -> tuple[dict[str, int], int]:
    """What the agent reports in its NodeConfig's status: allocations per family (zero
    counts left out), pods."""
    st = node.get_json("nodeconfig", node.name).get("status") or {}
    allocs = {k: int(v) for k, v in (st.get("allocations") or {}).items() if int(v)}
    return allocs, int(st.get("pods") or 0)


def _networked_pods(node: KubeNode) -> int:
    """Pods on the node that flock serves (not hostNetwork, not finished), per the API."""
    items = node.get_json("pods", "-A", "--field-selector", f"spec.nodeName={node.name}")["items"]
    return sum(
        1
        for p in items
        if not p["spec"].get("hostNetwork")
        and p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    )


def _wait_status(node: KubeNode, what: str) -> None:
    """Wait until the status counts the API's pods, one address per family each.

    The agent writes its status every few seconds and only on change, so a value read
    right after other tests' pods went may still count them: compare with the API.
    """

    def expected() -> tuple[dict[str, int], int]:
        n = _networked_pods(node)
        return ({"ipv4": n, "ipv6": n} if n else {}), n

    def probe() -> tuple[tuple[dict[str, int], int], tuple[dict[str, int], int]]:
        return _status(node), expected()

    wait_until(
        probe,
        until=lambda seen: seen[0] == seen[1],
        timeout=120,
        what=f"NodeConfig status (seen, expected) {what}",
    )


def _router_http(node: KubeNode, ip: str, port: int = 8080) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    script = (
        "import urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://{host}:{port}/hostname', timeout=3)\n"
        "    print(r.read().decode().strip())\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", node.router_ns, "/usr/bin/python3", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip()


@contextmanager
def _traffic(node: KubeNode, ips: list[str]) -> Iterator[list[tuple[str, str]]]:
    """GET every pod address from the node in a loop while the block runs; yields failures."""
    failures: list[tuple[str, str]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for ip in ips:
                body = node_http(node, ip)
                if body.startswith("ERR") or not body:
                    failures.append((ip, body))
            stop.wait(0.2)

    t = threading.Thread(target=loop, name="e2e-traffic", daemon=True)
    t.start()
    try:
        yield failures
    finally:
        stop.set()
        t.join(timeout=30)


def _agent_ready(node: KubeNode) -> list[tuple[str, bool, int]]:
    return [
        (
            p["metadata"]["name"],
            is_ready(p),
            sum(c.get("restartCount", 0) for c in p["status"].get("containerStatuses") or []),
        )
        for p in agent_pods(node)
        if not p["metadata"].get("deletionTimestamp")
    ]


def _delete(node: KubeNode, *objs: str) -> None:
    for o in objs:
        node.kubectl("delete", o, "--wait=false", "--ignore-not-found")


def test_flock_daemonset_runs_and_node_is_ready(flock_node: KubeNode) -> None:
    (agent,) = agent_pods(flock_node)
    statuses = {c["name"]: c for c in agent["status"]["containerStatuses"]}
    assert all(c["ready"] for c in statuses.values()), statuses
    init = agent["status"].get("initContainerStatuses") or []
    assert init and all(c["state"].get("terminated", {}).get("exitCode") == 0 for c in init)
    assert flock_node.node_ready()
    assert flock_node.frr is not None
    assert set(flock_node.frr.neighbor_states().values()) == {"Established"}


def test_anycast_deployment_route_follows_readiness_and_scale(flock_node: KubeNode) -> None:
    name = _name("any")
    flock_node.apply([deployment(name, replicas=3, annotations={ANNOTATION: ANYCAST})])
    try:
        items = wait_ready(flock_node, f"app={name}", 3)
        for p in items:
            assert all(_in_pod_cidrs(ip) for ip in pod_ips(p)), pod_ips(p)
        names = {p["metadata"]["name"] for p in items}
        for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
            wait_until(
                lambda prefix=prefix: router_has(flock_node, prefix),
                timeout=60,
                what=f"the router learning {prefix}",
            )
        for ip in (ANYCAST6, ANYCAST4):
            wait_until(
                lambda ip=ip: node_route_hops(flock_node, ip),
                until=lambda hops: len(hops) == 3,
                timeout=60,
                what=f"three next hops for {ip} on the node",
            )
            body = wait_until(
                lambda ip=ip: _router_http(flock_node, ip),
                until=lambda b: b in names,
                timeout=60,
                what=f"the router reaching a replica at {ip}",
            )
            assert body in names
        # One replica's probe fails: the kubelet marks it not Ready, the route follows.
        first = items[0]["metadata"]["name"]
        set_ready_file(flock_node, first, False)
        wait_until(
            lambda: [is_ready(p) for p in pods(flock_node, f"app={name}")],
            until=lambda r: sorted(r) == [False, True, True],
            timeout=60,
            what=f"{first} not Ready",
        )
        for ip in (ANYCAST6, ANYCAST4):
            wait_until(
                lambda ip=ip: node_route_hops(flock_node, ip),
                until=lambda hops: len(hops) == 2,
                timeout=30,
                what=f"{ip} down to two next hops",
            )
        assert router_has(flock_node, f"{ANYCAST6}/128")
        # No replica Ready: the node withdraws the anycast route.
        for p in items[1:]:
            set_ready_file(flock_node, p["metadata"]["name"], False)
        for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
            wait_until(
                lambda prefix=prefix: not router_has(flock_node, prefix),
                timeout=60,
                what=f"the router withdrawing {prefix} with no replica Ready",
            )
        set_ready_file(flock_node, first, True)
        wait_until(
            lambda: router_has(flock_node, f"{ANYCAST6}/128"),
            timeout=60,
            what="the route back with one replica Ready",
        )
        # Scale to zero: withdrawn again, and the pods' addresses are released.
        flock_node.kubectl("scale", "deployment", name, "--replicas=0")
        wait_gone(flock_node, f"app={name}")
        for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
            wait_until(
                lambda prefix=prefix: not router_has(flock_node, prefix),
                timeout=60,
                what=f"the router withdrawing {prefix} after scale to zero",
            )
    finally:
        _delete(flock_node, f"deployment/{name}")
    wait_gone(flock_node, f"app={name}")


def test_deleting_a_deployment_releases_every_address(flock_node: KubeNode) -> None:
    name = _name("rel")
    _wait_status(flock_node, "before the test")
    before = _pod_host_routes(flock_node)
    flock_node.apply([deployment(name, replicas=3)])
    try:
        items = wait_ready(flock_node, f"app={name}", 3)
        ips = {ip for p in items for ip in pod_ips(p)}
        assert len(ips) == 6, ips
        assert ips <= _pod_host_routes(flock_node)
        _wait_status(flock_node, "counting the three pods")
    finally:
        _delete(flock_node, f"deployment/{name}")
    wait_gone(flock_node, f"app={name}")
    # Host routes (and the veths they point at) go with the allocations.
    wait_until(
        lambda: _pod_host_routes(flock_node) & ips,
        until=lambda left: not left,
        timeout=90,
        what="no host route left to the deleted pods' addresses",
    )
    assert _pod_host_routes(flock_node) <= before
    # The agent's own account, through the API: allocations back where they were.
    _wait_status(flock_node, "after the deletion")
    # The addresses are free again: a new pod may get any of them, and no
    # allocation of the old pods blocks a full re-creation.
    flock_node.apply([deployment(name, replicas=3)])
    try:
        wait_ready(flock_node, f"app={name}", 3)
    finally:
        _delete(flock_node, f"deployment/{name}")
    wait_gone(flock_node, f"app={name}")


def _service_answers(node: KubeNode, client: str, ips: list[str], backends: set[str]) -> None:
    for ip in ips:
        wait_until(
            lambda ip=ip: node_http(node, ip, port=80),
            until=lambda b: b in backends,
            timeout=60,
            what=f"the node reaching a backend at {ip}",
        )
        wait_until(
            lambda ip=ip: pod_http(node, client, ip, port=80),
            until=lambda b: b in backends,
            timeout=60,
            what=f"pod {client} reaching a backend at {ip}",
        )


def _tables(node: KubeNode) -> str:
    return node.node_exec(["nft", "list", "tables"]).stdout


def _both_tables(text: str) -> bool:
    return "inet flock" in text and "ip kube-proxy" in text and "ip6 kube-proxy" in text


def test_service_on_flock_both_families_and_tables_coexist(flock_node: KubeNode) -> None:
    name, client = _name("svc"), _name("cli")
    flock_node.apply(
        [deployment(name, replicas=2), service(name, selector={"app": name}), pod(client)]
    )
    try:
        backends = {p["metadata"]["name"] for p in wait_ready(flock_node, f"app={name}", 2)}
        wait_ready(flock_node, f"app={client}", 1)
        ips = flock_node.get_json("service", name)["spec"]["clusterIPs"]
        assert {":" in ip for ip in ips} == {True, False}, ips
        _service_answers(flock_node, client, ips, backends)
        assert _both_tables(_tables(flock_node)), _tables(flock_node)
        # kube-proxy restarts: flock's table stays, kube-proxy's comes back.
        flock_node.stop_daemon("kube-proxy")
        flock_node.start_kube_proxy()
        wait_until(lambda: _tables(flock_node), until=_both_tables, timeout=60, what="tables")
        _service_answers(flock_node, client, ips, backends)
        # flock's agent restarts (a new DaemonSet pod): kube-proxy's tables stay.
        (agent,) = agent_pods(flock_node)
        flock_node.kubectl("delete", "pod", "-n", "kube-system", agent["metadata"]["name"])
        wait_until(
            lambda: _agent_ready(flock_node),
            until=lambda s: len(s) == 1 and s[0][1] and s[0][0] != agent["metadata"]["name"],
            timeout=120,
            what="a new flock agent pod Ready",
        )
        wait_until(lambda: _tables(flock_node), until=_both_tables, timeout=60, what="tables")
        _service_answers(flock_node, client, ips, backends)
    finally:
        _delete(flock_node, f"deployment/{name}", f"service/{name}", f"pod/{client}")
    wait_gone(flock_node, f"app={name}")
    wait_gone(flock_node, f"app={client}")


def _policy(name: str, server: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "podSelector": {"matchLabels": {"app": server}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"role": "allowed"}}}],
                    "ports": [{"protocol": "TCP", "port": 8080}],
                }
            ],
        },
    }


def test_network_policy_blocks_and_allows_also_through_the_service(flock_node: KubeNode) -> None:
    server, ok, bad, pol = _name("srv"), _name("ok"), _name("bad"), _name("pol")
    flock_node.apply(
        [
            deployment(server, replicas=1),
            service(server, selector={"app": server}),
            pod(ok, labels={"app": ok, "role": "allowed"}),
            pod(bad, labels={"app": bad, "role": "denied"}),
        ]
    )
    try:
        (srv,) = wait_ready(flock_node, f"app={server}", 1)
        wait_ready(flock_node, f"app={ok}", 1)
        wait_ready(flock_node, f"app={bad}", 1)
        srv_name = srv["metadata"]["name"]
        targets = [(ip, 8080) for ip in pod_ips(srv)] + [
            (ip, 80) for ip in flock_node.get_json("service", server)["spec"]["clusterIPs"]
        ]
        for client in (ok, bad):  # open before the policy
            for ip, port in targets:
                wait_until(
                    lambda c=client, ip=ip, port=port: pod_http(flock_node, c, ip, port=port),
                    until=lambda b: b == srv_name,
                    timeout=60,
                    what=f"{client} -> {ip}:{port} before the policy",
                )
        flock_node.apply([_policy(pol, server)])
        for ip, port in targets:
            wait_until(
                lambda ip=ip, port=port: pod_http(flock_node, bad, ip, port=port),
                until=lambda b: b.startswith("ERR"),
                timeout=60,
                what=f"{bad} blocked from {ip}:{port}",
            )
            wait_until(
                lambda ip=ip, port=port: pod_http(flock_node, ok, ip, port=port),
                until=lambda b: b == srv_name,
                timeout=60,
                what=f"{ok} still allowed to {ip}:{port} under the policy",
            )
        flock_node.kubectl("delete", "networkpolicy", pol)
        for ip, port in targets:
            wait_until(
                lambda ip=ip, port=port: pod_http(flock_node, bad, ip, port=port),
                until=lambda b: b == srv_name,
                timeout=60,
                what=f"{bad} allowed again to {ip}:{port}",
            )
    finally:
        _delete(
            flock_node,
            f"deployment/{server}",
            f"service/{server}",
            f"pod/{ok}",
            f"pod/{bad}",
            f"networkpolicy/{pol}",
        )
    for sel in (server, ok, bad):
        wait_gone(flock_node, f"app={sel}")


def test_bad_annotation_stays_container_creating_with_an_event(flock_node: KubeNode) -> None:
    name = _name("badann")
    flock_node.apply([pod(name, annotations={ANNOTATION: "not-an-address"})])
    try:
        # flock's own Event (events.k8s.io, reportingController flock's agent), not
        # only the kubelet's FailedCreatePodSandBox relaying the CNI error.
        wait_until(
            lambda: [
                (e.get("reportingComponent", ""), e.get("message", ""))
                for e in events_for(flock_node, "Pod", name)
            ],
            until=lambda evs: any(
                c == "flock.fritzlab.net/agent" and ANNOTATION in m for c, m in evs
            ),
            timeout=90,
            what=f"flock's Event on {name} naming {ANNOTATION}",
        )
        (p,) = pods(flock_node, f"app={name}")
        waiting = [
            c.get("state", {}).get("waiting", {}).get("reason")
            for c in p["status"].get("containerStatuses") or [{}]
        ]
        assert p["status"]["phase"] == "Pending" and waiting == ["ContainerCreating"], p["status"]
        assert not pod_ips(p)
    finally:
        _delete(flock_node, f"pod/{name}")
    wait_gone(flock_node, f"app={name}")


def test_agent_restart_and_rolling_update_keep_traffic(flock_node: KubeNode) -> None:
    name = _name("keep")
    flock_node.apply([deployment(name, replicas=2)])
    try:
        items = wait_ready(flock_node, f"app={name}", 2)
        ips = [ip for p in items for ip in pod_ips(p)]
        with _traffic(flock_node, ips) as failures:
            # The agent container killed: the kubelet restarts it in place.
            ((_, _, restarts_before),) = _agent_ready(flock_node)
            cid = flock_node.crictl("ps", "--name", "^agent$", "-q").stdout.split()[0]
            flock_node.crictl("stop", "--timeout", "0", cid)
            wait_until(
                lambda: _agent_ready(flock_node),
                until=lambda s: len(s) == 1 and s[0][1] and s[0][2] > restarts_before,
                timeout=120,
                what="the agent container restarted by the kubelet and Ready",
            )
            # A rolling update of the DaemonSet to a new image tag.
            old = flock_node.image("flock").ref
            new = f"{old}-e2e"
            flock_node.node_exec(
                [
                    str(_ctr_path()),
                    f"--address={flock_node.containerd_socket}",
                    "-n",
                    "k8s.io",
                    "images",
                    "tag",
                    "--force",
                    old,
                    new,
                ]
            )
            ds = daemonset_name(flock_node)
            flock_node.kubectl("set", "image", "-n", "kube-system", f"daemonset/{ds}", f"*={new}")
            flock_node.kubectl(
                "rollout", "status", "-n", "kube-system", f"daemonset/{ds}", "--timeout=180s",
                timeout=200,
            )  # fmt: skip
            (agent,) = agent_pods(flock_node)
            assert {c["image"] for c in agent["spec"]["containers"]} == {new}
        assert failures == [], failures[:10]
        for ip in ips:
            assert node_http(flock_node, ip) in {p["metadata"]["name"] for p in items}
    finally:
        _delete(flock_node, f"deployment/{name}")
    wait_gone(flock_node, f"app={name}")


def _ctr_path() -> Any:
    from flock.testbed.tools import tool_path

    return tool_path("ctr")


def test_node_reboot_gives_every_pod_its_network_back_without_leaks(flock_node: KubeNode) -> None:
    name = _name("boot")
    flock_node.apply([deployment(name, replicas=3)])
    try:
        wait_ready(flock_node, f"app={name}", 3)
        flock_node.reboot()
        wait_until(flock_node.node_ready, timeout=180, what="node Ready after the reboot")
        wait_until(
            lambda: _agent_ready(flock_node),
            until=lambda s: len(s) == 1 and s[0][1],
            timeout=180,
            what="the flock agent Ready after the reboot",
        )

        def all_answer() -> list[tuple[str, list[str], list[str]]]:
            out = []
            for p in pods(flock_node, f"app={name}"):
                if not is_ready(p):
                    return [("not ready", [p["metadata"]["name"]], [])]
                out.append(
                    (
                        p["metadata"]["name"],
                        pod_ips(p),
                        [node_http(flock_node, ip) for ip in pod_ips(p)],
                    )
                )
            return out

        answers = wait_until(
            all_answer,
            until=lambda a: len(a) == 3 and all(b == [n, n] for n, _, b in a),
            timeout=180,
            what="every pod Ready and answering on both addresses after the reboot",
        )
        # The sandboxes of before the reboot are gone with their netns: nothing of
        # theirs may stay (a host route to an old address would blackhole it).
        live = {ip for _, ips, _ in answers for ip in ips}
        wait_until(
            lambda: _pod_host_routes(flock_node) - live,
            until=lambda extra: not extra,
            timeout=120,
            what="no host route left but the live pods' addresses",
        )
        # Host routes go with the veths anyway; the allocations are flock's own: the
        # sandboxes that died with the reboot must not keep theirs.
        _wait_status(flock_node, "after the reboot")
    finally:
        _delete(flock_node, f"deployment/{name}")
    wait_gone(flock_node, f"app={name}")
