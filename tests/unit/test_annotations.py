"""The annotation parser: strict values, errors naming key and token, conflicts, allow-list."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flock.compile.annotations import KNOWN_KEYS, AnnotationError, parse_annotations
from flock.model.nodeconfig import NodeConfig

P = "flock.fritzlab.net/"
ip = ipaddress.ip_address
net = ipaddress.ip_network


def node(
    *,
    cidr6: tuple[str, ...] = ("2001:db8:f001::/64",),
    cidr4: tuple[str, ...] = ("192.0.2.0/24",),
    defaults: dict[str, bool] | None = None,
    allowed: list[dict[str, Any]] | None = None,
    name: str = "node-a",
) -> NodeConfig:
    spec: dict[str, Any] = {"cidr6": list(cidr6), "cidr4": list(cidr4)}
    if defaults is not None:
        spec["defaults"] = defaults
    spec["allowedAddresses"] = (
        allowed
        if allowed is not None
        else [{"cidr": "2001:db8:a::/48"}, {"cidr": "198.51.100.0/24"}]
    )
    return NodeConfig.from_object(
        {
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


NODE = node()


def parse(ann: dict[str, str], nc: NodeConfig = NODE, namespace: str = "default") -> Any:
    return parse_annotations({P + k: v for k, v in ann.items()}, node=nc, namespace=namespace)


def error(
    ann: dict[str, str], nc: NodeConfig = NODE, namespace: str = "default"
) -> AnnotationError:
    with pytest.raises(AnnotationError) as info:
        parse(ann, nc, namespace)
    return info.value


# ---- defaults ------------------------------------------------------------------


def test_no_annotations_is_dual_stack_from_node_ranges() -> None:
    r = parse({})
    assert r.v6.want and r.v4.want
    assert r.v6.ranges == (net("2001:db8:f001::/64"),)
    assert r.v4.ranges == (net("192.0.2.0/24"),)
    assert r.v6.primary is None and r.v4.primary is None
    assert r.embed == () and r.anycast == () and r.extra_addresses == ()


def test_foreign_annotations_are_ignored() -> None:
    r = parse_annotations(
        {
            "kubernetes.io/psp": "x",
            "sub.flock.fritzlab.net/ipv6": "maybe",
            "flock.fritzlab.net": "?",
        },
        node=NODE,
        namespace="default",
    )
    assert r.v6.want and r.v4.want


@pytest.mark.parametrize(
    "key", ["IPv6", "ipv6 ", "anycasts", "ip_algo", "agent", "", "cidr6/extra", "address"]
)
def test_unknown_key_under_prefix_is_an_error(key: str) -> None:
    e = error({key: "true"})
    assert e.key == P + key
    assert "unknown flock annotation" in str(e)


# ---- bools ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [("true", True), ("false", False), ("TRUE", True), (" False ", False), ("\ttRuE\n", True)],
)
def test_bool_accepts_only_true_false(value: str, want: bool) -> None:
    r = parse({"ipv4": value})
    assert r.v4.want is want
    r = parse({"ipv6": value, "ipv4": "true"})
    assert r.v6.want is want


@pytest.mark.parametrize(
    "value", ["1", "0", "yes", "no", "", "t", "on", "true false", "truee", "tru"]
)
@pytest.mark.parametrize("key", ["ipv6", "ipv4"])
def test_bool_rejects_everything_else(key: str, value: str) -> None:
    e = error({key: value})
    assert e.key == P + key
    assert e.token == value
    assert P + key in str(e) and repr(value) in str(e)


def test_annotation_overrides_node_default_both_ways() -> None:
    v6only = node(defaults={"ipv6": True, "ipv4": False})
    assert not parse({}, v6only).v4.want
    assert parse({"ipv4": "true"}, v6only).v4.want
    assert not parse({"ipv6": "false"}).v6.want


# ---- neither family / missing ranges ---------------------------------------------


def test_neither_family_by_annotations_names_node_and_keys() -> None:
    e = error({"ipv6": "false", "ipv4": "false"})
    msg = str(e)
    assert "node-a" in msg
    assert P + "ipv6=false" in msg and P + "ipv4=false" in msg


def test_neither_family_by_node_defaults_names_fields() -> None:
    off = node(defaults={"ipv6": False, "ipv4": False})
    msg = str(error({}, off))
    assert "node-a" in msg
    assert "spec.defaults.ipv6=false" in msg and "spec.defaults.ipv4=false" in msg


def test_neither_family_mixed_sources() -> None:
    msg = str(error({"ipv6": "false"}, node(defaults={"ipv4": False})))
    assert P + "ipv6=false" in msg and "spec.defaults.ipv4=false" in msg


def test_wanted_family_without_node_range_is_an_error() -> None:
    v6_only_ranges = node(cidr4=())
    msg = str(error({}, v6_only_ranges))
    assert "spec.cidr4" in msg and "spec.defaults.ipv4" in msg and "node-a" in msg
    e = error({"ipv4": "true"}, node(cidr4=(), defaults={"ipv4": False}))
    assert e.key == P + "ipv4" and "remove the annotation" in str(e)


def test_wanted_family_without_range_is_fine_when_addresses_supply_it() -> None:
    r = parse({"addresses": "198.51.100.7"}, node(cidr4=()))
    assert r.v4.want and r.v4.primary == ip("198.51.100.7") and r.v4.ranges == ()


# ---- cidr6 / cidr4 ---------------------------------------------------------------


def test_cidr_sub_ranges_inside_node_range() -> None:
    r = parse(
        {"cidr6": "2001:db8:f001::ab00/120, 2001:db8:f001:0:1::/80", "cidr4": "192.0.2.64/26"}
    )
    assert r.v6.ranges == (net("2001:db8:f001::ab00/120"), net("2001:db8:f001:0:1::/80"))
    assert r.v4.ranges == (net("192.0.2.64/26"),)


def test_cidr_tiny_sub_range_away_from_network_and_broadcast() -> None:
    assert parse({"cidr4": "192.0.2.10/31, 192.0.2.7/32"}).v4.ranges == (
        net("192.0.2.10/31"),
        net("192.0.2.7/32"),
    )


def test_cidr_equal_to_node_range_is_allowed() -> None:
    assert parse({"cidr4": "192.0.2.0/24"}).v4.ranges == (net("192.0.2.0/24"),)


def test_cidr_inside_second_node_range() -> None:
    two = node(cidr4=("192.0.2.0/24", "203.0.113.0/24"))
    assert parse({"cidr4": "203.0.113.128/25"}, two).v4.ranges == (net("203.0.113.128/25"),)


@pytest.mark.parametrize(
    ("key", "value", "token", "why"),
    [
        ("cidr4", "192.0.3.0/28", "192.0.3.0/28", "not inside"),
        ("cidr4", "192.0.0.0/16", "192.0.0.0/16", "not inside"),
        ("cidr4", "192.0.2.1/28", "192.0.2.1/28", "not a network"),
        ("cidr4", "192.0.2.0", "192.0.2.0", "expected a CIDR"),
        ("cidr4", "2001:db8:f001::/80", "2001:db8:f001::/80", "not an IPv4"),
        ("cidr6", "192.0.2.0/28", "192.0.2.0/28", "not an IPv6"),
        ("cidr6", "2001:db8:f002::/80", "2001:db8:f002::/80", "not inside"),
        ("cidr6", "2001:db8:f001::/80,2001:db8:f001::/80", "2001:db8:f001::/80", "duplicate"),
        ("cidr6", "2001:db8:f001::/80,", "2001:db8:f001::/80,", "empty item"),
        ("cidr6", "", "", "empty value"),
        ("cidr6", "bogus/64", "bogus/64", "not a network"),
        ("cidr4", "192.0.2.0/33", "192.0.2.0/33", "not a network"),
        ("cidr4", "192.0.2.0/24 192.0.2.0/25", "192.0.2.0/24 192.0.2.0/25", "not a network"),
        ("cidr4", "192.0.2.255/32", "192.0.2.255/32", "broadcast address of 192.0.2.0/24"),
        ("cidr4", "192.0.2.0/31", "192.0.2.0/31", "network or broadcast"),
    ],
)
def test_cidr_errors_name_key_and_token(key: str, value: str, token: str, why: str) -> None:
    e = error({key: value})
    assert e.key == P + key
    assert e.token == token
    assert why in str(e)


def test_cidr_on_node_without_that_family_range() -> None:
    e = error({"cidr4": "192.0.2.0/28"}, node(cidr4=(), defaults={"ipv4": True}))
    assert e.key == P + "cidr4"


def test_cidr_for_disabled_family_is_an_error() -> None:
    e = error({"ipv4": "false", "cidr4": "192.0.2.0/28"})
    assert e.key == P + "cidr4" and "disabled" in str(e)


def test_cidr_with_supplied_primary_of_that_family_is_an_error() -> None:
    e = error({"addresses": "2001:db8:a::1", "cidr6": "2001:db8:f001::/80"})
    assert e.key == P + "cidr6" and "no effect" in str(e)


# ---- ip-algo -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("namespace", ("namespace",)),
        ("namespace,pod", ("namespace", "pod")),
        ("pod, namespace", ("pod", "namespace")),
        (" image ,pod,namespace ", ("image", "pod", "namespace")),
    ],
)
def test_ip_algo_ordered_subset(value: str, want: tuple[str, ...]) -> None:
    assert parse({"ip-algo": value}).embed == want


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("namespace,namespace", "namespace"),
        ("node", "node"),
        ("Namespace", "Namespace"),
        ("namespace,,pod", "namespace,,pod"),
        ("", ""),
        ("namespace;pod", "namespace;pod"),
    ],
)
def test_ip_algo_errors(value: str, token: str) -> None:
    e = error({"ip-algo": value})
    assert e.key == P + "ip-algo" and e.token == token


def test_ip_algo_needs_ipv6() -> None:
    assert error({"ip-algo": "pod", "ipv6": "false"}).key == P + "ip-algo"


def test_ip_algo_with_supplied_v6_primary_is_an_error() -> None:
    assert error({"ip-algo": "pod", "addresses": "2001:db8:a::9"}).key == P + "ip-algo"


def test_ip_algo_that_cannot_fit_the_range_is_an_error_at_parse_time() -> None:
    e = error({"ip-algo": "namespace,pod", "cidr6": "2001:db8:f001::/96"})
    assert e.key == P + "ip-algo" and "random bits" in str(e)
    assert parse({"ip-algo": "namespace", "cidr6": "2001:db8:f001::/96"}).embed == ("namespace",)


# ---- anycast / addresses -----------------------------------------------------------


def test_addresses_first_of_each_family_become_primaries() -> None:
    r = parse({"addresses": "198.51.100.5, 2001:db8:a::5, 198.51.100.6, 2001:db8:a::6"})
    assert r.v4.primary == ip("198.51.100.5")
    assert r.v6.primary == ip("2001:db8:a::5")
    assert r.extra_addresses == (ip("198.51.100.6"), ip("2001:db8:a::6"))


def test_addresses_one_family_leaves_the_other_to_ipam() -> None:
    r = parse({"addresses": "2001:db8:a::5"})
    assert r.v6.primary == ip("2001:db8:a::5")
    assert r.v4.primary is None and r.v4.ranges == (net("192.0.2.0/24"),)


def test_anycast_mixed_families() -> None:
    r = parse({"anycast": "2001:db8:a::53, 198.51.100.53"})
    assert r.anycast == (ip("2001:db8:a::53"), ip("198.51.100.53"))
    assert r.v6.primary is None


@pytest.mark.parametrize("key", ["anycast", "addresses"])
@pytest.mark.parametrize(
    ("value", "token", "why"),
    [
        ("2001:db8:a::1,2001:db8:a:0::1", "2001:db8:a:0::1", "duplicate"),
        ("198.51.100.1, 198.51.100.1", "198.51.100.1", "duplicate"),
        ("198.51.100.1/32", "198.51.100.1/32", "not a prefix"),
        ("2001:db8:a::1%eth0", "2001:db8:a::1%eth0", "zone"),
        ("nope", "nope", "not an IPv4 or IPv6"),
        ("198.51.100.1,", "198.51.100.1,", "empty item"),
        ("", "", "empty value"),
        ("::ffff:198.51.100.1", "::ffff:198.51.100.1", "IPv4-mapped"),
        ("127.0.0.1", "127.0.0.1", "loopback"),
        ("fe80::1", "fe80::1", "link-local"),
        ("ff02::1", "ff02::1", "multicast"),
        ("0.0.0.0", "0.0.0.0", "unspecified"),
        ("255.255.255.255", "255.255.255.255", "broadcast"),
        ("198.51.100.1 198.51.100.2", "198.51.100.1 198.51.100.2", "not an IPv4 or IPv6"),
        ("198.051.100.1", "198.051.100.1", "not an IPv4 or IPv6"),
    ],
)
def test_ip_list_errors_name_key_and_token(key: str, value: str, token: str, why: str) -> None:
    e = error({key: value})
    assert e.key == P + key
    assert e.token == token
    assert why in str(e)


def test_same_ip_in_anycast_and_addresses_is_an_error() -> None:
    e = error({"anycast": "198.51.100.9", "addresses": "198.51.100.9"})
    assert e.token == "198.51.100.9"


# The conflict cases from the reference change notes: an anycast/addresses IP
# whose family is disabled for the pod, by annotation or by NodeConfig default.
V4_OFF_BY_ANN: tuple[dict[str, str], NodeConfig] = ({"ipv4": "false"}, NODE)
V4_OFF_BY_NODE: tuple[dict[str, str], NodeConfig] = ({}, node(defaults={"ipv4": False}))
V6_OFF_BY_ANN: tuple[dict[str, str], NodeConfig] = ({"ipv6": "false"}, NODE)
V6_OFF_BY_NODE: tuple[dict[str, str], NodeConfig] = ({}, node(defaults={"ipv6": False}))


@pytest.mark.parametrize("key", ["addresses", "anycast"])
@pytest.mark.parametrize(
    ("off", "addr", "source"),
    [
        (V4_OFF_BY_ANN, "198.51.100.7", P + "ipv4=false"),
        (V4_OFF_BY_NODE, "198.51.100.7", "spec.defaults.ipv4=false"),
        (V6_OFF_BY_ANN, "2001:db8:a::7", P + "ipv6=false"),
        (V6_OFF_BY_NODE, "2001:db8:a::7", "spec.defaults.ipv6=false"),
    ],
    ids=["ipv4-annotation", "ipv4-node-default", "ipv6-annotation", "ipv6-node-default"],
)
def test_family_conflict(
    key: str, off: tuple[dict[str, str], NodeConfig], addr: str, source: str
) -> None:
    ann, nc = off
    e = error({**ann, key: addr}, nc)
    assert e.key == P + key
    assert e.token == addr
    assert "disabled" in str(e) and source in str(e)


@pytest.mark.parametrize("key", ["addresses", "anycast"])
def test_family_conflict_found_in_the_middle_of_a_mixed_list(key: str) -> None:
    e = error({"ipv4": "false", key: "2001:db8:a::1, 198.51.100.2, 2001:db8:a::3"})
    assert e.token == "198.51.100.2"


def test_annotation_can_reenable_family_disabled_by_node_for_addresses() -> None:
    nc = node(defaults={"ipv4": False})
    r = parse({"ipv4": "true", "addresses": "198.51.100.7"}, nc)
    assert r.v4.primary == ip("198.51.100.7")


def test_only_enabled_family_addresses_pass() -> None:
    r = parse({"ipv4": "false", "anycast": "2001:db8:a::53", "addresses": "2001:db8:a::5"})
    assert not r.v4.want and r.v6.primary == ip("2001:db8:a::5")


# ---- allow-list (spec.allowedAddresses, default deny) -------------------------------


@pytest.mark.parametrize("key", ["addresses", "anycast"])
def test_default_deny_without_allow_list(key: str) -> None:
    e = error({key: "198.51.100.7"}, node(allowed=[]))
    assert e.key == P + key and e.token == "198.51.100.7"
    assert "allowedAddresses" in str(e) and "default deny" in str(e)


def test_allow_list_outside_cidr_denied() -> None:
    e = error({"anycast": "203.0.113.1"})
    assert e.token == "203.0.113.1"


def test_node_pod_range_is_not_implicitly_allowed() -> None:
    # A pod must not squat another pod's pool address by naming it.
    e = error({"addresses": "192.0.2.10"})
    assert e.key == P + "addresses"


def test_allow_list_by_use() -> None:
    nc = node(allowed=[{"cidr": "198.51.100.0/24", "use": ["anycast"]}])
    assert parse({"anycast": "198.51.100.53"}, nc).anycast == (ip("198.51.100.53"),)
    assert error({"addresses": "198.51.100.53"}, nc).key == P + "addresses"


def test_allow_list_by_namespace() -> None:
    nc = node(allowed=[{"cidr": "2001:db8:a::/48", "namespaces": ["dns"]}])
    assert parse({"anycast": "2001:db8:a::53"}, nc, namespace="dns").anycast
    e = error({"anycast": "2001:db8:a::53"}, nc, namespace="default")
    assert "'default'" in str(e)


def test_allow_list_family_must_match() -> None:
    nc = node(allowed=[{"cidr": "::/0"}])
    assert error({"anycast": "198.51.100.1"}, nc).token == "198.51.100.1"


# ---- properties ---------------------------------------------------------------------

_tokens = st.sampled_from(
    [
        "true",
        "FALSE",
        " yes",
        "2001:db8:f001::/80",
        "2001:db8:a::1",
        "198.51.100.1",
        "192.0.2.0/28",
        "namespace",
        "pod",
        "image",
        "",
        ",",
        "%",
        "/",
        "::",
        "0.0.0.0/0",
        "2001:db8:f001::/64",
        "fe80::1%lo",
    ]
)
_values = st.one_of(
    st.text(max_size=40),
    st.lists(_tokens, max_size=5).map(",".join),
    st.lists(st.one_of(_tokens, st.text(max_size=8)), max_size=4).map(", ".join),
)
_keys = st.one_of(
    st.sampled_from(sorted(KNOWN_KEYS)).map(lambda k: P + k),
    st.text(max_size=10).map(lambda k: P + k),
    st.text(max_size=20),
)


@settings(max_examples=400, deadline=None)
@given(
    ann=st.dictionaries(_keys, _values, max_size=6),
    namespace=st.sampled_from(["default", "dns", ""]),
    defaults=st.sampled_from(
        [None, {"ipv6": False}, {"ipv4": False}, {"ipv6": False, "ipv4": False}]
    ),
)
def test_parse_raises_only_annotation_error(
    ann: dict[str, str], namespace: str, defaults: dict[str, bool] | None
) -> None:
    nc = node(defaults=defaults)
    try:
        r = parse_annotations(ann, node=nc, namespace=namespace)
    except AnnotationError as e:
        assert str(e)
        return
    # Whatever parses is self-consistent.
    assert r.v6.want or r.v4.want
    for fam, version in ((r.v6, 6), (r.v4, 4)):
        if not fam.want:
            assert fam.primary is None and fam.ranges == ()
            assert all(a.version != version for a in (*r.anycast, *r.extra_addresses))
            continue
        assert fam.primary is not None or fam.ranges
        for rng in fam.ranges:
            assert any(rng.subnet_of(n) for n in nc.ranges(version))  # type: ignore[arg-type]
    for a in r.anycast:
        assert nc.claim_permitted(a, use="anycast", namespace=namespace)
    for a in (*r.extra_addresses, *(x for x in (r.v6.primary, r.v4.primary) if x)):
        assert nc.claim_permitted(a, use="addresses", namespace=namespace)
    assert len(set(r.embed)) == len(r.embed)
