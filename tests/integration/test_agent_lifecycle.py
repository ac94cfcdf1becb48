"""The real agent's life cycle: its metrics move, one bad pod does not stop its start-up,
and SIGTERM ends it within the documented drain time even with a verb stuck in the kernel.

Each test builds its own node (`flock.testbed.node.TestNode`, prefix `fl`) and
drives the real agent through the real plugin.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flock.testbed import netns
from flock.testbed.node import PluginResult, TestNode, test_node
from flock.testbed.wait import wait_until

pytestmark = pytest.mark.root

ANY6 = "2001:db8:a::53"
SPEC = {
    "cidr6": ["2001:db8:f001::/64"],
    "cidr4": ["10.1.0.0/24"],
    "allowedAddresses": [{"cidr": "2001:db8:a::/48", "use": ["anycast"]}],
}
# docs/agent.md "Start-up and shutdown": running verbs get this long on SIGTERM.
DRAIN = 2.0


@pytest.fixture
def node() -> Iterator[TestNode]:
    with test_node("fl", v6="2001:db8:ffff::1/64", v4="198.51.100.1/24", log_lines=60) as n:
        n.set_node_config(SPEC)
        yield n


def scrape(node: TestNode, port: int) -> dict[str, float]:
    """/metrics as {series: value} (series with labels as Prometheus prints them)."""
    fetch = "import urllib.request,sys;print(urllib.request.urlopen(sys.argv[1]).read().decode())"
    text = node.exec("python3", "-c", fetch, f"http://127.0.0.1:{port}/metrics")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+) (\S+)$", line)
        if m and not line.startswith("#"):
            out[m.group(1)] = float(m.group(2))
    return out


def test_every_documented_series_moves(node: TestNode) -> None:
    """docs/agent.md lists what /metrics carries; each series must follow the agent's
    work: ADDs, a readiness flip, a policy change, and a BIRD that does not answer
    (every pass's export step fails: reconcile failures count up)."""
    port = random.randint(20000, 60000)
    node.start_agent(
        "--metrics-addr", f"127.0.0.1:{port}", "--bird-socket", str(node.run_dir / "no-bird.ctl")
    )
    web = node.add_pod("web", annotations={"anycast": ANY6})
    node.add_pod("plain")
    m = wait_until(
        lambda: scrape(node, port),
        timeout=10,
        what="anycast route and export counted",
        until=lambda m: (
            m.get("flock_anycast_routes_advertised") == 1.0 and m.get("flock_bgp_exports") == 1.0
        ),
    )
    assert m['flock_cni_op_seconds_count{result="ok",verb="ADD"}'] == 2.0
    assert m['flock_allocations{family="ipv6"}'] == 2.0
    assert m["flock_reconcile_failures_total"] >= 1.0
    node.set_ready(web, False)
    wait_until(
        lambda: scrape(node, port),
        timeout=10,
        what="the withdrawn anycast route uncounted",
        until=lambda m: (
            m.get("flock_anycast_routes_advertised") == 0.0 and m.get("flock_bgp_exports") == 0.0
        ),
    )
    before = scrape(node, port)["flock_policy_sync_seconds_count"]
    node.write(
        "policy.yaml",
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
    )
    wait_until(
        lambda: scrape(node, port)["flock_policy_sync_seconds_count"],
        timeout=10,
        what="a policy sync observed",
        until=lambda n: n > before,
    )


def test_one_pod_that_cannot_be_repaired_does_not_stop_start_up(node: TestNode) -> None:
    """Start-up re-sync handles each attachment on its own: a pod whose network
    cannot be rebuilt (a foreign eth0 sits in its namespace) is counted and shown in
    status; the agent starts and the other pods are repaired."""
    node.start_agent()
    bad = node.add_pod("bad")
    good = node.add_pod("good")
    node.stop_agent()
    for pod in (bad, good):  # both need repair: their veth pairs are gone
        veth = pod.result.json["interfaces"][0]["name"]  # type: ignore[union-attr]
        node.exec("ip", "link", "del", veth)
    foreign = ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "foreign0"]
    netns.run(foreign, netns=bad.netns_name)
    node.start_agent()
    st = node.status()
    failures = st["resync"]["failures"]
    assert [f["pod"] for f in failures] == ["default/bad"], st["resync"]
    assert "eth0" in failures[0]["error"]
    assert st["resync"]["repaired"] == 1
    assert node.cni_check(good).ok, node.cni_check(good).stdout


def test_sigterm_while_a_verb_is_stuck_in_the_kernel_exits_within_the_drain_time(
    node: TestNode,
) -> None:
    """An ADD whose netns path is a FIFO blocks in open(2) in the agent's kernel thread
    forever. SIGTERM must still end the agent within its drain time (the plugin gets
    an error or a closed socket; the pod's sandbox is the runtime's to retry)."""
    node.start_agent("--drain-timeout", str(DRAIN))
    uid = node.put_pod("stuck")
    fifo = node.base_dir / "stuck-netns"
    os.mkfifo(fifo)
    env: dict[str, Any] = {
        "container_id": uuid.uuid4().hex,
        "netns_path": str(fifo),
        "pod_namespace": "default",
        "pod_name": "stuck",
        "pod_uid": uid,
    }
    results: list[PluginResult] = []
    adder = threading.Thread(target=lambda: results.append(node.cni("ADD", **env, timeout=60)))
    adder.start()
    proc = node.agent
    assert proc is not None
    try:
        wait_until(
            lambda: agent_waits_on_fifo(proc.pid),
            timeout=10,
            what="the agent's ADD blocked opening the FIFO",
        )
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(DRAIN + 8)
        except subprocess.TimeoutExpired:
            pytest.fail(f"agent ignored SIGTERM with a verb stuck:\n{node.log_tail()}")
        took = time.monotonic() - start
        assert code == 0 and took < DRAIN + 8, (code, took)
    finally:
        # Unblock the stuck open(2) if the agent is still there (it was, before the fix).
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        node.stop_agent()
        adder.join(70)
    assert results and not results[0].ok


def agent_waits_on_fifo(pid: int) -> bool:
    """Whether a thread of process `pid` sleeps in the kernel's FIFO open (which waits
    in `wait_for_partner` for a writer)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{task}/wchan").read_text() == "wait_for_partner":
                return True
    return False
