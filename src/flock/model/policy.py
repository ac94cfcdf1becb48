"""Kubernetes NetworkPolicy (networking.k8s.io/v1) as typed, validated values.

The policy compiler must never see an unparsed field from the cluster: every
selector, CIDR, port and protocol is checked here once, and a bad policy is
rejected as a whole with an error naming the field path (`spec.ingress[0].from[1]
.ipBlock.except[0]: ...`), so that it is reported and never half-applied.

A policy the API server accepted but that does not parse here (a field or value
this version does not know) must not leave its pods open: `parse_policy` turns it
into a `RejectedPolicy`, which keeps just enough of it (its namespace, as much of
its podSelector and policyTypes as can be read) for the compiler to isolate the
pods it may select, in the directions it may cover, until it parses (fail closed).

The semantics of each construct (what an empty selector, an empty `from` or an
omitted `policyTypes` means) are Kubernetes' and are spelled out next to the
code that carries them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flock.model import IPNetwork
from flock.model.pod import Namespace, Pod

Proto = Literal["TCP", "UDP", "SCTP"]
PolicyType = Literal["Ingress", "Egress"]
Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]

PROTOCOLS: tuple[Proto, ...] = ("TCP", "UDP", "SCTP")
_OPERATORS: tuple[Operator, ...] = ("In", "NotIn", "Exists", "DoesNotExist")
# IANA_SVC_NAME, as Kubernetes validates container port names: 1-15 chars of
# [a-z0-9-], at least one letter, no leading/trailing/double hyphen.
_PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*$")


def valid_port_name(name: str) -> bool:
    """True if `name` is a valid IANA service name (a container port name)."""
    return 0 < len(name) <= 15 and not name.endswith("-") and bool(_PORT_NAME.match(name))


class PolicyError(ValueError):
    """A NetworkPolicy that cannot be used; the message names the field path."""


@dataclass(frozen=True, slots=True)
class Requirement:
    """One matchExpressions entry."""

    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        # NotIn: also true when the key is absent (Kubernetes' labels.Selector).
        return self.key not in labels or labels[self.key] not in self.values


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """matchLabels AND matchExpressions; the empty selector selects everything."""

    match_labels: frozenset[tuple[str, str]] = frozenset()
    match_expressions: frozenset[Requirement] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        return all(r.matches(labels) for r in self.match_expressions)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    except_: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Peer:
    """One entry of `from`/`to`: either an ipBlock or pod/namespace selectors.

    podSelector alone: pods in the policy's namespace. namespaceSelector alone: every
    pod in the selected namespaces. Both: the selected pods in the selected namespaces.
    """

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def selects_pod(self, pod: Pod, ns_labels: Mapping[str, str], policy_ns: str) -> bool:
        if self.ip_block is not None:
            return False
        if self.namespace_selector is None:
            if pod.namespace != policy_ns:
                return False
        elif not self.namespace_selector.matches(ns_labels):
            return False
        return self.pod_selector is None or self.pod_selector.matches(pod.labels)


@dataclass(frozen=True, slots=True)
class PolicyPort:
    """A port entry: protocol, and a number, a name, or nothing (= every port)."""

    protocol: Proto = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One ingress or egress rule. `peers is None` (from/to absent or empty) means
    every peer; empty `ports` means every port and protocol."""

    ports: tuple[PolicyPort, ...] = ()
    peers: tuple[Peer, ...] | None = None


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()
    policy_types: frozenset[PolicyType] = frozenset({"Ingress"})

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def selects(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and self.pod_selector.matches(pod.labels)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NetworkPolicy:
        """Parse a NetworkPolicy object (dict shape); raises PolicyError naming the field."""
        return _parse_policy(obj)


@dataclass(frozen=True, slots=True)
class RejectedPolicy:
    """A NetworkPolicy that could not be parsed, kept only to fail closed.

    It selects what its podSelector selects when that part parses, else every pod
    of its namespace; it isolates in the directions of its policyTypes when those
    parse (Kubernetes' defaults when absent), else in both. It allows nothing: the
    pods it selects get only what the valid policies selecting them allow.
    """

    namespace: str
    name: str
    reason: str
    pod_selector: LabelSelector | None = None  # None: could not be read (whole namespace)
    policy_types: frozenset[PolicyType] = frozenset({"Ingress", "Egress"})
    uid: str = ""  # metadata.uid when readable: what an Event's `regarding` names

    # What the compiler reads from a policy: no rules.
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def selects(self, pod: Pod) -> bool:
        if pod.namespace != self.namespace:
            return False
        return self.pod_selector is None or self.pod_selector.matches(pod.labels)

    @property
    def message(self) -> str:
        """What an Event on the policy (reason `FlockPolicyRejected`) should say."""
        who = "all pods of its namespace" if self.pod_selector is None else "the pods it selects"
        dirs = " and ".join(sorted(self.policy_types, reverse=True))
        return (
            f"flock cannot enforce this NetworkPolicy: {self.reason}; until it is fixed, "
            f"{who} are isolated for {dirs} (only what other policies allow passes)"
        )

    @classmethod
    def from_object(
        cls, obj: Any, reason: str, key: tuple[str, str] | None = None
    ) -> RejectedPolicy:
        """Read what can be read of a policy that did not parse. `key` (namespace,
        name) is used when the object's metadata cannot be read."""
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        ns, name = key if key is not None else ("default", "?")
        if isinstance(meta.get("namespace"), str) and meta["namespace"]:
            ns = meta["namespace"]
        if isinstance(meta.get("name"), str) and meta["name"]:
            name = meta["name"]
        spec = obj.get("spec") if isinstance(obj, Mapping) else None
        spec = spec if isinstance(spec, Mapping) else {}
        selector: LabelSelector | None
        try:
            selector = parse_selector(spec.get("podSelector"), "spec.podSelector")
        except PolicyError:
            selector = None
        types: frozenset[PolicyType] = frozenset({"Ingress", "Egress"})
        raw = spec.get("policyTypes")
        if raw is None or raw == []:
            egress = spec.get("egress")
            types = frozenset({"Ingress", "Egress"} if egress else {"Ingress"})
            if egress is not None and not isinstance(egress, list):
                types = frozenset({"Ingress", "Egress"})  # unreadable: both
        elif isinstance(raw, list) and raw and all(t in ("Ingress", "Egress") for t in raw):
            types = frozenset(raw)
        raw_uid = meta.get("uid")
        uid = raw_uid if isinstance(raw_uid, str) else ""
        return cls(
            namespace=ns,
            name=name,
            reason=reason,
            pod_selector=selector,
            policy_types=types,
            uid=uid,
        )


AnyPolicy = NetworkPolicy | RejectedPolicy


def parse_policy(obj: Mapping[str, Any], key: tuple[str, str] | None = None) -> AnyPolicy:
    """A NetworkPolicy, or, if it does not parse, the `RejectedPolicy` that stands in
    for it (fail closed); never raises for a policy object."""
    try:
        return NetworkPolicy.from_object(obj)
    except PolicyError as exc:
        return RejectedPolicy.from_object(obj, str(exc), key)


def parse_policies(
    objs: Sequence[Mapping[str, Any]],
) -> tuple[list[NetworkPolicy], dict[tuple[str, str], str]]:
    """Parse many policy objects; the bad ones are returned as errors, keyed by
    (namespace, name), never half-used."""
    good: list[NetworkPolicy] = []
    bad: dict[tuple[str, str], str] = {}
    for obj in objs:
        try:
            good.append(NetworkPolicy.from_object(obj))
        except PolicyError as exc:
            meta = obj.get("metadata") if isinstance(obj, Mapping) else None
            meta = meta if isinstance(meta, Mapping) else {}
            key = (str(meta.get("namespace") or "default"), str(meta.get("name") or "?"))
            bad[key] = str(exc)
    return good, bad


def namespace_labels(namespaces: Mapping[str, Namespace], name: str) -> Mapping[str, str]:
    """Labels of namespace `name`; an unknown namespace still has its name label."""
    ns = namespaces.get(name)
    if ns is not None:
        return ns.labels
    return {"kubernetes.io/metadata.name": name}


# ---------------------------------------------------------------------------
# Parsing


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{path}: expected an object, got {type(value).__name__}")
    return value


def _list(value: Any, path: str) -> Sequence[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise PolicyError(f"{path}: expected a list, got {type(value).__name__}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{path}: expected a string, got {value!r}")
    return value


def _check_keys(obj: Mapping[str, Any], allowed: set[str], path: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise PolicyError(f"{path}: unknown field(s) {', '.join(unknown)}")


def parse_selector(value: Any, path: str) -> LabelSelector:
    obj = _mapping(value, path)
    _check_keys(obj, {"matchLabels", "matchExpressions"}, path)
    labels: set[tuple[str, str]] = set()
    for k, v in _mapping(obj.get("matchLabels"), f"{path}.matchLabels").items():
        labels.add((_str(k, f"{path}.matchLabels"), _str(v, f"{path}.matchLabels.{k}")))
    reqs: set[Requirement] = set()
    for i, e in enumerate(_list(obj.get("matchExpressions"), f"{path}.matchExpressions")):
        p = f"{path}.matchExpressions[{i}]"
        e = _mapping(e, p)
        _check_keys(e, {"key", "operator", "values"}, p)
        key = _str(e.get("key"), f"{p}.key")
        op = e.get("operator")
        if op not in _OPERATORS:
            raise PolicyError(f"{p}.operator: {op!r} is not one of {', '.join(_OPERATORS)}")
        values = frozenset(
            _str(v, f"{p}.values[{j}]") for j, v in enumerate(_list(e.get("values"), f"{p}.values"))
        )
        if op in ("In", "NotIn") and not values:
            raise PolicyError(f"{p}.values: must be non-empty for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyError(f"{p}.values: must be empty for operator {op}")
        reqs.add(Requirement(key=key, operator=op, values=values))
    return LabelSelector(match_labels=frozenset(labels), match_expressions=frozenset(reqs))


def _parse_net(value: Any, path: str) -> IPNetwork:
    text = _str(value, path)
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as exc:
        raise PolicyError(f"{path}: {text!r} is not a CIDR ({exc})") from None


def _parse_ipblock(value: Any, path: str) -> IPBlock:
    obj = _mapping(value, path)
    _check_keys(obj, {"cidr", "except"}, path)
    if "cidr" not in obj:
        raise PolicyError(f"{path}.cidr: required")
    cidr = _parse_net(obj["cidr"], f"{path}.cidr")
    excepts: list[IPNetwork] = []
    for i, e in enumerate(_list(obj.get("except"), f"{path}.except")):
        net = _parse_net(e, f"{path}.except[{i}]")
        # Kubernetes accepts an except equal to the cidr (the block then matches nothing).
        if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
            raise PolicyError(f"{path}.except[{i}]: {net} is not inside cidr {cidr}")
        excepts.append(net)
    return IPBlock(cidr=cidr, except_=tuple(excepts))


def _parse_peer(value: Any, path: str) -> Peer:
    obj = _mapping(value, path)
    _check_keys(obj, {"podSelector", "namespaceSelector", "ipBlock"}, path)
    if "ipBlock" in obj and obj["ipBlock"] is not None:
        if obj.get("podSelector") is not None or obj.get("namespaceSelector") is not None:
            raise PolicyError(
                f"{path}: ipBlock cannot be combined with podSelector/namespaceSelector"
            )
        return Peer(ip_block=_parse_ipblock(obj["ipBlock"], f"{path}.ipBlock"))
    pod_sel = obj.get("podSelector")
    ns_sel = obj.get("namespaceSelector")
    if pod_sel is None and ns_sel is None:
        raise PolicyError(f"{path}: must set one of podSelector, namespaceSelector, ipBlock")
    return Peer(
        pod_selector=None if pod_sel is None else parse_selector(pod_sel, f"{path}.podSelector"),
        namespace_selector=(
            None if ns_sel is None else parse_selector(ns_sel, f"{path}.namespaceSelector")
        ),
    )


def _parse_port(value: Any, path: str) -> PolicyPort:
    obj = _mapping(value, path)
    _check_keys(obj, {"protocol", "port", "endPort"}, path)
    proto = obj.get("protocol", "TCP")
    if proto is None:
        proto = "TCP"
    if proto not in PROTOCOLS:
        raise PolicyError(f"{path}.protocol: {proto!r} is not one of TCP, UDP, SCTP")
    port: int | str | None = obj.get("port")
    if isinstance(port, bool):
        raise PolicyError(f"{path}.port: {port!r} is not a port number or name")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, int):
        if not 1 <= port <= 65535:
            raise PolicyError(f"{path}.port: {port} is outside 1..65535")
    elif isinstance(port, str):
        if not valid_port_name(port):
            raise PolicyError(f"{path}.port: {port!r} is not a valid port name (IANA_SVC_NAME)")
    elif port is not None:
        raise PolicyError(f"{path}.port: {port!r} is not a port number or name")
    end = obj.get("endPort")
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int):
            raise PolicyError(f"{path}.endPort: {end!r} is not a port number")
        if not isinstance(port, int):
            raise PolicyError(f"{path}.endPort: requires a numeric port")
        if not port <= end <= 65535:
            raise PolicyError(f"{path}.endPort: {end} must be within {port}..65535")
    return PolicyPort(protocol=proto, port=port, end_port=end)


def _parse_rule(value: Any, path: str, peers_key: str) -> Rule:
    obj = _mapping(value, path)
    _check_keys(obj, {"ports", peers_key}, path)
    ports = tuple(
        _parse_port(p, f"{path}.ports[{i}]")
        for i, p in enumerate(_list(obj.get("ports"), f"{path}.ports"))
    )
    raw_peers = _list(obj.get(peers_key), f"{path}.{peers_key}")
    peers = (
        tuple(_parse_peer(p, f"{path}.{peers_key}[{i}]") for i, p in enumerate(raw_peers))
        if raw_peers
        else None
    )
    return Rule(ports=ports, peers=peers)


def _parse_policy(obj: Mapping[str, Any]) -> NetworkPolicy:
    obj = _mapping(obj, "NetworkPolicy")
    kind = obj.get("kind", "NetworkPolicy")
    if kind != "NetworkPolicy":
        raise PolicyError(f"kind: expected NetworkPolicy, got {kind!r}")
    api = obj.get("apiVersion", "networking.k8s.io/v1")
    if api != "networking.k8s.io/v1":
        raise PolicyError(f"apiVersion: expected networking.k8s.io/v1, got {api!r}")
    meta = _mapping(obj.get("metadata"), "metadata")
    name = _str(meta.get("name"), "metadata.name")
    namespace = _str(meta.get("namespace") or "default", "metadata.namespace")
    where = f"NetworkPolicy {namespace}/{name}: spec"
    spec = _mapping(obj.get("spec"), where)
    _check_keys(spec, {"podSelector", "ingress", "egress", "policyTypes"}, where)
    pod_selector = parse_selector(spec.get("podSelector"), f"{where}.podSelector")
    ingress = tuple(
        _parse_rule(r, f"{where}.ingress[{i}]", "from")
        for i, r in enumerate(_list(spec.get("ingress"), f"{where}.ingress"))
    )
    egress = tuple(
        _parse_rule(r, f"{where}.egress[{i}]", "to")
        for i, r in enumerate(_list(spec.get("egress"), f"{where}.egress"))
    )
    raw_types = spec.get("policyTypes")
    types: set[PolicyType] = set()
    if raw_types is None or raw_types == []:
        # Kubernetes' default: Ingress always, Egress when the policy has egress rules.
        types.add("Ingress")
        if egress:
            types.add("Egress")
    else:
        for i, t in enumerate(_list(raw_types, f"{where}.policyTypes")):
            if t not in ("Ingress", "Egress"):
                raise PolicyError(f"{where}.policyTypes[{i}]: {t!r} is not Ingress or Egress")
            types.add(t)
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=pod_selector,
        ingress=ingress,
        egress=egress,
        policy_types=frozenset(types),
    )
