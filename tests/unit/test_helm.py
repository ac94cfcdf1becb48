"""deploy/install.yaml and the Helm chart deploy/helm/flock: one source of truth.

install.yaml is the chart rendered with its default values (scripts/render-install),
so the first test renders it with the built helm and compares. The rest read the
committed install.yaml and check what an operator relies on without an API server:
the CRD is the one file deploy/crds/nodeconfig.yaml and comes first, RBAC grants
exactly the agent's needs (tests/kube/test_install_apply.py proves it on a real server),
the DaemonSet runs only on labelled nodes, mounts each host path at the same path,
and probes BIRD.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "flock"
INSTALL = REPO / "deploy" / "install.yaml"
CRD = REPO / "deploy" / "crds" / "nodeconfig.yaml"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def _helm() -> Path:
    sys.path.insert(0, str(REPO / "src"))
    from flock.testbed.tools import ToolMissing, tool_path

    try:
        return tool_path("helm")
    except ToolMissing as e:
        if IN_CI:
            pytest.fail(f"CI must build helm: {e}")
        pytest.skip(str(e))


def _version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(ds: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in ds if d["kind"] == kind]


@pytest.fixture(scope="module")
def installed() -> list[dict[str, Any]]:
    return docs(INSTALL.read_text())


def test_install_yaml_is_the_rendered_chart() -> None:
    helm = _helm()
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render-install"), "--check", "--helm", str(helm)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr}"


def test_chart_values_change_every_path_together(tmp_path: Path) -> None:
    """A different run dir moves the agent's socket, BIRD's files and the mounts as one."""
    helm = _helm()
    res = subprocess.run(
        [
            str(helm),
            "template",
            "f2",
            str(CHART),
            "-n",
            "net",
            "--set",
            "paths.runDir=/run/f2",
            "--set",
            "image.tag=dev",
            "--set",
            "installer.portmap=true",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    ds = docs(res.stdout)
    (dset,) = by_kind(ds, "DaemonSet")
    spec = dset["spec"]["template"]["spec"]
    assert dset["metadata"]["namespace"] == "net" and dset["metadata"]["name"] == "f2-agent"
    text = yaml.safe_dump(spec)
    assert "/run/flock" not in text
    install = spec["initContainers"][0]["command"]
    assert "--socket=/run/f2/agent.sock" in install and "--portmap" in install
    agent, bird = spec["containers"]
    assert "--bird-socket=/run/f2/bird.ctl" in agent["command"]
    assert {c["image"] for c in [*spec["containers"], *spec["initContainers"]]} == {
        "ghcr.io/fritzlab/flock:dev"
    }
    assert "/run/f2/bird.conf" in bird["command"][2]
    (role,) = by_kind(ds, "Role")
    (binding,) = by_kind(ds, "RoleBinding")
    # Secrets stay kube-system's, wherever the release is: the agent reads no other.
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "kube-system"
    sa = {"kind": "ServiceAccount", "name": "f2-agent", "namespace": "net"}
    assert binding["subjects"] == [sa]
    # helm template leaves CRDs out unless asked; `helm install` applies crds/ first.
    assert not by_kind(ds, "CustomResourceDefinition")


def test_chart_lints_strict() -> None:
    res = subprocess.run(
        [str(_helm()), "lint", "--strict", str(CHART)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_chart_version_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == _version()


def test_crd_has_one_source(installed: list[dict[str, Any]]) -> None:
    link = CHART / "crds" / "nodeconfig.yaml"
    assert link.is_symlink() and link.resolve() == CRD.resolve()
    assert installed[0]["kind"] == "CustomResourceDefinition", "the CRD must be applied first"
    (crd,) = by_kind(installed, "CustomResourceDefinition")
    assert crd == yaml.safe_load(CRD.read_text())


EXPECTED_CLUSTER_RULES = [
    {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["flock.fritzlab.net"],
        "resources": ["nodeconfigs"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["flock.fritzlab.net"],
        "resources": ["nodeconfigs/status"],
        "verbs": ["update", "patch"],
    },
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]


def test_rbac_is_exactly_the_agents_needs(installed: list[dict[str, Any]]) -> None:
    (sa,) = by_kind(installed, "ServiceAccount")
    who = {"kind": "ServiceAccount", "name": "flock-agent", "namespace": "kube-system"}
    assert (sa["metadata"]["name"], sa["metadata"]["namespace"]) == ("flock-agent", "kube-system")
    (cr,) = by_kind(installed, "ClusterRole")
    assert cr["rules"] == EXPECTED_CLUSTER_RULES
    (crb,) = by_kind(installed, "ClusterRoleBinding")
    assert crb["subjects"] == [who] and crb["roleRef"]["name"] == cr["metadata"]["name"]
    # Secrets: a namespaced Role in kube-system, never a ClusterRole.
    (role,) = by_kind(installed, "Role")
    assert role["metadata"]["namespace"] == "kube-system"
    read = ["get", "list", "watch"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": read}]
    (rb,) = by_kind(installed, "RoleBinding")
    assert rb["metadata"]["namespace"] == "kube-system" and rb["subjects"] == [who]
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role"}
    assert rb["roleRef"] == {**ref, "name": role["metadata"]["name"]}


def test_daemonset_runs_on_labelled_nodes_with_bird_probes(installed: list[dict[str, Any]]) -> None:
    (ds,) = by_kind(installed, "DaemonSet")
    assert ds["metadata"]["namespace"] == "kube-system"
    spec = ds["spec"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "flock.fritzlab.net/agent", "operator": "Exists"}]}
    ]
    assert spec["hostNetwork"] is True and spec["serviceAccountName"] == "flock-agent"
    assert ds["spec"]["selector"]["matchLabels"] == {"app": "flock-agent"}
    images = {c["image"] for c in [*spec["containers"], *spec["initContainers"]]}
    assert images == {f"ghcr.io/fritzlab/flock:{_version()}"}
    (installer,) = spec["initContainers"]
    assert installer["command"][:2] == ["flock", "install-cni"]
    assert not installer["securityContext"].get("privileged")
    agent, bird = spec["containers"]
    assert (agent["name"], bird["name"]) == ("agent", "bird")
    assert "--kubernetes" in agent["command"]
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    probe = ["birdc", "-s", "/run/flock/bird.ctl", "show", "status"]
    assert bird["livenessProbe"]["exec"]["command"] == probe
    assert not bird["securityContext"].get("privileged")
    assert bird["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Every host path is mounted at its own path (the conflist names host paths);
    # the installer's are under /host.
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    for c in spec["containers"]:
        for m in c["volumeMounts"]:
            assert m["mountPath"] == host[m["name"]], (c["name"], m)
    for m in installer["volumeMounts"]:
        assert m["mountPath"] == "/host" + host[m["name"]]
    assert "--socket=/run/flock/agent.sock" in installer["command"]
    assert "--state-dir=/var/lib/flock" in installer["command"]


def test_agent_accepts_the_daemonsets_flags(
    installed: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The chart and `flock agent` cannot drift apart: its parser takes every flag."""
    from flock.agent.options import parse_args

    (ds,) = by_kind(installed, "DaemonSet")
    agent = ds["spec"]["template"]["spec"]["containers"][0]
    assert agent["command"][:2] == ["flock", "agent"]
    argv = [a.replace("$(NODE_NAME)", "node-1") for a in agent["command"][2:]]
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    if "--kubernetes" not in capsys.readouterr().out:
        pytest.skip("the agent has no --kubernetes datastore yet (issue 10 item 1)")
    try:
        opts, level = parse_args(argv)
    except SystemExit:
        pytest.fail(f"flock agent refuses the DaemonSet's flags {argv}: {capsys.readouterr().err}")
    assert str(opts.socket) == "/run/flock/agent.sock"  # what install-cni's --socket names
    assert str(opts.bird_socket) == "/run/flock/bird.ctl" and level == "info"
