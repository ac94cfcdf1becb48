"""NodeConfig parsing: the operator's input is validated with field paths in errors."""

import ipaddress

import pytest

from flock.model.nodeconfig import NodeConfig, NodeConfigError


def _obj(spec: dict) -> dict:
    return {
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "NodeConfig",
        "metadata": {"name": "node-a"},
        "spec": spec,
    }


def test_reference_example_parses() -> None:
    nc = NodeConfig.from_object(
        _obj(
            {
                "cidr6": ["2001:db8:f001::/64"],
                "cidr4": ["192.0.2.0/24"],
                "defaults": {"ipv6": True, "ipv4": True},
                "bgp": {
                    "asn": 65101,
                    "peers": [
                        {"address": "2001:db8::1", "asn": 65000},
                        {"address": "192.0.2.1", "asn": 65000},
                    ],
                },
            }
        )
    )
    assert nc.name == "node-a"
    assert nc.spec.cidr6 == (ipaddress.IPv6Network("2001:db8:f001::/64"),)
    assert nc.want_ipv4 and nc.want_ipv6
    assert nc.spec.bgp is not None and len(nc.spec.bgp.peers) == 2


def test_host_bits_rejected_with_path() -> None:
    with pytest.raises(NodeConfigError, match=r"spec\.cidr6.*2001:db8:f001::1/64"):
        NodeConfig.from_object(_obj({"cidr6": ["2001:db8:f001::1/64"]}))


def test_reserved_asn_rejected() -> None:
    with pytest.raises(NodeConfigError, match=r"spec\.bgp\.asn"):
        NodeConfig.from_object(_obj({"bgp": {"asn": 23456}}))
