"""Where the lab puts the cluster objects the agents read: NodeConfigs, Namespaces, Pods.

The lab acts as the control plane: it "schedules" pods (writes them with a
`nodeName`), and plays the kubelet's readiness probe (flips the pod's Ready
condition). `LabDatastore` is that small surface. `ManifestsDatastore` writes
one Kubernetes-shaped YAML file per object into the directory every agent
watches (standalone mode); a Kubernetes implementation (Pod objects through
the API server, readiness as the Pod's status) slots in behind the same
protocol without the lab's verbs changing.

Files are written to a hidden temporary name and renamed into place, so the
agent's watch never sees a half-written manifest.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from flock.lab.topology import PodSpec


class LabDatastore(Protocol):
    """The lab's view of the cluster datastore."""

    def put_node_config(self, obj: Mapping[str, Any]) -> None: ...

    def put_namespace(self, name: str) -> None: ...

    def put_pod(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        """Create or replace the pod object (scheduled on `pod.node`)."""

    def set_ready(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        """Flip the pod's Ready condition, as a kubelet's probe would."""

    def delete_pod(self, namespace: str, name: str) -> None: ...


def pod_object(pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> dict[str, Any]:
    """The v1 Pod object (dict shape) for a lab pod."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now},
        ],
    }
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": uid,
            "labels": dict(pod.labels),
            "annotations": dict(pod.annotations),
        },
        "spec": {
            "nodeName": pod.node,
            "containers": [{"name": "main", "image": f"lab/{pod.name}:latest"}],
        },
        "status": status,
    }


def new_uid() -> str:
    return str(uuid.uuid4())


def open_datastore(kind: str, run_dir: Path) -> LabDatastore:
    """The datastore a lab was built with (recorded in its state as `kind`)."""
    if kind == "manifests":
        return ManifestsDatastore(run_dir / "manifests")
    raise ValueError(f"unknown lab datastore {kind!r} (known: manifests)")


class ManifestsDatastore:
    """One YAML file per object in `directory` (the agents' `--manifests`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _write(self, filename: str, obj: Mapping[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / filename
        tmp = self.directory / f".{filename}.tmp"
        with open(tmp, "w") as f:
            yaml.safe_dump(dict(obj), f, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def put_node_config(self, obj: Mapping[str, Any]) -> None:
        self._write(f"nodeconfig-{obj['metadata']['name']}.yaml", obj)

    def put_namespace(self, name: str) -> None:
        obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self._write(f"namespace-{name}.yaml", obj)

    def _pod_file(self, namespace: str, name: str) -> str:
        return f"pod-{namespace}-{name}.yaml"

    def put_pod(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        self._write(
            self._pod_file(pod.namespace, pod.name), pod_object(pod, uid=uid, ready=ready, ips=ips)
        )

    def set_ready(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        self.put_pod(pod, uid=uid, ready=ready, ips=ips)

    def delete_pod(self, namespace: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / self._pod_file(namespace, name)).unlink()
