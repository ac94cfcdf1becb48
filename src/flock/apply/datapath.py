"""The kernel side of one pod attachment (SPEC §4), plus the node's anycast routes.

The agent calls these from a thread pool; every function blocks, and calls for
different pods may run concurrently (each thread gets its own netlink socket,
the kernel serialises under RTNL). "Host" is the agent's own network namespace
unless a `host_netns` path is given (tests, the lab).

Layout of one attachment:

    pod netns                              host netns
    eth0  <pod v6>/128, <pod v4>/32  <==>  flk<hash>  fe80::1/64, addrgenmode none, proxy_arp
          default via fe80::1                          <pod ip> dev flk<hash>   (per pod address)
          default via 169.254.1.1 onlink               <anycast> via <pod ip> dev flk<hash>
    lo    <anycast>/128, <anycast>/32

Why it is fast (kernel floor ~0.7 ms):
- the veth peer is created directly inside the pod's namespace (IFLA_NET_NS_FD),
  never moved (a move costs 15-20 ms);
- both ends get MAC addresses we choose, so the neighbour entries that spare the
  first packet an ARP/NDP round trip (pod: gateways -> host MAC; host: pod
  addresses -> pod MAC, all NUD_PERMANENT) go out in the same batch;
- IPv6 addresses carry IFA_F_NODAD and both ends use addrgenmode none, so no
  address is ever tentative (no kernel link-local on either end: nothing needs it,
  and it would otherwise sit in DAD for a second);
- the pod namespace is programmed over a netlink socket opened in it by a
  thread-local setns (no fork), in one batched datagram.

Everything flock puts in the host's routing table carries `RTPROT_FLOCK`, so
it is recognisably ours after a restart.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flock.apply import rtnl
from flock.apply.nlsock import NetlinkError, Request, RtnlSocket, write_sysctl

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Our route protocol number (iproute2 rt_protos leaves 70 unassigned; 'F' for flock).
# Every host route flock installs carries it; reconcile/GC only ever touch these.
RTPROT_FLOCK = 70
HOST_VETH_PREFIX = "flk"
GATEWAY_V6 = ipaddress.IPv6Address("fe80::1")
GATEWAY_V4 = ipaddress.IPv4Address("169.254.1.1")
_HOST_LL_PREFIXLEN = 64
_DEFAULT_V6 = ipaddress.IPv6Address("::")
_DEFAULT_V4 = ipaddress.IPv4Address("0.0.0.0")
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


def _prefixlen(ip: IPAddress) -> int:
    return 128 if ip.version == 6 else 32


def _cidr(ip: IPAddress) -> str:
    return f"{ip}/{_prefixlen(ip)}"


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
        if not self.ifname or len(self.ifname) > IFNAMSIZ or "/" in self.ifname:
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
            if len(self.host_ifname) > IFNAMSIZ:
                raise ValueError(f"PodNetSpec: host interface name {self.host_ifname!r} too long")
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
    def from_allocation(cls, alloc: Any, *, mtu: int | None = None) -> PodNetSpec:
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
            ips.append({"address": _cidr(ip), "gateway": str(gw), "interface": 1})
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


# -- pure planning ----------------------------------------------------------------


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
            rtnl.address(index=host_index, ip=GATEWAY_V6, prefixlen=_HOST_LL_PREFIXLEN),
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
                rtnl.route(
                    dst=ip,
                    dst_len=_prefixlen(ip),
                    family=rtnl.family_of(ip),
                    oif=host_index,
                    proto=RTPROT_FLOCK,
                    scope=rtnl.RT_SCOPE_LINK,
                ),
                f"add host route {_cidr(ip)} dev {name}",
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
                rtnl.address(index=pod_index, ip=ip, prefixlen=_prefixlen(ip)),
                f"add {_cidr(ip)} on pod {ifn}",
            )
        )
    if spec.v6 is not None:
        reqs += [
            Request(
                rtnl.RTM_NEWNEIGH,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                rtnl.neighbour(index=pod_index, ip=GATEWAY_V6, mac=host_mac),
                f"add neighbour {GATEWAY_V6} lladdr {host_mac} on pod {ifn}",
            ),
            Request(
                rtnl.RTM_NEWROUTE,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.route(
                    dst=None,
                    dst_len=0,
                    family=socket.AF_INET6,
                    oif=pod_index,
                    gateway=GATEWAY_V6,
                    proto=rtnl.RTPROT_STATIC,
                ),
                f"add default route via {GATEWAY_V6} dev {ifn} in pod",
            ),
        ]
    if spec.v4 is not None:
        reqs += [
            Request(
                rtnl.RTM_NEWNEIGH,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_REPLACE,
                rtnl.neighbour(index=pod_index, ip=GATEWAY_V4, mac=host_mac),
                f"add neighbour {GATEWAY_V4} lladdr {host_mac} on pod {ifn}",
            ),
            Request(
                rtnl.RTM_NEWROUTE,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.route(
                    dst=None,
                    dst_len=0,
                    family=socket.AF_INET,
                    oif=pod_index,
                    gateway=GATEWAY_V4,
                    onlink=True,
                    proto=rtnl.RTPROT_STATIC,
                ),
                f"add default route via {GATEWAY_V4} dev {ifn} onlink in pod",
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
                    rtnl.address(index=lo_index, ip=ip, prefixlen=_prefixlen(ip)),
                    f"add anycast {_cidr(ip)} on pod lo",
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
            dst_len=_prefixlen(dst),
            family=rtnl.family_of(dst),
            oif=oif,
            gateway=gw,
            proto=RTPROT_FLOCK,
        )
    else:
        body = rtnl.route(
            dst=dst,
            dst_len=_prefixlen(dst),
            family=rtnl.family_of(dst),
            multipath=ordered,
            proto=RTPROT_FLOCK,
        )
    via = ", ".join(f"{gw} ifindex {oif}" for gw, oif in ordered)
    return Request(rtnl.RTM_NEWROUTE, flags, body, f"set anycast route {_cidr(dst)} via {via}")


def route_hops(r: rtnl.Route) -> frozenset[tuple[IPAddress | None, int]]:
    if r.multipath:
        return frozenset(r.multipath)
    return frozenset({(r.gateway, r.oif or 0)})


# -- kernel ------------------------------------------------------------------------


class Datapath:
    """Programs pods' veths and the node's anycast routes in one host namespace."""

    def __init__(self, *, host_netns: str | None = None, manage_forwarding: bool = True) -> None:
        self.host_netns = host_netns
        self._local = threading.local()
        self._manage_forwarding = manage_forwarding
        self._forwarding_done = False
        self._lock = threading.Lock()

    # sockets ------------------------------------------------------------------

    def _host(self) -> RtnlSocket:
        sock: RtnlSocket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = RtnlSocket(self.host_netns)
            self._local.sock = sock
        return sock

    def close(self) -> None:
        """Close this thread's host socket (others close with their threads)."""
        sock: RtnlSocket | None = getattr(self._local, "sock", None)
        if sock is not None:
            sock.close()
            self._local.sock = None

    def ensure_forwarding(self) -> None:
        """IPv4 and IPv6 forwarding on in the host namespace (once per Datapath)."""
        if self._forwarding_done:
            return
        with self._lock:
            if not self._forwarding_done:
                write_sysctl(self.host_netns, "net.ipv4.ip_forward", "1")
                write_sysctl(self.host_netns, "net.ipv6.conf.all.forwarding", "1")
                self._forwarding_done = True

    # pods ---------------------------------------------------------------------

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult:
        """Create and configure the attachment; on any failure nothing of it is left."""
        if self._manage_forwarding:
            self.ensure_forwarding()
        host = self._host()
        host_mac, pod_mac = veth_macs(spec.container_id, spec.ifname)
        try:
            netns_fd = os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatapathError(f"cannot open pod netns {spec.netns}: {exc.strerror}") from exc
        try:
            create = Request(
                rtnl.RTM_NEWLINK,
                rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL,
                rtnl.veth_new(
                    name=spec.host_ifname,
                    mac=host_mac,
                    peer_name=spec.ifname,
                    peer_mac=pod_mac,
                    peer_netns_fd=netns_fd,
                    mtu=spec.mtu,
                ),
                f"create veth {spec.host_ifname} <-> {spec.ifname} in {spec.netns}",
            )
            try:
                host.call(create)
            except NetlinkError as exc:
                if exc.errno != errno.EEXIST:
                    raise DatapathError(str(exc)) from exc
                # A leftover of an earlier attempt for this same attachment (the name is
                # derived from its container id): remove it, then try once more.
                if not self._delete_host_link(host, spec.host_ifname):
                    raise DatapathError(
                        f"{spec.ifname} already exists in {spec.netns}: not created by flock"
                    ) from exc
                try:
                    host.call(create)
                except NetlinkError as exc2:
                    raise DatapathError(str(exc2)) from exc2
        finally:
            os.close(netns_fd)
        try:
            return self._configure(host, spec, host_mac=host_mac, pod_mac=pod_mac)
        except BaseException:
            self._delete_host_link(host, spec.host_ifname)
            raise

    def _configure(
        self, host: RtnlSocket, spec: PodNetSpec, *, host_mac: str, pod_mac: str
    ) -> PodNetResult:
        hlink = host.get_link(spec.host_ifname)
        if hlink is None:
            raise DatapathError(f"veth {spec.host_ifname} vanished right after creation")
        try:
            with RtnlSocket(spec.netns) as pod:
                plink = pod.get_link(spec.ifname)
                if plink is None:
                    raise DatapathError(f"{spec.ifname} missing in {spec.netns} after creation")
                pod.run(pod_requests(spec, pod_index=plink.index, host_mac=host_mac))
            host.run(host_requests(spec, host_index=hlink.index, pod_mac=pod_mac))
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc
        return PodNetResult(
            host_ifname=spec.host_ifname,
            host_mac=host_mac,
            host_index=hlink.index,
            pod_ifname=spec.ifname,
            pod_mac=pod_mac,
            pod_index=plink.index,
            sandbox=spec.netns,
            mtu=hlink.mtu,
            addresses=spec.addresses,
        )

    def _delete_host_link(self, host: RtnlSocket, name: str) -> bool:
        """Delete our host veth `name` (its pod peer goes with it); False when none existed."""
        try:
            host.call(Request(rtnl.RTM_DELLINK, 0, rtnl.link_by_name(name), f"delete veth {name}"))
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    def teardown_pod(
        self, *, container_id: str, ifname: str = "eth0", host_ifname: str = ""
    ) -> bool:
        """Remove the attachment; True when there was something to remove.

        Idempotent: an unknown container, a missing veth or an already-deleted
        netns is success. Deleting the host end removes the pair, the pod's
        addresses and routes, and our host routes and neighbour entries through it.
        Anycast routes through it go too (IPv4 drops a whole multipath route when
        one hop's device disappears): call `reconcile_anycast` afterwards.
        """
        name = host_ifname or host_veth_name(container_id, ifname)
        if not name.startswith(HOST_VETH_PREFIX):
            raise ValueError(f"refusing to delete {name!r}: not a flock veth")
        try:
            return self._delete_host_link(self._host(), name)
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc

    def check_pod(self, spec: PodNetSpec) -> list[str]:
        """Problems with the attachment, human-readable; empty when everything is in place."""
        problems: list[str] = []
        host = self._host()
        hname = spec.host_ifname
        hlink = host.get_link(hname)
        host_mac, pod_mac = veth_macs(spec.container_id, spec.ifname)
        if hlink is None:
            problems.append(f"host veth {hname} is missing")
        else:
            problems += self._check_host(host, spec, hlink, pod_mac)
        if not os.path.exists(spec.netns):
            problems.append(f"pod netns {spec.netns} is missing")
            return problems
        try:
            with RtnlSocket(spec.netns) as pod:
                problems += self._check_pod_ns(pod, spec, host_mac)
        except OSError as exc:
            problems.append(f"cannot inspect pod netns {spec.netns}: {exc}")
        return problems

    def _check_host(
        self, host: RtnlSocket, spec: PodNetSpec, hlink: rtnl.Link, pod_mac: str
    ) -> list[str]:
        out: list[str] = []
        hname = spec.host_ifname
        if hlink.kind != "veth":
            out.append(f"host interface {hname} is a {hlink.kind or 'non-veth'}, not a veth")
        if not hlink.flags & rtnl.IFF_UP:
            out.append(f"host veth {hname} is down")
        addrs = [a for a in host.addrs(socket.AF_INET6) if a.index == hlink.index]
        ll = [a for a in addrs if a.ip == GATEWAY_V6 and a.prefixlen == _HOST_LL_PREFIXLEN]
        if not ll:
            out.append(f"{GATEWAY_V6}/64 missing on host veth {hname}")
        elif ll[0].flags & (rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED):
            out.append(f"{GATEWAY_V6}/64 on host veth {hname} is tentative or failed DAD")
        routes = {
            (r.dst, r.dst_len)
            for fam in {rtnl.family_of(ip) for ip in spec.addresses}
            for r in host.routes(fam)
            if r.oif == hlink.index and r.table == rtnl.RT_TABLE_MAIN and r.gateway is None
        }
        neigh = {(n.ip, n.mac) for n in host.neighbours() if n.index == hlink.index}
        for ip in spec.addresses:
            if (ip, _prefixlen(ip)) not in routes:
                out.append(f"host route {_cidr(ip)} dev {hname} is missing")
            if (ip, pod_mac) not in neigh:
                out.append(f"host neighbour {ip} lladdr {pod_mac} on {hname} is missing")
        return out

    def _check_pod_ns(self, pod: RtnlSocket, spec: PodNetSpec, host_mac: str) -> list[str]:
        out: list[str] = []
        ifn = spec.ifname
        plink = pod.get_link(ifn)
        if plink is None:
            return [f"{ifn} is missing in pod netns {spec.netns}"]
        if not plink.flags & rtnl.IFF_UP:
            out.append(f"pod {ifn} is down")
        addrs = pod.addrs()
        on_eth = {(a.ip, a.prefixlen): a for a in addrs if a.index == plink.index}
        for ip in spec.addresses:
            got = on_eth.get((ip, _prefixlen(ip)))
            if got is None:
                out.append(f"address {_cidr(ip)} missing on pod {ifn}")
            elif got.flags & (rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED):
                out.append(f"address {_cidr(ip)} on pod {ifn} is tentative or failed DAD")
        on_lo = {(a.ip, a.prefixlen) for a in addrs if a.index == 1}
        for ip in spec.anycast:
            if (ip, _prefixlen(ip)) not in on_lo:
                out.append(f"anycast address {_cidr(ip)} missing on pod lo")
        for fam, gw, present in (
            (socket.AF_INET6, GATEWAY_V6, spec.v6 is not None),
            (socket.AF_INET, GATEWAY_V4, spec.v4 is not None),
        ):
            if not present:
                continue
            defaults = [
                r
                for r in pod.routes(fam)
                if r.dst_len == 0 and r.table == rtnl.RT_TABLE_MAIN and r.oif == plink.index
            ]
            if not any(r.gateway == gw for r in defaults):
                out.append(f"default route via {gw} dev {ifn} missing in pod")
        return out

    # listing, for resync and GC ---------------------------------------------------

    def list_host_veths(self) -> list[HostVeth]:
        """Every host interface with our prefix (veths flock created)."""
        return [
            HostVeth(name=ln.name, index=ln.index, mac=ln.mac, up=bool(ln.flags & rtnl.IFF_UP))
            for ln in self._host().links()
            if ln.name.startswith(HOST_VETH_PREFIX) and ln.kind == "veth"
        ]

    def _our_routes(self) -> tuple[list[rtnl.Route], dict[int, str]]:
        host = self._host()
        names = {ln.index: ln.name for ln in host.links()}
        routes = [
            r
            for fam in (socket.AF_INET6, socket.AF_INET)
            for r in host.routes(fam)
            if r.proto == RTPROT_FLOCK and r.table == rtnl.RT_TABLE_MAIN and r.dst is not None
        ]
        return routes, names

    def list_pod_routes(self) -> list[PodRoute]:
        """Our `<pod ip> dev <veth>` host routes."""
        routes, names = self._our_routes()
        return [
            PodRoute(dst=r.dst, ifname=names.get(r.oif or 0, f"#{r.oif}"))
            for r in routes
            if r.dst is not None and r.gateway is None and not r.multipath
        ]

    def list_anycast_routes(self) -> dict[IPAddress, tuple[tuple[IPAddress, str], ...]]:
        """Our anycast routes: destination -> sorted (via pod unicast, host veth name)."""
        routes, names = self._our_routes()
        out: dict[IPAddress, tuple[tuple[IPAddress, str], ...]] = {}
        for r in routes:
            if r.dst is None or (r.gateway is None and not r.multipath):
                continue
            hops = sorted(
                (gw, names.get(idx, f"#{idx}")) for gw, idx in route_hops(r) if gw is not None
            )
            out[r.dst] = tuple(hops)
        return out

    def delete_pod_route(self, route: PodRoute) -> None:
        """Remove one leftover pod host route of ours (GC); missing is success."""
        host = self._host()
        link = host.get_link(route.ifname)
        body = rtnl.route(
            dst=route.dst,
            dst_len=_prefixlen(route.dst),
            family=rtnl.family_of(route.dst),
            oif=link.index if link else None,
            proto=RTPROT_FLOCK,
            scope=rtnl.RT_SCOPE_LINK,
        )
        host.call(
            Request(rtnl.RTM_DELROUTE, 0, body, f"delete host route {_cidr(route.dst)}"),
            ignore=(errno.ESRCH, errno.ENOENT),
        )

    # anycast ---------------------------------------------------------------------

    def reconcile_anycast(
        self, desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]]
    ) -> AnycastChange:
        """Make our anycast host routes exactly `desired`: ip -> [(via pod unicast, veth)].

        One route per anycast IP; several hops make it multipath. Our routes not
        desired are removed; routes of other protocols are never touched. Hops whose
        veth does not exist are skipped (the pod is going away); an IP left with no
        hop is removed. Raises DatapathError listing every failure after trying all.
        """
        host = self._host()
        index = {ln.name: ln.index for ln in host.links()}
        want: dict[IPAddress, frozenset[tuple[IPAddress, int]]] = {}
        for dst, hops in desired.items():
            resolved = set()
            for gw, ifname in hops:
                if gw.version != dst.version:
                    raise ValueError(f"anycast {dst}: next hop {gw} is of the other family")
                if ifname in index:
                    resolved.add((gw, index[ifname]))
            if resolved:
                want[dst] = frozenset(resolved)
        routes, _names = self._our_routes()
        have = {
            r.dst: route_hops(r)
            for r in routes
            if r.dst is not None and (r.gateway is not None or r.multipath)
        }
        reqs: list[Request] = []
        added: list[IPAddress] = []
        replaced: list[IPAddress] = []
        removed: list[IPAddress] = []
        for dst, want_hops in want.items():
            if dst not in have:
                reqs.append(anycast_route_request(dst, list(want_hops), replace=False))
                added.append(dst)
            elif have[dst] != want_hops:
                reqs.append(anycast_route_request(dst, list(want_hops), replace=True))
                replaced.append(dst)
        for dst in have:
            if dst not in want:
                body = rtnl.route(
                    dst=dst,
                    dst_len=_prefixlen(dst),
                    family=rtnl.family_of(dst),
                    proto=RTPROT_FLOCK,
                )
                reqs.append(
                    Request(rtnl.RTM_DELROUTE, 0, body, f"delete anycast route {_cidr(dst)}")
                )
                removed.append(dst)
        errors = [
            e for e in host.batch(reqs) if e.errno not in (errno.ESRCH,) or "delete" not in e.what
        ]
        if errors:
            raise DatapathError("; ".join(str(e) for e in errors))
        return AnycastChange(tuple(added), tuple(replaced), tuple(removed))
