"""`flock lab status` and `flock lab graph`: the lab as FRR and the agents see it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flock.lab import graph as lab_graph
from flock.lab import router as lab_router
from flock.lab import state as lab_state
from flock.lab.core import Lab, LabError, node_netns
from flock.lab.view import AgentView, LabStatus, NodeView, PodView, RouteView


def status(name: str) -> LabStatus:
    lab = Lab.open(name)
    return _status(lab)


def _alive(lab: Lab, role: str) -> bool:
    return any(
        r.role == role and lab_state.alive(int(r.ident), r.start_time)
        for r in lab.state.processes()
    )


def _status(lab: Lab) -> LabStatus:
    topo = lab.topo
    problems: list[str] = []
    router_roles = sorted({r.role for r in lab.state.processes() if r.role.startswith("frr")})
    router_alive = bool(router_roles) and all(_alive(lab, r) for r in router_roles)
    sessions = []
    routes: list[RouteView] = []
    try:
        sessions = lab_router.parse_summary(topo, lab.vtysh("show bgp summary json"))
        routes = lab_router.parse_routes(topo, lab.selected_routes())
    except (LabError, subprocess.SubprocessError, ValueError, OSError) as e:
        problems.append(f"cannot query FRR: {e}")
    nodes = []
    for n in topo.nodes:
        roles = sorted({r.role for r in lab.state.processes() if r.role.endswith(f" {n.name}")})
        nodes.append(
            NodeView(
                name=n.name,
                asn=n.asn,
                uplink=[str(a) for a in n.uplink],
                cidrs=[str(c) for c in n.cidrs],
                netns=node_netns(lab.name, n.name),
                processes={r.split(" ")[0]: _alive(lab, r) for r in roles},
                agent=agent_view(lab, n.name, problems),
            )
        )
    pods = []
    for p in topo.pods:
        rec = lab.state.pods.get(p.key)
        pods.append(
            PodView(
                namespace=p.namespace,
                name=p.name,
                node=p.node,
                ready=p.ready,
                addresses=list(rec.addresses) if rec else [],
                anycast=p.annotation_ips("anycast"),
                netns=rec.netns if rec else "",
            )
        )
    return LabStatus(
        name=lab.name,
        phase=lab.state.phase,
        router_name=topo.router.name,
        router_asn=topo.router.asn,
        router_addresses=[str(a) for a in topo.router.addresses],
        router_netns=lab.router_ns,
        router_alive=router_alive,
        nodes=nodes,
        sessions=sessions,
        routes=routes,
        pods=pods,
        problems=problems,
    )


def agent_view(lab: Lab, node: str, problems: list[str]) -> AgentView | None:
    """What the node's agent says about itself (`flock status`, over its status socket)."""
    from flock.agent.status import query

    try:
        d = query(lab.node(node).status_socket, timeout=2.0)
    except (OSError, ValueError) as e:
        problems.append(f"agent of {node} did not answer on its status socket: {e}")
        return None
    bgp = d.get("bgp") or {}
    return AgentView(
        node_config=str(d.get("node_config", "")),
        bird=str(bgp.get("bird", "not configured")),
        sessions={str(p): str(v.get("info", "")) for p, v in (bgp.get("sessions") or {}).items()},
        exports=[str(x) for x in d.get("exports") or []],
        allocations=len(d.get("allocations") or []),
    )


def graph(name: str, out: Path) -> list[Path]:
    st = status(name)
    try:
        return lab_graph.render(st, out)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        raise LabError(f"cannot draw the graph: {e}") from None


# ---------------------------------------------------------------------------------------
