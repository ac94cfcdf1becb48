"""The NodeConfig custom resource: the operator's only per-node input.

It is parsed once, strictly, into typed values, so that nothing downstream
(IPAM, the BIRD renderer, the annotation parser) ever sees an unparsed string
from the cluster. Errors carry the field path, as `kubectl` users expect.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from flock import CRD_GROUP, CRD_VERSION

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

KIND = "NodeConfig"
API_VERSION = f"{CRD_GROUP}/{CRD_VERSION}"

# AS_TRANS (RFC 6793) is a placeholder for 4-byte ASNs in 2-byte sessions, never a
# real ASN; 0 is reserved (RFC 7607); 65535 and 4294967295 are reserved (RFC 7300).
_RESERVED_ASNS = frozenset({0, 23456, 65535, 4294967295})


class NodeConfigError(ValueError):
    """A NodeConfig that cannot be used; the message names the field path."""


class _Model(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )


def _check_asn(value: int) -> int:
    if not 1 <= value <= 4294967295:
        raise ValueError(f"ASN {value} is outside 1..4294967295")
    if value in _RESERVED_ASNS:
        raise ValueError(f"ASN {value} is reserved and cannot be used for a BGP session")
    return value


class Defaults(_Model):
    """Which families a pod gets when it has no ipv6/ipv4 annotation; None means baseline (on)."""

    ipv6: bool | None = None
    ipv4: bool | None = None


class Bfd(_Model):
    """BFD for one peer; intervals in milliseconds."""

    enabled: bool = True
    min_rx: int = Field(default=300, ge=10, le=60000)
    min_tx: int = Field(default=300, ge=10, le=60000)
    multiplier: int = Field(default=3, ge=1, le=255)


class SecretKeyRef(_Model):
    """A key in a Kubernetes Secret (the TCP MD5 password is never in the CR in the clear)."""

    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1)
    key: str = Field(default="password", min_length=1)


class Peer(_Model):
    """One upstream BGP neighbour; each becomes one session."""

    address: IPAddress
    asn: int
    hold_time: int | None = Field(default=None, description="seconds; 0 or 3..65535")
    keepalive_time: int | None = Field(default=None, ge=1, le=21845)
    bfd: Bfd | None = None
    graceful_restart: bool = False
    password_secret_ref: SecretKeyRef | None = None
    password_file: str | None = Field(default=None, description="standalone mode only")

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
    asn: int
    peers: tuple[Peer, ...] = ()
    router_id: ipaddress.IPv4Address | None = None

    @field_validator("asn")
    @classmethod
    def _asn(cls, v: int) -> int:
        return _check_asn(v)


AddressUse = Literal["anycast", "addresses"]


class AllowedAddresses(_Model):
    """One allow-list entry: which operator-supplied IPs pods may claim.

    Default deny: a pod may put an `anycast` or `addresses` IP on itself only if
    some entry's `cidr` contains it, the entry allows that use, and (if the entry
    names namespaces) the pod's namespace is listed. Without this, anyone who can
    create a pod could advertise any prefix into the operator's BGP network.
    """

    cidr: IPNetwork
    use: tuple[AddressUse, ...] = ("anycast", "addresses")
    namespaces: tuple[str, ...] = ()

    @field_validator("cidr", mode="before")
    @classmethod
    def _strict_cidr(cls, v: Any) -> Any:
        return _parse_network(v)

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
    cidr6: tuple[ipaddress.IPv6Network, ...] = ()
    cidr4: tuple[ipaddress.IPv4Network, ...] = ()
    defaults: Defaults = Defaults()
    bgp: Bgp | None = None
    allowed_addresses: tuple[AllowedAddresses, ...] = ()

    @field_validator("cidr6", "cidr4", mode="before")
    @classmethod
    def _strict_cidrs(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            return tuple(_parse_network(x) for x in v)
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
        try:
            spec = NodeConfigSpec.model_validate(obj.get("spec") or {})
        except ValidationError as e:
            raise NodeConfigError(_describe(name, e)) from None
        return cls(name=name, spec=spec)


def _describe(name: str, err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        path = ".".join(str(p) for p in ("spec", *item["loc"]))
        parts.append(f"{path}: {item['msg']} (got {item.get('input')!r})")
    return f"NodeConfig {name}: " + "; ".join(parts)
