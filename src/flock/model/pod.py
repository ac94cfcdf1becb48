"""Pods and Namespaces as the agent needs them, whichever datastore delivered them.

The standalone manifests datastore and the Kubernetes datastore both produce
these same frozen objects, so everything downstream is written once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Protocol_ = Literal["TCP", "UDP", "SCTP"]


@dataclass(frozen=True, slots=True)
class ContainerPort:
    port: int
    protocol: Protocol_ = "TCP"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    uid: str = ""
    node_name: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    images: tuple[str, ...] = ()
    container_ports: tuple[ContainerPort, ...] = ()
    ready: bool = False
    terminating: bool = False
    host_network: bool = False
    # Addresses the datastore reports (status.podIPs); the agent's own view is the
    # allocation store, this is for peers on other nodes (NetworkPolicy).
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Pod:
        """Parse a v1 Pod object (dict shape, as YAML or the API server gives it)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ports: list[ContainerPort] = []
        images: list[str] = []
        for c in spec.get("containers") or []:
            if c.get("image"):
                images.append(str(c["image"]))
            for p in c.get("ports") or []:
                if "containerPort" not in p:
                    continue
                ports.append(
                    ContainerPort(
                        port=int(p["containerPort"]),
                        protocol=p.get("protocol", "TCP"),
                        name=p.get("name"),
                    )
                )
        ready = any(
            c.get("type") == "Ready" and str(c.get("status")) == "True"
            for c in status.get("conditions") or []
        )
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for entry in status.get("podIPs") or []:
            try:
                ips.append(ipaddress.ip_address(entry.get("ip", "")))
            except ValueError:
                continue
        return cls(
            namespace=str(meta.get("namespace") or "default"),
            name=str(meta["name"]),
            uid=str(meta.get("uid") or ""),
            node_name=str(spec.get("nodeName") or ""),
            annotations=dict(meta.get("annotations") or {}),
            labels=dict(meta.get("labels") or {}),
            images=tuple(images),
            container_ports=tuple(ports),
            ready=ready,
            terminating=meta.get("deletionTimestamp") is not None,
            host_network=bool(spec.get("hostNetwork")),
            ips=tuple(ips),
        )


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Namespace:
        meta = obj.get("metadata") or {}
        name = str(meta["name"])
        labels = dict(meta.get("labels") or {})
        # Kubernetes sets this label on every namespace; policies select on it.
        labels.setdefault("kubernetes.io/metadata.name", name)
        return cls(name=name, labels=labels)
