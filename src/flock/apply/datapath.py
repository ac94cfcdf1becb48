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

Teardown is the slow part in the kernel: unregistering a veth waits for RCU
(~30 ms here, whichever end is deleted; letting the runtime's netns deletion do
it is asynchronous but costs the same kernel time). `teardown_pod` therefore
cuts the pod off at once (link down: our routes and neighbours through it
vanish; anycast hops through it are removed, ~0.15 ms) and a background reaper
deletes retired veths by link group, at most 16 per group so that it holds RTNL
(which every ADD needs) for ~4 ms at a time, one RCU wait per group.

Everything flock puts in the host's routing table carries `RTPROT_FLOCK` (70),
so it is recognisably ours after a restart; host veths carry the `flk` prefix.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from flock.apply import rtnl
from flock.apply.nlsock import NetlinkError, RtnlSocket, write_sysctl
from flock.apply.podplan import (
    GATEWAY_V4,
    GATEWAY_V6,
    HOST_LL_PREFIXLEN,
    HOST_VETH_PREFIX,
    RTPROT_FLOCK,
    AnycastChange,
    DatapathError,
    Hops,
    HostVeth,
    IPAddress,
    PodNetResult,
    PodNetSpec,
    PodRoute,
    anycast_route_delete,
    anycast_route_request,
    cidr,
    host_requests,
    host_veth_name,
    plan_anycast,
    pod_requests,
    prefixlen,
    route_hops,
    veth_macs,
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
    "Datapath",
    "DatapathError",
    "HostVeth",
    "PodNetResult",
    "PodNetSpec",
    "PodRoute",
    "host_veth_name",
    "veth_macs",
]

log = logging.getLogger(__name__)

# Link groups of host veths that teardown has retired (down, routes gone) and the
# reaper has yet to delete: 0x666c6b00 ("flk") plus a batch slot 0-255. One
# RTM_DELLINK of a group unregisters all its links behind one RCU wait, so a
# batch costs about what one veth does (~20-30 ms, off the DEL path). Batches are
# capped at REAP_BATCH links because the unregister holds RTNL, which every ADD
# needs: measured here, 16 veths hold it ~4 ms, 64 veths ~19 ms.
RETIRED_GROUP = 0x666C6B00
RETIRED_MASK = 0xFFFFFF00
REAP_BATCH = 16
_GONE = (errno.ENODEV, errno.ENOENT)


def is_retired(group: int) -> bool:
    return group & RETIRED_MASK == RETIRED_GROUP


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
        self.reap_delay = reap_delay
        self.reap_pause = reap_pause
        self._manage_forwarding = manage_forwarding
        self._forwarding_done = False
        self._local = threading.local()
        self._lock = threading.Lock()
        # Held for a whole reaping round: a setup whose names clash with a retired
        # veth must wait until the round that took that veth has deleted it, not
        # return while another thread's round is still in progress.
        self._reap_lock = threading.Lock()
        # Host veth name -> ifindex, learnt at setup and from link dumps; an index
        # gone stale (a veth deleted behind our back) shows up as a failed request,
        # which drops the caches and retries from the kernel's own view.
        self._ifindex: dict[str, int] = {}
        # Our anycast routes as last applied (dst -> hops); None = read the kernel.
        self._anycast_lock = threading.Lock()
        self._anycast_have: dict[IPAddress, Hops] | None = None
        self._sockets: list[RtnlSocket] = []
        self._reap_wanted = threading.Event()
        self._stop = threading.Event()
        self._stopping = False
        self._reaper: threading.Thread | None = None
        # Retirement batches: the slot teardown fills now, how full it is, and the
        # slots holding retired veths (added once a retire has succeeded).
        self._slot = 0
        self._slot_fill = 0
        self._pending_slots: set[int] = set()
        # setup_pod calls in progress: the reaper lets them finish before taking RTNL.
        self._inflight = 0

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
        with self._lock:
            self._stopping = True
            reaper = self._reaper
        self._stop.set()
        self._reap_wanted.set()
        if reaper is not None:
            reaper.join()
        if self._pending_slots:  # retired while the reaper was finishing its last round
            try:
                self.reap()
            except Exception:
                log.exception("final reap of retired veths failed")
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
        with self._lock:
            self._inflight += 1
        try:
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
        finally:
            with self._lock:
                self._inflight -= 1

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
        with self._lock:
            self._ifindex[spec.host_ifname] = hlink.index
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
            if exc.errno in _GONE:
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
        with self._lock:
            self._ifindex.pop(name, None)
        try:
            link = host.get_link(name)
            if link is None:
                return False
            if link.kind != "veth":
                raise DatapathError(f"refusing to delete {name}: a {link.kind or 'non-veth'} link")
            retired_before = is_retired(link.group)
            if retired_before:
                with self._lock:
                    self._pending_slots.add(link.group & ~RETIRED_MASK)
            else:
                slot = self._take_slot()
                host.call(
                    Request(
                        rtnl.RTM_SETLINK,
                        0,
                        rtnl.link_retire(name=name, group=RETIRED_GROUP | slot),
                        f"set {name} down for deletion",
                    ),
                    ignore=_GONE,
                )
                with self._lock:
                    self._pending_slots.add(slot)
                self._drop_anycast_hops(host, link.index)
        except NetlinkError as exc:
            raise DatapathError(str(exc)) from exc
        if wait:
            self.reap()
        else:
            self._schedule_reap()
        return not retired_before

    def _drop_anycast_hops(self, host: RtnlSocket, index: int) -> None:
        """Take hops through link `index` out of our anycast routes (kernel-filtered dump)."""
        with self._anycast_lock:
            reqs: list[Request] = []
            changed: dict[IPAddress, Hops | None] = {}
            for fam in (socket.AF_INET6, socket.AF_INET):
                for r in host.routes(fam, proto=RTPROT_FLOCK, oif=index):
                    if r.dst is None or r.table != rtnl.RT_TABLE_MAIN:
                        continue
                    if r.gateway is None and not r.multipath:
                        continue  # a pod route: went with the link going down
                    left = [(gw, oif) for gw, oif in route_hops(r) if oif != index and gw]
                    if left:
                        reqs.append(anycast_route_request(r.dst, left, replace=True))
                        changed[r.dst] = frozenset(left)
                    else:
                        reqs.append(anycast_route_delete(r.dst))
                        changed[r.dst] = None
            errors = [e for e in host.batch(reqs) if e.errno != errno.ESRCH]
            if errors:
                self._anycast_have = None
                raise errors[0]
            if self._anycast_have is not None:
                for dst, hops in changed.items():
                    if hops is None:
                        self._anycast_have.pop(dst, None)
                    else:
                        self._anycast_have[dst] = hops

    def _take_slot(self) -> int:
        with self._lock:
            slot = self._slot
            self._slot_fill += 1
            if self._slot_fill >= REAP_BATCH:
                self._slot, self._slot_fill = (slot + 1) % 256, 0
            return slot

    def _schedule_reap(self) -> None:
        with self._lock:
            if self._stopping:
                reap_now = True
            else:
                reap_now = False
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap_loop, name="flock-veth-reaper", daemon=True
                    )
                    self._reaper.start()
        if reap_now:
            self.reap()
        else:
            self._reap_wanted.set()

    def _reap_loop(self) -> None:
        sock = RtnlSocket(self.host_netns)
        try:
            while True:
                self._reap_wanted.wait()
                self._stop.wait(self.reap_delay)  # gather a batch; close() cuts it short
                self._reap_wanted.clear()
                try:
                    self._reap_with(sock, pause=0.0 if self._stopping else self.reap_pause)
                except Exception:
                    log.exception("reaping retired veths failed; will retry on the next teardown")
                if self._stopping:
                    return
        finally:
            sock.close()

    def _reap_with(self, sock: RtnlSocket, *, pause: float = 0.0) -> None:
        with self._reap_lock:
            self._reap_round(sock, pause=pause)

    def _reap_round(self, sock: RtnlSocket, *, pause: float) -> None:
        with self._lock:
            slots = sorted(self._pending_slots)
            self._pending_slots.clear()
            if self._slot in slots:  # close the batch being filled
                self._slot, self._slot_fill = (self._slot + 1) % 256, 0
        try:
            for n, slot in enumerate(slots):
                if pause:
                    if n:
                        time.sleep(pause)
                    self._wait_for_quiet(limit=20 * pause)
                sock.call(
                    Request(
                        rtnl.RTM_DELLINK,
                        0,
                        rtnl.group_delete(RETIRED_GROUP | slot),
                        f"delete retired veths (batch {slot})",
                    ),
                    ignore=_GONE,
                )
        except BaseException:
            with self._lock:
                self._pending_slots.update(slots)
            raise

    def _wait_for_quiet(self, *, limit: float) -> None:
        """Let setups in progress finish (bounded by `limit` seconds) before taking RTNL."""
        deadline = time.monotonic() + limit
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.0005)

    def reap(self) -> None:
        """Delete every retired veth now (wait=True teardown, setup's name clashes, tests)."""
        try:
            self._reap_with(self._host())
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
            with self._lock:
                self._pending_slots.update(retired)
            self._schedule_reap()
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
        out: dict[IPAddress, tuple[tuple[IPAddress, str], ...]] = {}
        for r in routes:
            if r.dst is None or (r.gateway is None and not r.multipath):
                continue
            hops = sorted(
                ((gw, names.get(idx, f"#{idx}")) for gw, idx in route_hops(r) if gw is not None),
                key=lambda h: (int(h[0]), h[1]),
            )
            out[r.dst] = tuple(hops)
        return out

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

    # anycast ---------------------------------------------------------------------

    def reconcile_anycast(
        self,
        desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]],
        *,
        full: bool = False,
    ) -> AnycastChange:
        """Make our anycast host routes exactly `desired`: ip -> [(via pod unicast, veth)].

        One route per anycast IP; several hops make it one multipath route. Our
        routes not desired are removed; routes of other protocols are never
        touched. Hops whose veth is missing or retired are skipped (the pod is
        going away); an IP left with no hop is removed.

        Cost is O(changes): the routes last applied and veth indexes are cached.
        `full=True` (the agent's periodic resync) reads the kernel first. When a
        request fails, the caches are dropped and the whole reconcile runs once
        more from the kernel's view; a second failure raises DatapathError
        listing every failed change.
        """
        for dst, hops in desired.items():
            for gw, _ifname in hops:
                if gw.version != dst.version:
                    raise ValueError(f"anycast {dst}: next hop {gw} is of the other family")
        with self._anycast_lock:
            host = self._host()
            if not full and self._anycast_have is not None:
                change, errors = self._apply_anycast(host, desired, refresh=False)
                if not errors:
                    return change
                log.info("anycast reconcile from cache failed, rereading the kernel: %s", errors)
            change, errors = self._apply_anycast(host, desired, refresh=True)
            if errors:
                raise DatapathError("; ".join(str(e) for e in errors))
            return change

    def set_anycast(self, dst: IPAddress, hops: Sequence[tuple[IPAddress, str]]) -> bool:
        """One anycast IP's route, now: `hops` [(via pod unicast, veth)], none = no route.

        The O(1) path for a single readiness change (one request), next to the
        whole-set `reconcile_anycast`. Returns False when no hop's veth exists
        (then the route is removed).
        """
        for gw, _ifname in hops:
            if gw.version != dst.version:
                raise ValueError(f"anycast {dst}: next hop {gw} is of the other family")
        with self._anycast_lock:
            host = self._host()
            for attempt in (0, 1):
                index = self._indexes(host, {ifn for _gw, ifn in hops}, refresh=attempt == 1)
                resolved = frozenset((gw, index[ifn]) for gw, ifn in hops if ifn in index)
                if resolved:
                    req = anycast_route_request(dst, list(resolved), replace=True)
                else:
                    req = anycast_route_delete(dst)
                errors = [
                    e for e in host.batch([req]) if not (e.errno == errno.ESRCH and not resolved)
                ]
                if not errors:
                    if self._anycast_have is not None:
                        if resolved:
                            self._anycast_have[dst] = resolved
                        else:
                            self._anycast_have.pop(dst, None)
                    return bool(resolved)
                self._anycast_have = None
            raise DatapathError(str(errors[0]))

    def _apply_anycast(
        self,
        host: RtnlSocket,
        desired: Mapping[IPAddress, Sequence[tuple[IPAddress, str]]],
        *,
        refresh: bool,
    ) -> tuple[AnycastChange, list[NetlinkError]]:
        if refresh or self._anycast_have is None:
            self._anycast_have = self._read_anycast(host)
        names = {ifname for hops in desired.values() for _gw, ifname in hops}
        index = self._indexes(host, names, refresh=refresh)
        want: dict[IPAddress, Hops] = {}
        for dst, hops in desired.items():
            resolved = frozenset((gw, index[ifn]) for gw, ifn in hops if ifn in index)
            if resolved:
                want[dst] = resolved
        reqs, change = plan_anycast(want, self._anycast_have)
        errors = [
            e for e in host.batch(reqs) if not (e.errno == errno.ESRCH and "delete" in e.what)
        ]
        self._anycast_have = None if errors else want
        return change, errors

    def _read_anycast(self, host: RtnlSocket) -> dict[IPAddress, Hops]:
        return {
            r.dst: route_hops(r)
            for fam in (socket.AF_INET6, socket.AF_INET)
            for r in host.routes(fam, proto=RTPROT_FLOCK)
            if r.proto == RTPROT_FLOCK
            and r.table == rtnl.RT_TABLE_MAIN
            and r.dst is not None
            and (r.gateway is not None or r.multipath)
        }

    def _indexes(self, host: RtnlSocket, names: set[str], *, refresh: bool) -> dict[str, int]:
        """ifindex of each live (not retired) host link in `names`; absent ones are left out."""
        with self._lock:
            missing = refresh or any(n not in self._ifindex for n in names)
        if missing:
            fresh = {ln.name: ln.index for ln in host.links() if not is_retired(ln.group)}
            with self._lock:
                self._ifindex = fresh
        with self._lock:
            return {n: self._ifindex[n] for n in names if n in self._ifindex}
