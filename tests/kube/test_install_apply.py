"""Both install paths on a real kube-apiserver, and RBAC least privilege as the agent.

`kubectl apply -f deploy/install.yaml` and `helm install` of deploy/helm/flock must
each work on a fresh server: the CRD is created (and Established) before anything
uses it, a second apply changes nothing, `helm uninstall` takes back all but the
CRD. Then the agent's ServiceAccount, authenticated with its own token (not by
impersonation), is asked `kubectl auth can-i` for every verb the Kubernetes
datastore needs (all allowed) and for what it must never have (Secrets outside
kube-system, Nodes, any write other than Events and NodeConfig status: all
denied), and a few real requests with that token confirm the answers. The
Helm-installed agent (another release, another namespace) is checked the same way
by impersonation.

Runs its own kube-apiserver: installing cluster-scoped RBAC and the CRD must not
leak into other tests, and the agent's token must exist from the start.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flock.testbed import tools
from flock.testbed.kube import ApiServer, ApiServerError, service_account_user
from flock.testbed.tools import tool_path
from flock.testbed.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.yaml"
CHART = REPO / "deploy" / "helm" / "flock"
CRD_NAME = "nodeconfigs.flock.fritzlab.net"
AGENT = service_account_user("kube-system", "flock-agent")
HELM_NS, HELM_RELEASE = "flock-helm", "fh"
HELM_SA = f"system:serviceaccount:{HELM_NS}:{HELM_RELEASE}-agent"


def require_tools(*names: str) -> None:
    """Skip without root or the built tools; under CI a missing tool fails (as conftest's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs etcd and kube-apiserver in a network namespace")
    missing = tools.missing(*names)
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the tools first: {'; '.join(missing)}")
        pytest.skip("; ".join(missing))


@pytest.fixture(scope="module")
def api() -> Iterator[ApiServer]:
    require_tools("etcd", "kube-apiserver", "kubectl", "helm")
    with ApiServer(prefix="fki", users=[AGENT]) as server:
        yield server


@pytest.fixture(scope="module")
def helm_home() -> Iterator[dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="flock-helm-") as d:
        yield {
            "HELM_CACHE_HOME": f"{d}/cache",
            "HELM_CONFIG_HOME": f"{d}/config",
            "HELM_DATA_HOME": f"{d}/data",
        }


def helm(
    api: ApiServer, env: dict[str, str], *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The built helm, run inside the API server's network namespace as admin."""
    cmd = [
        *("nsenter", f"--net={api.netns_path}", str(tool_path("helm"))),
        *(f"--kubeconfig={api.kubeconfig_path}", *args),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **env}, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def crd_established(api: ApiServer) -> bool:
    proc = api.kubectl("get", "crd", CRD_NAME, "-o", "json", check=False)
    if proc.returncode != 0:
        return False
    conds = json.loads(proc.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conds)


def remove_crd(api: ApiServer) -> None:
    api.kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true")
    wait_until(
        lambda: api.kubectl("get", "crd", CRD_NAME, check=False).returncode != 0,
        timeout=60,
        what=f"CRD {CRD_NAME} gone",
    )


def create_nodeconfig(api: ApiServer, name: str) -> None:
    """A NodeConfig the CRD accepts: proves the API serves the type."""
    nc = {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": name},
        "spec": {
            "cidr6": ["2001:db8:f001::/64"],
            "cidr4": ["192.0.2.0/24"],
            "bgp": {"asn": 65001},
        },
    }
    api.kubectl("create", "-f", "-", input=json.dumps(nc))


# --- install paths ----------------------------------------------------------------------


def test_helm_install_on_a_fresh_server_and_uninstall(
    api: ApiServer, helm_home: dict[str, str]
) -> None:
    remove_crd(api)
    install = ("install", HELM_RELEASE, str(CHART), "-n", HELM_NS, "--create-namespace")
    # Server-side dry run first: the API server validates every templated object.
    helm(api, helm_home, *install, "--dry-run=server")
    helm(api, helm_home, *install)
    # helm creates crds/ first and waits for them; the type is served at once.
    assert crd_established(api)
    create_nodeconfig(api, "helm-node")
    name = f"{HELM_RELEASE}-agent"
    ds = json.loads(api.kubectl("-n", HELM_NS, "get", "daemonset", name, "-o", "json").stdout)
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == name
    out = helm(api, helm_home, "status", HELM_RELEASE, "-n", HELM_NS, "-o", "json").stdout
    assert json.loads(out)["info"]["status"] == "deployed"
    check_agent_permissions(api, as_user=HELM_SA, own_namespace=HELM_NS)

    # An upgrade to a new image tag rolls the DaemonSet's template (all three containers)
    # and leaves the CRD and its NodeConfigs alone.
    helm(api, helm_home, "upgrade", HELM_RELEASE, str(CHART), "-n", HELM_NS,
         "--reuse-values", "--set", "image.tag=0.1.0-rc2")  # fmt: skip
    ds = json.loads(api.kubectl("-n", HELM_NS, "get", "daemonset", name, "-o", "json").stdout)
    spec = ds["spec"]["template"]["spec"]
    images = {c["image"] for c in [*spec["containers"], *spec["initContainers"]]}
    assert images == {"ghcr.io/fritzlab/flock:0.1.0-rc2"}
    assert ds["metadata"]["generation"] == 2
    assert api.kubectl("get", "nodeconfig", "helm-node", check=False).returncode == 0

    helm(api, helm_home, "uninstall", HELM_RELEASE, "-n", HELM_NS)
    mine = f"app.kubernetes.io/instance={HELM_RELEASE}"
    for kinds, ns in (("daemonset,serviceaccount", HELM_NS), ("role,rolebinding", "kube-system")):
        left = api.kubectl("-n", ns, "get", kinds, "-l", mine, "-o", "name").stdout
        assert not left.strip(), f"helm uninstall left {left}"
    left = api.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout.split()
    assert f"clusterrole.rbac.authorization.k8s.io/{HELM_RELEASE}-agent" not in left
    # Helm never deletes a CRD (that would delete every NodeConfig).
    assert crd_established(api)


def test_kubectl_apply_install_yaml(api: ApiServer) -> None:
    remove_crd(api)
    api.kubectl("apply", "--dry-run=server", "-f", str(INSTALL))
    out = api.kubectl("apply", "-f", str(INSTALL)).stdout
    first = out.splitlines()[0]
    assert first.startswith(f"customresourcedefinition.apiextensions.k8s.io/{CRD_NAME}"), out
    wait_until(lambda: crd_established(api), timeout=60, what=f"CRD {CRD_NAME} Established")
    create_nodeconfig(api, "kubectl-node")
    # Applying again is a no-op: nothing in the rendered file fights the server's defaults.
    again = api.kubectl("apply", "-f", str(INSTALL)).stdout.splitlines()
    assert again and all(line.endswith(" unchanged") for line in again), again
    # Every object of the file exists, under the file's names.
    names = api.kubectl("get", "-f", str(INSTALL), "-o", "name").stdout.split()
    docs = [d for d in yaml.safe_load_all(INSTALL.read_text()) if d]
    assert len(names) == len(docs)
    assert sorted(n.rpartition("/")[2] for n in names) == sorted(
        d["metadata"]["name"] for d in docs
    )


# --- RBAC least privilege ---------------------------------------------------------------

# (verb, resource, namespace or "" for all/cluster-scoped, subresource)
Check = tuple[str, str, str, str]
R, W = ("get", "list", "watch"), ("create", "update", "patch", "delete")
NC = "nodeconfigs.flock.fritzlab.net"
NP = "networkpolicies.networking.k8s.io"
EV = "events.events.k8s.io"
NEEDED: list[Check] = [
    *[(v, "pods", ns, "") for v in R for ns in ("", "team-a")],
    *[(v, "namespaces", "", "") for v in R],
    *[(v, NP, "", "") for v in R],
    *[(v, NC, "", "") for v in R],
    *[(v, "secrets", "kube-system", "") for v in R],
    *[(v, EV, ns, "") for v in ("create", "patch") for ns in ("team-a", "kube-system")],
    *[(v, NC, "", "status") for v in ("update", "patch")],
]
FORBIDDEN: list[Check] = [
    # Secrets anywhere but kube-system, and any write to them.
    *[(v, "secrets", ns, "") for v in R for ns in ("default", "team-a", "")],
    *[(v, "secrets", "kube-system", "") for v in W],
    # Nodes: neither read nor written.
    *[(v, "nodes", "", "") for v in (*R, *W)],
    *[(v, "nodes", "", "status") for v in ("update", "patch")],
    # No writes to what it only watches.
    *[(v, "pods", "team-a", "") for v in W],
    *[(v, "pods", "team-a", "status") for v in ("update", "patch")],
    ("create", "pods", "team-a", "eviction"),
    *[(v, "namespaces", "", "") for v in W],
    *[(v, NP, "team-a", "") for v in W],
    # NodeConfig: status only, never the operator's spec.
    *[(v, NC, "", "") for v in (*W, "deletecollection")],
    ("get", NC, "", "status"),
    # Events: create and patch only (no reading others', no deleting), not the core group.
    *[(v, EV, "team-a", "") for v in ("get", "list", "update", "delete")],
    *[(v, "events", "team-a", "") for v in ("create", "patch")],
    # Everything else a DaemonSet could be tempted by.
    ("get", "configmaps", "kube-system", ""),
    ("create", "serviceaccounts", "kube-system", "token"),
    ("list", "services", "", ""),
    ("create", "pods", "kube-system", "exec"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io", "", ""),
    ("bind", "clusterroles.rbac.authorization.k8s.io", "", ""),
    ("impersonate", "users", "", ""),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", "", ""),
    ("*", "*", "", ""),
]


def can_i(
    api: ApiServer, check: Check, *, kubeconfig: Path | None = None, as_user: str = ""
) -> bool:
    verb, resource, ns, sub = check
    args = ["auth", "can-i", verb, resource]
    args += ["-n", ns] if ns else ["--all-namespaces"]
    if sub:
        args.append(f"--subresource={sub}")
    if as_user:
        args.append(f"--as={as_user}")
    proc = api.kubectl(*args, kubeconfig=kubeconfig, check=False)
    answer = proc.stdout.strip()
    if proc.returncode not in (0, 1) or answer not in ("yes", "no"):
        raise ApiServerError(
            f"kubectl {' '.join(args)}: {proc.returncode} {answer!r} {proc.stderr}"
        )
    return answer == "yes"


def check_agent_permissions(
    api: ApiServer, *, kubeconfig: Path | None = None, as_user: str = "", own_namespace: str = ""
) -> None:
    """Every NEEDED check allowed, every FORBIDDEN one denied; also Secrets in the
    agent's own namespace when that is not kube-system (a Helm release elsewhere)."""
    forbidden = list(FORBIDDEN)
    if own_namespace:
        forbidden += [(v, "secrets", own_namespace, "") for v in R]
    answers = {c: can_i(api, c, kubeconfig=kubeconfig, as_user=as_user) for c in NEEDED + forbidden}
    wrong_denied = [c for c in NEEDED if not answers[c]]
    wrong_allowed = [c for c in forbidden if answers[c]]
    assert not wrong_denied, f"the agent needs but is denied: {wrong_denied}"
    assert not wrong_allowed, f"the agent must not have but is allowed: {wrong_allowed}"


@pytest.fixture(scope="module")
def installed(api: ApiServer) -> ApiServer:
    """install.yaml applied (idempotent), its CRD Established."""
    api.kubectl("apply", "-f", str(INSTALL))
    wait_until(lambda: crd_established(api), timeout=60, what=f"CRD {CRD_NAME} Established")
    for ns in ("team-a",):
        if api.kubectl("get", "namespace", ns, check=False).returncode != 0:
            api.kubectl("create", "namespace", ns)
    return api


def test_agent_service_account_token_has_exactly_what_it_needs(installed: ApiServer) -> None:
    kubeconfig = installed.kubeconfig_for(AGENT.name)
    check_agent_permissions(installed, kubeconfig=kubeconfig)


def test_agent_token_real_requests(installed: ApiServer) -> None:
    """The can-i answers hold for real requests made with the agent's token."""
    api, token = installed, AGENT.token
    for ns, secret in (("kube-system", "bgp-md5"), ("team-a", "app")):
        api.kubectl(
            "-n", ns, "create", "secret", "generic", secret, "--from-literal=k=v", check=False
        )
    name = "rbac-node"
    if api.kubectl("get", "nodeconfig", name, check=False).returncode != 0:
        create_nodeconfig(api, name)

    def status(method: str, path: str, body: object = None, ctype: str = "") -> int:
        code, _ = api.request(
            method, path, body, token=token, content_type=ctype or "application/json"
        )
        return code

    nc = f"/apis/flock.fritzlab.net/v1alpha1/nodeconfigs/{name}"
    merge = "application/merge-patch+json"
    assert status("GET", "/api/v1/pods?limit=1") == 200
    assert status("GET", "/apis/networking.k8s.io/v1/networkpolicies?limit=1") == 200
    assert status("GET", "/api/v1/namespaces/kube-system/secrets/bgp-md5") == 200
    assert status("GET", "/api/v1/namespaces/team-a/secrets/app") == 403
    assert status("GET", "/api/v1/secrets?limit=1") == 403
    assert status("GET", "/api/v1/nodes") == 403
    # Status yes, spec no.
    cond = {"type": "Ready", "status": "True", "reason": "Test", "message": "rbac test"}
    patch = {"status": {"conditions": [{**cond, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    # Authorized (not 403); served (200) once the CRD declares the status subresource,
    # 404 from the CRD handler (after authorization) while it does not.
    crd = json.loads(api.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    served = all("status" in v.get("subresources", {}) for v in crd["spec"]["versions"])
    assert status("PATCH", nc + "/status", patch, merge) == (200 if served else 404)
    assert status("PATCH", nc, {"spec": {"bgp": {"asn": 65002}}}, merge) == 403
    assert status("DELETE", nc) == 403
    event = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"generateName": "flock-", "namespace": "team-a"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "flock.fritzlab.net/agent",
        "reportingInstance": "flock-agent-n1",
        "action": "AddPod",
        "reason": "InvalidAnnotation",
        "note": "rbac test",
        "type": "Warning",
        "regarding": {"kind": "Pod", "namespace": "team-a", "name": "p"},
    }
    assert status("POST", "/apis/events.k8s.io/v1/namespaces/team-a/events", event) == 201
    assert status("GET", "/apis/events.k8s.io/v1/namespaces/team-a/events") == 403
    pod = {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    assert status("POST", "/api/v1/namespaces/team-a/pods", pod) == 403
