"""Anycast withdraw latency through BIRD to a real FRR router, per export mechanism.

From "the agent decides to withdraw" (the call into BirdController) to
  (a) the BGP UPDATE carrying the withdrawal on the wire to the router
      (kernel receive timestamp of the packet on the router-side veth,
      captured with an AF_PACKET socket and SO_TIMESTAMPNS), and
  (b) the route gone from the router: zebra deleting FRR's best path from the
      router's kernel table (RTM_DELROUTE seen on a netlink socket in the
      router's namespace), i.e. after bgpd's table changed.
with 1, 100, 1,000 and 10,000 /128s advertised, for the mechanisms:
  kernel-update  per-pod routes in a kernel table BIRD learns; agent calls update(remove=...)
  kernel-sync    same table; agent calls sync(node, full_set - {p}) (full O(n) diff)
  static         per-pod routes as static routes in the config; re-render + `configure`
"FRR own" is (b) - (a): FRR's processing between the UPDATE and its table, the
floor no node-side mechanism can remove. Also: time to bring 10,000 routes up
from a cold start.

Run as root: `.venv/bin/python bench/bench_withdraw.py [--trials N] [--sizes 1,100]`.
Everything lives in namespaces named fbw*, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ipaddress
import os
import random
import shutil
import socket
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flock.apply import rtnl
from flock.apply.bird import BirdController
from flock.apply.nlsock import socket_in
from flock.compile.bird import Mechanism, Options
from flock.model.nodeconfig import NodeConfig
from flock.testbed import netns
from flock.testbed.bird import BirdDaemon
from flock.testbed.frr import FrrRouter, Neighbor, router_config

N = ipaddress.ip_network
ROUTER_V6, NODE_V6 = "2001:db8:1::1", "2001:db8:1::2"
ANYCAST_BASE = int(ipaddress.IPv6Address("2001:db8:a::"))
SO_TIMESTAMPNS = 35
ETH_P_ALL = 0x0003
RTMGRP_IPV6_ROUTE = 0x400
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside namespace `name` (this thread setns'es there and back)."""
    target = os.open(netns.path(name), os.O_RDONLY)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if _libc.setns(target, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            return make()
        finally:
            if _libc.setns(own, 0x40000000) != 0:
                raise SystemExit("cannot return to own netns")
    finally:
        os.close(target)
        os.close(own)


def parse_prefixes(data: bytes, version: int) -> list[str]:
    out, i = [], 0
    width = 16 if version == 6 else 4
    while i < len(data):
        plen = data[i]
        n = (plen + 7) // 8
        raw = data[i + 1 : i + 1 + n].ljust(width, b"\0")
        out.append(f"{ipaddress.ip_address(raw)}/{plen}")
        i += 1 + n
    return out


def bgp_withdrawals(payload: bytes) -> list[str]:
    """Prefixes withdrawn by the BGP UPDATEs in one TCP payload (v4 field and MP_UNREACH)."""
    out: list[str] = []
    off = 0
    while off + 19 <= len(payload) and payload[off : off + 16] == b"\xff" * 16:
        length, kind = struct.unpack_from("!HB", payload, off + 16)
        if length < 19 or off + length > len(payload):
            break
        if kind == 2:
            msg = payload[off + 19 : off + length]
            wlen = struct.unpack_from("!H", msg, 0)[0]
            out += parse_prefixes(msg[2 : 2 + wlen], 4)
            alen = struct.unpack_from("!H", msg, 2 + wlen)[0]
            attrs = msg[4 + wlen : 4 + wlen + alen]
            a = 0
            while a + 3 <= len(attrs):
                flags, atype = attrs[a], attrs[a + 1]
                if flags & 0x10:
                    alen_, hdr = struct.unpack_from("!H", attrs, a + 2)[0], 4
                else:
                    alen_, hdr = attrs[a + 2], 3
                if atype == 15:  # MP_UNREACH_NLRI
                    val = attrs[a + hdr : a + hdr + alen_]
                    afi = struct.unpack_from("!H", val, 0)[0]
                    out += parse_prefixes(val[3:], 6 if afi == 2 else 4)
                a += hdr + alen_
        off += length
    return out


class Watch:
    """Background threads recording when each prefix is withdrawn on the wire / leaves the FIB."""

    def __init__(self, router_ns: str, ifname: str, node_ip: str) -> None:
        self.node_ip = ipaddress.IPv6Address(node_ip).packed
        self.lock = threading.Condition()
        self.wire: dict[str, int] = {}
        self.fib_del: dict[str, int] = {}
        self.fib_add: dict[str, int] = {}
        self.stop = False

        def packet() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.settimeout(0.2)
            return s

        self.pkt = in_netns(router_ns, packet)
        self.nl = socket_in(netns.path(router_ns))
        self.nl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.nl.bind((0, RTMGRP_IPV6_ROUTE))
        self.nl.settimeout(0.2)
        self.threads = [
            threading.Thread(target=self._capture, daemon=True),
            threading.Thread(target=self._routes, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop = True
        for t in self.threads:
            t.join()
        self.pkt.close()
        self.nl.close()

    def _capture(self) -> None:
        while not self.stop:
            try:
                data, anc, _flags, _addr = self.pkt.recvmsg(65536, 256)
            except TimeoutError:
                continue
            if len(data) < 74 or data[12:14] != b"\x86\xdd" or data[20] != 6:
                continue
            if data[22:38] != self.node_ip:
                continue
            tcp = data[54:]
            if 179 not in struct.unpack_from("!HH", tcp, 0):
                continue
            payload = tcp[(tcp[12] >> 4) * 4 :]
            if not payload:
                continue
            ts = next(
                (
                    struct.unpack("qq", d[:16])
                    for lvl, typ, d in anc
                    if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS
                ),
                None,
            )
            now = ts[0] * 1_000_000_000 + ts[1] if ts else time.time_ns()
            gone = bgp_withdrawals(payload)
            if gone:
                with self.lock:
                    for p in gone:
                        self.wire.setdefault(p, now)
                    self.lock.notify_all()

    def _routes(self) -> None:
        while not self.stop:
            try:
                data = self.nl.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:  # ENOBUFS during a 10k burst: events lost, not a trial's
                continue
            now = time.time_ns()
            with self.lock:
                for reply in rtnl.split(data):
                    if reply.kind not in (rtnl.RTM_NEWROUTE, rtnl.RTM_DELROUTE):
                        continue
                    r = rtnl.parse_route(reply.body)
                    if r.dst is None or r.dst_len != 128:
                        continue
                    key = f"{r.dst}/128"
                    target = self.fib_del if reply.kind == rtnl.RTM_DELROUTE else self.fib_add
                    target.setdefault(key, now)
                self.lock.notify_all()

    def forget(self, prefix: str) -> None:
        with self.lock:
            self.wire.pop(prefix, None)
            self.fib_del.pop(prefix, None)
            self.fib_add.pop(prefix, None)

    def wait(self, what: Callable[[], bool], timeout: float = 5.0) -> bool:
        with self.lock:
            return self.lock.wait_for(what, timeout)


def node_config() -> NodeConfig:
    return NodeConfig.from_object(
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": "bench"},
            "spec": {
                "cidr6": ["2001:db8:f001::/64"],
                "allowedAddresses": [{"cidr": "2001:db8:a::/48"}],
                "bgp": {"asn": 65101, "peers": [{"address": ROUTER_V6, "asn": 65000}]},
            },
        }
    )


def prefixes(n: int) -> list[ipaddress.IPv6Network]:
    return [N(f"{ipaddress.IPv6Address(ANYCAST_BASE + i + 1)}/128") for i in range(n)]


def received(router: FrrRouter) -> int:
    data = router.vtysh_json("show bgp ipv6 unicast summary json", daemon="bgpd") or {}
    peer = (data.get("peers") or {}).get(NODE_V6) or {}
    if peer.get("state") != "Established":
        return -1
    return int(peer.get("pfxRcd", 0))


def wait_received(
    router: FrrRouter, n: int, timeout: float = 120.0, *, at_least: bool = False
) -> float:
    """Seconds until FRR has received exactly (or at least) n prefixes from the node."""
    t0 = time.monotonic()
    while not (received(router) >= n if at_least else received(router) == n):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"FRR did not reach {n} prefixes (has {received(router)})")
        time.sleep(0.05)
    return time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.rns = netns.unique_name("fbwr", 8)
        self.nns = netns.unique_name("fbwn", 8)
        self.made: list[str] = []
        for ns in (self.rns, self.nns):
            netns.create(ns, forwarding=True)
            self.made.append(ns)
            netns.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
        netns.veth(self.rns, "r1", self.nns, "up0")
        netns.add_address(self.rns, "r1", f"{ROUTER_V6}/64")
        netns.add_address(self.nns, "up0", f"{NODE_V6}/64")
        self.router = FrrRouter(self.rns, workdir / "router", daemons=("zebra", "bgpd"))
        self.router.start(
            router_config(
                asn=65000,
                router_id=ipaddress.IPv4Address("10.0.0.254"),
                neighbors=[Neighbor(ipaddress.ip_address(NODE_V6), 65101)],
            )
        )
        self.watch = Watch(self.rns, "r1", NODE_V6)
        self.node = node_config()

    def close(self) -> None:
        self.watch.close()
        self.router.stop()
        for ns in reversed(self.made):
            netns.delete(ns)

    async def run_mechanism(
        self, name: str, sizes: list[int], trials: int, rows: list[tuple[object, ...]]
    ) -> dict[str, float]:
        mech = Mechanism.STATIC if name == "static" else Mechanism.KERNEL
        bird = BirdDaemon(self.nns, self.workdir / f"bird-{name}")
        bird.start()
        ctl = BirdController(
            config_path=bird.config_path,
            socket_path=bird.socket_path,
            netns=self.nns,
            options=Options(mechanism=mech),
        )
        cold: dict[str, float] = {}
        try:
            await ctl.sync(self.node, set())
            wait_received(self.router, 1)
            for size in sizes:
                full = set(prefixes(size))
                t0 = time.monotonic()
                await ctl.sync(self.node, full)
                t_sync = time.monotonic() - t0
                up = wait_received(self.router, size + 1) + t_sync
                if size == max(sizes):
                    cold[f"{name}: agent sync of {size} on a running BIRD -> all at FRR"] = up
                await asyncio.sleep(0.3)
                rows.append(await self._trials(name, ctl, full, trials, size))
            if name == "kernel-update":
                # BIRD restart with the routes already in the export table.
                size = max(sizes)
                bird.kill()
                wait_received(self.router, -1, timeout=30)
                t0 = time.monotonic()
                bird.start()
                await ctl.check()
                wait_received(self.router, 0, timeout=60, at_least=True)
                session = time.monotonic() - t0
                wait_received(self.router, size + 1)
                key = f"{name}: BIRD restart with {size} in the table"
                cold[f"{key} -> session Established"] = session
                cold[f"{key} -> all at FRR"] = time.monotonic() - t0
            await ctl.sync(self.node, set())
            wait_received(self.router, 1, timeout=60)
        finally:
            await ctl.close()
            bird.stop()
        return cold

    async def _trials(
        self,
        name: str,
        ctl: BirdController,
        full: set[ipaddress.IPv6Network],
        trials: int,
        size: int,
    ) -> tuple[object, ...]:
        wire: list[float] = []
        fib: list[float] = []
        frr_own: list[float] = []
        call: list[float] = []
        lost = 0
        pool = sorted(full)
        for _ in range(trials):
            p = random.choice(pool)
            key = str(p)
            self.watch.forget(key)
            t0 = time.time_ns()
            if name == "kernel-sync":
                await ctl.sync(self.node, full - {p})
            else:
                await ctl.update(remove={p})
            t1 = time.time_ns()
            ok = self.watch.wait(lambda k=key: k in self.watch.wire and k in self.watch.fib_del)
            if not ok:
                lost += 1
            else:
                w = (self.watch.wire[key] - t0) / 1e6
                f = (self.watch.fib_del[key] - t0) / 1e6
                wire.append(w)
                fib.append(f)
                frr_own.append(f - w)
                call.append((t1 - t0) / 1e6)
            # Re-advertise and wait until the router has it again.
            self.watch.forget(key)
            if name == "kernel-sync":
                await ctl.sync(self.node, full)
            else:
                await ctl.update(add={p})
            self.watch.wait(lambda k=key: k in self.watch.fib_add)
            await asyncio.sleep(0.02)
        return (
            name,
            size,
            pct(call, 0.5),
            pct(wire, 0.5),
            pct(wire, 0.99),
            pct(fib, 0.5),
            pct(fib, 0.99),
            pct(frr_own, 0.5),
            len(wire),
            lost,
        )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--sizes", default="1,100,1000,10000")
    ap.add_argument("--mechanisms", default="kernel-update,kernel-sync,static")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if os.geteuid() != 0:
        raise SystemExit("run as root: creates network namespaces")
    workdir = Path(tempfile.mkdtemp(prefix="fbwithdraw"))
    os.chmod(workdir, 0o755)
    bench = Bench(workdir)
    rows: list[tuple[object, ...]] = []
    cold: dict[str, float] = {}
    try:
        for name in args.mechanisms.split(","):
            cold |= await bench.run_mechanism(name, sizes, args.trials, rows)
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nanycast withdraw latency, ms from the agent's call (n={args.trials} per row; "
        "p99 of that few samples is close to the max)"
    )
    hdr = (
        f"{'mechanism':<14} {'routes':>6} {'call p50':>8} {'wire p50':>8} {'wire p99':>8} "
        f"{'FRR p50':>8} {'FRR p99':>8} {'FRR own':>8} {'ok':>4} {'lost':>4}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        name, size, c50, w50, w99, f50, f99, own, ok, lost = r
        print(
            f"{name:<14} {size:>6} {c50:>8.2f} {w50:>8.2f} {w99:>8.2f} "
            f"{f50:>8.2f} {f99:>8.2f} {own:>8.2f} {ok:>4} {lost:>4}"
        )
    print("\ncold start")
    for k, v in cold.items():
        print(f"  {k}: {v:.2f} s")
    print(f"\n(median of FRR own {statistics.median([float(r[7]) for r in rows]):.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main())
