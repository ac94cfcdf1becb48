"""Python cost of rtnetlink messages: flock's hand-written codec vs pyroute2's message classes.

Why `flock.apply.rtnl` keeps its ADD/DEL-path messages hand-written: for each
message one dual-stack setup_pod sends or reads, the time to encode (or decode)
it with `struct` and with pyroute2's `ifinfmsg`/`ifaddrmsg`/`rtmsg`/`ndmsg`,
and the sum over one pod. Pure Python, no root, no kernel.

Usage: .venv/bin/python bench/bench_rtnl_codec.py [--number 2000]
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import sys
import timeit
from collections.abc import Callable
from typing import Any

from pyroute2.netlink import nlmsgerr
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from flock.apply import rtnl

V6 = ipaddress.IPv6Address("2001:db8::5")
MAC = "0a:01:02:03:04:05"


def p2(msg: Any, attrs: list[Any], **fields: int) -> Callable[[], bytes]:
    def encode() -> bytes:
        m = msg()
        for k, v in fields.items():
            m[k] = v
        m["attrs"] = attrs
        m.encode()
        return bytes(m.data)

    return encode


PEER = {
    "attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_ADDRESS", MAC), ("IFLA_NET_NS_FD", 9)],
}
VETH = [
    ("IFLA_IFNAME", "flk0123456789a"),
    ("IFLA_ADDRESS", "ee:01:02:03:04:05"),
    (
        "IFLA_LINKINFO",
        {
            "attrs": [
                ("IFLA_INFO_KIND", "veth"),
                ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", PEER)]}),
            ]
        },
    ),
]
AF6 = [("IFLA_AF_SPEC", {"attrs": [("AF_INET6", {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", 1)]})]})]

# (label, per-pod count, ours, pyroute2's)
ENCODERS: list[tuple[str, int, Callable[[], bytes], Callable[[], bytes]]] = [
    (
        "veth (RTM_NEWLINK, peer in pod netns)",
        1,
        lambda: rtnl.veth_new(
            name="flk0123456789a",
            mac="ee:01:02:03:04:05",
            peer_name="eth0",
            peer_mac=MAC,
            peer_netns_fd=9,
        ),
        p2(ifinfmsg, VETH),
    ),
    (
        "link up + addrgenmode (RTM_SETLINK)",
        2,
        lambda: rtnl.link_set(index=5, up=True, addrgenmode_none=True),
        p2(ifinfmsg, AF6, index=5, flags=1, change=1),
    ),
    (
        "address (RTM_NEWADDR)",
        3,
        lambda: rtnl.address(index=3, ip=V6, prefixlen=128),
        p2(
            ifaddrmsg,
            [("IFA_LOCAL", str(V6)), ("IFA_ADDRESS", str(V6)), ("IFA_FLAGS", 2)],
            family=10,
            prefixlen=128,
            flags=2,
            index=3,
        ),
    ),
    (
        "neighbour (RTM_NEWNEIGH)",
        4,
        lambda: rtnl.neighbour(index=3, ip=V6, mac=MAC),
        p2(ndmsg, [("NDA_DST", str(V6)), ("NDA_LLADDR", MAC)], family=10, ifindex=3, state=0x80),
    ),
    (
        "route (RTM_NEWROUTE)",
        4,
        lambda: rtnl.pod_route(dst=V6, dst_len=128, family=10, oif=4, proto=70, scope=253),
        p2(
            rtmsg,
            [("RTA_DST", str(V6)), ("RTA_OIF", 4)],
            family=10,
            dst_len=128,
            table=254,
            proto=70,
            scope=253,
            type=1,
        ),
    ),
    (
        "get link by name (RTM_GETLINK)",
        2,
        lambda: rtnl.link_get("flk0123456789a"),
        p2(ifinfmsg, [("IFLA_IFNAME", "flk0123456789a"), ("IFLA_EXT_MASK", 8)]),
    ),
]


def link_reply() -> bytes:
    """A link message shaped like the kernel's reply for a veth (~40 attributes)."""
    m = ifinfmsg()
    m["index"], m["flags"] = 7, 0x1003
    nla: list[Any] = [
        ("IFLA_IFNAME", "flk0123456789a"),
        ("IFLA_ADDRESS", "ee:01:02:03:04:05"),
        ("IFLA_BROADCAST", "ff:ff:ff:ff:ff:ff"),
        ("IFLA_MTU", 1500),
        ("IFLA_GROUP", 0),
        ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "veth")]}),
    ]
    nla += [("IFLA_TXQLEN", 1000), ("IFLA_NUM_TX_QUEUES", 2), ("IFLA_NUM_RX_QUEUES", 2)] * 11
    m["attrs"] = nla
    m.encode()
    return bytes(m.data)


def ack() -> bytes:
    body = struct.pack("=i", 0) + rtnl.message(rtnl.RTM_NEWADDR, 0, 5, b"")[:16]
    return struct.pack("=IHHII", 16 + len(body), rtnl.NLMSG_ERROR, rtnl.NLM_F_CAPPED, 5, 0) + body


def us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=2000)
    args = ap.parse_args()
    n = args.number
    print(f"{'message (per pod)':<44} {'ours us':>9} {'pyroute2 us':>12} {'ratio':>7}")
    total_ours = total_p2 = 0.0
    for label, count, ours, theirs in ENCODERS:
        assert ours() == theirs()[16:], f"{label}: encodings differ"
        a, b = us(ours, n), us(theirs, n)
        total_ours += count * a
        total_p2 += count * b
        print(f"encode {label + f' x{count}':<37} {a:>9.2f} {b:>12.2f} {b / a:>7.1f}")

    raw = link_reply()
    body = raw[16:]

    def p2_link() -> object:
        m = ifinfmsg(raw)
        m.decode()
        return (m.get_attr("IFLA_IFNAME"), m.get_attr("IFLA_MTU"), m.get_attr("IFLA_LINKINFO"))

    a, b = us(lambda: rtnl.parse_link(body), n), us(p2_link, n)
    total_ours += 2 * a
    total_p2 += 2 * b
    print(f"{'decode link reply (~40 attributes) x2':<44} {a:>9.2f} {b:>12.2f} {b / a:>7.1f}")

    one = ack()

    def p2_ack() -> int:
        m = nlmsgerr(one)
        m.decode()
        return int(m["error"])

    a = us(lambda: rtnl.error_of(next(rtnl.split(one))), n)
    b = us(p2_ack, n)
    total_ours += 14 * a
    total_p2 += 14 * b
    print(f"{'decode ack x14 (one per request)':<44} {a:>9.2f} {b:>12.2f} {b / a:>7.1f}")
    print(
        f"{'one dual-stack setup_pod, total':<44} {total_ours:>9.1f} {total_p2:>12.1f} "
        f"{total_p2 / total_ours:>7.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
