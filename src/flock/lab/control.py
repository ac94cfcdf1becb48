"""The lab's control plane: a real etcd and kube-apiserver, as in a cluster.

In the default (Kubernetes) mode the lab runs etcd and kube-apiserver, built
by `scripts/build-tools`, in a namespace of their own (`fl-<lab>-api`); each
node namespace is connected to it by a veth of its own carrying an IPv6 ULA
/64 (`fd00:f10c:ffff:<i>::1` on the API side), so a node reaches the API server
exactly as it would over a management network, without touching the BGP LAN.

Agents authenticate as the ServiceAccount the Helm chart creates
(`kube-system/flock-agent`, read from `deploy/install.yaml`) and are authorized
by the chart's own RBAC objects (taken
from `deploy/install.yaml`): the lab proves the least-privilege role is
enough for everything it does. The lab itself (the "control plane and
kubelet": pod objects, readiness) uses the admin identity through the built
kubectl, run inside the API namespace; `flock lab kubectl ...` does the same
for the user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from flock.lab.core import Lab, LabError, Progress
from flock.lab.datastore import Kubectl, KubectlError
from flock.testbed.kube import ApiServer, ApiServerError, service_account_user
from flock.testbed.tools import ToolMissing, tool_path

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "deploy" / "crds" / "nodeconfig.yaml"
INSTALL = REPO / "deploy" / "install.yaml"
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}


def api_netns(lab: str) -> str:
    return f"fl-{lab}-api"


def link_addresses(index: int) -> tuple[str, str]:
    """(API side, node side) of node number `index`'s link to the API server, as /64s."""
    return f"fd00:f10c:ffff:{index + 1:x}::1/64", f"fd00:f10c:ffff:{index + 1:x}::2/64"


def audit_policy(user: str) -> dict[str, Any]:
    """Log every request the agents make (metadata only), nothing else.

    `<run dir>/api-audit/agents.log` answers "what does an agent ask the API server,
    and how often?" (bench/bench_kube.py counts it at rest).
    """
    return {
        "apiVersion": "audit.k8s.io/v1",
        "kind": "Policy",
        "omitStages": ["RequestReceived"],
        "rules": [{"level": "Metadata", "users": [user]}, {"level": "None"}],
    }


def rbac_objects(install: Mapping[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The ServiceAccount and RBAC documents of `deploy/install.yaml` (not the DaemonSet)."""
    docs = [install] if install is not None else yaml.safe_load_all(INSTALL.read_text())
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in RBAC_KINDS:
            yield doc


def agent_service_account() -> tuple[str, str]:
    """(namespace, name) of the agents' ServiceAccount in `deploy/install.yaml`."""
    for doc in rbac_objects():
        if doc["kind"] == "ServiceAccount":
            meta = doc["metadata"]
            return str(meta.get("namespace", "default")), str(meta["name"])
    raise LabError(f"{INSTALL} has no ServiceAccount for the agents")


def preflight() -> None:
    """The built binaries and the manifests the control plane needs, or a LabError saying how."""
    try:
        for tool in ("etcd", "kube-apiserver", "kubectl"):
            tool_path(tool)
    except ToolMissing as e:
        raise LabError(f"{e} (or run the lab with --standalone: no API server)") from None
    for f in (CRD, INSTALL):
        if not f.exists():
            raise LabError(f"{f} not found: the lab runs from a flock source tree")


def start(lab: Lab, progress: Progress) -> None:
    """Start etcd + kube-apiserver, connect every node, install the CRD and the agents' RBAC."""
    nodes = [n.name for n in lab.topo.nodes]
    sa = service_account_user(*agent_service_account())
    sans = [link_addresses(i)[0].split("/")[0] for i in range(len(nodes))]
    audit_dir = lab.state.dir / "api-audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    policy = audit_dir / "policy.yaml"
    policy.write_text(yaml.safe_dump(audit_policy(sa.name)))
    api = ApiServer(
        netns_name=api_netns(lab.name),
        users=[sa],
        extra_sans=sans,
        extra_args=[
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_dir / 'agents.log'}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
        ],
    )
    lab.state.add_netns(api.netns, role="api server")
    try:
        api.start()
    finally:
        for role, pid in api.pids().items():
            lab.state.add_process(pid, role=role)
        if api.dir != Path():
            lab.state.add_dir(str(api.dir), role="api server files")
    progress(f"      kube-apiserver ready in {api.readyz_seconds:.1f}s")
    kubectl = Kubectl(
        binary=str(tool_path("kubectl")),
        kubeconfig=str(api.kubeconfig_path),
        netns=api.netns,
        cache_dir=str(api.dir / "kubectl-cache"),
    )
    kubectl.save(lab.state.dir)
    for i, node in enumerate(nodes):
        api_side, node_side = link_addresses(i)
        url = api.attach(
            lab.node(node).name, api_cidr=api_side, peer_cidr=node_side, peer_if="kapi0"
        )
        api.kubeconfig_for(sa.name, server=url, path=lab.node_dir(node) / "kubeconfig")
    # Copy the admin kubeconfig where users look for it (server 127.0.0.1 in the API netns).
    admin = lab.state.dir / "kubeconfig"
    admin.write_bytes(api.kubeconfig_path.read_bytes())
    admin.chmod(0o600)
    try:
        kubectl("apply", "--server-side", "-f", str(CRD))
        kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/nodeconfigs.flock.fritzlab.net",
        )  # fmt: skip
        docs = list(rbac_objects())
        kubectl("apply", "--server-side", "-f", "-", stdin=json.dumps(_as_list(docs)))
    except KubectlError as e:
        raise LabError(f"installing the CRD and RBAC on the lab's API server: {e}") from None
    except ApiServerError as e:  # pragma: no cover - attach/kubeconfig errors
        raise LabError(str(e)) from None


def _as_list(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": docs}
