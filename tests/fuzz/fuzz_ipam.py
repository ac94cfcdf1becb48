#!/usr/bin/env python3
"""Fuzz target: the allocator under arbitrary sequences of allocate/release/GC/reload.

Input bytes are read in pairs (opcode, argument). After every step: no two live
attachments share an eth0 address, no eth0 address is someone's anycast, pool
addresses lie in their range and are never network/broadcast (v4) or the
subnet-router anycast (v6), and every v4 drawn from the pool is the lowest free.

Longer pass:
    cp -r tests/fuzz/corpus/ipam /tmp/fc-corpus-ipam
    .venv/bin/python tests/fuzz/fuzz_ipam.py -max_total_time=300 /tmp/fc-corpus-ipam
"""

from __future__ import annotations

import ipaddress
import random
import sys

from flock.compile.ipam import Ipam, IpamError
from flock.model.allocation import AttachmentKey
from flock.model.request import (
    EmbedField,
    FamilyRequest,
    IPAddress,
    IPNetwork,
    PodIdentity,
    PodRequest,
)

V4 = ipaddress.IPv4Network("192.0.2.0/28")
V4_SUB = ipaddress.IPv4Network("192.0.2.4/30")
V4_TINY = ipaddress.IPv4Network("192.0.2.12/31")
V6 = ipaddress.IPv6Network("2001:db8::/124")
V6_EMBED = ipaddress.IPv6Network("2001:db8:e::/96")
SUPPLIED: list[IPAddress] = [
    ipaddress.ip_address(x)
    for x in (
        "192.0.2.1",
        "192.0.2.5",
        "198.51.100.1",
        "2001:db8::3",
        "2001:db8:a::1",
        "192.0.2.14",
    )
]
V4_RANGES: list[tuple[IPNetwork, ...]] = [(V4,), (V4_SUB,), (V4_TINY,), (V4_SUB, V4)]


def _pick(arg: int, shift: int) -> list[IPAddress]:
    """Three bits of arg: 0 = none, n = SUPPLIED[n - 1]."""
    i = ((arg >> shift) & 7) - 1
    return [SUPPLIED[i]] if 0 <= i < len(SUPPLIED) else []


def request(arg: int, arg2: int) -> PodRequest:
    want6 = bool(arg & 1) or not arg & 2
    want4 = bool(arg & 2)
    embed: tuple[EmbedField, ...] = ("pod",) if arg2 & 0x80 else ()
    p = [a for a in _pick(arg, 2) if (a.version == 6 and want6) or (a.version == 4 and want4)]
    anycast = [
        a
        for a in _pick(arg, 5)
        if a not in p and ((a.version == 6 and want6) or (a.version == 4 and want4))
    ]
    p6 = next((a for a in p if a.version == 6), None)
    p4 = next((a for a in p if a.version == 4), None)
    return PodRequest(
        v6=FamilyRequest(
            want=want6, ranges=((V6_EMBED,) if embed else (V6,)) if want6 else (), primary=p6
        ),
        v4=FamilyRequest(want=want4, ranges=V4_RANGES[arg2 & 3] if want4 else (), primary=p4),
        embed=embed if want6 and p6 is None else (),
        anycast=tuple(anycast),
    )


def lowest_free(ipam: Ipam, req: PodRequest) -> IPAddress | None:
    """Brute force: the first usable v4 in the pod's ranges held by nobody (nor itself)."""
    own = set(req.anycast) | set(req.extra_addresses)
    for net in req.v4.ranges:
        hosts = list(net.hosts()) if net.prefixlen < 31 else list(net)
        for h in hosts:
            if not ipam.in_use(h) and h not in own:
                return h
    return None


def check(ipam: Ipam) -> None:
    eth0: set[IPAddress] = set()
    anycast: set[IPAddress] = set()
    for a in ipam.all():
        for x in a.all_addresses:
            assert x not in eth0, f"{x} held twice"
            eth0.add(x)
        anycast.update(a.anycast)
        if a.v6 is not None and not a.v6_supplied:
            net = V6_EMBED if a.v6 in V6_EMBED else V6
            assert a.v6 in net and a.v6 != net.network_address
        if a.v4 is not None and not a.v4_supplied:
            assert a.v4 in V4 and a.v4 not in (V4.network_address, V4.broadcast_address)
    assert not eth0 & anycast


def one_input(data: bytes) -> None:
    ipam = Ipam()
    rng = random.Random(len(data))
    n = 0
    for i in range(0, len(data) - 2, 3):
        op, arg, arg2 = data[i] % 6, data[i + 1], data[i + 2]
        if op <= 2:
            n += 1
            req = request(arg, arg2)
            from_pool = req.v4.want and req.v4.primary is None
            want = lowest_free(ipam, req) if from_pool else None
            key = AttachmentKey(f"c{n}", "eth0")
            try:
                a = ipam.allocate(
                    key,
                    req,
                    namespace="ns",
                    pod=f"p{arg2 % 5}",
                    identity=PodIdentity("ns", f"p{arg2 % 5}"),
                    rng=rng,
                )
            except IpamError:
                assert ipam.get(key) is None
            else:
                if from_pool:
                    assert a.v4 == want, (a.v4, want)
                assert ipam.allocate(key, req, namespace="x", pod="y") == a
        elif op == 3:
            keys = sorted(a.key for a in ipam.all())
            if keys:
                assert ipam.release(keys[arg % len(keys)]) is not None
            assert ipam.release(AttachmentKey("never", "eth0")) is None
        elif op == 4:
            keys = sorted(a.key for a in ipam.all())
            live = {k for j, k in enumerate(keys) if (arg >> (j % 8)) & 1}
            gone = ipam.gc(live)
            assert {a.key for a in ipam.all()} == live
            assert not {a.key for a in gone} & live
        else:
            ipam = Ipam(ipam.all())
        check(ipam)


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback for flock (already imported above)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
