"""What the kernel must hold for one pod attachment, as data: names, MACs, requests.

Pure: given a `PodNetSpec` (and the interface indexes the kernel assigned) it
returns the exact rtnetlink requests for each namespace, so the layout of SPEC §4
is testable without root and `flock.apply.datapath` only sends and checks.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flock.apply import rtnl
from flock.apply.rtnl import Request
from flock.model import IPAddress as IPAddress

if TYPE_CHECKING:
    from flock.model.allocation import Allocation


# Our route protocol number (iproute2 rt_protos leaves 70 unassigned; 'F' for flock).
# Every host route flock installs carries it; reconcile/GC only ever touch these.
RTPROT_FLOCK = 70
HOST_VETH_PREFIX = "flk"
GATEWAY_V6 = ipaddress.IPv6Address("fe80::1")
GATEWAY_V4 = ipaddress.IPv4Address("169.254.1.1")
HOST_LL_PREFIXLEN = 64
IFNAMSIZ = 15


class DatapathError(RuntimeError):
    """Programming the kernel for a pod failed; the message names the step."""


def host_veth_name(container_id: str, ifname: str = "eth0") -> str:
    """Deterministic host-side veth name: `flk` + 11 hex digits of sha256(id/ifname)."""
    if not container_id:
        raise ValueError("container id is empty")
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()
    return HOST_VETH_PREFIX + digest[: IFNAMSIZ - len(HOST_VETH_PREFIX) - 1]


def veth_macs(container_id: str, ifname: str = "eth0") -> tuple[str, str]:
    """(host MAC, pod MAC), locally administered unicast, derived from the attachment."""
    digest = hashlib.sha256(f"mac/{container_id}/{ifname}".encode()).digest()
    host = bytes([0xEE]) + digest[:5]
    pod = bytes([0x0A]) + digest[5:10]
    return rtnl.mac_str(host), rtnl.mac_str(pod)


_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def valid_ifname(name: str) -> bool:
    """A Linux interface name (<= 15 chars, no '/', ':', blanks; not '.' or '..')."""
    return bool(_IFNAME_RE.fullmatch(name)) and name not in (".", "..")


def prefixlen(ip: IPAddress) -> int:
    return 128 if ip.version == 6 else 32


def cidr(ip: IPAddress) -> str:
    return f"{ip}/{prefixlen(ip)}"


@dataclass(frozen=True, slots=True)
class PodNetSpec:
    """What the kernel must hold for one attachment."""

    container_id: str
    netns: str  # path, e.g. /var/run/netns/cni-1234
    ifname: str = "eth0"
    v6: ipaddress.IPv6Address | None = None
    v4: ipaddress.IPv4Address | None = None
    extra_addresses: tuple[IPAddress, ...] = ()
    anycast: tuple[IPAddress, ...] = ()
    mtu: int | None = None
    host_ifname: str = ""  # derived from container_id/ifname when empty

    def __post_init__(self) -> None:
        if not self.container_id:
            raise ValueError("PodNetSpec: container_id is empty")
        if not self.netns:
            raise ValueError("PodNetSpec: netns path is empty")
        if not valid_ifname(self.ifname):
            raise ValueError(f"PodNetSpec: bad interface name {self.ifname!r}")
        if self.v6 is None and self.v4 is None:
            raise ValueError("PodNetSpec: neither a v6 nor a v4 primary address")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"PodNetSpec: MTU {self.mtu} out of range 68..65535")
        for ip in self.extra_addresses + self.anycast:
            if (ip.version == 6 and self.v6 is None) or (ip.version == 4 and self.v4 is None):
                raise ValueError(
                    f"PodNetSpec: {ip} is IPv{ip.version} but the pod has no IPv{ip.version} "
                    "primary (the default route of that family would be missing)"
                )
        if self.host_ifname:
            if not valid_ifname(self.host_ifname) or not self.host_ifname.startswith(
                HOST_VETH_PREFIX
            ):
                raise ValueError(
                    f"PodNetSpec: host interface name {self.host_ifname!r} is not a valid "
                    f"name starting with {HOST_VETH_PREFIX!r}"
                )
        else:
            object.__setattr__(self, "host_ifname", host_veth_name(self.container_id, self.ifname))

    @property
    def primaries(self) -> tuple[IPAddress, ...]:
        return tuple(a for a in (self.v6, self.v4) if a is not None)

    @property
    def addresses(self) -> tuple[IPAddress, ...]:
        """Every address on the pod's interface, primaries first, without repeats."""
        return tuple(dict.fromkeys(self.primaries + self.extra_addresses))

    @classmethod
    def from_allocation(cls, alloc: Allocation, *, mtu: int | None = None) -> PodNetSpec:
        """Build from a `flock.model.allocation.Allocation`."""
        return cls(
            container_id=alloc.key.container_id,
            ifname=alloc.key.ifname,
            netns=alloc.netns,
            v6=alloc.v6,
            v4=alloc.v4,
            extra_addresses=tuple(alloc.extra_addresses),
            anycast=tuple(alloc.anycast),
            mtu=mtu,
            host_ifname=alloc.host_ifname,
        )


@dataclass(frozen=True, slots=True)
class PodNetResult:
    """What setup_pod built; `to_cni()` gives the CNI 1.1.0 result's interfaces/ips/routes."""

    host_ifname: str
    host_mac: str
    host_index: int
    pod_ifname: str
    pod_mac: str
    pod_index: int
    sandbox: str
    mtu: int
    addresses: tuple[IPAddress, ...] = field(default=())

    def to_cni(self) -> dict[str, Any]:
        ips = []
        for ip in self.addresses:
            gw = GATEWAY_V6 if ip.version == 6 else GATEWAY_V4
            ips.append({"address": cidr(ip), "gateway": str(gw), "interface": 1})
        routes = []
        if any(ip.version == 6 for ip in self.addresses):
            routes.append({"dst": "::/0", "gw": str(GATEWAY_V6)})
        if any(ip.version == 4 for ip in self.addresses):
            routes.append({"dst": "0.0.0.0/0", "gw": str(GATEWAY_V4)})
        return {
            "interfaces": [
                {"name": self.host_ifname, "mac": self.host_mac, "mtu": self.mtu},
                {
                    "name": self.pod_ifname,
                    "mac": self.pod_mac,
                    "mtu": self.mtu,
                    "sandbox": self.sandbox,
                },
            ],
            "ips": ips,
            "routes": routes,
        }


@dataclass(frozen=True, slots=True)
class HostVeth:
    name: str
    index: int
    mac: str
    up: bool


@dataclass(frozen=True, slots=True)
class PodRoute:
    """One of our `<pod ip> dev <veth>` host routes."""

    dst: IPAddress
    ifname: str


@dataclass(frozen=True, slots=True)
class AnycastChange:
    added: tuple[IPAddress, ...] = ()
    replaced: tuple[IPAddress, ...] = ()
    removed: tuple[IPAddress, ...] = ()


# -- request planning -------------------------------------------------------------


def host_requests(spec: PodNetSpec, *, host_index: int, pod_mac: str) -> list[Request]:
    """Host side, after the veth exists: link settings, fe80::1, neighbours, pod routes."""
    name = spec.host_ifname
    reqs = [
        Request(
            rtnl.RTM_SETLINK,
            0,
            rtnl.link_set(
                index=host_index,
                up=True,
                addrgenmode_none=True,
                ipv4_conf={rtnl.IPV4_DEVCONF_PROXY_ARP: 1},
            ),
            f"set {name} up, addrgenmode none, proxy_arp 1",
        ),
        Request(
            rtnl.RTM_NEWADDR,
            rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
            rtnl.address(index=host_index, ip=GATEWAY_V6, prefixlen=HOST_LL_PREFIXLEN),
            f"add {GATEWAY_V6}/64 on {name}",
        ),
    ]
    for ip in spec.addresses:
        reqs.append(
            Request(
                rtnl.RTM_NEWNEIGH,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                rtnl.neighbour(index=host_index, ip=ip, mac=pod_mac),
                f"add neighbour {ip} lladdr {pod_mac} on {name}",
            )
        )
        reqs.append(
            Request(
                rtnl.RTM_NEWROUTE,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.pod_route(
                    dst=ip,
                    dst_len=prefixlen(ip),
                    family=rtnl.family_of(ip),
                    oif=host_index,
                    proto=RTPROT_FLOCK,
                    scope=rtnl.RT_SCOPE_LINK,
                ),
                f"add host route {cidr(ip)} dev {name}",
            )
        )
    return reqs


def pod_requests(
    spec: PodNetSpec, *, pod_index: int, host_mac: str, lo_index: int = 1
) -> list[Request]:
    """Pod side, in the pod's namespace: addresses, neighbours, default routes, anycast on lo."""
    ifn = spec.ifname
    reqs = [
        Request(
            rtnl.RTM_SETLINK,
            0,
            rtnl.link_set(index=pod_index, up=True, addrgenmode_none=True),
            f"set pod {ifn} up, addrgenmode none",
        )
    ]
    for ip in spec.addresses:
        reqs.append(
            Request(
                rtnl.RTM_NEWADDR,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.address(index=pod_index, ip=ip, prefixlen=prefixlen(ip)),
                f"add {cidr(ip)} on pod {ifn}",
            )
        )
    # Per family: the gateway's neighbour entry (the host veth's MAC), then the default route.
    # IPv4's gateway is link-local on no subnet of the pod's, hence onlink.
    families = (
        (spec.v6, GATEWAY_V6, socket.AF_INET6, False),
        (spec.v4, GATEWAY_V4, socket.AF_INET, True),
    )
    for primary, gw, family, onlink in families:
        if primary is None:
            continue
        reqs += [
            Request(
                rtnl.RTM_NEWNEIGH,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                rtnl.neighbour(index=pod_index, ip=gw, mac=host_mac),
                f"add neighbour {gw} lladdr {host_mac} on pod {ifn}",
            ),
            Request(
                rtnl.RTM_NEWROUTE,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.pod_route(
                    dst=None,
                    dst_len=0,
                    family=family,
                    oif=pod_index,
                    gateway=gw,
                    onlink=onlink,
                    proto=rtnl.RTPROT_STATIC,
                ),
                f"add default route via {gw} dev {ifn}{' onlink' if onlink else ''} in pod",
            ),
        ]
    if spec.anycast:
        reqs.append(
            Request(rtnl.RTM_SETLINK, 0, rtnl.link_set(index=lo_index, up=True), "set pod lo up")
        )
        for ip in dict.fromkeys(spec.anycast):
            reqs.append(
                Request(
                    rtnl.RTM_NEWADDR,
                    rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                    rtnl.address(index=lo_index, ip=ip, prefixlen=prefixlen(ip)),
                    f"add anycast {cidr(ip)} on pod lo",
                )
            )
    return reqs


def anycast_route_request(
    dst: IPAddress, hops: Sequence[tuple[IPAddress, int]], *, replace: bool
) -> Request:
    """`<anycast> via <pod ip> dev <veth>`, or one multipath route over several replicas."""
    flags = rtnl.NLM_F_CREATE | (rtnl.NLM_F_REPLACE if replace else rtnl.NLM_F_EXCL)
    ordered = sorted(hops, key=lambda h: (h[1], int(h[0])))
    if len(ordered) == 1:
        gw, oif = ordered[0]
        body = rtnl.route(
            dst=dst,
            dst_len=prefixlen(dst),
            family=rtnl.family_of(dst),
            oif=oif,
            gateway=gw,
            proto=RTPROT_FLOCK,
        )
    else:
        body = rtnl.route(
            dst=dst,
            dst_len=prefixlen(dst),
            family=rtnl.family_of(dst),
            multipath=ordered,
            proto=RTPROT_FLOCK,
        )
    via = ", ".join(f"{gw} ifindex {oif}" for gw, oif in ordered)
    return Request(rtnl.RTM_NEWROUTE, flags, body, f"set anycast route {cidr(dst)} via {via}")


def route_hops(r: rtnl.Route) -> frozenset[tuple[IPAddress | None, int]]:
    if r.multipath:
        return frozenset(r.multipath)
    return frozenset({(r.gateway, r.oif or 0)})


Hops = frozenset[tuple[IPAddress | None, int]]


def plan_anycast(
    want: Mapping[IPAddress, Hops], have: Mapping[IPAddress, Hops]
) -> tuple[list[Request], AnycastChange]:
    """Requests that turn our anycast routes `have` into `want` (dst -> {(via, ifindex)})."""
    reqs: list[Request] = []
    added: list[IPAddress] = []
    replaced: list[IPAddress] = []
    removed: list[IPAddress] = []
    for dst, hops in want.items():
        real = [(gw, oif) for gw, oif in hops if gw is not None]
        if not real:
            continue
        if dst not in have:
            reqs.append(anycast_route_request(dst, real, replace=False))
            added.append(dst)
        elif have[dst] != hops:
            reqs.append(anycast_route_request(dst, real, replace=True))
            replaced.append(dst)
    for dst in have:
        if dst not in want:
            reqs.append(anycast_route_delete(dst))
            removed.append(dst)
    return reqs, AnycastChange(tuple(added), tuple(replaced), tuple(removed))


def anycast_route_delete(dst: IPAddress) -> Request:
    body = rtnl.route(
        dst=dst, dst_len=prefixlen(dst), family=rtnl.family_of(dst), proto=RTPROT_FLOCK
    )
    return Request(rtnl.RTM_DELROUTE, 0, body, f"delete anycast route {cidr(dst)}")
