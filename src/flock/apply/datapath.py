"""The kernel side of one pod attachment (SPEC §4): its links, addresses, routes, neighbours.

`Datapath` is what the agent's `Datapath` protocol names; behind it are three
concerns, each with its own state and lock: the pod links (setup, repair,
check, teardown, listing: this module), the veth reaper (`flock.apply.reaper`,
its own thread), and the node's anycast routes (`flock.apply.anycast`, its
cache). The pure request plans are `flock.apply.podplan`.

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

Teardown is the slow part in the kernel: unregistering a veth waits for RCU
(~30 ms here, whichever end is deleted; letting the runtime's netns deletion do
it is asynchronous but costs the same kernel time). `teardown_pod` therefore
cuts the pod off at once (link down: our routes and neighbours through it
vanish; anycast hops through it are removed, ~0.15 ms) and the reaper deletes
retired veths by link group, one RCU wait per group (`flock.apply.reaper`).

Everything flock puts in the host's routing table carries `RTPROT_FLOCK` (70),
so it is recognisably ours after a restart; host veths carry the `flk` prefix.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections.abc import Mapping, Sequence

from flock.apply import rtnl
from flock.apply.anycast import AnycastRoutes
from flock.apply.nlsock import NetlinkError, RtnlSocket, write_sysctl
from flock.apply.podplan import (
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_LL_PREFIXLEN,
    HOST_VETH_PREFIX,
    RTPROT_FLOCK,
    AnycastChange,
    DatapathError,
    HostVeth,
    IPAddress,
    PodNetResult,
    PodNetSpec,
    PodRoute,
    cidr,
    host_requests,
    host_veth_name,
    pod_requests,
    prefixlen,
    veth_macs,
)
from flock.apply.reaper import (
    GONE,
    REAP_BATCH,
    RETIRED_GROUP,
    RETIRED_MASK,
    VethReaper,
    is_retired,
)
from flock.apply.rtnl import Request

__all__ = [
    "GATEWAY_V4",
    "GATEWAY_V6",
    "HOST_VETH_PREFIX",
    "REAP_BATCH",
    "RETIRED_GROUP",
    "RTPROT_FLOCK",
    "AnycastChange",
    "AnycastRoutes",
    "Datapath",
    "DatapathError",
    "HostVeth",
    "PodNetResult",
    "PodNetSpec",
    "PodRoute",
    "VethReaper",
    "host_veth_name",
    "is_retired",
    "veth_macs",
]

log = logging.getLogger(__name__)


class Datapath:
    """Programs pods' veths and the node's anycast routes in one host namespace.

    `host_netns`: path of the host namespace, None for the caller's own.
    `reap_delay`: how long the background reaper gathers retired veths before
    deleting them (seconds); `reap_pause`: its pause between two batches, so
    that ADDs waiting for RTNL get their turn.
    """

    def __init__(
        self,
        *,
        host_netns: str | None = None,
        manage_forwarding: bool = True,
        reap_delay: float = 0.05,
        reap_pause: float = 0.005,
    ) -> None:
        self.host_netns = host_netns
        self._manage_forwarding = manage_forwarding
        self._forwarding_done = False
        self._local = threading.local()
        self._lock = threading.Lock()  # the socket list and forwarding; never across a syscall
        self._sockets: list[RtnlSocket] = []
        self.reaper = VethReaper(
            lambda: RtnlSocket(self.host_netns), delay=reap_delay, pause=reap_pause
        )
        self.anycast = AnycastRoutes(self._host)

    @property
    def reap_delay(self) -> float:
        return self.reaper.delay

    @reap_delay.setter
    def reap_delay(self, value: float) -> None:
        self.reaper.delay = value

    # sockets and lifecycle ------------------------------------------------------

    def _host(self) -> RtnlSocket:
        sock: RtnlSocket | None = getattr(self._local, "sock", None)
        if sock is None:
            sock = RtnlSocket(self.host_netns)
            self._local.sock = sock
            with self._lock:
                self._sockets.append(sock)
        return sock

    def close(self) -> None:
        """Stop the reaper after a last reap, and close every socket this object opened."""
        try:
            self.reaper.close(self._host())
        finally:
            with self._lock:
                for sock in self._sockets:
                    sock.close()
                self._sockets.clear()
            self._local = threading.local()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_forwarding(self) -> None:
        """IPv4 and IPv6 forwarding on in the host namespace (once per Datapath)."""
        if self._forwarding_done:
            return
        with self._lock:
            if not self._forwarding_done:
                write_sysctl(self.host_netns, "net.ipv4.ip_forward", "1")
                write_sysctl(self.host_netns, "net.ipv6.conf.all.forwarding", "1")
                self._forwarding_done = True

    # setup ---------------------------------------------------------------------

    def setup_pod(self, spec: PodNetSpec) -> PodNetResult:
        """Create and configure the attachment; on any failure nothing of it is left.

        Idempotent: for an attachment whose veth pair exists and is intact, only
        the missing pieces are put back (`_repair`); the pod's interfaces keep
        their ifindex and its traffic is not interrupted.
        """
        if self._manage_forwarding:
            self.ensure_forwarding()
        host = self._host()
        host_mac, pod_mac = veth_macs(spec.container_id, spec.ifname)
        with self.reaper.setup():
            if not self._create_veth(host, spec, host_mac=host_mac, pod_mac=pod_mac):
                # This attachment's veth pair already exists: a repeated ADD or the
                # start-up re-sync. Repair in place what is missing, so a running pod
                # keeps its interface (and its connections); rebuild only when the
                # pair itself is not intact.
                repaired = self._repair(host, spec, host_mac=host_mac, pod_mac=pod_mac)
                if repaired is not None:
                    return repaired
                self._recreate_veth(host, spec, host_mac=host_mac, pod_mac=pod_mac)
            try:
                return self._configure(host, spec, host_mac=host_mac, pod_mac=pod_mac)
            except BaseException:
                try:
                    self._delete_link(host, spec.host_ifname)
                except Exception:  # keep the original error; this one is only logged
                    log.exception("rollback: deleting veth %s failed", spec.host_ifname)
                raise

    def _veth_request(
        self, spec: PodNetSpec, netns_fd: int, *, host_mac: str, pod_mac: str
    ) -> Request:
        return Request(
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

    def _open_netns(self, spec: PodNetSpec) -> int:
        try:
            return os.open(spec.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DatapathError(f"cannot open pod netns {spec.netns}: {exc.strerror}") from exc

    def _create_veth(
        self, host: RtnlSocket, spec: PodNetSpec, *, host_mac: str, pod_mac: str
    ) -> bool:
        """Create the pair; False (nothing done) when a link of that name exists already."""
        netns_fd = self._open_netns(spec)
        try:
            host.call(self._veth_request(spec, netns_fd, host_mac=host_mac, pod_mac=pod_mac))
            return True
        except NetlinkError as exc:
            if exc.errno != errno.EEXIST:
                raise DatapathError(str(exc)) from exc
            return False
        finally:
            os.close(netns_fd)

    def _recreate_veth(
        self, host: RtnlSocket, spec: PodNetSpec, *, host_mac: str, pod_mac: str
    ) -> None:
        """Remove what holds the pair's names, then create it once more.

        A leftover of this same attachment (the host name derives from its
        container id) that is not intact, or a retired veth whose pod end still
        holds the name in the pod.
        """
        self._delete_link(host, spec.host_ifname)
        self.list_host_veths()  # queues retired veths, also those of an earlier agent
        self.reap()
        netns_fd = self._open_netns(spec)
        try:
            host.call(self._veth_request(spec, netns_fd, host_mac=host_mac, pod_mac=pod_mac))
        except NetlinkError as exc:
            if exc.errno == errno.EEXIST:
                raise DatapathError(
                    f"{spec.ifname} already exists in {spec.netns} and flock did not create it"
                ) from exc
            raise DatapathError(str(exc)) from exc
        finally:
            os.close(netns_fd)

    def _repair(
        self, host: RtnlSocket, spec: PodNetSpec, *, host_mac: str, pod_mac: str
    ) -> PodNetResult | None:
        """Put back what is missing of an existing attachment, touching nothing that is there.

        Only when the pair is intact: the host end is our live (not retired) veth
        with the attachment's MAC, and the pod end is in the pod's namespace under
        its name with the attachment's MAC (both MACs derive from the container id,
        so they identify this pair). The pod's and the host's requests are sent
        again: creations that find their object in place fail with EEXIST and
        change nothing (addresses and routes are created exclusively), links are
        set up only if they are not, neighbour entries are rewritten with the same
        address. Returns None (the caller rebuilds) when the pair is not intact
        or a piece cannot be put back.
        """
        hlink = host.get_link(spec.host_ifname)
        if (
            hlink is None
            or hlink.kind != "veth"
            or is_retired(hlink.group)
            or hlink.mac.lower() != host_mac.lower()
        ):
            return None
        try:
            with RtnlSocket(spec.netns) as pod:
                plink = pod.get_link(spec.ifname)
                if plink is None or plink.kind != "veth" or plink.mac.lower() != pod_mac.lower():
                    return None
                errors = pod.batch(pod_requests(spec, pod_index=plink.index, host_mac=host_mac))
            errors += host.batch(host_requests(spec, host_index=hlink.index, pod_mac=pod_mac))
        except (OSError, NetlinkError) as exc:
            log.info("repair of %s failed, rebuilding it: %s", spec.host_ifname, exc)
            return None
        errors = [e for e in errors if e.errno != errno.EEXIST]
        if errors:
            log.info(
                "repair of %s failed, rebuilding it: %s",
                spec.host_ifname,
                "; ".join(str(e) for e in errors),
            )
            return None
        return self._result(spec, hlink, plink, host_mac=host_mac, pod_mac=pod_mac)

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
        return self._result(spec, hlink, plink, host_mac=host_mac, pod_mac=pod_mac)

    def _result(
        self, spec: PodNetSpec, hlink: rtnl.Link, plink: rtnl.Link, *, host_mac: str, pod_mac: str
    ) -> PodNetResult:
        """What ADD reports for a configured (or repaired) pair; remembers the host ifindex."""
        self.anycast.remember(spec.host_ifname, hlink.index)
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

    def _delete_link(self, host: RtnlSocket, name: str) -> bool:
        """Delete host link `name` now (its veth peer goes with it); False when none existed."""
        try:
            host.call(Request(rtnl.RTM_DELLINK, 0, rtnl.link_by_name(name), f"delete veth {name}"))
        except NetlinkError as exc:
            if exc.errno in GONE:
                return False
            raise DatapathError(str(exc)) from exc
        return True

    # teardown ------------------------------------------------------------------

    def teardown_pod(
        self,
        *,
        container_id: str,
        ifname: str = "eth0",
        host_ifname: str = "",
        wait: bool = False,
    ) -> bool:
        """Remove the attachment; True when there was something to remove.

        Idempotent: an unknown container, a missing veth or an already-deleted
        netns is success. On return the pod is cut off: its host veth is down
        (which drops our host routes and neighbour entries through it) and every
        anycast route through it has lost that hop (a route with no hop left is
        deleted). The veth pair itself is deleted by a background reaper in
        batches, because unregistering a veth costs ~30 ms of RCU waiting
        whether one or fifty go at once; `wait=True` deletes it before returning.
        """
        name = host_ifname or host_veth_name(container_id, ifname)
        if not name.startswith(HOST_VETH_PREFIX):
            raise ValueError(f"refusing to delete {name!r}: not a flock veth")
        host = self._host()
        self.anycast.forget(name)
        try:
            link = host.get_link(name)
            if link is None:
                return False
            if link.kind != "veth":
                raise DatapathError(f"refusing to delete {name}: a {link.kind or 'non-veth'} link")
            retired_before = is_retired(link.group)
            if retired_before:
                self.reaper.retired(link.group & ~RETIRED_MASK)
            else:
                slot = self.reaper.take_slot()
                host.call(
                    Request(
                        rtnl.RTM_SETLINK,
                        0,
                        rtnl.link_retire(name=name, group=RETIRED_GROUP | slot),
                        f"set {name} down for deletion",
                    ),
                    ignore=GONE,
                )
                self.reaper.retired(slot)
                self.anycast.drop_hops(host, link.index)
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc
        if wait:
            self.reap()
        else:
            self.reaper.schedule(host)
        return not retired_before

    def reap(self) -> None:
        """Delete every retired veth now (wait=True teardown, setup's name clashes, tests)."""
        try:
            self.reaper.reap_now(self._host())
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc

    # check ---------------------------------------------------------------------

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
        if is_retired(hlink.group):
            out.append(f"host veth {hname} is being deleted")
        if not hlink.flags & rtnl.IFF_UP:
            out.append(f"host veth {hname} is down")
        addrs = [
            a for a in host.addrs(socket.AF_INET6, index=hlink.index) if a.index == hlink.index
        ]
        ll = [a for a in addrs if a.ip == GATEWAY_V6 and a.prefixlen == HOST_LL_PREFIXLEN]
        if not ll:
            out.append(f"{GATEWAY_V6}/64 missing on host veth {hname}")
        elif ll[0].flags & (rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED):
            out.append(f"{GATEWAY_V6}/64 on host veth {hname} is tentative or failed DAD")
        routes = {
            (r.dst, r.dst_len)
            for fam in {rtnl.family_of(ip) for ip in spec.addresses}
            for r in host.routes(fam, oif=hlink.index, table=rtnl.RT_TABLE_MAIN)
            if r.table == rtnl.RT_TABLE_MAIN and r.gateway is None and not r.multipath
        }
        neigh = {
            (n.ip, n.mac) for n in host.neighbours(index=hlink.index) if n.index == hlink.index
        }
        for ip in spec.addresses:
            if (ip, prefixlen(ip)) not in routes:
                out.append(f"host route {cidr(ip)} dev {hname} is missing")
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
            got = on_eth.get((ip, prefixlen(ip)))
            if got is None:
                out.append(f"address {cidr(ip)} missing on pod {ifn}")
            elif got.flags & (rtnl.IFA_F_TENTATIVE | rtnl.IFA_F_DADFAILED):
                out.append(f"address {cidr(ip)} on pod {ifn} is tentative or failed DAD")
        on_lo = {(a.ip, a.prefixlen) for a in addrs if a.index == 1}
        for ip in spec.anycast:
            if (ip, prefixlen(ip)) not in on_lo:
                out.append(f"anycast address {cidr(ip)} missing on pod lo")
        for fam, gw, present in (
            (socket.AF_INET6, GATEWAY_V6, spec.v6 is not None),
            (socket.AF_INET, GATEWAY_V4, spec.v4 is not None),
        ):
            if not present:
                continue
            defaults = [
                r
                for r in pod.routes(fam, oif=plink.index, table=rtnl.RT_TABLE_MAIN)
                if r.dst_len == 0 and r.table == rtnl.RT_TABLE_MAIN
            ]
            if not any(r.gateway == gw for r in defaults):
                out.append(f"default route via {gw} dev {ifn} missing in pod")
        neigh = {(n.ip, n.mac) for n in pod.neighbours(index=plink.index) if n.index == plink.index}
        for gw, present in ((GATEWAY_V6, spec.v6 is not None), (GATEWAY_V4, spec.v4 is not None)):
            if present and (gw, host_mac) not in neigh:
                out.append(f"pod neighbour {gw} lladdr {host_mac} on {ifn} is missing")
        return out

    # listing, for resync and GC ---------------------------------------------------

    def list_host_veths(self, *, include_retired: bool = False) -> list[HostVeth]:
        """Host veths with our name prefix; retired ones (awaiting the reaper) only on request.

        Retired veths seen here (e.g. left by an agent that died before its reaper ran)
        are handed to the reaper, so the start-up resync cleans them up by listing.
        """
        ours = [
            ln
            for ln in self._host().links()
            if ln.name.startswith(HOST_VETH_PREFIX) and ln.kind == "veth"
        ]
        retired = {ln.group & ~RETIRED_MASK for ln in ours if is_retired(ln.group)}
        if retired:
            # Retired before a restart (or not yet reaped): have them deleted.
            self.reaper.retired(*retired)
            self.reaper.schedule(self._host())
        return [
            HostVeth(name=ln.name, index=ln.index, mac=ln.mac, up=bool(ln.flags & rtnl.IFF_UP))
            for ln in ours
            if include_retired or not is_retired(ln.group)
        ]

    def _our_routes(self) -> tuple[list[rtnl.Route], dict[int, str]]:
        host = self._host()
        names = {ln.index: ln.name for ln in host.links()}
        routes = [
            r
            for fam in (socket.AF_INET6, socket.AF_INET)
            for r in host.routes(fam, proto=RTPROT_FLOCK)
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
        return self.anycast.listing(routes, names)

    def delete_pod_route(self, route: PodRoute) -> None:
        """Remove one leftover pod host route of ours (GC); missing is success."""
        host = self._host()
        link = host.get_link(route.ifname)
        body = rtnl.route(
            dst=route.dst,
            dst_len=prefixlen(route.dst),
            family=rtnl.family_of(route.dst),
            oif=link.index if link else None,
            proto=RTPROT_FLOCK,
            scope=rtnl.RT_SCOPE_LINK,
        )
        try:
            host.call(
                Request(rtnl.RTM_DELROUTE, 0, body, f"delete host route {cidr(route.dst)}"),
                ignore=(errno.ESRCH, errno.ENOENT),
            )
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc

    # anycast (flock.apply.anycast) -----------------------------------------------

    def reconcile_anycast(
        self,
        desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]],
        *,
        full: bool = False,
    ) -> AnycastChange:
        """`AnycastRoutes.reconcile`: our anycast host routes made exactly `desired`."""
        return self.anycast.reconcile(desired, full=full)

    def set_anycast(self, dst: IPAddress, hops: Sequence[tuple[IPAddress, str]]) -> bool:
        """`AnycastRoutes.set_route`: one anycast IP's route, now."""
        return self.anycast.set_route(dst, hops)
