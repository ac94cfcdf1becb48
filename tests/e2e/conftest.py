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
from collections.abc import Iterator

import pytest
from e2e_flock import flock_on_kubernetes_missing
from e2e_helpers import prerequisites, progress

from flock.testbed.kubenode import KubeNode


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


@pytest.fixture(scope="session")
def ptp_node() -> Iterator[KubeNode]:
    """A node whose CNI is Debian's ptp + host-local (both families), Ready."""
    prerequisites("pause", "test")
    node = KubeNode(prefix="fke", progress=progress)
    with node:
        node.use_reference_cni()
        node.timings["ready_after_cni"] = node.wait_node_ready()
        progress(f"ptp node up: {node.timings}")
        yield node


@pytest.fixture(scope="session")
def flock_node() -> Iterator[KubeNode]:
    """A node running flock from deploy/install.yaml, peering with FRR; Ready."""
    reason = flock_on_kubernetes_missing()
    if reason is not None:
        pytest.skip(reason)
    prerequisites("pause", "test", "flock")
    node = KubeNode(prefix="fkf", router=True, images=("pause", "test", "flock"), progress=progress)
    with node:
        node.install_flock()
        progress(f"flock node up: {node.timings}")
        yield node
