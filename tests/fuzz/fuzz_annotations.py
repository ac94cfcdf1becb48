#!/usr/bin/env python3
"""Fuzz target: the annotation parser must raise nothing but AnnotationError.

Input: UTF-8 text (invalid bytes replaced), one annotation per line as
`key=value`; a key without a `/` gets the `flock.fritzlab.net/` prefix. Whatever
parses must be self-consistent: every family rule, range and allow-list check holds.

Run a longer pass (libFuzzer options after the script; new finds go to the first
corpus directory, so point it at a scratch copy):
    cp -r tests/fuzz/corpus/annotations /tmp/fc-corpus
    .venv/bin/python tests/fuzz/fuzz_annotations.py -max_total_time=300 /tmp/fc-corpus
"""

from __future__ import annotations

import ipaddress
import sys

from flock import ANNOTATION_PREFIX
from flock.compile.annotations import AnnotationError, parse_annotations
from flock.model.nodeconfig import NodeConfig

NODES = [
    NodeConfig.from_object(
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": "fuzz-node"},
            "spec": spec,
        }
    )
    for spec in (
        {
            "cidr6": ["2001:db8:f001::/64"],
            "cidr4": ["192.0.2.0/24", "203.0.113.0/25"],
            "allowedAddresses": [
                {"cidr": "2001:db8:a::/48"},
                {"cidr": "198.51.100.0/24", "use": ["anycast"], "namespaces": ["dns"]},
            ],
        },
        {"cidr6": ["2001:db8:f002::/80"], "defaults": {"ipv4": False}},
        {"cidr4": ["192.0.2.0/28"], "defaults": {"ipv6": False}},
    )
]


def decode(data: bytes) -> tuple[dict[str, str], int, str]:
    text = data.decode("utf-8", "replace")
    node = len(data) % len(NODES)
    namespace = "dns" if len(data) % 2 else "default"
    ann: dict[str, str] = {}
    for line in text.split("\n"):
        key, _, value = line.partition("=")
        ann[key if "/" in key else ANNOTATION_PREFIX + key] = value
    return ann, node, namespace


def one_input(data: bytes) -> None:
    ann, n, namespace = decode(data)
    node = NODES[n]
    try:
        r = parse_annotations(ann, node=node, namespace=namespace)
    except AnnotationError as e:
        assert str(e), "empty error message"
        if e.key is not None:
            assert e.key.startswith(ANNOTATION_PREFIX), e.key
        return
    assert r.v6.want or r.v4.want
    for fam, version in ((r.v6, 6), (r.v4, 4)):
        if not fam.want:
            assert fam.primary is None and not fam.ranges
            continue
        assert fam.primary is not None or fam.ranges
        for net in fam.ranges:
            assert net.version == version
            assert any(net.subnet_of(x) for x in node.ranges(version))  # type: ignore[arg-type]
    wanted = {6: r.v6.want, 4: r.v4.want}
    primaries = [p for p in (r.v6.primary, r.v4.primary) if p is not None]
    for ip in (*r.anycast, *r.extra_addresses, *primaries):
        assert wanted[ip.version]
        # Only clean address text can reach BIRD or nftables.
        assert set(str(ip)) <= set("0123456789abcdef:."), ip
        assert not ip.is_multicast and not ip.is_loopback and not ip.is_unspecified
    for ip in r.anycast:
        assert node.claim_permitted(ip, use="anycast", namespace=namespace)
    for ip in (*r.extra_addresses, *primaries):
        assert node.claim_permitted(ip, use="addresses", namespace=namespace)
    assert len(set(r.anycast)) == len(r.anycast)
    assert not set(r.anycast) & set((*r.extra_addresses, *primaries))
    assert len(set(r.embed)) == len(r.embed)
    assert isinstance(r.v6.primary, ipaddress.IPv6Address | None)


def main() -> None:
    import atheris

    atheris.instrument_all()  # coverage feedback for flock (already imported above)
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
