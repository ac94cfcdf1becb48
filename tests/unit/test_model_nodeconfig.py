"""NodeConfig parsing: the operator's input is validated with field paths in errors.

The CRD's OpenAPI schema is checked against the same table of good and bad specs,
so `kubectl apply` and the agent agree wherever a schema can express the rule.
"""

import copy
import ipaddress
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

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


# ---- more rules, and the CRD schema's verdicts beside the model's --------------------

CRD = Path(__file__).resolve().parents[2] / "deploy" / "crds" / "nodeconfig.yaml"
PEER = {"address": "192.0.2.1", "asn": 65000}


# CEL rules of the CRD that have a plain JSON Schema equivalent: checked here through
# it (the real server evaluates the CEL itself, and tests/kube checks its messages).
CEL_AS_JSON_SCHEMA: dict[str, dict[str, Any]] = {
    "self != 23456 && self != 65535": {"not": {"enum": [23456, 65535]}},
    "self == 0 || self >= 3": {"not": {"enum": [1, 2]}},
    "self.contains('%') ? isIP(self.split('%')[0]) && ip(self.split('%')[0]).family() == 6"
    " && ip(self.split('%')[0]).isLinkLocalUnicast() : isIP(self)": {
        "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]
    },
}


def _strict(schema: Any) -> Any:
    """The CRD schema as plain JSON Schema: x-kubernetes-* dropped, except the CEL rules
    translated by CEL_AS_JSON_SCHEMA (the others are not evaluated here), and unknown
    fields refused, as kubectl's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        rules = [" ".join(r["rule"].split()) for r in schema.get("x-kubernetes-validations", [])]
        if equivalents := [CEL_AS_JSON_SCHEMA[r] for r in rules if r in CEL_AS_JSON_SCHEMA]:
            out["allOf"] = equivalents
        if "properties" in out and out.get("type") == "object":
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def _formats() -> jsonschema.FormatChecker:
    fc = jsonschema.FormatChecker(formats=())

    @fc.checks("cidr", raises=ValueError)
    def _cidr(v: object) -> bool:  # like Go's net.ParseCIDR: host bits allowed
        return not isinstance(v, str) or bool(ipaddress.ip_network(v, strict=False))

    @fc.checks("ipv4", raises=ValueError)
    def _v4(v: object) -> bool:
        return not isinstance(v, str) or bool(ipaddress.IPv4Address(v))

    @fc.checks("ipv6", raises=ValueError)
    def _v6(v: object) -> bool:
        return not isinstance(v, str) or bool(ipaddress.IPv6Address(v.split("%")[0]))

    return fc


_DOC = yaml.safe_load(CRD.read_text())
_SCHEMA = _strict(_DOC["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
_VALIDATOR = jsonschema.Draft7Validator(_SCHEMA, format_checker=_formats())


def crd_accepts(spec: dict[str, Any]) -> bool:
    return not list(_VALIDATOR.iter_errors(_obj(spec)))


def model_accepts(spec: dict[str, Any]) -> bool:
    try:
        NodeConfig.from_object(_obj(spec))
    except NodeConfigError:
        return False
    return True


def test_crd_identity() -> None:
    assert _DOC["spec"]["group"] == "flock.fritzlab.net"
    assert _DOC["spec"]["scope"] == "Cluster"
    assert _DOC["spec"]["names"]["kind"] == "NodeConfig"
    assert _DOC["metadata"]["name"] == "nodeconfigs.flock.fritzlab.net"
    assert [v["name"] for v in _DOC["spec"]["versions"]] == ["v1alpha1"]
    jsonschema.Draft7Validator.check_schema(_SCHEMA)
    # Every translation still matches a rule of the CRD (else it checks nothing).
    assert set(CEL_AS_JSON_SCHEMA) <= {" ".join(r["rule"].split()) for r in _rules(_DOC)}


def _rules(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        own = list(node.get("x-kubernetes-validations", []))
        return own + [r for v in node.values() for r in _rules(v)]
    if isinstance(node, list):
        return [r for v in node for r in _rules(v)]
    return []


REFERENCE = {
    "cidr6": ["2001:db8:f001::/64"],
    "cidr4": ["192.0.2.0/24"],
    "defaults": {"ipv6": True, "ipv4": True},
    "bgp": {
        "asn": 65101,
        "peers": [{"address": "2001:db8::1", "asn": 65000}, {"address": "192.0.2.1", "asn": 65000}],
    },
}
FULL_PEER = {
    "address": "fe80::1%eth0",
    "asn": 4200000000,
    "holdTime": 9,
    "keepaliveTime": 3,
    "bfd": {"enabled": True, "minRx": 100, "minTx": 100, "multiplier": 3},
    "gracefulRestart": True,
    "passwordSecretRef": {"namespace": "kube-system", "name": "bgp-auth", "key": "password"},
}

# (spec, accepted by both). Both the CRD schema and the model must give this verdict.
AGREE: list[tuple[str, dict[str, Any], bool]] = [
    ("reference", REFERENCE, True),
    ("empty", {}, True),
    ("full-peer", {"bgp": {"asn": 65101, "peers": [FULL_PEER]}}, True),
    ("password-file", {"bgp": {"asn": 1, "peers": [{**PEER, "passwordFile": "/etc/p"}]}}, True),
    ("hold-0", {"bgp": {"asn": 1, "peers": [{**PEER, "holdTime": 0}]}}, True),
    ("allowed", {"allowedAddresses": [{"cidr": "198.51.100.0/24", "use": ["anycast"]}]}, True),
    ("allowed-ns", {"allowedAddresses": [{"cidr": "2001:db8::/32", "namespaces": ["dns"]}]}, True),
    ("v4-in-cidr6", {"cidr6": ["192.0.2.0/24"]}, False),
    ("v6-in-cidr4", {"cidr4": ["2001:db8::/64"]}, False),
    ("prefix-33", {"cidr4": ["192.0.2.0/33"]}, False),
    ("prefix-129", {"cidr6": ["2001:db8::/129"]}, False),
    ("no-prefix", {"cidr4": ["192.0.2.0"]}, False),
    ("octet-256", {"cidr4": ["192.0.256.0/24"]}, False),
    ("leading-zero", {"cidr4": ["192.0.02.0/24"]}, False),
    ("cidr-not-list", {"cidr6": "2001:db8::/64"}, False),
    ("dup-cidr", {"cidr4": ["192.0.2.0/24", "192.0.2.0/24"]}, False),
    ("asn-0", {"bgp": {"asn": 0}}, False),
    ("asn-trans", {"bgp": {"asn": 23456}}, False),
    ("asn-65535", {"bgp": {"asn": 65535}}, False),
    ("asn-max", {"bgp": {"asn": 4294967295}}, False),
    ("asn-too-big", {"bgp": {"asn": 4294967296}}, False),
    ("asn-negative", {"bgp": {"asn": -1}}, False),
    ("asn-string", {"bgp": {"asn": "65000"}}, False),
    ("asn-bool", {"bgp": {"asn": True}}, False),
    ("no-asn", {"bgp": {"peers": [PEER]}}, False),
    ("peer-asn-0", {"bgp": {"asn": 1, "peers": [{**PEER, "asn": 0}]}}, False),
    ("peer-not-ip", {"bgp": {"asn": 1, "peers": [{**PEER, "address": "router1"}]}}, False),
    ("peer-cidr", {"bgp": {"asn": 1, "peers": [{**PEER, "address": "192.0.2.1/32"}]}}, False),
    ("peer-bad-zone", {"bgp": {"asn": 1, "peers": [{**PEER, "address": "fe80::1%a b"}]}}, False),
    ("hold-2", {"bgp": {"asn": 1, "peers": [{**PEER, "holdTime": 2}]}}, False),
    ("hold-big", {"bgp": {"asn": 1, "peers": [{**PEER, "holdTime": 65536}]}}, False),
    ("keepalive-0", {"bgp": {"asn": 1, "peers": [{**PEER, "keepaliveTime": 0}]}}, False),
    ("bfd-fast", {"bgp": {"asn": 1, "peers": [{**PEER, "bfd": {"minRx": 5}}]}}, False),
    ("bfd-mult", {"bgp": {"asn": 1, "peers": [{**PEER, "bfd": {"multiplier": 0}}]}}, False),
    ("gr-string", {"bgp": {"asn": 1, "peers": [{**PEER, "gracefulRestart": "yes"}]}}, False),
    (
        "secret-no-name",
        {"bgp": {"asn": 1, "peers": [{**PEER, "passwordSecretRef": {"namespace": "a"}}]}},
        False,
    ),
    (
        "secret-bad-ns",
        {
            "bgp": {
                "asn": 1,
                "peers": [{**PEER, "passwordSecretRef": {"namespace": "A_b", "name": "x"}}],
            }
        },
        False,
    ),
    ("password-rel", {"bgp": {"asn": 1, "peers": [{**PEER, "passwordFile": "etc/p"}]}}, False),
    ("router-id-v6", {"bgp": {"asn": 1, "routerId": "2001:db8::1"}}, False),
    ("defaults-string", {"defaults": {"ipv6": "yes"}}, False),
    ("defaults-unknown", {"defaults": {"ipv5": True}}, False),
    ("unknown-field", {"cidr": ["192.0.2.0/24"]}, False),
    ("peer-unknown", {"bgp": {"asn": 1, "peers": [{**PEER, "holdtime": 9}]}}, False),
    ("allowed-no-cidr", {"allowedAddresses": [{"use": ["anycast"]}]}, False),
    ("allowed-bad-cidr", {"allowedAddresses": [{"cidr": "10.0.0.0/40"}]}, False),
    ("allowed-empty-use", {"allowedAddresses": [{"cidr": "10.0.0.0/8", "use": []}]}, False),
    ("allowed-bad-use", {"allowedAddresses": [{"cidr": "10.0.0.0/8", "use": ["bgp"]}]}, False),
    (
        "allowed-dup-use",
        {"allowedAddresses": [{"cidr": "10.0.0.0/8", "use": ["anycast", "anycast"]}]},
        False,
    ),
    (
        "allowed-bad-ns",
        {"allowedAddresses": [{"cidr": "10.0.0.0/8", "namespaces": ["Kube_System"]}]},
        False,
    ),
]


def _unique_sets(spec: dict[str, Any]) -> bool:
    """x-kubernetes-list-type: set (stripped for jsonschema) makes duplicates invalid."""
    lists = [spec.get("cidr6", []), spec.get("cidr4", [])]
    for e in spec.get("allowedAddresses", []):
        lists += [e.get("use", []), e.get("namespaces", [])]
    return all(not isinstance(x, list) or len(x) == len(set(map(str, x))) for x in lists)


@pytest.mark.parametrize(("name", "spec", "ok"), AGREE, ids=[a[0] for a in AGREE])
def test_crd_schema_and_model_agree(name: str, spec: dict[str, Any], ok: bool) -> None:
    assert model_accepts(copy.deepcopy(spec)) is ok
    assert (crd_accepts(copy.deepcopy(spec)) and _unique_sets(spec)) is ok


# What the schema cannot express; the agent is the backstop and refuses these.
AGENT_ONLY: list[tuple[str, dict[str, Any], str]] = [
    ("host-bits", {"cidr4": ["192.0.2.1/24"]}, r"spec\.cidr4\[0\]"),
    ("overlap", {"cidr6": ["2001:db8::/48", "2001:db8::/64"]}, "overlaps"),
    (
        "link-local-no-zone",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "fe80::1"}]}},
        "interface",
    ),
    ("multicast-peer", {"bgp": {"asn": 1, "peers": [{**PEER, "address": "ff02::2"}]}}, "neighbour"),
    (
        "zone-on-global",
        {"bgp": {"asn": 1, "peers": [{**PEER, "address": "2001:db8::1%eth0"}]}},
        "link-local",
    ),
    ("dup-peer", {"bgp": {"asn": 1, "peers": [PEER, PEER]}}, "listed twice"),
    (
        "keepalive-vs-hold",
        {"bgp": {"asn": 1, "peers": [{**PEER, "holdTime": 9, "keepaliveTime": 4}]}},
        "third",
    ),
    (
        "password-both",
        {
            "bgp": {
                "asn": 1,
                "peers": [
                    {
                        **PEER,
                        "passwordFile": "/p",
                        "passwordSecretRef": {"namespace": "a", "name": "b"},
                    }
                ],
            }
        },
        "not both",
    ),
    ("cidr6-128", {"cidr6": ["2001:db8::1/128"]}, "no room"),
    (
        "allowed-host-bits",
        {"allowedAddresses": [{"cidr": "10.0.0.1/8"}]},
        r"allowedAddresses\[0\]\.cidr",
    ),
]


@pytest.mark.parametrize(("name", "spec", "why"), AGENT_ONLY, ids=[a[0] for a in AGENT_ONLY])
def test_agent_refuses_what_the_schema_cannot_express(
    name: str, spec: dict[str, Any], why: str
) -> None:
    with pytest.raises(NodeConfigError, match=why) as info:
        NodeConfig.from_object(_obj(spec))
    assert "NodeConfig node-a" in str(info.value)


def test_bad_node_names() -> None:
    for name in ("", "Node_A", "-a", "a" * 254):
        obj = _obj({})
        obj["metadata"]["name"] = name
        with pytest.raises(NodeConfigError, match=r"metadata\.name"):
            NodeConfig.from_object(obj)


def test_wrong_kind_or_version() -> None:
    obj = _obj({})
    obj["apiVersion"] = "flock.fritzlab.net/v1"
    with pytest.raises(NodeConfigError, match="expected apiVersion"):
        NodeConfig.from_object(obj)


def test_spec_not_an_object() -> None:
    obj = _obj({})
    obj["spec"] = ["x"]
    with pytest.raises(NodeConfigError, match="spec: must be an object"):
        NodeConfig.from_object(obj)


def test_defaults_resolution() -> None:
    nc = NodeConfig.from_object(_obj({"defaults": {"ipv4": False}}))
    assert nc.want_ipv6 and not nc.want_ipv4
    nc = NodeConfig.from_object(_obj({}))
    assert nc.want_ipv6 and nc.want_ipv4


def test_claim_permitted() -> None:
    nc = NodeConfig.from_object(
        _obj(
            {
                "allowedAddresses": [
                    {"cidr": "198.51.100.0/24", "use": ["anycast"]},
                    {"cidr": "2001:db8:c606::/48", "namespaces": ["media"]},
                ]
            }
        )
    )
    a4 = ipaddress.ip_address("198.51.100.53")
    a6 = ipaddress.ip_address("2001:db8:c606::166")
    assert nc.claim_permitted(a4, use="anycast", namespace="any")
    assert not nc.claim_permitted(a4, use="addresses", namespace="any")
    assert nc.claim_permitted(a6, use="addresses", namespace="media")
    assert not nc.claim_permitted(a6, use="addresses", namespace="default")
    assert not nc.claim_permitted(ipaddress.ip_address("203.0.113.1"), use="anycast", namespace="x")
    assert not NodeConfig.from_object(_obj({})).claim_permitted(a4, use="anycast", namespace="x")


def test_link_local_peer_keeps_its_interface() -> None:
    nc = NodeConfig.from_object(_obj({"bgp": {"asn": 65101, "peers": [FULL_PEER]}}))
    assert nc.spec.bgp is not None
    p = nc.spec.bgp.peers[0]
    assert str(p.address) == "fe80::1%eth0"
    assert p.bfd is not None and p.bfd.min_rx == 100
    assert p.password_secret_ref is not None and p.password_secret_ref.name == "bgp-auth"
