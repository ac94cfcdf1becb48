"""Pod annotations -> one resolved, typed `PodRequest`.

Annotations are written by whoever can create a pod, so this parser is the
boundary between untrusted text and everything that programs the kernel, BIRD
and nftables. It is deliberately strict: every value is parsed completely, every
malformed token is an error that names the annotation key and the token, and an
unknown key under `flock.fritzlab.net/` is an error too (a typo must never
silently do nothing). Operator-supplied IPs (`anycast`, `addresses`) must also be
permitted by the NodeConfig allow-list (`spec.allowedAddresses`, default deny),
otherwise any pod author could advertise any prefix into the operator's BGP
network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Final, get_args

from flock import ANNOTATION_PREFIX
from flock.compile.embed import EmbedError, layout
from flock.model.nodeconfig import AddressUse, NodeConfig
from flock.model.request import (
    EmbedField,
    FamilyRequest,
    IPAddress,
    IPNetwork,
    PodIdentity,
    PodRequest,
)

KEY_IPV6: Final = "ipv6"
KEY_IPV4: Final = "ipv4"
KEY_CIDR6: Final = "cidr6"
KEY_CIDR4: Final = "cidr4"
KEY_IP_ALGO: Final = "ip-algo"
KEY_ANYCAST: Final = "anycast"
KEY_ADDRESSES: Final = "addresses"

#: Every annotation key flock understands, without the prefix.
KNOWN_KEYS: Final = frozenset(
    {KEY_IPV6, KEY_IPV4, KEY_CIDR6, KEY_CIDR4, KEY_IP_ALGO, KEY_ANYCAST, KEY_ADDRESSES}
)
EMBED_FIELDS: Final[tuple[EmbedField, ...]] = get_args(EmbedField)

# Long values are cut in messages so an error stays readable in `kubectl describe`.
_MAX_TOKEN_IN_MESSAGE = 80


class AnnotationError(ValueError):
    """A pod's annotations cannot be honoured.

    `key` is the full annotation key (None when the problem is the combination
    of the node's configuration and the pod, e.g. no address family at all) and
    `token` the offending piece of its value (None when the whole key is wrong).
    """

    def __init__(self, key: str | None, token: str | None, reason: str) -> None:
        self.key = key
        self.token = token
        self.reason = reason
        if key is None:
            msg = reason
        elif token is None:
            msg = f"annotation {key}: {reason}"
        else:
            msg = f"annotation {key}: {_show(token)}: {reason}"
        super().__init__(msg)


def _show(token: str) -> str:
    if len(token) > _MAX_TOKEN_IN_MESSAGE:
        token = token[:_MAX_TOKEN_IN_MESSAGE] + "..."
    return repr(token)


def _full(key: str) -> str:
    return ANNOTATION_PREFIX + key


def _split_list(key: str, value: str) -> list[str]:
    """Comma-separated, whitespace around tokens allowed; empty tokens are errors."""
    tokens = [t.strip() for t in value.split(",")]
    if tokens == [""]:
        raise AnnotationError(_full(key), value, "empty value; remove the annotation instead")
    for t in tokens:
        if not t:
            raise AnnotationError(_full(key), value, "empty item in comma-separated list")
    return tokens


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v == "true":
        return True
    if v == "false":
        return False
    raise AnnotationError(_full(key), value, 'must be "true" or "false"')


def _parse_ip(key: str, token: str) -> IPAddress:
    if "/" in token:
        raise AnnotationError(_full(key), token, "expected an IP address, not a prefix")
    if "%" in token:
        raise AnnotationError(_full(key), token, "zone/scope suffixes are not allowed")
    try:
        ip = ipaddress.ip_address(token)
    except ValueError:
        raise AnnotationError(_full(key), token, "not an IPv4 or IPv6 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        raise AnnotationError(_full(key), token, "IPv4-mapped IPv6 address; write the IPv4 form")
    if ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        raise AnnotationError(
            _full(key), token, "unspecified, loopback, link-local and multicast are not usable"
        )
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        raise AnnotationError(_full(key), token, "limited broadcast address is not usable")
    return ip


def _parse_ips(key: str, value: str) -> tuple[IPAddress, ...]:
    seen: dict[IPAddress, str] = {}
    for token in _split_list(key, value):
        ip = _parse_ip(key, token)
        if ip in seen:
            raise AnnotationError(_full(key), token, f"duplicate of {seen[ip]!r}")
        seen[ip] = token
    return tuple(seen)


def _parse_cidrs(key: str, value: str, version: int, node: NodeConfig) -> tuple[IPNetwork, ...]:
    node_ranges = node.ranges(version)
    field = f"spec.cidr{version}"
    out: list[IPNetwork] = []
    for token in _split_list(key, value):
        if "/" not in token:
            raise AnnotationError(_full(key), token, "expected a CIDR such as 2001:db8::/112")
        try:
            net = ipaddress.ip_network(token, strict=True)
        except ValueError as e:
            raise AnnotationError(_full(key), token, f"not a network address ({e})") from None
        if net.version != version:
            raise AnnotationError(_full(key), token, f"not an IPv{version} network")
        if net in out:
            raise AnnotationError(_full(key), token, "duplicate")
        if not node_ranges:
            raise AnnotationError(
                _full(key), token, f"node {node.name} has no {field} to take a sub-range of"
            )
        parent = next((r for r in node_ranges if net.subnet_of(r)), None)  # type: ignore[arg-type]
        if parent is None:
            shown = ", ".join(str(r) for r in node_ranges)
            raise AnnotationError(
                _full(key), token, f"not inside node {node.name}'s {field} ({shown})"
            )
        # IPAM never hands out the network or broadcast address of a v4 range; in a
        # /31 or /32 sub-range every address is usable, so such a sub-range must not
        # hold the node range's network or broadcast address.
        if (
            isinstance(net, ipaddress.IPv4Network)
            and isinstance(parent, ipaddress.IPv4Network)
            and net.prefixlen >= 31
            and parent.prefixlen < 31
        ):
            for special in (parent.network_address, parent.broadcast_address):
                if special in net:
                    raise AnnotationError(
                        _full(key),
                        token,
                        f"contains {special}, the network or broadcast address of {parent}",
                    )
        out.append(net)
    return tuple(out)


def _parse_algo(value: str) -> tuple[EmbedField, ...]:
    out: list[EmbedField] = []
    for token in _split_list(KEY_IP_ALGO, value):
        field = next((f for f in EMBED_FIELDS if f == token), None)
        if field is None:
            raise AnnotationError(
                _full(KEY_IP_ALGO), token, "must be one of " + ", ".join(EMBED_FIELDS)
            )
        if field in out:
            raise AnnotationError(_full(KEY_IP_ALGO), token, "repeated")
        out.append(field)
    return tuple(out)


def _want(node: NodeConfig, override: bool | None, version: int) -> tuple[bool, str]:
    """Whether a family is on for the pod, and which setting decided it (for messages)."""
    if override is not None:
        return override, f"annotation {_full(f'ipv{version}')}={str(override).lower()}"
    default = node.spec.defaults.ipv6 if version == 6 else node.spec.defaults.ipv4
    if default is None:
        return True, f"node {node.name} spec.defaults.ipv{version} (unset: baseline on)"
    return default, f"node {node.name} spec.defaults.ipv{version}={str(default).lower()}"


def parse_annotations(
    annotations: Mapping[str, str], *, node: NodeConfig, namespace: str
) -> PodRequest:
    """Resolve a pod's annotations against its node's NodeConfig.

    Raises `AnnotationError` (and nothing else) for anything that cannot be
    honoured; the message names the annotation key and the offending token.
    """
    values: dict[str, str] = {}
    for full_key, value in annotations.items():
        if not isinstance(full_key, str) or not full_key.startswith(ANNOTATION_PREFIX):
            continue
        key = full_key[len(ANNOTATION_PREFIX) :]
        if key not in KNOWN_KEYS:
            raise AnnotationError(
                full_key, None, "unknown flock annotation; known: " + ", ".join(sorted(KNOWN_KEYS))
            )
        if not isinstance(value, str):
            raise AnnotationError(full_key, repr(value), "annotation values must be strings")
        values[key] = value

    override6 = _parse_bool(KEY_IPV6, values[KEY_IPV6]) if KEY_IPV6 in values else None
    override4 = _parse_bool(KEY_IPV4, values[KEY_IPV4]) if KEY_IPV4 in values else None
    want6, why6 = _want(node, override6, 6)
    want4, why4 = _want(node, override4, 4)
    if not want6 and not want4:
        raise AnnotationError(
            None,
            None,
            f"pod resolves to no address family on node {node.name}: IPv6 is off by {why6} "
            f"and IPv4 is off by {why4}",
        )
    whys = {6: why6, 4: why4}
    overrides = {6: override6, 4: override4}
    wants = {6: want6, 4: want4}

    anycast = _parse_ips(KEY_ANYCAST, values[KEY_ANYCAST]) if KEY_ANYCAST in values else ()
    addresses = _parse_ips(KEY_ADDRESSES, values[KEY_ADDRESSES]) if KEY_ADDRESSES in values else ()
    for key, ips in ((KEY_ANYCAST, anycast), (KEY_ADDRESSES, addresses)):
        use: AddressUse = "anycast" if key == KEY_ANYCAST else "addresses"
        for ip in ips:
            if not wants[ip.version]:
                raise AnnotationError(
                    _full(key),
                    str(ip),
                    f"IPv{ip.version} is disabled for this pod ({whys[ip.version]}); "
                    f"enable IPv{ip.version} or remove the address",
                )
            if not node.claim_permitted(ip, use=use, namespace=namespace):
                raise AnnotationError(
                    _full(key),
                    str(ip),
                    f"not permitted for {use} in namespace {namespace!r} by node {node.name}'s "
                    "spec.allowedAddresses (default deny)",
                )
    both = set(anycast) & set(addresses)
    if both:
        ip = sorted(both, key=lambda a: (a.version, int(a)))[0]
        raise AnnotationError(
            _full(KEY_ADDRESSES),
            str(ip),
            f"also listed in {_full(KEY_ANYCAST)}; an address is either on lo or on eth0",
        )

    primary: dict[int, IPAddress | None] = {6: None, 4: None}
    extras: list[IPAddress] = []
    for ip in addresses:
        if primary[ip.version] is None:
            primary[ip.version] = ip
        else:
            extras.append(ip)

    sub_ranges: dict[int, tuple[IPNetwork, ...]] = {6: (), 4: ()}
    for version, key in ((6, KEY_CIDR6), (4, KEY_CIDR4)):
        if key not in values:
            continue
        if not wants[version]:
            raise AnnotationError(
                _full(key), values[key], f"IPv{version} is disabled for this pod ({whys[version]})"
            )
        if primary[version] is not None:
            raise AnnotationError(
                _full(key),
                values[key],
                f"has no effect: {_full(KEY_ADDRESSES)} supplies the IPv{version} primary "
                f"{primary[version]}",
            )
        sub_ranges[version] = _parse_cidrs(key, values[key], version, node)

    embed: tuple[EmbedField, ...] = ()
    if KEY_IP_ALGO in values:
        embed = _parse_algo(values[KEY_IP_ALGO])
        if not want6:
            raise AnnotationError(
                _full(KEY_IP_ALGO), values[KEY_IP_ALGO], f"IPv6 is disabled for this pod ({why6})"
            )
        if primary[6] is not None:
            raise AnnotationError(
                _full(KEY_IP_ALGO),
                values[KEY_IP_ALGO],
                f"has no effect: {_full(KEY_ADDRESSES)} supplies the IPv6 primary {primary[6]}",
            )

    if embed:
        for net in sub_ranges[6] or node.ranges(6):
            assert isinstance(net, ipaddress.IPv6Network)
            try:
                layout(net, embed, PodIdentity(namespace=namespace, pod=""))
            except EmbedError as e:
                raise AnnotationError(_full(KEY_IP_ALGO), values[KEY_IP_ALGO], str(e)) from None

    families: dict[int, FamilyRequest] = {}
    for version in (6, 4):
        if not wants[version]:
            families[version] = FamilyRequest(want=False)
            continue
        ranges = sub_ranges[version] or node.ranges(version)
        if primary[version] is None and not ranges:
            cidr_key = f"spec.cidr{version}"
            by_annotation = overrides[version] is not None
            fix = (
                f"remove the annotation, supply an IPv{version} in {_full(KEY_ADDRESSES)}"
                if by_annotation
                else f"set spec.defaults.ipv{version}: false on the node"
            )
            raise AnnotationError(
                _full(f"ipv{version}") if by_annotation else None,
                None,
                f"IPv{version} is on for this pod ({whys[version]}) but node {node.name} has no "
                f"{cidr_key} and {_full(KEY_ADDRESSES)} supplies no IPv{version} address; "
                f"{fix} or add {cidr_key}",
            )
        families[version] = FamilyRequest(want=True, ranges=ranges, primary=primary[version])

    return PodRequest(
        v6=families[6],
        v4=families[4],
        embed=embed,
        extra_addresses=tuple(extras),
        anycast=anycast,
    )
