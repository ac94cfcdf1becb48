"""Installing flock from deploy/install.yaml on a real node, up to the CNI STATUS gate.

Independent of the agent's datastore: the DaemonSet's installer must put the
plugin and its conflist on the node, and a node whose flock agent is not running
must not turn Ready, because containerd's CNI STATUS call reaches flock's plugin,
which says the agent is unreachable. The node is its own (this test removes the
agent), not the session's flock node.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest
from e2e_flock import INSTALL_YAML, agent_pods
from e2e_helpers import prerequisites, progress

from flock.testbed.kubenode import KubeNode
from flock.testbed.wait import wait_until


@pytest.fixture
def bare_flock_node() -> Iterator[KubeNode]:
    if not INSTALL_YAML.exists():
        pytest.skip("deploy/install.yaml is not rendered yet")
    prerequisites("pause", "test", "flock")
    with KubeNode(prefix="fki", images=("pause", "flock"), progress=progress) as node:
        yield node


def _ready_condition(node: KubeNode) -> tuple[str, str]:
    conds = node.get_json("node", node.name)["status"].get("conditions") or []
    ready = next((c for c in conds if c["type"] == "Ready"), {})
    return ready.get("status", ""), ready.get("message", "")


def test_installer_writes_the_plugin_and_status_gates_readiness(bare_flock_node: KubeNode) -> None:
    node = bare_flock_node
    node.kubectl("apply", "--server-side", "-f", str(INSTALL_YAML))
    node.kubectl("label", "node", node.name, "flock.fritzlab.net/agent=")

    def installer_done() -> list[object]:
        return [
            c.get("state", {}).get("terminated", {}).get("exitCode")
            for p in agent_pods(node)
            for c in p["status"].get("initContainerStatuses") or []
        ]

    wait_until(installer_done, until=lambda s: s == [0], timeout=180, what="installer exit 0")
    (conflist,) = list(node.cni_conf_dir.glob("*.conflist"))
    assert json.loads(conflist.read_text())["plugins"][0]["type"] == "flock"
    assert (node.cni_bin_dir / "flock").exists()
    # No agent on the node (label removed: the DaemonSet pod goes): NotReady, and
    # the reason is flock's STATUS answer, relayed by containerd and the kubelet.
    node.kubectl("label", "node", node.name, "flock.fritzlab.net/agent-")
    wait_until(lambda: agent_pods(node), until=lambda p: not p, timeout=120, what="agent gone")
    _, message = wait_until(
        lambda: _ready_condition(node),
        until=lambda c: c[0] == "False" and "flock agent" in c[1],
        timeout=120,
        what="node NotReady with flock's STATUS message",
    )
    print(f"node NotReady: {message}", file=sys.stderr)
