"""The lab's shared core: names, the running `Lab` handle, and the topology loader.

Every `flock lab` verb lives in a module of its own job and opens the lab
through `Lab.open`:

- `flock.lab.build`: `up` and `down` (router, nodes, FRR, agents and BIRD, the
  datastore's first objects), recorded in the lab's state file so `down`
  removes everything also after a crash;
- `flock.lab.pods`: pods scheduled, attached through the real CNI plugin as a
  kubelet would, readiness flipped as a probe would, detached;
- `flock.lab.routes`: the router's view (sessions, learned routes) and waiting
  for it to converge;
- `flock.lab.checks`: `flock lab test`, asserted from the router's own view;
- `flock.lab.inspect`: `status` and `graph`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flock.lab import state as lab_state
from flock.lab.datastore import LabDatastore, open_datastore
from flock.lab.state import LabNotFoundError, LabState
from flock.lab.topology import (
    PodSpec,
    Topology,
    default_topology,
    load,
    validate,
)
from flock.testbed.frr import FrrRouter
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
        self._datastore: LabDatastore | None = None

    @property
    def datastore(self) -> LabDatastore:
        """Opened on first use: the Kubernetes one exists only once the API server is up."""
        if self._datastore is None:
            self._datastore = open_datastore(self.state.datastore, self.state.dir)
        return self._datastore

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
            node_name=node,
            datastore_args=self.agent_datastore_args(node),
        )

    def agent_datastore_args(self, node: str) -> list[str]:
        """How `node`'s agent reaches the lab's datastore."""
        if self.state.datastore == "kube":
            return ["--kubeconfig", str(self.node_dir(node) / "kubeconfig")]
        return ["--manifests", str(self.manifests_dir)]

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
