"""The lab's topology: one short YAML file describing router, nodes and pods.

A topology is validated as a whole before the lab creates anything (the
containerlab habit): a bad prefix, an unknown node or an anycast address the
node does not allow is reported with the field that holds it, and nothing is
left half-built. Everything here is pure: no kernel, no files except `load`.

The built-in default (`default_topology`) is what `flock lab up` runs with no
argument: one FRR router, three nodes, a three-replica anycast service with a
v6 + v4 anycast pair, and one pod with operator-supplied `addresses`. All
prefixes are ULA (fd00::/8) and benchmarking space (198.18.0.0/15): they only
ever exist inside the lab's own network namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from flock import ANNOTATION_PREFIX
from flock.compile.annotations import AnnotationError, parse_annotations
from flock.model import IPAddress, IPNetwork
from flock.model.nodeconfig import (
    API_VERSION,
    KIND,
    AllowedAddresses,
    NodeConfig,
    NodeConfigError,
)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_LAB_NAME = "lab"
# Lab names become part of namespace names (`fl-<lab>-<node>`); no dashes, so that
# one lab's prefix can never be the prefix of another lab's names.
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# Node names end up in namespace, file and interface names (the router's port to a
# node is `to-<node>`, and Linux caps interface names at 15 characters), and as
# Kubernetes node names.
_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")
# Kubernetes object names (RFC 1123 label; pods may be longer but keep them short).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_RESERVED_ASNS = frozenset({0, 23456, 65535, 4294967295})


class TopologyError(ValueError):
    """A topology that cannot be built; the message names every problem found."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid lab topology:\n" + "\n".join(f"  - {p}" for p in self.problems))


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


def _each_str(v: Any, parse: Callable[[str], Any]) -> Any:
    """Accept a single string or a list; `parse` each string item, keep the others as given."""
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list | tuple):
        return tuple(parse(item) if isinstance(item, str) else item for item in v)
    return v


def _interface(item: str) -> IPInterface:
    """`address/prefix`, strictly."""
    if "/" not in item:
        raise ValueError(f"{item!r} needs a prefix length (e.g. fd00::1/64)")
    return ipaddress.ip_interface(item.strip())


def _network(item: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(item.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"{item!r} is not a network with a prefix length ({e})") from e


def _interfaces(v: Any) -> Any:
    return _each_str(v, _interface)


def _networks(v: Any) -> Any:
    return _each_str(v, _network)


class Router(_Model):
    """The upstream router (FRR): one LAN interface, one address per family."""

    name: str = "router"
    asn: int = 65000
    addresses: tuple[IPInterface, ...]
    router_id: ipaddress.IPv4Address | None = None

    _parse = field_validator("addresses", mode="before")(_interfaces)

    def address(self, version: int) -> IPInterface | None:
        return next((a for a in self.addresses if a.version == version), None)


class Node(_Model):
    """One flock node: its BGP ASN, LAN (uplink) addresses and pod prefixes."""

    name: str
    asn: int
    uplink: tuple[IPInterface, ...]
    cidr6: tuple[ipaddress.IPv6Network, ...] = ()
    cidr4: tuple[ipaddress.IPv4Network, ...] = ()
    allowed_addresses: tuple[AllowedAddresses, ...] = ()

    _parse_uplink = field_validator("uplink", mode="before")(_interfaces)
    _parse_cidrs = field_validator("cidr6", "cidr4", mode="before")(_networks)

    def uplink_address(self, version: int) -> IPInterface | None:
        return next((a for a in self.uplink if a.version == version), None)

    @property
    def cidrs(self) -> tuple[IPNetwork, ...]:
        return (*self.cidr6, *self.cidr4)


class PodSpec(_Model):
    """One pod as the lab creates it: its object in the datastore, then a CNI ADD."""

    name: str
    namespace: str = "default"
    node: str
    annotations: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    ready: bool = True

    @field_validator("annotations", mode="before")
    @classmethod
    def _short_keys(cls, v: Any) -> Any:
        """`anycast: ...` is shorthand for `flock.fritzlab.net/anycast: ...`."""
        if isinstance(v, Mapping):
            return {
                (k if "/" in str(k) else ANNOTATION_PREFIX + str(k)): str(x) for k, x in v.items()
            }
        return v

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def annotation_ips(self, key: str) -> list[str]:
        """The raw comma-separated tokens of annotation `key` (e.g. "anycast")."""
        raw = self.annotations.get(ANNOTATION_PREFIX + key, "")
        return [t.strip() for t in raw.split(",") if t.strip()]


class Topology(_Model):
    name: str = DEFAULT_LAB_NAME
    router: Router
    nodes: tuple[Node, ...]
    pods: tuple[PodSpec, ...] = ()

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, ref: str) -> PodSpec:
        """Find a pod by `name` or `namespace/name`."""
        matches = [p for p in self.pods if ref in (p.key, p.name)]
        if len(matches) != 1:
            raise KeyError(ref)
        return matches[0]

    def nodeconfig(self, node: str) -> dict[str, Any]:
        """The NodeConfig object (Kubernetes shape) the lab writes for `node`."""
        n = self.node(node)
        peers = [
            {"address": str(a.ip), "asn": self.router.asn}
            for a in self.router.addresses
            if n.uplink_address(a.version) is not None
        ]
        spec: dict[str, Any] = {
            "cidr6": [str(c) for c in n.cidr6],
            "cidr4": [str(c) for c in n.cidr4],
            "defaults": {"ipv6": bool(n.cidr6), "ipv4": bool(n.cidr4)},
            "bgp": {"asn": n.asn, "peers": peers},
        }
        if n.allowed_addresses:
            spec["allowedAddresses"] = [
                a.model_dump(mode="json", by_alias=True) for a in n.allowed_addresses
            ]
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": n.name},
            "spec": spec,
        }

    def with_pod(self, pod: PodSpec) -> Topology:
        return self.model_copy(update={"pods": (*self.pods, pod)})

    def without_pod(self, key: str) -> Topology:
        return self.model_copy(update={"pods": tuple(p for p in self.pods if p.key != key)})

    def with_ready(self, key: str, ready: bool) -> Topology:
        pods = tuple(
            p.model_copy(update={"ready": ready}) if p.key == key else p for p in self.pods
        )
        return self.model_copy(update={"pods": pods})

    def to_yaml(self) -> str:
        return yaml.safe_dump(
            self.model_dump(mode="json", by_alias=True, exclude_defaults=False), sort_keys=False
        )


# ---------------------------------------------------------------------------------------
# Whole-topology validation


def validate(topo: Topology) -> None:
    """Raise `TopologyError` listing every problem; return quietly if buildable."""
    problems: list[str] = []
    problems += _check_names(topo)
    problems += _check_router(topo)
    problems += _check_nodes(topo)
    problems += _check_prefixes(topo)
    problems += _check_pods(topo)
    if problems:
        raise TopologyError(problems)


def _check_asn(where: str, asn: int) -> list[str]:
    if not 1 <= asn <= 4294967295:
        return [f"{where}: ASN {asn} is outside 1..4294967295"]
    if asn in _RESERVED_ASNS:
        return [f"{where}: ASN {asn} is reserved"]
    return []


def _check_names(topo: Topology) -> list[str]:
    out = []
    if not _LAB_NAME.match(topo.name):
        out.append(
            f"name: {topo.name!r} must be 1-12 lowercase letters/digits starting with a letter "
            "(it prefixes every namespace the lab creates)"
        )
    if not _NODE_NAME.match(topo.router.name):
        out.append(f"router.name: {topo.router.name!r} must be 1-12 lowercase letters/digits")
    seen: set[str] = {topo.router.name}
    for i, n in enumerate(topo.nodes):
        if not _NODE_NAME.match(n.name):
            out.append(f"nodes[{i}].name: {n.name!r} must be 1-12 lowercase letters/digits")
        if n.name in seen:
            out.append(f"nodes[{i}].name: {n.name!r} is used twice (router and nodes share names)")
        seen.add(n.name)
    if not topo.nodes:
        out.append("nodes: a lab needs at least one node")
    return out


def _check_router(topo: Topology) -> list[str]:
    r = topo.router
    out = _check_asn("router.asn", r.asn)
    if not r.addresses:
        out.append("router.addresses: the router needs an IPv6 and/or an IPv4 address")
    for v in (6, 4):
        fam = [a for a in r.addresses if a.version == v]
        if len(fam) > 1:
            out.append(f"router.addresses: one IPv{v} address only, got {', '.join(map(str, fam))}")
        for a in fam:
            if a.ip == a.network.network_address or a.network.num_addresses < 4:
                out.append(f"router.addresses: {a} needs a LAN subnet with room for the nodes")
    return out


def _check_nodes(topo: Topology) -> list[str]:
    out: list[str] = []
    r = topo.router
    asns: dict[int, str] = {r.asn: "router"}
    lan_ips: dict[IPAddress, str] = {a.ip: "router" for a in r.addresses}
    for i, n in enumerate(topo.nodes):
        where = f"nodes[{i}] ({n.name})"
        out += _check_asn(f"{where}.asn", n.asn)
        if n.asn in asns:
            out.append(
                f"{where}.asn: ASN {n.asn} is already used by {asns[n.asn]} "
                "(eBGP: one ASN per node)"
            )
        asns.setdefault(n.asn, n.name)
        if not n.uplink:
            out.append(f"{where}.uplink: a node needs a LAN address to reach the router")
        for v in (6, 4):
            fam = [a for a in n.uplink if a.version == v]
            if len(fam) > 1:
                out.append(f"{where}.uplink: one IPv{v} address only")
            rv = r.address(v)
            for a in fam:
                if rv is None:
                    out.append(
                        f"{where}.uplink: {a} is IPv{v} but the router has no IPv{v} address"
                    )
                elif a.network != rv.network:
                    out.append(f"{where}.uplink: {a} is not on the router's LAN {rv.network}")
                if a.ip in lan_ips:
                    out.append(f"{where}.uplink: {a.ip} is already used by {lan_ips[a.ip]}")
                lan_ips.setdefault(a.ip, n.name)
        if not n.cidr6 and not n.cidr4:
            out.append(f"{where}: needs cidr6 and/or cidr4 (pod prefixes)")
        for fam_cidrs, v in ((n.cidr6, 6), (n.cidr4, 4)):
            if fam_cidrs and n.uplink_address(v) is None:
                out.append(
                    f"{where}.cidr{v}: IPv{v} pod prefixes need an IPv{v} uplink address "
                    "to advertise them"
                )
        try:
            NodeConfig.from_object(topo.nodeconfig(n.name))
        except NodeConfigError as e:
            out.append(f"{where}: {e}")
    return out


def _check_prefixes(topo: Topology) -> list[str]:
    """Pod prefixes, LAN subnets and claimable ranges must not overlap (except claims)."""
    out: list[str] = []
    owned: list[tuple[IPNetwork, str]] = [
        (a.network, "the router LAN") for a in topo.router.addresses
    ]
    for i, n in enumerate(topo.nodes):
        for field, cidrs in (("cidr6", n.cidr6), ("cidr4", n.cidr4)):
            for c in cidrs:
                for other, who in owned:
                    if c.version == other.version and c.overlaps(other):
                        where = f"nodes[{i}] ({n.name}).{field}"
                        out.append(f"{where}: pod prefix {c} overlaps {other} of {who}")
                owned.append((c, f"node {n.name}"))
    for i, n in enumerate(topo.nodes):
        for j, entry in enumerate(n.allowed_addresses):
            for other, who in owned:
                if entry.cidr.version == other.version and entry.cidr.overlaps(other):
                    out.append(
                        f"nodes[{i}] ({n.name}).allowedAddresses[{j}]: {entry.cidr} overlaps "
                        f"{other} of {who}; claimable addresses must lie outside pod prefixes "
                        "and the LAN"
                    )
    return out


def _check_pods(topo: Topology) -> list[str]:
    out: list[str] = []
    nodes = {n.name: n for n in topo.nodes}
    keys: set[str] = set()
    names: dict[str, str] = {}
    claimed: dict[IPAddress, str] = {}
    for i, p in enumerate(topo.pods):
        where = f"pods[{i}] ({p.key})"
        if not _DNS_LABEL.match(p.name) or len(p.name) > 40:
            out.append(f"{where}.name: {p.name!r} must be a DNS label of at most 40 characters")
        if not _DNS_LABEL.match(p.namespace):
            out.append(f"{where}.namespace: {p.namespace!r} must be a DNS label")
        if p.key in keys:
            out.append(f"{where}: pod {p.key} is defined twice")
        keys.add(p.key)
        if p.name in names and names[p.name] != p.namespace:
            out.append(
                f"{where}: pod name {p.name!r} is used in two namespaces "
                "(the lab addresses pods by name)"
            )
        names.setdefault(p.name, p.namespace)
        node = nodes.get(p.node)
        if node is None:
            known = ", ".join(sorted(nodes)) or "none"
            out.append(f"{where}.node: unknown node {p.node!r} (nodes: {known})")
            continue
        out += _check_annotations(topo, where, p, claimed)
    return out


def _check_annotations(
    topo: Topology, where: str, p: PodSpec, claimed: dict[IPAddress, str]
) -> list[str]:
    """The pod's annotations, parsed exactly as the agent will parse them at ADD.

    This catches malformed values, families the node does not serve and
    `anycast`/`addresses` IPs outside the node's allow-list before anything
    is built; `addresses` IPs must also be unique across the lab.
    """
    try:
        nc = NodeConfig.from_object(topo.nodeconfig(p.node))
    except NodeConfigError:
        return []  # already reported against the node
    try:
        req = parse_annotations(p.annotations, node=nc, namespace=p.namespace)
    except AnnotationError as e:
        return [f"{where}.annotations: {e}"]
    out = []
    supplied = [a for a in (req.v6.primary, req.v4.primary) if a is not None]
    for ip in (*supplied, *req.extra_addresses):
        if ip in claimed:
            out.append(f"{where}.annotations.addresses: {ip} is already used by {claimed[ip]}")
        claimed[ip] = p.key
    return out


# ---------------------------------------------------------------------------------------
# Loading


def parse(data: Any, *, source: str = "topology") -> Topology:
    """Parse and validate a topology given as a mapping (what YAML gives)."""
    if not isinstance(data, Mapping):
        raise TopologyError([f"{source}: expected a mapping at the top level"])
    # `x-...` keys hold YAML anchors for reuse (the docker-compose convention).
    data = {k: v for k, v in data.items() if not str(k).startswith("x-")}
    try:
        topo = Topology.model_validate(data)
    except ValidationError as e:
        raise TopologyError(_describe(e)) from None
    validate(topo)
    return topo


def load(path: str | Path) -> Topology:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError([f"{p}: cannot read ({e.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError([f"{p}: not valid YAML ({e})"]) from None
    return parse(data, source=str(p))


def _describe(err: ValidationError) -> list[str]:
    out = []
    for item in err.errors():
        loc = ""
        for part in item["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = item["msg"].removeprefix("Value error, ")
        out.append(f"{loc or 'topology'}: {msg} (got {item.get('input')!r})")
    return out


# ---------------------------------------------------------------------------------------
# The built-in default


def _dns_pod(i: int) -> dict[str, Any]:
    return {
        "name": f"dns-{i}",
        "node": f"node{i}",
        "labels": {"app": "dns"},
        "annotations": {"anycast": "fd00:f10c:a::53, 198.18.100.53"},
    }


def default_topology_data() -> dict[str, Any]:
    """The default lab as plain data (also shipped as examples/lab-default.yaml)."""
    allowed = [
        {"cidr": "fd00:f10c:a::/64", "use": ["anycast"]},
        {"cidr": "198.18.100.0/24", "use": ["anycast"]},
        {"cidr": "fd00:f10c:b::/64", "use": ["addresses"]},
        {"cidr": "198.18.101.0/24", "use": ["addresses"]},
    ]
    nodes = [
        {
            "name": f"node{i}",
            "asn": 65100 + i,
            "uplink": [f"fd00:f10c::1{i}/64", f"198.18.0.1{i}/24"],
            "cidr6": [f"fd00:f10c:{i}::/64"],
            "cidr4": [f"198.18.{i}.0/24"],
            "allowedAddresses": allowed,
        }
        for i in (1, 2, 3)
    ]
    pods: list[dict[str, Any]] = []
    for i in (1, 2, 3):
        pods.append(_dns_pod(i))
        pods.append({"name": f"web-{i}", "node": f"node{i}", "labels": {"app": "web"}})
    pods.append(
        {
            "name": "public",
            "node": "node1",
            "labels": {"app": "public"},
            "annotations": {"addresses": "fd00:f10c:b::80, 198.18.101.80"},
        }
    )
    pods.append(
        {
            "name": "named",
            "node": "node2",
            "labels": {"app": "named"},
            "annotations": {"ip-algo": "namespace,pod", "ipv4": "false"},
        }
    )
    return {
        "name": DEFAULT_LAB_NAME,
        "router": {
            "name": "router",
            "asn": 65000,
            "addresses": ["fd00:f10c::1/64", "198.18.0.1/24"],
        },
        "nodes": nodes,
        "pods": pods,
    }


def default_topology() -> Topology:
    return parse(default_topology_data(), source="built-in default")
