"""Render the complete BIRD2 configuration for one node, as a pure function.

The agent owns BIRD's whole configuration: every session, every route BIRD may
originate and every filter. Rendering is kept pure (typed values in, text out,
no I/O) so it is tested and fuzzed in milliseconds, and so that nothing an
operator or a pod wrote can reach BIRD's parser except as a parsed `ipaddress`
value or an int. The one exception, the TCP MD5 password, is checked against
what BIRD's lexer can represent (it has no escapes) before it is quoted.

Two ways of feeding per-pod routes (/128 and /32) to BIRD are supported:

- `Mechanism.KERNEL` (the default): the agent writes the per-pod routes into a
  dedicated kernel routing table with its own protocol number, and a BIRD
  `kernel` protocol learns that table. A withdraw is one netlink delete; the
  config text does not depend on the export set at all.
- `Mechanism.STATIC`: the routes are `static` routes in the config, and every
  change is a re-render plus `configure`.

Each peer gets the channel of its address family; when the node has IPv4
prefixes but no IPv4 peer, its IPv6 sessions also carry IPv4 with IPv6 next
hops (RFC 8950 extended next hop).

With either mechanism, each session's export filter accepts only the node's
aggregates (exactly, from the aggregate protocol) and host routes from the
per-pod protocol that fall inside the operator's allow-list
(`allowedAddresses`): a stray route in BIRD, or in the export table, cannot be
advertised.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flock.compile.embed import fnv1a32
from flock.model.nodeconfig import IPAddress, IPNetwork, NodeConfig, Peer

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# rtnetlink protocol number that marks the agent's routes in the export table
# (unassigned in /etc/iproute2/rt_protos; BIRD's own is 12).
EXPORT_ROUTE_PROTO = 241
# Kernel table that holds the per-pod routes BIRD learns ("f10c").
EXPORT_TABLE = 0xF10C

AGG_PROTO = {6: "flock_agg6", 4: "flock_agg4"}
PODS_PROTO = {6: "flock_pods6", 4: "flock_pods4"}
EXPORT_FILTER = {6: "flock_export6", 4: "flock_export4"}
BFD_PROTO = "flock_bfd"

# BIRD's string literal is `"[^"\n]*"`: no escapes. Linux TCP MD5 keys are at most 80 bytes.
_PASSWORD_OK = re.compile(r"[\x20-\x21\x23-\x7e]{1,80}")
_IFNAME_OK = re.compile(r"[A-Za-z0-9_.@:-]{1,15}")


class Mechanism(enum.Enum):
    KERNEL = "kernel"
    STATIC = "static"


class BirdConfigError(ValueError):
    """The inputs cannot be rendered into a BIRD config; the message says which input."""


@dataclass(frozen=True)
class LocalAddress:
    """One address configured on the node, with its prefix length and interface."""

    ifname: str
    interface: IPInterface


@dataclass(frozen=True)
class Options:
    """Knobs of the rendered config that are not in NodeConfig."""

    mechanism: Mechanism = Mechanism.KERNEL
    export_table: int = EXPORT_TABLE
    export_route_proto: int = EXPORT_ROUTE_PROTO
    # Kernel learning: how often BIRD rescans the export table (it catches
    # whatever netlink notifications it dropped), and its netlink receive buffer,
    # raised so that a burst of thousands of route changes is not dropped.
    scan_time: int = 20
    netlink_rx_buffer: int = 8 * 1024 * 1024
    connect_retry_time: int = 5
    error_wait_min: int = 5
    error_wait_max: int = 60


def protocol_name(peer: IPAddress) -> str:
    """A stable BIRD protocol name for a peer: reordering peers restarts no session."""
    name = f"flock_p{peer.version}_{int(peer):0{32 if peer.version == 6 else 8}x}"
    zone = peer.scope_id if isinstance(peer, ipaddress.IPv6Address) else None
    if zone:
        name += "_" + "".join(c if c.isalnum() else "_" for c in zone)
    return name


def host_length(version: int) -> int:
    return 128 if version == 6 else 32


def exportable(node: NodeConfig, prefix: IPNetwork) -> bool:
    """Whether the export filter lets this per-pod prefix out (a host route in the allow-list)."""
    if prefix.prefixlen != host_length(prefix.version):
        return False
    addr = int(prefix.network_address)
    return any(
        e.cidr.version == prefix.version
        and addr & int(e.cidr.netmask) == int(e.cidr.network_address)
        for e in node.spec.allowed_addresses
    )


def choose_router_id(
    node: NodeConfig, local_addresses: Sequence[LocalAddress]
) -> ipaddress.IPv4Address:
    """NodeConfig's routerId, else the node's lowest global IPv4, else a hash of its name."""
    if node.spec.bgp is not None and node.spec.bgp.router_id is not None:
        return node.spec.bgp.router_id
    v4 = sorted(
        a.interface.ip
        for a in local_addresses
        if isinstance(a.interface, ipaddress.IPv4Interface)
        and not a.interface.ip.is_loopback
        and not a.interface.ip.is_link_local
        and not a.interface.ip.is_unspecified
    )
    if v4:
        return v4[0]
    # FNV-1a over the node name; never 0.0.0.0.
    return ipaddress.IPv4Address(fnv1a32(node.name.encode()) or 1)


def source_address(peer: IPAddress, local_addresses: Sequence[LocalAddress]) -> IPAddress | None:
    """The node's address on the peer's subnet, if it has one (lowest, for stability)."""
    candidates = sorted(
        a.interface.ip
        for a in local_addresses
        if a.interface.version == peer.version
        and peer in a.interface.network
        and a.interface.ip != peer
        and a.interface.network.prefixlen < host_length(peer.version)
    )
    return candidates[0] if candidates else None


def check_password(peer: IPAddress, password: str) -> str:
    if not _PASSWORD_OK.fullmatch(password):
        raise BirdConfigError(
            f"password for peer {peer}: must be 1 to 80 printable ASCII characters "
            "without a double quote (BIRD strings cannot escape one)"
        )
    return password


def render(
    node: NodeConfig,
    *,
    router_id: ipaddress.IPv4Address | None = None,
    local_addresses: Sequence[LocalAddress] = (),
    passwords: Mapping[IPAddress, str] | None = None,
    exports: Iterable[IPNetwork] = (),
    options: Options = Options(),
) -> str:
    """The full BIRD2 config for `node`.

    `passwords` holds the resolved TCP MD5 password of every peer that has a
    password reference (the caller reads the Secret or file). `exports` are the
    per-pod host routes; they appear in the text only with `Mechanism.STATIC`,
    and each must be one the export filter lets out (see `exportable`).
    """
    passwords = passwords or {}
    rid = router_id if router_id is not None else choose_router_id(node, local_addresses)
    if not isinstance(rid, ipaddress.IPv4Address) or int(rid) == 0:
        raise BirdConfigError(f"router id {rid!r} must be a non-zero IPv4 address")
    _check_options(options)
    pod_routes = _check_exports(node, exports)

    out: list[str] = [
        f"# Rendered by flock for node {_comment(node.name)}. Do not edit: the agent rewrites it.",
        f"router id {rid};",
        "timeformat protocol iso long;",
        "timeformat base iso long ms;",  # "Last reboot" tells restarts apart
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "",
        "protocol device { scan time 10; }",
        "",
    ]
    for version in (6, 4):
        out += _aggregates(node, version)
        out += _pods(pod_routes[version], version, options)
        out += _export_filter(node, version)
    peers = node.spec.bgp.peers if node.spec.bgp is not None else ()
    _check_peers(peers)
    if any(p.bfd is not None and p.bfd.enabled for p in peers):
        out += [f"protocol bfd {BFD_PROTO} {{", "}", ""]
    assert node.spec.bgp is not None or not peers
    for peer in peers:
        out += _session(node, peer, local_addresses, passwords, options)
    return "\n".join(out) + "\n"


def _comment(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "?", text)[:253]


def _check_options(o: Options) -> None:
    if not (1 <= o.export_table <= 0xFFFFFFFF) or o.export_table in (253, 254, 255):
        raise BirdConfigError(f"export table {o.export_table} must be 1..2^32-1, not 253-255")
    if not 1 <= o.export_route_proto <= 255:
        raise BirdConfigError(f"export route protocol {o.export_route_proto} must be 1..255")
    for name in ("scan_time", "netlink_rx_buffer", "connect_retry_time"):
        value = getattr(o, name)
        if not isinstance(value, int) or value < 1:
            raise BirdConfigError(f"option {name}={value!r} must be a positive integer")
    if not 1 <= o.error_wait_min <= o.error_wait_max:
        raise BirdConfigError("error wait times must satisfy 1 <= min <= max")


def _check_exports(node: NodeConfig, exports: Iterable[IPNetwork]) -> dict[int, list[IPNetwork]]:
    routes: dict[int, set[IPNetwork]] = {6: set(), 4: set()}
    for prefix in exports:
        if not isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise BirdConfigError(f"export {prefix!r} is not a parsed IP network")
        if prefix.prefixlen != host_length(prefix.version):
            raise BirdConfigError(f"export {prefix}: per-pod exports must be /128 or /32")
        if not exportable(node, prefix):
            raise BirdConfigError(
                f"export {prefix}: not inside any spec.allowedAddresses entry, "
                "so the export filter would drop it"
            )
        routes[prefix.version].add(prefix)
    return {v: sorted(r) for v, r in routes.items()}


def _aggregates(node: NodeConfig, version: int) -> list[str]:
    nets = node.ranges(version)
    if not nets:
        return []
    lines = [f"protocol static {AGG_PROTO[version]} {{", f"  ipv{version};"]
    lines += [f"  route {net} blackhole;" for net in sorted(nets)]
    return [*lines, "}", ""]


def _pods(routes: list[IPNetwork], version: int, o: Options) -> list[str]:
    name = PODS_PROTO[version]
    hl = host_length(version)
    if o.mechanism is Mechanism.STATIC:
        lines = [f"protocol static {name} {{", f"  ipv{version};"]
        lines += [f"  route {r} blackhole;" for r in routes]
        return [*lines, "}", ""]
    return [
        f"protocol kernel {name} {{",
        f"  ipv{version} {{",
        f"    import where net.len = {hl} && krt_source = {o.export_route_proto};",
        "    export none;",
        "  };",
        f"  kernel table {o.export_table};",
        "  learn;",
        f"  scan time {o.scan_time};",
        f"  netlink rx buffer {o.netlink_rx_buffer};",
        "}",
        "",
    ]


def _export_filter(node: NodeConfig, version: int) -> list[str]:
    hl = host_length(version)
    lines = [f"filter {EXPORT_FILTER[version]} {{"]
    aggs = sorted(node.ranges(version))
    if aggs:
        lines.append(
            f'  if proto = "{AGG_PROTO[version]}" && net ~ [ {", ".join(map(str, aggs))} ] '
            "then accept;"
        )
    allowed = sorted({e.cidr for e in node.spec.allowed_addresses if e.cidr.version == version})
    if allowed:
        ranges = ", ".join(f"{c}{{{hl},{hl}}}" for c in allowed)
        lines.append(
            f'  if proto = "{PODS_PROTO[version]}" && net.len = {hl} && net ~ [ {ranges} ] '
            "then accept;"
        )
    return [*lines, "  reject;", "}", ""]


def _check_peers(peers: Sequence[Peer]) -> None:
    seen: set[str] = set()
    for peer in peers:
        if str(peer.address) in seen:
            raise BirdConfigError(f"peer {peer.address} is listed twice in spec.bgp.peers")
        seen.add(str(peer.address))
        if peer.address.is_unspecified or peer.address.is_multicast:
            raise BirdConfigError(f"peer {peer.address}: cannot be a BGP neighbour")
        if peer.address.is_link_local:
            zone = _zone(peer.address)
            if peer.address.version == 4 or zone is None or not _IFNAME_OK.fullmatch(zone):
                raise BirdConfigError(
                    f"peer {peer.address}: a link-local neighbour must be IPv6 with its "
                    "interface, as fe80::1%eth0"
                )


def _zone(addr: IPAddress) -> str | None:
    return addr.scope_id if isinstance(addr, ipaddress.IPv6Address) else None


def _bare(addr: IPAddress) -> IPAddress:
    """The address without its %zone."""
    return (
        ipaddress.ip_address(int(addr)) if addr.version == 4 else ipaddress.IPv6Address(int(addr))
    )


def _session(
    node: NodeConfig,
    peer: Peer,
    local_addresses: Sequence[LocalAddress],
    passwords: Mapping[IPAddress, str],
    o: Options,
) -> list[str]:
    assert node.spec.bgp is not None
    addr = _bare(peer.address)
    zone = _zone(peer.address)
    src = None if zone else source_address(addr, local_addresses)
    local = f"local {src} as {node.spec.bgp.asn};" if src else f"local as {node.spec.bgp.asn};"
    lines = [
        f"protocol bgp {protocol_name(peer.address)} {{",
        f"  {local}",
        f"  neighbor {addr} as {int(peer.asn)};",
        *([f'  interface "{zone}";'] if zone else []),
        f"  connect retry time {o.connect_retry_time};",
        f"  error wait time {o.error_wait_min}, {o.error_wait_max};",
    ]
    if peer.hold_time is not None:
        lines.append(f"  hold time {int(peer.hold_time)};")
    if peer.keepalive_time is not None:
        lines.append(f"  keepalive time {int(peer.keepalive_time)};")
    lines.append(f"  graceful restart {'on' if peer.graceful_restart else 'aware'};")
    if peer.password_secret_ref is not None or peer.password_file is not None:
        if peer.address not in passwords:
            raise BirdConfigError(
                f"peer {addr}: has a password reference but no password was resolved for it"
            )
        lines.append(f'  password "{check_password(addr, passwords[peer.address])}";')
    if peer.bfd is not None and peer.bfd.enabled:
        b = peer.bfd
        lines.append(
            f"  bfd {{ min rx interval {int(b.min_rx)} ms; min tx interval {int(b.min_tx)} ms; "
            f"multiplier {int(b.multiplier)}; }};"
        )
    lines += [
        f"  ipv{addr.version} {{",
        "    import none;",
        f"    export filter {EXPORT_FILTER[addr.version]};",
        "    next hop self;",
        "  };",
    ]
    if addr.version == 6 and _ipv4_over_ipv6(node):
        # No IPv4 peer but IPv4 prefixes to announce: carry them on the IPv6
        # session with IPv6 next hops (RFC 8950); a peer that does not
        # negotiate it simply leaves this channel down.
        lines += [
            "  ipv4 {",
            "    import none;",
            f"    export filter {EXPORT_FILTER[4]};",
            "    next hop self;",
            "    extended next hop on;",
            "  };",
        ]
    return [*lines, "}", ""]


def _ipv4_over_ipv6(node: NodeConfig) -> bool:
    peers = node.spec.bgp.peers if node.spec.bgp is not None else ()
    has_v4 = bool(node.spec.cidr4) or any(e.cidr.version == 4 for e in node.spec.allowed_addresses)
    return has_v4 and not any(p.address.version == 4 for p in peers)
