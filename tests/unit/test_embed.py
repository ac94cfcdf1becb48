"""ip-algo embedding: FNV-1a fields at fixed hextet positions, random bits elsewhere."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flock.compile.embed import (
    MIN_RANDOM_BITS,
    EmbedError,
    embed_address,
    field_value,
    fnv1a32,
    layout,
)
from flock.model.request import EmbedField, PodIdentity

N64 = ipaddress.IPv6Network("2001:db8:f001::/64")
ID = PodIdentity(namespace="dns", pod="coredns-7d8f", image="coredns/coredns:1.11")


def hextets(a: ipaddress.IPv6Address) -> list[int]:
    v = int(a)
    return [(v >> (112 - 16 * i)) & 0xFFFF for i in range(8)]


@pytest.mark.parametrize(
    ("data", "want"),
    # Published FNV-1a 32-bit test vectors.
    [(b"", 0x811C9DC5), (b"a", 0xE40C292C), (b"foobar", 0xBF9CF968)],
)
def test_fnv1a32_vectors(data: bytes, want: int) -> None:
    assert fnv1a32(data) == want


def test_field_value_is_xor_fold_of_fnv1a32() -> None:
    h = 0xBF9CF968
    assert field_value("foobar") == (h >> 16) ^ (h & 0xFFFF) == 0x46F4


def test_namespace_pod_layout_in_a_64() -> None:
    a = embed_address(N64, ("namespace", "pod"), ID, random.Random(1))
    assert a in N64
    h = hextets(a)
    assert h[:4] == hextets(N64.network_address)[:4]
    assert h[4] == field_value("dns")
    assert h[5] == field_value("coredns-7d8f")


def test_order_follows_the_annotation() -> None:
    a = embed_address(N64, ("pod", "image", "namespace"), ID, random.Random(1))
    h = hextets(a)
    assert h[4:7] == [field_value("coredns-7d8f"), field_value(ID.image), field_value("dns")]


def test_same_namespace_shares_the_hextet_and_pods_differ() -> None:
    rng = random.Random(7)
    a = embed_address(N64, ("namespace", "pod"), ID, rng)
    b = embed_address(N64, ("namespace", "pod"), PodIdentity("dns", "coredns-other"), rng)
    assert hextets(a)[4] == hextets(b)[4]
    assert hextets(a)[5] != hextets(b)[5]


def test_random_part_differs_between_draws_and_is_seeded() -> None:
    a = embed_address(N64, ("namespace",), ID, random.Random(3))
    b = embed_address(N64, ("namespace",), ID, random.Random(3))
    c = embed_address(N64, ("namespace",), ID, random.Random(4))
    assert a == b
    assert a != c
    assert int(a) >> 48 == int(c) >> 48  # prefix + namespace field agree


def test_unaligned_prefix_fields_start_at_next_hextet() -> None:
    n = ipaddress.IPv6Network("2001:db8:f001:10::/60")
    lay = layout(n, ("namespace",), ID)
    assert lay.random_bits == 68 - 16
    a = lay.compose(0)
    assert hextets(a)[4] == field_value("dns")
    assert int(a) & ((1 << 64) - 1) == field_value("dns") << 48
    # the 4 bits between /60 and the hextet boundary are random
    b = lay.compose(1 << (lay.random_bits - 1))
    assert b in n and int(b) != int(a)
    assert hextets(b)[4] == field_value("dns")


@pytest.mark.parametrize(
    ("prefix", "fields", "ok"),
    [
        ("2001:db8::/64", ("namespace", "pod", "image"), True),  # 64-48 = 16 random
        ("2001:db8::/80", ("namespace", "pod"), True),  # 48-32 = 16
        ("2001:db8::/80", ("namespace", "pod", "image"), False),  # 48-48 = 0
        ("2001:db8::/96", ("namespace",), True),
        ("2001:db8::/96", ("namespace", "pod"), False),
        ("2001:db8::/97", ("namespace",), False),  # 31 host bits, field from 112: 15 left
        ("2001:db8::/112", ("namespace",), False),
        ("2001:db8::/90", ("namespace",), True),  # field at bits 96..111, 22 random
        ("2001:db8::/65", ("namespace", "pod", "image"), False),  # 63-48 = 15
    ],
)
def test_minimum_random_bits(prefix: str, fields: tuple[EmbedField, ...], ok: bool) -> None:
    n = ipaddress.IPv6Network(prefix)
    if ok:
        lay = layout(n, fields, ID)
        assert lay.random_bits >= MIN_RANDOM_BITS
    else:
        with pytest.raises(EmbedError, match="at least 16 must remain"):
            layout(n, fields, ID)


def test_error_says_why() -> None:
    with pytest.raises(EmbedError) as info:
        layout(ipaddress.IPv6Network("2001:db8::/112"), ("namespace",), ID)
    msg = str(info.value)
    assert "2001:db8::/112" in msg and "16 host bits" in msg and "random" in msg


@settings(max_examples=300, deadline=None)
@given(
    plen=st.integers(min_value=0, max_value=128),
    fields=st.lists(st.sampled_from(["namespace", "pod", "image"]), unique=True, max_size=3),
    ns=st.text(max_size=20),
    pod=st.text(max_size=20),
    seed=st.integers(min_value=0, max_value=2**32),
    base=st.integers(min_value=0, max_value=2**128 - 1),
)
def test_embedding_is_stable_and_in_range(
    plen: int, fields: list[EmbedField], ns: str, pod: str, seed: int, base: int
) -> None:
    n = ipaddress.IPv6Network((base >> (128 - plen) << (128 - plen) if plen else 0, plen))
    ident = PodIdentity(namespace=ns, pod=pod)
    first = -(-plen // 16) * 16
    fits = first + 16 * len(fields) <= 128 and 128 - plen - 16 * len(fields) >= MIN_RANDOM_BITS
    if not fits:
        with pytest.raises(EmbedError):
            embed_address(n, fields, ident, random.Random(seed))
        return
    a = embed_address(n, fields, ident, random.Random(seed))
    assert a in n
    assert a == embed_address(n, fields, ident, random.Random(seed))
    for i, f in enumerate(fields):
        shift = 128 - (first + 16 * (i + 1))
        name = {"namespace": ns, "pod": pod, "image": ""}[f]
        assert (int(a) >> shift) & 0xFFFF == field_value(name)
