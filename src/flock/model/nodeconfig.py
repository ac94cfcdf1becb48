"""The NodeConfig custom resource: the operator's only per-node input.

It is parsed once, strictly, into typed values, so that nothing downstream
(IPAM, the BIRD renderer, the annotation parser) ever sees an unparsed string
from the cluster. Errors carry the field path, as `kubectl` users expect.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from flock import CRD_GROUP, CRD_VERSION
from flock.model import IPAddress as IPAddress
from flock.model import IPNetwork as IPNetwork

KIND = "NodeConfig"
API_VERSION = f"{CRD_GROUP}/{CRD_VERSION}"

# AS_TRANS (RFC 6793) is a placeholder for 4-byte ASNs in 2-byte sessions, never a
# real ASN; 0 is reserved (RFC 7607); 65535 and 4294967295 are reserved (RFC 7300).
# Documentation ASNs (64496-64511, 65536-65551, RFC 5398) are accepted on purpose:
# labs and examples use them, and they are harmless on a private session.
_RESERVED_ASNS = frozenset({0, 23456, 65535, 4294967295})

# RFC 1123 label (namespace names) and subdomain (node and Secret names).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
# Linux interface names: what may follow `%` in a link-local peer address.
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class NodeConfigError(ValueError):
    """A NodeConfig that cannot be used; the message names the field path."""


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


def _check_dns(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not pattern.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid {what}")
    return value


def _check_asn(value: int) -> int:
    if not 1 <= value <= 4294967295:
        raise ValueError(f"ASN {value} is outside 1..4294967295")
    if value in _RESERVED_ASNS:
        raise ValueError(f"ASN {value} is reserved and cannot be used for a BGP session")
    return value


class Defaults(_Model):
    """Which families a pod gets when it has no ipv6/ipv4 annotation; None means baseline (on)."""

    ipv6: StrictBool | None = None
    ipv4: StrictBool | None = None


class Bfd(_Model):
    """BFD for one peer; intervals in milliseconds."""

    enabled: StrictBool = True
    min_rx: StrictInt = Field(default=300, ge=10, le=60000)
    min_tx: StrictInt = Field(default=300, ge=10, le=60000)
    multiplier: StrictInt = Field(default=3, ge=1, le=255)


class SecretKeyRef(_Model):
    """A key in a Kubernetes Secret (the TCP MD5 password is never in the CR in the clear)."""

    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1)
    key: str = Field(default="password", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return _check_dns(v, _DNS_LABEL, "namespace name")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_dns(v, _DNS_SUBDOMAIN, "Secret name")


class Peer(_Model):
    """One upstream BGP neighbour; each becomes one session."""

    address: IPAddress
    asn: StrictInt
    hold_time: StrictInt | None = Field(default=None, description="seconds; 0 or 3..65535")
    keepalive_time: StrictInt | None = Field(default=None, ge=1, le=21845)
    bfd: Bfd | None = None
    graceful_restart: StrictBool = False
    password_secret_ref: SecretKeyRef | None = None
    password_file: str | None = Field(default=None, description="standalone mode only")

    @field_validator("address", mode="before")
    @classmethod
    def _address(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        text = v.strip()
        addr, pct, zone = text.partition("%")
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
            raise ValueError(f"{v!r} cannot be a BGP neighbour (unspecified/multicast/loopback)")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            raise ValueError(f"{v!r} is IPv4-mapped; write the IPv4 address")
        if ip.is_link_local and ip.version == 6:
            if not pct or not _IFNAME.fullmatch(zone):
                raise ValueError(
                    f"{v!r}: a link-local neighbour needs its interface, as fe80::1%eth0"
                )
            return ipaddress.IPv6Address(f"{addr}%{zone}")
        if pct:
            raise ValueError(f"{v!r}: only IPv6 link-local neighbours take a %interface suffix")
        return ip

    @field_validator("password_file")
    @classmethod
    def _password_file(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or "\n" in v or "\x00" in v or '"' in v):
            raise ValueError(f"{v!r} must be an absolute path (no quotes or newlines)")
        return v

    @field_validator("asn")
    @classmethod
    def _asn(cls, v: int) -> int:
        return _check_asn(v)

    @field_validator("hold_time")
    @classmethod
    def _hold(cls, v: int | None) -> int | None:
        if v is not None and v != 0 and not 3 <= v <= 65535:
            raise ValueError("holdTime must be 0 or between 3 and 65535 seconds (RFC 4271)")
        return v

    @model_validator(mode="after")
    def _timers(self) -> Peer:
        if (
            self.hold_time
            and self.keepalive_time is not None
            and self.keepalive_time * 3 > self.hold_time
        ):
            raise ValueError("keepaliveTime must be at most a third of holdTime")
        if self.password_secret_ref is not None and self.password_file is not None:
            raise ValueError("set passwordSecretRef or passwordFile, not both")
        return self


class Bgp(_Model):
    asn: StrictInt
    peers: tuple[Peer, ...] = ()
    router_id: ipaddress.IPv4Address | None = None

    @field_validator("asn")
    @classmethod
    def _asn(cls, v: int) -> int:
        return _check_asn(v)

    @field_validator("router_id")
    @classmethod
    def _router_id(cls, v: ipaddress.IPv4Address | None) -> ipaddress.IPv4Address | None:
        if v is not None and (v.is_unspecified or v.is_multicast or int(v) == 0xFFFFFFFF):
            raise ValueError(f"{v} cannot be a router ID")
        return v

    @model_validator(mode="after")
    def _unique_peers(self) -> Bgp:
        seen: set[IPAddress] = set()
        for p in self.peers:
            if p.address in seen:
                raise ValueError(f"peer {p.address} is listed twice")
            seen.add(p.address)
        return self


AddressUse = Literal["anycast", "addresses"]


class AllowedAddresses(_Model):
    """One allow-list entry: which operator-supplied IPs pods may claim.

    Default deny: a pod may put an `anycast` or `addresses` IP on itself only if
    some entry's `cidr` contains it, the entry allows that use, and (if the entry
    names namespaces) the pod's namespace is listed. Without this, anyone who can
    create a pod could advertise any prefix into the operator's BGP network.
    """

    cidr: IPNetwork
    use: tuple[AddressUse, ...] = Field(default=("anycast", "addresses"), min_length=1)
    namespaces: tuple[str, ...] = ()

    @field_validator("cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, v: Any) -> Any:
        return _parse_network(v)

    @field_validator("use")
    @classmethod
    def _use(cls, v: tuple[AddressUse, ...]) -> tuple[AddressUse, ...]:
        if len(set(v)) != len(v):
            raise ValueError("each use may be listed once")
        return v

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ns in v:
            _check_dns(ns, _DNS_LABEL, "namespace name")
        if len(set(v)) != len(v):
            raise ValueError("each namespace may be listed once")
        return v

    def permits(self, ip: IPAddress, *, use: AddressUse, namespace: str) -> bool:
        return (
            ip.version == self.cidr.version
            and ip in self.cidr
            and use in self.use
            and (not self.namespaces or namespace in self.namespaces)
        )


def _parse_network(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return ipaddress.ip_network(v.strip(), strict=True)
        except ValueError as e:
            raise ValueError(f"{v!r} is not a network address with a prefix length ({e})") from e
    return v


class NodeConfigSpec(_Model):
    cidr6: tuple[Annotated[ipaddress.IPv6Network, BeforeValidator(_parse_network)], ...] = ()
    cidr4: tuple[Annotated[ipaddress.IPv4Network, BeforeValidator(_parse_network)], ...] = ()
    defaults: Defaults = Defaults()
    bgp: Bgp | None = None
    allowed_addresses: tuple[AllowedAddresses, ...] = ()

    @field_validator("cidr6", "cidr4")
    @classmethod
    def _disjoint(cls, v: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
        for i, a in enumerate(v):
            if a.num_addresses < 2:
                raise ValueError(f"{a} has no room for a pod address (at least 2 addresses)")
            for b in v[:i]:
                if a.overlaps(b):
                    raise ValueError(f"{a} overlaps {b}; pod ranges must be disjoint")
        return v


class NodeConfig(_Model):
    """A parsed NodeConfig; `name` is the node's name."""

    name: str
    spec: NodeConfigSpec

    @property
    def want_ipv6(self) -> bool:
        return self.spec.defaults.ipv6 is not False

    @property
    def want_ipv4(self) -> bool:
        return self.spec.defaults.ipv4 is not False

    def ranges(self, version: int) -> tuple[IPNetwork, ...]:
        return self.spec.cidr6 if version == 6 else self.spec.cidr4

    def claim_permitted(self, ip: IPAddress, *, use: AddressUse, namespace: str) -> bool:
        return any(e.permits(ip, use=use, namespace=namespace) for e in self.spec.allowed_addresses)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> NodeConfig:
        """Parse the Kubernetes object shape (apiVersion/kind/metadata/spec)."""
        if obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
            raise NodeConfigError(
                f"expected apiVersion {API_VERSION} kind {KIND}, got "
                f"{obj.get('apiVersion')!r} {obj.get('kind')!r}"
            )
        metadata = obj.get("metadata") or {}
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        if not isinstance(name, str) or not name:
            raise NodeConfigError("metadata.name: a NodeConfig needs the node's name")
        if not _DNS_SUBDOMAIN.fullmatch(name):
            raise NodeConfigError(f"metadata.name: {name!r} is not a valid node name")
        spec_obj = obj.get("spec")
        if spec_obj is None:
            spec_obj = {}
        if not isinstance(spec_obj, Mapping):
            raise NodeConfigError(f"NodeConfig {name}: spec: must be an object")
        try:
            spec = NodeConfigSpec.model_validate(spec_obj)
        except ValidationError as e:
            raise NodeConfigError(_describe(name, e)) from None
        return cls(name=name, spec=spec)


def _describe(name: str, err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        path = "spec"
        for p in item["loc"]:
            path += f"[{p}]" if isinstance(p, int) else f".{p}"
        msg = item["msg"].removeprefix("Value error, ")
        shown = repr(item.get("input"))
        if len(shown) > 120:
            shown = shown[:120] + "..."
        parts.append(f"{path}: {msg} (got {shown})")
    return f"NodeConfig {name}: " + "; ".join(parts)
