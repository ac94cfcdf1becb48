"""The lab's core API: what every `flock lab` verb calls.

`up` builds, in order, and records each piece in the lab's state file before
the next one starts: the router namespace with the LAN bridge; per node a
namespace wired to the LAN; the manifests (NodeConfigs, Namespaces) the agents
read; FRR in the router; per node the agent (which runs BIRD); then the pods,
each written to the datastore first and then attached through the real CNI
plugin, as a kubelet would. `down` undoes all of it from the state file, and
by name (`fl-<lab>-...`) and namespace membership when the state file is gone.

The verbs that act as a user would (`ready`, `add_pod`, `delete_pod`) go
through the same datastore and the same plugin; `run_checks` asserts from the
router's own view (FRR's tables, pings from its namespace) that flock did
what it promises.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flock.compile.annotations import parse_annotations
from flock.lab import graph as lab_graph
from flock.lab import router as lab_router
from flock.lab import state as lab_state
from flock.lab.datastore import LabDatastore, new_uid, open_datastore
from flock.lab.state import LabExistsError, LabNotFoundError, LabState, PodRecord
from flock.lab.topology import (
    DEFAULT_LAB_NAME,
    PodSpec,
    Topology,
    default_topology,
    load,
    validate,
)
from flock.lab.view import AgentView, CheckResult, LabStatus, NodeView, PodView, RouteView
from flock.model.nodeconfig import NodeConfig
from flock.testbed import netns
from flock.testbed.bird import BirdDaemon
from flock.testbed.frr import FrrRouter, router_config
from flock.testbed.node import TestNode

Progress = Callable[[str], None]

LAN_BRIDGE = "lan"
FRR_DAEMONS = ("zebra", "bgpd")
SESSION_TIMEOUT = 60.0
ROUTE_TIMEOUT = 30.0


class LabError(RuntimeError):
    """A lab verb that cannot do what was asked; the message says why and what to do."""


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------
# Names


def router_netns(lab: str, topo: Topology) -> str:
    return f"{lab_state.netns_prefix(lab)}{topo.router.name}"


def node_netns(lab: str, node: str) -> str:
    return f"{lab_state.netns_prefix(lab)}{node}"


def router_port(node: str) -> str:
    """The router's end of a node's uplink: a port of the LAN bridge."""
    return f"to-{node}"


def pod_netns(lab: str, pod: PodSpec) -> str:
    # Node names have no dash, so a pod's namespace can never equal a node's.
    return f"{lab_state.netns_prefix(lab)}{pod.node}-{pod.name}"


def load_topology(path: Path | None, *, name: str | None = None) -> Topology:
    topo = load(path) if path is not None else default_topology()
    if name:
        topo = topo.model_copy(update={"name": name})
        validate(topo)
    return topo


# ---------------------------------------------------------------------------------------
# The running lab, as the verbs see it


class Lab:
    """A lab that is up (or half up): its state, topology and datastore."""

    def __init__(self, st: LabState) -> None:
        self.state = st
        self.topo = Topology.model_validate(st.topology)
        self.datastore: LabDatastore = open_datastore(st.datastore, st.dir)

    @classmethod
    def open(cls, name: str) -> Lab:
        try:
            return cls(LabState.load(name))
        except LabNotFoundError as e:
            raise LabError(str(e)) from None

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def manifests_dir(self) -> Path:
        return self.state.dir / "manifests"

    def node_dir(self, node: str) -> Path:
        return self.state.dir / "nodes" / node

    @property
    def router_dir(self) -> Path:
        return self.state.dir / "router"

    @property
    def router_ns(self) -> str:
        return router_netns(self.name, self.topo)

    def save_topology(self) -> None:
        self.state.topology = self.topo.model_dump(mode="json", by_alias=True)
        self.state.save()

    def pod(self, ref: str) -> PodSpec:
        try:
            return self.topo.pod(ref)
        except KeyError:
            known = ", ".join(p.name for p in self.topo.pods) or "none"
            raise LabError(f"no pod {ref!r} in lab {self.name} (pods: {known})") from None

    @property
    def frr(self) -> FrrRouter:
        """A handle on the router's FRR (queries work from any process; PIDs are in state)."""
        return FrrRouter(netns=self.router_ns, workdir=self.router_dir, daemons=FRR_DAEMONS)

    def node(self, node: str) -> TestNode:
        """A handle on a node built by `up` (agent PID is in state, not in the handle)."""
        base = self.node_dir(node)
        return TestNode(
            name=node_netns(self.name, node),
            prefix=lab_state.netns_prefix(self.name),
            base_dir=base,
            plugin=base / "bin" / "flock",
        )

    def vtysh(self, command: str) -> Any:
        """FRR's JSON answer to a `show ...` command (bgpd for BGP, zebra for routes)."""
        daemon = "bgpd" if " bgp " in f" {command} " else "zebra"
        try:
            return self.frr.vtysh_json(command, daemon=daemon)
        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
            raise LabError(f"FRR in {self.router_ns} did not answer {command!r}: {e}") from None

    def selected_routes(self) -> dict[str, set[str]]:
        """Prefix -> peers (node LAN addresses) whose path bgpd selected (best or multipath)."""
        out: dict[str, set[str]] = {}
        try:
            for version in (6, 4):
                out.update(self.frr.bgp_routes(version))
        except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
            raise LabError(f"FRR in {self.router_ns} did not answer: {e}") from None
        return out


# ---------------------------------------------------------------------------------------
# up


def _preflight() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    missing = [b for b in ("ip", "bird", "birdc", "vtysh") if shutil.which(b) is None]
    missing += [d for d in ("/usr/lib/frr/bgpd", "/usr/lib/frr/zebra") if not Path(d).exists()]
    if missing:
        raise LabError(
            f"missing programs: {', '.join(missing)}; run ./scripts/setup (installs bird2, frr, "
            "iproute2)"
        )


def up(topo: Topology, *, progress: Progress = _quiet) -> str:
    """Build the lab; on any failure, tear down what was built and re-raise."""
    validate(topo)
    _preflight()
    leftovers = lab_state.lab_netns(topo.name)
    if leftovers and not lab_state.run_dir(topo.name).exists():
        raise LabError(
            f"namespaces of lab {topo.name!r} exist without its state "
            f"({', '.join(leftovers)}): run `flock lab down --name {topo.name}` first"
        )
    try:
        st = LabState.create(topo.name)
    except LabExistsError as e:
        raise LabError(str(e)) from None
    st.topology = topo.model_dump(mode="json", by_alias=True)
    st.save()
    lab = Lab(st)
    started = time.monotonic()
    try:
        _build(lab, progress)
    except BaseException as e:
        progress(f"up failed ({type(e).__name__}: {_describe(e)}); removing what was created")
        _log_tails(lab, progress)
        down(topo.name, progress=progress)
        if isinstance(e, Exception) and not isinstance(e, LabError):
            raise LabError(f"lab '{topo.name}' did not come up: {_describe(e)}") from e
        raise
    st.phase = "up"
    st.save()
    return _summary(lab, time.monotonic() - started)


def _describe(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        out = (e.stderr or e.stdout or "").strip()
        return f"`{' '.join(map(str, e.cmd))}` failed ({e.returncode}): {out}"
    return str(e)


def _build(lab: Lab, progress: Progress) -> None:
    topo = lab.topo
    progress(f"[1/6] router {topo.router.name}: namespace {lab.router_ns}, LAN bridge")
    _make_router(lab)
    for n in topo.nodes:
        progress(f"[2/6] node {n.name}: namespace {node_netns(lab.name, n.name)}, uplink")
        _make_node(lab, n.name)
    progress(f"[3/6] datastore: manifests in {lab.manifests_dir}")
    for n in topo.nodes:
        lab.datastore.put_node_config(topo.nodeconfig(n.name))
    for ns in sorted({p.namespace for p in topo.pods} | {"default"}):
        lab.datastore.put_namespace(ns)
    progress(f"[4/6] router: starting FRR (AS{topo.router.asn})")
    _start_frr(lab)
    for n in topo.nodes:
        progress(f"[5/6] node {n.name}: starting the flock agent and BIRD (AS{n.asn})")
        _start_agent(lab, n.name)
    progress("      waiting for BGP sessions to come up")
    _wait_sessions(lab)
    for p in topo.pods:
        progress(f"[6/6] pod {p.key} on {p.node}")
        _attach_pod(lab, p)
    progress("      waiting for the router to learn the pods' routes")
    _wait_routes(lab)


def _make_router(lab: Lab) -> None:
    ns = lab.router_ns
    lab.state.add_netns(ns, role="router")
    netns.create(ns, forwarding=True)
    # No DAD on the LAN: addresses (link-local too) are usable at once.
    netns.sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
    netns.sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
    # Hash flows on ports too, so different flows to an anycast IP spread over replicas.
    netns.sysctl(ns, "net.ipv4.fib_multipath_hash_policy", "1")
    netns.sysctl(ns, "net.ipv6.fib_multipath_hash_policy", "1")
    netns.run(["ip", "link", "add", LAN_BRIDGE, "type", "bridge"], netns=ns)
    netns.run(["ip", "link", "set", LAN_BRIDGE, "up"], netns=ns)
    for a in lab.topo.router.addresses:
        netns.add_address(ns, LAN_BRIDGE, str(a))


def _make_node(lab: Lab, node: str) -> None:
    """The node namespace with its uplink into the router's LAN bridge (flock.testbed.node)."""
    n = lab.topo.node(node)
    r = lab.topo.router
    ns = node_netns(lab.name, node)
    lab.state.add_netns(ns, role=f"node {node}")
    v6, v4 = n.uplink_address(6), n.uplink_address(4)
    gw6, gw4 = r.address(6), r.address(4)
    TestNode.create(
        lab_state.netns_prefix(lab.name),
        name=ns,
        base_dir=lab.node_dir(node),
        v6=str(v6) if v6 else None,
        v4=str(v4) if v4 else None,
        uplink_peer=lab.router_ns,
        uplink_peer_ifname=router_port(node),
        gateway6=str(gw6.ip) if gw6 and v6 else None,
        gateway4=str(gw4.ip) if gw4 and v4 else None,
    )
    netns.run(["ip", "link", "set", router_port(node), "master", LAN_BRIDGE], netns=lab.router_ns)


def _summary(lab: Lab, seconds: float) -> str:
    topo = lab.topo
    lines = [
        "",
        f"lab '{lab.name}' is up ({seconds:.1f}s): router {topo.router.name} (FRR) and "
        f"{len(topo.nodes)} nodes (flock agent + BIRD), {len(topo.pods)} pods",
        "",
        "  namespaces:",
        f"    {lab.router_ns:<28} router, AS{topo.router.asn}",
    ]
    for n in topo.nodes:
        lines.append(f"    {node_netns(lab.name, n.name):<28} node, AS{n.asn}")
    for key, rec in lab.state.pods.items():
        lines.append(f"    {rec.netns:<28} pod {key}: {' '.join(rec.addresses)}")
    flag = "" if lab.name == DEFAULT_LAB_NAME else f" --name {lab.name}"
    hints = [
        (f"flock lab status{flag}", "sessions, learned routes (ECMP), pods"),
        (f"flock lab graph{flag} -o {lab.name}.svg", "a picture"),
        (f"flock lab test{flag}", "built-in checks"),
    ]
    replica = next((p for p in topo.pods if p.annotation_ips("anycast")), None)
    if replica is not None:
        hints.append((f"flock lab ready{flag} {replica.name} false", "withdraw a replica"))
    client = next((p for p in topo.pods if p is not replica), replica)
    if client is not None:
        target = replica.annotation_ips("anycast")[0] if replica else topo.router.addresses[0].ip
        hints.append((f"flock lab exec{flag} {client.name} -- ping -c1 {target}", ""))
    width = max(len(c) for c, _ in hints) + 2
    lines += ["", "  look at it:"]
    lines += [f"    {c:<{width}}{h}".rstrip() for c, h in hints]
    lines += [
        f"    ip netns exec {lab.router_ns} vtysh --vty_socket {lab.router_dir} -d bgpd "
        "-c 'show bgp summary'",
        f"  files: {lab.state.dir}",
        f"  remove it: flock lab down{flag}",
    ]
    return "\n".join(lines)


def _log_tails(lab: Lab, progress: Progress) -> None:
    for log in sorted(lab.state.dir.rglob("*.log")):
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").strip().splitlines()[-8:]
            if tail:
                progress(f"--- last lines of {log}:")
                for line in tail:
                    progress(f"    {line}")


# ---------------------------------------------------------------------------------------
# FRR (router) and agents (nodes): the other engineers' testbed modules


def _start_frr(lab: Lab) -> None:
    topo = lab.topo
    frr = lab.frr
    config = router_config(
        asn=topo.router.asn,
        router_id=ipaddress.IPv4Address(lab_router.router_id(topo)),
        neighbors=lab_router.neighbors(topo),
        hostname=topo.router.name,
        extra=lab_router.connect_retry(topo),
    )
    try:
        frr.start(config)
    finally:
        for daemon, proc in frr.procs.items():
            if proc.poll() is None:
                lab.state.add_process(proc.pid, role=f"frr-{daemon}")


def _node_router_id(lab: Lab, node: str) -> str:
    v4 = lab.topo.node(node).uplink_address(4)
    if v4 is not None:
        return str(v4.ip)
    index = [n.name for n in lab.topo.nodes].index(node)
    return f"10.255.{index // 250}.{index % 250 + 1}"


def _start_agent(lab: Lab, node: str) -> None:
    """BIRD first (the agent drives it over its control socket), then the agent."""
    ns = node_netns(lab.name, node)
    bird = BirdDaemon(netns=ns, workdir=lab.node_dir(node) / "bird")
    bird.start()
    if bird.pid is not None:
        lab.state.add_process(bird.pid, role=f"bird {node}")
    handle = lab.node(node)
    try:
        handle.start_agent(
            # Later flags win: the node's Kubernetes name, and the lab's shared manifests.
            "--node-name", node,
            "--manifests", str(lab.manifests_dir),
            "--bird-socket", str(bird.socket_path),
            "--bird-config", str(bird.config_path),
            "--router-id", _node_router_id(lab, node),
        )  # fmt: skip
    finally:
        if handle.agent is not None and handle.agent.poll() is None:
            lab.state.add_process(handle.agent.pid, role=f"agent {node}")


def _cni(lab: Lab, rec: PodRecord, command: str) -> dict[str, Any]:
    """Run the real plugin for `rec` exactly as a runtime would; its result object."""
    res = lab.node(rec.node).cni(
        command,
        container_id=rec.container_id,
        netns_path=netns.path(rec.netns),
        ifname=rec.ifname,
        pod_namespace=rec.namespace,
        pod_name=rec.name,
        pod_uid=rec.uid,
    )
    if not res.ok:
        detail = res.stdout.strip() or res.stderr.strip()
        with contextlib.suppress(ValueError):
            err = res.json
            detail = str(err.get("msg", detail)) + (
                f" ({err['details']})" if err.get("details") else ""
            )
        raise LabError(f"CNI {command} for pod {rec.namespace}/{rec.name} failed: {detail}")
    return res.json


# ---------------------------------------------------------------------------------------
# Pods


def _attach_pod(lab: Lab, pod: PodSpec) -> PodRecord:
    """Schedule (write the object, not Ready), attach (CNI ADD), then set readiness."""
    uid = new_uid()
    lab.datastore.put_pod(pod, uid=uid, ready=False)
    ns = pod_netns(lab.name, pod)
    lab.state.add_netns(ns, role=f"pod {pod.key}")
    netns.create(ns)
    rec = PodRecord(
        namespace=pod.namespace,
        name=pod.name,
        node=pod.node,
        netns=ns,
        container_id=uid.replace("-", ""),
        uid=uid,
    )
    lab.state.pods[pod.key] = rec
    lab.state.save()
    result = _cni(lab, rec, "ADD")
    rec.addresses = [str(ipaddress.ip_interface(ip["address"]).ip) for ip in result.get("ips", [])]
    lab.state.save()
    lab.datastore.put_pod(pod, uid=uid, ready=pod.ready, ips=rec.addresses)
    return rec


def ready(name: str, ref: str, value: bool) -> None:
    lab = Lab.open(name)
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    lab.topo = lab.topo.with_ready(pod.key, value)
    lab.save_topology()
    if rec is not None:
        lab.datastore.set_ready(lab.topo.pod(pod.key), uid=rec.uid, ready=value, ips=rec.addresses)


def converge(name: str, *, timeout: float = ROUTE_TIMEOUT) -> tuple[float, dict[str, set[str]]]:
    """Wait until the router's routes match the lab's pods and readiness.

    Returns the seconds it took and the router's view (prefix -> nodes).
    """
    lab = Lab.open(name)
    t0 = time.monotonic()
    _wait("the router to converge", timeout, lambda: _routes_missing(lab))
    return time.monotonic() - t0, learned(lab)


def add_pod(name: str, pod: PodSpec) -> PodRecord:
    lab = Lab.open(name)
    if any(p.name == pod.name for p in lab.topo.pods):
        raise LabError(f"lab '{name}' already has a pod named {pod.name!r}")
    topo = lab.topo.with_pod(pod)
    validate(topo)
    lab.topo = topo
    lab.save_topology()
    try:
        return _attach_pod(lab, pod)
    except BaseException:
        _detach_pod(lab, pod)
        raise


def _detach_pod(lab: Lab, pod: PodSpec) -> None:
    rec = lab.state.pods.get(pod.key)
    if rec is not None:
        with contextlib.suppress(Exception):
            _cni(lab, rec, "DEL")
        netns.delete(rec.netns)
        del lab.state.pods[pod.key]
    lab.datastore.delete_pod(pod.namespace, pod.name)
    lab.topo = lab.topo.without_pod(pod.key)
    lab.save_topology()


def delete_pod(name: str, ref: str) -> None:
    lab = Lab.open(name)
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    if rec is not None:
        _cni(lab, rec, "DEL")
    _detach_pod(lab, pod)


def exec_in_pod(name: str, ref: str, cmd: Sequence[str]) -> int:
    """Run `cmd` in the network namespace of a pod, a node or the router (by name)."""
    lab = Lab.open(name)
    if ref == lab.topo.router.name:
        return subprocess.call(["ip", "netns", "exec", lab.router_ns, *cmd])
    if any(n.name == ref for n in lab.topo.nodes):
        return subprocess.call(["ip", "netns", "exec", node_netns(lab.name, ref), *cmd])
    pod = lab.pod(ref)
    rec = lab.state.pods.get(pod.key)
    if rec is None:
        raise LabError(f"pod {pod.key} has no network namespace (it was never attached)")
    return subprocess.call(["ip", "netns", "exec", rec.netns, *cmd])


# ---------------------------------------------------------------------------------------
# down


def down(name: str, *, progress: Progress = _quiet) -> str:
    """Remove every process, namespace and directory of lab `name`; idempotent."""
    if os.geteuid() != 0:
        raise LabError("removing network namespaces needs root")
    try:
        st: LabState | None = LabState.load(name)
    except (LabNotFoundError, ValueError, KeyError):
        st = None
    names = set(lab_state.lab_netns(name))
    procs: list[tuple[int, int]] = []
    dirs: list[str] = [str(lab_state.run_dir(name))]
    if st is not None:
        names |= {r.ident for r in st.resources if r.kind == "netns"}
        procs += [(int(r.ident), r.start_time) for r in st.processes()]
        dirs += [r.ident for r in st.resources if r.kind == "dir"]
    # Processes running inside the lab's namespaces are the lab's, state file or not.
    procs += [p for p in lab_state.pids_in_netns(sorted(names)) if p not in procs]
    if not names and not procs and not any(Path(d).exists() for d in dirs):
        return f"lab '{name}': nothing to remove"
    stopped = lab_state.stop_processes(procs)
    progress(f"stopped {len(stopped)} processes")
    # Stragglers that joined a namespace meanwhile (none expected).
    late = lab_state.pids_in_netns(sorted(names))
    if late:
        lab_state.stop_processes(late, timeout=2.0)
    for n in sorted(names, key=lambda x: (x.count("-"), x), reverse=True):
        netns.delete(n)
    progress(f"removed {len(names)} network namespaces")
    for d in dirs:
        lab_state.remove_dir(d)
    left = lab_state.lab_netns(name)
    if left:
        raise LabError(f"lab '{name}': namespaces still present after down: {', '.join(left)}")
    return f"lab '{name}' is down: {len(stopped)} processes, {len(names)} namespaces removed"


# ---------------------------------------------------------------------------------------
# status, graph


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
                agent=_agent_view(lab, n.name, problems),
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


def _agent_view(lab: Lab, node: str, problems: list[str]) -> AgentView | None:
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
# waiting on the router's view


def _wait(what: str, timeout: float, probe: Callable[[], str | None]) -> None:
    """Poll `probe` (None = done, else what is still missing) until done or timeout."""
    deadline = time.monotonic() + timeout
    missing: str | None = "not checked"
    while time.monotonic() < deadline:
        with contextlib.suppress(LabError, subprocess.SubprocessError, ValueError):
            missing = probe()
            if missing is None:
                return
        time.sleep(0.02)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}: {missing}")


def _sessions_missing(lab: Lab) -> str | None:
    sessions = lab_router.parse_summary(lab.topo, lab.vtysh("show bgp summary json"))
    down_ = [f"{s.node} {s.family} ({s.state})" for s in sessions if s.state != "Established"]
    return ", ".join(down_) or None


def _wait_sessions(lab: Lab) -> None:
    _wait("BGP sessions", SESSION_TIMEOUT, lambda: _sessions_missing(lab))


def learned(lab: Lab) -> dict[str, set[str]]:
    """Prefix -> nodes whose path the router selected (best or ECMP multipath)."""
    by_addr = lab_router.node_by_address(lab.topo)
    return {
        prefix: {by_addr.get(peer, peer) for peer in peers}
        for prefix, peers in lab.selected_routes().items()
    }


def expected_routes(topo: Topology) -> dict[str, set[str]]:
    """What the router must have learned: node prefixes, Ready anycast, addresses IPs."""
    want: dict[str, set[str]] = {}
    for n in topo.nodes:
        for c in n.cidrs:
            want[str(c)] = {n.name}
    for p in topo.pods:
        for ip in p.annotation_ips("anycast"):
            net = str(ipaddress.ip_network(ip))
            want.setdefault(net, set())
            if p.ready:
                want[net].add(p.node)
        for ip in p.annotation_ips("addresses"):
            want[str(ipaddress.ip_network(ip))] = {p.node}
    return want


def _routes_missing(lab: Lab) -> str | None:
    have = learned(lab)
    bad = []
    for prefix, nodes in expected_routes(lab.topo).items():
        got = have.get(prefix, set())
        if got != nodes:
            bad.append(f"{prefix} via {sorted(got) or 'nothing'} (want {sorted(nodes) or 'none'})")
    return "; ".join(bad) or None


def _wait_routes(lab: Lab) -> None:
    _wait("routes at the router", ROUTE_TIMEOUT, lambda: _routes_missing(lab))


# ---------------------------------------------------------------------------------------
# checks


def _ping(netns_name: str, address: str) -> tuple[bool, str]:
    """One ICMP echo from `netns_name`; (answered, "rtt 0.05 ms" or why not)."""
    fam = "-6" if ":" in address else "-4"
    r = netns.run(
        ["ping", fam, "-n", "-c", "1", "-W", "2", address],
        netns=netns_name,
        check=False,
        timeout=10,
    )
    m = re.search(r"time=([0-9.]+) ms", r.stdout)
    if r.returncode == 0 and m:
        return True, f"rtt {m.group(1)} ms"
    lines = (r.stdout + r.stderr).strip().splitlines()
    return False, lines[-1] if lines else f"ping exited {r.returncode}"


def run_checks(name: str, *, progress: Progress = _quiet) -> list[CheckResult]:
    lab = Lab.open(name)
    results: list[CheckResult] = []

    def record(check: str, ok: bool, detail: str = "") -> None:
        results.append(CheckResult(check, ok, detail))
        progress(f"{'PASS' if ok else 'FAIL'} {check}")

    # 0. every daemon the lab started is alive, and every agent answers
    dead = [
        f"{r.role} (pid {r.ident})"
        for r in lab.state.processes()
        if not lab_state.alive(int(r.ident), r.start_time)
    ]
    silent = []
    for node in lab.topo.nodes:
        if _agent_view(lab, node.name, []) is None:
            silent.append(node.name)
    detail = f"{len(lab.state.processes())} processes, {len(lab.topo.nodes)} agents answer"
    if dead or silent:
        detail = "; ".join(
            ([f"dead: {', '.join(dead)}"] if dead else [])
            + ([f"agents not answering: {', '.join(silent)}"] if silent else [])
        )
    record("FRR, BIRDs and agents running", not dead and not silent, detail)

    # 1. sessions
    try:
        missing = _sessions_missing(lab)
        n = len(lab_router.parse_summary(lab.topo, lab.vtysh("show bgp summary json")))
        record("BGP sessions Established", missing is None, missing or f"{n} sessions")
    except (LabError, subprocess.SubprocessError, ValueError) as e:
        record("BGP sessions Established", False, str(e))
        return results

    # 2. routes the router learned
    try:
        missing = _routes_missing(lab)
        record(
            "router learned node prefixes, Ready anycast, addresses", missing is None, missing or ""
        )
    except (LabError, subprocess.SubprocessError, ValueError) as e:
        record("router learned routes", False, str(e))

    # 2b. every pod got an address of each family it asked for (node default + annotations)
    wrong = []
    for p in lab.topo.pods:
        rec = lab.state.pods.get(p.key)
        got = {ipaddress.ip_address(a).version for a in rec.addresses} if rec else set()
        want = _families(lab.topo, p)
        if got != want:
            wrong.append(f"{p.key} has IPv{sorted(got)} want IPv{sorted(want)}")
    record(
        "every pod has its address families",
        not wrong,
        "; ".join(wrong) or f"{len(lab.topo.pods)} pods",
    )

    # 3. reachability, both families, router -> every pod and pod -> pod across nodes
    #    (a family no pod has, or pods on one node only, has nothing to check)
    for fam in (6, 4):
        targets = [
            (k, a)
            for k, rec in lab.state.pods.items()
            for a in rec.addresses
            if ipaddress.ip_address(a).version == fam
        ]
        if targets:
            failed = [f"{k} {a}" for k, a in targets if not _ping(lab.router_ns, a)[0]]
            record(
                f"IPv{fam}: router reaches every pod",
                not failed,
                f"{len(targets) - len(failed)}/{len(targets)}"
                + (f"; failed: {', '.join(failed)}" if failed else ""),
            )
        pairs = _cross_node_pairs(lab, fam)
        if pairs:
            failed = [f"{a}->{b}" for a, b, addr, ns in pairs if not _ping(ns, addr)[0]]
            record(
                f"IPv{fam}: pod to pod across nodes",
                not failed,
                f"{len(pairs) - len(failed)}/{len(pairs)}"
                + (f"; failed: {', '.join(failed)}" if failed else ""),
            )

    # 4. ECMP and withdraw/restore, per anycast address
    for ip in sorted({ip for p in lab.topo.pods for ip in p.annotation_ips("anycast")}):
        results += _anycast_checks(lab, ip, progress)
    return results


def _families(topo: Topology, pod: PodSpec) -> set[int]:
    """The address families `pod` must have, resolved as the agent resolves them."""
    req = parse_annotations(
        pod.annotations,
        node=NodeConfig.from_object(topo.nodeconfig(pod.node)),
        namespace=pod.namespace,
    )
    return {v for v, fam in ((6, req.v6), (4, req.v4)) if fam.want}


def _cross_node_pairs(lab: Lab, fam: int) -> list[tuple[str, str, str, str]]:
    """(src pod, dst pod, dst address, src netns): first pod of each node to the next node's."""
    first: dict[str, PodRecord] = {}
    for rec in lab.state.pods.values():
        if any(ipaddress.ip_address(a).version == fam for a in rec.addresses):
            first.setdefault(rec.node, rec)
    recs = list(first.values())
    out = []
    for i, src in enumerate(recs):
        if len(recs) < 2:
            break
        dst = recs[(i + 1) % len(recs)]
        addr = next(a for a in dst.addresses if ipaddress.ip_address(a).version == fam)
        out.append((f"{src.namespace}/{src.name}", f"{dst.namespace}/{dst.name}", addr, src.netns))
    return out


def _anycast_checks(lab: Lab, ip: str, progress: Progress) -> list[CheckResult]:
    prefix = str(ipaddress.ip_network(ip))
    replicas = [p for p in lab.topo.pods if ip in p.annotation_ips("anycast")]
    ready_nodes = {p.node for p in replicas if p.ready}
    out: list[CheckResult] = []
    have = learned(lab).get(prefix, set())
    out.append(
        CheckResult(
            f"ECMP at router for {prefix}",
            have == ready_nodes and len(ready_nodes) >= 1,
            f"next hops {sorted(have)}; Ready replicas on {sorted(ready_nodes)}",
        )
    )
    ok, detail = _ping(lab.router_ns, ip)
    out.append(CheckResult(f"anycast {ip} answers", ok, detail))
    spread = _fib_spread(lab, ip)
    if len(ready_nodes) > 1:
        out.append(
            CheckResult(
                f"router kernel spreads flows to {ip}",
                set(spread) == ready_nodes,
                "64 flows: " + ", ".join(f"{n} {c}" for n, c in sorted(spread.items())),
            )
        )
    # A replica that is the only Ready one on its node: flipping it must move the router.
    per_node = {n: sum(p.node == n and p.ready for p in replicas) for n in ready_nodes}
    victim = next((p for p in replicas if p.ready and per_node[p.node] == 1), None)
    if victim is None:
        return out
    rest = ready_nodes - {victim.node}
    t0 = time.monotonic()
    ready(lab.name, victim.key, False)
    try:
        _wait(
            f"{prefix} withdrawn from {victim.node}",
            ROUTE_TIMEOUT,
            lambda: None if learned(lab).get(prefix, set()) == rest else "still there",
        )
        took = time.monotonic() - t0
        out.append(
            CheckResult(
                f"withdraw {prefix} when {victim.name} is not Ready",
                True,
                f"router next hops {sorted(rest) or 'none'} after {took * 1000:.0f} ms",
            )
        )
    except LabError as e:
        out.append(CheckResult(f"withdraw {prefix} when {victim.name} is not Ready", False, str(e)))
    finally:
        t1 = time.monotonic()
        ready(lab.name, victim.key, True)
    try:
        _wait(
            f"{prefix} restored",
            ROUTE_TIMEOUT,
            lambda: None if learned(lab).get(prefix, set()) == ready_nodes else "not yet",
        )
        out.append(
            CheckResult(
                f"restore {prefix} when {victim.name} is Ready again",
                True,
                f"after {(time.monotonic() - t1) * 1000:.0f} ms",
            )
        )
    except LabError as e:
        out.append(
            CheckResult(f"restore {prefix} when {victim.name} is Ready again", False, str(e))
        )
    return out


def _gateway_nodes(lab: Lab) -> dict[str, str]:
    """Node for every address the router's kernel may use as next hop (LAN and link-local)."""
    out = lab_router.node_by_address(lab.topo)
    for n in lab.topo.nodes:
        handle = lab.node(n.name)
        r = netns.run(
            ["ip", "-j", "-6", "addr", "show", "dev", handle.uplink, "scope", "link"],
            netns=handle.name,
            check=False,
        )
        with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
            for info in json.loads(r.stdout)[0]["addr_info"]:
                if "local" in info:  # `ip -j` leaves {} for addresses the filter hid
                    out[str(info["local"])] = n.name
    return out


def _fib_spread(lab: Lab, ip: str) -> dict[str, int]:
    """Node -> how many of 64 different UDP flows to `ip` the router's kernel sends there."""
    fam = "-6" if ":" in ip else "-4"
    nodes = _gateway_nodes(lab)
    spread: dict[str, int] = {}
    for sport in range(40000, 40064):
        r = netns.run(
            ["ip", "-j", fam, "route", "get", ip,
             "ipproto", "udp", "sport", str(sport), "dport", "53"],
            netns=lab.router_ns,
            check=False,
        )  # fmt: skip
        with contextlib.suppress(ValueError, IndexError, KeyError):
            gw = str(json.loads(r.stdout)[0]["gateway"])
            node = nodes.get(gw, gw)
            spread[node] = spread.get(node, 0) + 1
    return spread
