"""Bring a lab up and take it down.

`up` builds, in order, and records each piece in the lab's state file before
the next one starts: the router namespace with the LAN bridge; per node a
namespace wired to the LAN; the datastore's objects (NodeConfigs, Namespaces);
FRR in the router; per node BIRD and the agent; then the pods, each written to
the datastore first and then attached through the real CNI plugin. `down`
undoes all of it from the state file, and by name (`fl-<lab>-...`) and
namespace membership when the state file is gone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess
import time
from pathlib import Path

from flock.lab import control
from flock.lab import router as lab_router
from flock.lab import state as lab_state
from flock.lab.core import (
    LAN_BRIDGE,
    Lab,
    LabError,
    Progress,
    _quiet,
    node_netns,
    router_port,
)
from flock.lab.pods import attach_pod
from flock.lab.routes import wait_routes, wait_sessions
from flock.lab.state import LabExistsError, LabNotFoundError, LabState
from flock.lab.topology import (
    DEFAULT_LAB_NAME,
    Topology,
    validate,
)
from flock.testbed import netns
from flock.testbed.bird import BirdDaemon
from flock.testbed.frr import router_config
from flock.testbed.node import TestNode


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


def up(topo: Topology, *, progress: Progress = _quiet, standalone: bool = False) -> str:
    """Build the lab; on any failure, tear down what was built and re-raise.

    By default the cluster objects live in a real kube-apiserver (`flock.lab.control`);
    `standalone` uses a manifests directory instead (no API server, no Go tools).
    """
    validate(topo)
    _preflight()
    if not standalone:
        control.preflight()
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
    st.datastore = "manifests" if standalone else "kube"
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
    if lab.state.datastore == "kube":
        progress(f"[3/6] datastore: etcd + kube-apiserver in {control.api_netns(lab.name)}")
        control.start(lab, progress)
    else:
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
    wait_sessions(lab)
    for p in topo.pods:
        progress(f"[6/6] pod {p.key} on {p.node}")
        attach_pod(lab, p)
    progress("      waiting for the router to learn the pods' routes")
    wait_routes(lab)


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
        *(
            [
                f"  Kubernetes: flock lab kubectl{flag} get pods -o wide | get nodeconfigs",
                f"    kubeconfig {lab.state.dir / 'kubeconfig'} "
                f"(inside: ip netns exec {control.api_netns(lab.name)} ...)",
            ]
            if lab.state.datastore == "kube"
            else []
        ),
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
            "--bird-socket", str(bird.socket_path),
            "--bird-config", str(bird.config_path),
            "--router-id", _node_router_id(lab, node),
        )  # fmt: skip
    finally:
        if handle.agent is not None and handle.agent.poll() is None:
            lab.state.add_process(handle.agent.pid, role=f"agent {node}")


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
