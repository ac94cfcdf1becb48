"""The lab's topology model, validation, manifests, state file and drawing: all pure, no root."""

from __future__ import annotations

import copy
import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flock.lab import graph, state
from flock.lab.datastore import ManifestsDatastore
from flock.lab.topology import (
    PodSpec,
    Topology,
    TopologyError,
    default_topology,
    default_topology_data,
    load,
    parse,
)
from flock.lab.view import (
    CheckResult,
    LabStatus,
    NodeView,
    PodView,
    RouteView,
    SessionView,
    render_checks,
    render_text,
)
from flock.model.nodeconfig import NodeConfig
from flock.model.pod import Namespace, Pod

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab-default.yaml"


def _data() -> dict[str, Any]:
    return copy.deepcopy(default_topology_data())


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(TopologyError) as ei:
        parse(data)
    return ei.value.problems


# -- the default ------------------------------------------------------------------------


def test_default_topology_is_valid_and_has_what_the_issue_asks() -> None:
    topo = default_topology()
    assert topo.name == "lab"
    assert len(topo.nodes) == 3
    anycast = [p for p in topo.pods if p.annotation_ips("anycast")]
    assert len(anycast) == 3
    assert {p.node for p in anycast} == {"node1", "node2", "node3"}
    fams = {ipaddress.ip_address(ip).version for ip in anycast[0].annotation_ips("anycast")}
    assert fams == {4, 6}
    assert len([p for p in topo.pods if p.annotation_ips("addresses")]) == 1


def test_example_file_is_the_built_in_default() -> None:
    assert load(EXAMPLE) == default_topology()


def test_prefixes_stay_in_private_space() -> None:
    topo = default_topology()
    ula = ipaddress.IPv6Network("fd00::/8")
    bench = ipaddress.IPv4Network("198.18.0.0/15")
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        a.network for a in topo.router.addresses
    ]
    for n in topo.nodes:
        nets += list(n.cidrs) + [a.cidr for a in n.allowed_addresses]
    for net in nets:
        assert net.subnet_of(ula) if net.version == 6 else net.subnet_of(bench), net  # type: ignore[arg-type]


def test_nodeconfig_written_for_a_node_parses_and_peers_with_the_router() -> None:
    topo = default_topology()
    nc = NodeConfig.from_object(topo.nodeconfig("node2"))
    assert nc.spec.bgp is not None
    assert nc.spec.bgp.asn == 65102
    assert {str(p.address) for p in nc.spec.bgp.peers} == {"fd00:f10c::1", "198.18.0.1"}
    assert all(p.asn == 65000 for p in nc.spec.bgp.peers)
    assert nc.claim_permitted(
        ipaddress.ip_address("fd00:f10c:a::53"), use="anycast", namespace="default"
    )


def test_short_annotation_keys_get_the_flock_prefix() -> None:
    p = PodSpec(name="x", node="n", annotations={"anycast": "fd00::1", "example.com/k": "v"})  # type: ignore[arg-type]
    assert p.annotations == {"flock.fritzlab.net/anycast": "fd00::1", "example.com/k": "v"}


# -- validation: every problem, named -------------------------------------------------------


def test_unknown_node_is_named() -> None:
    d = _data()
    d["pods"][0]["node"] = "node9"
    (msg,) = _problems(d)
    assert "pods[0] (default/dns-1).node" in msg and "'node9'" in msg and "node1" in msg


def test_asn_clash_between_nodes_and_with_router() -> None:
    d = _data()
    d["nodes"][1]["asn"] = 65101
    d["nodes"][2]["asn"] = 65000
    msgs = _problems(d)
    assert any("nodes[1] (node2).asn" in m and "node1" in m for m in msgs)
    assert any("nodes[2] (node3).asn" in m and "router" in m for m in msgs)


def test_reserved_asn() -> None:
    d = _data()
    d["router"]["asn"] = 23456
    assert any("router.asn" in m and "reserved" in m for m in _problems(d))


def test_overlapping_pod_prefixes() -> None:
    d = _data()
    d["nodes"][2]["cidr4"] = ["198.18.1.128/25"]
    (msg,) = _problems(d)
    assert "198.18.1.128/25 overlaps 198.18.1.0/24 of node node1" in msg


def test_pod_prefix_overlapping_the_lan() -> None:
    d = _data()
    d["nodes"][0]["cidr6"] = ["fd00:f10c::/64"]
    assert any("overlaps fd00:f10c::/64 of the router LAN" in m for m in _problems(d))


def test_allowed_addresses_inside_a_pod_prefix_rejected() -> None:
    d = _data()
    d["nodes"][0]["allowedAddresses"] = [{"cidr": "fd00:f10c:2::/80"}]
    assert any("allowedAddresses[0]" in m and "node node2" in m for m in _problems(d))


def test_anycast_outside_allowed_addresses() -> None:
    d = _data()
    d["pods"][0]["annotations"] = {"anycast": "fd00:f10c:c::53"}
    (msg,) = _problems(d)
    assert "pods[0] (default/dns-1)" in msg and "fd00:f10c:c::53" in msg
    assert "allowedAddresses" in msg


def test_anycast_range_not_usable_for_addresses() -> None:
    d = _data()
    d["pods"][1]["annotations"] = {"addresses": "fd00:f10c:a::99"}
    (msg,) = _problems(d)
    assert "default/web-1" in msg and "fd00:f10c:a::99" in msg


def test_same_addresses_on_two_pods() -> None:
    d = _data()
    d["pods"][1]["annotations"] = {"addresses": "198.18.101.80"}
    (msg,) = _problems(d)
    assert "198.18.101.80 is already used by default/web-1" in msg


def test_malformed_annotation_value_named() -> None:
    d = _data()
    d["pods"][1]["annotations"] = {"ipv4": "yes"}
    (msg,) = _problems(d)
    assert "flock.fritzlab.net/ipv4" in msg and "yes" in msg


def test_uplink_off_the_router_lan() -> None:
    d = _data()
    d["nodes"][0]["uplink"] = ["fd00:f10c:9::11/64", "198.18.0.1/24"]
    msgs = _problems(d)
    assert any("not on the router's LAN fd00:f10c::/64" in m for m in msgs)
    assert any("198.18.0.1 is already used by router" in m for m in msgs)


def test_v4_prefix_without_v4_uplink() -> None:
    d = _data()
    d["nodes"][0]["uplink"] = ["fd00:f10c::11/64"]
    assert any("nodes[0] (node1).cidr4" in m for m in _problems(d))


def test_bad_names_and_duplicates() -> None:
    d = _data()
    d["name"] = "my-lab"
    d["nodes"][1]["name"] = "node1"
    d["nodes"][2]["name"] = "averylongname1"  # the router's port would exceed 15 characters
    d["pods"].append(dict(d["pods"][0]))
    msgs = _problems(d)
    assert any(m.startswith("name:") for m in msgs)
    assert any("'node1' is used twice" in m for m in msgs)
    assert any("nodes[2].name: 'averylongname1' must be 1-12" in m for m in msgs)
    assert any("default/dns-1 is defined twice" in m for m in msgs)


def test_schema_errors_carry_the_path() -> None:
    d = _data()
    d["nodes"][0]["cidr6"] = ["fd00:f10c:1::1/64"]
    d["router"]["addresses"] = ["fd00:f10c::1"]
    d["nodes"][1]["colour"] = "red"
    msgs = _problems(d)
    assert any(m.startswith("nodes[0].cidr6") and "fd00:f10c:1::1/64" in m for m in msgs)
    assert any(m.startswith("router.addresses") and "prefix length" in m for m in msgs)
    assert any(m.startswith("nodes[1].colour") for m in msgs)


def test_load_reports_file_problems(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(TopologyError, match="mapping at the top level"):
        load(bad)


def test_pod_edits_keep_the_rest() -> None:
    topo = default_topology()
    extra = PodSpec(name="extra", node="node3")
    t2 = topo.with_pod(extra).with_ready("default/dns-2", False)
    assert t2.pod("extra") == extra
    assert t2.pod("dns-2").ready is False and topo.pod("dns-2").ready is True
    assert t2.without_pod("default/extra").pods == topo.with_ready("default/dns-2", False).pods
    round_trip = Topology.model_validate(json.loads(json.dumps(t2.model_dump(mode="json"))))
    assert round_trip == t2


# -- manifests: what the agent will read ---------------------------------------------------


def test_manifests_round_trip_through_the_agent_models(tmp_path: Path) -> None:
    topo = default_topology()
    ds = ManifestsDatastore(tmp_path)
    ds.put_node_config(topo.nodeconfig("node1"))
    ds.put_namespace("default")
    pod = topo.pod("dns-1")
    uid = ds.create_pod(pod)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["namespace-default.yaml", "nodeconfig-node1.yaml", "pod-default-dns-1.yaml"]
    nc = NodeConfig.from_object(yaml.safe_load((tmp_path / files[1]).read_text()))
    assert nc.name == "node1"
    p = Pod.from_object(yaml.safe_load((tmp_path / files[2]).read_text()))
    assert (p.namespace, p.name, p.node_name, p.uid, p.ready) == (
        "default",
        "dns-1",
        "node1",
        uid,
        False,
    )
    assert p.annotations["flock.fritzlab.net/anycast"] == "fd00:f10c:a::53, 198.18.100.53"
    assert p.labels == {"app": "dns"}
    ds.set_status(pod, uid=uid, ready=True, ips=["fd00:f10c:1::5", "198.18.1.5"])
    p = Pod.from_object(yaml.safe_load((tmp_path / files[2]).read_text()))
    assert p.ready and [str(i) for i in p.ips] == ["fd00:f10c:1::5", "198.18.1.5"]
    ns = Namespace.from_object(yaml.safe_load((tmp_path / files[0]).read_text()))
    assert ns.name == "default"
    ds.delete_pod("default", "dns-1")
    ds.delete_pod("default", "dns-1")  # idempotent
    assert not (tmp_path / files[2]).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# -- state file -----------------------------------------------------------------------


def test_state_records_and_locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "RUN_ROOT", tmp_path)
    st = state.LabState.create("fltestu")
    st.add_netns("fl-fltestu-router", role="router")
    st.add_process(1, role="init")
    st.pods["default/a"] = state.PodRecord("default", "a", "node1", "fl-fltestu-p1", "c1")
    st.save()
    with pytest.raises(state.LabExistsError, match="already up"):
        state.LabState.create("fltestu")
    again = state.LabState.load("fltestu")
    assert [r.kind for r in again.resources] == ["dir", "netns", "process"]
    assert again.resources[2].start_time > 0
    assert again.pods["default/a"].netns == "fl-fltestu-p1"
    assert state.running_labs() == ["fltestu"]
    with pytest.raises(state.LabNotFoundError, match="not up"):
        state.LabState.load("other")


def test_netns_prefixes_do_not_nest() -> None:
    assert not state.netns_prefix("lab2").startswith(state.netns_prefix("lab"))
    assert not "fl-lab2-node1".startswith(state.netns_prefix("lab"))


# -- status and graph ------------------------------------------------------------------


def _status() -> LabStatus:
    return LabStatus(
        name="lab",
        phase="up",
        router_name="router",
        router_asn=65000,
        router_addresses=["fd00:f10c::1/64"],
        router_netns="fl-lab-router",
        router_alive=True,
        nodes=[
            NodeView(
                "node1",
                65101,
                ["fd00:f10c::11/64"],
                ["fd00:f10c:1::/64"],
                "fl-lab-node1",
                {"agent": True},
            ),
            NodeView(
                "node2",
                65102,
                ["fd00:f10c::12/64"],
                ["fd00:f10c:2::/64"],
                "fl-lab-node2",
                {"agent": False},
            ),
        ],
        sessions=[
            SessionView("node1", "fd00:f10c::11", "ipv6", "Established", 2),
            SessionView("node2", "fd00:f10c::12", "ipv6", "Active", 0),
        ],
        routes=[
            RouteView("fd00:f10c:a::53/128", [("fd00:f10c::11", "node1")], "anycast"),
            RouteView("fd00:f10c:1::/64", [("fd00:f10c::11", "node1")], "node prefix"),
        ],
        pods=[
            PodView("default", "dns-1", "node1", True, ["fd00:f10c:1::2"], ["fd00:f10c:a::53"]),
            PodView("default", "dns-2", "node2", False, ["fd00:f10c:2::2"], ["fd00:f10c:a::53"]),
        ],
    )


def test_status_text_and_json() -> None:
    st = _status()
    text = render_text(st)
    assert "fd00:f10c:a::53/128" in text and "fd00:f10c::11 (node1)" in text
    assert "agent:DOWN" in text
    assert LabStatus.from_dict(json.loads(st.to_json())) == st


def test_dot_draws_anycast_paths_only_to_ready_next_hops() -> None:
    dot = graph.to_dot(_status())
    assert '"anycast/fd00:f10c:a::53/128" -> "pod/default/dns-1"' in dot
    assert '"anycast/fd00:f10c:a::53/128" -> "pod/default/dns-2"' not in dot
    assert "(not Ready)" in dot
    assert 'color=red, label="BGP ipv6 Active"' in dot


def test_graph_renders_svg(tmp_path: Path) -> None:
    if not graph.shutil.which("dot"):
        pytest.skip("Graphviz `dot` not installed")
    files = graph.render(_status(), tmp_path / "lab.svg")
    svg = tmp_path / "lab.svg"
    assert svg in files and svg.read_text().lstrip().startswith(("<?xml", "<svg"))


def test_check_table() -> None:
    out = render_checks([CheckResult("a", True, "fine"), CheckResult("b", False, "broken")])
    assert "PASS    a" in out and "FAIL    b" in out and "1/2 checks passed" in out


# -- the router's view, from FRR's JSON (shape as FRR 8.4 prints it) -------------------


def _summary_json() -> dict[str, Any]:
    def peer(state: str, pfx: int) -> dict[str, Any]:
        return {"state": state, "pfxRcd": pfx, "peerUptime": "00:01:02", "remoteAs": 65101}

    return {
        "ipv4Unicast": {"routerId": "198.18.0.1", "peers": {"198.18.0.11": peer("Established", 3)}},
        "ipv6Unicast": {
            "peers": {
                "fd00:f10c::11": peer("Established", 3),
                "fd00:f10c::12": peer("Active", 0),
            }
        },
    }


def test_sessions_cover_every_configured_peer() -> None:
    from flock.lab.router import parse_summary

    sessions = parse_summary(default_topology(), _summary_json())
    assert len(sessions) == 6  # three nodes, two families, also those FRR did not list
    by_peer = {s.peer: s for s in sessions}
    assert by_peer["198.18.0.11"].node == "node1"
    assert by_peer["198.18.0.11"].state == "Established"
    assert by_peer["198.18.0.11"].prefixes_received == 3
    assert by_peer["fd00:f10c::12"].state == "Active"
    assert by_peer["fd00:f10c::13"].state == "(none)"
    assert by_peer["198.18.0.13"].family == "ipv4"


def test_routes_named_by_node_and_kind() -> None:
    from flock.lab.router import parse_routes

    routes = parse_routes(
        default_topology(),
        {
            "198.18.100.53/32": {"198.18.0.12", "198.18.0.11"},
            "fd00:f10c:1::/64": {"fd00:f10c::11"},
            "fd00:f10c:b::80/128": {"fd00:f10c::11"},
            "fd00:f10c:2:0:1::7/128": {"fd00:f10c::12"},
        },
    )
    assert [(r.prefix, r.kind) for r in routes] == [
        ("fd00:f10c:1::/64", "node prefix"),
        ("198.18.100.53/32", "anycast"),
        ("fd00:f10c:b::80/128", "addresses"),
        ("fd00:f10c:2:0:1::7/128", "pod"),  # a host route inside a node prefix
    ]
    assert routes[1].nexthops == [("198.18.0.11", "node1"), ("198.18.0.12", "node2")]


def test_router_config_retries_every_node_session() -> None:
    from flock.lab.router import connect_retry, neighbors

    topo = default_topology()
    assert len(neighbors(topo)) == 6
    lines = connect_retry(topo)
    assert lines[0] == "router bgp 65000"
    assert " neighbor 198.18.0.13 timers connect 1" in lines


@pytest.mark.parametrize("path", sorted(EXAMPLE.parent.glob("lab-*.yaml")), ids=lambda p: p.name)
def test_every_example_topology_is_valid(path: Path) -> None:
    topo = load(path)
    assert topo.nodes and topo.pods


# -- the CLI, where it needs no lab ----------------------------------------------------


def test_cli_verbs_match_the_parser() -> None:
    import argparse

    from flock.lab import cli

    sub = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli.VERBS)


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flock.lab import cli

    assert cli.main(["validate", str(EXAMPLE)]) == 0
    assert "topology lab: OK (3 nodes, 8 pods)" in capsys.readouterr().out
    d = _data()
    d["pods"][0]["node"] = "nowhere"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    assert cli.main(["validate", str(bad)]) == 1
    assert "unknown node 'nowhere'" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_cli_verbs_on_a_lab_that_is_not_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flock.lab import cli

    monkeypatch.setattr(state, "RUN_ROOT", tmp_path)
    for argv in (
        ["status"],
        ["ready", "dns-1", "false"],
        ["test"],
        ["exec", "web-1", "--", "true"],
    ):
        assert cli.main([argv[0], "--name", "flnone", *argv[1:]]) == 1
        assert "lab 'flnone' is not up" in capsys.readouterr().err
