"""The e2e tier: a real node (kubelet + containerd) in namespaces, driven through the API.

Opt-in: it builds nothing itself and needs the `kube`, `etcd` and `node` tool
sets (scripts/build-tools) and the images (scripts/build-images); `./scripts/e2e`
builds them and runs this tier with FLOCK_E2E=1. Without that variable every
test here is skipped, so the ordinary test command stays fast.

One node per session and CNI: `ptp_node` (Debian's ptp + host-local, the
reference that proves the harness) and `flock_node` (flock installed from
deploy/install.yaml, peering with FRR). Tests create their own objects with
unique names and delete them, so they share the node.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flock.testbed.kubenode import KubeNode, built_images
from flock.testbed.tools import missing

REPO = Path(__file__).resolve().parents[2]
INSTALL_YAML = REPO / "deploy" / "install.yaml"


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    if not os.environ.get("FLOCK_E2E"):
        reason = "the e2e tier is opt-in: run ./scripts/e2e (or set FLOCK_E2E=1)"
    elif os.geteuid() != 0:
        reason = "the e2e tier needs root (namespaces, cgroups, mounts)"
    if reason is None:
        return
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=reason))


def _prerequisites(*images: str) -> None:
    lacking = missing(
        "etcd", "kube-apiserver", "kubectl", "kubelet", "kube-controller-manager",
        "kube-scheduler", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr",
    )  # fmt: skip
    if lacking:
        pytest.fail("; ".join(lacking))
    built = built_images()
    absent = [i for i in images if i not in built]
    if absent:
        pytest.fail(f"images {absent} not built: run ./scripts/build-images")


def flock_on_kubernetes_missing() -> str | None:
    """What is still missing for flock to run as a DaemonSet on the API (None: nothing)."""
    if not INSTALL_YAML.exists():
        return "deploy/install.yaml is not rendered yet (helper F: scripts/render-install)"
    if not re.search(r"^kind: DaemonSet", INSTALL_YAML.read_text(), re.M):
        return "deploy/install.yaml has no DaemonSet"
    helptext = subprocess.run(
        [str(Path(sys.executable).parent / "flock"), "agent", "--help"],
        capture_output=True,
        text=True,
    ).stdout
    if "--kubernetes" not in helptext:
        return (
            "flock's agent has no Kubernetes datastore yet (`flock agent --kubernetes`, "
            "issue 10 item 1): the DaemonSet's agent cannot start"
        )
    if "flock" not in built_images():
        return "the flock image is not built: run ./scripts/build-images"
    return None


@pytest.fixture(scope="session")
def ptp_node() -> Iterator[KubeNode]:
    """A node whose CNI is Debian's ptp + host-local (both families), Ready."""
    _prerequisites("pause", "test")
    node = KubeNode(prefix="fke", progress=_progress)
    with node:
        node.use_reference_cni()
        node.timings["ready_after_cni"] = node.wait_node_ready()
        _progress(f"ptp node up: {node.timings}")
        yield node


@pytest.fixture(scope="session")
def flock_node() -> Iterator[KubeNode]:
    """A node running flock from deploy/install.yaml, peering with FRR; Ready."""
    reason = flock_on_kubernetes_missing()
    if reason is not None:
        pytest.skip(reason)
    _prerequisites("pause", "test", "flock")
    from e2e_flock import install_flock

    node = KubeNode(
        prefix="fkf", router=True, images=("pause", "test", "flock"), progress=_progress
    )
    with node:
        install_flock(node)
        _progress(f"flock node up: {node.timings}")
        yield node
