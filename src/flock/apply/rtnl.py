"""Byte-level rtnetlink messages: the few that the pod datapath sends and reads.

Why not pyroute2's request layer: measured on the CI-class machine, pyroute2
0.9's synchronous API costs ~0.3 ms per request (its asyncio round trip) and its
generic NLA marshaller ~0.1-0.3 ms per message encoded, so a dual-stack pod
(15-20 messages) spent 5-6 ms in Python around 0.7 ms of kernel work. The
layouts below are fixed kernel ABI (linux/rtnetlink.h, linux/if_link.h,
linux/neighbour.h) and take a few microseconds each with `struct`. pyroute2
stays the reference: the unit tests decode these bytes with its parsers.

Everything here is pure: encoders return bytes, parsers take bytes. The socket
that carries them lives in `flock.apply.nlsock`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Message types (linux/rtnetlink.h).
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
NLMSG_ERROR = 2
NLMSG_DONE = 3

# Header flags (linux/netlink.h).
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR replies
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR replies
NLMSGERR_ATTR_MSG = 1

# Link attributes.
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1
IFLA_AF_SPEC = 26
IFLA_NET_NS_FD = 28
IFLA_GROUP = 27
IFLA_EXT_MASK = 29
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFLA_INET_CONF = 1
IFLA_INET6_ADDR_GEN_MODE = 8
IN6_ADDR_GEN_MODE_NONE = 1
IPV4_DEVCONF_FORWARDING = 1
IPV4_DEVCONF_PROXY_ARP = 3
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# Address attributes and flags.
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80

# Route attributes and constants.
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_MULTIPATH = 9
RTA_TABLE = 15
RT_TABLE_MAIN = 254
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
RTPROT_KERNEL = 2
RTPROT_STATIC = 4

# Neighbour attributes and states.
NDA_DST = 1
NDA_LLADDR = 2
NDA_IFINDEX = 8
NUD_PERMANENT = 0x80

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_RTNEXTHOP = struct.Struct("=HBBi")
_NLATTR = struct.Struct("=HH")
_ERRMSG = struct.Struct("=i")

NLA_F_NESTED = 0x8000


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def attr_u8(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=B", value))


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def attr_nested(kind: int, parts: Iterable[bytes]) -> bytes:
    return attr(kind, b"".join(parts))


def mac_bytes(mac: str) -> bytes:
    """'0a:1b:...' -> 6 bytes; a clear error for anything else."""
    parts = mac.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def family_of(ip: IPAddress) -> int:
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """Wrap a body into a netlink message with header; `flags` gets NLM_F_REQUEST."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags | NLM_F_REQUEST, seq, 0) + body


@dataclass(frozen=True, slots=True)
class Request:
    """One request to send: message type, flags (NLM_F_REQUEST/ACK are added), body."""

    kind: int
    flags: int
    body: bytes
    what: str  # human-readable, for errors: "add 10.0.0.1/32 on eth0"


# -- bodies -------------------------------------------------------------------


def ifinfo(*, index: int = 0, flags: int = 0, change: int = 0, family: int = 0) -> bytes:
    return _IFINFOMSG.pack(family, 0, index, flags, change)


def veth_new(
    *,
    name: str,
    mac: str,
    peer_name: str,
    peer_mac: str,
    peer_netns_fd: int,
    mtu: int | None = None,
) -> bytes:
    """RTM_NEWLINK body: a veth whose peer is created directly in another namespace."""
    mtu_attr = attr_u32(IFLA_MTU, mtu) if mtu else b""
    peer = (
        ifinfo()
        + attr_str(IFLA_IFNAME, peer_name)
        + attr(IFLA_ADDRESS, mac_bytes(peer_mac))
        + mtu_attr
        + attr_u32(IFLA_NET_NS_FD, peer_netns_fd)
    )
    linkinfo = attr_nested(
        IFLA_LINKINFO,
        [
            attr_str(IFLA_INFO_KIND, "veth"),
            attr_nested(IFLA_INFO_DATA, [attr(VETH_INFO_PEER, peer)]),
        ],
    )
    return (
        ifinfo()
        + attr_str(IFLA_IFNAME, name)
        + attr(IFLA_ADDRESS, mac_bytes(mac))
        + mtu_attr
        + linkinfo
    )


def link_set(
    *,
    index: int,
    up: bool | None = None,
    addrgenmode_none: bool = False,
    ipv4_conf: dict[int, int] | None = None,
) -> bytes:
    """RTM_SETLINK body: admin state, IPv6 address generation, IPv4 devconf."""
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    af: list[bytes] = []
    if ipv4_conf:
        conf = [attr_u32(k, v) for k, v in sorted(ipv4_conf.items())]
        af.append(attr_nested(socket.AF_INET, [attr_nested(IFLA_INET_CONF, conf)]))
    if addrgenmode_none:
        af.append(
            attr_nested(
                socket.AF_INET6, [attr_u8(IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE)]
            )
        )
    body = ifinfo(index=index, flags=flags, change=change)
    if af:
        body += attr_nested(IFLA_AF_SPEC, af)
    return body


def link_retire(*, name: str, group: int) -> bytes:
    """RTM_SETLINK body: set link `name` down and move it to `group` (for a batched delete)."""
    return (
        ifinfo(flags=0, change=IFF_UP) + attr_str(IFLA_IFNAME, name) + attr_u32(IFLA_GROUP, group)
    )


def group_delete(group: int) -> bytes:
    """RTM_DELLINK body deleting every link of `group` in one unregister (one RCU wait)."""
    return ifinfo() + attr_u32(IFLA_GROUP, group)


def link_by_name(name: str) -> bytes:
    """RTM_GETLINK / RTM_DELLINK body selecting a link by name."""
    return ifinfo() + attr_str(IFLA_IFNAME, name)


def link_by_index(index: int) -> bytes:
    return ifinfo(index=index)


def address(*, index: int, ip: IPAddress, prefixlen: int, scope: int = RT_SCOPE_UNIVERSE) -> bytes:
    """RTM_NEWADDR/DELADDR body; IPv6 addresses carry NODAD so they are never tentative."""
    raw = ip.packed
    flags = IFA_F_NODAD if ip.version == 6 else 0
    body = _IFADDRMSG.pack(family_of(ip), prefixlen, flags, scope, index)
    body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    return body + attr_u32(IFA_FLAGS, flags) if flags else body


def route(
    *,
    dst: IPAddress | None,
    dst_len: int,
    family: int,
    oif: int | None = None,
    gateway: IPAddress | None = None,
    multipath: Sequence[tuple[IPAddress, int]] = (),
    proto: int = RTPROT_STATIC,
    scope: int = RT_SCOPE_UNIVERSE,
    onlink: bool = False,
    table: int = RT_TABLE_MAIN,
) -> bytes:
    """RTM_NEWROUTE/DELROUTE body. `multipath` is a list of (gateway, ifindex)."""
    body = _RTMSG.pack(
        family, dst_len, 0, 0, table, proto, scope, RTN_UNICAST, RTNH_F_ONLINK if onlink else 0
    )
    if dst is not None:
        body += attr(RTA_DST, dst.packed)
    if oif is not None:
        body += attr_u32(RTA_OIF, oif)
    if gateway is not None:
        body += attr(RTA_GATEWAY, gateway.packed)
    if multipath:
        hops = b""
        for gw, ifindex in multipath:
            gw_attr = attr(RTA_GATEWAY, gw.packed)
            hops += _RTNEXTHOP.pack(_RTNEXTHOP.size + len(gw_attr), 0, 0, ifindex) + gw_attr
        body += attr(RTA_MULTIPATH, hops)
    return body


def route_dump(family: int, *, proto: int = 0, oif: int | None = None) -> bytes:
    """Route dump request; with NETLINK_GET_STRICT_CHK the kernel filters by proto and oif
    (a multipath route matches when any of its hops uses `oif`)."""
    body = _RTMSG.pack(family, 0, 0, 0, 0, proto, 0, 0, 0)
    return body + attr_u32(RTA_OIF, oif) if oif is not None else body


def neighbour(*, index: int, ip: IPAddress, mac: str | None, state: int = NUD_PERMANENT) -> bytes:
    """RTM_NEWNEIGH/DELNEIGH body: a permanent neighbour entry."""
    body = _NDMSG.pack(family_of(ip), index, state, 0, 0) + attr(NDA_DST, ip.packed)
    if mac is not None:
        body += attr(NDA_LLADDR, mac_bytes(mac))
    return body


def addr_dump(family: int = 0, index: int = 0) -> bytes:
    """Address dump request; with strict checking a non-zero `index` filters in the kernel."""
    return _IFADDRMSG.pack(family, 0, 0, 0, index)


def neigh_dump(family: int = 0, index: int = 0) -> bytes:
    """Neighbour dump request; with strict checking NDA_IFINDEX filters in the kernel."""
    body = _NDMSG.pack(family, 0, 0, 0, 0)
    return body + attr_u32(NDA_IFINDEX, index) if index else body


# -- parsing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One netlink message received: header fields and raw body."""

    kind: int
    flags: int
    seq: int
    body: bytes


def split(data: bytes) -> Iterator[Reply]:
    """Split a datagram into its netlink messages."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise ValueError(f"truncated netlink message at offset {off}")
        yield Reply(kind, flags, seq, data[off + _NLMSGHDR.size : off + length])
        off += _align(length)


def attrs(data: bytes, offset: int = 0, want: frozenset[int] | None = None) -> dict[int, bytes]:
    """Top-level attributes of a body from `offset`: type (nested bit stripped) -> payload.

    With `want`, only those types are copied out (a link message carries ~40
    attributes, most of them devconf and stats nobody here reads).
    """
    out: dict[int, bytes] = {}
    off = offset
    end = len(data)
    unpack = _NLATTR.unpack_from
    while off + 4 <= end:
        length, kind = unpack(data, off)
        if length < 4:
            break
        kind &= ~NLA_F_NESTED
        if want is None or kind in want:
            out[kind] = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def error_of(reply: Reply) -> tuple[int, str]:
    """(errno, kernel extended-ack message) of an NLMSG_ERROR reply; errno 0 is an ACK."""
    (err,) = _ERRMSG.unpack_from(reply.body, 0)
    text = ""
    if reply.flags & NLM_F_ACK_TLVS:
        # After the error code comes the original header, plus its payload unless capped.
        orig_len = _NLMSGHDR.unpack_from(reply.body, 4)[0]
        skip = 4 + (_NLMSGHDR.size if reply.flags & NLM_F_CAPPED else _align(orig_len))
        msg = attrs(reply.body, skip).get(NLMSGERR_ATTR_MSG)
        if msg:
            text = msg.rstrip(b"\0").decode(errors="replace")
    return -err, text


@dataclass(frozen=True, slots=True)
class Link:
    index: int
    name: str
    flags: int
    mac: str
    kind: str
    mtu: int
    group: int = 0


_LINK_ATTRS = frozenset({IFLA_IFNAME, IFLA_ADDRESS, IFLA_MTU, IFLA_GROUP, IFLA_LINKINFO})


def link_dump() -> bytes:
    """Link dump request without statistics (IFLA_EXT_MASK; older kernels ignore the bit)."""
    return ifinfo() + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)


def parse_link(body: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body, 0)
    a = attrs(body, _IFINFOMSG.size, _LINK_ATTRS)
    kind = ""
    if IFLA_LINKINFO in a:
        info = attrs(a[IFLA_LINKINFO])
        kind = info.get(IFLA_INFO_KIND, b"").rstrip(b"\0").decode()
    mtu = struct.unpack("=I", a[IFLA_MTU])[0] if IFLA_MTU in a else 0
    return Link(
        index=index,
        name=a.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        flags=flags,
        mac=mac_str(a.get(IFLA_ADDRESS, b"")),
        kind=kind,
        mtu=mtu,
        group=struct.unpack("=I", a[IFLA_GROUP])[0] if IFLA_GROUP in a else 0,
    )


@dataclass(frozen=True, slots=True)
class Addr:
    index: int
    ip: IPAddress
    prefixlen: int
    flags: int
    scope: int


def _ip(raw: bytes) -> IPAddress:
    return ipaddress.ip_address(raw)


def parse_addr(body: bytes) -> Addr:
    _family, prefixlen, flags8, scope, index = _IFADDRMSG.unpack_from(body, 0)
    a = attrs(body, _IFADDRMSG.size)
    flags = struct.unpack("=I", a[IFA_FLAGS])[0] if IFA_FLAGS in a else flags8
    raw = a.get(IFA_LOCAL) or a[IFA_ADDRESS]
    return Addr(index=index, ip=_ip(raw), prefixlen=prefixlen, flags=flags, scope=scope)


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    dst: IPAddress | None
    dst_len: int
    table: int
    proto: int
    scope: int
    kind: int
    oif: int | None
    gateway: IPAddress | None
    # (gateway, ifindex) per hop when the route is multipath.
    multipath: tuple[tuple[IPAddress | None, int], ...] = field(default=())
    flags: int = 0


def parse_route(body: bytes) -> Route:
    family, dst_len, _src_len, _tos, table8, proto, scope, kind, flags = _RTMSG.unpack_from(body, 0)
    a = attrs(body, _RTMSG.size)
    table = struct.unpack("=I", a[RTA_TABLE])[0] if RTA_TABLE in a else table8
    hops: list[tuple[IPAddress | None, int]] = []
    if RTA_MULTIPATH in a:
        raw = a[RTA_MULTIPATH]
        off = 0
        while off + _RTNEXTHOP.size <= len(raw):
            length, _f, _h, ifindex = _RTNEXTHOP.unpack_from(raw, off)
            if length < _RTNEXTHOP.size:
                break
            gw = attrs(raw[off + _RTNEXTHOP.size : off + length]).get(RTA_GATEWAY)
            hops.append((_ip(gw) if gw else None, ifindex))
            off += _align(length)
    return Route(
        family=family,
        dst=_ip(a[RTA_DST]) if RTA_DST in a else None,
        dst_len=dst_len,
        table=table,
        proto=proto,
        scope=scope,
        kind=kind,
        oif=struct.unpack("=I", a[RTA_OIF])[0] if RTA_OIF in a else None,
        gateway=_ip(a[RTA_GATEWAY]) if RTA_GATEWAY in a else None,
        multipath=tuple(hops),
        flags=flags,
    )


@dataclass(frozen=True, slots=True)
class Neigh:
    index: int
    ip: IPAddress
    mac: str
    state: int


def parse_neigh(body: bytes) -> Neigh:
    _family, index, state, _flags, _type = _NDMSG.unpack_from(body, 0)
    a = attrs(body, _NDMSG.size)
    return Neigh(index=index, ip=_ip(a[NDA_DST]), mac=mac_str(a.get(NDA_LLADDR, b"")), state=state)
