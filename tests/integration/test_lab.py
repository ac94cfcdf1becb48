"""The lab end to end, as root: up, the built-in checks, readiness at the router, down.

Uses a small topology (router + two nodes, a two-replica anycast pair, one
plain pod per node) under a lab name of its own (`fltest...`), so it never
touches a user's default lab. Every lab is brought down in a finaliser, also
when a test fails, and the last tests assert that `down` leaves no namespace,
process or directory behind, including after a simulated crash.
"""

from __future__ import annotations

import html
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flock.lab import build, checks, cli, core, inspect, pods, routes, state
from flock.lab.datastore import Kubectl
from flock.lab.topology import Topology, parse
from flock.testbed import netns
from flock.testbed.wait import wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

ANYCAST6 = "fd00:f10c:a::53"
ANYCAST4 = "198.18.100.53"
WAIT = 60.0  # deadline for the lab to converge on a loaded machine (not an expectation)


def _topology(name: str) -> Topology:
    allowed = [
        {"cidr": "fd00:f10c:a::/64", "use": ["anycast"]},
        {"cidr": "198.18.100.0/24", "use": ["anycast"]},
    ]
    data: dict[str, Any] = {
        "name": name,
        "router": {"asn": 65000, "addresses": ["fd00:f10c::1/64", "198.18.0.1/24"]},
        "nodes": [
            {
                "name": f"n{i}",
                "asn": 65100 + i,
                "uplink": [f"fd00:f10c::1{i}/64", f"198.18.0.1{i}/24"],
                "cidr6": [f"fd00:f10c:{i}::/64"],
                "cidr4": [f"198.18.{i}.0/24"],
                "allowedAddresses": allowed,
            }
            for i in (1, 2)
        ],
        "pods": [
            *(
                {
                    "name": f"dns-{i}",
                    "node": f"n{i}",
                    "labels": {"app": "dns"},
                    "annotations": {"anycast": f"{ANYCAST6}, {ANYCAST4}"},
                }
                for i in (1, 2)
            ),
            *({"name": f"web-{i}", "node": f"n{i}"} for i in (1, 2)),
        ],
    }
    return parse(data)


def _name() -> str:
    return "fltest" + secrets.token_hex(2)


def _nothing_left(name: str, pids: list[tuple[int, int]]) -> None:
    assert state.lab_netns(name) == []
    assert not state.run_dir(name).exists()
    # Every file the lab makes lives under its run dir: no temp dir named after it either.
    tmp = Path(tempfile.gettempdir())
    assert [p.name for p in tmp.iterdir() if name in p.name] == []
    alive = [pid for pid, st in pids if state.alive(pid, st)]
    assert alive == [], f"processes of lab {name} still running: {alive}"


def _next_hops(name: str, prefix: str) -> set[str]:
    lab = core.Lab.open(name)
    return routes.learned(lab).get(prefix, set())


def _wait_next_hops(name: str, prefix: str, want: set[str]) -> None:
    wait_until(
        lambda: _next_hops(name, prefix),
        until=lambda hops: hops == want,
        timeout=WAIT,
        what=f"router next hops {want} for {prefix}",
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[str]:
    name = _name()
    try:
        build.up(_topology(name), standalone=True)
        yield name
    finally:
        build.down(name)


def test_up_twice_is_a_clear_error(lab: str) -> None:
    with pytest.raises(core.LabError, match="already up"):
        build.up(_topology(lab), standalone=True)
    assert cli.main(["up", "--name", lab]) == 1


def test_lab_test_passes(lab: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["test", "--name", lab])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out
    for check in ("BGP sessions Established", "IPv6: router reaches every pod", "ECMP at router"):
        assert check in out


def test_status_shows_ecmp_and_pods(lab: str, capsys: pytest.CaptureFixture[str]) -> None:
    st = inspect.status(lab)
    assert {s.state for s in st.sessions} == {"Established"}
    assert len(st.sessions) == 4
    anycast = {r.prefix: {n for _, n in r.nexthops} for r in st.anycast_routes()}
    assert anycast == {f"{ANYCAST6}/128": {"n1", "n2"}, f"{ANYCAST4}/32": {"n1", "n2"}}
    assert all(p.addresses for p in st.pods)
    assert cli.main(["status", "--name", lab, "--json"]) == 0
    assert '"Established"' in capsys.readouterr().out


def test_ready_flip_withdraws_and_restores_at_the_router(lab: str) -> None:
    for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
        _wait_next_hops(lab, prefix, {"n1", "n2"})
    try:
        assert cli.main(["ready", "--name", lab, "dns-1", "false"]) == 0
        for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
            _wait_next_hops(lab, prefix, {"n2"})
        # Node prefixes are untouched by readiness.
        assert _next_hops(lab, "fd00:f10c:1::/64") == {"n1"}
        pods.ready(lab, "dns-2", False)
        for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
            _wait_next_hops(lab, prefix, set())
    finally:
        # The lab is shared by this module's tests: leave both replicas Ready, also on failure.
        pods.ready(lab, "dns-1", True)
        pods.ready(lab, "dns-2", True)
    for prefix in (f"{ANYCAST6}/128", f"{ANYCAST4}/32"):
        _wait_next_hops(lab, prefix, {"n1", "n2"})


def test_add_exec_delete_pod(lab: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["add-pod", "--name", lab, "extra", "--node", "n2", "--anycast", ANYCAST6]) == 0
    try:
        _wait_next_hops(lab, f"{ANYCAST6}/128", {"n1", "n2"})
        rec = core.Lab.open(lab).state.pods["default/extra"]
        assert rec.addresses and state.netns_prefix(lab) in rec.netns
        v6 = next(a for a in rec.addresses if ":" in a)
        assert (
            cli.main(["exec", "--name", lab, "web-1", "--", "ping", "-6", "-c1", "-W10", v6]) == 0
        )
        assert (
            cli.main(["exec", "--name", lab, "extra", "--", "ip", "-6", "addr", "show", "lo"]) == 0
        )
        assert ANYCAST6 in capfd.readouterr().out  # exec's output goes to the real stdout
        # The router's kernel holds one multipath route (zebra installs what bgpd selected
        # a moment later: awaited); the node has a host route to the pod.
        router_ns = core.Lab.open(lab).router_ns
        wait_until(
            lambda: netns.run(["ip", "-6", "route", "show", ANYCAST6], netns=router_ns).stdout,
            until=lambda out: out.count("nexthop via") == 2,
            timeout=WAIT,
            what="two next hops in the router's kernel",
        )
        assert (
            cli.main(["exec", "--name", lab, "router", "--", "ip", "-6", "route", "show", ANYCAST6])
            == 0
        )
        assert capfd.readouterr().out.count("nexthop via") == 2
        assert cli.main(["exec", "--name", lab, "n2", "--", "ip", "-6", "route", "show", v6]) == 0
        assert v6 in capfd.readouterr().out
    finally:
        assert cli.main(["delete-pod", "--name", lab, "extra"]) == 0
    assert "default/extra" not in core.Lab.open(lab).state.pods
    assert not any(n.endswith("-extra") for n in state.lab_netns(lab))
    # A bad pod is refused before anything is created.
    assert (
        cli.main(["add-pod", "--name", lab, "bad", "--node", "n1", "--anycast", "fd00:9::1"]) == 1
    )
    assert "allowedAddresses" in capfd.readouterr().err


def test_graph(lab: str, tmp_path: Any) -> None:
    files = inspect.graph(lab, tmp_path / "lab.svg")
    assert (tmp_path / "lab.svg") in files
    svg = html.unescape((tmp_path / "lab.svg").read_text())
    assert "default/dns-1" in svg and "BGP ipv6 Established" in svg


def test_down_removes_everything() -> None:
    name = _name()
    pids: list[tuple[int, int]] = []
    try:
        build.up(_topology(name), standalone=True)
        lab = core.Lab.open(name)
        pids = [(int(r.ident), r.start_time) for r in lab.state.processes()]
        assert pids and all(state.alive(p, s) for p, s in pids)
    finally:
        build.down(name)
    _nothing_left(name, pids)
    assert build.down(name) == f"lab '{name}': nothing to remove"


def test_down_after_a_crash() -> None:
    """Processes killed and the state file gone: down still finds everything by name."""
    name = _name()
    recorded: list[tuple[int, int]] = []
    survivors: list[tuple[int, int]] = []
    try:
        build.up(_topology(name), standalone=True)
        lab = core.Lab.open(name)
        recorded = [(int(r.ident), r.start_time) for r in lab.state.processes()]
        # The crash: the first process of each kind dies, and the state file is lost.
        os.kill(recorded[0][0], signal.SIGKILL)
        (state.run_dir(name) / state.STATE_FILE).unlink()
        survivors = state.pids_in_netns(state.lab_netns(name))
        assert survivors
        with pytest.raises(core.LabError, match="already up"):
            build.up(_topology(name), standalone=True)
    finally:
        build.down(name)
    _nothing_left(name, recorded + survivors)


def test_down_after_up_was_killed_half_way() -> None:
    """`flock lab up` dies (SIGKILL) while it is starting agents: down removes all it made."""
    name = _name()
    flock = str(Path(sys.executable).parent / "flock")
    recorded: list[tuple[int, int]] = []
    survivors: list[tuple[int, int]] = []
    proc = subprocess.Popen(
        [flock, "lab", "up", "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it at a moment it has started an agent (the state file may be half written).
        wait_until(
            lambda: [r.role for r in state.LabState.load(name).processes()],
            until=lambda roles: any(r.startswith("agent") for r in roles),
            timeout=WAIT,
            what="up to start an agent",
            ignore=(state.LabNotFoundError, ValueError, KeyError),
            interval=0.01,
        )
        proc.kill()
        proc.wait(10)
        recorded = [(int(r.ident), r.start_time) for r in state.LabState.load(name).processes()]
        survivors = state.pids_in_netns(state.lab_netns(name))
        assert survivors, "the daemons outlive the killed `up`"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        build.down(name)
    _nothing_left(name, recorded + survivors)


def test_default_topology_through_the_cli(capfd: pytest.CaptureFixture[str]) -> None:
    """What the README runs: `flock lab up` (built-in topology, on a real API server), `test`,
    `kubectl`, `down`."""
    name = _name()
    pids: list[tuple[int, int]] = []
    try:
        assert cli.main(["up", "--name", name]) == 0
        out = capfd.readouterr().out
        assert f"lab '{name}' is up" in out and "flock lab status" in out
        rc = cli.main(["test", "--name", name])
        out = capfd.readouterr().out
        assert rc == 0, out
        assert "18/18 checks passed" in out
        pids = [(int(r.ident), r.start_time) for r in core.Lab.open(name).state.processes()]
        # etcd and kube-apiserver, 2 FRR daemons, and BIRD + agent on each of the three nodes.
        assert len(pids) == 10
        # kubectl shows flock's work: NodeConfig status (sessions up/total) and pod IPs.
        kubectl = Kubectl.load(core.Lab.open(name).state.dir)
        wait_until(
            lambda: kubectl("get", "nodeconfigs").split(),
            until=lambda t: t.count("2/2") == 3 and t.count("True") == 3,
            timeout=WAIT,
            what="three NodeConfigs with 2/2 sessions and Ready True",
        )
        assert cli.main(["kubectl", "--name", name, "get", "pods", "-o", "wide"]) == 0
        table = capfd.readouterr().out
        assert "dns-1" in table and "fd00:f10c:1:" in table, table
    finally:
        assert cli.main(["down", "--name", name]) == 0
    _nothing_left(name, pids)


def test_ipv6_only_lab_with_a_replica_not_ready_at_start() -> None:
    """No IPv4 anywhere; a replica that starts not Ready is never advertised until Ready."""
    example = Path(__file__).resolve().parents[2] / "examples" / "lab-v6only.yaml"
    name = _name()
    topo = core.load_topology(example, name=name)
    pids: list[tuple[int, int]] = []
    try:
        build.up(topo, standalone=True)
        pids = [(int(r.ident), r.start_time) for r in core.Lab.open(name).state.processes()]
        assert _next_hops(name, "fd00:f10c:ff::1/128") == {"a"}
        results = checks.run_checks(name)
        assert all(r.ok for r in results), [r for r in results if not r.ok]
        assert not any("IPv4" in r.name for r in results)
        pods.ready(name, "svc-b", True)
        _wait_next_hops(name, "fd00:f10c:ff::1/128", {"a", "b"})
    finally:
        build.down(name)
    _nothing_left(name, pids)
