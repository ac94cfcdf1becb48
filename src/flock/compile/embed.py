"""ip-algo: pod identity embedded in IPv6 host bits, so an address says whose it is.

With `flock.fritzlab.net/ip-algo: namespace,pod` every pod of one namespace
shares a hextet in `kubectl get pods -o wide`, and the next hextet tells pods
apart. The layout is fixed and documented in docs/annotations.md:

* Each requested name is hashed with 32-bit FNV-1a over its UTF-8 bytes and
  xor-folded to 16 bits (`(h >> 16) ^ (h & 0xffff)`).
* Fields are 16 bits wide and hextet-aligned. The first field starts at the first
  hextet boundary at or below the prefix (bit `ceil(prefixlen / 16) * 16`,
  counting from the most significant bit); further fields follow in the order
  the annotation lists them.
* Every other host bit (any bits between the prefix and the first boundary, and
  all bits after the last field) is random. At least `MIN_RANDOM_BITS` must
  remain, so that pods with the same identity (and collisions) can be told
  apart; otherwise the ADD fails with `EmbedError` saying why.

Everything here is pure and deterministic given the `random.Random` passed in.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

from flock.model.request import EmbedField, PodIdentity

FIELD_BITS = 16
MIN_RANDOM_BITS = 16
_FNV32_OFFSET = 0x811C9DC5
_FNV32_PRIME = 0x01000193


class EmbedError(ValueError):
    """The range is too small to embed the requested fields and keep enough random bits."""


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a (Fowler/Noll/Vo) hash."""
    h = _FNV32_OFFSET
    for b in data:
        h = ((h ^ b) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def field_value(name: str) -> int:
    """The 16-bit field for one name: FNV-1a 32 xor-folded to 16 bits."""
    h = fnv1a32(name.encode("utf-8"))
    return (h >> 16) ^ (h & 0xFFFF)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where embedded fields and random bits sit inside one network's host bits.

    `fixed_mask`/`fixed_bits` are absolute 128-bit values: bits set in the mask
    are decided by the prefix and the fields; every other bit is random.
    """

    network: ipaddress.IPv6Network
    fixed_mask: int
    fixed_bits: int
    random_bits: int

    def compose(self, random_value: int) -> ipaddress.IPv6Address:
        """Spread `random_value` (random_bits wide) over the non-fixed bits, low bits first."""
        free = ~self.fixed_mask & ((1 << 128) - 1)
        out = self.fixed_bits
        if free == (1 << self.random_bits) - 1:  # common case: one contiguous low block
            return ipaddress.IPv6Address(out | (random_value & free))
        bit = 0
        pos = 0
        while free:
            if free & 1:
                if (random_value >> bit) & 1:
                    out |= 1 << pos
                bit += 1
            free >>= 1
            pos += 1
        return ipaddress.IPv6Address(out)


def layout(
    network: ipaddress.IPv6Network, fields: Sequence[EmbedField], identity: PodIdentity
) -> Layout:
    """Fix the embedded fields for one network; raise EmbedError if they do not fit."""
    plen = network.prefixlen
    first = -(-plen // FIELD_BITS) * FIELD_BITS
    host_bits = 128 - plen
    random_bits = host_bits - FIELD_BITS * len(fields)
    end = first + FIELD_BITS * len(fields)
    if end > 128 or random_bits < MIN_RANDOM_BITS:
        names = ",".join(fields)
        raise EmbedError(
            f"ip-algo {names}: {network} has {host_bits} host bits; {len(fields)} hextet-aligned "
            f"16-bit field(s) from bit {first} leave {max(random_bits, 0)} random bits, and at "
            f"least {MIN_RANDOM_BITS} must remain to tell pods apart; use a larger range "
            f"(at most /{128 - FIELD_BITS * len(fields) - MIN_RANDOM_BITS} when aligned) "
            "or fewer fields"
        )
    prefix_mask = ((1 << plen) - 1) << (128 - plen) if plen else 0
    mask = prefix_mask
    bits = int(network.network_address)
    for i, f in enumerate(fields):
        shift = 128 - (first + FIELD_BITS * (i + 1))
        mask |= 0xFFFF << shift
        bits |= field_value(_name(identity, f)) << shift
    return Layout(network=network, fixed_mask=mask, fixed_bits=bits, random_bits=random_bits)


def _name(identity: PodIdentity, f: EmbedField) -> str:
    if f == "namespace":
        return identity.namespace
    if f == "pod":
        return identity.pod
    return identity.image


def embed_address(
    network: ipaddress.IPv6Network,
    fields: Sequence[EmbedField],
    identity: PodIdentity,
    rng: random.Random,
) -> ipaddress.IPv6Address:
    """One candidate address: fields from the identity, random bits from `rng`."""
    lay = layout(network, fields, identity)
    return lay.compose(rng.getrandbits(lay.random_bits))
