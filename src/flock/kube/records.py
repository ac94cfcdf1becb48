"""Decoding API objects straight into what flock keeps of them.

A v1 Pod as the API server sends it is ~4 KB of JSON and ~18 KB as Python
dicts (managedFields, volumes, container statuses...). The policy compiler
needs a pod's namespace, name, labels, addresses and named ports; the local
agent also needs its annotations, uid, Ready condition and deletionTimestamp.
msgspec decodes into `Struct`s that declare only those fields and skips the
rest while parsing, so a 10,000-pod list never exists as dicts; the records
are then converted to the frozen model objects (`flock.model.pod.Pod`), keeping
annotations and images only for this node's pods.

Label and annotation keys and values repeat across a cluster (app=..., the
pod-template-hash of a ReplicaSet); they are interned so each distinct string
is stored once.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from flock.model.pod import ContainerPort, Namespace, Pod

V = TypeVar("V")
R = TypeVar("R")

_PROTOCOLS = frozenset({"TCP", "UDP", "SCTP"})


class Meta(msgspec.Struct, rename="camel"):
    name: str = ""
    namespace: str = ""
    uid: str = ""
    resource_version: str = ""
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    deletion_timestamp: str | None = None


class ListMeta(msgspec.Struct, rename="camel"):
    resource_version: str = ""
    # `continue` is a Python keyword.
    continue_: str = msgspec.field(default="", name="continue")


class _Port(msgspec.Struct, rename="camel"):
    container_port: int | None = None
    protocol: str = "TCP"
    name: str | None = None


class _Container(msgspec.Struct):
    image: str | None = None
    ports: list[_Port] | None = None


class _PodSpec(msgspec.Struct, rename="camel"):
    node_name: str = ""
    host_network: bool = False
    containers: list[_Container] | None = None


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""


class _PodIP(msgspec.Struct):
    ip: str = ""


class _PodStatus(msgspec.Struct):
    conditions: list[_Condition] | None = None
    pod_ips: list[_PodIP] | None = msgspec.field(default=None, name="podIPs")


class PodRecord(msgspec.Struct):
    metadata: Meta = msgspec.field(default_factory=Meta)
    spec: _PodSpec = msgspec.field(default_factory=_PodSpec)
    status: _PodStatus = msgspec.field(default_factory=_PodStatus)


class NamespaceRecord(msgspec.Struct):
    metadata: Meta = msgspec.field(default_factory=Meta)


class ObjectRecord(msgspec.Struct, rename="camel"):
    """Any other object, kept whole (NodeConfig, NetworkPolicy, Secret: few and small)."""

    metadata: Meta = msgspec.field(default_factory=Meta)
    api_version: str = ""
    kind: str = ""
    spec: Any = None
    data: dict[str, str] | None = None
    string_data: dict[str, str] | None = None


class StatusRecord(msgspec.Struct):
    """A metav1.Status: the body of an API error and of a watch ERROR event."""

    code: int = 0
    reason: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class Item(Generic[V]):
    """One object as an informer keeps it: identity, version, converted value."""

    namespace: str
    name: str
    uid: str
    resource_version: str
    value: V

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


def _intern_map(m: Mapping[str, str] | None) -> dict[str, str]:
    if not m:
        return {}
    return {sys.intern(k): sys.intern(v) if len(v) < 64 else v for k, v in m.items()}


def pod_from_record(rec: PodRecord, *, full: bool) -> Pod:
    """The model Pod; `full` keeps annotations and images (this node's pods only)."""
    meta, spec, status = rec.metadata, rec.spec, rec.status
    ports: list[ContainerPort] = []
    images: list[str] = []
    for c in spec.containers or ():
        if full and c.image:
            images.append(c.image)
        for p in c.ports or ():
            if p.container_port is None:
                continue
            proto = p.protocol if p.protocol in _PROTOCOLS else "TCP"
            ports.append(
                ContainerPort(
                    port=p.container_port,
                    protocol=proto,  # type: ignore[arg-type]
                    name=sys.intern(p.name) if p.name else None,
                )
            )
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or ())
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for entry in status.pod_ips or ():
        try:
            ips.append(ipaddress.ip_address(entry.ip))
        except ValueError:
            continue
    return Pod(
        namespace=sys.intern(meta.namespace or "default"),
        name=meta.name,
        uid=meta.uid,
        node_name=sys.intern(spec.node_name),
        annotations=dict(meta.annotations or {}) if full else {},
        labels=_intern_map(meta.labels),
        images=tuple(images),
        container_ports=tuple(ports),
        ready=ready,
        terminating=meta.deletion_timestamp is not None,
        host_network=spec.host_network,
        ips=tuple(ips),
    )


def namespace_from_record(rec: NamespaceRecord) -> Namespace:
    labels = _intern_map(rec.metadata.labels)
    labels.setdefault("kubernetes.io/metadata.name", rec.metadata.name)
    return Namespace(name=rec.metadata.name, labels=labels)


def object_dict(rec: ObjectRecord) -> dict[str, Any]:
    """The object in the dict shape `NodeConfig.from_object` and the policy parser read."""
    meta: dict[str, Any] = {"name": rec.metadata.name}
    if rec.metadata.namespace:
        meta["namespace"] = rec.metadata.namespace
    if rec.metadata.uid:
        meta["uid"] = rec.metadata.uid
    if rec.metadata.labels:
        meta["labels"] = dict(rec.metadata.labels)
    out: dict[str, Any] = {"apiVersion": rec.api_version, "kind": rec.kind, "metadata": meta}
    if rec.spec is not None:
        out["spec"] = rec.spec
    if rec.data is not None:
        out["data"] = dict(rec.data)
    if rec.string_data is not None:
        out["stringData"] = dict(rec.string_data)
    return out


class Codec(Generic[R, V]):
    """Decodes list pages and watch lines of one resource into `Item`s.

    `convert` turns the decoded record into the value the informer keeps.
    """

    def __init__(self, record: type[R], convert: Any) -> None:
        self._record = record
        self._convert = convert
        self._list = msgspec.json.Decoder(_list_type(record))
        self._one = msgspec.json.Decoder(record)
        self._event = msgspec.json.Decoder(_RawEvent)
        self._status = msgspec.json.Decoder(StatusRecord)
        self._meta_only = msgspec.json.Decoder(NamespaceRecord)

    def item(self, rec: R) -> Item[V]:
        meta: Meta = rec.metadata  # type: ignore[attr-defined]
        return Item(
            namespace=sys.intern(meta.namespace),
            name=meta.name,
            uid=meta.uid,
            resource_version=meta.resource_version,
            value=self._convert(rec),
        )

    def decode_list(
        self, body: bytes, cached: Mapping[tuple[str, str], Item[V]] | None = None
    ) -> tuple[list[Item[V]], str, str]:
        """(items, list resourceVersion, continue token).

        An object `cached` already holds at the same resourceVersion is that cached
        item, not converted again: a relist of 10,000 unchanged pods costs only
        the parse, and keeps every object's identity.
        """
        page = self._list.decode(body)
        out: list[Item[V]] = []
        for r in page.items:
            meta: Meta = r.metadata
            prev = cached.get((meta.namespace, meta.name)) if cached else None
            if (
                prev is not None
                and prev.resource_version == meta.resource_version
                and prev.uid == meta.uid
            ):
                out.append(prev)
            else:
                out.append(self.item(r))
        return out, page.metadata.resource_version, page.metadata.continue_

    def decode_object(self, body: bytes) -> Item[V]:
        return self.item(self._one.decode(body))

    def decode_event(self, line: bytes) -> WatchEvent[V]:
        raw = self._event.decode(line)
        if raw.type == "ERROR":
            st = self._status.decode(raw.object)
            return WatchEvent(raw.type, None, "", st)
        if raw.type == "BOOKMARK":
            meta = self._meta_only.decode(raw.object).metadata
            return WatchEvent(raw.type, None, meta.resource_version, None)
        item = self.item(self._one.decode(raw.object))
        return WatchEvent(raw.type, item, item.resource_version, None)


class _RawEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


@dataclass(frozen=True, slots=True)
class WatchEvent(Generic[V]):
    """One line of a watch stream: ADDED/MODIFIED/DELETED (item), BOOKMARK, ERROR (status)."""

    type: str
    item: Item[V] | None
    resource_version: str
    status: StatusRecord | None


_LIST_TYPES: dict[type[Any], type[Any]] = {}


def _list_type(record: type[Any]) -> type[Any]:
    t = _LIST_TYPES.get(record)
    if t is None:
        t = msgspec.defstruct(
            f"{record.__name__}List",
            [
                ("metadata", ListMeta, msgspec.field(default_factory=ListMeta)),
                ("items", list[record], msgspec.field(default_factory=list)),  # type: ignore[valid-type]
            ],
        )
        _LIST_TYPES[record] = t
    return t


def pod_codec(node_name: str) -> Codec[PodRecord, Pod]:
    """Pods: full records for this node's, trimmed for everyone else's."""
    return Codec(PodRecord, lambda r: pod_from_record(r, full=r.spec.node_name == node_name))


def namespace_codec() -> Codec[NamespaceRecord, Namespace]:
    return Codec(NamespaceRecord, namespace_from_record)


def object_codec() -> Codec[ObjectRecord, dict[str, Any]]:
    return Codec(ObjectRecord, object_dict)
