"""Objects and probes of the e2e tier: everything goes through the API or real traffic.

The tests never read flock's state files or call its agent: they create
Kubernetes objects with kubectl, wait for what the API reports, and send
traffic from the node's network namespace or from a pod (`kubectl exec`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from flock.testbed.kubenode import TEST_IMAGE, KubeNode, built_images
from flock.testbed.tools import missing
from flock.testbed.wait import wait_until

HTTP_PORT = 8080
ECHO_PORT = 7


def container(*, not_ready: bool = False) -> dict[str, Any]:
    """The test image: HTTP on 8080 (GET /ready answers 200 while /www/ready exists)."""
    env = [{"name": "NOT_READY", "value": "1"}] if not_ready else []
    return {
        "name": "app",
        "image": TEST_IMAGE,
        "imagePullPolicy": "Never",
        "env": env,
        "ports": [{"containerPort": HTTP_PORT, "name": "http"}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": HTTP_PORT},
            "periodSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
        },
    }


def pod(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    namespace: str = "default",
    not_ready: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {"app": name}),
            "annotations": dict(annotations or {}),
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [container(not_ready=not_ready)],
        },
    }


def deployment(
    name: str,
    *,
    replicas: int,
    annotations: Mapping[str, str] | None = None,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": dict(annotations or {})},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [container()],
                },
            },
        },
    }


def service(
    name: str, *, selector: Mapping[str, str], namespace: str = "default"
) -> dict[str, Any]:
    """A dual-stack ClusterIP Service (both families required) on port 80 -> 8080."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": dict(selector),
            "ipFamilyPolicy": "RequireDualStack",
            "ipFamilies": ["IPv4", "IPv6"],
            "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT}],
        },
    }


def pods(node: KubeNode, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = node.get_json("pods", "-n", namespace, "-l", selector)["items"]
    return items


def is_ready(p: Mapping[str, Any]) -> bool:
    conds = p.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def pod_ips(p: Mapping[str, Any]) -> list[str]:
    return [x["ip"] for x in p.get("status", {}).get("podIPs") or []]


def summary(items: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, bool, list[str]]]:
    """(name, phase, ready, IPs) per pod: what a failed wait shows."""
    return [
        (p["metadata"]["name"], p.get("status", {}).get("phase", ""), is_ready(p), pod_ips(p))
        for p in items
    ]


def wait_ready(
    node: KubeNode, selector: str, count: int, *, namespace: str = "default", timeout: float = 120
) -> list[dict[str, Any]]:
    """Wait until exactly `count` pods match and all are Ready with IPs of both families."""

    def done(items: list[dict[str, Any]]) -> bool:
        live = [p for p in items if not p["metadata"].get("deletionTimestamp")]
        return (
            len(live) == count
            and len(items) == count
            and all(is_ready(p) and len(pod_ips(p)) == 2 for p in items)
        )

    items = wait_until(
        lambda: pods(node, selector, namespace),
        until=done,
        timeout=timeout,
        what=f"{count} Ready dual-stack pods {selector}",
        interval=0.3,
    )
    return items


def wait_gone(
    node: KubeNode, selector: str, *, namespace: str = "default", timeout: float = 120
) -> None:
    wait_until(
        lambda: summary(pods(node, selector, namespace)),
        until=lambda s: not s,
        timeout=timeout,
        what=f"no pods {selector}",
        interval=0.3,
    )


def node_http(node: KubeNode, ip: str, path: str = "/hostname", port: int = HTTP_PORT) -> str:
    """GET http://ip:port/path from the node's network namespace ("" if it fails)."""
    host = f"[{ip}]" if ":" in ip else ip
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://{host}:{port}{path}', timeout=3)\n"
        "    print(r.read().decode().strip())\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, e)\n"
    )
    proc = subprocess.run(
        ["nsenter", f"--net={node.netns_path}", "/usr/bin/python3", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip()


def pod_http(
    node: KubeNode,
    pod_name: str,
    ip: str,
    path: str = "/hostname",
    port: int = HTTP_PORT,
    namespace: str = "default",
) -> str:
    """GET from inside a pod: the body, or "ERR ..." (busybox nc, 3 s timeout).

    nc and not wget: the test image's static busybox wget segfaults (exit 139) on
    every request, numeric addresses included.
    """
    request = f"GET {path} HTTP/1.0\\r\\n\\r\\n"
    proc = node.kubectl(
        "exec", "-n", namespace, pod_name, "--",
        "sh", "-c", f'printf "{request}" | nc -w 3 {ip} {port}',
        check=False,
        timeout=60,
    )  # fmt: skip
    head, sep, body = proc.stdout.replace("\r\n", "\n").partition("\n\n")
    if proc.returncode != 0 or not sep or " 200 " not in head.split("\n")[0]:
        return f"ERR {proc.returncode} {proc.stderr.strip()[-200:]} {head[:80]!r}"
    return body.strip()


def set_ready_file(node: KubeNode, pod_name: str, ready: bool, namespace: str = "default") -> None:
    """Flip the file the pod's readiness probe reads."""
    cmd = ["sh", "-c", "echo ok > /www/ready"] if ready else ["rm", "-f", "/www/ready"]
    node.kubectl("exec", "-n", namespace, pod_name, "--", *cmd)


def events_for(
    node: KubeNode, kind: str, name: str, namespace: str = "default"
) -> list[dict[str, Any]]:
    data = json.loads(
        node.kubectl(
            "get", "events", "-n", namespace, "-o", "json",
            "--field-selector", f"involvedObject.kind={kind},involvedObject.name={name}",
        ).stdout
    )  # fmt: skip
    items: list[dict[str, Any]] = data["items"]
    return items


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prerequisites(*images: str) -> None:
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
