"""Pods in a lab: scheduled, attached, made Ready, detached, as a cluster would.

The verbs act as the control plane and the kubelet would: the pod object is
written to the datastore first (scheduled, not Ready), then the real CNI plugin
is run for it exactly as a runtime runs it, then readiness is set as a probe
would. `delete_pod` runs DEL before the object goes away.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
from collections.abc import Sequence
from typing import Any

from flock.lab.core import Lab, LabError, node_netns, pod_netns
from flock.lab.state import PodRecord
from flock.lab.topology import (
    PodSpec,
    validate,
)
from flock.testbed import netns


def cni(lab: Lab, rec: PodRecord, command: str) -> dict[str, Any]:
    """Run the real plugin for `rec` exactly as a runtime would; its result object."""
    res = lab.node(rec.node).cni(
        command,
        container_id=rec.container_id,
        netns_path=netns.path(rec.netns),
        ifname=rec.ifname,
        pod_namespace=rec.namespace,
        pod_name=rec.name,
        pod_uid=rec.uid,
    )
    if not res.ok:
        detail = res.stdout.strip() or res.stderr.strip()
        with contextlib.suppress(ValueError):
            err = res.json
            detail = str(err.get("msg", detail)) + (
                f" ({err['details']})" if err.get("details") else ""
            )
        raise LabError(f"CNI {command} for pod {rec.namespace}/{rec.name} failed: {detail}")
    return res.json


def attach_pod(lab: Lab, pod: PodSpec) -> PodRecord:
    """Schedule (write the object, not Ready), attach (CNI ADD), then set readiness."""
    uid = lab.datastore.create_pod(pod)
    ns = pod_netns(lab.name, pod)
    lab.state.add_netns(ns, role=f"pod {pod.key}")
    netns.create(ns)
    rec = PodRecord(
        namespace=pod.namespace,
        name=pod.name,
        node=pod.node,
        netns=ns,
        container_id=uid.replace("-", ""),
        uid=uid,
    )
    lab.state.pods[pod.key] = rec
    lab.state.save()
    result = cni(lab, rec, "ADD")
    rec.addresses = [str(ipaddress.ip_interface(ip["address"]).ip) for ip in result.get("ips", [])]
    lab.state.save()
    lab.datastore.set_status(pod, uid=uid, ready=pod.ready, ips=rec.addresses)
    return rec


def ready(name: str, ref: str, value: bool) -> None:
    lab = Lab.open(name)
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    lab.topo = lab.topo.with_ready(pod.key, value)
    lab.save_topology()
    if rec is not None:
        lab.datastore.set_status(lab.topo.pod(pod.key), uid=rec.uid, ready=value, ips=rec.addresses)


def add_pod(name: str, pod: PodSpec) -> PodRecord:
    lab = Lab.open(name)
    if any(p.name == pod.name for p in lab.topo.pods):
        raise LabError(f"lab '{name}' already has a pod named {pod.name!r}")
    topo = lab.topo.with_pod(pod)
    validate(topo)
    lab.topo = topo
    lab.save_topology()
    try:
        return attach_pod(lab, pod)
    except BaseException:
        _detach_pod(lab, pod)
        raise


def _detach_pod(lab: Lab, pod: PodSpec) -> None:
    rec = lab.state.pods.get(pod.key)
    if rec is not None:
        with contextlib.suppress(Exception):
            cni(lab, rec, "DEL")
        netns.delete(rec.netns)
        del lab.state.pods[pod.key]
    lab.datastore.delete_pod(pod.namespace, pod.name)
    lab.topo = lab.topo.without_pod(pod.key)
    lab.save_topology()


def delete_pod(name: str, ref: str) -> None:
    lab = Lab.open(name)
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    if rec is not None:
        cni(lab, rec, "DEL")
    _detach_pod(lab, pod)


def exec_in_pod(name: str, ref: str, cmd: Sequence[str]) -> int:
    """Run `cmd` in the network namespace of a pod, a node or the router (by name)."""
    lab = Lab.open(name)
    if ref == lab.topo.router.name:
        return subprocess.call(["ip", "netns", "exec", lab.router_ns, *cmd])
    if any(n.name == ref for n in lab.topo.nodes):
        return subprocess.call(["ip", "netns", "exec", node_netns(lab.name, ref), *cmd])
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    if rec is None:
        raise LabError(f"pod {pod.key} has no network namespace (it was never attached)")
    return subprocess.call(["ip", "netns", "exec", rec.netns, *cmd])
