"""Where the lab puts the cluster objects the agents read: NodeConfigs, Namespaces, Pods.

The lab acts as the control plane: it "schedules" pods (writes them with a
`nodeName`), and plays the kubelet's readiness probe (flips the pod's Ready
condition). `LabDatastore` is that small surface, with two implementations:

- `KubeDatastore`: objects in a real kube-apiserver (the lab's default), through
  the built `kubectl` run inside the namespace the API server listens in. Pods
  get their uid from the API server; readiness and pod IPs are written to the
  Pod's `status` subresource, as a kubelet writes them.
- `ManifestsDatastore` (`--standalone`): one Kubernetes-shaped YAML file per
  object in the directory every agent watches. Files are written to a hidden
  temporary name and renamed into place, so the agent's watch never sees a
  half-written manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from flock.lab.topology import PodSpec


class LabDatastore(Protocol):
    """The lab's view of the cluster datastore."""

    def put_node_config(self, obj: Mapping[str, Any]) -> None: ...

    def put_namespace(self, name: str) -> None: ...

    def create_pod(self, pod: PodSpec) -> str:
        """Create the pod object (scheduled on `pod.node`, not Ready); returns its uid."""
        ...

    def set_status(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        """Set the pod's Ready condition and IPs, as a kubelet does after the sandbox is up."""

    def delete_pod(self, namespace: str, name: str) -> None: ...


def pod_status(*, ready: bool, ips: Sequence[str] = ()) -> dict[str, Any]:
    """The Pod status a kubelet would write: phase, the Ready condition, pod IPs."""
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
    return status


def container_statuses(pod: PodSpec, *, ready: bool) -> list[dict[str, Any]]:
    """The one container's status, so `kubectl get pods` shows READY 1/1 or 0/1."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return [
        {
            "name": "main",
            "image": f"lab/{pod.name}:latest",
            "imageID": "",
            "ready": ready,
            "started": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": now}},
        }
    ]


def pod_object(
    pod: PodSpec, *, uid: str | None, ready: bool, ips: Sequence[str] = ()
) -> dict[str, Any]:
    """The v1 Pod object (dict shape) for a lab pod; no uid for the API server to fill in."""
    metadata: dict[str, Any] = {
        "name": pod.name,
        "namespace": pod.namespace,
        "labels": dict(pod.labels),
        "annotations": dict(pod.annotations),
    }
    if uid is not None:
        metadata["uid"] = uid
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": pod.node,
            "containers": [{"name": "main", "image": f"lab/{pod.name}:latest"}],
        },
        "status": pod_status(ready=ready, ips=ips),
    }


def new_uid() -> str:
    return str(uuid.uuid4())


def open_datastore(kind: str, run_dir: Path) -> LabDatastore:
    """The datastore a lab was built with (recorded in its state as `kind`)."""
    if kind == "manifests":
        return ManifestsDatastore(run_dir / "manifests")
    if kind == "kube":
        return KubeDatastore(Kubectl.load(run_dir))
    raise ValueError(f"unknown lab datastore {kind!r} (known: kube, manifests)")


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

    def create_pod(self, pod: PodSpec) -> str:
        uid = new_uid()
        self._write(self._pod_file(pod.namespace, pod.name), pod_object(pod, uid=uid, ready=False))
        return uid

    def set_status(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        self._write(
            self._pod_file(pod.namespace, pod.name), pod_object(pod, uid=uid, ready=ready, ips=ips)
        )

    def delete_pod(self, namespace: str, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / self._pod_file(namespace, name)).unlink()


class KubectlError(RuntimeError):
    """kubectl failed; the message carries the command and what kubectl said."""


@dataclass(frozen=True)
class Kubectl:
    """The built kubectl, run inside the network namespace the lab's API server listens in.

    Saved as `kube/kubectl.json` in the lab's run directory by `up`, so every
    later verb (a new process) reaches the same API server.
    """

    binary: str
    kubeconfig: str
    netns: str
    cache_dir: str

    FILE = "kube/kubectl.json"

    def save(self, run_dir: Path) -> None:
        path = run_dir / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, run_dir: Path) -> Kubectl:
        return cls(**json.loads((run_dir / cls.FILE).read_text()))

    def argv(self, *args: str) -> list[str]:
        return [
            "ip", "netns", "exec", self.netns, self.binary,
            "--kubeconfig", self.kubeconfig, "--cache-dir", self.cache_dir, *args,
        ]  # fmt: skip

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
        r = subprocess.run(
            self.argv(*args), input=stdin, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout


class KubeDatastore:
    """The cluster objects in a real kube-apiserver, written as a user and a kubelet would."""

    def __init__(self, kubectl: Kubectl) -> None:
        self.kubectl = kubectl

    def _apply(self, obj: Mapping[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=flock-lab",
                     "-f", "-", stdin=json.dumps(obj))  # fmt: skip

    def put_node_config(self, obj: Mapping[str, Any]) -> None:
        self._apply(obj)

    def put_namespace(self, name: str) -> None:
        self._apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def create_pod(self, pod: PodSpec) -> str:
        obj = pod_object(pod, uid=None, ready=False)
        del obj["status"]
        out = self.kubectl("create", "-f", "-", "-o", "jsonpath={.metadata.uid}",
                           stdin=json.dumps(obj))  # fmt: skip
        self.set_status(pod, uid=out.strip(), ready=False)
        return out.strip()

    def set_status(self, pod: PodSpec, *, uid: str, ready: bool, ips: Sequence[str] = ()) -> None:
        # The uid precondition makes a patch for an older incarnation of the pod fail.
        status = pod_status(ready=ready, ips=ips)
        status["containerStatuses"] = container_statuses(pod, ready=ready)
        patch = {"metadata": {"uid": uid}, "status": status}
        self.kubectl("patch", "pod", pod.name, "-n", pod.namespace, "--subresource=status",
                     "--type=merge", "-p", json.dumps(patch))  # fmt: skip

    def delete_pod(self, namespace: str, name: str) -> None:
        # No kubelet confirms a graceful deletion in the lab: remove the object at once.
        self.kubectl("delete", "pod", name, "-n", namespace, "--grace-period=0", "--force",
                     "--ignore-not-found", "--wait=false")  # fmt: skip
