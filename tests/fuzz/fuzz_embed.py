#!/usr/bin/env python3
"""Fuzz target: ip-algo embedding is in range, puts each field at its documented
hextet, is deterministic, and refuses exactly when fewer than 16 random bits remain.

Input bytes: [prefix length][field order selector][seed: 4 bytes][base: 16 bytes]
then namespace, pod and image names separated by NUL (UTF-8, invalid bytes replaced).

Longer pass:
    cp -r tests/fuzz/corpus/embed /tmp/fc-corpus-embed
    .venv/bin/python tests/fuzz/fuzz_embed.py -max_total_time=300 /tmp/fc-corpus-embed
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import sys

from flock.compile.embed import MIN_RANDOM_BITS, EmbedError, embed_address, field_value
from flock.model.request import EmbedField, PodIdentity

_ALL: tuple[EmbedField, ...] = ("namespace", "pod", "image")
ORDERS: list[tuple[EmbedField, ...]] = [
    p for n in range(4) for p in itertools.permutations(_ALL, n)
]


def decode(data: bytes) -> tuple[ipaddress.IPv6Network, tuple[EmbedField, ...], int, PodIdentity]:
    head = data[:22].ljust(22, b"\0")
    plen = head[0] % 129
    fields = ORDERS[head[1] % len(ORDERS)]
    seed = int.from_bytes(head[2:6], "big")
    base = int.from_bytes(head[6:22], "big")
    mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
    net = ipaddress.IPv6Network((base & mask, plen))
    names = [*data[22:].decode("utf-8", "replace").split("\0"), "", "", ""]
    return net, fields, seed, PodIdentity(namespace=names[0], pod=names[1], image=names[2])


def one_input(data: bytes) -> None:
    net, fields, seed, ident = decode(data)
    first = -(-net.prefixlen // 16) * 16
    fits = first + 16 * len(fields) <= 128 and 128 - net.prefixlen - 16 * len(fields) >= (
        MIN_RANDOM_BITS
    )
    try:
        a = embed_address(net, fields, ident, random.Random(seed))
    except EmbedError:
        assert not fits
        return
    assert fits
    assert a in net
    assert a == embed_address(net, fields, ident, random.Random(seed))
    names = {"namespace": ident.namespace, "pod": ident.pod, "image": ident.image}
    for i, f in enumerate(fields):
        shift = 128 - (first + 16 * (i + 1))
        assert (int(a) >> shift) & 0xFFFF == field_value(names[f])


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback for flock (already imported above)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
