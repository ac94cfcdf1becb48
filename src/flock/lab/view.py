"""What `flock lab status` shows, as plain data, and its rendering as text and JSON.

`inspect.status` gathers the facts (FRR's own view of sessions and routes, the
lab's pods and their readiness, which processes are alive); this module only
holds and formats them, so the formatting is tested without a lab.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SessionView:
    node: str
    peer: str  # the node's address, as the router sees it
    family: str  # "ipv6" | "ipv4"
    state: str  # "Established", "Active", ...
    prefixes_received: int = 0
    uptime: str = ""


@dataclass
class RouteView:
    prefix: str
    # (next-hop address, node name or "") for each ECMP path the router installed.
    nexthops: list[tuple[str, str]] = field(default_factory=list)
    kind: str = ""  # "node prefix" | "anycast" | "addresses" | "pod"


@dataclass
class PodView:
    namespace: str
    name: str
    node: str
    ready: bool
    addresses: list[str] = field(default_factory=list)
    anycast: list[str] = field(default_factory=list)
    netns: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class NodeView:
    name: str
    asn: int
    uplink: list[str]
    cidrs: list[str]
    netns: str
    processes: dict[str, bool] = field(default_factory=dict)  # role -> alive
    # The agent's own view (its status socket): None when it did not answer.
    agent: AgentView | None = None


@dataclass
class AgentView:
    node_config: str = ""  # "ok" or why the NodeConfig is unusable
    bird: str = ""  # "up" or "down: ..."
    sessions: dict[str, str] = field(default_factory=dict)  # peer -> BIRD's state info
    exports: list[str] = field(default_factory=list)  # per-pod prefixes BIRD exports
    allocations: int = 0


@dataclass
class LabStatus:
    name: str
    phase: str
    router_name: str
    router_asn: int
    router_addresses: list[str]
    router_netns: str
    router_alive: bool
    nodes: list[NodeView] = field(default_factory=list)
    sessions: list[SessionView] = field(default_factory=list)
    routes: list[RouteView] = field(default_factory=list)
    pods: list[PodView] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabStatus:
        return cls(
            name=d["name"],
            phase=d["phase"],
            router_name=d["router_name"],
            router_asn=d["router_asn"],
            router_addresses=d["router_addresses"],
            router_netns=d["router_netns"],
            router_alive=d["router_alive"],
            nodes=[
                NodeView(**{**n, "agent": AgentView(**n["agent"]) if n.get("agent") else None})
                for n in d.get("nodes", [])
            ],
            sessions=[SessionView(**s) for s in d.get("sessions", [])],
            routes=[
                RouteView(
                    prefix=r["prefix"],
                    nexthops=[(a, b) for a, b in r["nexthops"]],
                    kind=r.get("kind", ""),
                )
                for r in d.get("routes", [])
            ],
            pods=[PodView(**p) for p in d.get("pods", [])],
            problems=list(d.get("problems", [])),
        )

    def anycast_routes(self) -> list[RouteView]:
        return [r for r in self.routes if r.kind == "anycast"]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers).rstrip()]
    out += [fmt.format(*r).rstrip() for r in rows]
    return ["  " + line for line in out]


def render_text(st: LabStatus) -> str:
    lines = [
        f"lab '{st.name}' ({st.phase})",
        f"router {st.router_name}  AS{st.router_asn}  {' '.join(st.router_addresses)}  "
        f"netns {st.router_netns}  FRR {'running' if st.router_alive else 'NOT RUNNING'}",
        "",
        "BGP sessions (router's view):",
    ]
    lines += _table(
        ["node", "peer", "family", "state", "pfx rcvd", "up"],
        [
            [s.node, s.peer, s.family, s.state, str(s.prefixes_received), s.uptime]
            for s in st.sessions
        ],
    )
    lines += ["", "routes the router learned (ECMP next hops):"]
    rows = []
    for r in st.routes:
        hops = [f"{a} ({n})" if n else a for a, n in r.nexthops] or ["-"]
        rows.append([r.prefix, r.kind, hops[0]])
        rows += [["", "", h] for h in hops[1:]]
    lines += _table(["prefix", "kind", "via"], rows)
    for n in st.nodes:
        procs = " ".join(f"{k}:{'up' if v else 'DOWN'}" for k, v in n.processes.items())
        lines += [
            "",
            f"node {n.name}  AS{n.asn}  {' '.join(n.uplink)}  pods {' '.join(n.cidrs)}  "
            f"netns {n.netns}  {procs}",
        ]
        if n.agent is not None:
            a = n.agent
            sess = ", ".join(f"{peer} {info}" for peer, info in a.sessions.items()) or "none"
            lines.append(
                f"  agent: NodeConfig {a.node_config}; BIRD {a.bird}; sessions {sess}; "
                f"{a.allocations} allocations"
            )
            lines.append(f"  agent exports (per pod): {' '.join(a.exports) or 'none'}")
        pods = [p for p in st.pods if p.node == n.name]
        lines += _table(
            ["pod", "ready", "addresses", "anycast"],
            [
                [p.key, "yes" if p.ready else "no", " ".join(p.addresses), " ".join(p.anycast)]
                for p in pods
            ],
        )
    if st.problems:
        lines += ["", "problems:"] + [f"  ! {p}" for p in st.problems]
    return "\n".join(lines)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def render_checks(results: list[CheckResult]) -> str:
    rows = [["PASS" if r.ok else "FAIL", r.name, r.detail] for r in results]
    passed = sum(r.ok for r in results)
    lines = _table(["result", "check", "detail"], rows)
    lines.append(f"\n{passed}/{len(results)} checks passed")
    return "\n".join(lines)
